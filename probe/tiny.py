"""Tiny randomly initialised models of each architecture family, built in memory for tests.

Each is a real transformers model with a byte-level tokenizer that needs no files (the vision ones
have none); weights come from a seeded generator, so the same name and seed give bit-identical
models, with a larger initialiser scale than the architectures' default so that attention
patterns are not all near-uniform. ``tiny-llava`` is registered by :mod:`probe.vlm`
(:func:`register`), which assembles it from ``tiny-clip-vision`` and ``tiny-llama``.

See docs/models.md (tiny models).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Kind = Literal["language", "vision", "vision-language"]
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def byte_tokenizer(prepend_bos: bool, words: Sequence[str] = ()) -> Any:
    """A byte-level tokenizer: one token per UTF-8 byte plus BOS/EOS/PAD (259 ids).

    ``words`` become whole tokens too, each with and without a leading space (``" Mary"`` is one
    id): BPE merges that join a word's bytes left to right are added, so tests of tasks that need
    single-token words (IOI names, colours) can run on a tiny model. Other text still falls back to
    bytes, and the offset mapping stays exact.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    byte_map = pre_tokenizers.ByteLevel.alphabet()
    encode = {b: ch for b, ch in zip(range(256), _bytes_to_unicode(), strict=True)}
    # Spaced forms first: BPE applies merges by rank, so " Mary" must not be split as " " + "Mary".
    for entry in dict.fromkeys([*(" " + w for w in words), *words]):
        symbols = [encode[b] for b in entry.encode("utf-8")]
        if not all(ch in byte_map for ch in symbols):
            continue
        merged = symbols[0]
        for ch in symbols[1:]:
            if merged + ch not in vocab:
                merges.append((merged, ch))
                vocab[merged + ch] = len(vocab)
            merged += ch
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    if prepend_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0)]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tok.padding_side = "left"
    return tok


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's), in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    out: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


@dataclass(frozen=True)
class TinyBuilder:
    name: str
    kind: Kind
    family: str
    description: str
    build: Callable[[int, Sequence[str]], tuple[torch.nn.Module, Any]]


def _seeded(seed: int, make: Callable[[], torch.nn.Module], std: float) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                torch.nn.init.normal_(param, std=std)
            elif "norm" in name or "ln" in name:
                torch.nn.init.normal_(param, mean=1.0, std=0.05)
            else:
                torch.nn.init.normal_(param, std=0.02)
    return model.eval()


def build_tiny_gpt2(seed: int = 0, words: Sequence[str] = ()) -> tuple[torch.nn.Module, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = byte_tokenizer(prepend_bos=False, words=words)  # GPT-2's tokenizer adds no BOS
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=256,
        n_embd=64,
        n_layer=3,
        n_head=4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )
    return _seeded(seed, lambda: GPT2LMHeadModel(cfg), std=0.15), tok


def build_tiny_llama(seed: int = 0, words: Sequence[str] = ()) -> tuple[torch.nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer(prepend_bos=True, words=words)  # Llama's tokenizer prepends <s>
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    return _seeded(seed, lambda: LlamaForCausalLM(cfg), std=0.15), tok


def build_tiny_vit(seed: int = 0, words: Sequence[str] = ()) -> tuple[torch.nn.Module, None]:
    """A ViT image classifier: 32 px, patch 8 (4×4 grid + CLS = 17 tokens), 3 layers × 4 heads, 5 labels."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg.num_labels = 5
    return _seeded(seed, lambda: ViTForImageClassification(cfg), std=0.3), None


def build_tiny_clip_vision(seed: int = 0, words: Sequence[str] = ()) -> tuple[torch.nn.Module, None]:
    """A CLIP image tower with projection: 32 px, patch 8, 2 layers × 4 heads, quick-GELU, 16-d embedding."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        projection_dim=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
    )
    return _seeded(seed, lambda: CLIPVisionModelWithProjection(cfg), std=0.3), None


TINY_BUILDERS: dict[str, TinyBuilder] = {
    b.name: b
    for b in [
        TinyBuilder(
            "tiny-gpt2",
            "language",
            "gpt2",
            "random GPT-2-style model: learned positions, 3 layers x 4 heads, d 64, byte tokenizer, no BOS",
            build_tiny_gpt2,
        ),
        TinyBuilder(
            "tiny-llama",
            "language",
            "llama",
            "random Llama-style model: RoPE, 3 layers x 4 heads / 2 KV heads, RMSNorm, byte tokenizer, BOS",
            build_tiny_llama,
        ),
        TinyBuilder(
            "tiny-vit",
            "vision",
            "vit",
            "random ViT image classifier: 32 px, patch 8 (4x4 grid + CLS), 3 layers x 4 heads, d 32, 5 labels",
            build_tiny_vit,
        ),
        TinyBuilder(
            "tiny-clip-vision",
            "vision",
            "clip",
            "random CLIP image tower: 32 px, patch 8 (4x4 grid + CLS), 2 layers x 4 heads, d 32, 16-d projection",
            build_tiny_clip_vision,
        ),
    ]
}
"""name -> builder; :mod:`probe.vlm` adds ``tiny-llava`` (it needs the LLaVA assembly)."""


def register(builder: TinyBuilder) -> TinyBuilder:
    """Add a tiny model built elsewhere (``tiny-llava``: by :mod:`probe.vlm`); names are unique."""
    if builder.name in TINY_BUILDERS:
        raise ValueError(f"a tiny model named {builder.name!r} is registered already")
    TINY_BUILDERS[builder.name] = builder
    return builder
