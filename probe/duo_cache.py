"""Greedy decoding with DuoAttention's cut KV cache: streaming KV heads keep only sinks + recent keys.

:func:`duo_generate` runs the native model with a registered attention implementation that keeps
the KV cache itself, per KV head: a *retrieval* head keeps every key and value (on a
sliding-window layer, its layer's window), a *streaming* head keeps the first ``sink`` and a ring
of the last ``recent``, never more. Keys are cached after RoPE, so a cut cache keeps each key's
absolute rotation. With every KV head a retrieval head it reproduces the model's own greedy
generation; with any mask it gives the logits of :func:`probe.streaming.duo_attention` with the
mask as binary gates. :func:`kv_ratio` is the memory formula.

See docs/streaming.md (decoding with a cut cache).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from probe import rope
from probe.decode import stop_token_ids
from probe.errors import CaptureError, ConfigError
from probe.heads import check_int
from probe.kernels import attention_modules, native_attention, softcapped_attention
from probe.model import LoadedModel
from probe.streaming import check_causal_model, full_attention, streaming_attention

__all__ = ["DUO_CACHE_IMPL", "DuoCache", "DuoDecode", "duo_generate", "kv_ratio", "kv_tokens"]

DUO_CACHE_IMPL = "headlab_duo_cache"
"""The transformers attention implementation that :func:`duo_generate` registers and selects."""


def kv_ratio(r: float, sink: int, recent: int, n: int) -> float:
    """The share of a full KV cache that DuoAttention keeps at context ``n``: ``r + (1 - r)(S + R)/n``.

    ``r`` is the share of retrieval KV heads; a streaming head keeps ``min(n, S + R)`` tokens (the
    formula's ``(S + R)/n`` capped at 1). Every layer is assumed to see the whole context; for models
    with sliding-window layers use :func:`kv_tokens`.
    """
    if not 0.0 <= r <= 1.0:
        raise ConfigError(f"the retrieval share r must lie in [0, 1], got {r}")
    if check_int(n, "n") < 1:
        raise ConfigError(f"the context length n must be a positive int, got {n}")
    return r + (1.0 - r) * min(n, check_int(sink, "sink") + check_int(recent, "recent")) / n


# ------------------------------------------------------------------------------------ the cache


def _slot(position: int, sink: int, recent: int) -> int:
    """Where key ``position`` lives in a sinks + ring buffer: sinks in order, then a ring of ``recent``."""
    return position if position < sink else sink + (position - sink) % recent


def _slots(positions: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """:func:`_slot` of each position of a tensor."""
    return torch.where(positions < sink, positions, sink + (positions - sink) % recent)


def _every_key(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None, softcap: float | None
) -> torch.Tensor:
    """One decode step's attention ``[B, H, 1, d_v]`` to every kept key (their order is free)."""
    if softcap is None:
        gqa = query.shape[1] != key.shape[1]
        return F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
    return softcapped_attention(query, key, value, None, scaling, float(softcap)).transpose(1, 2)


class _Group:
    """KV heads of one layer that keep the same keys: all of them (``recent`` None), or a sinks + ring buffer.

    ``kv``/``queries`` are the KV heads and their query heads (None: every head of the layer).
    A full group's buffer holds positions ``[0, capacity)`` in order; a windowed group's holds
    ``min(sink + recent, capacity)`` slots, position ``a`` at :func:`_slot`.
    """

    def __init__(
        self, kv: list[int], n_kv: int, group_size: int, sink: int, recent: int | None, capacity: int
    ) -> None:
        self.heads = kv
        whole = len(kv) == n_kv
        self.kv = None if whole else torch.tensor(kv)
        q = [h * group_size + i for h in kv for i in range(group_size)]
        self.queries = None if whole else torch.tensor(q)
        self.sink = sink
        self.recent = recent
        self.slots = capacity if recent is None else min(sink + recent, capacity)
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def _buffers(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is None or self.value is None:
            b, n = key.shape[0], len(self.heads)
            self.key = key.new_empty(b, n, self.slots, key.shape[3])
            self.value = value.new_empty(b, n, self.slots, value.shape[3])
        return self.key, self.value

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        start: int,
        scaling: float | None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Store the new keys at ``[start, start + T)`` and return the heads' attention ``[B, n·g, T, d_v]``
        (``softcap``: soft-capped logits, as the model's eager attention caps them)."""
        if self.kv is not None and self.queries is not None:
            if self.kv.device != key.device:
                self.kv, self.queries = self.kv.to(key.device), self.queries.to(key.device)
            query = query.index_select(1, self.queries)
            key = key.index_select(1, self.kv)
            value = value.index_select(1, self.kv)
        k_buf, v_buf = self._buffers(key, value)
        t, end = key.shape[2], start + key.shape[2]
        if end > self.slots and self.recent is None:
            raise CaptureError(f"the KV cache holds {self.slots} positions; position {end - 1} does not fit")
        if self.recent is None:  # every key, in order
            k_buf[:, :, start:end] = key
            v_buf[:, :, start:end] = value
            if t == 1:
                return _every_key(query, k_buf[:, :, :end], v_buf[:, :, :end], scaling, softcap)
            return full_attention(
                query, k_buf[:, :, :end], v_buf[:, :, :end], scaling=scaling, softcap=softcap
            )
        if t == 1:  # a decode step: every kept key is visible once the new one is in
            slot = _slot(start, self.sink, self.recent)
            k_buf[:, :, slot] = key[:, :, 0]
            v_buf[:, :, slot] = value[:, :, 0]
            seen = min(end, self.slots)
            return _every_key(query, k_buf[:, :, :seen], v_buf[:, :, :seen], scaling, softcap)
        # A chunk: the kept keys in position order, then the chunk's. With the gap between the sinks
        # and the ring closed up, the window relation is unchanged (every dropped key lies before the
        # window of every query in the chunk), so streaming attention over this sequence is exact.
        sink, recent, device = self.sink, self.recent, key.device
        tail = max(sink, start - recent)
        kept = torch.cat([torch.arange(min(sink, start)), torch.arange(tail, max(tail, start))])
        index = _slots(kept, sink, recent).to(device)
        keys = torch.cat([k_buf.index_select(2, index), key], dim=2)
        values = torch.cat([v_buf.index_select(2, index), value], dim=2)
        out = streaming_attention(
            query, keys, values, sink=sink, recent=recent, scaling=scaling, softcap=softcap
        )
        new = torch.arange(start, end, device=device)
        new = new[(new < sink) | (new >= end - recent)]  # the chunk's sinks and its last `recent`
        slots, offsets = _slots(new, sink, recent), new - start
        k_buf.index_copy_(2, slots, key.index_select(2, offsets))
        v_buf.index_copy_(2, slots, value.index_select(2, offsets))
        return out

    def trim(self, n: int) -> None:
        """Drop slots past the first ``n`` positions (a decode that stopped early fills fewer)."""
        keep = min(self.slots, n)
        if self.key is not None and self.value is not None and keep < self.slots:
            self.key = self.key[:, :, :keep].clone()
            self.value = self.value[:, :, :keep].clone()
            self.slots = keep

    def kept(self) -> int:
        """Key positions the buffer holds (its actual tensor length)."""
        return 0 if self.key is None else int(self.key.shape[2])

    def nbytes(self) -> int:
        if self.key is None or self.value is None:
            return 0
        return self.key.numel() * self.key.element_size() + self.value.numel() * self.value.element_size()


class _Layer:
    """One layer's cache: its groups, and how to assemble their outputs in query-head order."""

    def __init__(self, groups: list[_Group], window: int | None) -> None:
        self.groups = groups
        self.window = window

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        start: int,
        scaling: float | None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        if len(self.groups) == 1:
            return self.groups[0].attend(query, key, value, start, scaling, softcap)
        b, h, t = query.shape[:3]
        out = query.new_empty(b, h, t, value.shape[3])
        for group in self.groups:
            part = group.attend(query, key, value, start, scaling, softcap)
            assert group.queries is not None
            out.index_copy_(1, group.queries, part.to(out.dtype))
        return out


class DuoCache:
    """The KV cache :func:`duo_generate` keeps: per layer, groups of KV heads with their buffers.

    ``position`` is the absolute position of the first query of the forward being run.
    """

    def __init__(
        self, model: LoadedModel, retrieval: torch.Tensor, sink: int, recent: int, capacity: int
    ) -> None:
        self.n_layers = model.n_layers
        self.n_kv_heads = model.n_kv_heads
        self.sink = sink
        self.recent = recent
        self.position = 0
        self.layers: list[_Layer] = []
        self.visited: set[int] = set()
        for layer in range(model.n_layers):
            window = model.layer_window(layer)
            ret = [h for h in range(model.n_kv_heads) if bool(retrieval[layer, h])]
            stream = [h for h in range(model.n_kv_heads) if not bool(retrieval[layer, h])]
            groups = []
            if ret:  # the full branch: the whole prefix, or on a sliding layer its own window
                own = (0, None) if window is None else (0, int(window))
                groups.append(_Group(ret, model.n_kv_heads, model.group_size, own[0], own[1], capacity))
            if stream:
                groups.append(_Group(stream, model.n_kv_heads, model.group_size, sink, recent, capacity))
            self.layers.append(_Layer(groups, None if window is None else int(window)))

    def kept_tokens(self) -> torch.Tensor:
        """``[n_layers, n_kv_heads]`` int64: the key positions each KV head's buffer holds."""
        kept = torch.zeros(self.n_layers, self.n_kv_heads, dtype=torch.long)
        for layer, entry in enumerate(self.layers):
            for group in entry.groups:
                kept[layer, group.heads] = group.kept()
        return kept

    def nbytes(self) -> int:
        """Bytes of every key and value tensor the cache holds."""
        return sum(group.nbytes() for entry in self.layers for group in entry.groups)

    def full_nbytes(self, n: int) -> int:
        """Bytes a full cache holds after ``n`` positions: all of them, the last ``min(n, W)`` on a
        sliding-window layer of window ``W`` (transformers' own cache keeps ``W - 1`` between steps)."""
        total = 0
        for entry in self.layers:
            tokens = n if entry.window is None else min(n, entry.window)
            for group in entry.groups:
                if group.key is not None and group.value is not None:
                    per_token = group.key.shape[3] * group.key.element_size()
                    per_token += group.value.shape[3] * group.value.element_size()
                    total += group.key.shape[0] * len(group.heads) * tokens * per_token
        return total

    def trim(self, n: int) -> None:
        for entry in self.layers:
            for group in entry.groups:
                group.trim(n)


def kv_tokens(model: LoadedModel, retrieval: torch.Tensor, sink: int, recent: int, n: int) -> tuple[int, int]:
    """(Duo, full) key positions summed over KV heads at context ``n``, layer by layer.

    A retrieval head keeps ``n`` (``min(n, W)`` on a sliding-window layer of window ``W``), a
    streaming head ``min(n, S + R)``; a full cache keeps what the retrieval head would. Their ratio
    is :func:`kv_ratio` when no layer has a window.
    """
    duo = full = 0
    for layer in range(model.n_layers):
        window = model.layer_window(layer)
        own = n if window is None else min(n, int(window))
        n_ret = int(retrieval[layer].sum())
        duo += n_ret * own + (model.n_kv_heads - n_ret) * min(n, sink + recent)
        full += model.n_kv_heads * own
    return duo, full


# ------------------------------------------------------------------------------------ attention


_ACTIVE: dict[int, tuple[DuoCache, int]] = {}
"""id(native attention module) -> (the cache of the running decode, its layer)."""


def _duo_cache_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention: store the step's keys in the cut cache and attend to what it keeps."""
    entry = _ACTIVE.get(id(module))
    if entry is None:
        raise CaptureError(
            f"attention {DUO_CACHE_IMPL} ran outside duo_generate (layer {getattr(module, 'layer_idx', '?')}); "
            "select it only through duo_generate"
        )
    cache, layer = entry
    window = kwargs.get("sliding_window")
    if window is not None and window != cache.layers[layer].window:
        raise CaptureError(
            f"layer {layer} attends with a sliding window of {window} keys, not the {cache.layers[layer].window} "
            "its config declared; this architecture is not supported by duo_generate"
        )
    cache.visited.add(layer)
    out = cache.layers[layer].attend(query, key, value, cache.position, scaling, kwargs.get("softcap"))
    return out.transpose(1, 2), None  # [B, T, H, d_v], as transformers' attention functions return


def _register() -> None:
    """Register the attention function without a mask function: transformers then builds no mask
    (the cache knows every key's position), also none of ``T × T`` for a long prefill."""
    from transformers import AttentionInterface

    AttentionInterface.register(DUO_CACHE_IMPL, _duo_cache_attention)


@contextmanager
def _active(model: LoadedModel, cache: DuoCache) -> Iterator[torch.nn.Module]:
    modules = attention_modules(model)
    if any(id(m) in _ACTIVE for m in modules):
        raise ConfigError(f"duo_generate is already running on {model.name}; decodes do not nest")
    _register()
    try:
        for layer, module in enumerate(modules):
            _ACTIVE[id(module)] = (cache, layer)
        with native_attention(model, DUO_CACHE_IMPL) as native:
            yield native
    finally:
        for module in modules:
            _ACTIVE.pop(id(module), None)


# ------------------------------------------------------------------------------------ checks


def _check_model(model: LoadedModel) -> None:
    check_causal_model(model, "duo_generate")


def _check_retrieval(model: LoadedModel, retrieval: object) -> torch.Tensor:
    want = [model.n_layers, model.n_kv_heads]
    if not isinstance(retrieval, torch.Tensor) or retrieval.dtype != torch.bool:
        got = (
            f"a {retrieval.dtype} tensor" if isinstance(retrieval, torch.Tensor) else type(retrieval).__name__
        )
        raise ConfigError(
            f"retrieval must be a bool tensor [n_layers, n_kv_heads] = {want} (True = retrieval head), "
            f"got {got}; e.g. gates >= 0.5"
        )
    if list(retrieval.shape) != want:
        raise ConfigError(
            f"retrieval has shape {list(retrieval.shape)} but {model.name} needs [n_layers, n_kv_heads] = {want}"
        )
    return retrieval.detach().cpu()


def _check_prompt(model: LoadedModel, prompt_ids: object, max_new_tokens: int) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] != 1:
            raise ConfigError(
                f"duo_generate decodes one sequence, got a batch of {prompt_ids.shape[0]}; "
                "call it once per sequence"
            )
        if prompt_ids.dim() not in (1, 2) or prompt_ids.is_floating_point():
            raise ConfigError(f"prompt_ids must be token ids [T] or [1, T], got {tuple(prompt_ids.shape)}")
        ids = [int(t) for t in prompt_ids.reshape(-1).tolist()]
    elif isinstance(prompt_ids, Sequence) and not isinstance(prompt_ids, str):
        if any(isinstance(t, Sequence) for t in prompt_ids):
            raise ConfigError("duo_generate decodes one sequence; give a flat list of token ids")
        ids = [check_int(t, "a token id") for t in prompt_ids]
    else:
        raise ConfigError(f"prompt_ids must be token ids (a list or tensor), got {type(prompt_ids).__name__}")
    if not ids:
        raise ConfigError("the prompt is empty; give at least one token")
    if len(ids) + max_new_tokens > model.n_ctx:
        raise ConfigError(
            f"a prompt of {len(ids)} tokens plus {max_new_tokens} new ones is longer than {model.name}'s "
            f"context of {model.n_ctx}; shorten the prompt to at most {model.n_ctx - max_new_tokens} tokens"
        )
    return ids


def _check_sizes(sink: object, recent: object, max_new_tokens: object, chunk: object) -> None:
    for value, what, hint in [
        (sink, "sink", "sink=64"),
        (recent, "recent", "recent=256"),
        (max_new_tokens, "max_new_tokens", "max_new_tokens=32"),
    ]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive int, got {value!r}; e.g. {hint}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ConfigError(f"prefill_chunk must be a positive int or None (one pass), got {chunk!r}")


# ------------------------------------------------------------------------------------ decoding


@dataclass
class DuoDecode:
    """What one :func:`duo_generate` produced and kept.

    ``cache_bytes`` are the bytes of the key and value tensors held at the end; ``full_cache_bytes``
    what a full cache (every position; on a sliding-window layer its window) holds for the same
    ``context_tokens`` positions (the prompt and every generated token but the last, which is never
    fed back). ``kept_tokens[l, h]`` is
    the positions KV head ``h`` of layer ``l`` keeps. ``peak_bytes`` is the rise of
    ``torch.cuda.max_memory_allocated`` over the call above what was allocated at its start,
    ``decode_peak_bytes`` the same over the decode steps alone (the kept cache and one step's work);
    both None off CUDA.
    """

    tokens: list[int]
    text: str
    cache_bytes: int
    full_cache_bytes: int
    peak_bytes: int | None
    decode_peak_bytes: int | None
    prefill_seconds: float
    decode_seconds_per_token: float  # nan when no decode step ran (max_new_tokens=1 or a stop at once)
    context_tokens: int
    kept_tokens: torch.Tensor  # [n_layers, n_kv_heads] int64
    stopped_on: str  # "eos" | "max_new_tokens"
    logits: torch.Tensor | None = None  # [steps, vocab] float32, with keep_logits=True
    cache: DuoCache | None = None  # with keep_cache=True

    @property
    def cache_ratio(self) -> float:
        """``cache_bytes / full_cache_bytes``: :func:`kv_ratio` (or :func:`kv_tokens`' ratio) measured."""
        return self.cache_bytes / self.full_cache_bytes


class _Peak:
    """The rise of CUDA's allocated-memory high-water mark over a block (None off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.base = 0
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def read(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) - self.base if self.cuda else None

    def restart(self) -> int | None:
        """The rise so far; then the high-water mark starts again from what is allocated now."""
        got = self.read()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        return got


@torch.inference_mode()
def duo_generate(
    model: LoadedModel,
    prompt_ids: Sequence[int] | torch.Tensor,
    retrieval: torch.Tensor,
    *,
    sink: int,
    recent: int,
    max_new_tokens: int,
    prefill_chunk: int | None = None,
    stop_ids: Collection[int] | None = None,
    keep_logits: bool = False,
    keep_cache: bool = False,
) -> DuoDecode:
    """Greedy-decode up to ``max_new_tokens`` after ``prompt_ids`` with a cut KV cache.

    ``retrieval`` ``[n_layers, n_kv_heads]`` bool: True keeps the KV head's every key (on a
    sliding-window layer its window), False keeps the first ``sink`` and the last ``recent``.
    ``prompt_ids`` are token ids with BOS if any (a list, ``[T]`` or ``[1, T]``). The prompt is
    prefilled in chunks of ``prefill_chunk`` tokens (None: one pass); decoding stops after a token
    of ``stop_ids`` (default: the tokenizer's end-of-sequence tokens; ``()`` never stops).
    """
    _check_sizes(sink, recent, max_new_tokens, prefill_chunk)
    _check_model(model)
    mask = _check_retrieval(model, retrieval)
    ids = _check_prompt(model, prompt_ids, max_new_tokens)
    rope.check_consistent(
        model.native_model,
        [len(ids)],
        max_new_tokens,
        "duo_generate",
        recomputes=False,
        prefill_chunk=prefill_chunk,
    )
    stops = stop_token_ids(model.tokenizer) if stop_ids is None else {int(t) for t in stop_ids}
    cache = DuoCache(model, mask, sink, recent, capacity=len(ids) + max_new_tokens - 1)
    device = model.device
    tokens: list[int] = []
    kept_logits: list[torch.Tensor] = []
    peak = _Peak(device)
    with _active(model, cache) as native:

        def forward(chunk: list[int], start: int) -> bool:
            """Run ``chunk`` at positions ``start…``; take its last row's token; True on a stop token."""
            cache.position = start
            cache.visited.clear()
            out = native(
                input_ids=torch.tensor([chunk], device=device),
                position_ids=torch.arange(start, start + len(chunk), device=device)[None],
                use_cache=False,
                logits_to_keep=1,
            )
            if len(cache.visited) != model.n_layers:
                missing = sorted(set(range(model.n_layers)) - cache.visited)
                raise CaptureError(
                    f"layers {missing} of {model.name} did not attend through {DUO_CACHE_IMPL}; this "
                    "architecture's attention does not go through transformers' attention interface"
                )
            row = out.logits[0, -1]
            if keep_logits:
                kept_logits.append(row.float().cpu())
            tokens.append(int(row.argmax()))
            return tokens[-1] in stops

        t0 = time.perf_counter()
        starts = list(range(0, len(ids), prefill_chunk or len(ids)))
        for start, end in itertools.pairwise(starts):
            forward(ids[start:end], start)
            tokens.pop()  # only the prompt's last row makes a token
            if keep_logits:
                kept_logits.pop()
        stopped = forward(ids[starts[-1] :], starts[-1])
        peak.sync()
        t1 = time.perf_counter()
        prefill_peak = peak.restart()
        while not stopped and len(tokens) < max_new_tokens:
            stopped = forward([tokens[-1]], len(ids) + len(tokens) - 1)
        peak.sync()
        t2 = time.perf_counter()
    decode_peak = peak.read()
    n = len(ids) + len(tokens) - 1
    cache.trim(n)
    steps = len(tokens) - 1
    return DuoDecode(
        tokens=tokens,
        text=model.tokenizer.decode(tokens),
        cache_bytes=cache.nbytes(),
        full_cache_bytes=cache.full_nbytes(n),
        peak_bytes=None if prefill_peak is None else max(prefill_peak, decode_peak or 0),
        decode_peak_bytes=decode_peak,
        prefill_seconds=t1 - t0,
        decode_seconds_per_token=(t2 - t1) / steps if steps else float("nan"),
        context_tokens=n,
        kept_tokens=cache.kept_tokens(),
        stopped_on="eos" if stopped else "max_new_tokens",
        logits=torch.stack(kept_logits) if keep_logits else None,
        cache=cache if keep_cache else None,
    )
