"""A model spread by a device map: every hook fires, and every capture, decode, intervention and
analysis gives the single-device numbers.

Without several GPUs, the tiny models are spread over the CPU and the disk: accelerate offloads the
layers mapped to ``disk``, whose weights sit on the meta device between calls and are brought in by
its hooks at run time. That breaks every piece of code that reads weights or devices directly, as
several GPUs do; the per-device logic (moment stacks over several devices, the memory plan of each
device) is checked with given devices and capacities. See docs/multi-gpu.md.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import analyses.vhd as vh
import probe
import probe.capture as capture_module
from analyses.base import config_from_overrides
from analyses.registry import ANALYSES
from analyses.support import SCORES, SETTINGS, TASK_WORDS, language_analyses
from probe import devicemap, memory, vlm
from probe.capture import capture
from probe.checkpoints import quiet_transformers
from probe.decode import greedy_decode
from probe.errors import DeviceMapError
from probe.hooks import attn_hook, hooks
from probe.interventions import cache_z, freeze_heads, scale_heads, uniform_attention
from probe.loading import LoadedModel
from probe.memory import MemoryBudgetError, estimate_capture, estimate_decode, plan_batch_size
from probe.moments import MomentStack, attention_moments
from probe.reducers import ColumnImportance, DiagonalScore, KeepPatterns, MeanDistance, RowEntropy
from tests.test_cli import main
from tests.test_vhd import SMALL

LLAMA_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
WORDS = list(TASK_WORDS)  # the circuit tasks need their words whole


@pytest.fixture(scope="module")
def pair() -> tuple[LoadedModel, LoadedModel]:
    """tiny-llama on one device, and the same weights with layer 1 offloaded to the disk."""
    with quiet_transformers():
        one = probe.load_model("tiny-llama", device="cpu", tiny_words=WORDS)
        split = probe.load_model("tiny-llama", device_map=json.dumps(LLAMA_MAP), tiny_words=WORDS)
    return one, split


def _offload_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("headlab-offload-*")}


# ------------------------------------------------------------------------------------ the load


def test_a_split_model_keeps_an_offloaded_layer_and_records_its_map(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    one, split = pair
    assert split.device_map == LLAMA_MAP and one.device_map is None
    assert split.describe()["device_map"] == LLAMA_MAP and "device_map" not in one.describe()
    native = dict(split.native_model.named_parameters())  # type: ignore[union-attr]
    assert native["model.layers.1.self_attn.q_proj.weight"].is_meta  # offloaded: weights come at run time
    assert not native["model.layers.0.self_attn.q_proj.weight"].is_meta
    assert split.weight_sha256 == one.weight_sha256  # the offloaded weights are hashed too
    assert split.layer_devices() == [torch.device("cpu")] * 3 and split.device == torch.device("cpu")


def test_hooks_fire_on_every_layer_wherever_it_lives(pair: tuple[LoadedModel, LoadedModel]) -> None:
    one = pair[0]
    ids = one.encode(["the cat sat on the mat"]).input_ids
    seen: list[dict[int, torch.Tensor]] = [{}, {}]
    for model, store in zip(pair, seen, strict=True):

        def keep(layer: int, store: dict[int, torch.Tensor] = store) -> object:
            def hook(pattern: torch.Tensor, hook: object) -> None:
                store[layer] = pattern.detach().clone()

            return hook

        with hooks(model, [(attn_hook(layer, "pattern"), keep(layer)) for layer in range(3)]) as h:
            model.bridge(ids)  # type: ignore[misc]
            h.check_fired()
    assert sorted(seen[1]) == [0, 1, 2]
    for layer in range(3):
        assert torch.equal(seen[0][layer], seen[1][layer])


# -------------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("mode", ["eager", "recompute"])
def test_captures_equal_the_single_device_ones(pair: tuple[LoadedModel, LoadedModel], mode: str) -> None:
    rows = [list(range(5, 25)), list(range(30, 42)), list(range(50, 58))]
    results = []
    for model in pair:
        reducers = [RowEntropy(), MeanDistance(), ColumnImportance(), DiagonalScore(1), KeepPatterns(2)]
        stats = capture(model, rows, reducers, mode=mode, batch_size=2, progress=False)  # type: ignore[arg-type]
        assert all(n > 0 for n in stats.rows_seen.values())
        results.append([r.result() for r in reducers])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-6, equal_nan=True)


def test_a_moment_stack_over_several_devices_gathers_every_layer_in_order() -> None:
    """Layers on two devices (``cpu`` and ``cpu:0`` compare unequal, so the stack keeps two parts,
    here interleaved): each layer is written on its own device and the stacked moments come back in
    layer order, equal to a one-device stack's."""
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8)
    pads = torch.tensor([0, 2])
    devices = [torch.device("cpu"), torch.device("cpu", 0), torch.device("cpu")]
    split = MomentStack(3, 2, 4, 9, (1,), torch.device("cpu"), layer_devices=devices)
    one = MomentStack(3, 2, 4, 9, (1,), torch.device("cpu"))
    assert len(split.devices) == 2 and len(one.devices) == 1
    for layer in range(3):
        scaled = q * (layer + 1)  # a different layer each time
        for stack in (split, one):
            attention_moments(
                scaled, k, pad_offsets=pads, diag_offsets=(1,), use_triton=False, out=(stack, layer)
            )
    a, b = split.stacked(), one.stacked()
    for name in ("entropy", "mean_key", "colsum"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.diag(1), b.diag(1)) and not torch.equal(a.entropy[0], a.entropy[1])
    with pytest.raises(ValueError, match="layer devices"):
        MomentStack(3, 2, 4, 9, (1,), torch.device("cpu"), layer_devices=devices[:2])


def test_a_recompute_capture_over_several_layer_devices_equals_one_device(
    pair: tuple[LoadedModel, LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    one, _ = pair
    rows = [list(range(5, 25)), list(range(30, 42))]
    plain = [RowEntropy(), ColumnImportance(), DiagonalScore(2)]
    capture(one, rows, plain, mode="recompute", progress=False)
    spread = [torch.device("cpu"), torch.device("cpu", 0), torch.device("cpu", 0)]
    monkeypatch.setattr(LoadedModel, "layer_devices", lambda self: spread)
    made: list[MomentStack] = []

    class Recorded(MomentStack):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(capture_module, "MomentStack", Recorded)
    parts = [RowEntropy(), ColumnImportance(), DiagonalScore(2)]
    capture(one, rows, parts, mode="recompute", progress=False)
    assert made and all(len(stack.devices) == 2 for stack in made)  # the capture used the layer devices
    for a, b in zip(plain, parts, strict=True):
        assert torch.allclose(a.result(), b.result(), atol=1e-6, equal_nan=True)


# --------------------------------------------------------------------------- decoding, interventions


def test_generation_and_decode_steps_equal_the_single_device_ones(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    one, split = pair
    assert torch.equal(
        one.generate(["hello there"], max_new_tokens=6), split.generate(["hello there"], max_new_tokens=6)
    )
    prompt = one.encode(["a b c d e f g h i j"]).input_ids[0].tolist()
    for heads in ((), [(1, 0), (2, 3)]):
        a = greedy_decode(one, prompt, 5, uniform_heads=heads, stop_ids=())
        b = greedy_decode(split, prompt, 5, uniform_heads=heads, stop_ids=())
        assert a.tokens == b.tokens and np.array_equal(a.argmax, b.argmax)
        assert np.allclose(a.max_weight, b.max_weight, atol=1e-6)


def test_interventions_on_an_offloaded_layer_equal_the_single_device_ones(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    one, _ = pair
    clean = one.encode(["the cat sat on the mat"]).input_ids
    other = clean.flip(-1)  # another input of the same length
    out = []
    for model in pair:
        z = cache_z(model, other)
        assert z[1].device == torch.device("cpu")  # the offloaded layer's activations are real tensors
        with scale_heads(model, {(1, 0): 0.0}), uniform_attention(model, [(1, 2)]):
            scaled = model.bridge(clean)  # type: ignore[misc]
        with freeze_heads(model, [(1, 1), (2, 0)], z):
            frozen = model.bridge(clean)  # type: ignore[misc]
        out.append((scaled, frozen, model.bridge(clean)))  # type: ignore[misc]
    for a, b in zip(*out, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(out[0][0], out[0][2], atol=1e-4)  # the interventions changed something


# ------------------------------------------------------------------------------------- analyses


def test_every_language_analysis_gives_the_single_device_scores(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    """Run as the support matrix runs them (its small settings), on both models: the same head scores
    (the circuit analyses read W_O directly, which an offloaded layer only has inside its forward)."""
    for name in language_analyses():
        entry = ANALYSES[name]
        scores = []
        for model in pair:
            torch.manual_seed(0)
            config = config_from_overrides(entry.config_cls, SETTINGS[name])
            with quiet_transformers():
                scores.append(SCORES[name][1](entry.run(model, config)))
        assert scores[0].shape == scores[1].shape and scores[0].shape[-2:] == (3, 4), name
        assert np.allclose(scores[0], scores[1], atol=1e-5, equal_nan=True), name


# ------------------------------------------------------------------ checkpoints, wrap, vision-language


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from probe.tiny import TINY_BUILDERS

    model, tokenizer = TINY_BUILDERS["tiny-llama"].build(3, ())
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-llama-3"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    yield directory


def test_a_checkpoint_directory_loads_spread_by_a_map_file_and_by_auto(
    checkpoint: Path, tmp_path: Path
) -> None:
    """A directory goes through from_pretrained's device map (the map resolved on the meta device
    first); ``auto`` with a CPU cap spills layers to the disk, and the captures agree."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    # a cap of two thirds of the model: accelerate keeps what fits on the CPU, the rest goes to disk
    cap = sum(p.numel() * 4 for p in skeleton.parameters()) * 2 // 3
    balanced = devicemap.resolve_device_map("auto", skeleton, dtype=torch.float32, max_memory={"cpu": cap})
    assert balanced is not None and balanced["model.layers.0"] == "cpu" and balanced["lm_head"] == "disk"
    file = tmp_path / "map.json"
    file.write_text(json.dumps(balanced))
    before = _offload_dirs()
    with quiet_transformers():
        one = probe.load_model(str(checkpoint), device="cpu")
        split = probe.load_model(str(checkpoint), device_map=str(file))
    assert split.device_map == balanced and split.weight_sha256 == one.weight_sha256
    assert any(p.is_meta for p in split.native_model.parameters())  # type: ignore[union-attr]
    assert len(_offload_dirs() - before) == 1  # the offload folder, removed with the model
    rows = [list(range(3, 20))]
    got = []
    for model in (one, split):
        r = RowEntropy()
        capture(model, rows, [r], mode="recompute", progress=False)
        got.append(r.result())
    assert torch.allclose(got[0], got[1], atol=1e-6)


def test_a_damaged_checkpoint_with_a_disk_map_leaves_no_offload_folder(
    checkpoint: Path, tmp_path: Path
) -> None:
    import shutil

    from probe.errors import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = _offload_dirs()
    with pytest.raises(CheckpointError, match="damaged"):
        probe.load_model(str(broken), device_map=LLAMA_MAP)
    assert _offload_dirs() == before


def test_wrap_keeps_a_dispatched_model_where_it_lies() -> None:
    from accelerate import dispatch_model

    from probe.tiny import TINY_BUILDERS

    built, tokenizer = TINY_BUILDERS["tiny-llama"].build(5, ())
    plain = probe.wrap(built, tokenizer, name="tiny")
    with tempfile.TemporaryDirectory() as folder:
        model, _ = TINY_BUILDERS["tiny-llama"].build(5, ())
        dispatched = dispatch_model(model, device_map=LLAMA_MAP, offload_dir=folder)
        with pytest.raises(DeviceMapError, match="leave device out"):
            probe.wrap(dispatched, tokenizer, device="cpu")
        wrapped = probe.wrap(dispatched, tokenizer, name="tiny")
        assert wrapped.device_map == LLAMA_MAP and wrapped.weight_sha256 == plain.weight_sha256
        ids = plain.encode(["one two three"]).input_ids
        assert torch.allclose(wrapped.bridge(ids), plain.bridge(ids), atol=1e-6)  # type: ignore[misc]
        assert next(dispatched.model.layers[1].parameters()).is_meta  # the user's model: still offloaded


def test_a_vision_language_model_spread_over_cpu_and_disk_answers_as_on_one_device() -> None:
    """tiny-llava with its projector and a language layer on the disk: the same answers, head outputs
    and VHD scores as on one device."""
    vlm_map = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "disk",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.layers.0": "cpu",
        "model.language_model.layers.1": "disk",
        "model.language_model.layers.2": "cpu",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    with quiet_transformers():
        one = probe.load_model("tiny-llava", device="cpu")
        split = probe.load_model("tiny-llava", device_map=vlm_map)
    assert split.kind == "vision-language" and split.device_map == vlm_map
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    answers = []
    for model in (one, split):
        with vlm.capture_head_outputs(model, layers=[1]) as cap:
            answers.append(vlm.generate(model, images, "describe", max_new_tokens=4))
        answers.append(cap.outputs[1][0])
    assert answers[0] == answers[2]
    assert torch.allclose(answers[1], answers[3], atol=1e-5)
    runs = [vh.run_vhd(model, SMALL) for model in (one, split)]  # the vision-language analysis
    assert runs[0].tables["captions"]["text"].tolist() == runs[1].tables["captions"]["text"].tolist()
    assert np.allclose(runs[0].arrays["vhd"], runs[1].arrays["vhd"], atol=1e-5, equal_nan=True)


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ('{"model.embed_tokens": 0', "not valid JSON"),
        ("fastest", "neither auto, balanced"),
        ({**LLAMA_MAP, "model.layers.7": "cpu"}, "'model.layers.7', which LlamaForCausalLM does not have"),
        ({k: v for k, v in LLAMA_MAP.items() if k != "model.layers.2"}, "no device for model.layers.2"),
        ({**LLAMA_MAP, "model.layers.1": "tpu"}, "'tpu' is not a device"),
        ({**LLAMA_MAP, "model.layers.1": "meta"}, "meta device holds no weights"),
        ({**LLAMA_MAP, "model.layers.1": "cuda:3"}, "names GPU 3 but"),
        ({**LLAMA_MAP, "model.layers.1.mlp": "cpu"}, "map each module once"),
    ],
)
def test_bad_maps_are_one_line_errors_before_anything_is_written(spec: object, words: str) -> None:
    before = _offload_dirs()
    with pytest.raises(DeviceMapError) as err:
        probe.load_model("tiny-llama", device_map=spec)  # type: ignore[arg-type]
    assert words in str(err.value) and "\n" not in str(err.value)
    assert _offload_dirs() == before


def test_what_a_device_map_cannot_place_is_refused_with_why() -> None:
    from probe.tiny import TINY_BUILDERS

    gpt2, _ = TINY_BUILDERS["tiny-gpt2"].build(0, ())
    names = ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h", "transformer.ln_f"]
    split_tied = {**dict.fromkeys(names, "cpu"), "lm_head": "disk"}
    with pytest.raises(DeviceMapError, match="splits the tied weights"):
        devicemap.check_device_map(gpt2, split_tied)
    mixed = {**dict.fromkeys(names, "cuda:0"), "lm_head": "cpu"}
    with pytest.raises(DeviceMapError, match="mixes GPUs with cpu/disk offload"):
        devicemap.check_device_map(gpt2, mixed)
    with pytest.raises(DeviceMapError, match="run on one device; leave out the device map"):
        probe.load_model("tiny-vit", device_map="auto")
    with pytest.raises(DeviceMapError, match="pass one of them"):
        probe.load_model("tiny-llama", device="cpu", device_map=LLAMA_MAP)


def test_device_names_and_where_modules_run() -> None:
    assert devicemap.normalise_device(1, check_present=False) == "cuda:1"
    assert devicemap.normalise_device("CUDA", check_present=False) == "cuda:0"
    assert devicemap.parse_device_map(" auto ") == "auto" and devicemap.parse_device_map("") is None
    gpus = {
        "model.embed_tokens": "cuda:0",
        "model.layers.0": "cuda:0",
        "model.layers.1": "cuda:1",
        "lm_head": "cuda:1",
    }
    assert devicemap.device_for("model.layers.1.self_attn.q_proj", gpus) == "cuda:1"
    assert devicemap.device_for("model.layers.10", gpus) is None  # a prefix of the name, not of the module
    assert devicemap.execution_devices(gpus) == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert devicemap.execution_device("disk", {**gpus, "model.norm": "disk"}) == torch.device("cuda:0")
    assert devicemap.spread(gpus) and not devicemap.spread({"": "cpu"})


# --------------------------------------------------------------------------------- memory plan

GPU_MAP = {
    "model.embed_tokens": "cuda:0",
    "model.layers.0": "cuda:0",
    "model.layers.1": "cuda:1",
    "model.layers.2": "cuda:1",
    "model.norm": "cuda:1",
    "model.rotary_emb": "cuda:1",
    "lm_head": "cuda:1",
}


def test_the_plan_counts_every_device_of_a_given_map(tiny_llama: LoadedModel) -> None:
    """Two GPUs: each holds the weights the map gives it and one layer phase at a time; the second
    also the logits; the first, where inputs go, the reducers and the moments gathered from both."""
    reducers = [RowEntropy(), ColumnImportance()]
    one = estimate_capture(tiny_llama, batch_size=2, seq_len=64, reducers=reducers, mode="recompute")
    est = estimate_capture(
        tiny_llama, batch_size=2, seq_len=64, reducers=reducers, mode="recompute", device_map=GPU_MAP
    )
    shares = {p.device: p for p in est.devices}
    assert (
        set(shares) == {"cuda:0", "cuda:1"} and shares["cuda:0"].layers == 1 and shares["cuda:1"].layers == 2
    )
    native = tiny_llama.native_model
    assert native is not None
    emb = native.get_input_embeddings().weight.numel() * 4  # type: ignore[operator]
    layer = sum(p.numel() * 4 for p in native.model.layers[0].parameters())  # type: ignore[union-attr]
    assert shares["cuda:0"].weights == emb + layer
    assert shares["cuda:0"].weights + shares["cuda:1"].weights == sum(
        t.numel() * 4 for t in [*native.parameters(), *native.buffers()]
    )
    stack = MomentStack.bytes_needed(3, 2, 4, 64, 0)
    state = sum(r.state_bytes(2, 64, 3, 4) for r in reducers)
    phase = one.total - one.weights - one.reducers  # the larger of a layer phase and the logits
    assert shares["cuda:1"].transient == 2 * stack // 3 + phase  # its layers' moments; layers and logits
    layer_phase = shares["cuda:0"].transient - (state + stack // 3 + stack)  # + the moments gathered
    assert 0 < layer_phase <= phase
    top = max(est.devices, key=lambda p: p.total)
    assert est.total == top.total and est.device == top.device and "over 2 devices" in est.describe()
    dec = estimate_decode(tiny_llama, prompt_len=100, max_new_tokens=10, device_map=GPU_MAP)
    caches = {p.device: p.total - p.weights for p in dec.devices}
    per_layer = 2 * 2 * 110 * 16 * 4  # K and V, 2 KV heads, 110 positions, d_head 16, float32
    assert caches["cuda:1"] - caches["cuda:0"] >= per_layer  # one more layer's cache on cuda:1


def test_the_plan_refuses_when_one_device_would_not_fit(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    spread = dataclasses.replace(tiny_llama, device_map=GPU_MAP)
    reducers = [RowEntropy()]
    est = estimate_capture(spread, batch_size=1, seq_len=64, reducers=reducers, mode="eager")
    need = {p.device: p.transient for p in est.devices}
    capacity = {"cuda:0": 10 * need["cuda:0"], "cuda:1": 10 * need["cuda:1"]}
    monkeypatch.setattr(memory, "available_memory", lambda device: capacity[str(device)])
    assert plan_batch_size(spread, n_sequences=4, seq_len=64, reducers=reducers, requested_batch=4) >= 1
    capacity["cuda:1"] = need["cuda:1"] // 2  # the second GPU cannot take even one sequence
    with pytest.raises(MemoryBudgetError) as err:
        plan_batch_size(spread, n_sequences=4, seq_len=64, reducers=reducers, requested_batch=4)
    message = str(err.value)
    assert (
        "available on cuda:1" in message and "more GPUs in the device map" in message and "\n" not in message
    )
    capacity["cuda:1"] = 1
    with pytest.raises(MemoryBudgetError, match="available on cuda:1"):
        memory.check_decode_fits(spread, prompt_len=60, max_new_tokens=4)


# ---------------------------------------------------------------------------------------- CLI


def test_the_command_line_takes_a_device_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = main(
        monkeypatch, capsys, "sanity", "--model", "tiny-llama", "--device-map", json.dumps(LLAMA_MAP)
    )
    assert code == 0 and "device map: 7 entries; cpu: 3 layers" in out, err
    args = ("run", "census", "--model", "tiny-llama", "--root", str(tmp_path / "runs"))
    small = ("--set", "n_natural=2", "--set", "seq_len=24", "--set", "n_repeated=2", "--set", "repeat_len=8")
    code, out, err = main(monkeypatch, capsys, *args, *small, "--device-map", json.dumps(LLAMA_MAP))
    assert code == 0, err
    manifest = json.loads(next((tmp_path / "runs").glob("*/manifest.json")).read_text())
    assert manifest["model"]["device_map"] == LLAMA_MAP
    code, _, err = main(monkeypatch, capsys, *args, "--device-map", '{"model.layers.9": "cpu"}')
    assert code == 2 and "model.layers.9" in err and err.strip().count("\n") == 0


def test_the_main_job_and_the_atlas_take_a_device_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`headlab demo --device-map` spreads MODEL (the analyses on it record the map); `headlab atlas
    --device-map` without --run-missing has no model to place and says so."""
    monkeypatch.chdir(tmp_path)
    runs = str(tmp_path / "runs")
    code, out, err = main(
        monkeypatch,
        capsys,
        *(
            "demo",
            "--only",
            "sinks",
            "--model",
            "tiny-llama",
            "--root",
            runs,
            "--reports",
            str(tmp_path / "r"),
        ),
        *("--device-map", json.dumps(LLAMA_MAP)),
    )
    assert code == 0 and "report written" in out, err
    manifest = json.loads(next((tmp_path / "runs").glob("*/manifest.json")).read_text())
    assert manifest["analysis"] == "sinks" and manifest["model"]["device_map"] == LLAMA_MAP
    code, _, err = main(
        monkeypatch, capsys, "atlas", "--model", "tiny-llama", "--root", runs, "--device-map", "auto"
    )
    assert code == 2 and "give it with --run-missing" in err and err.strip().count("\n") == 0
