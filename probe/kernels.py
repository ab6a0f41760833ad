"""Which attention kernel runs: the bridge's eager attention, or the model's own fast kernel.

The TransformerBridge replaces every attention module of the transformers model with a bridge
component that always computes the full ``[T, T]`` pattern (so hooks can read and edit it). For
statistics that need no edit, :func:`native_attention` puts the model's original attention modules
back for the duration of a block and selects an attention implementation by name ("sdpa" by
default, or one registered by :mod:`probe.recompute`). The bridge is restored on exit, also after
an exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from probe.errors import CaptureError
from probe.loading import LoadedModel


def _attention_slots(
    model: LoadedModel,
) -> list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]]:
    """(parent, attribute, bridge component, original module) for every attention layer."""
    if model.bridge is None:
        raise CaptureError(f"{model.name} is not wrapped by a TransformerBridge")
    wanted = {id(model.bridge.blocks[i].attn): i for i in range(model.n_layers)}
    slots: list[Any] = [None] * model.n_layers
    for _, parent in model.hf_model.named_modules():
        for attr, child in parent.named_children():
            if id(child) in wanted:
                original = getattr(child, "original_component", None)
                if original is None:
                    raise CaptureError(
                        f"bridge attention of layer {wanted[id(child)]} keeps no original module"
                    )
                slots[wanted[id(child)]] = (parent, attr, child, original)
    missing = [i for i, s in enumerate(slots) if s is None]
    if missing:
        raise CaptureError(
            f"could not find the attention modules of layers {missing} in the transformers model"
        )
    return slots


def _configs(model: LoadedModel) -> list[Any]:
    cfg: Any = model.hf_model.config
    out = [cfg]
    if getattr(cfg, "text_config", None) is not None:
        out.append(cfg.text_config)
    return out


@contextmanager
def native_attention(model: LoadedModel, implementation: str = "sdpa") -> Iterator[None]:
    """Run ``model.hf_model`` with its own attention modules and ``implementation`` inside the block."""
    slots = _attention_slots(model)
    configs = _configs(model)
    saved_impl = [c._attn_implementation for c in configs]
    saved_module_impl = [getattr(orig.config, "_attn_implementation", None) for *_, orig in slots]
    try:
        for parent, attr, _bridge, original in slots:
            setattr(parent, attr, original)
        for c in configs:
            c._attn_implementation = implementation
        for *_, original in slots:
            if hasattr(original, "config"):
                original.config._attn_implementation = implementation  # type: ignore[union-attr]
        yield
    finally:
        for parent, attr, bridge_component, _ in slots:
            setattr(parent, attr, bridge_component)
        for c, impl in zip(configs, saved_impl, strict=True):
            c._attn_implementation = impl
        for (*_, original), impl in zip(slots, saved_module_impl, strict=True):
            if hasattr(original, "config"):
                original.config._attn_implementation = impl  # type: ignore[union-attr]
