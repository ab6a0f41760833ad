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


def run(
    mode: str, batch_size: int = 2, **where: Any
) -> tuple[list[torch.Tensor], torch.Tensor, probe.LoadedModel]:
    model = probe.load_model("tiny-llama", **where)
    reducers = [RowEntropy(), MeanDistance(), DiagonalScore(1, name="prev_token"), ColumnImportance()]
    capture(model, ROWS, reducers, mode=mode, batch_size=batch_size, progress=False)  # type: ignore[arg-type]
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
    one_pass_check()


def one_pass_check() -> None:
    """One prompt per batch in bfloat16 (no padding, a fused SDPA kernel): each layer's moments
    take the single pass with the normaliser SDPA hands back. Counted, and compared with the same
    census made with two passes (the forward's own normaliser not used)."""
    import probe.capture as capture_module
    import probe.moments as moments

    calls = [0]
    launch, with_lse = moments.launch_lse_moments, capture_module.attend_with_lse

    def counted(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        launch(*args, **kwargs)

    model = probe.load_model("tiny-llama", device="cuda", dtype=torch.bfloat16)

    def census() -> list[torch.Tensor]:
        reducers = [RowEntropy(), MeanDistance(), DiagonalScore(1, name="prev_token"), ColumnImportance()]
        capture(model, ROWS, reducers, mode="recompute", batch_size=1, progress=False)
        return [r.result().float().cpu() for r in reducers]

    moments.launch_lse_moments = counted  # type: ignore[assignment]
    try:
        one = census()
        capture_module.attend_with_lse = lambda *a, **k: None  # type: ignore[assignment]
        two = census()
    finally:
        moments.launch_lse_moments, capture_module.attend_with_lse = launch, with_lse  # type: ignore[assignment]
    diff = max(((a - b).abs() / b.abs().clamp_min(1.0)).max().item() for a, b in zip(one, two, strict=True))
    print(
        f"recompute bf16 cuda, one prompt a batch: {calls[0]} single-pass layers; one pass vs two: {diff:.2e}"
    )
    assert calls[0] == len(ROWS) * model.n_layers, "the unpadded census did not take the single pass"
    assert diff < 1e-4, "the single pass disagrees with the two passes"


if __name__ == "__main__":
    main()
