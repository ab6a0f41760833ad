"""The language model's own forward for VHD and VHR: image rows and their text-only twins in one
left-padded batch, LLaVA's input embeddings, and pre-hooks on each layer's ``o_proj`` that read or
scale the heads' outputs.

See docs/analyses/vhd.md ("How it is computed").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from probe import vlm
from probe.errors import CaptureError, ConfigError
from probe.kernels import native_attention
from probe.loading import LoadedModel


@dataclass
class Rows:
    """A batch of image rows followed by their text-only twins, left-padded to one width.

    ``ids``/``mask`` ``[2B, W + N]``: prompt (left-padded to ``W``) then ``N`` answer tokens
    (right-padded, mask 0 there). Step ``t`` of row ``b`` is read at position ``W - 1 + t``.
    ``features``: the projected image features of ``pixels``, when computed once for many forwards.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    n_image_rows: int
    width: int
    pixels: torch.Tensor | None
    features: torch.Tensor | None = None


def make_rows(
    model: LoadedModel,
    prompts: Sequence[str],
    pixels: torch.Tensor | None,
    answers: Sequence[Sequence[int]] | None = None,
    *,
    text_twin: bool = True,
) -> Rows:
    """The image prompts (and, with ``text_twin``, the same prompts without the image) plus answers."""
    rows = [vlm.prompt_ids(model, p, image=True) for p in prompts]
    if text_twin:
        rows += [vlm.prompt_ids(model, p, image=False) for p in prompts]
    prompt = model.batch_from_ids(rows)
    n = max((len(a) for a in answers), default=0) if answers is not None else 0
    b, width = prompt.input_ids.shape
    ids = torch.full((b, width + n), pad_id(model), dtype=torch.long, device=prompt.input_ids.device)
    mask = torch.zeros_like(ids)
    ids[:, :width], mask[:, :width] = prompt.input_ids, prompt.attention_mask
    if answers is not None:
        twins = list(answers) * (2 if text_twin else 1)
        for r, answer in enumerate(twins):
            if answer:
                ids[r, width : width + len(answer)] = torch.tensor(list(answer), dtype=torch.long)
                mask[r, width : width + len(answer)] = 1
    return Rows(ids, mask, len(prompts), width, pixels)


def pad_id(model: LoadedModel) -> int:
    tok = model.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))


def embed_rows(model: LoadedModel, rows: Rows) -> torch.Tensor:
    """Token embeddings with the projected image features written over the image tokens (LLaVA's input)."""
    native = model.native_model
    assert native is not None
    embeds = native.get_submodule(vlm.LAYOUT.embed_tokens)(rows.ids)
    image_mask = rows.ids == int(model.extra["image_token_id"])
    if rows.pixels is None:
        if bool(image_mask.any()):
            raise ConfigError(
                "image tokens in the prompt but no images given; pass pixel values to make_rows"
            )
        return embeds
    features = rows.features if rows.features is not None else project_images(model, rows.pixels)
    if int(image_mask.sum()) != features.shape[0] * features.shape[1]:
        raise CaptureError(
            f"{int(image_mask.sum())} image tokens for {features.shape[0]} images of {features.shape[1]} features"
        )
    return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))


def project_images(model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    """The projected image features ``[B, image tokens, d_model]`` LLaVA writes over the image tokens."""
    native = model.native_model
    assert native is not None
    projector = native.get_submodule(vlm.LAYOUT.projector)
    with torch.no_grad():
        return projector(vlm.image_features(model, pixels.to(model.device, model.dtype)))


def forward_rows(
    model: LoadedModel, rows: Rows, read: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Run the language model on ``rows``; logits ``[2B, len(read), vocab]`` at positions ``read``
    (default: the last prompt position). Position ids follow the attention mask (left padding)."""
    native = model.native_model
    assert native is not None
    positions = (rows.mask.cumsum(-1) - 1).clamp(min=0)
    read_at = torch.as_tensor([rows.width - 1] if read is None else read, device=rows.ids.device)
    with torch.no_grad(), native_attention(model):
        embeds = embed_rows(model, rows)
        language_model = native.get_submodule(vlm.LAYOUT.language_model)
        hidden = language_model(
            inputs_embeds=embeds, attention_mask=rows.mask, position_ids=positions, use_cache=False
        )[0]
        return native.get_submodule(vlm.LAYOUT.lm_head)(hidden[:, read_at]).float()


@contextmanager
def o_proj_hooks(model: LoadedModel, hook_for: Any) -> Iterator[None]:
    native = model.native_model
    assert native is not None
    handles = []
    try:
        for layer in range(model.n_layers):
            hook = hook_for(layer)
            if hook is not None:
                module = native.get_submodule(vlm.LAYOUT.block(layer, vlm.LAYOUT.out_proj))
                handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def scale_heads(model: LoadedModel, scales: torch.Tensor) -> Iterator[None]:
    """Multiply head ``h`` of layer ``l`` by ``scales[row, l, h]`` before ``o_proj``, at every position of
    every native forward in the block (``scales``: ``[batch, layers, heads]``; a batch row count of
    1 broadcasts). Works under SDPA and with a KV cache (generation)."""
    if scales.dim() != 3 or tuple(scales.shape[1:]) != (model.n_layers, model.n_heads):
        raise ConfigError(
            f"scales must be [batch, {model.n_layers}, {model.n_heads}], got {tuple(scales.shape)}"
        )
    active = [bool((scales[:, layer] != 1).any()) for layer in range(model.n_layers)]

    def hook_for(layer: int) -> Any:
        if not active[layer]:
            return None

        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            z = args[0]
            s = scales[:, layer].to(z.device, z.dtype)
            if s.shape[0] != z.shape[0] and s.shape[0] != 1:
                raise CaptureError(
                    f"scales for {s.shape[0]} rows, but the forward has {z.shape[0]}; "
                    "give one row of scales per batch row, or a single row for all"
                )
            shaped = z.reshape(*z.shape[:-1], model.n_heads, -1) * s[:, None, :, None]
            return (shaped.reshape(z.shape), *args[1:])

        return hook

    with o_proj_hooks(model, hook_for):
        yield


def spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches of ``size`` over ``n`` items."""
    for start in range(0, n, size):
        yield start, min(n, start + size)
