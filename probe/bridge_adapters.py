"""Corrections to the TransformerBridge's architecture adapters, registered before a bridge is built.

Falcon's new decoder architecture (Falcon-40B, Falcon-180B, Falcon 2) fuses the query, key and value
projections *grouped by key-value head*: the rows of ``query_key_value`` run, for each KV head, over
its ``n_heads / n_kv`` query heads, then its key, then its value. The bridge's Falcon adapter cuts
the rows as ``[all queries | all keys | all values]`` instead, which gives every head but the first
group's wrong projections (and a wrong forward through the bridge). :class:`FalconAdapter` cuts them
as transformers' ``FalconAttention`` does and leaves the other Falcon layouts to the adapter it
extends. See docs/support.md for the checks that show it (patterns equal transformers' eager
weights, generation equal to transformers' own).
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def falcon_grouped_qkv(weight: torch.Tensor, n_heads: int, n_kv: int) -> tuple[torch.Tensor, ...]:
    """Split the rows of a grouped fused ``[(n_kv * (n_heads/n_kv + 2)) * d_head, ...]`` weight (or
    bias) into query ``[n_heads * d_head, ...]``, key and value ``[n_kv * d_head, ...]``: query head
    ``h`` belongs to KV head ``h // (n_heads / n_kv)``, as in transformers' Falcon."""
    group = n_heads // n_kv
    grouped = weight.reshape(n_kv, group + 2, -1, *weight.shape[1:])
    d_head = grouped.shape[2]
    query = grouped[:, :group].reshape(n_heads * d_head, *weight.shape[1:])
    key = grouped[:, group].reshape(n_kv * d_head, *weight.shape[1:])
    value = grouped[:, group + 1].reshape(n_kv * d_head, *weight.shape[1:])
    return query, key, value


@functools.cache
def _falcon_adapter() -> type:
    from transformer_lens.model_bridge.supported_architectures.falcon import FalconArchitectureAdapter

    class FalconAdapter(FalconArchitectureAdapter):
        """The bridge's Falcon adapter, with the new decoder architecture's qkv split by KV group.

        The new architecture reads ``num_kv_heads`` whatever ``multi_query`` says (its default is
        true); the bridge's adapter took one KV head whenever ``multi_query`` was set."""

        def __init__(self, cfg: Any) -> None:
            if getattr(cfg, "new_decoder_architecture", False):
                cfg.multi_query = False
            super().__init__(cfg)

        def _split_falcon_qkv(
            self, original_attention_component: Any
        ) -> tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Linear]:
            if not self._is_new_arch:
                return super()._split_falcon_qkv(original_attention_component)
            fused = original_attention_component.query_key_value
            n_heads = int(self.cfg.n_heads)
            n_kv = int(self.cfg.n_key_value_heads or n_heads)
            weights = falcon_grouped_qkv(fused.weight.detach(), n_heads, n_kv)
            if fused.bias is not None:
                biases: tuple[torch.Tensor | None, ...] = falcon_grouped_qkv(
                    fused.bias.detach(), n_heads, n_kv
                )
            else:
                biases = (None, None, None)
            q, k, v = (_linear(w, b) for w, b in zip(weights, biases, strict=True))
            return q, k, v

    return FalconAdapter


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    out_features, in_features = weight.shape
    linear = torch.nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@functools.cache
def register() -> None:
    """Register the corrected adapters with the bridge's factory (once per process)."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

    ArchitectureAdapterFactory.register_adapter("FalconForCausalLM", _falcon_adapter())
