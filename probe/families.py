"""Tiny random-weight checkpoints of many transformers architecture families, for the support matrix.

Each family is one :class:`Family`: the transformers config class and its arguments for a tiny
model (2-3 layers, width 64, 4 heads, grouped-query attention where the family has it, the byte
tokenizer's 259 ids plus one id per whole word asked for), seeded weights drawn as :mod:`probe.tiny`
draws them, and whether the family's tokenizer prepends BOS. :func:`save_checkpoint` writes an
ordinary checkpoint directory
(``config.json``, ``model.safetensors``, the tokenizer) that ``probe.load_model(directory)`` loads
through the local-directory source. The checks run on these checkpoints are in :mod:`probe.support`.

See docs/support.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from probe.tiny import _seeded, byte_tokenizer

VOCAB = 259  # the byte tokenizer's size without words: 256 bytes + BOS, EOS, PAD
SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


@dataclass(frozen=True)
class Family:
    """A tiny model of one transformers ``model_type``."""

    name: str  # the family's key: its config's model_type, or that with a variant suffix
    config_class: str  # a class in the transformers namespace
    what: str  # one line: what this family exercises
    kwargs: dict[str, Any] = field(default_factory=dict)
    prepend_bos: bool = True  # the family's own tokenizer prepends BOS (GPT-2-style ones do not)

    def config(self, vocab_size: int = VOCAB) -> Any:
        transformers = importlib.import_module("transformers")
        cls = getattr(transformers, self.config_class)
        return cls(**{**SPECIAL_IDS, "vocab_size": vocab_size, **self.kwargs})


# The common shape of the decoder-only families named by hidden_size & co.
_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def _base(**over: Any) -> dict[str, Any]:
    return {**_BASE, **over}


def _falcon(**over: Any) -> dict[str, Any]:
    """Falcon's config names (rotary positions: ALiBi off) with the common width, depth and heads."""
    common = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
    }
    return {**common, "alibi": False, **over}


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama",
            "LlamaConfig",
            "Llama 3: RoPE with llama3 scaling, GQA 4/2, RMSNorm, SwiGLU",
            _base(
                head_dim=16,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
        ),
        Family(
            "mistral",
            "MistralConfig",
            "Mistral 7B v0.1: RoPE, GQA 4/2, a sliding window of 8 on every layer (no layer_types)",
            _base(sliding_window=8),
        ),
        Family(
            "mixtral",
            "MixtralConfig",
            "Mixtral: mixture of experts (4 experts, top 2), GQA 4/2",
            _base(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        ),
        Family("qwen2", "Qwen2Config", "Qwen2: biases on q/k/v, GQA 4/2", _base()),
        Family("qwen3", "Qwen3Config", "Qwen3: RMSNorm on queries and keys, GQA 4/2", _base(head_dim=16)),
        Family(
            "qwen2_moe",
            "Qwen2MoeConfig",
            "Qwen2-MoE: 4 experts (top 2) plus a shared expert, GQA 4/2",
            _base(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=64,
                decoder_sparse_step=1,
            ),
        ),
        Family(
            "gemma2",
            "Gemma2Config",
            "Gemma 2: attention logit soft-capping, sliding window 8 on alternate layers, GQA 4/2",
            _base(
                num_hidden_layers=3,
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=8,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
            ),
        ),
        Family(
            "gemma3_text",
            "Gemma3TextConfig",
            "Gemma 3 (text): sliding window 8 and global layers, QK norm, one KV head",
            _base(
                num_hidden_layers=3,
                num_key_value_heads=1,
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=8,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            ),
        ),
        Family("phi3", "Phi3Config", "Phi-3: fused qkv projection, GQA 4/2", _base()),
        Family(
            "phi3-longrope",
            "Phi3Config",
            "Phi-3 128K / Phi-3.5: LongRoPE, short factors up to 32 tokens and long ones beyond "
            "(generation and the padded pair cross the switch)",
            _base(
                original_max_position_embeddings=32,
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "original_max_position_embeddings": 32,
                    "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 4.0],
                    "long_factor": [1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0],
                },
            ),
        ),
        Family("olmo2", "Olmo2Config", "OLMo 2: RMSNorm on whole q and k projections, GQA 4/2", _base()),
        Family(
            "granite",
            "GraniteConfig",
            "Granite: embedding, residual, attention and logit multipliers, GQA 4/2",
            _base(
                embedding_multiplier=2.0,
                residual_multiplier=0.5,
                attention_multiplier=0.2,
                logits_scaling=2.0,
            ),
        ),
        Family("cohere", "CohereConfig", "Cohere: parallel attention and MLP, interleaved RoPE", _base()),
        Family("stablelm", "StableLmConfig", "StableLM: partial RoPE (25%), LayerNorm, GQA 4/2", _base()),
        Family(
            "starcoder2",
            "Starcoder2Config",
            "StarCoder2: biases, LayerNorm, GELU MLP, GQA 4/2",
            _base(sliding_window=None),
        ),
        Family(
            "gpt2",
            "GPT2Config",
            "GPT-2: learned positions, fused c_attn (Conv1D), no BOS",
            {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
            prepend_bos=False,
        ),
        Family(
            "gpt_neox",
            "GPTNeoXConfig",
            "GPT-NeoX (Pythia): fused query_key_value, partial RoPE (25%), parallel residual",
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 256,
                "rotary_pct": 0.25,
            },
            prepend_bos=False,
        ),
        Family(
            "gptj",
            "GPTJConfig",
            "GPT-J: interleaved partial RoPE (rotary_dim 8 of 16), parallel attention and MLP; its bridge's "
            "hook_pattern is not used by the forward",
            {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 8},
            prepend_bos=False,
        ),
        Family(
            "falcon",
            "FalconConfig",
            "Falcon-7B style: multi-query attention (one KV head), fused qkv, parallel attention and MLP",
            _falcon(multi_query=True, new_decoder_architecture=False, parallel_attn=True),
            prepend_bos=False,
        ),
        Family(
            "falcon-new",
            "FalconConfig",
            "Falcon-40B style new decoder architecture: grouped fused qkv, GQA 4/2, two layer norms",
            _falcon(num_kv_heads=2, new_decoder_architecture=True),
            prepend_bos=False,
        ),
        Family(
            "bloom",
            "BloomConfig",
            "BLOOM: ALiBi position bias, fused query_key_value, no position embeddings",
            {"hidden_size": 64, "n_layer": 2, "n_head": 4},
            prepend_bos=False,
        ),
        Family(
            "mpt",
            "MptConfig",
            "MPT: ALiBi position bias, fused Wqkv, no biases",
            {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 256, "expansion_ratio": 2},
            prepend_bos=False,
        ),
    ]
}
"""model_type -> the tiny model of that family."""


def build(family: str, seed: int = 0, words: Sequence[str] = ()) -> tuple[torch.nn.Module, Any]:
    """A tiny random model of ``family`` (a key of :data:`FAMILIES`) and its byte tokenizer, in which
    each of ``words`` is one token too (with and without a leading space; the vocabulary grows)."""
    from transformers import AutoModelForCausalLM

    spec = FAMILIES[family]
    tok = byte_tokenizer(prepend_bos=spec.prepend_bos, words=words)
    cfg = spec.config(vocab_size=len(tok))
    for attr in ("attn_pdrop", "embd_pdrop", "resid_pdrop", "attention_dropout", "hidden_dropout"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, 0.0)
    model = _seeded(seed, lambda: AutoModelForCausalLM.from_config(cfg), std=0.15)
    return model, tok


def save_checkpoint(family: str, directory: str | Path, seed: int = 0, words: Sequence[str] = ()) -> Path:
    """Write a checkpoint directory of the tiny ``family`` model: config, safetensors weights, tokenizer
    (``words`` as in :func:`build`)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model: Any
    model, tok = build(family, seed, words)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
