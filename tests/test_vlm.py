"""Vision-language models: LLaVA assembly, loading, prompts, generation, hooks, projector training.

Checked on the random ``tiny-llava`` (16 image tokens, 3 Llama layers): the assembly copies its parts
exactly (a text-only LLaVA forward equals the language model's), image tokens are expanded and
replaced by the projected features, the bridge and the native model agree, training lowers the loss
and leaves every frozen weight untouched, and a projector file round-trips.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import plotly.io
import pytest
import torch

import probe
from analyses.tasks import scene_captions as scc
from dashboard.training import write_loss_figure
from probe import assemblies, vlm, vlm_train, zoo
from probe.errors import ConfigError, HeadlabError, UnknownModelError
from probe.loading import LoadedModel
from probe.tiny import TINY_BUILDERS, build_tiny_clip_vision, build_tiny_llama

_TINY: dict[str, LoadedModel] = {}
DATA = scc.SceneCaptionConfig(n_train=12, n_eval=2, image_size=64, examples_per_scene=1, p_question=0.5)


def tiny() -> LoadedModel:
    """The shared tiny LLaVA (tests must not change it; use fresh() for that)."""
    if "llava" not in _TINY:
        _TINY["llava"] = probe.load_model("tiny-llava", device="cpu")
    return _TINY["llava"]


def fresh() -> LoadedModel:
    return copy.deepcopy(tiny())


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 40, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def _private_cache(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("real") is None:  # the real models stay in the shared cache
        monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))  # feature caches stay in the test


# ------------------------------------------------------------------------------------------ assembly


def test_tiny_llava_is_a_vision_language_model_with_the_language_models_heads() -> None:
    model = tiny()
    assert model.kind == "vision-language" and model.family == "llava" and model.bridge is not None
    assert (model.n_layers, model.n_heads, model.n_kv_heads, model.d_head) == (3, 4, 2, 16)
    assert model.extra["image_seq_length"] == 16 and model.image is not None and model.image.n_patches == 16
    assert model.tokenizer.convert_tokens_to_ids("<image>") == model.extra["image_token_id"] == 259
    assert getattr(model.hf_model, "config").text_config.vocab_size == len(model.tokenizer) == 260  # noqa: B009
    assert model.describe()["kind"] == "vision-language"
    assert "scene-llava" in [r["name"] for r in zoo.catalogue_rows()]


def test_booting_the_bridge_never_tries_to_install_a_processor(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformer_lens.model_bridge.sources.transformers import helpers

    calls: list[int] = []  # TransformerLens pip-installs torchvision when a LLaVA processor fails to load

    def would_install() -> bool:
        calls.append(1)
        return False

    monkeypatch.setattr(helpers, "_ensure_torchvision", would_install)
    model = probe.load_model("tiny-llava", device="cpu", seed=3)
    assert calls == [] and model.bridge is not None and getattr(model.bridge, "processor", None) is None


def test_the_assembly_copies_its_parts_exactly() -> None:
    vision: Any = build_tiny_clip_vision(0)[0]
    built: tuple[Any, Any] = build_tiny_llama(0)
    language, tok = built
    llava, llava_tok = vlm.assemble(vision, language, tok, seed=0)
    for name, tensor in vision.vision_model.state_dict().items():
        assert torch.equal(llava.model.vision_tower.state_dict()[name], tensor), name
    embed = llava.model.language_model.embed_tokens.weight
    assert torch.equal(embed[:259], language.model.embed_tokens.weight)
    assert torch.allclose(embed[259], language.model.embed_tokens.weight.mean(0))
    assert len(tok) == 259 and len(llava_tok) == 260, "the caller's tokenizer is left alone"
    ids = torch.tensor([tok("a text-only prompt", add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        reference = language(input_ids=ids).logits
        ours = llava(input_ids=ids).logits
    assert torch.allclose(ours[..., :259], reference, atol=1e-5), (
        "without an image LLaVA is the language model"
    )


def test_image_tokens_are_expanded_and_replaced_by_projected_features() -> None:
    model = tiny()
    batch = vlm.encode_prompts(model, ["Describe the image.", "Is there a star in the image?"])
    image_id = model.extra["image_token_id"]
    assert (batch.input_ids == image_id).sum(1).tolist() == [16, 16]
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[1].all(), "left-padded"
    text_only = vlm.encode_prompts(model, ["Describe the image."], image=False)
    assert (text_only.input_ids == image_id).sum() == 0
    assert "<image>" in vlm.format_prompt(model, "Hi") and "<image>" not in vlm.format_prompt(
        model, "Hi", image=False
    )
    pixels = model.preprocess(images(2))
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        native = model.native_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,  # type: ignore[misc]
            pixel_values=pixels,
        ).logits
        bridged = model.bridge(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels)  # type: ignore[misc]
        features = vlm.image_features(model, pixels)
        projected = vlm.projector_module(model).forward(features)
        native_model: Any = model.native_model
        reference = native_model.model.get_image_features(pixel_values=pixels).pooler_output
    assert native.shape == (2, batch.input_ids.shape[1], 260)
    assert torch.allclose(native, bridged, atol=1e-4), "the bridge runs the same LLaVA"
    assert features.shape == (2, 16, 32)  # CLS dropped, layer -2 of the tower
    assert torch.allclose(projected, torch.stack(list(reference)), atol=1e-5)


def test_head_outputs_from_torch_hooks_equal_the_bridges_hook_z() -> None:
    model = tiny()
    batch = vlm.encode_prompts(model, ["Describe the image."])
    pixels = model.preprocess(images(1))
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model.bridge.run_with_hooks(  # type: ignore[union-attr]
            batch.input_ids,
            pixel_values=pixels,
            fwd_hooks=[("blocks.2.attn.hook_z", lambda z, hook: seen.update(z=z.detach().clone()))],
        )
        with vlm.capture_head_outputs(model, layers=[2]) as cap:
            model.native_model(input_ids=batch.input_ids, pixel_values=pixels)  # type: ignore[misc]
    cap.check_fired()
    assert seen["z"].shape == (1, batch.input_ids.shape[1], 4, 16)
    assert torch.allclose(cap.outputs[2][0], seen["z"], atol=1e-5)
    with vlm.capture_head_outputs(model, layers=[0, 1]) as cap:
        vlm.generate(model, images(1), "Describe the image.", max_new_tokens=3)
    assert [tuple(z.shape[1:]) for z in cap.outputs[0]][1:] == [(1, 4, 16)] * (len(cap.outputs[0]) - 1)
    assert all(not m._forward_pre_hooks for m in model.native_model.modules()), "hooks removed"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="layers"), vlm.capture_head_outputs(model, layers=[7]):
        pass


def test_batched_generation_and_yes_no_answers_match_one_at_a_time() -> None:
    model = tiny()
    imgs = images(3, seed=1)
    questions = [
        "Is there a star in the image?",
        "Is there an oval?",
        "Is there a pentagon in the image? Say it.",
    ]
    batched = vlm.answer_yes_no(model, imgs, questions, batch_size=3)  # left padding in the batch
    single = [vlm.answer_yes_no(model, imgs[i : i + 1], [questions[i]])[0] for i in range(3)]
    for b, s in zip(batched, single, strict=True):
        assert b.text == s.text and b.yes_minus_no == pytest.approx(s.yes_minus_no, abs=1e-4)
    texts = vlm.generate(model, imgs, "Describe the image.", max_new_tokens=5, batch_size=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert vlm.generate(model, None, ["Say hi."], max_new_tokens=3)  # text only
    with pytest.raises(ConfigError, match="prompts for 3 images"):
        vlm.generate(model, imgs, ["a", "b"])


# ------------------------------------------------------------------------------------------ training


def _train(model: LoadedModel, steps: int, **kwargs: object) -> vlm_train.TrainResult:
    scenes = scc.train_scenes(DATA)
    config = vlm_train.TrainConfig(
        steps=steps,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        log_every=2,
        eval_every=0,
        feature_batch_size=8,
        **kwargs,
    )  # type: ignore[arg-type]
    return vlm_train.train(
        model,
        scc.RenderedScenes(scenes),
        scc.training_examples(scenes, DATA),
        config,
        feature_key=DATA.fingerprint("train", DATA.n_train),
        progress=False,
    )


def test_training_lowers_the_loss_and_leaves_the_frozen_parts_untouched() -> None:
    model = fresh()
    before = {k: v.clone() for k, v in model.native_model.state_dict().items()}  # type: ignore[union-attr]
    result = _train(model, steps=12)
    assert result.steps_done == 12 and len(result.curve) == 6
    assert result.curve[-1]["loss"] < result.curve[0]["loss"] - 0.3
    after = model.native_model.state_dict()  # type: ignore[union-attr]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.multi_modal_projector.{k}" for k in result.projector}, (
        "only the projector trains"
    )
    for key, tensor in result.projector.items():
        assert torch.equal(vlm.projector_module(model).state_dict()[key], tensor)
    assert all(not p.requires_grad for p in model.native_model.parameters())  # type: ignore[union-attr]
    assert result.timings["features_per_image_s"] > 0 and result.sizes["n_images"] == DATA.n_train
    # the features were cached: a second extraction reads them back
    timings: dict[str, float] = {}
    again = vlm_train.extract_features(
        model,
        scc.RenderedScenes(scc.train_scenes(DATA)),
        progress=False,
        cache_key=DATA.fingerprint("train", DATA.n_train),
        timings=timings,
    )
    assert (
        timings.get("features_cached") == 1.0 and again.dtype == torch.float16 and again.shape == (12, 16, 32)
    )


def test_lora_changes_only_the_adapted_projections_and_round_trips_through_a_file(tmp_path: Path) -> None:
    model = fresh()
    before = {k: v.clone() for k, v in model.native_model.state_dict().items()}  # type: ignore[union-attr]
    result = _train(model, steps=4, lora_rank=2, lora_targets=("q_proj", "v_proj"))
    after = model.native_model.state_dict()  # type: ignore[union-attr]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_weights = {
        f"model.language_model.layers.{i}.self_attn.{t}.weight"
        for i in range(3)
        for t in ("q_proj", "v_proj")
    }
    assert changed == lora_weights | {f"model.multi_modal_projector.{k}" for k in result.projector}
    paths = vlm_train.save(result, tmp_path / "p.safetensors", model, meta={"command": "test"})
    assert paths["weights"].stat().st_size < vlm.MAX_PROJECTOR_BYTES
    record = json.loads(paths["record"].read_text())
    assert (
        record["command"] == "test" and record["steps_done"] == 4 and record["train_config"]["lora_rank"] == 2
    )
    assert len(record["loss_curve"]) == 2 and set(paths) == {"weights", "record"}  # figures: dashboard
    figure = plotly.io.read_json(write_loss_figure(paths["record"]))
    assert [trace.name for trace in figure.data] == ["training loss"]
    assert list(figure.data[0].y) == [p["loss"] for p in record["loss_curve"]]
    file = vlm.read_projector(paths["weights"])
    assert set(file.lora) == {f"{i}.{t}.{p}" for i in range(3) for t in ("q_proj", "v_proj") for p in "AB"}
    assert file.meta["lora_rank"] == 2 and file.lora_scale == 8.0
    loaded = vlm.apply_projector(fresh(), paths["weights"])
    batch = vlm.encode_prompts(model, ["Describe the image."])
    pixels = model.preprocess(images(1))
    with torch.no_grad():
        want = model.native_model(input_ids=batch.input_ids, pixel_values=pixels).logits  # type: ignore[misc]
        got = loaded.native_model(input_ids=batch.input_ids, pixel_values=pixels).logits  # type: ignore[misc]
    assert torch.allclose(want, got, atol=1e-5)
    assert loaded.weight_sha256 == model.weight_sha256 != tiny().weight_sha256
    with pytest.raises(ConfigError, match="LoRA"):  # continuing would lose the merged deltas
        scc.train_scene_llava("tiny-llava", DATA, out=tmp_path / "q.safetensors", init=paths["weights"])


def test_projector_files_refuse_the_wrong_model_and_oversize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny()
    state = {k: v.clone() for k, v in vlm.projector_module(model).state_dict().items()}
    meta = {**vlm.parts_meta(model), "vision": "some other tower"}
    path = vlm.write_projector(tmp_path / "x.safetensors", vlm.ProjectorFile(state, {}, meta))
    with pytest.raises(HeadlabError, match="trained for"):
        vlm.apply_projector(fresh(), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HeadlabError, match="safetensors"):
        vlm.read_projector(tmp_path / "junk.safetensors")
    monkeypatch.setattr(vlm.projector, "MAX_PROJECTOR_BYTES", 1000)
    with pytest.raises(ConfigError, match="lora_rank"):
        vlm.write_projector(tmp_path / "big.safetensors", vlm.ProjectorFile(state, {}, meta))
    assert not (tmp_path / "big.safetensors").exists()


def test_cli_trains_the_tiny_llava_end_to_end(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from headlab.cli import app

    out = tmp_path / "tiny_projector.safetensors"
    common = [
        "train",
        "scene-llava",
        "--base",
        "tiny-llava",
        "--device",
        "cpu",
        "--set",
        "batch_size=4",
        "--set",
        "lr=0.01",
        "--set",
        "warmup_steps=1",
        "--set",
        "log_every=2",
        "--data",
        "n_train=8",
        "--data",
        "image_size=64",
        "--data",
        "examples_per_scene=1",
    ]
    result = CliRunner().invoke(
        app, [*common, "--out", str(out), "--eval", "1", "--set", "steps=6", "--set", "eval_every=3"]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "trained 6 steps" in result.output and "conflict:" in result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["base"] == "tiny-llava" and record["data_config"]["n_train"] == 8
    assert record["data_stats"]["n_examples"] == 8 and len(record["eval_loss_curve"]) == 2
    assert {r["metric"] for r in record["evaluation"]["iid"]["summary"]} >= {
        "CHAIR_S",
        "CHAIR_I",
        "F1",
        "yes_ratio",
    }
    resumed = CliRunner().invoke(
        app,
        [
            *common,
            "--eval",
            "0",
            "--set",
            "steps=2",
            "--set",
            "seed=1",
            "--resume",
            str(out),
            "--out",
            str(tmp_path / "resumed.safetensors"),
        ],
    )
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    again = json.loads((tmp_path / "resumed.json").read_text())
    assert again["init"]["path"] == str(out) and again["init"]["training"]["steps_done"] == 6
    shown = CliRunner().invoke(app, ["train", "scene-llava", "--show-config", "--set", "lora_rank=4"])
    assert shown.exit_code == 0 and json.loads(shown.output)["train"]["lora_rank"] == 4
    bad = CliRunner().invoke(
        app, ["train", "scene-llava", "--set", "lora_targets=gate_proj", "--set", "lora_rank=2"]
    )
    assert bad.exit_code != 0 and "lora_targets" in str(bad.exception)


# ------------------------------------------------------------------------------------------ loading


def test_a_local_llava_checkpoint_loads_through_load_model(tmp_path: Path) -> None:
    model = tiny()
    vlm.save_checkpoint(model, tmp_path / "llava")
    loaded = probe.load_model(str(tmp_path / "llava"), device="cpu")
    assert (
        loaded.kind == "vision-language"
        and loaded.source == "local"
        and loaded.extra["image_seq_length"] == 16
    )
    batch = vlm.encode_prompts(loaded, ["Describe the image."])
    assert torch.equal(batch.input_ids, vlm.encode_prompts(model, ["Describe the image."]).input_ids)
    pixels = loaded.preprocess(images(1))
    with torch.no_grad():
        want = model.native_model(input_ids=batch.input_ids, pixel_values=pixels).logits  # type: ignore[misc]
        got = loaded.bridge(batch.input_ids, pixel_values=pixels)  # type: ignore[misc]
    assert torch.allclose(want, got, atol=1e-4)


def test_scene_llava_without_its_projector_names_the_training_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assemblies, "DATA_DIR", tmp_path)  # no projector there
    with pytest.raises(HeadlabError, match="headlab train scene-llava"):
        probe.load_model("scene-llava", device="cpu")
    with pytest.raises(HeadlabError, match="headlab fetch clip-vit-b16"):
        zoo.get_spec("scene-llava")
    with pytest.raises(UnknownModelError, match="scene-llava"):
        probe.load_model("scene-lava")


def test_tiny_llava_is_seeded() -> None:
    a: Any = TINY_BUILDERS["tiny-llava"].build(0, ())[0]
    b: Any = TINY_BUILDERS["tiny-llava"].build(0, ())[0]
    c: Any = TINY_BUILDERS["tiny-llava"].build(1, ())[0]
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(
        a.model.multi_modal_projector.linear_1.weight, c.model.multi_modal_projector.linear_1.weight
    )


@pytest.mark.real
def test_scene_llava_assembles_clip_and_smollm2_exactly() -> None:
    from tests.conftest import real_model

    model = vlm.load_assembly(
        "scene-llava", projector="fresh", device=torch.device("cpu"), dtype=torch.float32
    )
    assert (model.n_layers, model.n_heads, model.n_kv_heads, model.d_head) == (30, 9, 3, 64)
    assert (
        model.extra["image_seq_length"] == 196 and model.image is not None and model.image.image_size == 224
    )
    assert "untrained projector" in model.caveat
    smol = real_model("smollm2-135m")
    ids = smol.encode(["The capital of France is"]).input_ids
    with torch.no_grad():
        reference = smol.native_model(input_ids=ids).logits  # type: ignore[misc]
        ours = model.native_model(input_ids=ids).logits  # type: ignore[misc]
    assert torch.allclose(ours[..., :49152], reference, atol=1e-4)
    batch = vlm.encode_prompts(model, [scc.CAPTION_PROMPT])
    assert (batch.input_ids == model.extra["image_token_id"]).sum() == 196
    assert batch.input_ids[0, 0] == model.tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_example_weighting_averages_each_answer_before_the_batch() -> None:
    """``loss_weighting="example"`` is the mean over examples of each example's mean token loss; with
    answers of one length it equals the token mean, with unequal lengths it differs from it."""
    model = fresh()
    scenes = scc.train_scenes(DATA)
    examples = scc.training_examples(scenes, DATA)
    tokens = vlm_train._tokenize(model, examples, len(scenes))
    feats = vlm_train.extract_features(model, scc.RenderedScenes(scenes), progress=False)
    parts = vlm_train._Parts(model, vlm_train.TrainConfig())
    pad = int(model.tokenizer.pad_token_id or model.tokenizer.eos_token_id)
    lengths = [len(i) - n for i, n in zip(tokens.ids, tokens.n_prompt, strict=True)]
    rows = list(range(len(examples)))
    assert len(set(lengths)) > 1, "the test needs answers of different lengths"
    batch = vlm_train._batch(tokens, rows, pad, model.device)
    with torch.no_grad():
        by_example = float(parts.loss(batch, feats[batch["images"]], "example"))
        by_token = float(parts.loss(batch, feats[batch["images"]], "token"))
        singles = [
            float(
                parts.loss(
                    vlm_train._batch(tokens, [r], pad, model.device), feats[[tokens.images[r]]], "token"
                )
            )
            for r in rows
        ]
    assert by_example == pytest.approx(float(np.mean(singles)), rel=1e-4)
    assert abs(by_example - by_token) > 1e-4
    with pytest.raises(ConfigError, match="loss_weighting"):
        vlm_train.TrainConfig(loss_weighting="sentence")
