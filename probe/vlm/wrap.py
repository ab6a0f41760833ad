"""Wrapping a ``LlavaForConditionalGeneration``: frozen, eager, a TransformerBridge and a native twin."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from probe import devicemap
from probe.assemblies import IMAGE_TOKEN
from probe.errors import ConfigError, HeadlabError
from probe.generation import prepare_bridge_generation
from probe.images import ImageSpec
from probe.model import BosMode, LoadedModel, bos_policy
from probe.vision.arch import ARCHITECTURES
from probe.vlm.assembly import KIND, LAYOUT


def _image_spec(vision_config: Any, processor_file: Path | None = None) -> ImageSpec:
    if str(getattr(vision_config, "model_type", "")) not in ("clip_vision_model", "clip"):
        raise HeadlabError(
            f"the image tower is a {vision_config.model_type!r} model; probe's LLaVA support covers CLIP towers"
        )
    size = int(
        vision_config.image_size if isinstance(vision_config.image_size, int) else vision_config.image_size[0]
    )
    patch = int(
        vision_config.patch_size if isinstance(vision_config.patch_size, int) else vision_config.patch_size[0]
    )
    arch = ARCHITECTURES["clip"]
    if processor_file is not None and processor_file.is_file():
        try:
            processor = json.loads(processor_file.read_text())
        except json.JSONDecodeError as err:
            raise HeadlabError(f"{processor_file} is not valid JSON ({err}); fix or delete it") from None
        processor = processor.get("image_processor", processor)  # a processor_config nests it
        return ImageSpec.from_processor_config(
            processor, image_size=size, patch_size=patch, prefix_names=arch.prefix_names
        )
    return arch.default_image(size, patch)


@contextmanager
def _no_processor_download() -> Iterator[None]:
    """Skip the bridge's multimodal-processor step: offline it fails and then pip-installs torchvision."""
    from transformer_lens.model_bridge.sources.transformers import source

    saved = getattr(source, "load_modality_processor", None)
    if saved is None:  # another TransformerLens version: nothing to skip
        yield
        return
    source.load_modality_processor = lambda *args, **kwargs: None
    try:
        yield
    finally:
        source.load_modality_processor = saved


def _force_eager(hf_model: torch.nn.Module) -> None:
    """Eager attention everywhere (the bridge reads patterns; the vision tower returns weights)."""
    top: Any = hf_model.config
    configs: list[Any] = [top, top.text_config, top.vision_config]
    for module in hf_model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not c for c in configs):
            configs.append(cfg)
    for cfg in configs:
        cfg._attn_implementation = "eager"


def wrap_vlm(
    name: str,
    source: str,
    hf_model: torch.nn.Module,
    tokenizer: Any,
    image: ImageSpec | None = None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    bos: BosMode = "default",
    weight_sha256: str,
    path: str | None,
    caveat: str = "",
    licence: str = "",
    extra: Mapping[str, Any] | None = None,
    device_map: devicemap.DeviceMapSpec = None,
) -> LoadedModel:
    """Wrap a ``LlavaForConditionalGeneration``: frozen, eager, a TransformerBridge, a native twin;
    on ``device``, or spread over several by ``device_map`` (see docs/multi-gpu.md)."""
    from transformer_lens.model_bridge import TransformerBridge

    config: Any = hf_model.config
    if getattr(config, "model_type", None) != "llava":
        raise HeadlabError(f"{name} is a {getattr(config, 'model_type', '?')!r} model, not a LLaVA")
    image = image or _image_spec(config.vision_config)
    hf_model, placed_map, device = devicemap.place(hf_model, device, dtype, device_map)
    hf_model = hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    _force_eager(hf_model)
    # A module tree of its own for the fast path (SDPA, generate), sharing every parameter and buffer
    # (and accelerate's hooks, with the offloaded weights they hold).
    shared = {id(t): t for t in [*hf_model.parameters(), *hf_model.buffers()]}
    native_model = copy.deepcopy(hf_model, memo={**shared, **devicemap.shared_hooks(hf_model)})
    bridge_tokenizer = copy.deepcopy(tokenizer)
    if "name_or_path" not in bridge_tokenizer.init_kwargs:
        bridge_tokenizer.init_kwargs.update(name_or_path=name, add_bos_token=True)
    with _no_processor_download():
        bridge = TransformerBridge.boot_transformers(
            path or name, hf_model=hf_model, tokenizer=bridge_tokenizer, device=device, dtype=dtype
        )
    text = config.text_config
    n_heads = int(text.num_attention_heads)
    d_model = int(text.hidden_size)
    n_layers = int(text.num_hidden_layers)
    vision_cfg = config.vision_config
    info = {
        **dict(extra or {}),
        "image_token": IMAGE_TOKEN,
        "image_token_id": int(config.image_token_id),
        "image_seq_length": int(config.image_seq_length),
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision": {
            "model_type": vision_cfg.model_type,
            "n_layers": int(vision_cfg.num_hidden_layers),
            "n_heads": int(vision_cfg.num_attention_heads),
            "d_model": int(vision_cfg.hidden_size),
        },
        "modules": {
            "layers": [f"{LAYOUT.layers}.{i}" for i in range(n_layers)],
            "attention": [LAYOUT.block(i, LAYOUT.attention) for i in range(n_layers)],
            "out_proj": [LAYOUT.block(i, LAYOUT.out_proj) for i in range(n_layers)],
            "projector": LAYOUT.projector,
            "vision_tower": LAYOUT.vision_tower,
        },
    }
    expected = int(config.image_seq_length)
    if image.n_patches + (1 if config.vision_feature_select_strategy == "full" else 0) != expected:
        raise HeadlabError(
            f"{name}: image_seq_length is {expected} but a {image.image_size}-pixel image with patch "
            f"{image.patch_size} gives {image.n_patches} patch tokens; the checkpoint's config is inconsistent"
        )
    loaded = LoadedModel(
        name=name,
        kind=KIND,
        family="llava",
        source=source,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
        d_head=int(getattr(text, "head_dim", None) or d_model // n_heads),
        d_model=d_model,
        n_ctx=int(text.max_position_embeddings),
        tokenizer=tokenizer,
        bos=bos_policy(tokenizer, bos),
        device=device,
        dtype=dtype,
        hf_model=hf_model,
        bridge=bridge,
        native_model=native_model,
        weight_sha256=weight_sha256,
        path=path,
        caveat=caveat,
        licence=licence,
        extra=info,
        image=image,
        device_map=placed_map,
    )
    prepare_bridge_generation(loaded)
    return loaded


def _require_vlm(model: LoadedModel) -> None:
    if model.kind != KIND or model.native_model is None:
        raise ConfigError(
            f"{model.name} is a {model.kind} model; probe.vlm works on vision-language models "
            "(probe.load_model('scene-llava'), 'tiny-llava' or a LLaVA checkpoint directory)"
        )
