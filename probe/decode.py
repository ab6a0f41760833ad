"""Greedy decoding that records, at every step, where each head's attention row peaks.

The prefill runs the model's fast kernel (SDPA, or Gemma 2's soft-capped attention in blocks of
query rows) and keeps the KV cache; every decode step runs a registered attention function that
computes the layer's output with the same kernel and, beside it, one
score row ``q · K^T`` per head, whose argmax is the argmax of the attention row (no softmax and
no ``[T, T]`` pattern needed). Positions are absolute, also under a sliding-window cache.
``uniform_heads`` makes heads attend uniformly while decoding (the retrieval-head masking
experiment).

See docs/capture.md (greedy decoding with per-step attention argmaxes).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from probe import rope
from probe.errors import CaptureError, ConfigError
from probe.heads import by_layer
from probe.kernels import attend, attention_modules, check_replaceable, native_attention, register_attention
from probe.memory import check_decode_fits
from probe.model import LoadedModel
from probe.types import Head

DECODE_IMPL = "headlab_decode"


@dataclass
class DecodeResult:
    """What one greedy decode produced.

    ``argmax[s, l, h]`` is the absolute prompt-or-generated position of the key where head
    ``(l, h)``'s attention row peaks at step ``s``; step 0's query is the last prompt token and its
    output is ``tokens[0]``. ``max_weight[s, l, h]`` is that row's largest attention weight.
    """

    prompt_ids: list[int]
    tokens: list[int]
    argmax: np.ndarray  # [steps, n_layers, n_heads] int64 (-1 where not recorded)
    max_weight: np.ndarray  # [steps, n_layers, n_heads] float32
    prefill_seconds: float
    decode_seconds: float
    stopped_on: str  # "eos" | "max_new_tokens"
    logits: np.ndarray | None = None  # [steps, vocab] float32, with keep_logits=True


class _DecodeState:
    active: _DecodeState | None = None

    def __init__(
        self, native: torch.nn.Module, layer_of: dict[int, int], group: int, uniform: dict[int, list[int]]
    ) -> None:
        self.native = native
        self.layer_of = layer_of
        self.group = group
        self.uniform = uniform
        self.decoding = False  # True during decode steps (the prefill is never touched)
        self.last_row = False  # True during a whole-prompt prefill: its last query row is step 0's
        self.record = True  # form the score rows (argmax) during decode steps
        self.position = 0  # absolute position of the current (single) query
        self.argmax: dict[int, torch.Tensor] = {}  # layer -> key index of the row's peak
        self.first: dict[int, int] = {}  # layer -> absolute position of its key index 0
        self.max_weight: dict[int, torch.Tensor] = {}


def _visible(attention_mask: torch.Tensor | None, n_keys: int, device: torch.device) -> torch.Tensor | None:
    """[batch, n_keys] bool of the keys the single query may see, or None when all are visible."""
    if attention_mask is None:
        return None
    m = attention_mask[:, 0, -1, -n_keys:]  # [batch, Tk]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def _decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    out = attend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    state = _DecodeState.active
    if state is None or not (state.decoding or state.last_row) or id(module) not in state.layer_of:
        return out, None
    layer = state.layer_of[id(module)]
    heads = state.uniform.get(layer)
    if not state.record and not heads:
        return out, None
    if state.decoding and query.shape[2] != 1:
        raise CaptureError(f"decode scoring expects one query per step, got {query.shape[2]}")
    n_keys = key.shape[2]
    visible = _visible(attention_mask, n_keys, query.device)
    if state.record:
        b, h, _, d = query.shape
        kvh = key.shape[1]
        scale = scaling if scaling is not None else d**-0.5
        # scale · [b·kvh, group, d] @ [b·kvh, d, Tk] -> [b, h, Tk] in one kernel: O(h × T), no
        # repeat_kv copy (few launches per layer: a decode step of a small model is launch-bound)
        q = query[:, :, -1].float().reshape(b * kvh, h // kvh, d)
        k = key.float().reshape(b * kvh, n_keys, d).transpose(1, 2)
        scores = torch.baddbmm(q.new_empty(()), q, k, beta=0.0, alpha=scale).reshape(b, h, n_keys)
        if (cap := kwargs.get("softcap")) is not None:  # monotone: the argmax stays, the weights change
            scores = torch.tanh(scores / cap) * cap
        if visible is not None:
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        # the cache may hold only the last n_keys positions: key index i is position first + i
        state.first[layer] = state.position + 1 - n_keys
        state.argmax[layer] = scores.argmax(dim=-1)  # [b, h]
        state.max_weight[layer] = torch.softmax(scores, dim=-1).amax(dim=-1)
    if heads:
        idx = torch.tensor(heads, device=value.device)
        v = value[:, idx // state.group].float()  # [b, n, Tk, d]
        if visible is None:
            mean = v.mean(dim=2)
        else:
            w = visible[:, None, :, None].to(v.dtype)
            mean = (v * w).sum(dim=2) / w.sum(dim=2).clamp_min(1.0)
        out = out.clone()
        out[:, -1, idx] = mean.to(out.dtype)  # out is [b, q, h, d]; the step's query is the last
    return out, None


def _register() -> None:
    register_attention(DECODE_IMPL, _decode_attention)


@contextmanager
def decode_attention(model: LoadedModel, uniform_heads: Collection[Head] = ()) -> Iterator[_DecodeState]:
    """Inside the block, the native model runs SDPA and records decode-step argmaxes."""
    _register()
    layer_of = {id(m): i for i, m in enumerate(attention_modules(model))}
    if _DecodeState.active is not None:
        raise CaptureError(
            "a decode capture is already running in this process; decode captures do not nest: "
            "finish the first greedy_decode before starting another (e.g. from a callback)"
        )
    uniform = {layer: sorted(heads) for layer, heads in by_layer(model, uniform_heads).items()}
    try:
        with native_attention(model, DECODE_IMPL) as native:
            state = _DecodeState(native, layer_of, model.group_size, uniform)
            _DecodeState.active = state
            yield state
    finally:
        _DecodeState.active = None


def _cache_arg(native: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    params = inspect.signature(native.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def stop_token_ids(tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the tokenizer's EOS plus chat end-of-turn tokens it knows."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for name in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        if name in vocab:
            ids.add(int(vocab[name]))
    return ids


@dataclass
class Prefill:
    """The KV cache after a prompt's prefill (all tokens but the last), reusable across decodes.

    Decoding appends to a cache, so :func:`greedy_decode` works on a copy whenever ``keep`` is set:
    the masking experiment decodes one prefill under several head sets.
    """

    prompt_ids: list[int]
    cache: Any
    seconds: float

    def copy(self) -> Any:
        import copy

        return copy.deepcopy(self.cache)


@torch.inference_mode()
def prefill(model: LoadedModel, prompt_ids: Sequence[int], max_new_tokens: int = 0) -> Prefill:
    """Run the fast kernel over ``prompt_ids[:-1]`` (already with BOS if any) and keep the KV cache."""
    ids = [int(t) for t in prompt_ids]
    if len(ids) < 2:
        raise ConfigError("the prompt needs at least two tokens (a prefill and a first decode step)")
    model.check_context(len(ids) + max_new_tokens)
    check_decode_fits(model, prompt_len=len(ids), max_new_tokens=max_new_tokens)
    # The prefill records nothing: it runs the fast kernel that computes the model's attention right.
    with native_attention(model) as native:
        t0 = time.perf_counter()
        out = native(
            input_ids=torch.tensor([ids[:-1]], device=model.device), use_cache=True, logits_to_keep=1
        )
        _sync(model)
        seconds = time.perf_counter() - t0
    return Prefill(ids, _cache_of(out), seconds)


@torch.inference_mode()
def check_decodable(
    model: LoadedModel, instead: str = "use model.generate for tokens and an eager capture for patterns"
) -> None:
    """Refuse, before any step runs, a model whose decode steps the scoring function cannot see;
    ``instead`` ends the one-line message (what the caller should do)."""
    check_replaceable(model, "decode scoring", instead, softcap=True)


def greedy_decode(
    model: LoadedModel,
    prompt_ids: Sequence[int] | Prefill,
    max_new_tokens: int,
    *,
    uniform_heads: Collection[Head] = (),
    stop_ids: Collection[int] | None = None,
    record: bool = True,
    keep: bool = False,
    keep_logits: bool = False,
) -> DecodeResult:
    """Greedy-decode up to ``max_new_tokens`` after a prompt (token ids with BOS if any, or a
    :class:`Prefill` of one; with ``keep=True`` the prefill's cache is copied and stays reusable).

    The prefill uses the fast kernel and records nothing but step 0's query row (given ids, the whole
    prompt is prefilled and its last row is step 0; given a :class:`Prefill`, step 0 decodes the last
    prompt token); each step records every head's argmax key position (when ``record``) and applies
    ``uniform_heads``.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}; give at least 1")
    check_decodable(model)
    whole = not isinstance(prompt_ids, Prefill)  # ids: one prefill of the whole prompt, here
    if isinstance(prompt_ids, Prefill):
        ids = prompt_ids.prompt_ids
        cache: Any = prompt_ids.copy() if keep else prompt_ids.cache
        prefill_seconds = prompt_ids.seconds
    else:
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ConfigError("the prompt is empty; give at least one token")
        cache, prefill_seconds = None, 0.0
    model.check_context(len(ids) + max_new_tokens)
    if whole:  # refused before the prefill when the KV cache and the prefill would not fit
        check_decode_fits(model, prompt_len=len(ids), max_new_tokens=max_new_tokens)
    stops = stop_token_ids(model.tokenizer) if stop_ids is None else {int(t) for t in stop_ids}
    device = model.device
    tokens: list[int] = []
    step_argmax: list[torch.Tensor] = []  # [n_layers, n_heads] per step, kept on the device
    step_first: list[list[int]] = []  # per step and layer: the position of key index 0
    step_weight: list[torch.Tensor] = []
    stopped = "max_new_tokens"
    step_logits: list[np.ndarray] = []
    with decode_attention(model, uniform_heads) as state:
        native = state.native
        cache_arg = _cache_arg(native)
        state.record = record

        def take(step: int, out: Any) -> bool:
            """Keep step ``step``'s token and rows; True when it is a stop token."""
            nxt = int(out.logits[0, -1].argmax())
            if keep_logits:
                step_logits.append(out.logits[0, -1].float().cpu().numpy())
            if record:
                if len(state.argmax) != model.n_layers:
                    missing = sorted(set(range(model.n_layers)) - set(state.argmax))
                    raise CaptureError(
                        f"decode step {step}: layers {missing} produced no attention row; "
                        "their attention did not go through the registered decode function; load the model with "
                        "probe.load_model so that its attention modules are recognised"
                    )
                # each layer's row was scored on its own device; the step's rows are kept on the input's
                step_argmax.append(
                    torch.stack([state.argmax[i][0].to(device) for i in range(model.n_layers)])
                )
                step_first.append([state.first[i] for i in range(model.n_layers)])
                step_weight.append(
                    torch.stack([state.max_weight[i][0].to(device) for i in range(model.n_layers)])
                )
            tokens.append(nxt)
            return nxt in stops

        first_step = 0
        if whole:  # one prefill of the whole prompt, as generate does; its last query row is step 0
            state.last_row = True
            state.position = len(ids) - 1
            t0 = time.perf_counter()
            out = native(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
            state.last_row = False
            cache = _cache_of(out)
            first_step = 1
            if take(0, out):
                stopped = "eos"
            _sync(model)
            prefill_seconds = time.perf_counter() - t0
        state.decoding = True
        switch = rope.switch_length(native)
        t1 = time.perf_counter()
        for step in range(first_step, max_new_tokens):
            if stopped == "eos":  # step 0 of a whole-prompt prefill was a stop token
                break
            state.position = len(ids) - 1 + step
            state.argmax.clear()
            state.max_weight.clear()
            current = tokens[-1] if step > 0 else ids[-1]
            if rope.needs_recompute(switch, cached=state.position, total=state.position + 1):
                out = _recompute_step(native, state, torch.tensor([ids + tokens], device=device))
            else:
                out = native(
                    input_ids=torch.tensor([[current]], device=device),
                    use_cache=True,
                    position_ids=torch.tensor([[state.position]], device=device),
                    **{cache_arg: cache},
                )
            cache = _cache_of(out)
            if take(step, out):
                stopped = "eos"
                break
        _sync(model)
        t2 = time.perf_counter()
    n = len(tokens)
    shape = (n, model.n_layers, model.n_heads)
    if record:
        argmax = torch.stack(step_argmax).cpu().numpy().astype(np.int64)
        argmax += np.asarray(step_first, dtype=np.int64)[:, :, None]
        max_weight = torch.stack(step_weight).float().cpu().numpy()
    else:
        argmax, max_weight = np.full(shape, -1, dtype=np.int64), np.zeros(shape, dtype=np.float32)
    logits = np.stack(step_logits) if keep_logits else None
    return DecodeResult(ids, tokens, argmax, max_weight, prefill_seconds, t2 - t1, stopped, logits)


def _recompute_step(native: torch.nn.Module, state: _DecodeState, seq: torch.Tensor) -> Any:
    """A decode step where a LongRoPE model crosses to its long factors: the whole sequence ``seq``
    ``[1, T]`` again, as ``generate`` does, its last row scored as the step's (its cache replaces
    the old one)."""
    state.decoding, state.last_row = False, True
    try:
        return native(input_ids=seq, use_cache=True, logits_to_keep=1)
    finally:
        state.decoding, state.last_row = True, False


def _sync(model: LoadedModel) -> None:
    """Wait for the model's GPU work before reading a clock: on every GPU it uses (a split model's
    layers run on several), and on no other (synchronising a GPU starts a CUDA context there)."""
    for device in dict.fromkeys([model.device, *model.layer_devices()]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
