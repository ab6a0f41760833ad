"""Tiny random-weight checkpoints of the vision families probe reads, for the vision support matrix.

Each family is one :class:`VisionFamily`: the transformers config and model classes and their
arguments for a tiny model (2 layers, width 32, 4 heads, 32-pixel images in 8-pixel patches),
seeded weights drawn as :mod:`probe.tiny` draws them, and the ``preprocessor_config.json`` to
write beside it where the family's checkpoints carry one that matters (DINOv2: a crop smaller than
the position table, so positions are interpolated). ``llava`` is a LLaVA-1.5-style assembly of
the ``clip`` tower and the ``llama`` language family of :mod:`probe.families`.
:func:`save_checkpoint` writes an ordinary checkpoint directory that ``probe.load_model(directory)``
loads through the local-directory sources. The checks are in :mod:`probe.vision_support`.

See docs/support.md.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from probe.images import IMAGENET_MEAN, IMAGENET_STD
from probe.tiny import _seeded

_SMALL: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def _small(**over: Any) -> dict[str, Any]:
    return {**_SMALL, **over}


@dataclass(frozen=True)
class VisionFamily:
    """A tiny model of one vision ``model_type`` (or the LLaVA assembly)."""

    name: str
    config_class: str  # a class in the transformers namespace
    model_class: str  # the transformers class the checkpoint is saved from and checked against
    what: str  # one line: what this family exercises
    kwargs: dict[str, Any] = field(default_factory=dict)
    # where transformers' own model keeps the image embedding: its image_embeds or pooler_output,
    # or "cls" (token 0 of the base model's last_hidden_state, after its final norm)
    embedding: Literal["image_embeds", "pooler_output", "cls"] = "cls"
    processor: dict[str, Any] | None = None  # a preprocessor_config.json to write beside the weights
    kind: Literal["vision", "vision-language"] = "vision"

    def config(self) -> Any:
        transformers = importlib.import_module("transformers")
        return getattr(transformers, self.config_class)(**self.kwargs)


# DINOv2's processor: resize the shortest side, then crop smaller than the position table (as the
# real checkpoints crop 224 px for a 518-px table), so the model interpolates its positions.
_DINO_PROCESSOR: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 36},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 32, "width": 32},
    "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
}

VISION_FAMILIES: dict[str, VisionFamily] = {
    f.name: f
    for f in [
        VisionFamily(
            "vit",
            "ViTConfig",
            "ViTForImageClassification",
            "ViT: CLS token, learned positions, q/k/v biases, a 3-label classifier",
            _small(intermediate_size=64, qkv_bias=True, num_labels=3),
        ),
        VisionFamily(
            "deit",
            "DeiTConfig",
            "DeiTForImageClassificationWithTeacher",
            "DeiT: CLS and distillation tokens, two classifier heads averaged",
            _small(intermediate_size=64, num_labels=3),
        ),
        VisionFamily(
            "clip",
            "CLIPVisionConfig",
            "CLIPVisionModelWithProjection",
            "CLIP image tower: pre-norm, quick-GELU, CLS through the post-norm and a 16-d projection",
            _small(intermediate_size=64, projection_dim=16, hidden_act="quick_gelu"),
            embedding="image_embeds",
        ),
        VisionFamily(
            "siglip",
            "SiglipVisionConfig",
            "SiglipVisionModel",
            "SigLIP image tower: no CLS token, the embedding from an attention-pooling head",
            _small(intermediate_size=64),
            embedding="pooler_output",
        ),
        VisionFamily(
            "dinov2",
            "Dinov2Config",
            "Dinov2Model",
            "DINOv2: layer scale; a 5x5 position table interpolated to the processor's 32-px crop (4x4)",
            _small(image_size=40, mlp_ratio=2),
            processor=_DINO_PROCESSOR,
        ),
        VisionFamily(
            "dinov2_with_registers",
            "Dinov2WithRegistersConfig",
            "Dinov2WithRegistersModel",
            "DINOv2 with registers: 4 register tokens between CLS and the patches",
            _small(mlp_ratio=2, num_register_tokens=4),
        ),
        VisionFamily(
            "llava",
            "LlavaConfig",
            "LlavaForConditionalGeneration",
            "LLaVA-1.5 style: the clip tower (layer -2, CLS dropped: 16 image tokens), an MLP projector, "
            "the 2-layer llama family",
            kind="vision-language",
        ),
    ]
}
"""family name -> the tiny model of that family."""


def build(family: str, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A tiny random model of ``family`` (a key of :data:`VISION_FAMILIES`) and its tokenizer (LLaVA) or None."""
    spec = VISION_FAMILIES[family]
    if spec.kind == "vision-language":
        from probe.families import build as build_language
        from probe.vlm import assemble

        tower, _ = build("clip", seed)
        language, tokenizer = build_language("llama", seed)
        return assemble(tower, language, tokenizer, seed=seed)
    transformers = importlib.import_module("transformers")
    cfg = spec.config()
    cls = getattr(transformers, spec.model_class)
    return _seeded(seed, lambda: cls(cfg), std=0.3), None


def save_checkpoint(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a checkpoint directory of the tiny ``family`` model (config, safetensors weights, and the
    tokenizer and ``preprocessor_config.json`` where the family has them)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model: Any
    model, tokenizer = build(family, seed)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    processor = VISION_FAMILIES[family].processor
    if processor is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out
