"""Generating from vision-language models: greedy answers, and yes/no answers with their logit margin.

Both run the native model with SDPA attention and a KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from probe.errors import ConfigError
from probe.images import ImageInput
from probe.kernels import native_attention
from probe.model import Batch, LoadedModel
from probe.vlm.assembly import LAYOUT
from probe.vlm.prompts import _as_list, encode_prompts
from probe.vlm.wrap import _require_vlm


def image_features(model: LoadedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the projector reads: the tower's hidden states at ``vision_feature_layer`` with the strategy
    applied, ``[N, image_seq_length, d_vision]`` (the computation of ``LlavaModel.get_image_features``
    before its projector, so that training can cache it)."""
    _require_vlm(model)
    native = model.native_model
    assert native is not None
    tower = native.get_submodule(LAYOUT.vision_tower)
    out = tower(pixel_values.to(model.device, model.dtype), output_hidden_states=True)
    layer = model.extra["vision_feature_layer"]
    layers = [layer] if isinstance(layer, int) else list(layer)
    hidden = [out.hidden_states[i] for i in layers]
    if model.extra["vision_feature_select_strategy"] == "default":
        hidden = [h[:, 1:] for h in hidden]
    return torch.cat(hidden, dim=-1)


def _native_generate(
    model: LoadedModel, pixels: torch.Tensor | None, batch: Batch, max_new_tokens: int, scores: bool
) -> Any:
    from transformers import GenerationConfig

    tok = model.tokenizer
    # A fresh config: plain greedy decoding whatever a checkpoint's generation_config.json asks for
    # (sampling, repetition penalties), so that every model is scored the same way.
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        suppress_tokens=[int(model.extra["image_token_id"])],  # never write an image placeholder
        return_dict_in_generate=True,
        output_scores=scores,
    )
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if pixels is not None:
        kwargs["pixel_values"] = pixels.to(model.device, model.dtype)
    with torch.no_grad(), native_attention(model) as native:
        generator: Any = native
        return generator.generate(generation_config=greedy, **kwargs)


def _batches(n: int, batch_size: int) -> range:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    return range(0, n, batch_size)


def _image_list(images: ImageInput) -> Any:
    """Images as something sliceable whose items are one image each (pixel tensors stay tensors)."""
    if isinstance(images, torch.Tensor):
        return images if images.dim() == 4 else images.unsqueeze(0)
    if hasattr(images, "ndim") and getattr(images, "ndim", 0) == 3:  # one [H, W, 3] array
        return [images]
    if hasattr(images, "ndim") or isinstance(images, Sequence):
        return images
    return [images]


def _pixels(model: LoadedModel, images: Sequence[Any], start: int, stop: int) -> torch.Tensor:
    """Pixel values of ``images[start:stop]`` (preprocessed per batch, so memory stays one batch)."""
    chunk = images[start:stop]
    return model.preprocess(
        chunk if isinstance(chunk, torch.Tensor) or hasattr(chunk, "ndim") else list(chunk)
    )


def generate(
    model: LoadedModel,
    images: ImageInput | None,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to ``prompts`` (one, or one per image) about ``images``, decoded without special
    tokens. ``images=None`` asks text-only prompts (no image placeholder); then ``prompts`` is a list."""
    _require_vlm(model)
    from tqdm.auto import tqdm

    items = _image_list(images) if images is not None else None
    if items is None and isinstance(prompts, str):
        raise ConfigError("without images give a list of prompts (one per answer)")
    n = len(items) if items is not None else len(prompts)
    texts = _as_list(prompts, n)
    out: list[str] = []
    for start in tqdm(_batches(n, batch_size), desc="generate", disable=not progress, leave=False):
        rows = texts[start : start + batch_size]
        batch = encode_prompts(model, rows, image=items is not None)
        px = _pixels(model, items, start, start + batch_size) if items is not None else None
        result = _native_generate(model, px, batch, max_new_tokens, scores=False)
        new = result.sequences[:, batch.input_ids.shape[1] :]
        out += [t.strip() for t in model.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


@dataclass(frozen=True)
class YesNoAnswer:
    """A generated answer and, at its first step, logit(first token of "Yes") − logit(first token of "No")."""

    text: str
    yes_minus_no: float


def answer_yes_no(
    model: LoadedModel,
    images: ImageInput,
    questions: str | Sequence[str],
    *,
    max_new_tokens: int = 4,
    batch_size: int = 16,
    progress: bool = False,
) -> list[YesNoAnswer]:
    """Greedy answers to yes/no ``questions`` (one per image), with the first step's Yes−No logit margin."""
    _require_vlm(model)
    from tqdm.auto import tqdm

    items = _image_list(images)
    texts = _as_list(questions, len(items))
    tok = model.tokenizer
    yes_id = tok("Yes", add_special_tokens=False)["input_ids"][0]
    no_id = tok("No", add_special_tokens=False)["input_ids"][0]
    out: list[YesNoAnswer] = []
    for start in tqdm(_batches(len(texts), batch_size), desc="yes/no", disable=not progress, leave=False):
        batch = encode_prompts(model, texts[start : start + batch_size])
        px = _pixels(model, items, start, start + batch_size)
        result = _native_generate(model, px, batch, max_new_tokens, scores=True)
        first = result.scores[0].float()
        margin = (first[:, yes_id] - first[:, no_id]).tolist()
        decoded = tok.batch_decode(result.sequences[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        out += [YesNoAnswer(t.strip(), float(m)) for t, m in zip(decoded, margin, strict=True)]
    return out
