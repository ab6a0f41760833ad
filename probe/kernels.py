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


def fast_implementation(model: NativeModel) -> str:
    """The fastest built-in attention implementation that computes this model's attention right.

    ``sdpa``, unless the model soft-caps its logits (transformers' SDPA path refuses a soft cap) or
    its class does not support SDPA (BLOOM and MPT build an ALiBi mask that only eager reads).
    """
    native = _native(model)
    if soft_caps_logits(model) or not getattr(type(native), "_supports_sdpa", False):
        return "eager"
    return "sdpa"


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


def check_replaceable(model: NativeModel, who: str, instead: str) -> None:
    """Refuse, before any forward, a model whose attention ``who`` (a registered attention function
    standing in for the model's own) cannot reproduce: soft-capped logits (Gemma 2), or layers that
    compute their scores inline rather than through transformers' attention interface (BLOOM's and
    MPT's ALiBi, whose bias would be lost). ``instead``: what to do, ending the one-line message."""
    if soft_caps_logits(model):
        raise ConfigError(
            f"{model.name} soft-caps its attention logits, which {who} does not reproduce; {instead}"
        )
    if not uses_attention_interface(model):
        family = getattr(model, "family", "")
        raise ConfigError(
            f"{family or model.name} computes attention inside its layers, not through transformers' "
            f"attention interface, so {who} cannot stand in for it; {instead}"
        )


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
def native_attention(model: NativeModel, implementation: str = "sdpa") -> Iterator[torch.nn.Module]:
    """Yield the native transformers model running attention ``implementation`` inside the block."""
    native = _native(model)
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
