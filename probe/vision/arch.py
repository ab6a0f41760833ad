"""Vision architectures as data: where each family keeps its blocks, attention and output projection.

A new ViT-like family is one entry in :data:`ARCHITECTURES` (see docs/models.md, adding an
architecture).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from probe.errors import HeadlabError
from probe.images import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageSpec


@dataclass(frozen=True)
class VisionArch:
    """Where a family keeps its parts; module paths relative to the transformers base model."""

    layers: str  # the ModuleList of blocks
    attention: str  # per block: returns (output, weights)
    out_proj: str  # per block: input [batch, T, heads × d_head]
    final_norm: str  # after the last block (CLIP: applied to the CLS token only)
    prefix_names: tuple[str, ...]
    default_image: Callable[[int, int], ImageSpec]  # (image_size, patch_size) -> preprocessing


def _clip_image(size: int, patch: int) -> ImageSpec:
    return ImageSpec(size, patch, 1, CLIP_MEAN, CLIP_STD, shortest_edge=size, crop=(size, size))


def _vit_image(size: int, patch: int) -> ImageSpec:
    return ImageSpec(
        size, patch, 1, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize_to=(size, size), resample="bilinear"
    )


def _deit_image(size: int, patch: int) -> ImageSpec:
    edge = round(size * 256 / 224)
    return ImageSpec(
        size,
        patch,
        2,
        IMAGENET_MEAN,
        IMAGENET_STD,
        shortest_edge=edge,
        crop=(size, size),
        prefix_names=("cls", "distillation"),
    )


ARCHITECTURES: dict[str, VisionArch] = {
    "clip": VisionArch(
        "encoder.layers", "self_attn", "self_attn.out_proj", "post_layernorm", ("cls",), _clip_image
    ),
    "vit": VisionArch("layers", "attention", "attention.o_proj", "layernorm", ("cls",), _vit_image),
    "deit": VisionArch(
        "layers", "attention", "attention.o_proj", "layernorm", ("cls", "distillation"), _deit_image
    ),
}
"""model family -> module layout. A new ViT-like family is one entry here."""
MODEL_TYPES = {"clip": "clip", "clip_vision_model": "clip", "vit": "vit", "deit": "deit"}
"""config.json ``model_type`` -> family."""
_OTHER_VISION_TYPES = {
    "swin",
    "swinv2",
    "dinov2",
    "dinov2_with_registers",
    "beit",
    "data2vec-vision",
    "siglip",
    "siglip_vision_model",
    "convnext",
    "convnextv2",
    "mobilevit",
    "levit",
    "pvt",
    "vit_mae",
    "vit_msn",
    "vit_hybrid",
    "dinat",
    "efficientformer",
    "hiera",
    "ijepa",
}


def vision_family(config_json: Mapping[str, Any]) -> str | None:
    """The family of a checkpoint's ``config.json``, None when it is no vision model.

    Raises for vision models probe does not support (so the user is not told that a Swin
    checkpoint is an unknown language model).
    """
    model_type = str(config_json.get("model_type", ""))
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    if model_type in _OTHER_VISION_TYPES or ("image_size" in config_json and "patch_size" in config_json):
        raise HeadlabError(
            f"model_type {model_type!r} is a vision model that probe does not hook yet; supported vision "
            f"checkpoints have model_type {', '.join(sorted(MODEL_TYPES))} (add its layout to "
            "probe.vision.ARCHITECTURES)"
        )
    return None
