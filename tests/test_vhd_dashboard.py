"""The VHD page (callbacks called directly and through Dash), its views and its report sections, on
``vhd`` / ``vhr`` runs of the tiny random LLaVA (3 layers x 4 heads; its captions are random text,
so it names no object), plus a copy of the vhr run whose tables were hand-edited to hold correct and
hallucinated object words: the figures must show exactly the tables and arrays."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from dash import Dash
from plotly.utils import PlotlyJSONEncoder

import probe
from analyses import runstore
from analyses import vhd as vh
from analyses.base import AnalysisResult
from dashboard import report
from dashboard.app import build_pages, create_app
from dashboard.catalog import RunCatalog
from dashboard.core.home import HomePage
from dashboard.core.page import Site
from dashboard.registry import pages, section_builder
from dashboard.vhd import figures, sweep, views
from dashboard.vhd import report as vhd_section
from dashboard.vhd.page import VhdPage
from tests.conftest import decode_array, fixed_revision, post_callback, render_route, to_json

N_SCENES = 4
N_DISPLAY = 2  # fewer than the scenes: the later scenes' images are not stored


@dataclass(frozen=True)
class Runs:
    root: Path
    vhr: str
    vhd: str
    marked: str  # the vhr run with hand-set object words
    census: str
    result: AnalysisResult  # the unsaved vhr result
    correct_scene: int  # hand-set: its step 0 is a correct object word ("heart")
    bad_scene: int  # hand-set: step 0 hallucinated ("star"), its last step correct ("circle")
    bad_last_step: int


def _mark(result: AnalysisResult) -> tuple[AnalysisResult, int, int, int]:
    """A copy of ``result`` whose tokens, words, test and main-VHR captions hold hand-set words."""
    tables = {name: frame.copy() for name, frame in result.tables.items()}
    t = tables["tokens"]
    lengths = t.groupby("scene")["step"].max()
    scenes = [int(s) for s, last in lengths.items() if last >= 1]
    assert len(scenes) >= 2, "the tiny run needs two captions of at least two tokens"
    good, bad = scenes[0], scenes[-1]
    last = int(lengths[bad])
    t["object"] = t["object"].astype(bool)
    t["hallucinated"] = t["hallucinated"].astype(bool)
    for scene, step, word, hallucinated in (
        (good, 0, "heart", False),
        (bad, 0, "star", True),
        (bad, last, "circle", False),
    ):
        at = (t["scene"] == scene) & (t["step"] == step)
        assert at.sum() == 1
        t.loc[at, ["object", "word", "shape", "hallucinated"]] = [True, word, word, hallucinated]
    # distinct, known T-VHD values so that the distribution is easy to check
    t.loc[(t["scene"] == bad) & (t["step"] == 0), "t_vhd"] = 1.0
    t.loc[(t["scene"] == good) & (t["step"] == 0), "t_vhd"] = 5.0
    t.loc[(t["scene"] == bad) & (t["step"] == last), "t_vhd"] = 6.0
    tables["tokens"] = t
    tables["words"] = t[t["object"]].reset_index(drop=True)
    tables["tvhd_test"] = vh.tvhd_test(tables["words"])
    caps = tables["captions"]
    at = (caps["setting"] == vh.MAIN) & (caps["scene"] == bad)
    caps.loc[at, "hallucinated"] = "star"
    caps.loc[at, "mentioned"] = "star"
    tables["captions"] = caps
    return dataclasses.replace(result, tables=tables), good, bad, last


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("vhd-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
        model = probe.load_model("tiny-llava", device="cpu")
        cfg = vh.VhdConfig(
            n_scenes=N_SCENES,
            max_new_tokens=6,
            batch_size=4,
            n_boot=20,
            n_stats=100,
            pope_kinds=("adversarial",),
            pope_per_scene=1,
            n_display=N_DISPLAY,
            sweep_alphas=(0.5, 2.0),
            sweep_layers=("paper", "late"),
            held_out_scenes=2,
            validation_scales=(0.0,),
            progress=False,
        )
        vhr = vh.run_vhr(model, cfg)
        vhd = vh.run_vhd(model, cfg)
        marked, good, bad, last = _mark(vhr)
        paths = [r.save(root) for r in (vhr, vhd, marked)]
        census = runstore.write_run(
            root,
            analysis="census",
            model_info={"name": "m"},
            config={},
            tables={"heads": pd.DataFrame({"layer": [0], "head": [0], "x": [1.0]})},
        )
    yield Runs(root, paths[0].name, paths[1].name, paths[2].name, census.name, vhr, good, bad, last)


def _run(runs: Runs, run_id: str) -> runstore.Run:
    return runstore.open_run(runs.root / run_id)


def _page(root: Path) -> VhdPage:
    return VhdPage(Site(catalog=RunCatalog(root), analysis_paths={"vhd": "/vhd", "vhr": "/vhd"}))


def _trace(fig: Any, name: str) -> Any:
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, [t.name for t in fig.data]
    return found[0]


# ---------------------------------------------------------------------------------------- heads


def test_heads_figure_shows_each_metric_and_marks_the_vhr_layers(runs: Runs) -> None:
    run = _run(runs, runs.vhr)
    heads = run.heads
    assert views.head_metrics(run) == list(views.HEAD_METRICS)
    layers = views.vhr_layers(run)
    assert layers == sorted(int(v) for v in heads.loc[heads["in_vhr_layers"].astype(bool), "layer"].unique())
    assert layers  # "paper" on 3 layers: layer 1 and the last 14, so every layer
    for metric in views.HEAD_METRICS:
        fig = figures.heads_figure(run, metric)
        expected = heads.pivot(index="layer", columns="head", values=metric).to_numpy(dtype=float)
        np.testing.assert_allclose(np.asarray(decode_array(fig.data[0].z), dtype=float), expected)
        assert metric in fig.data[0].hovertemplate
        assert len(fig.layout.shapes) == len(layers)  # one outline per VHR layer
        assert [t for t in fig.layout.yaxis.ticktext if t.startswith("▸")] == [f"▸ {v}" for v in layers]
    first = np.asarray(decode_array(figures.heads_figure(run, "vhd_mean").data[0].z), dtype=float)
    second = np.asarray(decode_array(figures.heads_figure(run, "text_norm_first").data[0].z), dtype=float)
    assert not np.allclose(first, second)
    with pytest.raises(KeyError, match="unknown metric"):
        figures.heads_figure(run, "nonsense")


def test_a_vhd_run_has_no_vhr_columns_layers_or_deltas(runs: Runs) -> None:
    run = _run(runs, runs.vhd)
    assert run.analysis == "vhd"
    assert views.head_metrics(run) == ["vhd_mean", "vhd_first", "text_norm_first"]
    assert views.vhr_layers(run) == [] and views.main_setting(run) is None
    fig = figures.heads_figure(run, "vhd_mean")
    assert not fig.layout.shapes and not any("▸" in t for t in fig.layout.yaxis.ticktext)
    with pytest.raises(KeyError, match="selected_share"):
        figures.heads_figure(run, "selected_share")
    deltas = figures.deltas_figure(run)
    assert not deltas.data and "No VHR setting" in deltas.layout.annotations[0].text.replace("<br>", " ")
    assert [c.setting for c in views.scene_captions(run, views.caption_scenes(run)[0])] == ["baseline"]
    assert "no VHR settings" in views.settings_line(run)


# ---------------------------------------------------------------------------------------- T-VHD


def test_caption_figure_on_random_text_has_only_plain_tokens(runs: Runs) -> None:
    run = _run(runs, runs.vhr)
    assert run.table("words").empty  # random text: no object word
    scene = views.default_scene(run)
    assert scene == views.caption_scenes(run)[0]
    fig = figures.tvhd_caption_figure(run, scene)
    assert [t.name for t in fig.data if t.type == "bar"] == ["other token"]
    mean = float(run.table("tokens")["t_vhd"].mean())
    assert list(fig.data[-1].y) == [mean, mean] and f"({mean:.2f})" in fig.data[-1].name
    tokens = run.table("tokens")
    rows = tokens[tokens["scene"] == scene].sort_values("step")
    np.testing.assert_allclose(np.asarray(fig.data[0].y, dtype=float), rows["t_vhd"].to_numpy(float))
    assert list(fig.layout.xaxis.tickvals) == rows["step"].tolist()
    assert len(fig.layout.xaxis.ticktext) == len(rows)
    with pytest.raises(KeyError, match="no baseline caption"):
        figures.tvhd_caption_figure(run, 999)


def test_caption_figure_colours_the_hand_set_words(runs: Runs) -> None:
    run = _run(runs, runs.marked)
    assert views.hallucinating_scenes(run) == [runs.bad_scene]
    assert views.default_scene(run) == runs.bad_scene  # the first scene with a hallucinated word
    options = views.scene_options(run)
    assert [o["value"] for o in options] == views.caption_scenes(run)
    assert "hallucinates star" in next(o["label"] for o in options if o["value"] == runs.bad_scene)
    fig = figures.tvhd_caption_figure(run, runs.bad_scene)
    bad = _trace(fig, "hallucinated object word")
    good = _trace(fig, "correct object word")
    assert bad.marker.color == figures.HALLUCINATED_COLOUR == "#d62728"
    assert good.marker.color == figures.CORRECT_COLOUR == "#2ca02c"
    assert list(bad.x) == [0] and list(bad.y) == [1.0] and list(bad.text) == ["star"]
    assert list(good.x) == [runs.bad_last_step] and list(good.y) == [6.0] and list(good.text) == ["circle"]
    other = _trace(fig, "other token")
    assert other.marker.color == figures.TOKEN_COLOUR
    assert sorted([*other.x, *bad.x, *good.x]) == list(range(runs.bad_last_step + 1))
    ticks = list(fig.layout.xaxis.ticktext)
    assert figures.HALLUCINATED_COLOUR in ticks[0] and figures.CORRECT_COLOUR in ticks[-1]
    assert all("color" not in t for t in ticks[1:-1])
    assert "1 correct and 1 hallucinated" in fig.layout.title.subtitle.text.replace("<br>", " ")
    # the legend sits at the foot of the figure, under the axis title, whose margin holds the
    # rotated tokens, the axis title and the legend (it used to be drawn over the axis title)
    legend = fig.layout.legend
    assert (legend.yref, legend.y, legend.yanchor, legend.orientation) == ("container", 0, "bottom", "h")
    longest = max(
        len(figures._tick(t)) for t in run.table("tokens").query(f"scene == {runs.bad_scene}")["token"]
    )
    assert fig.layout.margin.b >= 80 + 5 * min(longest, 24)
    # the other scene: one correct word, no red
    fig = figures.tvhd_caption_figure(run, runs.correct_scene)
    assert [t.name for t in fig.data if t.type == "bar"] == ["other token", "correct object word"]
    assert figures.HALLUCINATED_COLOUR not in json.dumps(fig.to_plotly_json(), cls=PlotlyJSONEncoder)


def test_distribution_and_test_line(runs: Runs) -> None:
    plain = _run(runs, runs.vhr)
    fig = figures.tvhd_distribution_figure(plain)
    assert not fig.data and "no object word" in fig.layout.annotations[0].text.replace("<br>", " ")
    line = views.tvhd_test_line(plain)
    assert "n = 0" in line and "p = n/a" in line and "both kinds" in line

    run = _run(runs, runs.marked)
    fig = figures.tvhd_distribution_figure(run)
    boxes = {t.name: t for t in fig.data}
    assert set(boxes) == {"correct object words (n = 2)", "hallucinated object words (n = 1)"}
    assert sorted(boxes["correct object words (n = 2)"].y) == [5.0, 6.0]
    assert list(boxes["hallucinated object words (n = 1)"].y) == [1.0]
    assert boxes["correct object words (n = 2)"].marker.color == figures.CORRECT_COLOUR
    assert boxes["hallucinated object words (n = 1)"].marker.color == figures.HALLUCINATED_COLOUR
    assert all(b.boxpoints == "all" for b in boxes.values())
    test = run.table("tvhd_test").iloc[0]
    assert int(test["n_hallucinated"]) == 1 and int(test["n_correct"]) == 2
    line = views.tvhd_test_line(run)
    assert f"p = {float(test['p_value']):.3g}" in line and f"{float(test['auroc_correct']):.3f}" in line
    assert "mean T-VHD 1.00" in line and "mean 5.50" in line
    assert f"{float(test['auroc_correct']):.3f}" in fig.layout.title.subtitle.text.replace("<br>", " ")


def test_image_and_captions_of_a_scene(runs: Runs) -> None:
    from PIL import Image

    run = _run(runs, runs.marked)
    images = run.array("images")
    assert images.shape[0] == N_DISPLAY
    fig = figures.image_figure(run, 1)
    source = fig.data[0].source
    assert source.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"))
    np.testing.assert_array_equal(decoded, images[1])
    missing = figures.image_figure(run, N_SCENES - 1)
    assert not missing.data and "was not stored" in missing.layout.annotations[0].text.replace("<br>", " ")
    caps = views.scene_captions(run, runs.bad_scene)
    assert [c.setting for c in caps] == ["baseline", "vhr"]
    assert caps[1].hallucinated == ["star"] and caps[0].hallucinated == []
    captions = run.table("captions")
    baseline = captions[(captions["setting"] == "baseline") & (captions["scene"] == runs.bad_scene)]
    assert caps[0].text == baseline["text"].iloc[0]


# ---------------------------------------------------------------------------------------- benchmarks


def test_benchmark_figure_shows_the_summary_with_intervals_baseline_first(runs: Runs) -> None:
    run = _run(runs, runs.vhr)
    summary = run.table("summary")
    settings = run.table("settings")["name"].tolist()
    fig = figures.benchmark_figure(run)
    names = [t.name for t in fig.data]
    assert names == [
        "CHAIR captions CHAIR_S",
        "CHAIR captions CHAIR_I",
        "CHAIR captions recall",
        "CHAIR captions words",
        "POPE adversarial F1",
        "POPE adversarial accuracy",
    ]
    for trace in fig.data:
        bench, kind, metric = trace.name.split(" ")
        # POPE is asked under the baseline and the chosen settings, never under the sweep's own
        asked = [
            "baseline",
            *[n for n in settings if bench == "CHAIR" or n in set(run.table("pope")["setting"])],
        ]
        assert list(trace.x) == asked
        part = summary[
            (summary["benchmark"] == bench) & (summary["setting"] == kind) & (summary["metric"] == metric)
        ]
        part = part.set_index("vhr_setting").loc[list(trace.x)]
        np.testing.assert_allclose(
            np.asarray(trace.y, dtype=float), part["value"].to_numpy(float), equal_nan=True
        )
        upper = np.nan_to_num(np.maximum(part["hi"].to_numpy(float) - part["value"].to_numpy(float), 0))
        np.testing.assert_allclose(np.asarray(trace.error_y.array, dtype=float), upper)
    # CHAIR_I is undefined when no caption names an object: said, not drawn
    assert any("undefined" in (a.text or "") for a in fig.layout.annotations)


def test_deltas_figure_shows_each_setting_with_a_zero_line(runs: Runs) -> None:
    run = _run(runs, runs.vhr)
    deltas = run.table("deltas")
    settings = run.table("settings")["name"].tolist()
    fig = figures.deltas_figure(run)
    assert [t.name for t in fig.data] == [
        "Δ CHAIR captions CHAIR_S",
        "Δ CHAIR captions CHAIR_I",
        "Δ CHAIR captions recall",
        "Δ POPE adversarial F1",
        "Δ POPE adversarial accuracy",
    ]
    for trace in fig.data:
        _, bench, kind, metric = trace.name.split(" ")
        asked = [n for n in settings if bench == "CHAIR" or n in set(run.table("pope")["setting"])]
        assert list(trace.x) == asked
        part = deltas[
            (deltas["benchmark"] == bench) & (deltas["kind"] == kind) & (deltas["metric"] == metric)
        ]
        part = part.set_index("setting").loc[asked]
        np.testing.assert_allclose(np.asarray(trace.y, dtype=float), part["delta"].to_numpy(float))
    zero_lines = [s for s in fig.layout.shapes if s.y0 == 0 and s.y1 == 0]
    assert len(zero_lines) == len(fig.data)
    # colours: green better, red worse, grey when the interval holds 0
    assert views.verdict("CHAIR_S", -0.3, -0.1) == "better" and views.verdict("F1", -0.3, -0.1) == "worse"
    assert (
        views.verdict("CHAIR_I", -0.1, 0.2) == "unclear"
        and views.verdict("F1", 0.1, float("nan")) == "unclear"
    )


def test_findings_read_the_tables(runs: Runs) -> None:
    run = _run(runs, runs.marked)
    lines = views.findings(run)
    text = " ".join(lines)
    heads = run.heads
    top = heads.loc[heads["vhd_mean"].idxmax()]
    assert f"layer {int(top['layer'])}, head {int(top['head'])}" in text
    test = run.table("tvhd_test").iloc[0]
    direction = "is lower" if test["mean_hallucinated"] < test["mean_correct"] else "is not lower"
    assert direction in text and "n = 1" in text and "n = 2" in text
    assert "main VHR setting 'vhr'" in text
    base = run.table("summary")
    f1 = base[(base["vhr_setting"] == "baseline") & (base["metric"] == "F1")].iloc[0]
    assert f"baseline F1 {float(f1['value']):.3f}" in text
    assert "undefined" in text  # CHAIR_I with no mentioned object in the baseline
    # the saved run and the unsaved result read alike
    assert views.findings(_run(runs, runs.vhr)) == views.findings(runs.result)
    vhd_lines = " ".join(views.findings(_run(runs, runs.vhd)))
    assert "VHR" not in vhd_lines and "no object word" in vhd_lines


# ---------------------------------------------------------------------------------------- the page


def test_page_is_registered_offers_vhd_and_vhr_runs_and_renders(runs: Runs) -> None:
    assert VhdPage in pages() and VhdPage.shown_analyses() == ("vhd", "vhr")
    page = _page(runs.root)
    offered = {o["value"] for o in page.run_options()}
    assert offered == {runs.vhr, runs.vhd, runs.marked}  # not the census run
    text = to_json(page.layout({"run": runs.marked, "metric": "outlier_share"}))
    for element in (
        "vhd-run",
        "vhd-settings",
        "vhd-findings",
        "vhd-metric",
        "vhd-heads",
        "vhd-words",
        "vhd-test",
        "vhd-scene",
        "vhd-caption",
        "vhd-image",
        "vhd-captions",
        "vhd-benchmarks",
        "vhd-deltas",
    ):
        assert f'"id": "{element}"' in text
    assert '"value": "outlier_share"' in text and f'"value": {runs.bad_scene}' in text
    assert page.metric_choice(runs.vhd, "selected_share")[1] == "vhd_mean"
    assert [o["value"] for o in page.metric_choice(runs.vhd, None)[0]] == [
        "vhd_mean",
        "vhd_first",
        "text_norm_first",
    ]
    assert page.metric_choice(runs.vhr, "selected_share")[1] == "selected_share"
    assert page.metric_choice(None, None) == ([], None) and page.metric_choice(runs.census, None) == (
        [],
        None,
    )


def test_page_callbacks(runs: Runs) -> None:
    page = _page(runs.root)
    # the scene: kept while the run stays, the run's default when the run changes
    assert page.scene_choice(runs.marked, runs.correct_scene)[1] == runs.correct_scene
    assert page.scene_choice(runs.marked, runs.correct_scene, "vhd-run")[1] == runs.bad_scene
    assert page.scene_choice(runs.marked, 999)[1] == runs.bad_scene
    caption = page.caption_figure(runs.marked, runs.bad_scene)
    assert _trace(caption, "hallucinated object word").marker.color == figures.HALLUCINATED_COLOUR
    assert "no scene" in page.caption_figure(runs.marked, None).layout.annotations[0].text.replace(
        "<br>", " "
    )
    assert page.image_figure(runs.marked, 0).data[0].source.startswith("data:image/png")
    block = to_json(page.captions_block(runs.marked, runs.bad_scene))
    assert "caption under VHR (vhr)" in block and "star" in block and figures.HALLUCINATED_COLOUR in block
    assert "#d62728" not in to_json(page.captions_block(runs.marked, runs.correct_scene))
    heads = page.heads_figure(runs.vhr, "selected_share")
    np.testing.assert_allclose(
        np.asarray(decode_array(heads.data[0].z), dtype=float),
        _run(runs, runs.vhr)
        .heads.pivot(index="layer", columns="head", values="selected_share")
        .to_numpy(float),
    )
    missing = page.heads_figure(runs.vhd, "selected_share")  # a vhd run has no such column: said
    assert not missing.data and "selected_share" in missing.layout.annotations[0].text.replace("<br>", " ")
    foreign = page.benchmarks_figure(runs.census)
    assert "not one of vhd, vhr" in foreign.layout.annotations[0].text.replace("<br>", " ")
    assert "No run selected" in to_json(page.findings(None))
    findings = page.findings(runs.vhr)
    assert [li.children for li in findings.children] == views.findings(_run(runs, runs.vhr))
    assert page.test_text(runs.marked) == views.tvhd_test_line(_run(runs, runs.marked))
    assert len(page.deltas_figure(runs.vhr).data) == 5 and not page.deltas_figure(runs.vhd).data


def test_a_run_without_the_vhd_tables_is_refused_saying_how_to_get_them(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runstore, "code_revision", fixed_revision)
    partial = runstore.write_run(
        tmp_path,
        analysis="vhr",
        model_info={"name": "m"},
        config={},
        tables={"heads": _run(runs, runs.vhr).heads},
    )
    page = _page(tmp_path)
    missing = ", ".join(sorted(views.REQUIRED_TABLES - {"heads"}))
    for text in (
        page.benchmarks_figure(partial.name).layout.annotations[0].text.replace("<br>", " "),
        page.settings(partial.name),
        to_json(page.findings(partial.name)),
    ):
        assert f"lacks the vhd tables {missing}" in text and "headlab run vhr" in text, text
    assert page.metric_choice(partial.name, None) == ([], None)
    assert page.scene_choice(partial.name, None) == ([], None)


def test_the_app_serves_the_page_for_vhr_and_vhd_runs_and_links_them(runs: Runs) -> None:
    app = create_app(runs.root)
    assert {"vhd-heads.figure", "vhd-caption.figure", "vhd-deltas.figure"} <= set(app.callback_map)
    assert any("vhd-scene.value" in key for key in app.callback_map)
    served = render_route(app, "/vhd", f"?run={runs.vhr}&metric=selected_share")
    assert "Vision-aware heads: VHD, T-VHD and VHR" in served
    assert f'"value": "{runs.vhr}"' in served and '"value": "selected_share"' in served
    served = render_route(app, "/vhd", f"?run={runs.vhd}")
    # the vhd run offers only its three head metrics
    assert f'"value": "{runs.vhd}"' in served and '"value": "selected_share"' not in served
    assert views.METRIC_NAMES["vhd_first"] in served and views.METRIC_NAMES["selected_share"] not in served
    home = next(p for p in build_pages(runs.root) if isinstance(p, HomePage))
    listed = to_json(home.layout({}))
    for run_id in (runs.vhr, runs.vhd):
        assert f"/vhd?run={run_id}" in listed
    # a figure through Dash's update endpoint
    figure = post_callback(
        app, "vhd-caption.figure", [("vhd-run", runs.marked), ("vhd-scene", runs.bad_scene)]
    )
    bad = next(t for t in figure["data"] if t["name"] == "hallucinated object word")
    assert bad["marker"]["color"] == figures.HALLUCINATED_COLOUR and bad["text"] == ["star"]


def test_callbacks_wire_through_a_bare_dash_app(runs: Runs) -> None:
    page = _page(runs.root)
    app = Dash(__name__)
    app.layout = page.layout({"run": runs.vhr})
    page.register_callbacks(app)
    assert {
        "vhd-heads.figure",
        "vhd-words.figure",
        "vhd-test.children",
        "vhd-image.figure",
        "vhd-captions.children",
        "vhd-benchmarks.figure",
        "vhd-findings.children",
        "vhd-settings.children",
        "vhd-sweep.figure",
        "vhd-sweep-text.children",
        "vhd-validation.children",
    } <= set(app.callback_map)


# ---------------------------------------------------------------------------------------- report


def test_report_sections_render_the_figures(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runstore, "code_revision", fixed_revision)
    assert section_builder("vhd") is vhd_section.report_sections
    assert section_builder("vhr") is vhd_section.report_sections
    run = _run(runs, runs.marked)
    sections = vhd_section.report_sections(run)
    assert [s.anchor for s in sections] == [
        "vhd-overview",
        "vhd-heads",
        "vhd-tvhd",
        "vhd-benchmarks",
        "vhd-sweep",
        "validation",
    ]
    path = report.write_report(run.path, tmp_path)
    page = path.read_text(encoding="utf-8")
    for needle in [
        *(f"vhd-heads-{m}" for m in views.HEAD_METRICS),
        "vhd-words-figure",
        "vhd-caption-figure",
        "vhd-image-figure",
        "vhd-benchmarks-figure",
        "vhd-deltas-figure",
        "vhd-overview",
        "vhd-tvhd",
        "vhd-sweep-figure",
        "validation-figure",
    ]:
        assert page.count(f'id="{needle}"') == 1, needle
    for line in sweep.sweep_sentences(run):
        assert line.replace("&", "&amp;").replace("'", "&#x27;") in page
    for line in views.findings(run):
        assert line.replace("&", "&amp;").replace("'", "&#x27;") in page
    assert f"scene {runs.bad_scene} (the first with a hallucinated object word)" in page
    assert "hallucinated: <b" in page and ">star</b>" in page
    assert "data:image/png;base64," in page
    # a vhd run: three head maps, no VHR settings table, the deltas figure says why it is empty
    vhd_page = report.render_report(_run(runs, runs.vhd))
    assert 'id="vhd-heads-selected_share"' not in vhd_page and 'id="vhd-heads-vhd_first"' in vhd_page
    assert "The VHR settings" not in vhd_page and "No VHR setting in this run" in vhd_page
    assert 'id="vhd-sweep"' not in vhd_page and 'id="validation-figure"' in vhd_page  # empty: said
    # a run of the analysis without its tables gets the generic heads maps
    foreign = runstore.write_run(
        tmp_path / "runs",
        analysis="vhr",
        model_info={"name": "m"},
        config={},
        tables={"heads": run.heads[["layer", "head", "vhd_mean"]]},
    )
    generic = report.render_report(runstore.open_run(foreign))
    assert 'id="heads-heatmap-0"' in generic and 'id="vhd-overview"' not in generic


def _collapsed(runs: Runs, names: tuple[str, ...] = ("quiet", "terse", "fluent")) -> AnalysisResult:
    """The vhr result with hand-set CHAIR rows: the baseline (CHAIR_S 0.125, recall 0.87, 18 words),
    'quiet' whose CHAIR_S falls to 0 with recall 0.40 (as VHR's did on scene-llava), 'terse' whose
    captions shrink to 6 words, and 'fluent', which keeps recall and length."""
    base = runs.result
    summary = base.tables["summary"]
    summary = summary[summary["benchmark"] != "CHAIR"]  # the tiny model's own CHAIR rows mean nothing
    rows = []
    for name, chair_s, recall, n_words in (
        ("baseline", 0.125, 0.87, 18.0),
        ("quiet", 0.0, 0.40, 15.0),
        ("terse", 0.0, 0.85, 6.0),
        ("fluent", 0.0, 0.84, 17.0),
    ):
        if name != "baseline" and name not in names:
            continue
        for metric, value in (
            ("CHAIR_S", chair_s),
            ("CHAIR_I", chair_s),
            ("recall", recall),
            ("words", n_words),
        ):
            rows.append(
                {
                    "vhr_setting": name,
                    "benchmark": "CHAIR",
                    "setting": "captions",
                    "metric": metric,
                    "value": value,
                    "lo": value,
                    "hi": value,
                    "n": N_SCENES,
                }
            )
    summary = pd.concat([summary, pd.DataFrame(rows)], ignore_index=True)
    deltas = pd.DataFrame(
        [
            {
                "setting": n,
                "benchmark": "CHAIR",
                "kind": "captions",
                "metric": "CHAIR_S",
                "delta": -0.125,
                "lo": -0.2,
                "hi": -0.05,
            }
            for n in names
        ]
    )
    return dataclasses.replace(base, tables={**base.tables, "summary": summary, "deltas": deltas})


def test_findings_do_not_call_silence_an_improvement(runs: Runs) -> None:
    """A setting whose CHAIR_S falls because its captions name far fewer objects, or say far less,
    is flagged with a warning; one that keeps its recall and length is not."""
    edited = _collapsed(runs)
    found = views.collapses(edited)
    assert [(c.setting, c.recall_fell, c.length_fell) for c in found] == [
        ("quiet", True, False),
        ("terse", False, True),
    ]
    lines = views.findings(edited)
    text = " ".join(lines)
    assert "improves clearly under quiet, terse, fluent" in text
    warnings = [line for line in lines if line.startswith("Warning:")]
    assert len(warnings) == 2
    assert (
        "Under 'quiet' object recall collapses: object recall 0.40 against 0.87 for the baseline (-54%)"
        in (warnings[0])
    )
    assert "Under 'terse' captions shrink" in warnings[1] and "6.0 against 18.0 words" in warnings[1]
    assert "fluent" not in " ".join(warnings)
    assert "Baseline object recall 0.870" in text and "Baseline caption length (words) 18.0" in text
    # the rule is stated with its fractions
    assert f"more than {100 * views.RECALL_DROP:.0f}%" in views.collapse_rule()


def test_recall_and_length_are_drawn_beside_chair_and_a_collapse_is_flagged(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edited = _collapsed(runs)
    fig = figures.benchmark_figure(edited)
    by_name = {t.name: t for t in fig.data}
    recall, words = by_name["CHAIR captions recall"], by_name["CHAIR captions words"]
    assert list(recall.x)[:1] == ["baseline"] and {"quiet", "terse", "fluent"} <= set(recall.x)
    values = dict(zip(recall.x, recall.y, strict=True))
    assert values["baseline"] == pytest.approx(0.87) and values["quiet"] == pytest.approx(0.40)
    assert dict(zip(words.x, words.y, strict=True))["terse"] == pytest.approx(6.0)
    # the flag's thresholds are drawn (red dashes) in the recall and length panels
    dashes = [
        s for s in fig.layout.shapes if s.line.dash == "dash" and s.line.color == figures.WARNING_COLOUR
    ]
    assert sorted(round(float(s.y0), 4) for s in dashes) == sorted(
        [round(0.87 * (1 - views.RECALL_DROP), 4), round(18.0 * (1 - views.LENGTH_DROP), 4)]
    )
    # the flagged settings' ticks are marked, and the subtitle says so
    ticks = dict(zip(fig.layout.xaxis.tickvals, fig.layout.xaxis.ticktext, strict=True))
    assert "⚠ quiet" in ticks["quiet"] and "⚠ terse" in ticks["terse"] and "⚠" not in ticks["fluent"]
    assert (
        "recall or length collapses under quiet (recall 0.40), terse"
        in fig.layout.title.subtitle.text.replace("<br>", " ")
    )
    deltas = figures.deltas_figure(edited)
    assert (
        "⚠ quiet"
        in dict(zip(deltas.layout.xaxis.tickvals, deltas.layout.xaxis.ticktext, strict=True))["quiet"]
    )
    # no flag where nothing collapses
    calm = _collapsed(runs, ("fluent",))
    assert views.collapses(calm) == []
    plain = figures.benchmark_figure(calm)
    assert "⚠" not in json.dumps(plain.to_plotly_json(), cls=PlotlyJSONEncoder)
    # the page's warning box and the report's
    monkeypatch.setattr(runstore, "code_revision", fixed_revision)
    path = edited.save(tmp_path)
    page = _page(tmp_path)
    box = to_json(page.warnings(path.name))
    assert box.count('"className": "warning"') == 2 and "Under 'quiet' object recall collapses" in box
    assert "warning" not in to_json(page.warnings(calm.save(tmp_path).name))
    findings = page.findings(path.name)
    assert [li.className for li in findings.children].count("warning") == 2
    html_text = report.render_report(runstore.open_run(path))
    assert html_text.count('<p class="warning">') == 4  # in the overview and beside the figures
    assert "Under &#x27;quiet&#x27; object recall collapses" in html_text


def test_object_words_are_marked_with_their_class_name(runs: Runs) -> None:
    """One name per class: a caption's "moon" is marked "crescent", the name the scene label and
    CHAIR's lists use; the word as written stays in the hover."""
    base = runs.result
    tokens = base.tables["tokens"].copy()
    scene = int(tokens["scene"].iloc[0])
    at = tokens.index[tokens["scene"] == scene][0]
    tokens[["object", "hallucinated"]] = tokens[["object", "hallucinated"]].astype(bool)
    tokens.loc[at, ["token", "object", "word", "shape", "hallucinated"]] = [
        " moon",
        True,
        "moon",
        "crescent",
        True,
    ]
    edited = dataclasses.replace(base, tables={**base.tables, "tokens": tokens})
    fig = figures.tvhd_caption_figure(edited, scene)
    bad = _trace(fig, "hallucinated object word")
    assert list(bad.text) == ["crescent"]
    assert "crescent ('moon')" in str(bad.customdata[0][1])
    label = next(o["label"] for o in views.scene_options(edited) if o["value"] == scene)
    assert "hallucinates crescent" in label and "moon" not in label


# ---------------------------------------------------------------------------------------- sweep


def test_sweep_figure_draws_the_sweep_table_with_its_intervals(runs: Runs) -> None:
    run = _run(runs, runs.vhr)
    table = run.table("sweep")
    order = ["alpha=0.5 layers=paper", "vhr", "alpha=2 layers=late"]
    fig = sweep.sweep_figure(run)
    assert [t.name for t in fig.data] == ["Δ CHAIR_S", "Δ CHAIR_I", "Δ recall"]
    for trace, metric in zip(fig.data, ("CHAIR_S", "CHAIR_I", "recall"), strict=True):
        assert list(trace.x) == order
        want = table[table["metric"] == metric].set_index("setting").loc[order]
        np.testing.assert_allclose(np.asarray(trace.y, dtype=float), want["delta"].to_numpy(float))
        assert list(trace.marker.symbol) == ["diamond", "circle", "circle"]  # alpha 0.5 suppresses
    assert "No VHR sweep" in sweep.sweep_figure(_run(runs, runs.vhd)).layout.annotations[0].text
    lines = sweep.sweep_sentences(run)
    assert lines[0].startswith("sweep best:") and lines[-1].startswith("converse alpha=0.5 layers=paper")


def test_page_shows_the_sweep_and_the_validation(runs: Runs) -> None:
    page = _page(runs.root)
    assert len(page.sweep_figure(runs.vhr).data) == 3 and not page.sweep_figure(runs.vhd).data
    block = to_json(page.validation(runs.vhr))
    v = _run(runs, runs.vhr).table("validation")
    assert len(v) == 1 and v["role"].iloc[0] == "vhr-suppress"
    assert "vhd-validation-graph" in block and "vhr-suppress" in block
    assert "No role was tested" in to_json(page.validation(runs.vhd))
    assert [li.children for li in page.sweep_text(runs.vhr).children] == sweep.sweep_sentences(
        _run(runs, runs.vhr)
    )
