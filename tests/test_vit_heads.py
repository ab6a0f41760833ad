"""ViT head analysis: probes, pruning (full, partial, batched), agreement, vision sinks, full runs.

Hand-built facts first (a probe label written by one head is found by pruning that head; a query
mask that selects nothing changes nothing and one that selects everything is full pruning; packing
many heads into one forward equals pruning them one at a time; identical metrics agree perfectly),
then the whole analysis on the tiny vision models and one small end-to-end run on clip-vit-b16.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pytest
import torch

import probe
from analyses import runstore, vit_heads
from analyses.base import AnalysisResult, config_from_overrides
from analyses.vit_heads import LinearProbe, PruneCondition, VitHeadsConfig
from probe import vision
from probe.errors import ConfigError
from probe.loading import LoadedModel
from tests.conftest import real_model

TINY_VISION = ["tiny-vit", "tiny-clip-vision"]
_MODELS: dict[str, LoadedModel] = {}


def _tiny(name: str) -> LoadedModel:
    if name not in _MODELS:
        _MODELS[name] = probe.load_model(name, device="cpu")
    return _MODELS[name]


@pytest.fixture(params=TINY_VISION)
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """Each tiny vision architecture in turn (built once; never changed by a test)."""
    return _tiny(request.param)


def _pixels(model: LoadedModel, n: int, seed: int = 0) -> torch.Tensor:
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return model.preprocess(images)


def _all_heads(model: LoadedModel) -> list[tuple[int, int]]:
    return [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- config


def test_config_errors_name_the_setting_and_the_fix() -> None:
    cases = {
        "tasks": (("has_hexagon",), "has_<shape> needs the shape in scene_shapes"),
        "bands": ((0.0, 0.6, 0.4), "increasing edges"),
        "ablation": ("resample", "'zero' or 'mean'"),
        "regions": (("middle",), "regions must be distinct names"),
        "attention_images": ("holiday_photos", "image subset"),
        "n_faces": (7, "even number"),
        "artifact_ratio": (1.0, "must be > 1"),
        "n_clusters": (1, "choose by silhouette"),
        "held_out": (1.0, "held_out must lie in"),
        "n_null": (20, "at least 50"),
        "n_boot": (10, "n_boot must be >= 100"),
        "top_fraction": (0.0, "top_fraction"),
        "validate_top": (-1, "validate_top"),
    }
    for field_name, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            settings: dict[str, Any] = {field_name: value}
            VitHeadsConfig(**settings).validate()
    with pytest.raises(ConfigError, match="pattern_images"):
        VitHeadsConfig(n_attention_images=2, pattern_images=3).validate()
    VitHeadsConfig().validate()
    VitHeadsConfig(preset="small").validate()


def test_small_preset_yields_to_explicit_settings_even_default_ones() -> None:
    small = VitHeadsConfig(preset="small", n_eval=6, prune_top_k=0)
    assert small.n_eval == 6 and small.prune_top_k == 0  # set explicitly: kept (0 is also the default)
    assert small.n_scenes == vit_heads.SMALL["n_scenes"] and small.ae_epochs == vit_heads.SMALL["ae_epochs"]
    from_cli = config_from_overrides(
        VitHeadsConfig, ["preset=small", "tasks=has_circle,face", "bands=0,0.5,1"]
    )
    assert from_cli.tasks == ("has_circle", "face") and from_cli.bands == (0.0, 0.5, 1.0)
    assert from_cli.batch_size == vit_heads.SMALL["batch_size"]
    assert dataclasses.replace(small, seed=3).n_eval == 6 and dataclasses.asdict(small)["preset"] == "small"
    with pytest.raises(ConfigError, match="unknown setting"):
        VitHeadsConfig(n_images=3)


def test_a_language_model_is_refused_with_the_fix(tiny_gpt2: LoadedModel) -> None:
    with pytest.raises(
        ConfigError, match=r"vit-heads analyses the heads of a vision transformer.*clip-vit-b16"
    ):
        vit_heads.run_vit_heads(tiny_gpt2, VitHeadsConfig(preset="small", progress=False))


# ---------------------------------------------------------------------------- probes and metrics


def test_linear_probe_gives_scikit_learns_probabilities() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    for labels in (np.where(x[:, 0] > 0, "b", "a"), np.array(["r", "g", "b"])[rng.integers(0, 3, 60)]):
        lp = LinearProbe.fit("t", x, labels.tolist(), c=0.5)
        unit = _unit(x)
        reference = LogisticRegression(C=0.5, max_iter=5000).fit((unit - lp.mean) / lp.scale, labels)
        assert lp.classes == tuple(reference.classes_)
        np.testing.assert_allclose(
            lp.proba(x), reference.predict_proba((unit - lp.mean) / lp.scale), atol=1e-6
        )
    with pytest.raises(ConfigError, match="single class"):
        LinearProbe.fit("t", x, ["a"] * 60)


def test_pruning_effects_on_hand_built_embeddings() -> None:
    clean = np.array([[1.0, 0.2], [1.0, -0.2], [-1.0, 0.3], [-1.0, -0.3]])
    labels = np.array(["pos", "pos", "neg", "neg"], dtype=object)
    lp = LinearProbe.fit("sign", clean, labels.tolist(), c=100.0)
    flipped = clean * np.array([-1.0, 1.0])  # every image crosses the decision boundary
    half = clean.copy()
    half[:2, 0] *= -1  # only the two "pos" images cross it
    effects = vit_heads.pruning_effects(
        {"sign": lp}, {"sign": labels}, clean, np.stack([clean, flipped, half])
    )
    assert effects.clean_accuracy["sign"] == 1.0
    np.testing.assert_allclose(effects.accuracy_drop("sign"), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(effects.cosine_drop[0], 0.0, atol=1e-12)
    assert effects.confidence_drop("sign")[0] == pytest.approx(0.0, abs=1e-12)
    assert effects.confidence_drop("sign")[1] > effects.confidence_drop("sign")[2] > 0.4
    per = effects.per_image()
    np.testing.assert_allclose(per["accuracy_drop"].mean(1), effects.accuracy_drop("sign"))
    np.testing.assert_allclose(per["accuracy_drop"][1], [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(per["accuracy_drop"][2], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(per["confidence_drop"].mean(1), effects.confidence_drop("sign"))
    np.testing.assert_allclose(per["cosine_drop"].mean(1), effects.cosine_drop, atol=1e-12)
    long = effects.long()
    assert set(long["metric"]) == {
        "cosine_drop",
        "accuracy",
        "accuracy_drop",
        "confidence",
        "confidence_drop",
    }


def test_agreement_is_one_for_identical_metrics_and_minus_one_for_reversed() -> None:
    values = np.array([0.3, 0.1, 0.9, 0.5, 0.7])
    frame = pd.DataFrame({"a": values, "b": values * 10 + 1, "c": -values, "flat": np.ones(5)})
    frame.loc[5] = [np.nan, 1.0, 2.0, 1.0]  # a row with a missing metric is left out
    table = vit_heads.agreement(frame, ["a", "b", "c", "flat"]).set_index(["metric_a", "metric_b"])
    assert table.loc[("a", "b"), "spearman"] == pytest.approx(1.0)
    assert table.loc[("a", "a"), "spearman"] == pytest.approx(1.0)
    assert table.loc[("a", "c"), "spearman"] == pytest.approx(-1.0)
    assert math.isnan(table.loc[("a", "flat"), "spearman"])
    assert (table["n_heads"] == 5).all()


def test_pooled_per_image_values_average_to_the_mean_over_tasks() -> None:
    """Task a labels images 0-2, task b images 2-3: the pooled mean over the 5 images (image 4 has no
    label) is the mean of the two task means, also per condition row."""
    a = np.array([[1.0, 2.0, 3.0, np.nan, np.nan], [0.0, 0.0, 0.0, np.nan, np.nan]])
    b = np.array([[np.nan, np.nan, 10.0, 20.0, np.nan], [np.nan, np.nan, 4.0, 0.0, np.nan]])
    pooled = vit_heads.pooled_per_image({"a": a, "b": b})
    np.testing.assert_allclose(pooled.mean(1), [(2.0 + 15.0) / 2, (0.0 + 2.0) / 2])
    assert pooled[0, 4] == 0.0 and pooled[0, 0] == pytest.approx(1.0 * 5 / (2 * 3))
    only_a = vit_heads.pooled_per_image({"a": a, "none": np.full_like(a, np.nan)})
    np.testing.assert_allclose(only_a.mean(1), [2.0, 0.0])  # a task without labels does not count


def test_top_share_counts_the_top_tenth_of_the_positive_effects() -> None:
    values = np.array([6.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -3.0])
    assert vit_heads.top_share(values, 0.1) == pytest.approx(0.6)  # top 1 of 10; the negative counts 0
    assert vit_heads.top_share(values, 0.2) == pytest.approx(0.8)
    assert math.isnan(float(vit_heads.top_share(np.zeros(10), 0.1)))
    np.testing.assert_allclose(vit_heads.top_share(np.stack([values, np.ones(10)]), 0.1), [0.6, 0.1])


def test_concentration_beats_the_shuffled_null_only_for_a_truly_dominant_head() -> None:
    rng = np.random.default_rng(0)
    noise = rng.exponential(1.0, (40, 20))  # 40 images, 20 exchangeable heads
    dominant = noise.copy()
    dominant[:, 3] += 10.0
    strong = vit_heads.concentration(dominant, 0.1, n_perm=200, n_boot=200, seed=0)
    expected = float(vit_heads.top_share(dominant.mean(0), 0.1))
    assert strong["share"] == pytest.approx(expected) and strong["top_heads"] == 2
    assert strong["share_low"] <= strong["share"] <= strong["share_high"]
    assert strong["p_value"] == pytest.approx(1 / 201) and strong["share"] > strong["null_high"]
    flat = vit_heads.concentration(noise, 0.1, n_perm=200, n_boot=200, seed=0)
    assert flat["p_value"] > 0.05 and flat["null_low"] <= flat["share"] <= flat["null_high"]
    few = vit_heads.concentration(noise[:2], 0.1, n_perm=200, n_boot=200, seed=0)
    assert few["null_mean"] > flat["null_mean"]  # fewer images: noise alone concentrates more


def test_ranking_and_head_intervals_on_known_values() -> None:
    reference = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1])
    same = vit_heads.ranking(reference, reference * 3, 0.2)
    assert same["spearman"] == pytest.approx(1.0) and same["top_found"] == 2 and same["best_rank"] == 1
    reverse = vit_heads.ranking(reference, -reference, 0.2)
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["top_found"] == 0
    assert reverse["best_rank"] == 10 and reverse["best"] == 0
    per_image = np.array([[1.0, 0.0, np.nan], [1.0, 2.0, 1.0], [1.0, 4.0, 1.0]])
    mean, low, high = vit_heads.head_intervals(per_image, 500, 0)
    assert mean[0] == low[0] == high[0] == 1.0  # no spread over images: a point interval
    assert mean[1] == pytest.approx(2.0) and 0.0 <= low[1] < 2.0 < high[1] <= 4.0
    assert np.isnan([mean[2], low[2], high[2]]).all()


def test_artifact_mask_marks_patches_far_above_the_median_norm() -> None:
    norms = np.array([[50.0, 1.0, 1.1, 0.9, 9.0, 1.0]])  # CLS first: never an artifact, however large
    np.testing.assert_array_equal(
        vit_heads.artifact_mask(norms, n_prefix=1, ratio=4.0), [[False, False, False, False, True, False]]
    )


def test_query_masks_partition_the_patch_grid(tiny: LoadedModel) -> None:
    masks = {m["name"]: m for m in vit_heads.query_masks(tiny, vit_heads.REGIONS, (0.0, 0.5, 1.0))}
    n_prefix = tiny.extra["n_prefix"]
    patches = torch.zeros(tiny.n_ctx, dtype=torch.bool)
    patches[n_prefix:] = True
    assert not (masks["centre"]["mask"] & masks["border"]["mask"]).any()
    assert torch.equal(masks["centre"]["mask"] | masks["border"]["mask"], patches)
    quads = [masks[q]["mask"] for q in ("top_left", "top_right", "bottom_left", "bottom_right")]
    assert torch.equal(sum(q.int() for q in quads), patches.int())  # 4×4 grid: each patch in one quadrant
    bands = [m["mask"] for m in masks.values() if m["kind"] == "band"]
    assert torch.equal(sum(b.int() for b in bands), patches.int())  # the last band includes the corners
    assert all(not m["mask"][:n_prefix].any() for name, m in masks.items() if name != "cls")
    assert torch.equal(masks["cls"]["mask"], ~patches)


# ---------------------------------------------------------------------------- pruning on the tiny models


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_partial_pruning_with_no_query_is_intact_and_with_every_query_is_full_pruning(
    tiny: LoadedModel, mode: str
) -> None:
    pixels = _pixels(tiny, 5)
    means = vision.mean_head_outputs(tiny, _pixels(tiny, 6, seed=1)) if mode == "mean" else None
    head = (tiny.n_layers - 1, 1)
    nothing = torch.zeros(tiny.n_ctx, dtype=torch.bool)
    everything = torch.ones(tiny.n_ctx, dtype=torch.bool)
    conditions = [
        PruneCondition(head, "none", nothing),
        PruneCondition(head),
        PruneCondition(head, "all", everything),
    ]
    out = vit_heads.pruned_embeddings(tiny, pixels, conditions, mode=mode, means=means, batch_size=7)  # type: ignore[arg-type]
    clean = vision.embed(tiny, pixels)
    torch.testing.assert_close(out[0], clean)
    torch.testing.assert_close(out[2], out[1])
    assert not torch.allclose(out[1], clean)
    with vision.gate_heads(tiny, [head], mode=mode, means=means):  # type: ignore[arg-type]
        torch.testing.assert_close(out[1], vision.embed(tiny, pixels))


def test_many_heads_packed_into_one_forward_equal_one_head_at_a_time(tiny: LoadedModel) -> None:
    """Packed conditions, resumed from the intact residual stream of their first pruned layer (or
    run from the start), equal each condition alone, sets of heads included."""
    pixels = _pixels(tiny, 3)
    region = vision.region_mask(tiny, rows=[0, 1])
    conditions = [PruneCondition(h) for h in _all_heads(tiny)] + [
        PruneCondition((0, 2), "top", region),
        PruneCondition((1, 1), "set", others=((1, 3), (0, 0))),
        PruneCondition((1, 0), "late set", others=((1, 2),)),
    ]
    assert conditions[-2].start == 0 and conditions[-1].start == 1
    packed = vit_heads.pruned_embeddings(tiny, pixels, conditions, mode="zero", batch_size=5)
    from_start = vit_heads.pruned_embeddings(tiny, pixels, conditions, batch_size=4, resume=False)
    torch.testing.assert_close(packed, from_start, rtol=1e-5, atol=1e-5)
    for i, cond in enumerate(conditions):
        with vision.gate_heads(tiny, cond.heads, query_mask=cond.query_mask):
            alone = vision.embed(tiny, pixels)
        torch.testing.assert_close(packed[i], alone, rtol=1e-5, atol=1e-5)


def test_resumed_pruning_skips_the_layers_before_the_pruned_head() -> None:
    """A head of the last layer costs one layer per image (after the intact pass that records the
    residual stream), and the model runs as before afterwards."""
    model = _tiny("tiny-clip-vision")
    pixels = _pixels(model, 2)
    first = model.hf_model.get_submodule(model.extra["modules"]["attention"][0])
    calls: list[int] = []
    handle = first.register_forward_hook(lambda *_: calls.append(1))
    try:
        vit_heads.pruned_embeddings(model, pixels, [PruneCondition((model.n_layers - 1, 0))] * 3)
        assert len(calls) == 1  # the intact pass only
        vit_heads.pruned_embeddings(model, pixels, [PruneCondition((model.n_layers - 1, 0))], resume=False)
        assert len(calls) == 2
    finally:
        handle.remove()
    assert "forward" not in vars(model.hf_model.get_submodule(model.extra["modules"]["layers"][0]))


def test_head_gradients_match_finite_differences_of_the_probe_loss() -> None:
    model = _tiny("tiny-clip-vision")
    pixels = _pixels(model, 6)
    emb = vision.embed(model, pixels).numpy()
    labels = np.where(emb[:, 0] > np.median(emb[:, 0]), "hi", "lo").astype(object)
    lp = LinearProbe.fit("hi", emb, labels.tolist())
    grads = vit_heads.head_gradients(model, pixels, {"hi": lp}, {"hi": labels}, per_task=True, batch_size=4)
    y = torch.as_tensor(lp.label_index(labels.tolist()))

    def loss(factor: float, head: tuple[int, int]) -> np.ndarray:
        with vision.gate_heads(model, {head: factor}):
            logp = torch.log_softmax(lp.logits(vision.embed(model, pixels)), dim=-1)
        return (-logp[torch.arange(len(y)), y]).numpy()

    eps = 1e-3
    for head in [(0, 1), (1, 3)]:
        fd = (loss(1 + eps, head) - loss(1 - eps, head)) / (2 * eps)
        assert grads["hi"][head] == pytest.approx(np.abs(fd).mean(), rel=2e-2, abs=1e-5)
    combined = vit_heads.head_gradients(model, pixels, {"hi": lp}, {"hi": labels}, per_task=False)
    np.testing.assert_allclose(combined["all"], grads["hi"], rtol=1e-5)
    some = labels.copy()
    some[:2] = None  # two unlabelled images: NaN rows, left out of the mean
    per = vit_heads.head_gradients_per_image(model, pixels, {"hi": lp}, {"hi": some}, batch_size=4)
    assert per["hi"].shape == (6, model.n_layers, model.n_heads) and np.isnan(per["hi"][:2]).all()
    mean = vit_heads.head_gradients(model, pixels, {"hi": lp}, {"hi": some}, batch_size=4)["hi"]
    np.testing.assert_allclose(mean, per["hi"][2:].mean(0))


def test_a_label_written_by_one_head_is_found_by_pruning_that_head() -> None:
    """The label is the side of a hyperplane along the direction head 1.3 writes into the embedding
    (the mean change its removal makes): pruning 1.3 pushes the 'on' images across, other heads do not."""
    model = _tiny("tiny-clip-vision")
    heads = _all_heads(model)
    carrier = (1, 3)
    pixels = _pixels(model, 96)
    clean = vision.embed(model, pixels)
    pruned = vit_heads.pruned_embeddings(model, pixels, [PruneCondition(h) for h in heads], batch_size=64)
    written = (_unit(clean.double().numpy()) - _unit(pruned[heads.index(carrier)].double().numpy())).mean(0)
    score = _unit(clean.double().numpy()) @ written
    labels = np.where(score > np.median(score), "on", "off").astype(object)
    train, test = np.arange(96) % 2 == 0, np.arange(96) % 2 == 1
    lp = LinearProbe.fit("carried", clean.numpy()[train], labels[train].tolist(), c=10.0)
    effects = vit_heads.pruning_effects(
        {"carried": lp}, {"carried": labels[test]}, clean[test], pruned[:, test]
    )
    assert effects.clean_accuracy["carried"] > 0.85
    drops = effects.confidence_drop("carried")
    order = np.argsort(-drops)
    assert heads[int(order[0])] == carrier
    assert drops[order[0]] > drops[order[1]] + 0.1
    assert effects.accuracy_drop("carried")[heads.index(carrier)] >= 0.3


def test_held_out_validation_of_the_head_that_writes_the_label_against_an_exact_null() -> None:
    """Head 1.3 of tiny-clip-vision writes the label (as above). Pruned on the held-out half it costs
    more confidence than each of the 7 other heads, the whole (exact) null of size-1 sets: percentile
    100 and p = 1/8, the smallest p 7 null sets allow, so it is not validated at 0.05 although its
    interval excludes 0. The head of smallest drop sits at the bottom of the same null."""
    from analyses.vit_heads.evidence import validate_top
    from analyses.vit_heads.importance import EvalSet

    model = _tiny("tiny-clip-vision")
    heads = _all_heads(model)
    carrier = (1, 3)
    pixels = _pixels(model, 96)
    clean = vision.embed(model, pixels)
    pruned = vit_heads.pruned_embeddings(model, pixels, [PruneCondition(h) for h in heads], batch_size=64)
    written = (_unit(clean.double().numpy()) - _unit(pruned[heads.index(carrier)].double().numpy())).mean(0)
    score = _unit(clean.double().numpy()) @ written
    labels = np.where(score > np.median(score), "on", "off").astype(object)
    train, test = np.arange(96) % 2 == 0, np.flatnonzero(np.arange(96) % 2 == 1)
    probes = {"carried": LinearProbe.fit("carried", clean.numpy()[train], labels[train].tolist(), c=10.0)}
    held = EvalSet(test, {"carried": labels[test]}, pixels[test], clean[test])
    cfg = VitHeadsConfig(n_boot=200, batch_size=64, progress=False)
    table = validate_top(model, cfg, held, probes, None, [carrier], heads).set_index("measure")
    conf = table.loc["confidence_drop"]
    assert conf["n_null"] == 7 and conf["percentile"] == 100.0 and conf["p_value"] == pytest.approx(1 / 8)
    assert conf["effect_low"] > 0 and not conf["validated"]
    assert conf["inputs"].startswith("held-out eval images (n=48")
    drops = vit_heads.pruning_effects(probes, held.labels, held.clean, pruned[:, test]).confidence_drop(
        "carried"
    )
    assert conf["effect"] == pytest.approx(drops[heads.index(carrier)], abs=1e-6)
    weakest = heads[int(np.argmin(drops))]
    low = validate_top(model, cfg, held, probes, None, [weakest], heads).set_index("measure")
    assert low.loc["confidence_drop", "percentile"] == 0.0 and not low.loc["confidence_drop", "validated"]


# ---------------------------------------------------------------------------- whole runs


def _check_result(result: AnalysisResult, model: LoadedModel, cfg: VitHeadsConfig) -> None:
    L, H = model.n_layers, model.n_heads
    heads = result.heads
    assert len(heads) == L * H and list(heads.columns[:3]) == ["layer", "head", "kv_head"]
    sets = cfg.attention_images
    for column in (
        *vit_heads.IMPORTANCE_METRICS,
        "mean_attention_distance",
        "self_strength",
        "cluster",
        "group",
        f"alpha0_{sets}",
        f"sink_rate_{sets}",
        f"alpha_artifacts_{sets}",
    ):
        assert column in heads.columns, column
    pruned = heads[heads["pruned"]]
    assert len(pruned) == min(cfg.prune_top_k or L * H, L * H)
    assert pruned[list(vit_heads.IMPORTANCE_METRICS)].notna().all().all()
    assert heads.loc[~heads["pruned"], "confidence_drop"].isna().all()
    assert heads["grad_importance"].notna().all() and (heads["grad_importance"] >= 0).all()
    assert ((heads["cosine_drop"].dropna() >= -1e-6) & (heads["cosine_drop"].dropna() <= 2)).all()
    probes = result.tables["probes"]
    assert set(probes["task"]) == set(cfg.tasks) and probes["test_accuracy"].between(0, 1).all()
    agree = result.tables["agreement"]
    diagonal = agree[agree["metric_a"] == agree["metric_b"]]
    assert np.allclose(diagonal["spearman"].dropna(), 1.0) and result.arrays["agreement"].shape == (4, 4)
    partial = result.tables["partial"]
    assert (
        set(partial["kind"]) <= {"full", "prefix", "region", "band"}
        and (partial["kind"] == "full").sum() == cfg.partial_heads
    )
    importance = result.tables["importance"]
    assert {"layer", "head", "condition", "task", "metric", "value"} == set(importance.columns)
    grid = model.extra["grid"]
    assert result.arrays["offset_maps"].shape == (L, H, 2 * grid[0] - 1, 2 * grid[1] - 1)
    distance = result.tables["distance"]
    assert distance.groupby(["layer", "head"]).size().eq(distance["distance"].nunique()).all()
    assert (distance["strength"] >= 0).all()
    clusters = result.tables["clusters"]
    share = clusters.groupby(["layer", "head"])["share"].sum()
    assert np.allclose(share.dropna(), 1.0)
    assert result.arrays["cluster_centroids"].shape[1] == cfg.code_dim
    sinks = result.tables["sinks"]
    assert {"input_set", "layer", "head", "alpha0", "sink_rate", "alpha_artifacts"} <= set(sinks.columns)
    assert sinks["alpha0"].between(0, 1).all()
    norms = result.tables["norms"]
    assert {"input_set", "layer", "quantity", "sink_norm", "other_norm", "ratio"} <= set(norms.columns)
    text = vit_heads.summary(result)
    assert "vit-heads of" in text
    if len(result.tables.get("validation", pd.DataFrame())):
        assert "tested heads L" in text and "held-out validation (effect [95% CI] vs" in text
    else:
        assert "held-out validation: none" in text
    _check_statistics(result, model, cfg)


def _check_statistics(result: AnalysisResult, model: LoadedModel, cfg: VitHeadsConfig) -> None:
    """Intervals bracket each pruned head's mean; the per-image array averages to the heads table;
    concentration and ranking cover every pruned head; the validation tests the top heads by cosine
    drop against random sets from outside them, and the heads table carries its evidence."""
    from analyses import validation

    heads, pruned = result.heads, result.heads[result.heads["pruned"]]
    cube = result.arrays["importance_per_image"]
    images = result.tables["images"]
    n_disc = int(images["eval"].sum())
    assert cube.shape == (4, model.n_layers, model.n_heads, n_disc)
    for i, metric in enumerate(vit_heads.IMPORTANCE_METRICS):
        values = pruned[metric].to_numpy(dtype=float)
        assert (pruned[f"{metric}_low"] <= values + 1e-9).all() and (
            values <= pruned[f"{metric}_high"] + 1e-9
        ).all()
        means = cube[i].mean(-1)[pruned["layer"], pruned["head"]]
        np.testing.assert_allclose(means, values, rtol=1e-4, atol=1e-6)
    concentration = result.tables["concentration"].set_index("metric")
    assert set(concentration.index) == set(vit_heads.IMPORTANCE_METRICS)
    assert (concentration["n_heads"] == len(pruned)).all() and (concentration["n_images"] == n_disc).all()
    ranking = result.tables["ranking"].set_index("metric")
    assert ranking.loc["grad_importance", "n_heads"] == len(pruned)
    best = pruned.loc[pruned["cosine_drop"].idxmax()]
    assert ranking.loc["grad_importance", "reference_best"] == f"L{best['layer']}H{best['head']}"
    table = result.tables["validation"]
    assert list(table.columns) == list(validation.COLUMNS)
    held = images[images["held_out"]]
    assert not (images["eval"] & images["held_out"]).any() and len(held) == result.notes["held_out_images"]
    if cfg.validate_top:
        top = pruned.nlargest(cfg.validate_top, "cosine_drop")
        tested = sorted(zip(top["layer"], top["head"], strict=True))
        assert table["heads"].iloc[0] == validation.heads_label(tested)
        assert table["measure"].iloc[0] == "cosine_drop" and (table["n_inputs"] == len(held)).all()
        assert (table["n_null"] >= min(cfg.n_null, math.comb(len(heads) - len(tested), len(tested)))).all()
        role = heads.set_index(["layer", "head"])["vit_role"]
        assert {h for h in role.index if role[h] == "important"} == set(tested)
        assert heads["vit_effect"].notna().sum() == len(tested)


def test_full_run_on_each_tiny_vision_model(tiny: LoadedModel, tmp_path: Path) -> None:
    cfg = VitHeadsConfig(preset="small", progress=False)
    result = vit_heads.run_vit_heads(tiny, cfg)
    _check_result(result, tiny, cfg)
    path = result.save(str(tmp_path))
    run = runstore.open_run(path)
    assert run.analysis == "vit-heads" and len(run.heads) == tiny.n_layers * tiny.n_heads
    assert set(result.tables) <= set(run.table_names)


def test_every_head_pruned_with_mean_ablation_and_all_partial_conditions() -> None:
    model = _tiny("tiny-vit")
    cfg = VitHeadsConfig(
        preset="small",
        prune_top_k=0,
        ablation="mean",
        partial_heads=2,
        regions=vit_heads.REGIONS,
        attention_images="probe",
        n_clusters=3,
        progress=False,
    )
    result = vit_heads.run_vit_heads(model, cfg)
    _check_result(result, model, cfg)
    partial = result.tables["partial"]
    assert (partial["kind"] == "region").sum() == 2 * (len(vit_heads.REGIONS) - 1)
    assert (partial["kind"] == "prefix").sum() == 2
    assert len(result.tables["cluster_info"]) == 3
    assert result.notes["input_set"] == "probe" and "alpha0_probe" in result.heads.columns


# ---------------------------------------------------------------------------- display patterns


def _display_config(**settings: Any) -> VitHeadsConfig:
    """A cheap small run (8 scenes, 4 faces, 2 attention images)."""
    base: dict[str, Any] = {
        "n_scenes": 8,
        "n_faces": 4,
        "n_attention_images": 2,
        "pattern_images": 1,
        "ae_epochs": 2,
        "progress": False,
    }
    return VitHeadsConfig(preset="small", **{**base, **settings})


def _original_pixels(cfg: VitHeadsConfig, name: str) -> np.ndarray:
    """The display image as the run's inputs had it, before the model's resize and crop."""
    from analyses.tasks import images as image_set

    data = vit_heads.build_probe_set(cfg)
    return data.pixels[data.names.index(name)] if name in data.names else image_set.load_image(name).pixels


def test_display_query_grid_keeps_the_centre_patch() -> None:
    rows, cols = vit_heads.display_query_grid((14, 14), 2)  # ViT-B/16
    assert rows.tolist() == cols.tolist() == [1, 3, 5, 7, 9, 11, 13]
    assert vit_heads.display_query_grid((4, 4), 2)[0].tolist() == [0, 2]
    assert vit_heads.display_query_grid((5, 3), 1)[1].tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="display_stride"):
        VitHeadsConfig(display_stride=0).validate()
    with pytest.raises(ConfigError, match="n_display"):
        VitHeadsConfig(n_display=-1).validate()


@pytest.mark.parametrize("stride", [1, 2])
def test_display_patterns_are_the_attention_rows_of_an_eager_forward(
    tiny: LoadedModel, stride: int, tmp_path: Path
) -> None:
    """Stored crops are what the model saw; stored rows (float16) equal the attention that the HF model
    itself returns (output_attentions) for the original image, for every layer, head and stored query."""
    cfg = _display_config(display_stride=stride)
    result = vit_heads.run_vit_heads(tiny, cfg)
    display = result.tables["display"]
    assert display["source"].tolist() == ["natural", "scenes"]  # one photograph, one synthetic scene
    assert vit_heads.has_display(result)
    rows, cols = (int(g) for g in tiny.extra["grid"])
    n_prefix = int(tiny.extra["n_prefix"])
    queries = result.arrays["display_queries"]
    attention = result.arrays["display_attention"]
    n_query = n_prefix + len(vit_heads.display_query_grid((rows, cols), stride)[0]) ** 2
    assert attention.dtype == np.float16 and queries.shape == (n_query, 3)
    assert attention.shape == (2, tiny.n_layers, tiny.n_heads, n_query, tiny.n_ctx)
    np.testing.assert_allclose(attention.astype(np.float64).sum(-1), 1.0, atol=2e-3)  # CLS included
    run = runstore.open_run(result.save(str(tmp_path)))
    images = vit_heads.display_images(run)
    for image in images:
        original = _original_pixels(cfg, image.name)
        pixels = tiny.preprocess([original])
        assert image.pixels.shape == (tiny.image.image_size, tiny.image.image_size, 3)  # type: ignore[union-attr]
        torch.testing.assert_close(tiny.preprocess([image.pixels]), pixels, rtol=0, atol=1e-6)
        with torch.no_grad():
            eager = tiny.hf_model(pixel_values=pixels, output_attentions=True).attentions
        for layer in range(tiny.n_layers):
            for head in range(tiny.n_heads):
                want = eager[layer][0, head].double().numpy()  # [T, T]
                for token, row, col in queries:
                    query: tuple[int, int] | Literal["cls"] = "cls" if row < 0 else (int(row), int(col))
                    got = vit_heads.display_pattern(run, image.index, layer, head, query)
                    np.testing.assert_allclose(got.patches.ravel(), want[token, n_prefix:], atol=1e-3)
                    np.testing.assert_allclose(got.prefix, want[token, :n_prefix], atol=1e-3)
                    assert got.token == token
        centre = vit_heads.display_attention(run, image.index, 1, 2)
        assert centre.shape == (rows, cols)
        np.testing.assert_allclose(
            centre.ravel(), eager[1][0, 2, n_prefix + (rows // 2) * cols + cols // 2, n_prefix:], atol=1e-3
        )
    if stride == 2:
        with pytest.raises(ConfigError, match="not stored"):
            vit_heads.display_pattern(run, 0, 0, 0, (1, 1))
        snapped = vit_heads.display_pattern(run, 0, 0, 0, (1, 1), snap=True)
        assert snapped.snapped and snapped.query == (0, 0)
    assert vit_heads.display_geometry(run)["patch_size"] == tiny.image.patch_size  # type: ignore[union-attr]


def test_no_display_images_means_no_display_data() -> None:
    result = vit_heads.run_vit_heads(_tiny("tiny-clip-vision"), _display_config(n_display=0))
    assert "display" not in result.tables and not any(k.startswith("display") for k in result.arrays)
    assert not vit_heads.has_display(result)
    with pytest.raises(ConfigError, match="re-run headlab run vit-heads"):
        vit_heads.display_images(result)


@pytest.mark.real
def test_clip_vit_b16_end_to_end_small() -> None:
    model = real_model("clip-vit-b16")
    cfg = VitHeadsConfig(
        preset="small",
        tasks=("has_star", "multiple", "face"),
        n_scenes=16,
        n_faces=8,
        n_eval=2,
        prune_top_k=3,
        validate_top=0,  # the held-out test costs 51 forwards per held-out image: the tiny runs check it
        regions=("centre",),
        bands=(),
        n_attention_images=2,
        pattern_images=1,
        pattern_queries=6,
        ae_epochs=3,
        progress=False,
    )
    t0 = time.perf_counter()
    result = vit_heads.run_vit_heads(model, cfg)
    seconds = time.perf_counter() - t0
    print(f"\nclip-vit-b16 vit-heads (small test config): {seconds:.1f} s; timings {result.timings}")
    print(vit_heads.summary(result))
    _check_result(result, model, cfg)
    probes = result.tables["probes"].set_index("task")
    assert probes.loc["face", "test_accuracy"] >= 0.75  # CLIP tells LFW faces from background crops
    norms = result.tables["norms"]
    late = norms[(norms["token"] == "artifacts") & (norms["layer"] >= 8)]
    assert (late["n_tokens"] > 0).all() and (late["ratio"] > 5).all()  # the high-norm artifact tokens
    sinks = result.tables["sinks"]
    top = sinks.loc[sinks["alpha_artifacts"].idxmax()]
    assert top["alpha_artifacts"] > 5 * top["uniform_artifacts"]  # some heads attend to the artifacts
    artifacts = result.tables["artifacts"]
    assert artifacts["row"].between(0, 13).all() and (artifacts["ratio"] > cfg.artifact_ratio).all()
