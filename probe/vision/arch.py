"""Vision architectures as data: where each family keeps its blocks, attention and output projection.

A new ViT-like family is one entry in :data:`ARCHITECTURES` (see docs/models.md, adding an
architecture).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from probe.errors import ConfigError
from probe.images import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageSpec


@dataclass(frozen=True)
class VisionArch:
    """Where a family keeps its parts; module paths relative to the transformers base model."""

    layers: str  # the ModuleList of blocks
    attention: str  # per block: returns (output, weights)
    out_proj: str  # per block: input [batch, T, heads × d_head]
    final_norm: str  # after the last block (CLIP: applied to the CLS token only)
    prefix_names: tuple[str, ...]  # the tokens before the patches (SigLIP: none)
    default_image: Callable[[int, int], ImageSpec]  # (image_size, patch_size) -> preprocessing
    # The image embedding: "cls" = the final norm's token 0 (CLIP with a projection: image_embeds);
    # "pooler" = the model's pooler_output (SigLIP's attention-pooling head; the mean of the final
    # norm's tokens for a tower saved without that head).
    embedding: Literal["cls", "pooler"] = "cls"
    # Position embeddings are resized to the input (DINOv2): the processor's image size may differ
    # from the config's image_size (the size of the position table).
    interpolates_positions: bool = False
    registers: str | None = None  # config attribute counting register tokens after the prefix

    def prefixes(self, config: Any) -> tuple[str, ...]:
        """The names of the tokens before the patches of a model of this ``config``."""
        n = int(getattr(config, self.registers, 0) or 0) if self.registers else 0
        return (*self.prefix_names, *(f"register{i}" for i in range(n)))


def _clip_image(size: int, patch: int) -> ImageSpec:
    return ImageSpec(size, patch, 1, CLIP_MEAN, CLIP_STD, shortest_edge=size, crop=(size, size))


def _vit_image(size: int, patch: int) -> ImageSpec:
    return ImageSpec(
        size, patch, 1, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize_to=(size, size), resample="bilinear"
    )


def _siglip_image(size: int, patch: int) -> ImageSpec:
    return ImageSpec(
        size,
        patch,
        0,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        resize_to=(size, size),
        resample="bilinear",
        prefix_names=(),
    )


def _dinov2_image(size: int, patch: int) -> ImageSpec:
    return ImageSpec(
        size, patch, 1, IMAGENET_MEAN, IMAGENET_STD, shortest_edge=round(size * 256 / 224), crop=(size, size)
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
    "siglip": VisionArch(
        "encoder.layers",
        "self_attn",
        "self_attn.out_proj",
        "post_layernorm",
        (),
        _siglip_image,
        embedding="pooler",
    ),
    "dinov2": VisionArch(
        "encoder.layer",
        "attention",
        "attention.o_proj",
        "layernorm",
        ("cls",),
        _dinov2_image,
        interpolates_positions=True,
    ),
}
"""model family -> module layout. A new ViT-like family is one entry here."""
# DINOv2 with registers: DINOv2's layout, its register tokens between CLS and the patches
ARCHITECTURES["dinov2_with_registers"] = replace(ARCHITECTURES["dinov2"], registers="num_register_tokens")
MODEL_TYPES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "vit": "vit",
    "deit": "deit",
    "siglip_vision_model": "siglip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_with_registers",
}
"""config.json ``model_type`` -> family."""
_OTHER_VISION_TYPES = {
    "swin",
    "swinv2",
    "beit",
    "data2vec-vision",
    "siglip",
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

    Raises :class:`ConfigError` for vision models probe does not support (so the user is not told that a Swin
    checkpoint is an unknown language model).
    """
    model_type = str(config_json.get("model_type", ""))
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    if model_type == "siglip":
        raise ConfigError(
            "this is a full SigLIP checkpoint (image and text towers); save its image tower with "
            "SiglipVisionModel.from_pretrained(directory).save_pretrained(out) and load that directory"
        )
    if model_type in _OTHER_VISION_TYPES or ("image_size" in config_json and "patch_size" in config_json):
        raise ConfigError(
            f"model_type {model_type!r} is a vision model that probe does not hook yet; supported vision "
            f"checkpoints have model_type {', '.join(sorted(MODEL_TYPES))} (add its layout to "
            "probe.vision.ARCHITECTURES)"
        )
    return None
