"""Every configuration of the single-pass moment kernel, one at a time, next to SDPA (needs a CUDA GPU).

The autotuner picks one configuration (loop order, tile, warps, stages) per length bucket; this
pins each in turn and prints, per configuration, its largest difference from the PyTorch path on a
small grouped-head case and its time per layer at long context on a public shape, as a ratio to
the flash SDPA forward of the same layer (which hands the normaliser to the single pass). Then the
autotuner's own choice. A configuration that does not build on this GPU is listed as such.

    python benchmarks/moments_orders.py --shapes llama-3.2-1b --lengths 32768

The census adds one single pass per layer to the forward, so its time over SDPA's is about
1 + (kernel ÷ attention) × (attention's share of the forward); docs/scale.md has both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.moments_check import SDPA_SHAPES, _Causal  # noqa: E402
from probe import moments, moments_single  # noqa: E402
from probe.kernels import attend_with_lse  # noqa: E402
from probe.moments_triton import KERNEL_ERRORS  # noqa: E402

if TYPE_CHECKING:
    import triton

ORDERS = {
    moments_single.ROWS_OUTER: "rows outer",
    moments_single.KEYS_OUTER: "keys outer",
    moments_single.TRANSPOSED: "transposed",
}


def _events_ms(fn: object, repeats: int = 5) -> float:
    fn()  # type: ignore[operator]  # warm: autotuning and compilation happen here
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()  # type: ignore[operator]
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _qkv(b: int, H: int, H_kv: int, T: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, H, T, d, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(b, H_kv, T, d, device="cuda", generator=gen).to(torch.bfloat16)
    return q, k, torch.randn_like(k)


def _with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    got = attend_with_lse(_Causal(q.shape[1] // k.shape[1]).eval(), q, k, v, None)
    if got is None:
        raise SystemExit("SDPA handed no log-sum-exp back for plain causal attention on this GPU")
    return got[1]


def _agreement(small: tuple[torch.Tensor, ...]) -> float:
    """The pinned configuration's largest difference from the PyTorch path: launched directly, so
    that a configuration that fails raises here (the automatic path would fall back and hide it)."""
    q, k, _v, lse = small
    b, H, T, d = q.shape
    ent, mk, col = (torch.empty(b, H, T, device="cuda") for _ in range(3))
    diag = torch.empty(2, b, H, T, device="cuda")
    moments.launch_lse_moments(q, k, d**-0.5, lse, (1, 5), (ent, mk, col, diag))
    got = moments.AttentionMoments(ent, mk, col, {1: diag[0], 5: diag[1]})
    ref = moments.attention_moments(q, k, use_triton=False, diag_offsets=(1, 5))
    return max(got.differences(ref).values())


def _describe(cfg: triton.Config) -> str:
    kw = cfg.kwargs
    return (
        f"{ORDERS[kw['ORDER']]:<10} {kw['BLOCK_M']:>3}×{kw['BLOCK_N']:<3} w{cfg.num_warps} s{cfg.num_stages}"
    )


def run(shape: str, T: int) -> None:
    H, H_kv, d = SDPA_SHAPES[shape]
    small = _qkv(2, 8, 2, 700, d, seed=1)
    small = (*small, _with_lse(*small))
    q, k, v = _qkv(1, H, H_kv, T, d, seed=2)
    lse = _with_lse(q, k, v)
    sdpa_ms = _events_ms(lambda: _with_lse(q, k, v))
    rows = [torch.empty(1, H, T, device="cuda") for _ in range(3)]
    outs = (*rows, torch.empty(1, 1, H, T, device="cuda"))
    scale = d**-0.5

    def one() -> None:
        moments.launch_lse_moments(q, k, scale, lse, (1,), outs)  # type: ignore[arg-type]

    kernel = moments_single._lse_moments_kernel
    every = list(kernel.configs)
    print(f"{shape} T={T} bfloat16: SDPA forward with lse {sdpa_ms:.2f} ms per layer")
    print(f"  {'configuration':<28} {'worst diff':>10} {'ms/layer':>9} {'÷ SDPA':>7}")
    try:
        for cfg in every:
            kernel.configs, kernel.cache = [cfg], {}
            try:
                worst = _agreement(small)
                ms = _events_ms(one)
            except KERNEL_ERRORS as err:
                print(f"  {_describe(cfg):<28} does not build: {(str(err).splitlines() or [''])[0][:90]}")
                continue
            print(f"  {_describe(cfg):<28} {worst:10.1e} {ms:9.2f} {ms / sdpa_ms:7.2f}")
    finally:
        kernel.configs, kernel.cache = every, {}
    ms = _events_ms(one)
    best = getattr(kernel, "best_config", None)
    chosen = _describe(best) if best is not None else "?"
    print(f"  autotuned: {chosen} {ms:.2f} ms per layer ({ms / sdpa_ms:.2f}× SDPA)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", default="llama-3.2-1b", help=f"comma-separated, of {', '.join(SDPA_SHAPES)}"
    )
    parser.add_argument("--lengths", default="32768", help="comma-separated token counts")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not moments.HAVE_TRITON:
        raise SystemExit("needs a CUDA GPU with Triton (a CUDA build of torch)")
    for shape in args.shapes.split(","):
        if shape not in SDPA_SHAPES:
            raise SystemExit(f"unknown shape {shape!r}: choose from {', '.join(SDPA_SHAPES)}")
        for T in (int(t) for t in args.lengths.split(",")):
            run(shape, T)


if __name__ == "__main__":
    main()
