"""Check the Triton attention-moment kernels against the PyTorch implementation (needs a CUDA GPU).

Random queries/keys with left padding, grouped-query heads, a sliding window and a soft cap, in
float32 and bfloat16, through both entry points (from q/k and from a pattern); prints the largest
relative differences and the time and peak memory of both paths per layer at long contexts.

    python benchmarks/moments_check.py

Then, per layer of three public shapes at 8K and 32K tokens, the moment kernels' time next to the
flash SDPA attention of the same queries and keys (the forward's own attention), as a ratio; and the
first call at a new length of an already tuned power-of-two bucket (no re-tuning: about the tuned
time).
"""

from __future__ import annotations

import time

import torch

from probe.kernels import attend, attend_with_lse
from probe.moments import AttentionMoments, attention_moments, pattern_moments, triton_available


def compare(dtype: torch.dtype, window: int | None, T: int = 700, softcap: float | None = None) -> float:
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, H, H_kv, d = 2, 8, 2, 64
    q = torch.randn(b, H, T, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(b, H_kv, T, d, device="cuda", generator=gen).to(dtype)
    pads = torch.tensor([0, 37], device="cuda")
    kw = {"pad_offsets": pads, "sliding_window": window, "diag_offsets": (1, 5), "softcap": softcap}
    diffs = attention_moments(q, k, use_triton=True, **kw).differences(
        attention_moments(q, k, use_triton=False, **kw)
    )
    print(
        f"  q/k     {dtype!s:<15} window={window!s:<5} cap={softcap!s:<5} "
        + "  ".join(f"{n} {v:.1e}" for n, v in diffs.items())
    )
    worst = max(diffs.values())
    if window is None and softcap is None:
        kk = k.float().repeat_interleave(H // H_kv, dim=1)
        t = torch.arange(T, device="cuda")
        s = (q.float() @ kk.transpose(-1, -2)) / d**0.5
        s = s.masked_fill(~(t[None, :] <= t[:, None]), float("-inf"))
        p = torch.softmax(s, -1).to(dtype)
        kw2 = {"pad_offsets": pads, "diag_offsets": (1, 5)}
        pdiffs = pattern_moments(p, use_triton=True, **kw2).differences(
            pattern_moments(p, use_triton=False, **kw2)
        )
        print(f"  pattern {dtype!s:<15}              " + "  ".join(f"{n} {v:.1e}" for n, v in pdiffs.items()))
        worst = max(worst, *pdiffs.values())
    return worst


class _Causal(torch.nn.Module):
    """What the attention functions read off an attention module: causal, with query-head groups."""

    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def compare_one_pass(dtype: torch.dtype, T: int = 700) -> float:
    """The single pass (normaliser from the forward's kernel) against the PyTorch reference, and
    the forward's output against SDPA's, under each fused SDPA kernel that runs the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(1)
    b, H, H_kv, d = 2, 8, 2, 64
    q = torch.randn(b, H, T, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(b, H_kv, T, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(b, H_kv, T, d, device="cuda", generator=gen).to(dtype)
    module = _Causal(H // H_kv).eval()
    ref = attention_moments(q, k, use_triton=False, diag_offsets=(1, 5))
    two_pass = attention_moments(q, k, use_triton=True, diag_offsets=(1, 5))
    worst = 0.0
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        with sdpa_kernel([backend]):
            try:
                plain = attend(module, q, k, v, None)
            except RuntimeError:
                print(f"  one pass {dtype!s:<15} {backend.name:<20} SDPA cannot run this shape")
                continue
            got = attend_with_lse(module, q, k, v, None)
        # SDPA ran this backend, so its op hands the log-sum-exp back: None is a refusal (its warning says why)
        assert got is not None, f"attend_with_lse refused {backend.name}, which SDPA ran"
        out, lse = got
        moments = attention_moments(q, k, use_triton=True, diag_offsets=(1, 5), lse=lse)
        diffs = moments.differences(ref)
        same = torch.equal(out, plain)
        lse_diff = (lse - _lse(q, k)).abs().max().item()
        print(
            f"  one pass {dtype!s:<15} {backend.name:<20} output {'identical' if same else 'DIFFERS'}  "
            f"lse {lse_diff:.1e}  " + "  ".join(f"{n} {v:.1e}" for n, v in diffs.items())
        )
        assert same, "the forward's output with the log-sum-exp differs from SDPA's"
        worst = max(worst, lse_diff, *diffs.values())
    worst = max(worst, *two_pass.differences(ref).values())
    return worst


def _lse(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    T, d = q.shape[2], q.shape[3]
    kk = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    t = torch.arange(T, device=q.device)
    s = (q.float() @ kk.transpose(-1, -2)) * d**-0.5
    return torch.logsumexp(s.masked_fill(~(t[None, :] <= t[:, None]), float("-inf")), -1)


def timed(fn: object, repeats: int = 5) -> tuple[float, float]:
    fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3, (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    if not torch.cuda.is_available() or not triton_available(torch.zeros(1, 64, device="cuda")):
        raise SystemExit("needs a CUDA GPU with Triton")
    worst = 0.0
    for dt in (torch.bfloat16, torch.float32):
        for w, cap in ((None, None), (128, None), (128, 2.0)):  # a cap of 2 binds on these scores
            t0 = time.perf_counter()
            worst = max(worst, compare(dt, w, softcap=cap))
            print(f"    ({time.perf_counter() - t0:.1f} s, autotuning included)")
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        worst = max(worst, compare_one_pass(dt))
    print(f"worst difference: {worst:.2e}")
    for T in (8192, 32768):
        q = torch.randn(1, 9, T, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 3, T, 64, device="cuda", dtype=torch.bfloat16)
        for use in (True, False):
            ms, mib = timed(
                lambda use=use, q=q, k=k: attention_moments(
                    q, k, use_triton=use, block=1024, diag_offsets=(1, 5)
                )
            )
            print(f"T={T} q/k     {'triton' if use else 'torch '}: {ms:7.2f} ms per layer, +{mib:.0f} MiB")
        if T <= 8192:
            p = torch.rand(1, 9, T, T, device="cuda", dtype=torch.bfloat16)
            for use in (True, False):
                ms, mib = timed(lambda use=use, p=p: pattern_moments(p, use_triton=use, diag_offsets=(1, 5)))
                print(
                    f"T={T} pattern {'triton' if use else 'torch '}: {ms:7.2f} ms per layer, +{mib:.0f} MiB"
                )
    versus_sdpa()
    assert worst < 2e-2, "Triton moments disagree with the reference"


SDPA_SHAPES = {  # query heads, KV heads, head width
    "llama-3.2-1b": (32, 8, 64),
    "llama-3.1-8b": (32, 8, 128),
    "qwen2.5-7b": (28, 4, 128),
}


def _one_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionMoments:
    got = attend_with_lse(_Causal(q.shape[1] // k.shape[1]).eval(), q, k, v, None)
    assert got is not None, "SDPA handed no log-sum-exp back for plain causal attention"
    return attention_moments(q, k, use_triton=True, diag_offsets=(1,), lse=got[1])


def versus_sdpa() -> None:
    """The moments (row and column kernels) of one layer next to its flash SDPA attention."""
    import torch.nn.functional as F

    print("per layer, bfloat16: moments ÷ SDPA attention (causal, GQA); the one-pass time includes SDPA's")
    for name, (H, H_kv, d) in SDPA_SHAPES.items():
        for T in (8192, 32768):
            q = torch.randn(1, H, T, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, H_kv, T, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            sdpa_ms, _ = timed(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            )
            mom_ms, _ = timed(lambda q=q, k=k: attention_moments(q, k, use_triton=True, diag_offsets=(1,)))
            one_ms, _ = timed(lambda q=q, k=k, v=v: _one_pass(q, k, v))
            print(
                f"  {name:<13} T={T:<6} sdpa {sdpa_ms:7.2f} ms  two passes {mom_ms:7.2f} ms "
                f"({mom_ms / sdpa_ms:4.2f}×)  SDPA with lse + one pass {one_ms:7.2f} ms "
                f"(moments {(one_ms - sdpa_ms) / sdpa_ms:4.2f}×)"
            )
    q = torch.randn(1, 32, 30000, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 30000, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    attention_moments(q, k, use_triton=True, diag_offsets=(1,))
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    tuned, _ = timed(lambda: attention_moments(q, k, use_triton=True, diag_offsets=(1,)))
    print(
        f"  a new length in a tuned bucket (T=30000, llama-3.2-1b heads): first call {first:.1f} ms, then {tuned:.1f} ms"
    )


if __name__ == "__main__":
    main()
