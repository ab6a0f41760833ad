"""VHD, T-VHD and VHR (analyses.vhd).

Hand-built inputs with known answers for the rules (layers, outliers and median selection, T-VHD,
the word test), definitions checked against plain re-computations on the random ``tiny-llava``
(the own forward equals LLaVA's, teacher-forced VHD equals separate image / text-only runs, the
one-pass layer-by-layer selection equals a selection that re-runs the model after every layer),
and the runs end to end (tiny model; the real ``scene-llava`` once).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import probe
from analyses import vhd as vh
from analyses.runstore import open_run
from analyses.tasks import scene_captions as scc
from analyses.tasks import scenes as sc
from analyses.validation import parse_heads
from analyses.vhd.reinforcement import _decide
from probe import vlm
from probe.errors import ConfigError
from probe.loading import LoadedModel

_TINY: dict[str, LoadedModel] = {}
PROMPT = scc.CAPTION_PROMPT


def tiny() -> LoadedModel:
    if "llava" not in _TINY:
        _TINY["llava"] = probe.load_model("tiny-llava", device="cpu")
    return _TINY["llava"]


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    images = np.random.default_rng(seed).integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
    return tiny().preprocess(images)


SMALL = vh.VhdConfig(
    n_scenes=4,
    max_new_tokens=6,
    batch_size=3,
    n_boot=30,
    n_stats=100,
    pope_kinds=("adversarial",),
    pope_per_scene=1,
    sweep="off",
    validation=False,
    progress=False,
)


# ------------------------------------------------------------------------------------------ rules


def test_layer_sets() -> None:
    assert vh.parse_layers("paper", 30) == [1, *range(16, 30)]
    assert vh.parse_layers("paper", 32) == [1, *range(18, 32)]  # LLaVA-1.5-7B: index 1 + the last 14
    assert vh.parse_layers("paper", 3) == [0, 1, 2]
    assert vh.parse_layers("last:2", 5) == [3, 4] and vh.parse_layers("first:2", 5) == [0, 1]
    assert vh.parse_layers("4, 1,1", 5) == [1, 4] and vh.parse_layers([2, 0], 3) == [0, 2]
    thirds = [vh.parse_layers(t, 30) for t in ("early", "middle", "late")]
    assert thirds == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    assert [vh.parse_layers(t, 3) for t in ("early", "middle", "late")] == [[0], [1], [2]]
    assert sum(map(len, (vh.parse_layers(t, 31) for t in ("early", "middle", "late")))) == 31
    for bad in ("last:0", "7", "centre", "last:x"):
        with pytest.raises(ConfigError):
            vh.parse_layers(bad, 5)


def test_outliers_are_zeroed_before_the_median_selection() -> None:
    vhd = torch.tensor([[1.0, 2.0, 3.0, 10.0]])
    norm = torch.tensor([[1.0, 1.0, 1.0, 10.0]])
    # mean + std of vhd: 4 + 3.54 -> head 3 high; of norm: 3.25 + 3.90 -> head 3 high: an outlier
    chosen, outlier = _decide(vhd, norm, outlier_removal=True)
    assert outlier.tolist() == [[False, False, False, True]]
    assert chosen.tolist() == [[False, True, True, False]]  # [1, 2, 3, 0] above its median 1.5
    chosen, outlier = _decide(vhd, norm, outlier_removal=False)
    assert not outlier.any() and chosen.tolist() == [[False, False, True, True]]  # above 2.5
    # a high VHD with an ordinary norm is no outlier
    chosen, outlier = _decide(vhd, torch.tensor([[5.0, 5.0, 5.0, 5.0]]), outlier_removal=True)
    assert not outlier.any() and chosen.tolist() == [[False, False, True, True]]


def test_t_vhd_sums_the_top_k_of_each_layer() -> None:
    vhd = np.array([[[1.0, 5.0, 2.0], [0.5, 0.1, 3.0]]])  # [steps=1, layers=2, heads=3]
    assert vh.t_vhd(vhd, 1).tolist() == [5.0 + 3.0]
    assert vh.t_vhd(vhd, 2).tolist() == [7.0 + 3.5]
    assert vh.t_vhd(vhd, 9).tolist() == [8.0 + 3.6]
    assert np.isnan(vh.t_vhd(np.full((2, 2, 3), np.nan), 2)).all()


def test_word_test_counts_means_and_auroc() -> None:
    words = pd.DataFrame(
        {"t_vhd": [1.0, 2.0, 3.0, 10.0, 11.0], "hallucinated": [True, True, True, False, False]}
    )
    row = vh.tvhd_test(words).iloc[0]
    assert (row.n_hallucinated, row.n_correct) == (3, 2)
    assert row.mean_hallucinated == 2.0 and row.median_correct == 10.5
    assert row.auroc_correct == 1.0 and 0 < row.p_value < 0.5
    flipped = vh.tvhd_test(words.assign(hallucinated=~words["hallucinated"])).iloc[0]
    assert flipped.auroc_correct == 0.0
    empty = vh.tvhd_test(words[~words["hallucinated"]]).iloc[0]
    assert empty.n_hallucinated == 0 and np.isnan(empty.p_value)


def test_object_words_map_to_the_tokens_that_start_them() -> None:
    model = tiny()
    scenes = sc.make_scenes(20, seed=3)
    scene = next(s for s in scenes if "circle" in s.classes and "star" not in s.classes)
    text = "A red circle and two blue stars."
    tokens = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    table = vh.token_table(model, scene, tokens, np.arange(len(tokens), dtype=float), 0)
    assert "".join(table["token"]) == text
    objects = table[table["object"]]
    assert objects["shape"].tolist() == ["circle", "star"]
    assert objects["hallucinated"].tolist() == [False, True]
    for row in objects.itertuples():  # the word starts inside its token
        start = len("".join(table["token"][: row.step]))
        assert text.find(row.word) - start in range(len(row.token))


def test_noise_is_seeded_and_zero_noise_is_the_clean_render() -> None:
    scenes = sc.make_scenes(2, seed=0)
    clean = sc.render_batch(scenes)
    assert np.array_equal(vh.noisy_images(scenes, 0.0, 0), clean)
    a, b = vh.noisy_images(scenes, 30.0, 0), vh.noisy_images(scenes, 30.0, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, clean)
    assert not np.array_equal(a, vh.noisy_images(scenes, 30.0, 1))
    assert abs(float((a.astype(float) - clean).std()) - 30.0) < 6.0  # clipping shrinks it a little


def test_config_and_model_errors() -> None:
    with pytest.raises(ConfigError, match="split"):
        vh.VhdConfig(split="train")
    with pytest.raises(ConfigError, match="noise"):
        vh.VhdConfig(noise=-1)
    with pytest.raises(ConfigError, match="unique"):
        vh.VhdConfig(settings=(vh.VhrSetting("a"), vh.VhrSetting("a")))
    with pytest.raises(ConfigError, match="alpha"):
        vh.VhdConfig(settings=(vh.VhrSetting("a", alpha=-1.0),))
    vh.VhdConfig(settings=(vh.VhrSetting("a", alpha=0.0),))  # 0: the converse control, allowed
    with pytest.raises(ConfigError, match="sweep"):
        vh.VhdConfig(sweep="diagonal")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sweep"):
        vh.VhdConfig(sweep="cross", sweep_alphas=())
    with pytest.raises(ConfigError, match="n_null"):
        vh.VhdConfig(n_null=49)
    with pytest.raises(ConfigError, match="changes nothing"):
        vh.VhdConfig(validation_scales=(0.0, 1.0))
    with pytest.raises(ConfigError, match="0 or more"):
        vh.VhdConfig(sweep_alphas=(-0.5,))
    vh.VhdConfig(validation=False, n_null=1, validation_scales=())  # not checked when not run
    with pytest.raises(ConfigError, match="vision-language"):
        vh.run_vhd(probe.load_model("tiny-llama"), SMALL)
    with pytest.raises(ConfigError, match="layers"):
        vh.run_vhr(tiny(), replace_settings(SMALL, vh.VhrSetting("bad", layers="9")))


def replace_settings(cfg: vh.VhdConfig, *settings: vh.VhrSetting) -> vh.VhdConfig:
    return vh.VhdConfig(**{**cfg.__dict__, "settings": tuple(settings)})


# ------------------------------------------------------------------------------------------ definitions


def test_own_forward_equals_the_llava_forward() -> None:
    model = tiny()
    px = pixels(2)
    rows = vh.make_rows(model, [PROMPT, "Is there a star in the image?"], px, text_twin=False)
    got = vh.forward_rows(model, rows, read=list(range(rows.ids.shape[1])))
    positions = (rows.mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model.native_model(  # type: ignore[misc]
            input_ids=rows.ids,
            attention_mask=rows.mask,
            position_ids=positions,
            pixel_values=px,
        ).logits
    real = rows.mask.bool()
    assert torch.allclose(got[real], want[real].float(), atol=1e-5)


def test_teacher_forced_vhd_equals_separate_runs_step_by_step() -> None:
    model = tiny()
    px = pixels(2, seed=1)
    answers = [[40, 41, 42], [50, 51]]
    rows = vh.make_rows(model, [PROMPT, PROMPT], px, answers)
    vhd, norm, logits = vh.step_vhd(model, rows, 3)
    assert logits.shape[:2] == (2, 3)
    for b, answer in enumerate(answers):
        for t in range(len(answer)):
            outputs = {}
            for image in (True, False):
                ids = vlm.prompt_ids(model, PROMPT, image=image) + answer[:t]
                batch = model.batch_from_ids([ids])
                with vlm.capture_head_outputs(model) as cap, torch.no_grad():
                    model.native_model(  # type: ignore[misc]
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        pixel_values=px[b : b + 1] if image else None,
                    )
                outputs[image] = torch.stack(
                    [cap.outputs[layer][0][0, -1] for layer in range(model.n_layers)]
                )
            want = torch.linalg.vector_norm(outputs[True] - outputs[False], dim=-1)
            assert torch.allclose(vhd[b, t], want, atol=1e-5), (b, t)
            assert torch.allclose(norm[b, t], torch.linalg.vector_norm(outputs[False], dim=-1), atol=1e-5)


def _naive_selection(model: LoadedModel, rows: vh.Rows, setting: vh.VhrSetting) -> torch.Tensor:
    """Layer by layer the slow way: a full forward per layer with the scales decided so far."""
    layers = vh.parse_layers(setting.layers, model.n_layers)
    b = rows.n_image_rows
    scales = torch.ones(2 * b, model.n_layers, model.n_heads)
    for layer in layers:
        with vh.scale_heads(model, scales), vlm.capture_head_outputs(model, [layer]) as cap:
            vh.forward_rows(model, rows)
        z = (
            cap.outputs[layer][0][:, rows.width - 1].float() / scales[:, layer, :, None]
        )  # before this layer's scaling
        vhd = torch.linalg.vector_norm(z[:b] - z[b:], dim=-1)
        norm = torch.linalg.vector_norm(z[b:], dim=-1)
        chosen, _ = _decide(vhd, norm, setting.outlier_removal)
        factor = torch.where(chosen, torch.tensor(setting.alpha), torch.tensor(1.0))
        scales[:, layer] = torch.cat([factor, factor])
    return scales[:b]


@pytest.mark.parametrize("outliers", [True, False])
def test_one_pass_selection_equals_re_running_after_every_layer(outliers: bool) -> None:
    model = tiny()
    rows = vh.make_rows(model, [PROMPT] * 3, pixels(3, seed=2))
    setting = vh.VhrSetting("t", alpha=2.0, layers="all", outlier_removal=outliers)
    got = vh.select_heads(model, rows, setting)
    assert torch.equal(got.scales, _naive_selection(model, rows, setting))
    assert got.selected.any() and torch.equal(got.scales != 1, got.selected)
    # the first layer's first-step VHD is that of the unedited model
    vhd, _, _ = vh.step_vhd(model, rows, 1)
    assert torch.allclose(got.vhd[:, 0], vhd[:, 0, 0], atol=1e-5)


def test_head_scaling_multiplies_exactly_the_chosen_head_and_undoes_itself() -> None:
    model = tiny()
    rows = vh.make_rows(model, [PROMPT], pixels(1), text_twin=False)
    before = vh.forward_rows(model, rows)
    scales = torch.ones(1, model.n_layers, model.n_heads)
    with vh.scale_heads(model, scales):
        assert torch.equal(vh.forward_rows(model, rows), before)  # alpha = 1 is the identity
    scales[0, 0, 1] = 3.0
    with vlm.capture_head_outputs(model, [0]) as plain:
        vh.forward_rows(model, rows)
    native = model.native_model
    with vh.scale_heads(model, scales):
        seen: list[torch.Tensor] = []
        module = native.get_submodule(vlm.LAYOUT.block(0, vlm.LAYOUT.out_proj))  # type: ignore[union-attr]
        handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        try:
            changed = vh.forward_rows(model, rows)
        finally:
            handle.remove()
    z = plain.outputs[0][0]
    want = z.clone()
    want[..., 1, :] *= 3.0
    assert torch.allclose(seen[0].reshape(want.shape), want, atol=1e-6)
    assert not torch.allclose(changed, before)
    assert torch.equal(vh.forward_rows(model, rows), before)  # hooks removed


# ------------------------------------------------------------------------------------------ runs


def test_vhr_run_end_to_end_on_the_tiny_model(tmp_path: Path) -> None:
    cfg = replace_settings(
        SMALL,
        vh.VhrSetting("vhr"),
        vh.VhrSetting("identity", alpha=1.0),
        vh.VhrSetting("random heads", random=True),
    )
    result = vh.run_vhr(tiny(), cfg)
    t = result.tables
    assert result.notes["teacher_forced_agreement"] == 1.0
    assert set(t["captions"]["setting"]) == {"baseline", "vhr", "identity", "random heads"}
    base = t["captions"][t["captions"]["setting"] == "baseline"]["text"].tolist()
    same = t["captions"][t["captions"]["setting"] == "identity"]["text"].tolist()
    assert same == base  # alpha = 1 changes nothing
    d = t["deltas"][t["deltas"]["setting"] == "identity"]
    assert (
        (d["delta"].fillna(0) == 0).all()
        and (d["lo"].fillna(0) == 0).all()
        and (d["hi"].fillna(0) == 0).all()
    )
    s = t["settings"].set_index("name")
    assert s.loc["random heads", "heads_reinforced_mean"] == s.loc["vhr", "heads_reinforced_mean"] > 0
    heads = t["heads"]
    assert len(heads) == tiny().n_layers * tiny().n_heads
    assert heads["selected_share"].between(0, 1).all() and (heads["vhd_mean"] > 0).all()
    vhd = result.arrays["vhd"]
    assert vhd.shape[:1] == (4,) and vhd.shape[2:] == (tiny().n_layers, tiny().n_heads)
    lengths = t["tokens"].groupby("scene")["step"].max() + 1
    for scene, n in lengths.items():
        assert np.isfinite(vhd[scene, :n]).all() and np.isnan(vhd[scene, n:]).all()
    assert set(t["pope"]["setting"]) == set(t["captions"]["setting"]) and len(t["pope"]) == 4 * 4 * 2
    run = open_run(result.save(tmp_path))
    assert run.manifest.analysis == "vhr" and "T-VHD" in vh.summary(result)


def test_vhd_run_has_no_vhr_settings() -> None:
    result = vh.run_vhd(tiny(), replace_settings(SMALL, vh.VhrSetting("vhr")))
    assert set(result.tables["captions"]["setting"]) == {"baseline"}
    assert result.tables["settings"].empty and "selected_share" not in result.tables["heads"]


def test_a_run_leaves_the_model_as_it_was() -> None:
    model = tiny()
    state = copy.deepcopy(model.native_model.state_dict())  # type: ignore[union-attr]
    rows = vh.make_rows(model, [PROMPT], pixels(1), text_twin=False)
    before = vh.forward_rows(model, rows)
    doubled = torch.full((1, model.n_layers, model.n_heads), 2.0)
    with pytest.raises(RuntimeError, match="boom"), vh.scale_heads(model, doubled):
        assert not torch.equal(vh.forward_rows(model, rows), before)  # the hooks are active here
        raise RuntimeError("boom")
    assert torch.equal(vh.forward_rows(model, rows), before)
    after = model.native_model.state_dict()  # type: ignore[union-attr]
    assert all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.real
def test_scene_llava_reads_the_scene_and_generation_is_reproduced() -> None:
    model = probe.load_model("scene-llava")
    cfg = vh.VhdConfig(
        n_scenes=2,
        split="iid",
        noise=0.0,
        max_new_tokens=16,
        batch_size=2,
        ablations=False,
        pope_kinds=(),
        n_boot=20,
        sweep="off",
        validation=False,
        progress=False,
    )
    result = vh.run_vhr(model, cfg)
    assert result.notes["teacher_forced_agreement"] == 1.0
    captions = result.tables["captions"]
    base = captions[captions["setting"] == "baseline"]
    assert base["n_correct"].sum() >= 2  # the trained projector names objects that are there
    heads = result.tables["heads"]
    assert heads["vhd_first"].notna().all() and (heads["vhd_mean"] > 0).all()


def test_a_llava_checkpoint_directory_runs_the_same_analysis(tmp_path: Path) -> None:
    """The path users with real LLaVA weights take: a local LlavaForConditionalGeneration directory."""
    directory = vlm.save_checkpoint(tiny(), tmp_path / "llava")
    loaded = probe.load_model(str(directory), device="cpu")
    assert loaded.kind == "vision-language" and loaded.family == "llava"
    cfg = vh.VhdConfig(**{**SMALL.__dict__, "pope_kinds": ()})
    got, want = vh.run_vhd(loaded, cfg), vh.run_vhd(tiny(), cfg)
    assert got.tables["captions"]["text"].tolist() == want.tables["captions"]["text"].tolist()
    assert np.allclose(got.tables["heads"]["vhd_mean"], want.tables["heads"]["vhd_mean"], atol=1e-5)


def test_pope_can_be_limited_to_the_baseline_and_the_main_setting() -> None:
    cfg = vh.VhdConfig(
        **{
            **replace_settings(SMALL, vh.VhrSetting("vhr"), vh.VhrSetting("alpha=3", alpha=3.0)).__dict__,
            "pope_ablations": False,
        }
    )
    t = vh.run_vhr(tiny(), cfg).tables
    assert set(t["pope"]["setting"]) == {"baseline", "vhr"}
    assert set(t["captions"]["setting"]) == {"baseline", "vhr", "alpha=3"}
    pope_deltas = t["deltas"][t["deltas"]["benchmark"] == "POPE"]
    assert set(pope_deltas["setting"]) == {"vhr"}


def test_paired_deltas_are_the_differences_of_the_summaries() -> None:
    scenes = sc.make_scenes(6, seed=5)
    base_texts = [f"A {s.classes[0]}." for s in scenes]
    other_texts = ["A circle and a star." for _ in scenes]
    captions = pd.concat(
        [
            scc.chair_table(scenes, t).assign(setting=name)
            for name, t in (("baseline", base_texts), ("x", other_texts))
        ],
        ignore_index=True,
    )
    silent = scc.chair_table(scenes, ["Nothing."] * 6).assign(setting="silent")
    captions = pd.concat([captions, silent], ignore_index=True)
    d = vh.paired_deltas(captions, pd.DataFrame(), len(scenes), SMALL).set_index(["setting", "metric"])[
        "delta"
    ]
    for metric in ("CHAIR_S", "CHAIR_I", "recall"):
        want = {}
        for name in ("baseline", "x"):
            frame = captions[captions["setting"] == name].drop(columns="setting")
            want[name] = scc.chair_summary(frame, n_boot=10).set_index("metric").loc[metric, "value"]
        assert d[("x", metric)] == pytest.approx(want["x"] - want["baseline"])
    assert np.isnan(d[("silent", "CHAIR_I")])  # no object named: CHAIR_I is undefined, not 0


# ------------------------------------------------------------------------------------------ sweep


def test_sweep_settings_cross_grid_and_reuse_of_the_chosen_ones() -> None:
    main = vh.VhrSetting("vhr", alpha=2.0, layers="paper")
    cross = vh.VhdConfig(settings=(main,), sweep_alphas=(0.5, 2.0), sweep_layers=("paper", "late"))
    names = [s.name for s in vh.sweep_settings(cross)]
    # every alpha at the main layers, then every layer set at the main alpha; (2, paper) once
    assert names == ["alpha=0.5 layers=paper", "alpha=2 layers=paper", "alpha=2 layers=late"]
    grid = vh.VhdConfig(**{**cross.__dict__, "sweep": "grid"})
    assert len(vh.sweep_settings(grid)) == 4
    assert not vh.sweep_settings(vh.VhdConfig(**{**cross.__dict__, "sweep": "off"}))
    extra, points = vh.sweep_plan(cross, [main])
    assert [p.name for p in points] == ["alpha=0.5 layers=paper", "vhr", "alpha=2 layers=late"]
    assert [e.name for e in extra] == ["alpha=0.5 layers=paper", "alpha=2 layers=late"]
    assert all(p.outlier_removal == main.outlier_removal for p in points)


def test_sweep_lines_name_the_best_and_worst_and_the_converse_by_hand() -> None:
    rows = []
    for name, alpha, d_s, d_r in (("a", 1.5, 0.10, -0.05), ("b", 2.0, -0.20, 0.02), ("c", 0.0, -0.30, 0.04)):
        for metric, d in (("CHAIR_S", d_s), ("CHAIR_I", 0.0), ("recall", d_r)):
            kind = "suppress" if alpha < 1 else "reinforce"
            rows.append(
                {"setting": name, "alpha": alpha, "intervention": kind, "metric": metric}
                | {"delta": d, "delta_lo": d - 0.1, "delta_hi": d + 0.1}
            )
    lines = vh.sweep_lines(pd.DataFrame(rows))
    assert lines[0].startswith("  sweep best: b ΔCHAIR_S -0.200") and "Δrecall +0.020" in lines[0]
    assert lines[1].startswith("  sweep worst: a ΔCHAIR_S +0.100")
    # median reinforcing ΔCHAIR_S = -0.05, Δrecall = -0.015; the suppression: -0.30, +0.04
    assert "CHAIR_S the same way (-0.300 vs median reinforcing -0.050)" in lines[2]
    assert "recall the other way (+0.040 vs median reinforcing -0.015)" in lines[2]
    assert vh.sweep_lines(pd.DataFrame()) == []


# ------------------------------------------------------------------------------------------ validation


def _selection(selected: list[list[list[bool]]]) -> vh.Selection:
    mask = torch.tensor(selected)
    zeros = torch.zeros(mask.shape)
    return vh.Selection(torch.where(mask, 2.0, 1.0), mask, zeros.bool(), zeros, zeros)


def test_vhr_heads_are_those_selected_on_most_inputs_by_hand() -> None:
    # 3 inputs, 2 layers x 3 heads: L0H0 3/3, L0H1 2/3, L1H2 2/3, L1H0 1/3
    first = _selection(
        [[[True, True, False], [True, False, True]], [[True, True, False], [False, False, True]]]
    )
    second = _selection([[[True, False, False], [False, False, False]]])
    assert vh.vhr_heads([first, second]) == [(0, 0), (0, 1), (1, 2)]
    assert vh.vhr_heads([first, second], min_share=0.9) == [(0, 0)]
    assert vh.vhr_heads([first, second], limit=2) == [(0, 0), (0, 1)]  # ties: the lower layer
    assert vh.vhr_heads([]) == []


def test_discrimination_is_present_minus_absent_margin_per_scene_by_hand() -> None:
    scene = np.array([0, 0, 0, 1, 1, 2])
    label = np.array([True, True, False, True, False, True])
    margin = np.array([3.0, 1.0, -1.0, 0.5, 2.5, 4.0])
    got = vh.discrimination(scene, label, margin, 4)
    assert got[:2].tolist() == [2.0 - (-1.0), 0.5 - 2.5]
    assert np.isnan(got[2]) and np.isnan(got[3])  # no absent question; no question at all


def test_cheap_margin_equals_the_first_generated_step_under_scaled_heads() -> None:
    """The validation's one-forward Yes − No margin is the first step of generation, scaled or not."""
    model = tiny()
    prompts = ["Is there a star in the image?", "Is there a ring in the image?"]
    px = pixels(2, seed=3)
    rows = vh.make_rows(model, prompts, px, text_twin=False)
    rows.features = vh.project_images(model, px)
    yes_no = _yes_no(model)
    scales = vh.head_scales(model, [(0, 1), (2, 3)], 0.0)
    assert scales.sum() == model.n_layers * model.n_heads - 2
    for s in (None, scales):
        want = vh.generate_ids(model, prompts, px, 1, s, yes_no=True).margins
        assert vh.margins_under(model, rows, yes_no, s) == pytest.approx(want, abs=1e-4)
    assert not np.allclose(
        vh.margins_under(model, rows, yes_no, None), vh.margins_under(model, rows, yes_no, scales)
    )


def _yes_no(model: LoadedModel) -> tuple[int, int]:
    tok = model.tokenizer
    return tok("Yes", add_special_tokens=False)["input_ids"][0], tok("No", add_special_tokens=False)[
        "input_ids"
    ][0]


def test_sweep_and_validation_tables_on_the_tiny_model() -> None:
    cfg = vh.VhdConfig(
        **{
            **replace_settings(SMALL, vh.VhrSetting("vhr")).__dict__,
            "ablations": False,
            "sweep": "cross",
            "sweep_alphas": (0.5, 2.0),
            "sweep_layers": ("paper", "late"),
            "validation": True,
            "held_out_scenes": 3,
            "validation_scales": (0.0, 2.0),
        }
    )
    result = vh.run_vhr(tiny(), cfg)
    t = result.tables
    sweep = t["sweep"]
    points = ["alpha=0.5 layers=paper", "vhr", "alpha=2 layers=late"]
    assert sweep["setting"].drop_duplicates().tolist() == points and len(sweep) == 3 * 3
    assert set(t["captions"]["setting"]) == {"baseline", *points}
    assert set(t["pope"]["setting"]) == {"baseline", "vhr"}  # no POPE under the sweep's own settings
    assert sweep.set_index("setting")["intervention"].to_dict()["alpha=0.5 layers=paper"] == "suppress"
    assert sweep.loc[sweep["setting"] == "alpha=2 layers=late", "layers_used"].iloc[0] == "2"
    deltas = t["deltas"][t["deltas"]["benchmark"] == "CHAIR"].set_index(["setting", "metric"])
    values = t["summary"][t["summary"]["benchmark"] == "CHAIR"].set_index(["vhr_setting", "metric"])
    for r in sweep.itertuples():
        assert r.delta == deltas.loc[(r.setting, r.metric), "delta"] or np.isnan(r.delta)
        assert r.value == values.loc[(r.setting, r.metric), "value"] or np.isnan(r.value)
        assert r.baseline == values.loc[("baseline", r.metric), "value"] or np.isnan(r.baseline)

    v = t["validation"]
    assert v["role"].tolist() == ["vhr-suppress", "vhr-reinforce"] and v["scale"].tolist() == [0.0, 2.0]
    assert v["direction"].tolist() == ["lower", "higher"]
    tested = parse_heads(v["heads"].iloc[0])
    # tiny-llava: 12 heads in the paper layers; at most half tested, every other-half set is the null
    assert 0 < len(tested) <= 6 and (v["n_null"] == math.comb(12 - len(tested), len(tested))).all()
    assert (v["n_inputs"] == 3).all() and v["inputs"].str.contains("scenes 4-6").all()
    heads = t["heads"].set_index(["layer", "head"])
    roles = heads["vhr_role"]
    assert set(roles[roles != ""].index) == set(tested)
    assert (roles[roles != ""] == "vhr-suppress+vhr-reinforce").all()
    text = vh.summary(result)
    assert "sweep best" in text and "held-out validation" in text and "vhr-suppress" in text
