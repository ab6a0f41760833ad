"""Streaming attention and DuoAttention's gated mix of full and streaming heads.

A streaming head (StreamingLLM, DuoAttention) lets the query at position ``t`` see only the first
``sink`` keys and the last ``recent`` keys up to itself: ``[0, sink) ∪ [t - recent + 1, t]``.
:func:`streaming_attention` computes that block by block over the queries, gathering for each
block only the keys it may see, so no ``T_q × T_k`` tensor is built. :func:`duo_attention` runs a
loaded model with every KV head's output replaced by ``gate * full + (1 - gate) * streaming``,
with gates that may require grad (DuoAttention trains them).

See docs/streaming.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from probe.errors import ConfigError
from probe.heads import check_int
from probe.kernels import (
    attend,
    attention_modules,
    capped_softmax,
    check_replaceable,
    native_attention,
    register_attention,
    softcapped_attention,
)
from probe.model import LoadedModel

__all__ = ["DEFAULT_BLOCK", "DUO_IMPL", "duo_attention", "full_attention", "streaming_attention"]

DEFAULT_BLOCK = 128
"""Queries per block of :func:`streaming_attention`: each block gathers ``sink + recent + block - 1`` keys."""
DUO_IMPL = "headlab_duo"
"""The transformers attention implementation that :func:`duo_attention` registers and selects."""


# ------------------------------------------------------------------------------------ checks


def _check_window(sink: object, recent: object, block: object, *, min_sink: int) -> tuple[int, int, int]:
    s = check_int(sink, "sink")
    r = check_int(recent, "recent")
    b = check_int(block, "block")
    if s < min_sink:
        least = "a positive int" if min_sink == 1 else "at least 0"
        raise ConfigError(f"sink must be {least} (the first keys every query sees), got {s}; e.g. sink=4")
    if r < 1:
        raise ConfigError(
            f"recent must be a positive int (the keys up to and including the query's own), got {r}; e.g. recent=256"
        )
    if b < 1:
        raise ConfigError(
            f"block must be a positive int (queries per block), got {b}; e.g. block={DEFAULT_BLOCK}"
        )
    return s, r, b


def _check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[int, int, int, int]:
    """(H, H_kv, T_q, T_k) of query ``[B, H, T_q, d]`` and key/value ``[B, H_kv, T_k, d]``."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ConfigError(
            "query, key and value must be 4-D [batch, heads, T, d], got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, h, tq, d = query.shape
    if key.shape[:3] != value.shape[:3] or key.shape[0] != b or key.shape[3] != d:
        raise ConfigError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} do not fit query {tuple(query.shape)}: "
            "give key and value [batch, kv_heads, T_k, d] with the query's batch and (for key) head size"
        )
    hkv, tk = key.shape[1], key.shape[2]
    if hkv == 0 or h % hkv:
        raise ConfigError(
            f"query heads ({h}) must be a multiple of KV heads ({hkv}); pass keys before repeat"
        )
    if not 1 <= tq <= tk:
        raise ConfigError(
            f"the {tq} queries must be the last of the {tk} keys (1 <= T_q <= T_k); pass the cached keys too"
        )
    return h, hkv, tq, tk


# ------------------------------------------------------------------------------------ kernels


def full_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float | None = None,
    sliding_window: int | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention ``[B, H, T_q, d_v]`` of the last ``T_q`` of ``T_k`` positions, by SDPA.

    query ``[B, H, T_q, d]``, key/value ``[B, H_kv, T_k, d]`` (``H`` a multiple of ``H_kv``: query
    head ``h`` reads KV head ``h // (H / H_kv)``). With ``sliding_window`` ``W`` the query at ``t``
    sees keys ``(t - W, t]``, as transformers' sliding-window layers do. With ``softcap`` the
    logits are soft-capped as transformers' eager attention does (Gemma 2), by
    :func:`probe.kernels.softcapped_attention` (SDPA cannot cap; no dropout then).
    """
    h, hkv, tq, tk = _check_qkv(query, key, value)
    if sliding_window is not None and check_int(sliding_window, "sliding_window") < 1:
        raise ConfigError(f"sliding_window must be a positive int or None, got {sliding_window}")
    window = sliding_window if sliding_window is not None and sliding_window < tk else None
    if softcap is not None:
        _check_no_dropout(dropout)
        return softcapped_attention(query, key, value, None, scaling, float(softcap), window).transpose(1, 2)
    if window is None and tq == tk:
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=h != hkv
        )
    q_pos = torch.arange(tk - tq, tk, device=query.device)[:, None]
    k_pos = torch.arange(tk, device=query.device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling, enable_gqa=h != hkv
    )


def _check_no_dropout(dropout: float) -> None:
    if dropout:
        raise ConfigError(
            f"soft-capped attention runs without dropout, got dropout={dropout}; call model.eval() "
            "or set the model's attention_dropout to 0"
        )


def _block_keys(
    n_blocks: int, blk: int, offset: int, tk: int, sink: int, recent: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key indices ``[n_blocks, K]`` each query block gathers and the bool mask ``[n_blocks, blk, K]``.

    Slots ``[0, sink)`` are the sinks; the other ``recent + blk - 1`` slots are the window ending at
    the block's last real query. Window slots that fall before ``sink`` (sinks again, or negative
    indices clamped to 0) are masked, so no key is counted twice.
    """
    width = recent + blk - 1
    starts = offset + torch.arange(n_blocks, device=device) * blk  # first query position of each block
    ends = torch.clamp(starts + blk, max=tk)  # one past the block's last real query
    window = ends[:, None] - width + torch.arange(width, device=device)  # [n_blocks, width]
    sinks = torch.arange(sink, device=device).expand(n_blocks, sink)
    k_pos = torch.cat([sinks, window], dim=1)  # [n_blocks, K]
    slot_ok = torch.cat([torch.ones_like(sinks, dtype=torch.bool), window >= sink], dim=1)
    q_pos = starts[:, None] + torch.arange(blk, device=device)  # [n_blocks, blk]
    kp, qp = k_pos[:, None, :], q_pos[:, :, None]
    allowed = slot_ok[:, None, :] & (kp <= qp) & ((kp < sink) | (kp > qp - recent))
    # Padding queries past the end (last block) see every valid slot, so that no softmax row is
    # empty whatever the SDPA backend makes of one (a NaN row would poison the keys' gradient).
    allowed |= (qp >= tk) & slot_ok[:, None, :]
    return k_pos.clamp(min=0), allowed


def streaming_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    sink: int,
    recent: int,
    scaling: float | None = None,
    block: int = DEFAULT_BLOCK,
    dropout: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Streaming attention ``[B, H, T_q, d_v]``: the query at ``t`` sees keys ``[0, sink) ∪ [t - recent + 1, t]``.

    query ``[B, H, T_q, d]``, key/value ``[B, H_kv, T_k, d]``; the queries are the last ``T_q`` key
    positions (``T_q < T_k`` is a decode step or a chunk after a KV cache). ``scaling`` defaults to
    ``1 / sqrt(d)``. ``block`` queries at a time gather their ``sink + recent + block - 1`` keys, and
    one SDPA call with a small bool mask runs all blocks; query heads of one KV head are stacked
    along the query axis, so repeated keys are never built. Memory is ``O(T·(sink + recent +
    block))`` per head, never ``T_q × T_k``. Differentiable; any dtype SDPA takes; ``sink=0`` is a
    plain sliding window of ``recent`` keys. When every query sees its whole prefix anyway
    (``T_k <= sink + recent``) it is :func:`full_attention`. ``softcap``: soft-capped logits, as
    transformers' eager attention computes them (:func:`probe.kernels.capped_softmax`; no dropout).
    """
    sink, recent, block = _check_window(sink, recent, block, min_sink=0)
    h, hkv, tq, tk = _check_qkv(query, key, value)
    if tk <= sink + recent:
        return full_attention(query, key, value, scaling=scaling, dropout=dropout, softcap=softcap)
    if softcap is not None:
        _check_no_dropout(dropout)
    b, d, dv, g = query.shape[0], query.shape[3], value.shape[3], h // hkv
    blk = min(block, tq)
    n_blocks = math.ceil(tq / blk)
    index, allowed = _block_keys(n_blocks, blk, tk - tq, tk, sink, recent, query.device)
    n_keys = index.shape[1]
    q = F.pad(query.reshape(b, hkv, g, tq, d), (0, 0, 0, n_blocks * blk - tq))
    q = q.view(b, hkv, g, n_blocks, blk, d).permute(3, 0, 1, 2, 4, 5).reshape(n_blocks, b * hkv, g * blk, d)

    def gather(x: torch.Tensor, width: int) -> torch.Tensor:
        picked = x.index_select(2, index.flatten()).view(b, hkv, n_blocks, n_keys, width)
        return picked.permute(2, 0, 1, 3, 4).reshape(n_blocks, b * hkv, n_keys, width)

    mask = allowed[:, None, None].expand(n_blocks, 1, g, blk, n_keys).reshape(n_blocks, 1, g * blk, n_keys)
    if softcap is None:
        out = F.scaled_dot_product_attention(
            q, gather(key, d), gather(value, dv), attn_mask=mask, dropout_p=dropout, scale=scaling
        )
    else:
        scores = torch.matmul(q, gather(key, d).transpose(-1, -2)) * (
            scaling if scaling is not None else d**-0.5
        )
        out = torch.matmul(capped_softmax(scores, float(softcap), mask), gather(value, dv))
    out = out.view(n_blocks, b, hkv, g, blk, dv).permute(1, 2, 3, 0, 4, 5)
    return out.reshape(b, h, n_blocks * blk, dv)[:, :, :tq]


# ------------------------------------------------------------------------------------ duo attention


class _DuoState:
    """One active :func:`duo_attention` block: the gates and window, and which layers skip streaming."""

    def __init__(self, model: LoadedModel, gates: torch.Tensor, sink: int, recent: int, block: int) -> None:
        self.gates = gates
        self.sink = sink
        self.recent = recent
        self.block = block
        self.skip = [False] * model.n_layers

    def before_forward(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Refuse padded inputs and gates that left [0, 1]; decide which layers may skip streaming."""
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 2:
                raise ConfigError(
                    f"duo_attention takes a 2-D attention_mask of ones, got {tuple(mask.shape)}; "
                    "leave attention_mask out (the mask is causal) or pass one without padding"
                )
            if not bool(mask.bool().all()):
                raise ConfigError(
                    "duo_attention does not support padded batches (the streaming window counts key "
                    "positions from 0); run one sequence at a time or batch sequences of equal length"
                )
        g = self.gates.detach()
        stats = torch.stack([g.min(), g.max(), torch.isnan(g).any().to(g.dtype)]).tolist()
        if stats[2] or stats[0] < 0 or stats[1] > 1:
            raise ConfigError(
                f"duo_attention gates left [0, 1] (min {stats[0]:.4g}, max {stats[1]:.4g}); "
                "clamp them after each optimiser step, e.g. gates.data.clamp_(0, 1)"
            )
        needs_grad = self.gates.requires_grad and torch.is_grad_enabled()
        # A layer whose gates are all 1 outputs the full branch exactly; its streaming branch is only
        # needed for the gates' gradient (full - streaming), so it is skipped when none is wanted.
        self.skip = [False] * len(self.skip) if needs_grad else (g == 1).all(dim=1).tolist()


_ACTIVE: dict[int, tuple[_DuoState, int]] = {}
"""id(native attention module) -> (the active duo block, its layer)."""


def _check_key_positions(
    module: torch.nn.Module, key: torch.Tensor, tq: int, kwargs: Mapping[str, Any]
) -> None:
    """With a KV cache the keys must be positions ``0..T_k-1`` (a sliding-window cache drops old ones)."""
    tk = key.shape[2]
    if tq == tk:
        return
    positions = kwargs.get("position_ids")
    if not isinstance(positions, torch.Tensor):  # the architecture does not pass positions on
        sliding = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        last = None if sliding else tk - 1
    else:
        last = int(positions[..., -1].max())
    if last != tk - 1:
        where = "an unknown position" if last is None else f"position {last}"
        raise ConfigError(
            f"layer {getattr(module, 'layer_idx', '?')} gets {tk} keys for a query at {where}: its cache "
            "does not keep every key from position 0 (a sliding-window cache), which the streaming sinks "
            "need; run duo_attention without a cache (use_cache=False)"
        )


def _duo_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention: the model's own attention (SDPA, or the soft-capped formula of
    :func:`probe.kernels.attend`), mixed per KV head with streaming."""
    softcap = kwargs.get("softcap")  # the streaming branch refuses dropout with it, as attend does
    full = attend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    entry = _ACTIVE.get(id(module))
    if entry is None:
        return full, None
    state, layer = entry
    if state.skip[layer]:
        return full, None
    _check_key_positions(module, key, query.shape[2], kwargs)
    stream = streaming_attention(
        query,
        key,
        value,
        sink=state.sink,
        recent=state.recent,
        scaling=scaling,
        block=state.block,
        dropout=dropout,
        softcap=softcap,
    ).transpose(1, 2)
    group = query.shape[1] // key.shape[1]
    gate = state.gates[layer].to(device=full.device, dtype=full.dtype).repeat_interleave(group)
    gate = gate.view(1, 1, -1, 1)
    return gate * full + (1 - gate) * stream, None


def _check_gates(model: LoadedModel, gates: object) -> torch.Tensor:
    want = (model.n_layers, model.n_kv_heads)
    if not isinstance(gates, torch.Tensor) or not gates.is_floating_point():
        got = f"{gates.dtype} tensor" if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ConfigError(
            f"gates must be a floating-point tensor [n_layers, n_kv_heads] = {list(want)}, got {got}; "
            f"e.g. torch.ones({want[0]}, {want[1]})"
        )
    if tuple(gates.shape) != want:
        raise ConfigError(
            f"gates have shape {list(gates.shape)} but {model.name} needs [n_layers, n_kv_heads] = {list(want)} "
            f"(one gate per KV head, shared by its {model.group_size} query heads)"
        )
    g = gates.detach()
    if bool(torch.isnan(g).any()) or float(g.min()) < 0 or float(g.max()) > 1:
        raise ConfigError(
            f"gates must lie in [0, 1] (1 = full attention, 0 = streaming), got min {float(g.min()):.4g} "
            f"and max {float(g.max()):.4g}; clamp them with gates.clamp(0, 1)"
        )
    return gates


def check_causal_model(model: LoadedModel, who: str) -> list[torch.nn.Module]:
    """The attention modules of ``model`` if ``who`` (a function's name, for the message) can run on
    it: a causal language model with a native module whose attention goes through transformers'
    attention interface (soft-capped logits are reproduced)."""
    if model.kind != "language" or model.native_model is None:
        raise ConfigError(
            f"{model.name} is a {model.kind} model without a native causal language model; {who} "
            "needs a language model loaded with probe.load_model"
        )
    modules = attention_modules(model)
    if any(getattr(m, "is_causal", True) is False for m in modules):
        raise ConfigError(f"{model.name} has bidirectional attention layers; {who} needs causal ones")
    check_replaceable(
        model,
        who,
        "use a model of a family whose duo_attention passes in docs/support.md",
        softcap=True,
    )
    return modules


def _check_model(model: LoadedModel) -> list[torch.nn.Module]:
    modules = check_causal_model(model, "duo_attention")
    busy = [m for m in modules if id(m) in _ACTIVE]
    if busy:
        raise ConfigError(
            f"duo_attention is already active on {model.name}; leave that block before entering another"
        )
    return modules


@contextmanager
def duo_attention(
    model: LoadedModel, gates: torch.Tensor, *, sink: int, recent: int, block: int = DEFAULT_BLOCK
) -> Iterator[torch.nn.Module]:
    """Yield the native model whose KV heads output ``gate * full + (1 - gate) * streaming``.

    ``gates`` ``[n_layers, n_kv_heads]`` in [0, 1] (it may require grad; it is read at every forward,
    so an optimiser may update it inside the block). The full branch is the layer's own SDPA
    attention (causal; on a sliding-window layer its window); the streaming branch sees the first
    ``sink`` and the last ``recent`` keys (:func:`streaming_attention`). A KV head's gate applies to
    all its query heads; soft-capped logits (Gemma 2) are capped in both branches as transformers'
    eager attention caps them. Padded batches are refused. Arguments are checked
    before anything changes; the model's attention implementation is restored on exit.
    """
    sink, recent, block = _check_window(sink, recent, block, min_sink=1)
    gates = _check_gates(model, gates)
    modules = _check_model(model)
    register_attention(DUO_IMPL, _duo_attention_forward)
    state = _DuoState(model, gates, sink, recent, block)
    native = model.native_model
    assert native is not None
    handle = native.register_forward_pre_hook(
        lambda _m, args, kwargs: state.before_forward(args, kwargs), with_kwargs=True
    )
    try:
        for layer, module in enumerate(modules):
            _ACTIVE[id(module)] = (state, layer)
        with native_attention(model, DUO_IMPL) as run:
            yield run
    finally:
        handle.remove()
        for module in modules:
            _ACTIVE.pop(id(module), None)
