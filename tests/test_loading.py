from __future__ import annotations

import pytest
import torch

import probe
from probe.errors import (
    ConfigError,
    ContextTooLongError,
    DeviceUnavailableError,
    HeadlabError,
    UnknownModelError,
)
from probe.kernels import native_attention
from probe.loading import LoadedModel
from probe.tiny import TINY_BUILDERS


@pytest.mark.parametrize("name", list(TINY_BUILDERS))
def test_tiny_models_are_seeded(name: str) -> None:
    model_a, _ = TINY_BUILDERS[name].build(0)
    model_b, _ = TINY_BUILDERS[name].build(0)
    model_c, _ = TINY_BUILDERS[name].build(1)
    for (ka, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), ka
    assert any(not torch.equal(a, c) for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True))


def test_wrapper_exposes_the_architecture(tiny_llama: LoadedModel, tiny_gpt2: LoadedModel) -> None:
    assert (tiny_llama.n_layers, tiny_llama.n_heads, tiny_llama.n_kv_heads, tiny_llama.d_head) == (
        3,
        4,
        2,
        16,
    )
    assert tiny_llama.group_size == 2 and [tiny_llama.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert (tiny_gpt2.n_heads, tiny_gpt2.n_kv_heads, tiny_gpt2.group_size) == (4, 4, 1)
    assert tiny_gpt2.n_ctx == 256 and tiny_llama.n_ctx == 512
    assert tiny_llama.bridge is not None and tiny_llama.family == "llama" and tiny_gpt2.family == "gpt2"
    described = tiny_llama.describe()
    assert described["bos"]["prepend"] is True and len(described["weight_sha256"]) == 64


def test_bos_policy_follows_the_tokenizer_and_can_be_overridden(
    tiny_llama: LoadedModel, tiny_gpt2: LoadedModel
) -> None:
    assert tiny_llama.bos.prepend and not tiny_gpt2.bos.prepend
    assert tiny_llama.encode(["ab"]).input_ids[0].tolist()[0] == tiny_llama.bos.token_id
    assert tiny_gpt2.encode(["ab"]).input_ids[0].tolist()[0] != tiny_gpt2.bos.token_id
    forced = probe.load_model("tiny-gpt2", bos="always")
    assert forced.bos.prepend and forced.encode(["ab"]).input_ids[0, 0].item() == forced.bos.token_id
    with pytest.raises(ConfigError):
        probe.load_model("tiny-gpt2", bos="sometimes")  # type: ignore[arg-type]


def test_encode_left_pads_and_records_real_lengths(tiny_llama: LoadedModel) -> None:
    batch = tiny_llama.encode(["abc", "abcdef"])
    assert batch.input_ids.shape == (2, 7)  # BOS + 6 bytes
    assert batch.lengths.tolist() == [4, 7]
    assert batch.attention_mask.tolist()[0] == [0, 0, 0, 1, 1, 1, 1]
    assert batch.pad_offsets.tolist() == [3, 0]


def test_context_longer_than_the_model_allows_is_refused(tiny_gpt2: LoadedModel) -> None:
    with pytest.raises(ContextTooLongError, match="256"):
        tiny_gpt2.encode(["x" * 300])
    assert len(tiny_gpt2.encode(["x" * 300], max_tokens=256).input_ids[0]) == 256


def test_bad_names_devices_and_dtypes_give_clear_errors() -> None:
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        probe.load_model("smollm2-13")
    with pytest.raises(HeadlabError, match="--allow-hub"):
        probe.load_model("someone/some-model")
    with pytest.raises(ConfigError, match="float32"):
        probe.load_model("tiny-gpt2", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="--device cpu"):
            probe.load_model("tiny-gpt2", device="cuda")


def test_a_local_checkpoint_directory_loads(tmp_path, tiny_llama: LoadedModel) -> None:  # type: ignore[no-untyped-def]
    model, tok = TINY_BUILDERS["tiny-llama"].build(0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = probe.load_model(str(tmp_path))
    assert loaded.source == "local" and loaded.n_kv_heads == 2
    ids = tiny_llama.encode(["hello"]).input_ids
    with torch.no_grad():
        assert torch.allclose(loaded.bridge(ids), tiny_llama.bridge(ids), atol=1e-5)  # type: ignore[misc]


def test_native_attention_matches_the_bridge_and_restores_it(tiny_model: LoadedModel) -> None:
    ids = tiny_model.encode(["the quick brown fox"]).input_ids
    fired: list[int] = []
    handle = tiny_model.bridge.blocks[0].attn.hook_pattern.add_hook(lambda x, hook: fired.append(1))  # type: ignore[union-attr]
    try:
        with torch.no_grad():
            eager = tiny_model.bridge(ids)  # type: ignore[misc]
            with native_attention(tiny_model) as native:
                fast = native(input_ids=ids).logits
            assert len(fired) == 1, "the bridge's pattern hook must not run inside native_attention"
            with pytest.raises(RuntimeError), native_attention(tiny_model):
                raise RuntimeError("boom")
            again = tiny_model.bridge(ids)  # type: ignore[misc]
    finally:
        tiny_model.bridge.blocks[0].attn.hook_pattern.remove_hooks()  # type: ignore[union-attr]
        del handle
    assert len(fired) == 2
    assert torch.allclose(eager, fast, atol=1e-4)
    assert torch.equal(eager, again)
    shared = {p.data_ptr() for p in tiny_model.hf_model.parameters()}
    assert all(p.data_ptr() in shared for p in tiny_model.native_model.parameters()), (
        "weights must not be copied"
    )  # type: ignore[union-attr]


def test_tiny_words_become_single_tokens_with_and_without_a_leading_space() -> None:
    model = probe.load_model("tiny-gpt2", tiny_words=["Mary", "teal"])
    tok = model.tokenizer
    for text in (" Mary", "Mary", " teal"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == text
    assert len(tok(" Marx", add_special_tokens=False)["input_ids"]) > 1  # other text stays bytes
    plain = probe.load_model("tiny-gpt2")
    assert model.hf_model.config.vocab_size > plain.hf_model.config.vocab_size
