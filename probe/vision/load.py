"""Loading vision checkpoints and wrapping them: frozen weights, eager attention, the module layout."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from probe.checkpoints import check_checkpoint_files, force_eager, quiet_transformers, read_config
from probe.errors import CaptureError, HeadlabError
from probe.images import ImageSpec
from probe.model import BosPolicy, LoadedModel
from probe.vision.arch import ARCHITECTURES, VisionArch, vision_family


def _base(hf_model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(hf_model, "base_model", hf_model)
    return base if isinstance(base, torch.nn.Module) else hf_model


def _module_names(hf_model: torch.nn.Module, family: str) -> dict[str, Any]:
    """Full module names of every part ``ARCHITECTURES[family]`` lists, checked to exist."""
    arch = ARCHITECTURES[family]
    base = _base(hf_model)
    names = {id(m): n for n, m in hf_model.named_modules()}
    try:
        layers = base.get_submodule(arch.layers)
        if not isinstance(layers, torch.nn.ModuleList):
            raise AttributeError(f"{arch.layers} is a {type(layers).__name__}, not a list of blocks")
        attention = [layer.get_submodule(arch.attention) for layer in layers]
        out_proj = [layer.get_submodule(arch.out_proj) for layer in layers]
        final = base.get_submodule(arch.final_norm)
    except AttributeError as err:
        raise HeadlabError(
            f"this {family} checkpoint's modules are not where probe.vision.ARCHITECTURES[{family!r}] says "
            f"({err}); the installed transformers may lay the model out differently"
        ) from None
    return {
        "layers": [names[id(m)] for m in layers],
        "attention": [names[id(m)] for m in attention],
        "out_proj": [names[id(m)] for m in out_proj],
        "final_norm": names[id(final)],
    }


def _attention_config(hf_model: torch.nn.Module) -> Any:
    cfg = hf_model.config
    return getattr(cfg, "vision_config", None) or cfg


def check_eager(model: LoadedModel) -> None:
    """Raise :class:`CaptureError` unless every attention module of ``model`` runs eager attention."""
    wrong = []
    for name in model.extra["modules"]["attention"]:
        module = model.hf_model.get_submodule(name)
        impl = getattr(getattr(module, "config", None), "_attn_implementation", "eager")
        if impl != "eager":
            wrong.append(f"{name} ({impl})")
    if wrong:
        raise CaptureError(
            f"attention of {model.name} would run a fused kernel that returns no weights: {', '.join(wrong[:3])}"
            f"{' …' if len(wrong) > 3 else ''}; load it with probe.load_model (which forces eager attention) "
            "or call probe.vision.force_eager(model.hf_model)"
        )


def wrap_vision(
    name: str,
    family: str,
    source: str,
    hf_model: torch.nn.Module,
    image: ImageSpec | None = None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    weight_sha256: str,
    path: str | None,
    caveat: str = "",
    licence: str = "",
    extra: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Wrap a transformers ViT/DeiT/CLIP/SigLIP/DINOv2 image model: eager attention, frozen weights, geometry."""
    if family not in ARCHITECTURES:
        raise HeadlabError(f"no vision layout for family {family!r}; known: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[family]
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    force_eager(hf_model)
    cfg = _attention_config(hf_model)
    image_size = int(cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0])
    patch_size = int(cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0])
    prefixes = arch.prefixes(cfg)
    image = image or default_image(arch, cfg, image_size, patch_size)
    # a model that resizes its position embeddings takes any multiple of its patch size
    wanted = image.image_size if arch.interpolates_positions else image_size
    given = (image.image_size, image.patch_size, image.prefix_names)
    if given != (wanted, patch_size, prefixes):
        raise HeadlabError(
            f"the image spec ({image.image_size} px, patch {image.patch_size}, prefix {image.prefix_names}) "
            f"does not match the model ({image_size} px, patch {patch_size}, prefix {prefixes})"
        )
    n_heads = int(cfg.num_attention_heads)
    d_model = int(cfg.hidden_size)
    modules = _module_names(hf_model, family)
    info = {
        **dict(extra or {}),
        "modules": modules,
        "grid": list(image.grid),
        "n_patches": image.n_patches,
        "n_tokens": image.n_tokens,
        "n_prefix": image.n_prefix,
        "embedding_dim": _embedding_dim(hf_model, d_model),
    }
    model = LoadedModel(
        name=name,
        kind="vision",
        family=family,
        source=source,
        n_layers=len(modules["layers"]),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_head=int(getattr(cfg, "head_dim", None) or d_model // n_heads),
        d_model=d_model,
        n_ctx=image.n_tokens,
        tokenizer=None,
        bos=BosPolicy(mode="never", prepend=False, token_id=None, token=None),
        device=device,
        dtype=dtype,
        hf_model=hf_model,
        bridge=None,
        native_model=None,
        weight_sha256=weight_sha256,
        path=path,
        caveat=caveat,
        licence=licence,
        extra=info,
        image=image,
    )
    check_eager(model)
    return model


def default_image(arch: VisionArch, cfg: Any, image_size: int, patch_size: int) -> ImageSpec:
    """The family's preprocessing for a model without a processor file, with its prefix tokens."""
    prefixes = arch.prefixes(cfg)
    image = arch.default_image(image_size, patch_size)
    return dataclasses.replace(image, prefix_names=prefixes, n_prefix=len(prefixes))


def _processor_size(processor: Mapping[str, Any], default: int) -> int:
    """The side of the images a ``preprocessor_config.json`` ends at (its crop, else its resize)."""
    final = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    if isinstance(final, int):
        return final
    if isinstance(final, Mapping) and "height" in final:
        return int(final["height"])
    return default


def _embedding_dim(hf_model: torch.nn.Module, d_model: int) -> int:
    projection = getattr(hf_model, "visual_projection", None)
    return int(projection.out_features) if isinstance(projection, torch.nn.Linear) else d_model


def load_checkpoint(directory: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, str, ImageSpec]:
    """Load a ViT / DeiT / CLIP(-vision) / SigLIP-vision / DINOv2 checkpoint directory: (model, family, image spec).

    A full CLIP checkpoint (``model_type: clip``) gives its image tower with projection. Every
    weight of the loaded model must come from the checkpoint (the pooler of a plain ViT, which
    probe never uses, excepted); the text tower of a full CLIP checkpoint is ignored.
    """
    from safetensors import SafetensorError

    config = read_config(directory)
    family = vision_family(config)
    if family is None:
        raise HeadlabError(f"{directory} holds a {config['model_type']!r} model, not a vision model")
    check_checkpoint_files(directory)
    architectures = [str(a) for a in config.get("architectures") or []]
    import transformers

    if family == "clip":
        with_projection = config["model_type"] == "clip" or any("WithProjection" in a for a in architectures)
        cls: Any = (
            transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
        )
    elif (
        architectures
        and "ImageClassification" in architectures[0]
        and hasattr(transformers, architectures[0])
    ):
        cls = getattr(transformers, architectures[0])  # the exact head (DeiT: ...WithTeacher too)
    else:
        cls = transformers.AutoModel
    kwargs: dict[str, Any] = {}
    if config["model_type"] == "clip" and "projection_dim" in config:
        # The projection's width is the full model's projection_dim; its vision_config may not say it.
        vision_config = transformers.CLIPVisionConfig.from_pretrained(str(directory))
        vision_config.projection_dim = int(config["projection_dim"])
        kwargs["config"] = vision_config
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                str(directory), dtype=dtype, attn_implementation="eager", output_loading_info=True, **kwargs
            )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise HeadlabError(
            f"could not load the {family} checkpoint in {directory}: {str(err).splitlines()[0]}; "
            "it needs config.json and model.safetensors (or pytorch_model.bin) written by save_pretrained"
        ) from None
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k.split(".")]
    if missing:
        raise HeadlabError(
            f"the checkpoint in {directory} lacks weights of {type(model).__name__}: {sorted(missing)[:4]}; "
            "they would be random. Re-save the full model with save_pretrained"
        )
    cfg = _attention_config(model)
    image_size = int(cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0])
    patch_size = int(cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0])
    arch = ARCHITECTURES[family]
    processor = directory / "preprocessor_config.json"
    if processor.is_file():
        try:
            settings = json.loads(processor.read_text())
        except json.JSONDecodeError as err:
            raise HeadlabError(f"{processor} is not valid JSON ({err}); fix or delete it") from None
        image = ImageSpec.from_processor_config(
            settings,
            # DINOv2 resizes its position table (518 px) to the processor's crop (224 px)
            image_size=_processor_size(settings, image_size) if arch.interpolates_positions else image_size,
            patch_size=patch_size,
            prefix_names=arch.prefixes(cfg),
        )
    else:
        image = default_image(arch, cfg, image_size, patch_size)
    return model, family, image
