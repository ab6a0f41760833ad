"""The pieces of the native model a training step runs, the trainable modules and the loss."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from probe import vlm
from probe.errors import HeadlabError
from probe.model import LoadedModel
from probe.vlm_train.config import TrainConfig


class _Lora(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, rank: int) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(rank, linear.in_features))
        self.B = torch.nn.Parameter(torch.zeros(linear.out_features, rank))  # starts as no change
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class _Parts:
    """The native model's pieces a training step runs, and the trainable modules."""

    def __init__(self, model: LoadedModel, config: TrainConfig) -> None:
        native = model.native_model
        assert native is not None
        self.model = model
        self.embed = native.get_submodule(vlm.LAYOUT.embed_tokens)
        self.language_model = native.get_submodule(vlm.LAYOUT.language_model)
        self.head = native.get_submodule(vlm.LAYOUT.lm_head)
        # float32 master copies; the model's own (possibly bf16) weights are written back at the end
        self.projector = copy.deepcopy(vlm.projector_module(model)).to(torch.float32)
        self.projector.requires_grad_(True)
        self.lora: dict[str, _Lora] = {}
        self.scale = config.lora_alpha / config.lora_rank if config.lora_rank else 0.0
        if config.lora_rank:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 1)
                for layer in range(model.n_layers):
                    for target in config.lora_targets:
                        linear = native.get_submodule(vlm.lora_module_name(layer, target))
                        assert isinstance(linear, torch.nn.Linear)
                        self.lora[f"{layer}.{target}"] = _Lora(linear, config.lora_rank).to(model.device)
        self.projector.to(model.device)

    def parameter_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [
            {
                "params": list(self.projector.parameters()),
                "peak": config.lr,
                "weight_decay": config.weight_decay,
            }
        ]
        if self.lora:
            params = [p for m in self.lora.values() for p in m.parameters()]
            groups.append({"params": params, "peak": config.lora_lr, "weight_decay": 0.0})
        return groups

    def trainable(self) -> int:
        return sum(p.numel() for p in self.projector.parameters()) + sum(
            p.numel() for m in self.lora.values() for p in m.parameters()
        )

    @contextmanager
    def lora_hooks(self) -> Iterator[None]:
        native = self.model.native_model
        assert native is not None
        handles = []

        def make(adapter: _Lora) -> Any:
            def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                x = args[0]
                delta = (x.to(adapter.A.dtype) @ adapter.A.t()) @ adapter.B.t()
                return output + (self.scale * delta).to(output.dtype)

            return hook

        try:
            for key, adapter in self.lora.items():
                layer, target = key.split(".")
                module = native.get_submodule(vlm.lora_module_name(int(layer), target))
                handles.append(module.register_forward_hook(make(adapter)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def loss(
        self, batch: Mapping[str, torch.Tensor], features: torch.Tensor, weighting: str = "token"
    ) -> torch.Tensor:
        """Cross-entropy of the answer tokens (the image positions get the projected features): the mean
        over tokens (``weighting="token"``) or over examples of each example's token mean (``"example"``)."""
        model = self.model
        ids, attention, answer = batch["ids"], batch["attention"], batch["answer"]
        image_mask = ids == int(model.extra["image_token_id"])
        with torch.no_grad():
            embeds = self.embed(ids)
        projected = self.projector(features.to(model.device, torch.float32))
        if int(image_mask.sum()) != projected.shape[0] * projected.shape[1]:
            raise HeadlabError("image tokens and image features do not match in a training batch")
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), projected.to(embeds.dtype))
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=attention, use_cache=False)[0]
        scored = answer[:, 1:]
        logits = self.head(hidden[:, :-1][scored]).float()  # logits only where a token is scored
        if weighting == "token":
            return torch.nn.functional.cross_entropy(logits, ids[:, 1:][scored])
        per_token = torch.nn.functional.cross_entropy(logits, ids[:, 1:][scored], reduction="none")
        counts = scored.sum(dim=1)  # answer tokens per example
        row = scored.nonzero(as_tuple=True)[0]  # the example of each scored token
        weights = 1.0 / counts.clamp(min=1).to(per_token.dtype)[row] / int((counts > 0).sum())
        return (per_token * weights).sum()


def _autocast(model: LoadedModel) -> contextlib.AbstractContextManager[Any]:
    if model.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=model.dtype)
