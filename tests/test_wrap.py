"""probe.wrap: a transformers model already in memory becomes the same LoadedModel as its checkpoint.

Each family's tiny checkpoint (probe.families) is loaded twice: by probe.load_model(directory) and
by AutoModelForCausalLM.from_pretrained(directory), the latter wrapped. Both must give the same
eager patterns, greedy tokens and describe() (but source, path and weight_sha256), and the user's
model must be left as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import probe
from probe.capture import capture
from probe.checkpoints import quiet_transformers
from probe.errors import ConfigError
from probe.families import FAMILIES, save_checkpoint
from probe.support import NEW_TOKENS, PROMPT, _KeepRows, _Reference, check_generate, check_patterns
from probe.tiny import byte_tokenizer
from probe.wrap import memory_sha256

WRAP_FAMILIES = ["llama", "gpt2", "gemma3_text", "qwen2_moe", "bloom"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wrap")


def _user_model(directory: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(str(directory)), AutoTokenizer.from_pretrained(
            str(directory)
        )


def _state(model: Any) -> dict[str, Any]:
    """Everything of the user's model that wrap and a capture must leave as it was."""
    ids = torch.tensor([[5, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.clone()
    return {
        "attn": model.config._attn_implementation,
        "training": [m.training for m in model.modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "devices": {n: p.device for n, p in model.named_parameters()},
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: id(p) for n, p in model.named_parameters()},
        "logits": logits,
    }


def _rows(model: probe.LoadedModel) -> dict[int, torch.Tensor]:
    keep = _KeepRows()
    ids = [int(t) for t in model.tokenizer(PROMPT, add_special_tokens=False).input_ids]
    capture(model, [ids], [keep], mode="eager", batch_size=1, progress=False, plan_memory=False)
    return keep.rows


@pytest.mark.parametrize("family", WRAP_FAMILIES)
def test_wrap_matches_load_model(family: str, root: Path) -> None:
    with quiet_transformers():
        directory = save_checkpoint(family, root / family)
    user, tok = _user_model(directory)
    user.train()  # a user mid-experiment: train mode, one frozen parameter
    frozen = next(iter(user.parameters()))
    frozen.requires_grad_(False)
    before = _state(user)
    pad_before, side_before = tok.pad_token, tok.padding_side

    wrapped = probe.wrap(user, tok)
    with quiet_transformers():
        loaded = probe.load_model(str(directory), device="cpu")

    assert wrapped.source == "memory" and wrapped.path is None
    ours, theirs = wrapped.describe(), loaded.describe()
    for key in ("source", "path", "weight_sha256"):
        ours.pop(key), theirs.pop(key)
    assert ours == theirs

    rows_w, rows_l = _rows(wrapped), _rows(loaded)
    assert sorted(rows_w) == list(range(loaded.n_layers)) == sorted(rows_l)
    for layer in rows_l:
        assert torch.allclose(rows_w[layer], rows_l[layer], atol=1e-6, rtol=0), (family, layer)

    out_w = wrapped.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    out_l = loaded.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert out_w.shape[1] == out_l.shape[1] and torch.equal(out_w, out_l)
    ref = _Reference(directory)  # transformers' own models of the checkpoint, as the matrix checks
    assert check_patterns(wrapped, ref).status == "pass"
    assert check_generate(wrapped, ref, use_cache=True).status == "pass"

    # no weight copied: headlab's trees run on the user's parameter storage
    user_ptrs = {p.data_ptr() for p in user.parameters()}
    assert wrapped.native_model is not None
    assert {p.data_ptr() for p in wrapped.native_model.parameters()} <= user_ptrs

    after = _state(user)
    logits_before, logits_after = before.pop("logits"), after.pop("logits")
    assert after == before
    assert torch.equal(logits_after, logits_before)
    assert (tok.pad_token, tok.padding_side) == (pad_before, side_before)


def test_weight_sha256(root: Path) -> None:
    with quiet_transformers():
        directory = save_checkpoint("llama", root / "sha")
    user, tok = _user_model(directory)
    first = probe.wrap(user, tok).weight_sha256
    assert probe.wrap(user, tok).weight_sha256 == first == memory_sha256(user)
    again, _ = _user_model(directory)  # a second copy of the same weights: same sha
    assert memory_sha256(again) == first
    with quiet_transformers():
        assert probe.load_model(str(directory), device="cpu").weight_sha256 != first  # a file's sha
    with torch.no_grad():
        weight = user.lm_head.weight
        weight[3, 7] += 1e-3
        changed = memory_sha256(user)
        weight[3, 7] -= 1e-3
    assert changed != first
    # another dtype copies into headlab's tree only; the sha describes the weights as passed
    half = probe.wrap(user, tok, dtype="bfloat16", name="mine")
    assert half.dtype == torch.bfloat16 and half.name == "mine" and half.weight_sha256 == first
    assert all(p.dtype == torch.float32 for p in user.parameters())
    # a digest the caller already has is taken as given (no hashing); a malformed one is refused
    assert probe.wrap(user, tok, weight_sha256=first).weight_sha256 == first
    with pytest.raises(ConfigError, match="64 lowercase hex digits"):
        probe.wrap(user, tok, weight_sha256="seed-0")


def _refusal(model: Any, tokenizer: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        probe.wrap(model, tokenizer)
    assert "\n" not in str(err.value)


def test_refusals() -> None:
    from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaModel, ViTConfig, ViTModel

    tok = byte_tokenizer(prepend_bos=True)
    small: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    _refusal(BertModel(BertConfig(vocab_size=259, **small)), tok, "not a causal language model")
    _refusal(ViTModel(ViTConfig(image_size=32, patch_size=16, **small)), tok, "vision loaders")
    llama_cfg = FAMILIES["llama"].config()
    _refusal(LlamaModel(llama_cfg), tok, "ForCausalLM")
    _refusal("gpt2", tok, "got str")

    smaller = FAMILIES["llama"].config()
    smaller.vocab_size = 200
    _refusal(AutoModelForCausalLM.from_config(smaller), tok, "259 tokens but the model's embedding has 200")

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(llama_cfg)
    _refusal(meta, tok, "meta device")
