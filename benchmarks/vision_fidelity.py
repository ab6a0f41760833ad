"""How far the converted clip-vit-b16 agrees with the package's own INT8 ONNX runtime, image by image.

The converted model holds the dequantised weights; the package's runtime also quantises every
activation to 8 bits. This prints the cosine of the two image embeddings for every image of the
offline image set (``analyses/tasks/images.py``), and optionally for synthetic scenes, as a
distribution per kind of image, with the share under the 0.97 mark.

Usage::

    python benchmarks/vision_fidelity.py                  # the whole image set (220 images)
    python benchmarks/vision_fidelity.py --scenes 50      # plus 50 synthetic scenes
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

import probe
from analyses.tasks import images, scenes
from probe import vision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", default="all", help="image subset (see analyses.tasks.images.SUBSETS)")
    parser.add_argument("--scenes", type=int, default=0, help="also this many synthetic scenes")
    parser.add_argument("--mark", type=float, default=0.97, help="the agreement mark to count against")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = probe.load_model("clip-vit-b16", device="cpu")
    records = images.load_images(args.subset)
    rows: list[dict[str, object]] = []
    t0 = time.perf_counter()
    for i, rec in enumerate(records):
        cos = float(vision.onnx_agreement(model, [rec.pixels])[0])
        rows.append({"image": rec.name, "kind": rec.kind, "cosine": cos})
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(records)} images, {time.perf_counter() - t0:.0f} s", flush=True)
    for scene in scenes.make_scenes(args.scenes, seed=0) if args.scenes else ():
        cos = float(vision.onnx_agreement(model, [scene.render()])[0])
        rows.append({"image": f"scene{scene.index}", "kind": "synthetic scene", "cosine": cos})
    frame = pd.DataFrame(rows)
    q = [0.0, 0.05, 0.25, 0.5, 0.75, 1.0]
    table = frame.groupby("kind")["cosine"].describe(percentiles=q[1:-1])
    table[f"below {args.mark}"] = frame.groupby("kind")["cosine"].apply(lambda c: int((c < args.mark).sum()))
    print(table.round(4).to_string())
    all_cos = frame["cosine"].to_numpy()
    print(
        f"all {len(all_cos)} images: min {all_cos.min():.4f}, median {np.median(all_cos):.4f}, "
        f"max {all_cos.max():.4f}; {(all_cos < args.mark).sum()} below {args.mark}"
    )
    print(frame.nsmallest(5, "cosine").round(4).to_string(index=False))


if __name__ == "__main__":
    main()
