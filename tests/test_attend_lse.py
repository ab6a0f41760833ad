"""probe.kernels.attend_with_lse: SDPA's output and its rows' log-sum-exp, for the single pass.

The ATen ops that hand the log-sum-exp back run on CUDA only; here the op is replaced by a
PyTorch computation on the CPU, so that what surrounds it is checked: which calls ask for it, the
one-time check of its units and mask, and the fall-back (with a warning) when it disagrees or the
op refuses. The real ops are checked against SDPA on a GPU by benchmarks/moments_check.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from probe import kernels


class _Layer(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _qkv(T: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(1, 4, T, 16, generator=gen)
    k = torch.randn(1, 2, T, 16, generator=gen)
    v = torch.randn(1, 2, T, 16, generator=gen)
    return q, k, v


def _true_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    T = q.shape[2]
    s = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2)) * scale
    t = torch.arange(T)
    return torch.logsumexp(s.masked_fill(~(t[None, :] <= t[:, None]), float("-inf")), -1)


@pytest.fixture
def fake_op(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The fused op replaced by PyTorch on the CPU; ``state["units"]`` scales the lse it returns,
    ``state["fail"]`` makes it raise; ``state["calls"]`` counts the calls."""
    state: dict[str, Any] = {"units": 1.0, "fail": False, "calls": 0}

    def op(choice: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Any:
        state["calls"] += 1
        if state["fail"]:
            raise RuntimeError("this kernel does not take these shapes\nsecond line")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return out, _true_lse(q, k, scale) * state["units"]

    monkeypatch.setattr(kernels, "_LSE_DEVICES", ("cpu",))
    monkeypatch.setattr(kernels, "_LSE_CHECKED", set())
    monkeypatch.setattr(kernels, "_LSE_REFUSED", set())
    monkeypatch.setattr(kernels, "_fused_with_lse", op)
    return state


def test_the_output_is_sdpas_and_the_normaliser_is_checked_once(fake_op: dict[str, Any]) -> None:
    q, k, v = _qkv()
    layer = _Layer().eval()
    got = kernels.attend_with_lse(layer, q, k, v, None)
    assert got is not None
    out, lse = got
    assert torch.equal(out, kernels.attend(layer, q, k, v, None))  # [b, T, h, d], as attend hands back
    assert torch.allclose(lse, _true_lse(q, k, 0.25), atol=1e-6)
    assert len(kernels._LSE_CHECKED) == 1 and not kernels._LSE_REFUSED
    assert kernels.attend_with_lse(layer, q, k, v, None) is not None and fake_op["calls"] == 2


def test_a_normaliser_in_other_units_is_refused_once_with_a_warning(fake_op: dict[str, Any]) -> None:
    fake_op["units"] = 1 / math.log(2)  # log2 units: every probability of the single pass would be off
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match="two passes instead"):
        assert kernels.attend_with_lse(_Layer().eval(), q, k, v, None) is None
    # remembered: the op is not asked again for this kind of call
    assert kernels.attend_with_lse(_Layer().eval(), q, k, v, None) is None and fake_op["calls"] == 1


def test_a_kernel_that_refuses_the_call_falls_back_with_its_reason(fake_op: dict[str, Any]) -> None:
    fake_op["fail"] = True
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match="refused the call .this kernel does not take these shapes.;"):
        assert kernels.attend_with_lse(_Layer().eval(), q, k, v, None) is None


@pytest.mark.parametrize(
    "case", ["mask", "softcap", "window", "kv_cache", "one_token", "not_causal", "position_bias", "dropout"]
)
def test_only_plain_causal_attention_asks_for_the_normaliser(fake_op: dict[str, Any], case: str) -> None:
    q, k, v = _qkv()
    layer = _Layer().eval()
    mask = None
    kw: dict[str, Any] = {}
    if case == "mask":
        mask = torch.ones(1, 1, 12, 12, dtype=torch.bool).tril()
    elif case == "softcap":
        kw["softcap"] = 50.0
    elif case == "window":
        kw["sliding_window"] = 5
    elif case == "kv_cache":
        q = q[:, :, -3:]
    elif case == "one_token":
        q, k, v = q[:, :, :1], k[:, :, :1], v[:, :, :1]
    elif case == "not_causal":
        kw["is_causal"] = False
    elif case == "position_bias":
        kw["position_bias"] = torch.zeros(1, 4, 12, 12)
    else:
        layer.train()
        kw["dropout"] = 0.1
    assert kernels.attend_with_lse(layer, q, k, v, mask, **kw) is None
    assert fake_op["calls"] == 0
    # a window no shorter than the sequence changes nothing: the normaliser is asked for
    if case == "window":
        assert kernels.attend_with_lse(layer, q, k, v, None, sliding_window=12) is not None
