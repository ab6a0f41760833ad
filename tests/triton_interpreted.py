"""The Triton moment kernels run by Triton's interpreter on the CPU, against the PyTorch path.

Run as a script with ``TRITON_INTERPRET=1`` set (the interpreter is chosen when the kernels are
defined, so the variable must be set before :mod:`probe.moments_triton` is imported); used by
tests/test_triton_kernels.py. ``argv[1]`` is the index, in each kernel's list, of the
configuration to pin, modulo the list's length (the autotuner cannot time configurations without a
GPU). Prints one line
per case, ``name worst``, and exits 1 if a case is off by more than the tolerance.

The interpreter runs the kernels' index arithmetic, masks and reductions as written (numpy
underneath): every mask, block boundary and grouped-head mapping is exercised. It cannot catch
what only a GPU shows (register layouts, races, compiler bugs); benchmarks/moments_check.py does
that on a GPU. bfloat16 is not used: the interpreter mishandles it; float16 stands for the
half-precision inputs.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("set TRITON_INTERPRET=1 before running this script")

from probe import moments, moments_single
from probe.moments_triton import HAVE_TRITON

TOL = 2e-5


def _pin(index: int) -> None:
    import triton.runtime.autotuner as autotuner

    def prune(self: autotuner.Autotuner, kwargs: dict[str, object], *args: object) -> list[object]:
        return [self.configs[index % len(self.configs)]]

    autotuner.Autotuner.prune_configs = prune  # type: ignore[assignment,method-assign]


def _worst(got: moments.AttentionMoments, ref: moments.AttentionMoments) -> float:
    return max(got.differences(ref).values())


def _qk(b: int, H: int, H_kv: int, T: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(T + d)
    q = torch.randn(b, H, T, d, generator=gen).to(dtype)
    k = torch.randn(b, H_kv, T, d, generator=gen).to(dtype)
    return q, k


def _lse(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    T, d = q.shape[2], q.shape[3]
    kk = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    t = torch.arange(T)
    s = (q.float() @ kk.transpose(-1, -2)) * d**-0.5
    return torch.logsumexp(s.masked_fill(~(t[None, :] <= t[:, None]), float("-inf")), -1)


def cases() -> list[tuple[str, float]]:
    out = []
    offsets = (0, 1, 3, 5, 9)  # five: the fifth is read from the scores outside the kernel
    for dtype in (torch.float32, torch.float16):
        name = str(dtype).removeprefix("torch.")
        # two passes: left padding, grouped heads, with and without a sliding window
        q, k = _qk(2, 4, 2, 150, 16, dtype)
        pads = torch.tensor([0, 23])
        for window, cap in ((None, None), (40, None), (40, 2.0)):
            kw = {"pad_offsets": pads, "sliding_window": window, "diag_offsets": offsets, "softcap": cap}
            got = moments.attention_moments(q, k, use_triton=True, **kw)  # type: ignore[arg-type]
            ref = moments.attention_moments(q, k, use_triton=False, **kw)  # type: ignore[arg-type]
            out.append((f"two-pass {name} window={window} cap={cap}", _worst(got, ref)))
        # one pass: no padding, the normaliser given (as the forward's kernel returns it)
        q, k = _qk(2, 4, 2, 141, 32, dtype)
        got = moments.attention_moments(q, k, use_triton=True, diag_offsets=offsets, lse=_lse(q, k))
        ref = moments.attention_moments(q, k, use_triton=False, diag_offsets=offsets)
        out.append((f"one-pass {name}", _worst(got, ref)))
    out.extend(_failures())
    # from a pattern: left padding
    q, k = _qk(2, 3, 3, 97, 16, torch.float32)
    pattern = torch.softmax(_lse_scores(q, k), -1).to(torch.float16)
    pads = torch.tensor([0, 11])
    got = moments.pattern_moments(pattern, pad_offsets=pads, diag_offsets=(1, 2), use_triton=True)
    ref = moments.pattern_moments(pattern, pad_offsets=pads, diag_offsets=(1, 2), use_triton=False)
    out.append(("pattern float16", _worst(got, ref)))
    return out


def _failures() -> list[tuple[str, float]]:
    """Kernels chosen automatically that fail to build, or build but compute wrongly (caught by
    their first-use check): the slower path runs instead, with a warning, and gives the reference's
    numbers; asked for by name (use_triton=True), a kernel that fails to build raises."""
    out = []
    q, k = _qk(1, 2, 1, 77, 16, torch.float32)
    pattern = torch.softmax(_lse_scores(q[:, :1], k), -1)
    lse = _lse(q, k)
    ref = moments.attention_moments(q, k, use_triton=False, diag_offsets=(1,))
    capped_ref = moments.attention_moments(q, k, use_triton=False, diag_offsets=(1,), softcap=2.0)
    pattern_ref = moments.pattern_moments(pattern, use_triton=False)

    def plain() -> moments.AttentionMoments:
        return moments.attention_moments(q, k, diag_offsets=(1,))

    def single() -> moments.AttentionMoments:
        return moments.attention_moments(q, k, diag_offsets=(1,), lse=lse)

    def capped() -> moments.AttentionMoments:
        return moments.attention_moments(q, k, diag_offsets=(1,), softcap=2.0)

    def from_pattern() -> moments.AttentionMoments:
        return moments.pattern_moments(pattern)

    cases = [
        ("single", "launch_lse_moments", single, ref),
        ("moments", "launch_moments", plain, ref),
        ("capped", "launch_moments", capped, capped_ref),
        ("pattern", "launch_pattern_moments", from_pattern, pattern_ref),
    ]
    saved = moments.cuda_triton
    moments.cuda_triton = lambda tensor: True  # type: ignore[assignment]  # CPU tensors here
    try:
        for which, name, run, reference in cases:
            # the two uncapped passes are the trusted reference (checked on GPUs): no first-use check
            for how in ("raises",) if which == "moments" else ("raises", "wrong"):
                if how == "raises" and which in ("capped", "pattern"):
                    continue  # the same handler as "moments"
                out.append((f"{how} {which} kernel falls back", _fallback(name, how, run, reference)))
        out.append(("asked-for kernel raises", _explicit_raises(q, k)))
        out.append(("newest order failing narrows the single pass", _narrows(single, ref)))
        # correct kernels pass their first-use checks without a word
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            worst = max(_worst(run(), reference) for _, _, run, reference in cases)
        out.append(("first-use checks pass", worst))
    finally:
        moments.cuda_triton = saved  # type: ignore[assignment]
    return out


def _explicit_raises(q: torch.Tensor, k: torch.Tensor) -> float:
    """0 when a failing kernel asked for by name raises (and nothing is recorded), else 1."""
    launch = moments.launch_moments

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("PassManager::run failed")

    moments.launch_moments = broken  # type: ignore[assignment]
    try:
        moments.attention_moments(q, k, use_triton=True)
        return 1.0
    except RuntimeError:
        return 0.0 if not moments.KERNEL_FAILED else 1.0
    finally:
        moments.launch_moments = launch  # type: ignore[assignment]


def _fallback(name: str, how: str, run: object, reference: moments.AttentionMoments) -> float:
    launch = getattr(moments, name)

    def broken(*args: object, **kwargs: object) -> None:
        if how == "raises":
            raise RuntimeError("PassManager::run failed")
        launch(*args, **kwargs)
        outs = args[-2] if name == "launch_moments" else args[-1]
        outs[2 if name == "launch_pattern_moments" else -2].add_(1.0)  # type: ignore[index]

    setattr(moments, name, broken)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = run()  # type: ignore[operator]
        warned = any("the same numbers, slower" in str(w.message) for w in caught)
        return _worst(got, reference) if warned else 1.0
    finally:
        setattr(moments, name, launch)
        _reset()


def _reset() -> None:
    moments.KERNEL_FAILED.clear()
    moments._CHECKED.clear()
    moments_single.NARROWED.clear()


def _narrows(run: object, reference: moments.AttentionMoments) -> float:
    """The worst difference when the single pass with every loop order fails to build and the
    measured orders alone work: retried with those, with a warning, still one pass (1.0 if not)."""
    launch = moments.launch_lse_moments

    def newest_fails(*args: object, **kwargs: object) -> None:
        if not moments_single.NARROWED:
            raise RuntimeError("PassManager::run failed")
        launch(*args, **kwargs)  # type: ignore[arg-type]

    moments.launch_lse_moments = newest_fails  # type: ignore[assignment]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = run()  # type: ignore[operator]
        said = " ".join(str(w.message) for w in caught)
        ok = "newest loop order failed" in said and "slower" not in said and not moments.KERNEL_FAILED
        return _worst(got, reference) if ok and moments_single.NARROWED else 1.0
    finally:
        moments.launch_lse_moments = launch  # type: ignore[assignment]
        _reset()


def _lse_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    T, d = q.shape[2], q.shape[3]
    t = torch.arange(T)
    s = (q.float() @ k.float().transpose(-1, -2)) * d**-0.5
    return s.masked_fill(~(t[None, :] <= t[:, None]), float("-inf"))


def main() -> int:
    if not HAVE_TRITON:
        raise SystemExit("triton is not installed")
    _pin(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    bad = 0
    for name, worst in cases():
        print(f"{name} {worst:.3e}")
        bad += worst > TOL
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
