"""How far the converted clip-vit-b16 agrees with the package's ONNX graph, image by image, two ways.

The converted model holds the dequantised weights. It is compared with two references, both run
with onnxruntime on the CPU from the package's own ``clip_encoder.int8.onnx``:

* ``int8``: the graph as the package runs it, which also quantises every activation to 8 bits;
* ``float``: the same graph with that activation quantisation taken out
  (:func:`probe.onnx_clip.float_activation_graph`: same dequantised weights, float32 activations).
  It isolates the conversion from the runtime's quantisation.

For every image of the offline image set (``analyses/tasks/images.py``), and optionally for
synthetic scenes, it prints the cosine of the image embeddings against each reference side by
side, then per kind of image the median, the minimum and the count and share under the 0.97 mark.
Our embedding is computed once per image and compared with both references.

Usage::

    python benchmarks/vision_fidelity.py                  # the whole image set (220 images)
    python benchmarks/vision_fidelity.py --limit 10       # the first 10 images, a quick check
    python benchmarks/vision_fidelity.py --scenes 50      # plus 50 synthetic scenes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import probe
from analyses.tasks import images, scenes
from probe import onnx_clip, vision
from probe.loading import LoadedModel


def _cosines(model: LoadedModel, onnx_file: Path, image: np.ndarray) -> dict[str, float]:
    """{reference: cosine} for one image; the model's embedding is computed once."""
    pixels = model.preprocess([image])
    ours = vision.embed(model, pixels).double()
    out: dict[str, float] = {}
    for ref in onnx_clip.REFERENCES:
        theirs = torch.from_numpy(onnx_clip.run_onnx(onnx_file, pixels, reference=ref)).double()
        out[ref] = float(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)[0])
    return out


def _summary(frame: pd.DataFrame, mark: float) -> pd.DataFrame:
    """Per kind and overall: n, then median, min, count and share below ``mark`` per reference."""
    groups = [(kind, g) for kind, g in frame.groupby("kind", sort=False)] + [("all", frame)]
    rows = []
    for kind, g in groups:
        row: dict[str, object] = {"kind": kind, "n": len(g)}
        for ref in onnx_clip.REFERENCES:
            c = g[ref].to_numpy()
            below = int((c < mark).sum())
            row |= {
                f"{ref} median": np.median(c),
                f"{ref} min": c.min(),
                f"{ref} <{mark}": below,
                f"{ref} share <{mark}": below / len(c),
            }
        row["float max 1-cos"] = float((1.0 - g["float"]).max())
        rows.append(row)
    return pd.DataFrame(rows).set_index("kind")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", default="all", help="image subset (see analyses.tasks.images.SUBSETS)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the subset")
    parser.add_argument("--scenes", type=int, default=0, help="also this many synthetic scenes")
    parser.add_argument("--mark", type=float, default=0.97, help="the agreement mark to count against")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    model = probe.load_model("clip-vit-b16", device="cpu")
    onnx_file = vision.converted_onnx_file(model)
    records = images.load_images(args.subset)
    if args.limit is not None:
        records = records[: args.limit]
    rows: list[dict[str, object]] = []
    t0 = time.perf_counter()
    for i, rec in enumerate(records):
        rows.append({"image": rec.name, "kind": rec.kind, **_cosines(model, onnx_file, rec.pixels)})
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(records)} images, {time.perf_counter() - t0:.0f} s", flush=True)
    for scene in scenes.make_scenes(args.scenes, seed=0) if args.scenes else ():
        rows.append(
            {
                "image": f"scene{scene.index}",
                "kind": "synthetic scene",
                **_cosines(model, onnx_file, scene.render()),
            }
        )
    frame = pd.DataFrame(rows)
    frame["float 1-cos"] = 1.0 - frame["float"]
    print(f"\ncosine of the image embeddings, converted model vs the ONNX graph ({onnx_file.name}):")
    print("  int8  = the package's runtime (activations quantised to 8 bits)")
    print("  float = the same graph, same weights, activation quantisation taken out\n")
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(
            frame.to_string(
                index=False,
                formatters={
                    "int8": "{:.4f}".format,
                    "float": "{:.6f}".format,
                    "float 1-cos": "{:.1e}".format,
                },
            )
        )
        print()
        print(
            _summary(frame, args.mark).to_string(
                float_format=lambda v: f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
            )
        )
    print()
    for ref in onnx_clip.REFERENCES:
        c = frame[ref].to_numpy()
        print(
            f"{ref:>5}: all {len(c)} images: min {c.min():.6f}, median {np.median(c):.6f}, "
            f"max {c.max():.6f}; {(c < args.mark).sum()} below {args.mark}"
        )
    print("\nlowest against int8:")
    print(frame.nsmallest(5, "int8")[["image", "kind", "int8", "float"]].round(6).to_string(index=False))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s ({len(frame)} images)")


if __name__ == "__main__":
    main()
