"""Which attention kernel runs: the bridge's eager attention, or the model's own fast kernel.

A loaded model keeps ``native_model``: a second transformers module tree whose parameters and
buffers are the same tensors as the bridged model's. :func:`native_attention` selects its attention
implementation by name ("sdpa" by default, or one registered with :func:`register_attention`) for
the duration of a block and restores it afterwards, also after an error. This module imports
nothing from probe but its errors: it reads a model through the :class:`NativeModel` protocol.

See docs/capture.md (two module trees).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from probe.errors import CaptureError, ConfigError


class NativeModel(Protocol):
    """What the kernel switch reads of a loaded model (:class:`probe.model.LoadedModel` has it all)."""

    @property
    def name(self) -> str: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def native_model(self) -> torch.nn.Module | None: ...


def _native(model: NativeModel) -> torch.nn.Module:
    if model.native_model is None:
        raise CaptureError(f"{model.name} keeps no native transformers module; load it with probe.load_model")
    return model.native_model


_ATTENTION_MODULES: weakref.WeakKeyDictionary[torch.nn.Module, list[torch.nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def attention_modules(model: NativeModel) -> list[torch.nn.Module]:
    """The native model's attention modules, one per layer, in layer order (found once per model:
    walking the module tree costs milliseconds, and every capture and decode asks)."""
    native = _native(model)
    cached = _ATTENTION_MODULES.get(native)
    if cached is not None and len(cached) == model.n_layers:
        return list(cached)
    found = _find_attention_modules(model)
    _ATTENTION_MODULES[native] = found
    return list(found)


def _find_attention_modules(model: NativeModel) -> list[torch.nn.Module]:
    found = [
        m
        for m in _native(model).modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
    ]
    found.sort(key=lambda m: int(m.layer_idx))  # type: ignore[arg-type]
    if len(found) != model.n_layers or [int(m.layer_idx) for m in found] != list(range(model.n_layers)):  # type: ignore[arg-type]
        raise CaptureError(
            f"found {len(found)} attention modules in {model.name} for {model.n_layers} layers; "
            "this architecture's attention modules are not recognised (need a layer_idx attribute)"
        )
    return found


def soft_caps_logits(model: NativeModel) -> bool:
    """Whether the native model soft-caps its attention logits (Gemma 2), which SDPA cannot do."""
    return any(getattr(c, "attn_logit_softcapping", None) is not None for c in _configs(_native(model)))


SOFTCAP_IMPL = "headlab_softcap"


def fast_implementation(model: NativeModel) -> str:
    """The fastest attention implementation that computes this model's attention right.

    ``sdpa``; for a model that soft-caps its logits (SDPA cannot cap them), :data:`SOFTCAP_IMPL`:
    eager's formula in blocks of query rows (:func:`softcapped_attention`, registered here), which
    needs no ``[T, T]`` tensor; ``eager`` where the class does not support SDPA (BLOOM and MPT build
    an ALiBi mask that only eager reads).
    """
    native = _native(model)
    # the soft cap first: Gemma 2's classes declare no SDPA support (SDPA cannot cap), which must
    # not send them to eager's [b, h, T, T] weights when the blocked formula computes them exactly
    if soft_caps_logits(model) and uses_attention_interface(model):
        register_attention(SOFTCAP_IMPL, _attend_implementation)
        return SOFTCAP_IMPL
    if not getattr(type(native), "_supports_sdpa", False):
        return "eager"
    return "sdpa"


def _attend_implementation(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    return attend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs), None


def uses_attention_interface(model: NativeModel) -> bool:
    """Whether every attention module dispatches through transformers' attention interface, the
    only way a registered implementation (decode scoring, recompute) is reached. BLOOM's and MPT's
    ALiBi attention computes its scores inline."""
    return all(_dispatches(type(module)) for module in attention_modules(model))  # type: ignore[arg-type]


@functools.cache
def _dispatches(cls: type) -> bool:
    """Whether ``cls.forward`` reads transformers' attention interface (read once per class: it is
    asked at every duo_attention block, so at every gate-training step)."""
    import inspect

    try:
        source = inspect.getsource(cls.forward)  # type: ignore[attr-defined]
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def check_replaceable(model: NativeModel, who: str, instead: str, *, softcap: bool = False) -> None:
    """Refuse, before any forward, a model whose attention ``who`` (a registered attention function
    standing in for the model's own) cannot reproduce: layers that compute their scores inline
    rather than through transformers' attention interface (BLOOM's and MPT's ALiBi, whose bias would
    be lost), or soft-capped logits (Gemma 2) unless ``softcap`` says ``who`` computes them (through
    :func:`attend`). ``instead``: what to do, ending the one-line message."""
    if soft_caps_logits(model) and not softcap:
        raise ConfigError(
            f"{model.name} soft-caps its attention logits, which {who} does not reproduce; {instead}"
        )
    if not uses_attention_interface(model):
        family = getattr(model, "family", "")
        raise ConfigError(
            f"{family or model.name} computes attention inside its layers, not through transformers' "
            f"attention interface, so {who} cannot stand in for it; {instead}"
        )


SOFTCAP_BLOCK = 1024  # query rows per block of the soft-capped attention: [b, h, 1024, T] scores


def attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The attention output ``[b, T, h, d]`` a registered implementation hands back: SDPA's, or,
    for soft-capped logits (Gemma 2; SDPA cannot cap), transformers' eager formula computed
    :data:`SOFTCAP_BLOCK` query rows at a time, so that no ``[T, T]`` tensor is formed."""
    softcap = kwargs.get("softcap")
    if softcap is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out
    if dropout and module.training:
        raise CaptureError("the soft-capped attention runs without dropout; call model.eval() first")
    return softcapped_attention(
        query, key, value, attention_mask, scaling, float(softcap), kwargs.get("sliding_window")
    )


def attend_with_lse(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`attend`'s output, bit for bit, and the rows' log-sum-exp ``[b, h, T]`` (float32,
    natural units) that SDPA's fused CUDA kernel computes on the way, for the one case where SDPA
    runs such a kernel on its own causal mask: no mask tensor, no cap, no position bias, a causal
    layer, a whole sequence (no KV cache). None otherwise, and where SDPA would pick a kernel that
    does not hand the log-sum-exp back; the caller then runs :func:`attend`.

    The kernel is the one ``scaled_dot_product_attention`` would choose for the same call
    (``torch._fused_sdp_choice``), called through its ATen op, which returns what SDPA drops.
    """
    _b, h, T, d = query.shape
    window = kwargs.get("sliding_window")
    plain = (
        query.device.type in _LSE_DEVICES
        and attention_mask is None
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
        and T > 1
        and key.shape[2] == T
        and (window is None or window >= T)
        and not (dropout and module.training)
        and d % 8 == 0
        and d == value.shape[-1] <= 256
    )
    if not plain:
        return None
    scale = scaling if scaling is not None else d**-0.5
    gqa = h != key.shape[1]  # as transformers asks SDPA for grouped heads when no mask is given
    choice = torch._fused_sdp_choice(query, key, value, None, 0.0, True, scale=scale, enable_gqa=gqa)
    if choice not in _LSE_OPS:
        return None
    kind = (choice, query.dtype, d, gqa, query.device.type)
    if kind in _LSE_REFUSED:
        return None
    try:
        out, lse = _fused_with_lse(choice, query, key, value, scale)
        why = None if kind in _LSE_CHECKED else _lse_disagrees(query, key, out, lse, scale)
    except RuntimeError as err:  # an op that refuses what SDPA itself accepted: SDPA runs instead
        why = f"its kernel refused the call ({str(err).splitlines()[0][:200]})"
    if why is not None:
        _LSE_REFUSED.add(kind)
        warnings.warn(
            f"the log-sum-exp of SDPA's fused attention is not used: {why}; the attention "
            "statistics are computed in two passes instead (the same numbers, slower)",
            stacklevel=2,
        )
        return None
    _LSE_CHECKED.add(kind)
    return out.transpose(1, 2).contiguous(), lse


_LSE_DEVICES = ("cuda",)  # where SDPA's fused kernels (and the Triton single pass) run
_LSE_OPS = {  # the SDPA backends whose ATen op hands the log-sum-exp back
    torch.nn.attention.SDPBackend.FLASH_ATTENTION.value,
    torch.nn.attention.SDPBackend.CUDNN_ATTENTION.value,
    torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION.value,
}
# kinds of call (backend, dtype, head width, grouped, device type) checked once, or refused
_LSE_CHECKED: set[tuple[Any, ...]] = set()
_LSE_REFUSED: set[tuple[Any, ...]] = set()


def _fused_with_lse(
    choice: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output [b, h, T, d], lse [b, h, T])`` from the ATen op of SDPA's backend ``choice``."""
    backends = torch.nn.attention.SDPBackend
    aten = torch.ops.aten
    if choice == backends.FLASH_ATTENTION.value:
        out, lse = aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scale)[
            :2
        ]
    elif choice == backends.CUDNN_ATTENTION.value:
        out, lse = aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, True, False, scale=scale
        )[:2]
    else:
        out, lse = aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, 0.0, True, scale=scale
        )[:2]
    b, h, T, _d = query.shape
    # lse may come padded ([b, h, ≥T]) or with a trailing unit dimension ([b, h, T, 1])
    return out, lse.reshape(b, h, -1)[:, :, :T]


def _lse_disagrees(
    query: torch.Tensor, key: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float
) -> str | None:
    """What the single pass relies on, checked once per kind of call: the output's shape, and the
    log-sum-exp of the first and the last query row of the first head (natural units, causal)
    against the scores' own. A reason when they disagree, else None."""
    b, h, T, d = query.shape
    if tuple(out.shape) != (b, h, T, d):
        return f"its output has shape {tuple(out.shape)}, not {(b, h, T, d)}"
    scores = (query[0, 0, [0, T - 1]].float() @ key[0, 0].float().T) * scale  # [2, T]
    scores[0, 1:] = float("-inf")  # the first row sees only the first key
    want = torch.logsumexp(scores, dim=-1)
    diff = (lse[0, 0, [0, T - 1]].float() - want).abs().max().item()
    if not diff <= 1e-3 * max(1.0, want.abs().max().item()):
        return f"it differs from the scores' own by {diff:.2g} (units or mask not as expected)"
    return None


def capped_softmax(scores: torch.Tensor, softcap: float, allowed: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of scaled ``scores`` as transformers' eager attention makes them for
    soft-capped logits: ``cap · tanh(s / cap)`` in the scores' dtype, masked scores set to the
    dtype's lowest value (``allowed`` boolean, True where visible) or an additive float mask added,
    the softmax in float32, cast back to the scores' dtype."""
    s = torch.tanh(scores / softcap) * softcap
    lowest = torch.finfo(scores.dtype).min
    s = s.masked_fill(~allowed, lowest) if allowed.dtype == torch.bool else s + allowed
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(scores.dtype)


def softcapped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float,
    sliding_window: int | None = None,
    block: int = SOFTCAP_BLOCK,
) -> torch.Tensor:
    """``softmax(cap · tanh(scale · q kᵀ / cap) + mask) v`` in the query's dtype (the softmax in
    float32), as transformers' eager attention computes it, one block of query rows at a time.

    ``attention_mask`` is SDPA's (boolean, True where visible) or an additive float mask, or None
    for a causal one (then the ``sliding_window`` is applied here). Masked scores are set to the
    dtype's lowest value, as eager adds it: a fully masked (padding) query averages every value.
    """
    b, h, T, d = query.shape
    group = h // key.shape[1]
    k = key.repeat_interleave(group, dim=1) if group > 1 else key
    v = value.repeat_interleave(group, dim=1) if group > 1 else value
    k_t = k.transpose(2, 3)
    scale = scaling if scaling is not None else d**-0.5
    n_keys = key.shape[2]
    offset = n_keys - T  # > 0 only with a KV cache: query t sits at position offset + t
    key_idx = torch.arange(n_keys, device=query.device)
    out = torch.empty(b, h, T, v.shape[-1], dtype=query.dtype, device=query.device)
    for q0 in range(0, T, block):
        q1 = min(T, q0 + block)
        s = torch.matmul(query[:, :, q0:q1], k_t) * scale
        if attention_mask is not None:
            allowed = attention_mask[:, :, q0:q1, :n_keys]
        else:
            q_idx = torch.arange(q0, q1, device=query.device) + offset
            allowed = key_idx[None, :] <= q_idx[:, None]
            if sliding_window is not None:
                allowed &= key_idx[None, :] > q_idx[:, None] - sliding_window
        out[:, :, q0:q1] = torch.matmul(capped_softmax(s, softcap, allowed), v)
    return out.transpose(1, 2).contiguous()


_REGISTERED: set[str] = set()


def register_attention(name: str, fn: Any) -> None:
    """Register ``fn`` as transformers attention implementation ``name`` (once per process), with
    SDPA's mask construction, so that :func:`native_attention` can select it by name."""
    if name in _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    _REGISTERED.add(name)


def _configs(module: torch.nn.Module) -> list[Any]:
    cfg: Any = module.config
    out = [cfg]
    if getattr(cfg, "text_config", None) is not None:
        out.append(cfg.text_config)
    return out


@contextmanager
def native_attention(model: NativeModel, implementation: str | None = None) -> Iterator[torch.nn.Module]:
    """Yield the native transformers model running attention ``implementation`` inside the block
    (by default :func:`fast_implementation`: SDPA where it computes the model's attention right)."""
    native = _native(model)
    if implementation is None:
        implementation = fast_implementation(model)
    configs = _configs(native)
    modules = attention_modules(model)
    saved = [c._attn_implementation for c in configs]
    saved_modules = [getattr(getattr(m, "config", None), "_attn_implementation", None) for m in modules]
    try:
        for c in configs:
            c._attn_implementation = implementation
        for m in modules:
            if getattr(m, "config", None) is not None:
                m.config._attn_implementation = implementation  # type: ignore[union-attr]
        yield native
    finally:
        for c, impl in zip(configs, saved, strict=True):
            c._attn_implementation = impl
        for m, impl in zip(modules, saved_modules, strict=True):
            if getattr(m, "config", None) is not None:
                m.config._attn_implementation = impl  # type: ignore[union-attr]
