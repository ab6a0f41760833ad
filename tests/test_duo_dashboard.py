"""The DuoAttention page (callbacks called directly and through Dash), its views and its report section,
on tiny-llama runs.

The tiny random model recalls no needle, so no test of the retrieval-score grid passes and a real
tiny run has no retrieval-score selection; the main run stands a fixed per-head retrieval score in for
the one it cannot earn, so that every selection, the agreement table and every figure are drawn
from the analysis's own pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from dash import Dash

import probe
from analyses import runstore
from analyses.base import AnalysisResult
from analyses.duo import DuoConfig, kv_ratio, run_duo, save_gates
from analyses.duo import run as duo_run
from analyses.duo.evaluate import Scored
from analyses.registry import ANALYSES
from dashboard import report
from dashboard.catalog import RunCatalog
from dashboard.core.page import Site
from dashboard.duo import report as duo_report
from dashboard.duo import views
from dashboard.duo.page import DuoPage
from dashboard.registry import resolve, section_builder
from tests.conftest import decode_array, fixed_code_revision, post_callback, to_json
from tests.test_duo import TINY

# tiny-llama: 3 layers x 2 KV heads (4 query heads); two lengths, two needles each, 6 new tokens a test
CONFIG = DuoConfig(**{**TINY, "lengths": (260, 300), "max_new_tokens": 6, "n_boot": 50})  # type: ignore[arg-type]
# A retrieval score per query head [layer, head] whose KV-head ranking is not the gates' (they fall
# from layer 0 on): KV heads L2KV1 0.6, L1KV0 0.3, L0KV0 0.1, L0KV1 0.05, the others 0.
HEAD_SCORES = np.array([[0.0, 0.1, 0.0, 0.05], [0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.6, 0.2]])


def stand_in_score(model: Any, cfg: DuoConfig, exclude: Any) -> Scored:
    tests = pd.DataFrame(
        [{"test": 0, "length": 300, "depth": 0.5, "recall": 1.0, "generated": "stand-in", "passed": True}]
    )
    return Scored(HEAD_SCORES.copy(), tests)


@dataclass(frozen=True)
class Runs:
    root: Path
    main: str  # the run with the stand-in retrieval score
    loaded: str  # gates loaded from the main run's, no retrieval score, the cache not measured
    result: AnalysisResult  # the main run before it was saved


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """A runs root with the main run and a loaded-gates run."""
    root = tmp_path_factory.mktemp("duo-runs")
    model = probe.load_model("tiny-llama", device="cpu")
    with pytest.MonkeyPatch.context() as mp, fixed_code_revision():
        mp.setattr(duo_run, "score_heads", stand_in_score)
        main = run_duo(model, CONFIG)
        gates = save_gates(root.parent / "duo-gates.json", main.arrays["gates"], model, CONFIG)
        loaded = run_duo(
            model,
            replace(
                CONFIG, gates_from=str(gates), measure_cache=False, retrieval_score=False, random_seeds=1
            ),
        )
        main_id = main.save(root).name
        loaded_id = loaded.save(root).name
    yield Runs(root, main_id, loaded_id, main)


def _page(root: Path) -> DuoPage:
    return DuoPage(Site(catalog=RunCatalog(root), analysis_paths={"duo": DuoPage.path}))


def _text(fig: Any) -> str:
    title = fig.layout.title
    return " ".join(str(t or "") for t in (title.text, title.subtitle.text)).replace("<br>", " ")


def _message(fig: Any) -> str:
    return str(fig.layout.annotations[0].text).replace("<br>", " ")


def test_the_registry_resolves_the_page_and_the_report() -> None:
    entry = ANALYSES["duo"]
    assert entry.page is not None and entry.report is not None
    assert resolve(entry.page) is DuoPage and "page" not in entry.opt_outs
    assert resolve(entry.report) is duo_report.report_sections and "report" not in entry.opt_outs
    assert section_builder("duo") is duo_report.report_sections
    assert DuoPage.shown_analyses() == ("duo",)


def test_the_gate_map_shows_the_gates_and_rings_the_top_share(runs: Runs) -> None:
    root, main = runs.root, runs.main
    run = runstore.open_run(root / main)
    page = _page(root)
    fig = page.gates_figure(main, 0.5)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), run.array("gates"), rtol=1e-6)
    assert list(fig.data[0].y) == ["0", "1", "2"] and list(fig.data[0].x) == ["0", "1"]
    gates = run.table("gates")
    top3 = gates.sort_values("rank").head(3)
    ringed = set(zip(fig.data[1].y, fig.data[1].x, strict=True))
    assert ringed == {(str(r.layer), str(r.kv_head)) for r in top3.itertuples()}
    assert "top 3 of 6" in _text(fig) and not fig.layout.shapes  # no sliding-window layer on tiny-llama
    assert f"gates {gates['gate'].min():.2f} to {gates['gate'].max():.2f}" in _text(fig)
    assert len(page.gates_figure(main, 0.25).data[1].x) == 2  # 0.25 of 6 KV heads rounds to 2
    assert len(page.gates_figure(main, 0.9).data[1].x) == 2  # a share the run lacks: its first
    options, value = page.share_options(main, 0.5)
    assert [o["value"] for o in options] == [0.25, 0.5] and value == 0.5
    assert options[0]["label"] == "0.25 (k = 2 of 6)"


def test_sliding_window_layers_are_labelled_and_outlined(runs: Runs) -> None:
    gates = runs.result.tables["gates"].copy()
    gates["layer_type"] = np.where(gates["layer"] == 1, "sliding_attention", "full_attention")
    # what a run of a model whose layer 1 has a sliding window holds
    sliding = replace(
        runs.result,
        tables={**runs.result.tables, "gates": gates},
        model_info={**runs.result.model_info, "sliding_window": 128},
    )
    fig = views.gate_map(sliding, 0.5)
    assert list(fig.data[0].y) == ["0", "1 (sliding)", "2"]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == 0.5
    assert "sliding-window layers (window 128)" in _text(fig)
    assert "overstates" in _text(views.memory_figure(sliding))
    assert "overstates" not in _text(views.memory_figure(runs.result))


def test_the_loss_curve_has_both_terms_per_step(runs: Runs) -> None:
    root, main, loaded = runs.root, runs.main, runs.loaded
    run = runstore.open_run(root / main)
    loss = run.table("loss")
    fig = _page(root).loss_figure(main)
    assert [t.name for t in fig.data] == ["distillation (MSE)", "regulariser (lam · mean|gate|)"]
    np.testing.assert_allclose(list(fig.data[0].y), loss["distill"])
    np.testing.assert_allclose(list(fig.data[1].y), loss["reg"])
    assert list(fig.data[0].x) == list(range(CONFIG.steps)) and fig.data[1].yaxis == "y2"
    message = _message(_page(root).loss_figure(loaded))
    assert "No training loss" in message and "loaded from" in message


def test_the_accuracy_figure_has_every_selection_and_the_full_reference(runs: Runs) -> None:
    root, main, loaded = runs.root, runs.main, runs.loaded
    run = runstore.open_run(root / main)
    page = _page(root)
    fig = page.accuracy_figure(main, "recall", 0)
    names = [t.name for t in fig.data]
    assert names == [
        "full model, 95% interval",
        "full model",
        "Duo gates",
        "retrieval score",
        "random heads (mean of 2 draws)",
    ]
    assert all(len(t.x) > 0 for t in fig.data)
    accuracy = run.table("accuracy")
    pooled = accuracy[accuracy["length"] == 0]
    full = pooled[pooled["selection"] == "full"].iloc[0]
    assert set(fig.data[1].y) == {full["recall"]}
    for trace, selection in ((fig.data[2], "duo"), (fig.data[3], "retrieval_score")):
        rows = pooled[pooled["selection"] == selection].sort_values("share")
        np.testing.assert_allclose(list(trace.x), rows["k"] / 6)
        np.testing.assert_allclose(list(trace.y), rows["recall"])
        np.testing.assert_allclose(
            np.asarray(trace.error_y.array), np.maximum(rows["recall_high"] - rows["recall"], 0)
        )
    random = pooled[pooled["selection"] == "random"].groupby("share")["recall"]
    np.testing.assert_allclose(list(fig.data[4].y), random.mean())
    np.testing.assert_allclose(
        np.asarray(fig.data[4].error_y.array), np.maximum(random.max() - random.mean(), 0)
    )
    assert "4 tests" in _text(fig) and "every length pooled" in _text(fig)
    one = page.accuracy_figure(main, "recalled", 300)
    assert "2 tests (300 tokens)" in _text(one) and "recalled" in _text(one)
    by_length = accuracy[(accuracy["length"] == 300) & (accuracy["selection"] == "duo")].sort_values("share")
    np.testing.assert_allclose(list(one.data[2].y), by_length["recalled"])
    assert page.length_options(main, 300) == (
        [
            {"label": "every length pooled", "value": 0},
            {"label": "260 tokens", "value": 260},
            {"label": "300 tokens", "value": 300},
        ],
        300,
    )
    assert page.length_options(main, 999)[1] == 0
    # without a retrieval score: the full model, Duo and one random draw
    names = [t.name for t in page.accuracy_figure(loaded, "recall", 0).data]
    assert names == ["full model, 95% interval", "full model", "Duo gates", "random heads (mean of 1 draws)"]


def test_the_memory_figure_has_formula_curves_and_measured_points(runs: Runs) -> None:
    root, main, loaded = runs.root, runs.main, runs.loaded
    run = runstore.open_run(root / main)
    memory = run.table("memory")
    assert memory["measured_ratio"].notna().all()
    fig = _page(root).memory_figure(main)
    curves = [t for t in fig.data if t.mode == "lines"]
    points = [t for t in fig.data if t.mode == "markers"]
    assert len(curves) == 2 and len(points) == 2
    for trace, share in zip(curves, (0.25, 0.5), strict=True):
        k = int(memory.loc[memory["share"] == share, "k"].iloc[0])
        xs = np.asarray(trace.x, dtype=int)
        assert len(xs) > 50 and xs.min() <= CONFIG.window < 300 <= xs.max()
        expected = [kv_ratio(k / 6, int(n), CONFIG.sink, CONFIG.recent) for n in xs]
        np.testing.assert_allclose(list(trace.y), expected)
        assert (
            math.isclose(trace.y[0], 1.0) and trace.y[-1] < 0.6
        )  # the whole cache below S + R, then falling
    for trace, share in zip(points, (0.25, 0.5), strict=True):
        rows = memory[memory["share"] == share]
        assert list(trace.x) == list(rows["n_tokens"])
        np.testing.assert_allclose(list(trace.y), rows["measured_ratio"])
        # the hover carries the formula and the layer-by-layer count (equal on tiny-llama: no sliding layers)
        np.testing.assert_allclose(np.asarray(trace.customdata)[:, 0], rows["kv_ratio"])
        np.testing.assert_allclose(np.asarray(trace.customdata)[:, 1], rows["kv_ratio_layers"])
        np.testing.assert_allclose(rows["kv_ratio_layers"], rows["kv_ratio"], atol=1e-9)
    # a run written before kv_ratio_layers was kept still draws, its count shown as NaN
    older = replace(
        runs.result, tables={**runs.result.tables, "memory": memory.drop(columns=["kv_ratio_layers"])}
    )
    assert views.memory_rows(older)["kv_ratio_layers"].isna().all()
    assert len([t for t in views.memory_figure(older).data if t.mode == "markers"]) == 2
    unmeasured = _page(root).memory_figure(loaded)
    assert [t.mode for t in unmeasured.data] == ["lines", "lines"]
    assert "not measured" in _text(unmeasured)


def test_the_agreement_and_the_findings(runs: Runs) -> None:
    root, main, loaded = runs.root, runs.main, runs.loaded
    run = runstore.open_run(root / main)
    agreement = run.table("agreement")
    assert len(agreement) == 2
    rho = float(agreement["spearman"].iloc[0])
    panel = to_json(_page(root).agreement_panel(main))
    assert f"{rho:.2f}" in panel and "duo-agreement-rows" in panel
    for r in agreement.itertuples():
        assert f"{r.chance:.1f}" in panel
    no_score = to_json(_page(root).agreement_panel(loaded))
    assert "retrieval_score off" in no_score and "duo-agreement-rows" not in no_score
    lines = views.findings(run)
    assert any(line.startswith("Full model: recall") for line in lines)
    assert any(f"Spearman {rho:.2f}" in line for line in lines)
    assert any(line.startswith("KV cache kept at N = 300 tokens") for line in lines)
    table = to_json(_page(root).accuracy_table(main))
    assert "retrieval score" in table and "4 \\u00d7 2 draws" in table  # JSON escapes the ×


def test_layout_and_callbacks_through_dash(runs: Runs, tmp_path: Path) -> None:
    root, main, loaded = runs.root, runs.main, runs.loaded
    page = _page(root)
    layout = page.layout({"run": loaded, "metric": "recalled"})
    text = to_json(layout)
    for element in (
        "duo-run",
        "duo-share",
        "duo-gates",
        "duo-loss",
        "duo-metric",
        "duo-accuracy",
        "duo-memory",
    ):
        assert f'"id": "{element}"' in text
    assert f'"value": "{loaded}"' in text and '"value": "recalled"' in text
    app = Dash(__name__)
    app.layout = layout
    page.register_callbacks(app)
    assert {"duo-gates.figure", "duo-accuracy.figure", "duo-memory.figure", "duo-loss.figure"} <= set(
        app.callback_map
    )
    figure = post_callback(app, "duo-gates.figure", [("duo-run", main), ("duo-share", 0.5)])
    expected = runstore.open_run(root / main).array("gates")
    np.testing.assert_allclose(
        np.asarray(decode_array(figure["data"][0]["z"]), dtype=float), expected, rtol=1e-6
    )
    accuracy = post_callback(
        app, "duo-accuracy.figure", [("duo-run", main), ("duo-metric", "recall"), ("duo-length", 0)]
    )
    assert [t["name"] for t in accuracy["data"]][1:4] == ["full model", "Duo gates", "retrieval score"]
    assert "cannot show run" in _message(page.memory_figure("../elsewhere"))
    empty = to_json(_page(tmp_path / "none").layout({}))
    assert "No intact duo run" in empty and "headlab run duo" in empty


def test_the_report_section_renders_the_key_numbers(runs: Runs, tmp_path: Path) -> None:
    root, main, loaded = runs.root, runs.main, runs.loaded
    run = runstore.open_run(root / main)
    sections = duo_report.report_sections(run)
    assert [s.anchor for s in sections] == [
        "duo-summary",
        "duo-gates",
        "duo-accuracy",
        "duo-memory",
        "duo-agreement",
    ]
    body = "".join(s.body for s in sections)
    for figure_id in (
        "duo-gates-0",
        "duo-gates-1",
        "duo-loss-figure",
        "duo-accuracy-figure",
        "duo-memory-figure",
    ):
        assert f'id="{figure_id}"' in body
    memory = run.table("memory")
    for r in memory.itertuples():
        assert f"{r.kv_ratio:.3f}" in body and f"{r.measured_ratio:.3f}" in body
    assert "<th>layer by layer</th>" in body
    pooled = run.table("accuracy").query("length == 0 and selection == 'full'").iloc[0]
    assert f"{pooled['recall']:.2f} [{pooled['recall_low']:.2f}, {pooled['recall_high']:.2f}]" in body
    rho = float(run.table("agreement")["spearman"].iloc[0])
    assert not math.isnan(rho) and f"Spearman {rho:.2f}" in body
    top = run.table("gates").sort_values("rank").iloc[0]
    assert f"{top['gate']:.3f}" in body
    other = "".join(s.body for s in duo_report.report_sections(runstore.open_run(root / loaded)))
    assert "not measured" in other and "retrieval_score off" in other and "No training loss" in other
    html = report.render_report(run)
    assert 'id="duo-summary"' in html and "KV-cache memory" in html
    with fixed_code_revision():
        foreign = runstore.write_run(
            tmp_path / "runs",
            analysis="duo",
            model_info={"name": "m"},
            config={},
            tables={"heads": run.heads[["layer", "head", "kv_head", "duo_gate"]]},
        )
    generic = report.render_report(runstore.open_run(foreign))
    assert 'id="heads-heatmap-0"' in generic  # not a duo run's tables: the generic heat maps
