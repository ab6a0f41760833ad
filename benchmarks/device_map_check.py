"""A spread model's census and greedy tokens against the CPU's, on the GPUs of this machine.

Random-weight ``tiny-llama`` (every kernel's CUDA path, the Triton moment kernels included): a
recompute and an eager census, and 8 greedy tokens, on the CPU, on ``cuda`` and with
``device_map="auto"`` (on a machine with several GPUs, accelerate spreads the layers over them);
prints each one's largest difference from the CPU and whether the tokens are the same.

    python benchmarks/device_map_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import probe  # noqa: E402
from probe.capture import capture  # noqa: E402
from probe.reducers import ColumnImportance, DiagonalScore, MeanDistance, RowEntropy  # noqa: E402

ROWS = [list(range(3, 200)), list(range(10, 90))]


def run(mode: str, **where: Any) -> tuple[list[torch.Tensor], torch.Tensor, probe.LoadedModel]:
    model = probe.load_model("tiny-llama", **where)
    reducers = [RowEntropy(), MeanDistance(), DiagonalScore(1, name="prev_token"), ColumnImportance()]
    capture(model, ROWS, reducers, mode=mode, batch_size=2, progress=False)  # type: ignore[arg-type]
    tokens = model.generate(model.batch_from_ids([ROWS[1]]), max_new_tokens=8)
    return [r.result().float().cpu() for r in reducers], tokens.cpu(), model


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    worst = 0.0
    for mode in ("recompute", "eager"):
        ref, ref_tokens, _ = run(mode, device="cpu")
        for label, where in (("cuda", {"device": "cuda"}), ("map auto", {"device_map": "auto"})):
            got, tokens, model = run(mode, **where)
            diff = max((a - b).abs().max().item() for a, b in zip(ref, got, strict=True))
            worst = max(worst, diff)
            layers = sorted({str(d) for d in model.layer_devices()})
            same = torch.equal(ref_tokens, tokens)
            print(
                f"{mode:9} {label:8} layers on {layers}: max |diff| vs cpu {diff:.2e}; tokens equal: {same}"
            )
    assert worst < 1e-3, "a GPU census disagrees with the CPU's"


if __name__ == "__main__":
    main()
