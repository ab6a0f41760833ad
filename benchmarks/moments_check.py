"""Check the Triton attention-moment kernels against the PyTorch implementation (needs a CUDA GPU).

Random queries/keys with left padding, grouped-query heads and a sliding window, in float32 and
bfloat16; prints the largest differences and the time of both paths at a long context.

    python benchmarks/moments_check.py
"""

from __future__ import annotations

import time

import torch

from probe.moments import attention_moments, triton_available


def compare(dtype: torch.dtype, window: int | None, T: int = 700) -> float:
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, H, H_kv, d = 2, 8, 2, 64
    q = torch.randn(b, H, T, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(b, H_kv, T, d, device="cuda", generator=gen).to(dtype)
    pads = torch.tensor([0, 37], device="cuda")
    fast = attention_moments(q, k, pad_offsets=pads, sliding_window=window, use_triton=True)
    ref = attention_moments(q, k, pad_offsets=pads, sliding_window=window, use_triton=False)
    worst = 0.0
    for name in ("lse", "entropy", "mean_key", "colsum"):
        a, r = getattr(fast, name), getattr(ref, name)
        rel = ((a - r).abs() / r.abs().clamp_min(1.0)).max().item()
        worst = max(worst, rel)
        print(f"  {dtype!s:<15} window={window!s:<5} {name:<9} max rel diff {rel:.2e}")
    return worst


def main() -> None:
    if not torch.cuda.is_available() or not triton_available(torch.zeros(1, 64, device="cuda")):
        raise SystemExit("needs a CUDA GPU with Triton")
    worst = max(compare(dt, w) for dt in (torch.float32, torch.bfloat16) for w in (None, 128))
    print(f"worst relative difference: {worst:.2e}")
    for T in (8192, 32768):
        q = torch.randn(1, 9, T, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 3, T, 64, device="cuda", dtype=torch.bfloat16)
        for use in (True, False):
            attention_moments(q, k, use_triton=use)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(3):
                attention_moments(q, k, use_triton=use, block=1024)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / 3 * 1e3
            peak = torch.cuda.max_memory_allocated() / 2**20
            print(f"T={T} {'triton' if use else 'torch '}: {ms:.2f} ms per layer, peak {peak:.0f} MiB")
    assert worst < 2e-2, "Triton moments disagree with the reference"


if __name__ == "__main__":
    main()
