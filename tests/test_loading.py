from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import probe
from probe.errors import (
    CheckpointError,
    ConfigError,
    ContextTooLongError,
    DeviceUnavailableError,
    HeadlabError,
    ModelPathError,
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


# ------------------------------------------------------------------------------ faulty inputs


def _tiny_checkpoint(directory: Path) -> Path:
    model, tok = TINY_BUILDERS["tiny-llama"].build(0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory / "model.safetensors"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _bad_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"{garbage"  # the header's JSON starts at byte 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", [_truncate, _random_bytes, _bad_header], ids=["truncated", "random", "header"]
)
def test_a_damaged_safetensors_file_is_named_with_the_fix(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    damage(_tiny_checkpoint(tmp_path))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors is damaged or not a safetensors file.*save_pretrained"
    ):
        probe.load_model(str(tmp_path), device="cpu")


def test_a_checkpoint_without_a_tokenizer_says_how_to_save_one(tmp_path: Path) -> None:
    _tiny_checkpoint(tmp_path)
    for file in tmp_path.iterdir():
        if "token" in file.name or file.name.endswith(".jinja"):
            file.unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer.*tokenizer\.save_pretrained"):
        probe.load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 8, "cannot read .* as a GGUF model"),  # cut short
        (os.urandom(4096), "is not a GGUF file .*GGUF magic"),
        (b"", "is not a GGUF file \\(it is empty\\)"),
    ],
    ids=["truncated", "random", "empty"],
)
def test_a_damaged_gguf_file_is_a_headlab_error_and_leaves_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, phrase: str
) -> None:
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    with pytest.raises(CheckpointError, match=phrase):
        probe.load_model(str(gguf), device="cpu")
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:banana", "xla"])
def test_unsupported_devices_are_refused_with_the_option_to_use(device: str) -> None:
    with pytest.raises(DeviceUnavailableError, match="use --device cpu"):
        probe.load_model("tiny-gpt2", device=device)


@pytest.mark.parametrize("name", ["./nonexistent", "/x/y", "~/no/such/model", "missing.gguf", "no/such/dir"])
def test_a_missing_path_is_no_such_file_not_an_unknown_model(name: str) -> None:
    with pytest.raises(
        ModelPathError, match=f"no such file or directory: {re.escape(name)}; pass an existing"
    ):
        probe.load_model(name, device="cpu")
    with pytest.raises(HeadlabError, match="--allow-hub"):  # one slash, no dot: still a hub id
        probe.load_model("someone/some-model")


def test_a_weight_file_given_as_the_model_asks_for_its_directory(tmp_path: Path) -> None:
    weights = _tiny_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="pass the directory holding"):
        probe.load_model(str(weights), device="cpu")


def test_context_too_long_suggests_the_real_setting_and_a_value_that_fits(tiny_llama: LoadedModel) -> None:
    from analyses.census import CensusConfig, run_census

    with pytest.raises(ContextTooLongError) as err:
        run_census(tiny_llama, CensusConfig(seq_len=600), progress=False)
    message = str(err.value)
    assert "--seq-len" not in message
    found = re.search(r"--set seq_len=(\d+)", message)
    assert found is not None and int(found.group(1)) == tiny_llama.n_ctx - 1  # room for the BOS token
    small = CensusConfig(seq_len=int(found.group(1)), n_natural=2, n_repeated=2, repeat_len=4, n_examples=1)
    run_census(tiny_llama, small, progress=False)  # the advised value runs
    assert tiny_llama.encode(["x" * int(found.group(1))]).input_ids.shape[1] == tiny_llama.n_ctx


# --------------------------------------------------------------------------------- the source table


def test_the_source_table_tries_every_kind_of_name_in_the_documented_order() -> None:
    from probe import sources

    assert [(s.order, s.name) for s in sources.SOURCES] == [
        (100, "tiny"),
        (110, "tiny-vision"),
        (120, "tiny-vision-language"),
        (200, "assembly"),
        (300, "catalogue"),
        (310, "catalogue-vision"),
        (400, "gguf"),
        (510, "llava-directory"),
        (520, "vision-directory"),
        (530, "directory"),
        (700, "hub"),
    ]
    assert all(s.description for s in sources.SOURCES)


def test_a_source_is_found_by_its_order_and_a_second_of_the_same_name_is_refused(
    tiny_llama: LoadedModel,
) -> None:
    from probe import sources

    calls: list[str] = []

    def load(request: sources.ModelRequest) -> LoadedModel:
        calls.append(request.name)
        return tiny_llama

    extra = sources.ModelSource("test-alias", 50, "a test alias", lambda r: r.name == "alias", load)
    sources.register(extra)
    try:
        assert sources.SOURCES[0] is extra
        assert probe.load_model("alias", device="cpu") is tiny_llama and calls == ["alias"]
        assert probe.load_model("tiny-gpt2", device="cpu").name == "tiny-gpt2"  # later sources still match
        with pytest.raises(ValueError, match="registered already"):
            sources.register(extra)
    finally:
        sources.SOURCES.remove(extra)
    with pytest.raises(UnknownModelError):
        probe.load_model("alias", device="cpu")


def test_the_language_core_imports_nothing_of_the_image_packages() -> None:
    import ast

    root = Path(probe.__file__).parent
    core = ["model", "loading", "sources", "zoo", "tiny", "generation", "kernels", "checkpoints", "checksums"]
    for name in core:
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not {m for m in imported if m.startswith(("probe.vision", "probe.vlm"))}, name
        assert not (names & {"vision", "vlm"}), name


def test_the_sliding_layers_come_from_layer_types_or_a_config_wide_window() -> None:
    """Mistral 7B v0.1, Mixtral and Phi-3 mini 4K name a window and no layer_types: transformers
    slides every layer. A ``layer_types`` list is authoritative (Qwen2-MoE's window of 0 is none)."""
    from transformers import MistralConfig, Qwen2Config, Qwen2MoeConfig

    from probe.loading import attention_layout

    assert attention_layout(MistralConfig(sliding_window=4096, num_hidden_layers=3), 3) == (
        ["sliding_attention"] * 3,
        4096,
    )
    assert attention_layout(MistralConfig(sliding_window=None, num_hidden_layers=3), 3) == (None, None)
    qwen = Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    types, window = attention_layout(qwen, 3)
    assert window == 16 and types == ["full_attention", "sliding_attention", "sliding_attention"]
    moe = Qwen2MoeConfig(num_hidden_layers=2, sliding_window=0)
    assert attention_layout(moe, 2) == (["full_attention"] * 2, None)
