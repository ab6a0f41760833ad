"""Capture: run a model over many sequences and reduce its attention inside the hooks.

``mode="eager"``: the TransformerBridge computes every pattern and a hook hands it to the
reducers (needed when interventions edit patterns). ``mode="recompute"``: the model keeps its
fused kernel (SDPA) and a registered attention function recomputes the softmax rows from the
post-RoPE queries and keys, ``query_block`` rows at a time. Both give the same numbers; a layer
that produced no rows raises :class:`~probe.errors.CaptureError` naming it.

See docs/capture.md.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from probe.errors import CaptureError, ConfigError
from probe.hooks import HookSet, attn_hook
from probe.kernels import (
    attend,
    attend_with_lse,
    attention_modules,
    check_replaceable,
    native_attention,
    register_attention,
)
from probe.memory import plan_batch_size
from probe.model import Batch, LoadedModel
from probe.moments import MomentStack, attention_moments, pattern_moments, triton_available
from probe.reducers import BatchInfo, PatternReducer

Mode = Literal["eager", "recompute"]
RECOMPUTE_IMPL = "headlab_recompute"


@dataclass
class CaptureStats:
    mode: Mode
    n_samples: int
    n_batches: int
    seconds: float
    rows_seen: dict[int, int] = field(default_factory=dict)  # layer -> query rows reduced
    batch_size: int = 0  # the batch size used (the memory plan may lower the one asked for)


def batches(model: LoadedModel, rows: Sequence[Sequence[int]], batch_size: int) -> Iterator[Batch]:
    for i in range(0, len(rows), batch_size):
        yield model.batch_from_ids([list(r) for r in rows[i : i + batch_size]])


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled, leave=False)


def check_recomputable(model: LoadedModel) -> None:
    """Refuse, before any forward, a model whose attention a recompute capture cannot rebuild."""
    if model.native_model is not None:  # without one, _run_recompute names what is missing
        check_replaceable(model, "recompute mode", "use mode='eager'", softcap=True)


@torch.no_grad()
def capture(
    model: LoadedModel,
    rows: Sequence[Sequence[int]],
    reducers: Sequence[PatternReducer],
    *,
    mode: Mode = "eager",
    batch_size: int = 8,
    query_block: int = 512,
    progress: bool = True,
    desc: str = "capture",
    plan_memory: bool = True,
) -> CaptureStats:
    """Run ``model`` over token ``rows`` (raw ids, BOS policy applied here) and feed ``reducers``.

    Sequences are processed ``batch_size`` at a time with left padding; real lengths are passed to
    the reducers, and position ids follow the real tokens, so a sequence alone and the same
    sequence padded in a batch give the same numbers.
    """
    if mode not in ("eager", "recompute"):
        raise ConfigError(f"unknown capture mode {mode!r}; choose eager or recompute")
    if batch_size < 1 or query_block < 1:
        raise ConfigError("batch_size and query_block must be >= 1")
    if not rows:
        raise ConfigError("no sequences to capture; give at least one")
    if mode == "recompute":
        check_recomputable(model)
    longest = max(len(r) for r in rows) + int(model.bos.prepend)
    model.check_context(longest)
    batch_size = min(batch_size, len(rows))
    if plan_memory:  # raises MemoryBudgetError saying what to change when even one sequence does not fit
        planned = plan_batch_size(
            model,
            n_sequences=len(rows),
            seq_len=longest,
            reducers=reducers,
            mode=mode,
            query_block=query_block,
            requested_batch=batch_size,
        )
        if planned < batch_size:
            warnings.warn(
                f"{desc}: batch size {batch_size} lowered to {planned} to fit the available memory",
                stacklevel=2,
            )
            batch_size = planned
    t0 = time.perf_counter()
    stats = CaptureStats(mode=mode, n_samples=len(rows), n_batches=0, seconds=0.0, batch_size=batch_size)
    seen: dict[int, int] = dict.fromkeys(range(model.n_layers), 0)
    bar = _progress(len(rows), desc, progress)
    try:
        for batch in batches(model, rows, batch_size):
            info = BatchInfo(
                lengths=batch.lengths,
                pad_offsets=batch.pad_offsets,
                T=int(batch.input_ids.shape[1]),
                n_layers=model.n_layers,
                n_heads=model.n_heads,
            )
            for r in reducers:
                r.begin_batch(info)
            before = dict(seen)
            position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
            if mode == "eager":
                _run_eager(model, batch, position_ids, reducers, seen)
            else:
                _run_recompute(model, batch, position_ids, reducers, seen, query_block)
            silent = [layer for layer in range(model.n_layers) if seen[layer] == before[layer]]
            if silent:
                raise CaptureError(
                    f"no attention rows were produced for layers {silent} of {model.name} in {mode} mode: "
                    "the attention kernel returned no weights or the hook was not reached; "
                    "use mode='eager' or check the model's attention implementation"
                )
            for r in reducers:
                r.end_batch()
            stats.n_batches += 1
            bar.update(int(batch.input_ids.shape[0]))
    finally:
        bar.close()
        for r in reducers:
            r.info = None
    stats.rows_seen = seen
    stats.seconds = time.perf_counter() - t0
    return stats


def _diag_offsets(reducers: Sequence[PatternReducer]) -> tuple[int, ...]:
    return tuple(sorted({o for r in reducers for o in r.diag_offsets}))


def _run_eager(
    model: LoadedModel,
    batch: Batch,
    position_ids: torch.Tensor,
    reducers: Sequence[PatternReducer],
    seen: dict[int, int],
) -> None:
    assert model.bridge is not None
    hook_set = HookSet(model)

    use_moments = all(r.supports_moments for r in reducers)
    offsets = _diag_offsets(reducers)
    home = batch.input_ids.device  # where the reducers keep their state

    def make(layer: int) -> Any:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            # the statistics are computed on the layer's own device (a split model's layers live on
            # several), then their O(b·H·T) moments go to the reducers' device
            if use_moments:  # one read of the pattern for every statistic
                moments = pattern_moments(pattern, pad_offsets=batch.pad_offsets, diag_offsets=offsets)
                moments = moments.to(home)
                for r in reducers:
                    r.update_moments(layer, moments)
            else:
                rows = pattern.float().to(home)
                for r in reducers:
                    r.update(layer, rows, 0)
            seen[layer] += pattern.shape[2]

        return hook

    try:
        for layer in range(model.n_layers):
            hook_set.add(attn_hook(layer, "pattern"), make(layer))
        model.bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids)
    finally:
        hook_set.remove()


# ------------------------------------------------------------------------------------------------
# recompute mode: a registered attention implementation that runs SDPA and reduces rows blockwise


class _RecomputeState:
    """What the registered attention function needs while a recompute capture runs."""

    active: _RecomputeState | None = None

    def __init__(
        self,
        layer_of: dict[int, int],
        reducers: Sequence[PatternReducer],
        seen: dict[int, int],
        query_block: int,
        group: int,
    ) -> None:
        self.layer_of = layer_of
        self.reducers = reducers
        self.seen = seen
        self.query_block = query_block
        self.group = group
        # All reducers can work from moments: no attention row is ever formed (Triton on CUDA).
        self.use_moments = all(r.supports_moments for r in reducers)
        # reducers that also read each layer's input, key and value (``reads_native``)
        self.native_readers = [r for r in reducers if getattr(r, "reads_native", False)]
        self.diag_offsets = _diag_offsets(reducers)
        self.pad_offsets: torch.Tensor | None = None
        self.padded = True  # whether the current batch holds left padding (set per batch)
        self.home = torch.device("cpu")  # the reducers' device: the batch's
        # every layer's moments of the current batch, handed to the reducers after the forward
        self.stack: MomentStack | None = None


def _rows_blocks(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    block: int,
    group: int,
    sliding_window: int | None,
    softcap: float | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (q_start, softmax rows [b, h, q, T]) in float32, ``block`` query rows at a time
    (scores soft-capped as ``cap · tanh(s / cap)`` when the layer caps them)."""
    _b, _h, T, d = query.shape
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    k = key.float()
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # query head h reads KV head h // group (as repeat_kv)
    k_t = k.transpose(-1, -2)
    key_idx = torch.arange(key.shape[2], device=query.device)
    offset = key.shape[2] - T  # > 0 only with a KV cache (decode); then query t sits at offset + t
    for q0 in range(0, T, block):
        q1 = min(T, q0 + block)
        scores = torch.matmul(query[:, :, q0:q1].float(), k_t) * scale  # [b, h, q, Tk]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            m = attention_mask[:, :, q0:q1, :]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        else:
            q_idx = torch.arange(q0, q1, device=query.device) + offset
            allowed = key_idx[None, :] <= q_idx[:, None]
            if sliding_window is not None:
                allowed &= key_idx[None, :] > q_idx[:, None] - sliding_window
            scores = scores.masked_fill(~allowed, float("-inf"))
        rows = torch.softmax(scores, dim=-1)
        yield q0, torch.nan_to_num(rows, nan=0.0)  # fully masked rows (pad queries) -> zeros


def _recompute_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    state = _RecomputeState.active
    lse = None
    fused = state is not None and id(module) in state.layer_of and state.use_moments and not state.padded
    if fused and triton_available(query):
        # the forward's own kernel hands back each row's normaliser: the moments then take one pass
        with_lse = attend_with_lse(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        if with_lse is not None:
            out, lse = with_lse
    if lse is None:
        out = attend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    softcap = kwargs.get("softcap")
    if state is not None and id(module) in state.layer_of:
        layer = state.layer_of[id(module)]
        for reader in state.native_readers:  # [b, T, n_kv, d]: the key after any q/k norm and RoPE
            reader.record(layer, "key", key.transpose(1, 2))  # type: ignore[attr-defined]
            reader.record(layer, "value", value.transpose(1, 2))  # type: ignore[attr-defined]
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        if state.use_moments:
            assert state.stack is not None
            attention_moments(
                query,
                key,
                scale=scaling,
                pad_offsets=state.pad_offsets,
                sliding_window=window,
                softcap=softcap,
                diag_offsets=state.diag_offsets,
                block=state.query_block,
                out=(state.stack, layer),
                lse=lse,
            )
            state.seen[layer] += query.shape[2]
            return out, None
        for q0, block in _rows_blocks(
            module, query, key, attention_mask, scaling, state.query_block, state.group, window, softcap
        ):
            rows = block.to(state.home)  # rows made on the layer's device, reduced where the reducers are
            for r in state.reducers:
                r.update(layer, rows, q0)
            state.seen[layer] += rows.shape[2]
    return out, None


def _register() -> None:
    register_attention(RECOMPUTE_IMPL, _recompute_attention)


@contextmanager
def recompute_attention(
    model: LoadedModel, reducers: Sequence[PatternReducer], seen: dict[int, int], query_block: int
) -> Iterator[torch.nn.Module]:
    """Inside the block, the native model runs SDPA and feeds recomputed statistics to ``reducers``."""
    _register()
    layer_of = {id(module): i for i, module in enumerate(attention_modules(model))}
    state = _RecomputeState(layer_of, reducers, seen, query_block, model.group_size)
    if _RecomputeState.active is not None:
        raise CaptureError("a recompute capture is already running in this process")
    _RecomputeState.active = state
    handles = _layer_input_hooks(model, state.native_readers)
    try:
        with native_attention(model, RECOMPUTE_IMPL) as native:
            yield native
    finally:
        _RecomputeState.active = None
        for handle in handles:
            handle.remove()


def _layer_input_hooks(model: LoadedModel, readers: Sequence[PatternReducer]) -> list[Any]:
    """Pre-hooks handing each decoder layer's input (the residual stream before the layer,
    ``[b, T, d_model]``) to ``readers`` as quantity ``"hidden"``; the decoder layer is the module
    that holds the layer's attention module."""
    if not readers:
        return []
    native = model.native_model
    assert native is not None
    names = {id(m): n for n, m in native.named_modules()}
    handles = []
    for layer, attention in enumerate(attention_modules(model)):
        parent = names[id(attention)].rpartition(".")[0]
        block = native.get_submodule(parent)

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], layer: int = layer) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            for reader in readers:
                reader.record(layer, "hidden", hidden)  # type: ignore[attr-defined]

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _run_recompute(
    model: LoadedModel,
    batch: Batch,
    position_ids: torch.Tensor,
    reducers: Sequence[PatternReducer],
    seen: dict[int, int],
    query_block: int,
) -> None:
    with recompute_attention(model, reducers, seen, query_block) as native:
        state = _RecomputeState.active
        assert state is not None
        state.pad_offsets = batch.pad_offsets.to(torch.int32)
        state.padded = bool(state.pad_offsets.any())
        state.home = batch.input_ids.device
        before = dict(seen)
        if state.use_moments:
            b, T = batch.input_ids.shape
            # each layer's moments on the device its kernels run on, gathered after the forward
            state.stack = MomentStack(
                model.n_layers,
                int(b),
                model.n_heads,
                int(T),
                state.diag_offsets,
                batch.input_ids.device,
                layer_devices=model.layer_devices(),
            )
        native(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
        if state.stack is not None and all(seen[i] > before[i] for i in range(model.n_layers)):
            # (a silent layer is reported by the caller, and its reducers are not fed half a batch)
            _hand_over(state.stack, reducers, model.n_layers)


def _hand_over(stack: MomentStack, reducers: Sequence[PatternReducer], n_layers: int) -> None:
    """Give the reducers every layer's moments: at once to those that take a stack, else layer by layer."""
    for r in reducers:
        if r.stacked_moments:
            r.update_moments(slice(None), stack.stacked())
        else:
            for layer in range(n_layers):
                r.update_moments(layer, stack.layer(layer).to(stack.device))
