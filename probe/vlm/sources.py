"""The vision-language model sources and ``tiny-llava``, registered with probe.sources and probe.tiny.

Importing :mod:`probe.vlm` registers them (see docs/models.md, model sources).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from probe import devicemap
from probe.assemblies import ASSEMBLIES
from probe.checksums import state_sha256 as _state_sha256
from probe.loading import placement
from probe.model import LoadedModel
from probe.sources import ASSEMBLY, DIRECTORY, TINY, ModelRequest, ModelSource, register
from probe.tiny import TINY_BUILDERS, TinyBuilder, build_tiny_clip_vision, build_tiny_llama
from probe.tiny import register as register_tiny
from probe.vlm.assembly import KIND, assemble, is_llava_config
from probe.vlm.load import load_assembly, load_llava_dir
from probe.vlm.wrap import wrap_vlm


def build_tiny_llava(seed: int = 0, words: Sequence[str] = ()) -> tuple[torch.nn.Module, Any]:
    """A LLaVA of the tiny CLIP tower (layer -2, CLS dropped: 16 image tokens) and the tiny Llama."""
    tower, _ = build_tiny_clip_vision(seed)
    language, tok = build_tiny_llama(seed, words)
    return assemble(tower, language, tok, seed=seed)


register_tiny(
    TinyBuilder(
        "tiny-llava",
        "vision-language",
        "llava",
        "random LLaVA: tiny-clip-vision (layer -2, 16 image tokens) -> 2-layer MLP projector -> tiny-llama",
        build_tiny_llava,
    )
)


def _is_tiny(request: ModelRequest) -> bool:
    builder = TINY_BUILDERS.get(request.name)
    return builder is not None and builder.kind == KIND


def _load_tiny(request: ModelRequest) -> LoadedModel:
    model, tokenizer = TINY_BUILDERS[request.name].build(request.seed, request.tiny_words)
    return wrap_vlm(
        request.name,
        "tiny",
        model,
        tokenizer,
        device=request.device,
        dtype=request.dtype,
        bos=request.bos,
        weight_sha256=_state_sha256(model),
        path=None,
        licence="n/a (random weights)",
        device_map=request.device_map,
    )


def _load_assembly(request: ModelRequest) -> LoadedModel:
    return load_assembly(
        request.name,
        device=request.device,
        dtype=request.dtype,
        bos=request.bos,
        fetch_if_missing=request.fetch_if_missing,
        device_map=request.device_map,
    )


def _is_llava_dir(request: ModelRequest) -> bool:
    return request.path.is_dir() and is_llava_config(request.config)


def _load_llava_dir(request: ModelRequest) -> LoadedModel:
    from transformers import LlavaForConditionalGeneration

    where = placement(request.path, request, LlavaForConditionalGeneration)
    with devicemap.removed_on_error(where.get("offload_folder")):
        model = load_llava_dir(
            request.path, device=request.device, dtype=request.dtype, bos=request.bos, placement=where
        )
    devicemap.remove_with(model.hf_model, where.get("offload_folder"))
    return model


register(
    ModelSource(
        "tiny-vision-language",
        TINY + 20,
        "a tiny random LLaVA built in memory",
        _is_tiny,
        _load_tiny,
        device_maps=True,
    )
)
register(
    ModelSource(
        "assembly",
        ASSEMBLY,
        "a vision-language model assembled from two catalogue models and a projector trained here",
        lambda request: request.name in ASSEMBLIES,
        _load_assembly,
        device_maps=True,
    )
)
register(
    ModelSource(
        "llava-directory",
        DIRECTORY + 10,
        "a local LLaVA checkpoint directory (model_type llava)",
        _is_llava_dir,
        _load_llava_dir,
        device_maps=True,
    )
)
