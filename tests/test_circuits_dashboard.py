"""The circuits page (callbacks called directly and through Dash), its views and its report sections,
on ``ioi``, ``colored-objects`` and ``circuit-reuse`` runs of the tiny GPT-2 with whole-word tokens.

The reuse run uses thresholds of 0 so that every class has heads and the graph has edges of every
stage (the tiny model's numbers mean nothing; the figures must show exactly the tables); the IOI run
patches only 5 heads exactly (the others score NaN: "not tested"); the Colored Objects run asks for
thresholds no head passes, so it has no circuit at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from dash import Dash

import probe
from analyses import circuits, runstore
from analyses.base import AnalysisResult
from analyses.circuits import CircuitConfig
from analyses.tasks import colored_objects as co
from analyses.tasks import ioi
from dashboard import report
from dashboard.app import build_pages, create_app
from dashboard.catalog import RunCatalog
from dashboard.circuits import figures, views
from dashboard.circuits import report as circuits_section
from dashboard.circuits.graph import OPPOSE_COLOUR, SUPPORT_COLOUR, circuit_graph
from dashboard.circuits.page import CircuitsPage
from dashboard.core.home import HomePage
from dashboard.core.page import Site
from dashboard.registry import section_builder
from tests.conftest import decode_array, fixed_revision, post_callback, render_route, to_json

WORDS = [*ioi.NAMES, *ioi.PLACES, *ioi.OBJECTS, *co.OBJECTS, *co.COLOURS, *co.SURFACES]
# seed 3: on the tiny GPT-2 every stage of both tasks finds heads, so the graph has edges of each
RICH = CircuitConfig(
    n_items=4,
    seed=3,
    n_random=3,
    admit="share",
    min_share=0.0,
    min_attention=0.0,
    max_per_class=3,
    n_boot=200,
    progress=False,
    n_heldout=4,
    n_reference=4,
)
SCREENED = CircuitConfig(
    n_items=4, n_random=2, max_senders=5, n_boot=200, progress=False, n_heldout=4, n_reference=4
)
EMPTY = CircuitConfig(
    n_items=4,
    n_random=2,
    admit="share",
    min_share=0.9,
    min_attention=1.0,
    n_boot=200,
    progress=False,
    n_heldout=4,
    n_reference=4,
)


@dataclass(frozen=True)
class Runs:
    root: Path
    reuse: str
    ioi: str
    co: str
    result: AnalysisResult  # the unsaved reuse result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("circuit-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
        model = probe.load_model("tiny-gpt2", device="cpu", tiny_words=WORDS)
        result = circuits.run_circuit_reuse(model, RICH)
        reuse = result.save(root)
        single_ioi = circuits.run_ioi(model, SCREENED).save(root)
        single_co = circuits.run_colored_objects(model, EMPTY).save(root)
        # a run of another analysis under the same root: never offered by the circuits page
        runstore.write_run(
            root,
            analysis="census",
            model_info={"name": "m"},
            config={},
            tables={"heads": pd.DataFrame({"layer": [0], "head": [0], "x": [1.0]})},
        )
    yield Runs(root, reuse.name, single_ioi.name, single_co.name, result)


def _page(root: Path) -> CircuitsPage:
    return CircuitsPage(
        Site(catalog=RunCatalog(root), analysis_paths=dict.fromkeys(views.ANALYSES, "/circuits"))
    )


def _open(runs: Runs, run_id: str) -> runstore.Run:
    return runstore.open_run(runs.root / run_id)


def _heads_of(trace: Any) -> list[tuple[int, int]]:
    """(layer, head) of the points of a graph trace (x = layer, y = head)."""
    return sorted((int(x), int(y)) for x, y in zip(trace.x, trace.y, strict=True) if x is not None)


def _grid(run: runstore.Run, task: str, axis: str) -> np.ndarray:
    """The layer x head scores of ``axis``: attribution from the heads table, the rest from scores."""
    if axis == "attribution":
        column = "ioi_attribution" if task == "ioi" else "co_attribution"
        return run.heads.pivot(index="layer", columns="head", values=column).to_numpy(dtype=float)
    return _pivot(run.table("scores"), task, axis)


def _pivot(scores: pd.DataFrame, task: str, stage: str) -> np.ndarray:
    part = scores[(scores["task"] == task) & (scores["stage"] == stage)]
    return part.pivot(index="layer", columns="head", values="score").to_numpy(dtype=float)


# ---------------------------------------------------------------------------------------- the page


def test_page_offers_the_three_run_kinds_and_renders_each(runs: Runs, tmp_path: Path) -> None:
    page = _page(runs.root)
    offered = {o["value"] for o in page.run_options()}
    assert offered == {runs.reuse, runs.ioi, runs.co}  # not the census run
    elements = (
        "circuits-run",
        "circuits-settings",
        "circuits-findings",
        "circuits-metrics",
        "circuits-faithfulness",
        "circuits-task",
        "circuits-graph",
        "circuits-classes",
        "circuits-stage",
        "circuits-heatmaps",
        "circuits-overlap",
        "circuits-iv-metric",
        "circuits-intervention",
    )
    for run_id, tasks in (
        (runs.reuse, ["ioi", "colored_objects"]),
        (runs.ioi, ["ioi"]),
        (runs.co, ["colored_objects"]),
    ):
        text = to_json(page.layout({"run": run_id, "stage": "logits"}))
        for element in elements:
            assert f'"id": "{element}"' in text
        assert f'"value": "{run_id}"' in text and '"value": "logits"' in text
        options, value = page.task_options(run_id, None)
        assert [o["value"] for o in options] == tasks and value == tasks[0]
        assert page.settings_text(run_id).startswith(f"{_open(runs, run_id).analysis} run of tiny-gpt2")
    assert page.task_options(runs.reuse, "colored_objects")[1] == "colored_objects"
    assert page.task_options(runs.ioi, "colored_objects")[1] == "ioi"  # not a task of that run
    empty = to_json(_page(tmp_path / "none").layout({}))
    assert "No intact circuit" in empty and "headlab run circuit-reuse" in empty
    census = next(e.run_id for e in page.catalog.entries() if e.analysis == "census")
    assert "not one of ioi, colored-objects, circuit-reuse" in page.metrics_figure(census).layout.annotations[
        0
    ].text.replace("<br>", " ")
    assert "no circuit" in page.metrics_figure(None).layout.annotations[0].text.replace("<br>", " ")
    assert "cannot show run" in page.graph_figure("../elsewhere", "ioi").layout.annotations[0].text.replace(
        "<br>", " "
    )


def test_heatmaps_show_the_scores_of_the_chosen_stage_side_by_side(runs: Runs) -> None:
    run = _open(runs, runs.reuse)
    circuit = run.table("circuit")
    for axis in views.AXES:
        fig = figures.patching_heatmaps(run, axis)
        maps = [t for t in fig.data if t.type == "heatmap"]
        assert [t.name.split(":")[0] for t in maps] == ["IOI", "Colored Objects"]
        assert [a.text for a in fig.layout.annotations][:2] == ["IOI", "Colored Objects"]
        expected_z = [_grid(run, task, axis) for task in ("ioi", "colored_objects")]
        for trace, z in zip(maps, expected_z, strict=True):
            np.testing.assert_allclose(np.asarray(trace.z, dtype=float), z)
        assert fig.layout.coloraxis.cmax == pytest.approx(float(np.nanmax(np.abs(expected_z))) or 1.0)
        assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax
        # rings: the heads of the classes the stage found (activation: every circuit head once)
        rings = [t for t in fig.data if t.type == "scatter"]
        ringed = sorted((int(y), int(x)) for t in rings for x, y in zip(t.x, t.y, strict=True))
        whole = axis in ("activation", "attribution")
        mine = circuit if whole else circuit[circuit["stage"] == axis]
        expected = mine.drop_duplicates(["task", "layer", "head"]) if whole else mine
        assert len(ringed) == len(expected) and ringed == sorted(
            zip(expected["layer"], expected["head"], strict=True)
        )
        assert "the patch removes the whole gap" in maps[0].text[0][0]
    single = figures.patching_heatmaps(_open(runs, runs.co), "activation")
    assert [t.type for t in single.data] == ["heatmap"]  # one task, no circuit: nothing ringed


def test_heads_that_were_not_tested_are_nan_and_say_so(runs: Runs) -> None:
    run = _open(runs, runs.ioi)
    assert views.screened(run) and "only the 5 strongest heads" in views.settings_line(run)
    fig = figures.patching_heatmaps(run, "logits")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert int(np.isfinite(z).sum()) == 5 and "not tested" in fig.layout.title.subtitle.text.replace(
        "<br>", " "
    )
    untested = np.argwhere(~np.isfinite(z))[0]
    assert "not tested" in fig.data[0].text[untested[0]][untested[1]]
    activation = np.asarray(figures.patching_heatmaps(run, "activation").data[0].z, dtype=float)
    np.testing.assert_array_equal(np.isfinite(activation), np.isfinite(z))  # the same 5 heads patched exactly
    attribution = figures.patching_heatmaps(run, "attribution")  # the screen: an estimate for every head
    assert np.isfinite(np.asarray(attribution.data[0].z, dtype=float)).all()
    assert "not tested" not in attribution.layout.title.subtitle.text.replace("<br>", " ")
    assert views.axes(run) == list(views.AXES)


def test_circuit_graph_draws_heads_by_class_and_the_edges(runs: Runs) -> None:
    run = _open(runs, runs.reuse)
    circuit = run.table("circuit")
    edges = run.table("edges")
    n_layers = int(run.heads["layer"].max()) + 1
    for task in ("ioi", "colored_objects"):
        fig = circuit_graph(run, task)
        mine = circuit[circuit["task"] == task]
        by_name = {t.name: t for t in fig.data}
        # one node trace per class present, named with the number of heads in it
        for cls, group in mine.groupby("class"):
            assert f"{views.CLASS_LABELS[str(cls)]} ({len(group)})" in by_name
        nodes = [t for t in fig.data if t.legendgroup in views.CLASS_LABELS and t.showlegend is not False]
        drawn = sorted(h for t in nodes for h in _heads_of(t))
        assert drawn == sorted({(int(r.layer), int(r.head)) for r in mine.itertuples()})  # each head once
        # node labels are annotations on a white ground, drawn over every edge (no trace writes text)
        assert all("text" not in (t.mode or "") for t in fig.data)
        labels = [a for a in fig.layout.annotations if a.name == "node label"]
        assert {views.head_label(*h) for h in drawn} | {"logits"} <= {a.text for a in labels}
        assert all(a.bgcolor and a.yshift > 0 and not a.showarrow for a in labels)
        # every finite edge is one line, from its sender to its receiver (the logits: x = n_layers)
        task_edges = edges[(edges["task"] == task) & np.isfinite(edges["share"])]
        lines = [t for t in fig.data if t.mode == "lines"]
        assert len(lines) == len(task_edges) > 0
        for line, r in zip(lines, task_edges.itertuples(), strict=True):
            receiver = (n_layers, None) if r.receiver_layer < 0 else (r.receiver_layer, r.receiver_head)
            assert line.x[0] == r.sender_layer and line.y[0] == r.sender_head and line.x[1] == receiver[0]
            if receiver[1] is not None:
                assert line.y[1] == receiver[1]
            assert line.line.color == (SUPPORT_COLOUR if r.share <= 0 else OPPOSE_COLOUR)
        widths = [
            (abs(r.share), line.line.width) for line, r in zip(lines, task_edges.itertuples(), strict=True)
        ]
        widest = max(widths)
        assert widest[1] == pytest.approx(7.8) and all(w <= widest[1] for _, w in widths)
        assert len(by_name["edge shares"].x) == len(task_edges)
        assert "of the clean–corrupt gap" in by_name["edge shares"].text[0]
        logits = by_name["logits at END"]
        assert logits.x == (float(n_layers),) and logits.marker.symbol == "square"
        assert "logits" in fig.layout.xaxis.ticktext
        stages = set(task_edges["stage"])
        assert "logits" in stages and len(stages) >= 2
    empty = circuit_graph(_open(runs, runs.co))
    assert "no circuit to draw" in empty.layout.annotations[0].text.replace("<br>", " ")
    with pytest.raises(KeyError, match="no task 'colored_objects'"):
        circuit_graph(_open(runs, runs.ioi), "colored_objects")


def test_a_one_task_run_draws_no_reuse_panels_and_says_why(runs: Runs) -> None:
    """The overlap and the intervention compare two tasks: on an IOI or Colored Objects run they are
    not drawn as empty panels; one line says why."""
    page = _page(runs.root)
    for run_id, analysis in ((runs.ioi, "an ioi run"), (runs.co, "a colored-objects run")):
        assert page.reuse_style(run_id) == {"display": "none"}
        note = page.reuse_note(run_id)
        assert analysis in note and "circuit-reuse" in note
        layout = page.layout({"run": run_id})
        reuse = next(c for c in layout._traverse() if getattr(c, "id", None) == "circuits-reuse")
        assert reuse.style == {"display": "none"}
        assert analysis in to_json(layout)
    assert page.reuse_style(runs.reuse) == {} and page.reuse_note(runs.reuse) == ""
    assert page.reuse_style(None) == {} and page.reuse_note("../elsewhere") == ""
    # the figures themselves still say why, on a blank ground (not a grey plot area)
    single = figures.overlap_figure(_open(runs, runs.ioi))
    assert single.layout.plot_bgcolor == "rgba(0,0,0,0)" and not single.data


def test_classes_table_lists_heads_with_scores_and_signatures(runs: Runs) -> None:
    run = _open(runs, runs.reuse)
    rows = views.class_rows(run, "ioi")
    circuit = run.table("circuit")
    mine = circuit[circuit["task"] == "ioi"]
    assert len(rows) == len(mine)
    assert list(dict.fromkeys(rows["class"])) == [
        views.CLASS_LABELS[c] for c in circuits.CLASSES if c in set(mine["class"])
    ]
    first = mine[mine["class"] == rows["class"].iloc[0].replace(" ", "_").replace("-", "_").lower()]
    if len(first):
        assert rows["score"].iloc[0] == f"{first['score'].iloc[0]:+.3f}"
    inhibition = rows[rows["class"] == "S-inhibition"]
    assert (inhibition["signature"] == "END → S1 + S2").all()
    assert (rows[rows["class"] == "previous token"]["signature"] == "S1+1 → S1").all()
    page = _page(runs.root)
    text = to_json(page.classes_table(runs.reuse, "ioi"))
    assert "circuits-classes-table" in text and "Receivers of each stage" in text
    assert "No head passed both tests" in to_json(page.classes_table(runs.co, "colored_objects"))


def test_overlap_curve_per_stage_and_the_two_percent_point(runs: Runs) -> None:
    run = _open(runs, runs.reuse)
    overlap = run.table("overlap")
    fig = figures.overlap_figure(run)
    by_name = {t.name: t for t in fig.data}
    for stage in (*circuits.STAGES, "all"):
        name = "all stages (pooled)" if stage == "all" else views.AXIS_LABELS[stage]
        part = overlap[(overlap["source"] == "path_patching") & (overlap["stage"] == stage)].sort_values(
            "percent"
        )
        np.testing.assert_allclose(by_name[name].x, part["percent"])
        np.testing.assert_allclose(by_name[name].y, part["overlap"])
    act = overlap[overlap["source"] == "activation_patching"].sort_values("percent")
    np.testing.assert_allclose(by_name["activation patching"].y, act["overlap"])
    assert by_name["activation patching"].line.dash == "dash"
    assert by_name["all stages (pooled)"].line.width > by_name["path → logits"].line.width
    chance = by_name["chance (independent rankings)"]
    np.testing.assert_allclose(chance.y, np.asarray(chance.x) / 100)
    assert list(by_name["2% (Merullo et al.)"].x) == [2.0, 2.0]
    at2 = overlap[
        (overlap["source"] == "path_patching") & (overlap["stage"] == "all") & (overlap["percent"] == 2.0)
    ]
    star = by_name["all stages at 2%"]
    assert star.x == (2.0,) and star.y[0] == pytest.approx(float(at2["overlap"].iloc[0]))
    assert star.text[0].startswith(f"{int(at2['shared'].iloc[0])} of {int(at2['k'].iloc[0])}")
    assert fig.layout.xaxis.type == "log"
    for run_id in (runs.ioi, runs.co):
        single = _open(runs, run_id)
        assert "needs a circuit-reuse run" in figures.overlap_figure(single).layout.annotations[
            0
        ].text.replace("<br>", " ")
        assert "needs a circuit-reuse run" in figures.intervention_figure(single).layout.annotations[
            0
        ].text.replace("<br>", " ")


def test_intervention_before_ioi_heads_and_random_heads(runs: Runs) -> None:
    run = _open(runs, runs.reuse)
    iv = run.table("intervention")
    metrics = run.table("metrics").set_index("task")
    fig = figures.intervention_figure(run)
    before, target, random_sets, chance = fig.data
    row_b = iv[iv["condition"] == "before"].iloc[0]
    row_t = iv[iv["condition"] == "ioi_heads"].iloc[0]
    assert before.type == "bar" and before.y[0] == pytest.approx(row_b["accuracy"])
    assert target.y[0] == pytest.approx(row_t["accuracy"])
    assert target.y[0] + target.error_y.array[0] == pytest.approx(row_t["accuracy_high"])
    assert before.y[0] - before.error_y.arrayminus[0] == pytest.approx(row_b["accuracy_low"])
    assert target.x[0] == f"IOI heads ({int(row_t['n_heads'])})"
    assert random_sets.type == "box"
    np.testing.assert_allclose(random_sets.y, iv[iv["condition"] == "random"]["accuracy"])
    assert chance.name.startswith("chance") and chance.y[0] == pytest.approx(
        metrics.loc["colored_objects", "accuracy_chance"]
    )
    vocab = figures.intervention_figure(run, "vocab_accuracy")
    assert vocab.data[1].y[0] == pytest.approx(row_t["vocab_accuracy"]) and len(vocab.data) == 3  # no chance
    ld = figures.intervention_figure(run, "logit_diff")
    assert ld.data[1].y[0] == pytest.approx(row_t["logit_diff"]) and ld.data[1].error_y.array is None
    assert ld.layout.yaxis.tickformat is None and vocab.layout.yaxis.tickformat == ".0%"
    with pytest.raises(KeyError, match="no intervention metric"):
        figures.intervention_figure(run, "recall")  # type: ignore[arg-type]


def test_metrics_and_faithfulness_figures_equal_the_tables(runs: Runs) -> None:
    run = _open(runs, runs.reuse)
    metrics = run.table("metrics").set_index("task").loc[["ioi", "colored_objects"]]
    fig = figures.metrics_figure(run)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["clean prompts"].x) == ["IOI", "Colored Objects"]
    np.testing.assert_allclose(by_name["clean prompts"].y, metrics["logit_diff"])
    np.testing.assert_allclose(by_name["corrupted prompts"].y, metrics["logit_diff_corrupt"])
    np.testing.assert_allclose(by_name["among the candidates"].y, metrics["accuracy"])
    np.testing.assert_allclose(by_name["top-1 over the vocabulary"].y, metrics["vocab_accuracy"])
    np.testing.assert_allclose(by_name["chance (among the candidates)"].y, [0.5, 1 / 3])
    high = np.asarray(by_name["clean prompts"].y) + by_name["clean prompts"].error_y.array
    np.testing.assert_allclose(high, metrics["logit_diff_high"])

    faith = run.table("faithfulness")
    fig = figures.faithfulness_figure(run)
    by_name = {t.name: t for t in fig.data}
    found = faith[faith["circuit"] == "found"]
    np.testing.assert_allclose(by_name["found circuit"].y, found["faithfulness"])
    assert list(by_name["found circuit"].x) == ["IOI", "Colored Objects"]
    np.testing.assert_allclose(
        by_name["random circuits (same size)"].y, faith[faith["circuit"] == "random"]["faithfulness"]
    )
    np.testing.assert_allclose(
        by_name["empty circuit (every head ablated)"].y, faith[faith["circuit"] == "empty"]["faithfulness"]
    )
    sizes = dict(zip(found["task"], found["size"], strict=True))
    assert f"IOI {views.counted(int(sizes['ioi']))}" in fig.layout.title.subtitle.text.replace("<br>", " ")
    summary = views.faithfulness_summary(run, "ioi")
    rand = faith[(faith["task"] == "ioi") & (faith["circuit"] == "random")]["faithfulness"]
    assert summary["random_mean"] == pytest.approx(rand.mean()) and summary["n_random"] == RICH.n_random


def test_findings_read_the_run(runs: Runs) -> None:
    run = _open(runs, runs.reuse)
    found = views.findings(run)
    assert set(found) == {"metrics", "circuit", "faithfulness", "reuse", "intervention"}
    metrics = run.table("metrics").set_index("task")
    assert f"logit difference {metrics.loc['ioi', 'logit_diff']:.2f}" in found["metrics"][0]
    circuit = run.table("circuit")
    ioi_heads = circuit[circuit["task"] == "ioi"]
    assert views.counted(ioi_heads.drop_duplicates(["layer", "head"]).shape[0]) in found["circuit"][0]
    for r in ioi_heads.itertuples():
        assert f"L{r.layer}H{r.head}" in found["circuit"][0]
    f = views.faithfulness_summary(run, "ioi")
    assert f"keeps {f['found']:.2f}" in found["faithfulness"][0]
    at2 = views.overlap_at(run)
    assert at2 is not None
    assert f"{int(at2['shared'])} of IOI's {int(at2['k'])} top stage heads" in found["reuse"][0]
    iv = run.table("intervention").set_index("condition")
    assert f"{iv.loc['before', 'accuracy']:.0%}" in found["intervention"][0]
    assert "Merullo et al." in found["intervention"][0]
    single = views.findings(_open(runs, runs.co))
    assert set(single) == {"metrics", "circuit", "faithfulness"}
    assert "no head passed both tests" in single["circuit"][0]
    page_text = to_json(_page(runs.root).findings(runs.reuse))
    assert "Intervention" in page_text and "Reuse" in page_text


def test_views_read_an_unsaved_result_like_a_saved_run(runs: Runs) -> None:
    run = _open(runs, runs.reuse)
    result = runs.result
    assert views.findings(result) == views.findings(run)
    np.testing.assert_allclose(
        views.score_grid(result, "ioi", "logits"), views.score_grid(run, "ioi", "logits")
    )
    a, b = circuit_graph(result, "ioi"), circuit_graph(run, "ioi")
    assert [t.name for t in a.data] == [t.name for t in b.data]
    assert result.notes["intervention_heads"] == run.notes["intervention_heads"]


# ---------------------------------------------------------------------------------------- Dash


def test_layout_and_callbacks_through_dash(runs: Runs) -> None:
    page = _page(runs.root)
    app = Dash(__name__)
    app.layout = page.layout({"run": runs.reuse})
    page.register_callbacks(app)
    assert {
        "circuits-graph.figure",
        "circuits-heatmaps.figure",
        "circuits-overlap.figure",
        "circuits-intervention.figure",
        "circuits-classes.children",
    } <= set(app.callback_map)
    maps = post_callback(
        app, "circuits-heatmaps.figure", [("circuits-run", runs.reuse), ("circuits-stage", "induction_k")]
    )
    heat = [t for t in maps["data"] if t["type"] == "heatmap"]
    assert len(heat) == 2 and "induction keys" in maps["layout"]["title"]["text"]
    scores = _open(runs, runs.reuse).table("scores")
    np.testing.assert_allclose(
        np.asarray(decode_array(heat[1]["z"]), dtype=float), _pivot(scores, "colored_objects", "induction_k")
    )
    graph = post_callback(
        app, "circuits-graph.figure", [("circuits-run", runs.reuse), ("circuits-task", "colored_objects")]
    )
    assert "Colored Objects circuit" in graph["layout"]["title"]["text"]
    assert any(t.get("name") == "logits at END" for t in graph["data"])
    overlap = post_callback(app, "circuits-overlap.figure", [("circuits-run", runs.reuse)])
    assert any(t.get("name") == "all stages at 2%" for t in overlap["data"])
    iv = post_callback(
        app,
        "circuits-intervention.figure",
        [("circuits-run", runs.reuse), ("circuits-iv-metric", "vocab_accuracy")],
    )
    assert [t["type"] for t in iv["data"]] == ["bar", "bar", "box"]
    single = post_callback(app, "circuits-overlap.figure", [("circuits-run", runs.ioi)])
    assert "needs a circuit-reuse run" in single["layout"]["annotations"][0]["text"].replace("<br>", " ")


def test_the_app_serves_the_page_and_links_every_run_kind(runs: Runs) -> None:
    app = create_app(runs.root)
    assert "circuits-graph.figure" in app.callback_map
    page = render_route(app, "/circuits", f"?run={runs.ioi}&stage=mover_queries")
    assert "Circuits: IOI, Colored Objects" in page and f'"value": "{runs.ioi}"' in page
    assert '"value": "mover_queries"' in page
    home = next(p for p in build_pages(runs.root) if isinstance(p, HomePage))
    listing = to_json(home.layout({}))
    for run_id in (runs.reuse, runs.ioi, runs.co):
        assert f"/circuits?run={run_id}" in listing


# ---------------------------------------------------------------------------------------- report


def test_report_sections_render_for_each_run_kind(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in views.ANALYSES:
        assert section_builder(name) is circuits_section.report_sections
    run = _open(runs, runs.reuse)
    sections = circuits_section.report_sections(run)
    assert [s.anchor for s in sections] == [
        "circuits-summary",
        "circuits-heads",
        "circuits-patching",
        "circuits-faithfulness",
        "validation",
        "circuits-reuse",
        "circuits-intervention",
    ]
    body = "".join(s.body for s in sections)
    for needle in (
        "circuits-metrics-figure",
        "circuits-graph-0",
        "circuits-graph-1",
        "circuits-heatmap-activation",
        "circuits-heatmap-attribution",
        "circuits-heatmap-induction_k",
        "circuits-faithfulness-figure",
        "circuits-overlap-figure",
        "circuits-intervention-figure",
        "circuits-intervention-vocab-figure",
    ):
        assert f'id="{needle}"' in body
    found = views.findings(run)
    for line in found["reuse"] + found["intervention"] + found["faithfulness"]:
        assert line.replace("&", "&amp;").replace("'", "&#x27;") in body
    assert "<td>S-inhibition</td>" in body and "Spearman" in body
    html = report.render_report(run)
    assert 'id="circuits-reuse"' in html and "Intervention on Colored Objects" in html
    for run_id, n in ((runs.ioi, 5), (runs.co, 5)):
        single = circuits_section.report_sections(_open(runs, run_id))
        assert len(single) == n and "circuits-reuse" not in [s.anchor for s in single]
    screened = "".join(s.body for s in circuits_section.report_sections(_open(runs, runs.ioi)))
    assert "Grey cells were not tested" in screened
    assert "no circuit to draw" in "".join(
        s.body for s in circuits_section.report_sections(_open(runs, runs.co))
    ).replace("\\u003cbr\\u003e", " ")  # a message figure's text is wrapped to lines (<br> in the JSON)
    foreign = runstore.write_run(
        tmp_path / "runs",
        analysis="ioi",
        model_info={"name": "m"},
        config={},
        tables={"heads": run.heads[["layer", "head", "kv_head", "ioi_activation"]]},
    )
    generic = report.render_report(runstore.open_run(foreign))
    assert 'id="heads-heatmap-0"' in generic and 'id="circuits-summary"' not in generic


def test_numbers_format_missing_values(runs: Runs) -> None:
    assert views.num(math.nan) == "n/a" and views.num(None) == "n/a" and views.num(0.5, ".0%") == "50%"


def test_a_damaged_circuit_run_is_listed_but_not_opened(runs: Runs, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(runs.root / runs.ioi, root / runs.ioi)
    table = root / runs.ioi / "circuit.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF
    table.write_bytes(bytes(data))
    page = _page(root)
    (option,) = page.run_options()
    assert option["disabled"] is True and "damaged" in option["label"]
    layout = to_json(page.layout({"run": runs.ioi}))
    assert "1 damaged circuit" in layout and "No intact circuit" in layout
    assert "cannot show run" in page.graph_figure(runs.ioi, "ioi").layout.annotations[0].text.replace(
        "<br>", " "
    )
