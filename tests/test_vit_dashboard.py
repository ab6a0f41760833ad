"""The ViT page (callbacks called directly and through Dash), its views and its report sections, on a
``vit-heads`` run of the tiny CLIP vision tower with ``preset="small"`` (2 layers x 4 heads, 6 pruned;
the numbers of random weights mean nothing: the figures must show exactly the tables and arrays)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from dash import Dash

import probe
from analyses import runstore, vit_heads
from analyses.base import AnalysisResult
from dashboard import report
from dashboard.app import build_pages, create_app
from dashboard.catalog import RunCatalog
from dashboard.core import figures
from dashboard.core.home import HomePage
from dashboard.core.page import Site
from dashboard.registry import section_builder
from dashboard.vit_heads import report as vit_section
from dashboard.vit_heads import views
from dashboard.vit_heads.page import VitPage
from tests.conftest import decode_array, fixed_revision, post_callback, render_route, to_json


@dataclass(frozen=True)
class Runs:
    root: Path
    run_id: str
    other: str  # a census run under the same root
    result: AnalysisResult


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("vit-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
        model = probe.load_model("tiny-clip-vision", device="cpu")
        cfg = vit_heads.VitHeadsConfig(preset="small", prune_top_k=6, progress=False)
        result = vit_heads.run_vit_heads(model, cfg)
        path = result.save(root)
        other = runstore.write_run(
            root,
            analysis="census",
            model_info={"name": "m"},
            config={},
            tables={"heads": pd.DataFrame({"layer": [0], "head": [0], "x": [1.0]})},
        )
    yield Runs(root, path.name, other.name, result)


def _page(root: Path) -> VitPage:
    return VitPage(Site(catalog=RunCatalog(root), analysis_paths={"vit-heads": "/vit"}))


def _run(runs: Runs) -> runstore.Run:
    return runstore.open_run(runs.root / runs.run_id)


def _z(fig: Any) -> np.ndarray:
    return np.asarray(decode_array(fig.data[0].z), dtype=float)


# ---------------------------------------------------------------------------------------- the page


def test_page_offers_only_vit_runs_and_renders(runs: Runs) -> None:
    page = _page(runs.root)
    assert {o["value"] for o in page.run_options()} == {runs.run_id}
    text = to_json(page.layout({"run": runs.run_id, "metric": "cosine_drop", "head": "1-2"}))
    for element in (
        "vit-run",
        "vit-settings",
        "vit-findings",
        "vit-metric",
        "vit-importance",
        "vit-agreement",
        "vit-intervals",
        "vit-concentration",
        "vit-validation",
        "vit-trend-metric",
        "vit-trend",
        "vit-head",
        "vit-head-info",
        "vit-distance",
        "vit-offset",
        "vit-clusters",
        "vit-display-image",
        "vit-overlay",
        "vit-query",
        "vit-overlay-info",
    ):
        assert f'"id": "{element}"' in text
    assert '"value": "cosine_drop"' in text and '"value": "1-2"' in text
    assert "overlay shows the chosen head" in text and "astronaut (natural)" in text
    assert page.head_options(runs.run_id)[0] == {"label": "L0 H0 (pruned)", "value": "0-0"}
    assert page.head_options(None) == [] and page.head_options(runs.other) == []


def test_importance_grid_shows_each_metric_with_nan_for_unpruned_heads(runs: Runs) -> None:
    page = _page(runs.root)
    heads = _run(runs).heads
    n_pruned = int(heads["pruned"].sum())
    assert 0 < n_pruned < len(heads)
    for metric in views.METRICS:
        fig = page.importance_figure(runs.run_id, metric, "0-1")
        z = _z(fig)
        expected = heads.pivot(index="layer", columns="head", values=metric).to_numpy(dtype=float)
        np.testing.assert_allclose(z, expected, equal_nan=True)
        if metric != "grad_importance":
            assert int(np.isnan(z).sum()) == len(heads) - n_pruned
            assert "not pruned" in fig.layout.title.subtitle.text.replace("<br>", " ")
        assert len(fig.layout.shapes) == 1  # the chosen head outlined
    first = _z(page.importance_figure(runs.run_id, "accuracy_drop", None))
    second = _z(page.importance_figure(runs.run_id, "grad_importance", None))
    assert not np.allclose(np.nan_to_num(first), np.nan_to_num(second))


def test_agreement_trend_distance_offset_and_clusters(runs: Runs) -> None:
    page = _page(runs.root)
    run = _run(runs)
    agree = page.agreement_figure(runs.run_id)
    np.testing.assert_allclose(_z(agree), run.array("agreement"), rtol=1e-5)
    assert list(agree.data[0].x) == [views.METRIC_NAMES[m] for m in views.METRICS]
    trend = page.trend_figure(runs.run_id, "mean_attention_distance")
    rows = run.table("attention_trend")
    mad = rows[rows["metric"] == "mean_attention_distance"].sort_values("layer")
    np.testing.assert_allclose(np.asarray(trend.data[-1].y, dtype=float), mad["mean"].to_numpy())
    neighbours = page.trend_figure(runs.run_id, "neighbour_strength")
    assert "distance 1" in neighbours.layout.title.text.replace("<br>", " ")
    # the y axis says only the unit: a long axis title runs over the subtitle of a short plot
    for metric in views.TREND_METRICS:
        axis = page.trend_figure(runs.run_id, metric).layout.yaxis.title.text
        assert axis == views.TREND_UNITS[metric] and len(axis) <= 20
    dist = page.distance_figure(runs.run_id, "1-2")
    table = run.table("distance")
    mine = table[(table["layer"] == 1) & (table["head"] == 2)].sort_values("distance")
    np.testing.assert_allclose(np.asarray(dist.data[1].y, dtype=float), mine["strength"].to_numpy())
    offset = page.offset_figure(runs.run_id, "1-2")
    maps = run.array("offset_maps")
    np.testing.assert_allclose(_z(offset), maps[1, 2], rtol=1e-6)
    assert offset.data[0].x[0] == -(maps.shape[-1] // 2)
    gallery = page.clusters_figure(runs.run_id)
    protos = run.array("cluster_prototypes")
    heat = [t for t in gallery.data if t.type == "heatmap"]
    assert len(heat) == protos.shape[0]
    np.testing.assert_allclose(np.asarray(decode_array(heat[0].z), dtype=float), protos[0], rtol=1e-6)
    info = run.table("cluster_info")
    share = 100 * float(info.loc[info["cluster"] == 0, "map_share"].iloc[0])
    # each cluster's title on two short lines, so that neighbouring titles never run together
    titles = [a.text for a in gallery.layout.annotations if a.text.startswith("cluster ")]
    assert (
        titles[0]
        == f"cluster 0<br>{share:.0f}% of maps, {int(info.loc[info['cluster'] == 0, 'n_heads_dominant'].iloc[0])} heads"
    )
    assert all(max(len(line) for line in t.split("<br>")) <= 24 for t in titles)
    # the title sits below the mode bar, with room for the two-line cluster titles under it
    assert gallery.layout.title.pad.t == figures.MODEBAR_PX
    assert gallery.layout.margin.t >= figures.title_top(gallery)


def test_intervals_concentration_and_validation_show_the_tables(runs: Runs) -> None:
    page = _page(runs.root)
    run = _run(runs)
    heads = run.heads
    for metric in views.METRICS:
        fig = page.intervals_figure(runs.run_id, metric)
        shown = heads[heads["pruned"]].nlargest(len(fig.data[0].x), metric).iloc[::-1]
        np.testing.assert_allclose(np.asarray(fig.data[0].x, dtype=float), shown[metric].to_numpy())
        up = shown[f"{metric}_high"].to_numpy() - shown[metric].to_numpy()
        np.testing.assert_allclose(np.asarray(decode_array(fig.data[0].error_x.array), dtype=float), up)
        assert list(fig.data[0].y) == [f"L{r.layer}H{r.head}" for r in shown.itertuples()]
    table = run.table("concentration")
    fig = page.concentration_figure(runs.run_id)
    np.testing.assert_allclose(np.asarray(fig.data[1].x, dtype=float), table["share"].to_numpy())
    np.testing.assert_allclose(np.asarray(fig.data[0].x, dtype=float), table["null_mean"].to_numpy())
    block = to_json(page.validation(runs.run_id))
    checked = run.table("validation")
    assert "vit-validation-graph" in block and str(checked["heads"].iloc[0]) in block
    assert "against the exact cosine drop over 6 heads" in block
    tested = heads[heads["vit_role"] == "important"]
    assert len(tested) == checked["n_heads"].iloc[0]
    info = to_json(
        page.head_info(runs.run_id, views.head_key(tested["layer"].iloc[0], tested["head"].iloc[0]))
    )
    assert "held-out images" in info and "random sets" in info
    findings = views.findings(run)
    assert any(line.startswith("Held-out check of") for line in findings)
    assert any("shuffled over the heads" in line for line in findings)


def test_head_selection_click_run_and_messages(runs: Runs) -> None:
    page = _page(runs.root)
    click = {"points": [{"x": "3", "y": "1", "z": 0.1}]}
    assert page.select_head(runs.run_id, click, "0-0", "vit-importance") == "1-3"
    assert page.select_head(runs.run_id, click, "0-0", "vit-run") == "0-0"  # a stale click is ignored
    best = views.default_head(runs.result)
    assert page.select_head(runs.run_id, None, "9-9") == views.head_key(*best)
    assert page.select_head(None, click, "0-0") is None
    skipped = runs.result.heads[~runs.result.heads["pruned"]].iloc[0]
    layer, head = int(skipped["layer"]), int(skipped["head"])
    info = to_json(page.head_info(runs.run_id, views.head_key(layer, head)))
    assert f"Layer {layer}, head {head}" in info and "Not pruned" in info
    assert "No head selected" in to_json(page.head_info(runs.run_id, None))
    findings = to_json(page.findings(runs.run_id))
    assert "Spearman" in findings and "Mean attention distance" in findings
    assert "preset small" in page.settings(runs.run_id)
    for fig in (page.importance_figure(None, None, None), page.agreement_figure(runs.other)):
        assert fig.layout.annotations and not fig.data
    assert "select a head" in page.distance_figure(runs.run_id, None).layout.annotations[0].text.replace(
        "<br>", " "
    )


def test_views_read_the_unsaved_result_like_the_run(runs: Runs) -> None:
    run = _run(runs)
    assert views.findings(run) == views.findings(runs.result)
    np.testing.assert_allclose(
        _z(views.offset_map_figure(runs.result, 0, 1)), _z(views.offset_map_figure(run, 0, 1))
    )
    assert views.settings_line(run) == views.settings_line(runs.result)


# ---------------------------------------------------------------------------------------- overlay


@pytest.fixture(scope="module")
def old_root(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The same run saved without the display table and arrays, as runs made before they existed."""
    root = tmp_path_factory.mktemp("vit-old-runs")
    result = runs.result
    old = dataclasses.replace(
        result,
        tables={k: v for k, v in result.tables.items() if k != "display"},
        arrays={k: v for k, v in result.arrays.items() if not k.startswith("display")},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
        path = old.save(root)
    return root, path.name


def test_overlay_figure_is_the_stored_pattern_on_the_patch_grid(runs: Runs) -> None:
    run = _run(runs)
    assert views.display_options(run) == [
        {"label": "astronaut (natural)", "value": 0},
        {"label": "scene_0000 (scenes)", "value": 1},
    ]
    fig = views.overlay_figure(run, 1, 1, 2, (2, 2))
    assert [t.type for t in fig.data] == ["image", "heatmap"]
    heat = np.asarray(decode_array(fig.data[1].z), dtype=float)
    want = vit_heads.display_attention(run, 1, 1, 2, (2, 2))
    assert heat.shape == (4, 4)  # the tiny CLIP tower's 4 x 4 patch grid
    np.testing.assert_allclose(heat, want, rtol=1e-6)
    row = run.array("display_attention")[1, 1, 2]
    token = int(np.flatnonzero(run.array("display_queries")[:, 0] == 1 + 2 * 4 + 2)[0])
    np.testing.assert_allclose(heat.ravel(), row[token, 1:].astype(float), rtol=1e-6)  # the grid is row-major
    np.testing.assert_allclose(
        np.asarray(decode_array(fig.data[1].x), dtype=float), [4, 12, 20, 28]
    )  # patch centres
    (outline,) = fig.layout.shapes
    assert (outline.x0, outline.x1, outline.y0, outline.y1) == (16, 24, 16, 24)  # patch (2, 2), 8 px a patch
    cls = float(row[token, 0])
    assert f"attention to CLS {cls:.3f}" in fig.layout.title.subtitle.text.replace("<br>", " ")
    assert fig.data[0].source.startswith("data:image/png;base64,")
    other = np.asarray(decode_array(views.overlay_figure(run, 0, 1, 2, (2, 2)).data[1].z), dtype=float)
    assert not np.allclose(other, heat)  # another image, another pattern
    # The default query is the centre patch; an unstored patch snaps to the nearest stored one.
    centre = views.overlay_figure(runs.result, 1, 1, 2)
    np.testing.assert_allclose(np.asarray(decode_array(centre.data[1].z), dtype=float), heat, rtol=1e-6)
    snapped = views.overlay_figure(run, 1, 1, 2, (3, 3))
    assert "nearest stored query" in snapped.layout.title.subtitle.text.replace("<br>", " ")
    assert snapped.layout.shapes[0].x0 == 16


def test_overlay_page_callbacks_click_a_patch_and_render(runs: Runs) -> None:
    page = _page(runs.root)
    assert page.display_choice(runs.run_id, None) == (views.display_options(_run(runs)), 0)
    assert page.display_choice(runs.run_id, 1)[1] == 1 and page.display_choice(None, 1) == ([], None)
    click = {"points": [{"x": 20.0, "y": 5.0, "curveNumber": 1}]}  # column 2, row 0 (8 px patches)
    assert page.select_query(runs.run_id, click, None, "vit-overlay") == [0, 2]
    assert page.select_query(runs.run_id, click, [2, 2], "vit-run") is None  # a new run: the centre
    assert page.select_query(runs.run_id, None, [2, 0], "vit-head") == [2, 0]
    fig = page.overlay_figure(runs.run_id, 0, "1-3", [0, 2])
    np.testing.assert_allclose(
        np.asarray(decode_array(fig.data[1].z), dtype=float),
        vit_heads.display_attention(_run(runs), 0, 1, 3, (0, 2)),
    )
    assert fig.layout.uirevision
    info = to_json(page.overlay_info(runs.run_id, 0, "1-3", [0, 2]))
    cls = vit_heads.display_pattern(_run(runs), 0, 1, 3, (0, 2)).cls
    assert f"attention to CLS {cls:.3f}" in info and "Query patch (0, 2)" in info
    assert "select a head" in page.overlay_figure(runs.run_id, 0, None, None).layout.annotations[
        0
    ].text.replace("<br>", " ")
    assert "cannot show run" in page.overlay_figure(runs.other, 0, "0-0", None).layout.annotations[
        0
    ].text.replace("<br>", " ")


def test_a_run_without_display_patterns_shows_the_hint(old_root: tuple[Path, str]) -> None:
    root, run_id = old_root
    page = _page(root)
    assert page.display_choice(run_id, 0) == ([], None)
    fig = page.overlay_figure(run_id, None, "1-2", None)
    assert not fig.data and "re-run headlab run vit-heads" in fig.layout.annotations[0].text.replace(
        "<br>", " "
    )
    assert "no stored display patterns" in fig.layout.annotations[0].text.replace("<br>", " ")
    assert "no stored display patterns" in to_json(page.overlay_info(run_id, None, "1-2", None))
    assert page.select_query(run_id, {"points": [{"x": 1.0, "y": 1.0}]}, None, "vit-overlay") is None
    served = render_route(create_app(root), "/vit", f"?run={run_id}")
    assert '"id": "vit-overlay"' in served and "no stored display images" in served


# ---------------------------------------------------------------------------------------- Dash


def test_layout_and_callbacks_through_dash(runs: Runs) -> None:
    page = _page(runs.root)
    app = Dash(__name__)
    app.layout = page.layout({"run": runs.run_id})
    page.register_callbacks(app)
    assert {
        "vit-importance.figure",
        "vit-agreement.figure",
        "vit-trend.figure",
        "vit-distance.figure",
        "vit-offset.figure",
        "vit-clusters.figure",
        "vit-head.value",
        "vit-head.options",
    } <= set(app.callback_map)
    grid = post_callback(
        app,
        "vit-importance.figure",
        [("vit-run", runs.run_id), ("vit-metric", "cosine_drop"), ("vit-head", "0-2")],
    )
    assert "cosine drop" in grid["layout"]["title"]["text"]
    offset = post_callback(app, "vit-offset.figure", [("vit-run", runs.run_id), ("vit-head", "1-0")])
    np.testing.assert_allclose(
        np.asarray(decode_array(offset["data"][0]["z"]), dtype=float),
        _run(runs).array("offset_maps")[1, 0],
        rtol=1e-6,
    )
    gallery = post_callback(app, "vit-clusters.figure", [("vit-run", runs.run_id)])
    assert "Attention-pattern clusters" in gallery["layout"]["title"]["text"]
    assert {"vit-overlay.figure", "vit-overlay-info.children", "vit-query.data"} <= set(app.callback_map)
    overlay = post_callback(
        app,
        "vit-overlay.figure",
        [
            ("vit-run", runs.run_id),
            ("vit-display-image", 1),
            ("vit-head", "0-3"),
            ("vit-query", "data", [2, 0]),
        ],
    )
    np.testing.assert_allclose(
        np.asarray(decode_array(overlay["data"][1]["z"]), dtype=float),
        vit_heads.display_attention(_run(runs), 1, 0, 3, (2, 0)),
    )


def test_the_app_serves_the_page_and_links_the_run(runs: Runs) -> None:
    app = create_app(runs.root)
    assert "vit-offset.figure" in app.callback_map
    served = render_route(app, "/vit", f"?run={runs.run_id}&metric=grad_importance")
    assert "ViT heads: importance" in served and '"value": "grad_importance"' in served
    home = next(p for p in build_pages(runs.root) if isinstance(p, HomePage))
    assert f"/vit?run={runs.run_id}" in to_json(home.layout({}))


# ---------------------------------------------------------------------------------------- report


def test_report_sections_render(runs: Runs, tmp_path: Path) -> None:
    assert section_builder("vit-heads") is vit_section.report_sections
    run = _run(runs)
    sections = vit_section.report_sections(run)
    assert [s.anchor for s in sections] == [
        "vit-overview",
        "vit-importance",
        "vit-statistics",
        "validation",
        "vit-distance",
        "vit-patterns",
    ]
    body = "".join(s.body for s in sections)
    for needle in (
        "vit-intervals-cosine",
        "vit-intervals-confidence",
        "vit-concentration",
        "validation-figure",
        "vit-importance-accuracy_drop",
        "vit-importance-grad_importance",
        "vit-agreement",
        "vit-trend",
        "vit-distance",
        "vit-offset",
        "vit-clusters",
    ):
        assert f'id="{needle}"' in body
    for line in views.findings(run):
        assert line.replace("&", "&amp;").replace("'", "&#x27;") in body
    page = report.render_report(run)
    assert 'id="vit-patterns"' in page and "Attention-pattern clusters" in page
    foreign = runstore.write_run(
        tmp_path / "runs",
        analysis="vit-heads",
        model_info={"name": "m"},
        config={},
        tables={"heads": run.heads[["layer", "head", "grad_importance"]]},
    )
    generic = report.render_report(runstore.open_run(foreign))
    assert 'id="heads-heatmap-0"' in generic and 'id="vit-overview"' not in generic
