"""The atlas page (callbacks called directly and through Dash), its views and its report section, on
atlases built from tiny-model runs.

The tiny random models give no head the census's roles and every head the sink roles, so the
tiny-llama atlas has its role flags set by hand (from a real join of a census and a sinks run) to a
known pattern: heads with one, two and three roles, heads with none, and one role validated on
held-out inputs. The numbers, provenance and patterns stay those of the real runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from dash import Dash

import probe
from analyses import runstore
from analyses.atlas import AtlasConfig, build_atlas, findings
from analyses.base import AnalysisResult
from analyses.census import CensusConfig, run_census
from analyses.registry import ANALYSES
from analyses.sinks import SinksConfig, run_sinks
from dashboard import report
from dashboard.app import create_app
from dashboard.atlas import comparison, views
from dashboard.atlas import report as atlas_report
from dashboard.atlas.page import AtlasPage
from dashboard.atlas.views import NO_ROLE, PickedHead
from dashboard.catalog import RunCatalog
from dashboard.core.page import Site
from dashboard.registry import resolve, section_builder
from tests.conftest import decode_array, fixed_code_revision, post_callback, render_route, to_json

CENSUS = CensusConfig(n_natural=4, n_repeated=2, seq_len=32, repeat_len=8, n_examples=2)
SINKS = SinksConfig(seq_len=24, n_sequences=6, batch_size=6, n_examples=2, hidden_min_queries=4, eps=0.1)
# tiny-llama: 3 layers x 4 heads. L2H2 has three roles, L0H0 and L0H1 two, L2H1 one, L1H3 none.
ROLES: dict[str, set[tuple[int, int]]] = {
    "previous_token": {(1, 2)},
    "induction": {(2, 1), (2, 2)},
    "duplicate_token": {(2, 2)},
    "sink": {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 2)},
    "hidden_sink": {(0, 0), (0, 1)},
}
VALIDATED = {"induction": {(2, 2)}}  # L2H1's induction role was tested and not confirmed
PATHS = {"census": "/census", "sinks": "/sinks", "atlas": "/atlas", "vit-heads": "/vit"}


@dataclass(frozen=True)
class Runs:
    root: Path
    llama: str  # the tiny-llama atlas, roles as in ROLES
    gpt2: str  # the tiny-gpt2 atlas (census only), as built
    census: str  # the tiny-llama census run the atlas joined
    result: AnalysisResult  # the tiny-llama atlas before it was saved


def with_roles(
    result: AnalysisResult, roles: dict[str, set[tuple[int, int]]], validated: dict[str, set[tuple[int, int]]]
) -> AnalysisResult:
    """The atlas with its role flags (and what follows from them) set to ``roles``."""
    heads = result.tables["heads"].copy()
    names = findings.role_names(heads)
    keys = list(zip(heads["layer"], heads["head"], strict=True))
    for name in names:
        heads[f"role.{name}"] = [k in roles.get(name, set()) for k in keys]
    for name, chosen in validated.items():
        heads[f"validated.{name}"] = [k in chosen for k in keys]
    matrix = heads[[f"role.{n}" for n in names]].to_numpy(bool)
    heads["n_roles"] = matrix.sum(axis=1)
    heads["roles"] = ["+".join(n for n, f in zip(names, row, strict=True) if f) for row in matrix]
    table = result.tables["roles"].copy()
    flags = [heads[f"role.{r}"] for r in table["role"]]
    table["n_heads"] = [int(f.sum()) for f in flags]
    table["share"] = [float(f.mean()) for f in flags]
    table["mean_depth"] = [float(heads.loc[f, "depth"].mean()) if f.any() else math.nan for f in flags]
    table["n_validated"] = [
        int((heads[f"validated.{r}"] & f).sum()) if f"validated.{r}" in heads else -1
        for r, f in zip(table["role"], flags, strict=True)
    ]
    tables = {
        **result.tables,
        "heads": heads,
        "roles": table,
        "overlap": findings.overlap(heads, result.config.min_heads),
        "correlations": findings.correlations(heads),
        "multi_role": findings.multi_role(heads, result.config.top_multi),
    }
    return dataclasses.replace(result, tables=tables)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """A runs root with a census and a sinks run of tiny-llama, a census run of tiny-gpt2, and an
    atlas of each model."""
    root = tmp_path_factory.mktemp("atlas-runs")
    with fixed_code_revision():
        llama = probe.load_model("tiny-llama", device="cpu")
        census = run_census(llama, CENSUS, progress=False).save(root).name
        run_sinks(llama, SINKS, progress=False).save(root)
        run_census(probe.load_model("tiny-gpt2", device="cpu"), CENSUS, progress=False).save(root)
        config = AtlasConfig(root=str(root))
        built = with_roles(build_atlas("tiny-llama", config), ROLES, VALIDATED)
        gpt2 = build_atlas("tiny-gpt2", config).save(root).name
        llama_id = built.save(root).name
    yield Runs(root, llama_id, gpt2, census, built)


def _page(root: Path) -> AtlasPage:
    return AtlasPage(Site(catalog=RunCatalog(root), analysis_paths=PATHS))


def _text(fig: Any) -> str:
    title = fig.layout.title
    return " ".join(str(t or "") for t in (title.text, title.subtitle.text)).replace("<br>", " ")


def _message(fig: Any) -> str:
    return str(fig.layout.annotations[0].text).replace("<br>", " ")


def _heads(rows: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(rows["layer"].astype(int), rows["head"].astype(int), strict=True))


def test_the_registry_resolves_the_page_and_the_report() -> None:
    entry = ANALYSES["atlas"]
    assert entry.page is not None and entry.report is not None
    assert resolve(entry.page) is AtlasPage and "page" not in entry.opt_outs
    assert resolve(entry.report) is atlas_report.report_sections and "report" not in entry.opt_outs
    assert section_builder("atlas") is atlas_report.report_sections
    assert AtlasPage.shown_analyses() == ("atlas",)


def test_the_grid_shows_every_role_of_a_head_with_several(runs: Runs) -> None:
    page = _page(runs.root)
    fig = page.grid_figure(runs.llama, {"run": runs.llama, "layer": 2, "head": 2})
    heads = runstore.open_run(runs.root / runs.llama).table("heads")
    names = views.role_names(heads)
    assert names == ["previous_token", "induction", "duplicate_token", "sink", "hidden_sink"]
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (3, 4 * views.STRIPES)

    def cell(layer: int, head: int) -> list[int]:
        return [int(v) for v in z[layer, head * views.STRIPES : (head + 1) * views.STRIPES]]

    # L2H2: induction, duplicate-token and sink head, a third of the cell each (1-based role indices)
    assert cell(2, 2) == [2] * 4 + [3] * 4 + [4] * 4
    assert cell(0, 0) == [4] * 6 + [5] * 6  # sink and hidden sink, half each
    assert cell(2, 1) == [2] * 12 and cell(1, 3) == [0] * 12
    hover = str(np.asarray(fig.data[0].text, dtype=object)[2, 2 * views.STRIPES])
    assert hover.startswith("L2H2 (3 roles)")
    for label in ("induction head", "duplicate-token head", "sink head"):
        assert label in hover
    # the number of roles on each head with several, and only on those
    counts = fig.data[1]
    marked = {(int(y), int(x)): str(t) for x, y, t in zip(counts.x, counts.y, counts.text, strict=True)}
    assert marked == {(2, 2): "3", (0, 0): "2", (0, 1): "2"}
    legend = [t.name for t in fig.data[2:]]
    assert legend == [
        "previous-token head (1)",
        "induction head (2)",
        "duplicate-token head (1)",
        "sink head (first token) (6)",
        "hidden-sink head (2)",
    ]
    outline = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(outline) == 1 and (outline[0].x0, outline[0].y0) == (1.5, 1.5)
    assert "12 heads, 8 with a role, 3 with several" in _text(fig)
    assert not [s for s in page.grid_figure(runs.llama, None).layout.shapes if s.type == "rect"]
    assert "cannot show run" in _message(page.grid_figure("../elsewhere", None))


def test_a_click_on_the_grid_or_a_row_selects_the_head(runs: Runs) -> None:
    page = _page(runs.root)
    llama = runs.llama
    # a click lands on one of the cell's stripes: x is the head plus an offset within the cell
    click = {"points": [{"curveNumber": 0, "x": 1.29, "y": 2, "z": 2}]}
    assert views.clicked_head(click) == PickedHead(2, 1)
    assert page.select_head(llama, click, None, "atlas-grid") == {"run": llama, "layer": 2, "head": 1}
    row = {"type": "atlas-row", "where": "heads", "head": "L1H3"}
    assert page.select_head(llama, None, None, row) == {"run": llama, "layer": 1, "head": 3}
    held = {"run": llama, "layer": 0, "head": 1}
    assert page.select_head(llama, None, held, "atlas-run") == held
    # a head of another run, or none: the head with the most roles
    stale = {"run": runs.gpt2, "layer": 0, "head": 1}
    assert page.select_head(llama, None, stale, "atlas-run") == {"run": llama, "layer": 2, "head": 2}
    outside = {"points": [{"x": 7.0, "y": 9}]}
    assert page.select_head(llama, outside, held, "atlas-grid") == held
    assert page.select_head(None, click, held, "atlas-grid") is None
    assert views.parse_head("L12H3") == PickedHead(12, 3) and views.parse_head("12-3") is None
    # the URL's head opens its card
    layout = to_json(page.layout({"run": llama, "head": "L0H1"}))
    assert '"data": {"run": "' + llama + '", "layer": 0, "head": 1}' in layout


def test_the_filters_narrow_the_table(runs: Runs) -> None:
    run = runstore.open_run(runs.root / runs.llama)
    heads = run.table("heads")
    assert len(views.filter_heads(run)) == 12
    assert _heads(views.filter_heads(run, roles=["induction"])) == ROLES["induction"]
    assert _heads(views.filter_heads(run, roles=["induction", "previous_token"])) == {(2, 1), (2, 2), (1, 2)}
    assert _heads(views.filter_heads(run, roles=["sink", "induction"], match="all")) == {(2, 2)}
    none = {(int(r.layer), int(r.head)) for r in heads.itertuples() if r.n_roles == 0}
    assert _heads(views.filter_heads(run, roles=[NO_ROLE])) == none and len(none) == 4
    assert _heads(views.filter_heads(run, layers=[1, 1])) == {(1, h) for h in range(4)}
    entropy = heads["census.entropy"]
    low, high = float(entropy.quantile(0.25)), float(entropy.quantile(0.75))
    inside = views.filter_heads(run, metric="census.entropy", low=low, high=high)
    assert _heads(inside) == _heads(heads[(entropy >= low) & (entropy <= high)]) and 0 < len(inside) < 12
    ordered = views.filter_heads(run, sort="census.entropy", descending=False)
    assert list(ordered["census.entropy"]) == sorted(entropy)
    by_roles = views.filter_heads(run)
    assert list(by_roles["n_roles"])[:3] == [3, 2, 2] and (
        by_roles.loc[0, "layer"],
        by_roles.loc[0, "head"],
    ) == (2, 2)
    # the page's table: the count, one button per matching head, the sort and filter metric shown
    table = to_json(
        _page(runs.root).heads_table(
            runs.llama,
            ["induction"],
            "any",
            "census.entropy",
            None,
            None,
            [0, 2],
            "census.induction",
            "ascending",
        )
    )
    assert "2 of 12 heads match" in table
    assert '"head": "L2H1"' in table and '"head": "L2H2"' in table and '"head": "L0H0"' not in table
    assert "census.induction" in table and "census.entropy" in table
    induction = heads.set_index(["layer", "head"])["census.induction"]
    order = sorted(ROLES["induction"], key=lambda k: (induction[k], k))
    positions = [table.index(f'"head": "L{layer}H{head}"') for layer, head in order]
    assert positions == sorted(positions)  # lowest first
    roles, metrics, sorts, low_layer, high_layer, value, _marks = _page(runs.root).filter_options(runs.llama)
    assert [o["value"] for o in roles] == [*views.role_names(heads), NO_ROLE]
    assert roles[1]["label"] == "induction head (2)" and roles[-1]["label"] == "no role (4)"
    assert "census.entropy" in [o["value"] for o in metrics] and "census.entropy_sem" not in str(metrics)
    assert sorts[0]["value"] == "n_roles" and (low_layer, high_layer, value) == (0, 2, [0, 2])


def test_the_head_card_lists_every_number_with_its_percentile(runs: Runs) -> None:
    run = runstore.open_run(runs.root / runs.llama)
    heads = run.table("heads")
    head = PickedHead(2, 2)
    card = views.head_card(run, head)
    sources = views.source_columns(heads)
    folded = {c for c in sources if c.endswith("_sem") and c.removesuffix("_sem") in sources}
    assert list(card.metrics["column"]) == [c for c in sources if c not in folded]
    assert {"census", "sinks"} == set(card.metrics["analysis"])
    row = heads[(heads["layer"] == 2) & (heads["head"] == 2)].iloc[0]
    provenance = run.table("columns").set_index("column")["run_id"]
    for r in card.metrics.itertuples(index=False):
        assert r.run_id == provenance[r.column]
        if not r.numeric:
            assert math.isnan(r.percentile)
            continue
        x = heads[r.column].to_numpy(float)
        x = x[np.isfinite(x)]
        expected = 100.0 * np.mean(x <= float(row[r.column])) if np.isfinite(row[r.column]) else math.nan
        assert r.percentile == pytest.approx(expected, nan_ok=True), r.column
    assert card.metrics.set_index("column").loc["census.entropy", "sem"] == pytest.approx(
        row["census.entropy_sem"]
    )
    assert list(card.roles["role"]) == ["induction", "duplicate_token", "sink"]
    assert list(card.roles["validated"]) == ["yes", "not tested", "not tested"]
    assert views.head_card(run, PickedHead(2, 1)).roles["validated"].tolist() == ["no"]
    assert card.roles.iloc[0]["threshold"] == "induction > 0.4" and "Olsson" in card.roles.iloc[0]["paper"]
    # the card as the page draws it: every number with its percentile, the roles and the links
    page = _page(runs.root)
    shown = to_json(page.head_card(runs.llama, {"run": runs.llama, "layer": 2, "head": 2}))
    assert "L2H2: layer 2, head 2, KV head 1, relative depth 0.67" in shown and "3 roles:" in shown
    for r in card.metrics.itertuples(index=False):
        assert f'"{r.source_column}"' in shown
        if r.numeric and not math.isnan(r.percentile):
            assert f'"children": "{r.percentile:.0f}"' in shown
    census_link = f"/census?run={runs.census}&head=L2H2"
    assert census_link in shown and runs.census in shown and "induction > 0.4" in shown
    assert "not tested" in shown and '"yes"' in shown
    assert views.head_parameter("vit-heads", head) == "2-2" and views.head_parameter("sinks", head) == "L2H2"
    assert "No head selected" in to_json(page.head_card(runs.llama, None))
    assert "cannot show head L7H7" in to_json(
        page.head_card(runs.llama, {"run": runs.llama, "layer": 7, "head": 7})
    )
    assert views.percentile([1.0, 2.0, math.nan, 3.0, 4.0], 2.0) == 50.0
    assert math.isnan(views.percentile([1.0, 2.0], math.nan))


def test_the_pattern_is_the_joined_census_runs(runs: Runs, tmp_path: Path) -> None:
    page = _page(runs.root)
    fig = page.pattern_figure(runs.llama, {"run": runs.llama, "layer": 2, "head": 2})
    assert fig.data[0].type == "image" and fig.data[0].source.startswith("data:image/png;base64,")
    assert _text(fig).startswith("L2H2 on repeated example 0")  # an induction head: the repeated block
    natural = page.pattern_figure(runs.llama, {"run": runs.llama, "layer": 1, "head": 0})
    assert _text(natural).startswith("L1H0 on example 0")  # a sink head: natural text
    assert "select a head" in _message(page.pattern_figure(runs.llama, None))
    # an atlas whose census run is not under the root, and one that joined no census run
    other = tmp_path / "runs"
    with fixed_code_revision():
        moved = runs.result.save(other).name
        sources = runs.result.tables["sources"]
        no_census = dataclasses.replace(
            runs.result, tables={**runs.result.tables, "sources": sources[sources["analysis"] != "census"]}
        ).save(other)
    head = {"layer": 0, "head": 0}
    assert "cannot be opened" in _message(_page(other).pattern_figure(moved, {"run": moved, **head}))
    message = _message(_page(other).pattern_figure(no_census.name, {"run": no_census.name, **head}))
    assert "none kept whole patterns" in message and "(sinks)" in message


def test_the_findings_overlap_correlations_and_many_role_heads(runs: Runs) -> None:
    page = _page(runs.root)
    run = runstore.open_run(runs.root / runs.llama)
    fig = page.overlap_figure(runs.llama)
    names = list(fig.data[0].x)
    assert names == ["induction", "sink", "hidden_sink"]  # the roles with at least min_heads = 2 heads
    z = np.asarray(fig.data[0].z, dtype=float)
    i, s, h = (names.index(n) for n in ("induction", "sink", "hidden_sink"))
    assert z[i, s] == pytest.approx(1 / 7) and z[s, i] == pytest.approx(1 / 7)  # 1 head in both of 7
    assert z[s, h] == pytest.approx(2 / 6) and z[i, h] == 0.0 and math.isnan(z[s, s])
    text = np.asarray(fig.data[0].text, dtype=object)
    assert (text[i, s], text[s, h], text[s, s]) == ("1", "2", "(6)")
    cross = views.top_correlations(run)
    assert len(cross) and not cross["same_analysis"].any()
    assert list(cross["spearman"].abs()) == sorted(cross["spearman"].abs(), reverse=True)
    shown = to_json(page.correlations(runs.llama))
    top = cross.iloc[0]
    assert f"{top['spearman']:+.2f}" in shown and str(top["metric_a"]) in shown
    many = to_json(page.many_roles(runs.llama))
    assert many.index('"head": "L2H2"') < many.index('"head": "L0H0"') < many.index('"head": "L0H1"')
    assert "induction head, duplicate-token head, sink head (first token)" in many
    lines = views.findings_lines(run)
    assert lines[0].startswith(
        "8 of 12 heads have at least one of the 5 roles; the most common is sink (6 heads"
    )
    assert any(line.startswith("3 heads have two roles or more; L2H2 has the most") for line in lines)
    assert any("sink and hidden_sink share 2 heads (Jaccard 0.33" in line for line in lines)


def test_the_comparison_has_one_trace_per_model(runs: Runs) -> None:
    page = _page(runs.root)
    options, chosen = page.compare_choice(runs.llama)
    assert chosen == [runs.llama, runs.gpt2] and {o["value"] for o in options} == {runs.llama, runs.gpt2}
    roles, role, metrics, metric = page.compare_controls(chosen, "induction", None)
    assert role == "induction" and metric == metrics[0]["value"]
    assert {o["value"] for o in roles} == {
        "previous_token",
        "induction",
        "duplicate_token",
        "sink",
        "hidden_sink",
    }
    frames = comparison.tables([runstore.open_run(runs.root / r) for r in chosen])
    fig = page.compare_depth(chosen, "induction")
    assert [t.name for t in fig.data] == ["tiny-llama", "tiny-gpt2"]
    for trace in fig.data:
        rows = frames["role_depth"].query("model == @trace.name and role == 'induction' and heads > 0")
        np.testing.assert_allclose(list(trace.y), rows["share"])
        np.testing.assert_allclose(list(trace.x), (rows["depth_low"] + rows["depth_high"]) / 2)
    assert list(fig.data[0].y) == [0.0, 0.0, 0.5]  # tiny-llama: two of layer 2's four heads
    # the sink roles come from a sinks run, which tiny-gpt2 has not: its line is absent, and said so
    sink = page.compare_depth(chosen, "sink")
    assert [t.name for t in sink.data] == ["tiny-llama"] and "Not given by the runs of: tiny-gpt2" in _text(
        sink
    )
    boxes = page.compare_metrics(chosen, "census.entropy")
    assert [t.type for t in boxes.data] == ["box", "box"] and [t.name for t in boxes.data] == [
        "tiny-llama",
        "tiny-gpt2",
    ]
    dist = frames["metrics"].set_index(["model", "metric"])
    for trace in boxes.data:
        q = dist.loc[(trace.name, "census.entropy")]
        assert (trace.q1[0], trace.median[0], trace.q3[0]) == pytest.approx((q["q25"], q["q50"], q["q75"]))
        assert (trace.lowerfence[0], trace.upperfence[0]) == pytest.approx((q["q10"], q["q90"]))
    totals = to_json(page.compare_totals(chosen))
    assert "6 (50%)" in totals and "tiny-gpt2" in totals
    assert "two atlases of tiny-llama" in _message(page.compare_depth([runs.llama, runs.llama], "sink"))
    assert "pick one atlas or more" in _message(page.compare_metrics([], "census.entropy"))


def test_layout_and_callbacks_through_dash(runs: Runs, tmp_path: Path) -> None:
    page = _page(runs.root)
    layout = page.layout({"run": runs.llama})
    text = to_json(layout)
    for element in (
        "atlas-run",
        "atlas-grid",
        "atlas-head",
        "atlas-head-card",
        "atlas-pattern",
        "atlas-filter-roles",
        "atlas-filter-layers",
        "atlas-table",
        "atlas-overlap",
        "atlas-compare-runs",
        "atlas-compare-depth",
        "atlas-compare-metrics",
    ):
        assert f'"id": "{element}"' in text
    assert f'"value": "{runs.llama}"' in text
    app = Dash(__name__)
    app.layout = layout
    page.register_callbacks(app)
    assert {"atlas-grid.figure", "atlas-head-card.children", "atlas-table.children"} <= set(app.callback_map)
    head = {"run": runs.llama, "layer": 2, "head": 2}
    grid = post_callback(app, "atlas-grid.figure", [("atlas-run", runs.llama), ("atlas-head", "data", head)])
    assert np.asarray(decode_array(grid["data"][0]["z"])).shape == (3, 4 * views.STRIPES)
    card = json.dumps(
        post_callback(
            app, "atlas-head-card.children", [("atlas-run", runs.llama), ("atlas-head", "data", head)]
        )
    )
    assert "L2H2: layer 2" in card
    inputs: list[tuple[str, Any] | tuple[str, str, Any]] = [
        ("atlas-run", runs.llama),
        ("atlas-filter-roles", ["sink"]),
        ("atlas-filter-match", "any"),
        ("atlas-filter-metric", None),
        ("atlas-filter-low", None),
        ("atlas-filter-high", None),
        ("atlas-filter-layers", [0, 0]),
        ("atlas-sort", "n_roles"),
        ("atlas-order", "descending"),
    ]
    table = json.dumps(post_callback(app, "atlas-table.children", inputs))
    assert "2 of 12 heads match" in table  # the sink heads of layer 0
    compared = post_callback(
        app,
        "atlas-compare-depth.figure",
        [("atlas-compare-runs", [runs.llama, runs.gpt2]), ("atlas-compare-role", "induction")],
    )
    assert [t["name"] for t in compared["data"]] == ["tiny-llama", "tiny-gpt2"]
    # a click on the map, through Dash's context (the rows' buttons are a pattern-matching input)
    payload = {
        "output": "atlas-head.data",
        "outputs": {"id": "atlas-head", "property": "data"},
        "inputs": [
            {"id": "atlas-run", "property": "value", "value": runs.llama},
            {"id": "atlas-grid", "property": "clickData", "value": {"points": [{"x": 0.9, "y": 1}]}},
            [],
        ],
        "changedPropIds": ["atlas-grid.clickData"],
        "state": [{"id": "atlas-head", "property": "data", "value": head}],
    }
    response = app.server.test_client().post("/_dash-update-component", json=payload)
    assert json.loads(response.data)["response"]["atlas-head"]["data"] == {
        "run": runs.llama,
        "layer": 1,
        "head": 1,
    }
    # the whole app routes /atlas to the page
    assert '"id": "atlas-grid"' in render_route(create_app(runs.root), "/atlas", f"?run={runs.gpt2}")


def test_without_an_atlas_the_page_says_how_to_build_one(runs: Runs, tmp_path: Path) -> None:
    empty = to_json(_page(tmp_path / "none").layout({}))
    assert "No head atlas under" in empty and "headlab atlas --model M" in empty and "--run-missing" in empty
    only_runs = tmp_path / "runs"
    only_runs.mkdir()
    shutil.copytree(runs.root / runs.census, only_runs / runs.census)
    page = _page(only_runs)
    text = to_json(page.layout({}))
    assert f"headlab atlas --model tiny-llama --root {only_runs}" in text and "(runs of census)" in text
    assert "no atlas run selected" in _message(page.grid_figure(None, None))
    assert page.select_head(None, None, None) is None and page.filter_options(None)[0] == []


def test_the_report_section_renders_the_key_numbers(runs: Runs, tmp_path: Path) -> None:
    run = runstore.open_run(runs.root / runs.llama)
    sections = atlas_report.report_sections(run)
    assert [s.anchor for s in sections] == [
        "atlas-summary",
        "atlas-roles",
        "atlas-grid",
        "atlas-overlap",
        "atlas-correlations",
        "atlas-many",
    ]
    body = "".join(s.body for s in sections)
    for figure_id in ("atlas-grid-figure", "atlas-overlap-figure"):
        assert f'id="{figure_id}"' in body
    assert "<b>12 (3 layers × 4 heads)</b> heads" in body and "<b>8</b> heads with a role" in body
    assert "<b>3</b> heads with two roles or more" in body
    roles = run.table("roles").set_index("role")
    assert "<td>induction &gt; 0.4</td>" in body and html_escaped(roles.loc["induction", "paper"]) in body
    assert "<td>1 of 2</td>" in body and body.count("<td>not tested</td>") == 4
    assert f"<td>{roles.loc['sink', 'n_heads']}</td><td>50.0%</td>" in body
    assert "<td>sink</td><td>hidden_sink</td><td>6</td><td>2</td><td>2</td><td>0.33</td>" in body
    top = views.top_correlations(run, 1).iloc[0]
    assert f"<td>{top['metric_a']}</td><td>{top['metric_b']}</td><td>{top['spearman']:+.2f}</td>" in body
    assert "<td>L2H2</td><td>1</td><td>0.67</td><td>3</td>" in body
    assert runs.census in body
    html = report.render_report(run)
    assert 'id="atlas-summary"' in html and "Roles that share heads" in html
    with fixed_code_revision():
        foreign = runstore.write_run(
            tmp_path / "runs",
            analysis="atlas",
            model_info={"name": "m"},
            config={},
            tables={"heads": run.table("heads")[["layer", "head", "kv_head", "census.entropy"]]},
        )
    generic = report.render_report(runstore.open_run(foreign))
    assert 'id="heads-heatmap-0"' in generic  # not an atlas's tables: the generic heat maps


def html_escaped(text: str) -> str:
    import html

    return html.escape(str(text))
