"""A vision model's forward pass: its image embedding and, for classifiers, its logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from probe.errors import CaptureError, ConfigError
from probe.images import ImageInput
from probe.model import LoadedModel
from probe.vision.arch import ARCHITECTURES
from probe.vision.hooks import ModuleHooks, _pixels, module_hooks


@dataclass
class VisionOutput:
    """What a vision forward pass returns: the image embedding and, for classifiers, the logits."""

    # [N, d_embed]: CLIP's projected embedding, SigLIP's pooled one, else the final-norm CLS token
    embedding: torch.Tensor
    logits: torch.Tensor | None  # [N, n_labels] for classification checkpoints


def _run(model: LoadedModel, pixels: torch.Tensor, hooks: ModuleHooks) -> VisionOutput:
    """One forward pass; reads the final norm's output with a hook (added to ``hooks``)."""
    seen: dict[str, torch.Tensor] = {}

    def final(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        seen["norm"] = output

    hooks.forward(model.extra["modules"]["final_norm"], final)
    out = model.hf_model(pixel_values=pixels)
    embedding = getattr(out, "image_embeds", None)
    if embedding is None and ARCHITECTURES[model.family].embedding == "pooler":
        # SigLIP has no CLS token: its embedding is its attention-pooling head's output
        embedding = getattr(out, "pooler_output", None)
        if embedding is None:  # a tower saved without the head: the mean of the final norm's tokens
            norm = seen.get("norm")
            if norm is None:
                raise CaptureError(f"the final norm of {model.name} did not run; cannot read the embedding")
            embedding = norm.mean(1)
    if embedding is None:
        norm = seen.get("norm")
        if norm is None:
            raise CaptureError(f"the final norm of {model.name} did not run; cannot read the embedding")
        embedding = norm if norm.dim() == 2 else norm[:, 0]
    return VisionOutput(embedding=embedding, logits=getattr(out, "logits", None))


def forward(model: LoadedModel, images: ImageInput) -> VisionOutput:
    """Run ``model`` on images (or pixel values); gradients flow if enabled by the caller.

    Interventions active around the call (:func:`gate_heads`, :func:`gate_variables`) apply.
    """
    pixels = _pixels(model, images)
    with module_hooks(model) as hooks:
        out = _run(model, pixels, hooks)
        hooks.check_fired()
    return out


@torch.no_grad()
def embed(model: LoadedModel, images: ImageInput, *, batch_size: int = 16) -> torch.Tensor:
    """Image embeddings ``[N, d_embed]`` (float32, CPU), in batches of ``batch_size``."""
    pixels = _pixels(model, images)
    chunks = [
        forward(model, pixels[i : i + batch_size]).embedding.float().cpu()
        for i in _starts(pixels, batch_size)
    ]
    return torch.cat(chunks)


def _starts(pixels: torch.Tensor, batch_size: int) -> range:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return range(0, pixels.shape[0], batch_size)
