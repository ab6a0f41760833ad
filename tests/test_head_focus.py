"""The head atlas's links focus a head on the analysis pages: ``head=L<layer>H<head>`` (or
``<layer>-<head>``) is parsed and checked against the run's heads, a banner says which head is
focused (or, for a bad parameter, why none is) and links back to the atlas, the census selects that
head, and the layer x head maps of the other pages outline it."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import pytest
from dash import Dash
from dash.exceptions import PreventUpdate
from plotly.subplots import make_subplots

import probe
from analyses.census import CensusConfig, run_census
from dashboard.act.page import ActPage
from dashboard.app import build_pages, create_app
from dashboard.catalog import RunCatalog
from dashboard.census.page import CensusPage
from dashboard.core import figures, focus
from dashboard.core.page import AnalysisPage, Page, Site
from dashboard.retrieval.page import RetrievalPage
from tests.conftest import fixed_code_revision, render_route, to_json
from tests.test_act_dashboard import FakeActConfig
from tests.test_act_dashboard import make_result as make_act_result
from tests.test_retrieval_dashboard import make_result as make_retrieval_result

TINY_LAYERS, TINY_HEADS = 3, 4  # the tiny llama


def _heads(n_layers: int = TINY_LAYERS, n_heads: int = TINY_HEADS, group: int = 2) -> pd.DataFrame:
    rows = [(layer, h, h // group) for layer in range(n_layers) for h in range(n_heads)]
    return pd.DataFrame(rows, columns=["layer", "head", "kv_head"])


# ------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("value", "expected"),
    [("L3H7", (3, 7)), ("l0h12", (0, 12)), (" L2H1 ", (2, 1)), ("3-7", (3, 7)), ("10-0", (10, 0))],
)
def test_both_forms_parse(value: str, expected: tuple[int, int]) -> None:
    assert focus.parse_head(value) == expected


@pytest.mark.parametrize(
    "value", ["", "L3", "H7", "L3H", "3-", "-3", "L-1H2", "3-7-1", "LxH1", "3 7", None, 37]
)
def test_junk_parses_to_nothing(value: Any) -> None:
    assert focus.parse_head(value) is None


def test_read_checks_the_head_against_the_runs_heads() -> None:
    heads = _heads()
    assert focus.read({}, heads) == focus.Focus()
    ok = focus.read({"head": "L2H3"}, heads)
    assert ok.data == {"layer": 2, "head": 3, "kv_head": 1} and ok.label == "L2H3" and not ok.problem
    assert focus.read({"head": "1-0"}, heads).head == (1, 0)
    assert focus.read({"head": "L2H3"}).data == {"layer": 2, "head": 3}  # no run: not checked
    for wanted, why in [("L3H0", "3 layers × 4 heads"), ("L0H4", "not a head"), ("junk", "L<layer>H<head>")]:
        bad = focus.read({"head": wanted}, heads)
        assert bad.data is None and bad.head is None and why in bad.problem and "\n" not in bad.problem
    assert len(focus.read({"head": "x" * 300}).problem) < 120


# ------------------------------------------------------------------------------------- banner


def test_the_banner_names_the_head_and_links_back_to_the_atlas() -> None:
    shown = to_json(focus.banner(focus.read({"head": "L1H2"}, _heads()), "p-focus"))
    assert "Focused on L1H2" in shown and "(from the head atlas)" in shown
    assert '"href": "/atlas?head=L1H2"' in shown
    with_run = focus.banner(focus.read({"head": "1-2", "atlas_run": "a b&c"}), "p-focus")
    assert '"href": "/atlas?run=a+b%26c&head=L1H2"' in to_json(with_run)


def test_the_banner_says_why_a_bad_head_focuses_nothing_and_is_empty_without_one() -> None:
    hint = json.loads(to_json(focus.banner(focus.read({"head": "L9H9"}, _heads()), "p-focus")))
    paragraph = hint["props"]["children"]["props"]
    assert paragraph["className"] == "hint" and "L9H9 is not a head" in paragraph["children"]
    assert "Focused" not in json.dumps(hint)
    empty = json.loads(to_json(focus.banner(focus.read({}), "p-focus")))
    assert empty["props"].get("children") is None and empty["props"]["id"] == "p-focus"


# ------------------------------------------------------------------------------------ outline


def _rects(fig: go.Figure) -> list[tuple[str, str, float, float]]:
    return [(s.xref, s.yref, s.x0 + 0.5, s.y0 + 0.5) for s in fig.layout.shapes if s.type == "rect"]


def test_outline_marks_the_cell_on_every_map_and_nothing_when_out_of_range() -> None:
    table = _heads().assign(v=range(TINY_LAYERS * TINY_HEADS))
    data = focus.read({"head": "L2H1"}, table).data
    assert _rects(focus.outline(figures.head_heatmap(table, "v"), data)) == [("x", "y", 1, 2)]
    assert _rects(focus.outline(figures.head_heatmap(table, "v"), data, kv=True)) == [("x", "y", 0, 2)]
    assert _rects(focus.outline(figures.head_heatmap(table, "v"), None)) == []
    assert _rects(focus.outline(figures.head_heatmap(table, "v"), {"layer": 7, "head": 0})) == []
    assert _rects(focus.outline(figures.head_heatmap(table, "v"), "junk")) == []
    two = make_subplots(rows=1, cols=2)
    for col in (1, 2):
        two.add_trace(
            go.Heatmap(z=[[0, 1], [2, 3], [4, 5]], x=["0", "1"], y=["0", "1 (sliding)", "2"]), 1, col
        )
    two.update_xaxes(type="category").update_yaxes(type="category")
    assert _rects(focus.outline(two, {"layer": 1, "head": 1})) == [("x", "y", 1, 1), ("x2", "y2", 1, 1)]


# --------------------------------------------------------------------------------------- pages


@dataclass(frozen=True)
class Roots:
    census: Path
    retrieval: Path
    act: Path


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Roots]:
    made = Roots(*(tmp_path_factory.mktemp(name) for name in ("census", "retrieval", "act")))
    with fixed_code_revision():
        model = probe.load_model("tiny-llama", device="cpu")
        small = CensusConfig(n_natural=2, n_repeated=2, seq_len=16, repeat_len=4, n_examples=1)
        run_census(model, small, progress=False).save(made.census)
        make_retrieval_result().save(made.retrieval)
        make_act_result(FakeActConfig()).save(made.act)
    yield made


def _page(kind: type[Page], root: Path) -> Any:
    return kind(Site(catalog=RunCatalog(root), analysis_paths={"census": "/census"}))


def _find(component: Any, element_id: str) -> Any:
    """The element ``element_id`` in a layout tree (None: not there)."""
    if getattr(component, "id", None) == element_id:
        return component
    children = getattr(component, "children", None)
    for child in children if isinstance(children, list | tuple) else [children]:
        if child is not None and not isinstance(child, str | int | float):
            found = _find(child, element_id)
            if found is not None:
                return found
    return None


def _post(
    app: Dash, output: str, inputs: Sequence[tuple[str, str, Any]], state: Sequence[tuple[str, str, Any]]
) -> Any:
    """The callback of ``output`` through Dash's endpoint, with its ``state`` (as a browser sends it)."""
    element, prop = output.split(".")
    payload = {
        "output": output,
        "outputs": {"id": element, "property": prop},
        "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
        "changedPropIds": [f"{inputs[0][0]}.{inputs[0][1]}"],
        "state": [{"id": i, "property": p, "value": v} for i, p, v in state],
    }
    response = app.server.test_client().post("/_dash-update-component", json=payload)
    assert response.status_code == 200, response.data[:500]
    return json.loads(response.data)["response"][element][prop.split("@")[0]]


def test_the_census_selects_the_focused_head_and_outlines_it(roots: Roots) -> None:
    page = _page(CensusPage, roots.census)
    run_id = page.choose_run({}).run_id
    layout = page.layout({"head": "L2H1"})
    selected = _find(layout, "census-head").data
    assert selected == {"run": run_id, "layer": 2, "head": 1}
    assert "Focused on L2H1" in to_json(_find(layout, "census-focus"))
    kept = page.select_head(run_id, None, "induction", selected)  # the page's first callback keeps it
    assert kept == selected
    fig = page.heatmap_figure(run_id, "induction", kept)
    assert [(s.x0 + 0.5, s.y0 + 0.5) for s in fig.layout.shapes if s.type == "rect"] == [(1, 2)]
    for wanted, why in [("L3H0", "not a head"), ("nonsense", "names no head")]:
        bad = page.layout({"head": wanted})
        assert _find(bad, "census-head").data is None and why in to_json(_find(bad, "census-focus"))
    assert _find(page.layout({}), "census-head").data is None


def _outline_callback(app: Dash, graph_id: str) -> str:
    """The key of the callback that outlines the focused head on ``graph_id``."""
    (key,) = [k for k in app.callback_map if k.startswith(f"{graph_id}.figure@")]
    return key


def _patched_rects(patch: Any) -> list[tuple[str, str, float, float]]:
    """The outlines an outline callback's Patch sets as the figure's shapes."""
    (operation,) = patch["operations"]
    assert operation["location"] == ["layout", "shapes"]
    return [(s["xref"], s["yref"], s["x0"] + 0.5, s["y0"] + 0.5) for s in operation["params"]["value"]]


def test_the_retrieval_maps_outline_the_focused_head(roots: Roots) -> None:
    page = _page(RetrievalPage, roots.retrieval)
    run_id = page.choose_run({}).run_id
    layout = page.layout({"run": run_id, "head": "L3H4", "atlas_run": "atlas-1"})
    store = _find(layout, "retrieval-focus-head").data
    assert store is not None and (store["layer"], store["head"]) == (3, 4)
    assert '"href": "/atlas?run=atlas-1&head=L3H4"' in to_json(_find(layout, "retrieval-focus"))
    app = Dash(__name__)
    app.layout = layout
    page.register_callbacks(app)
    for graph_id, fig in [
        ("retrieval-grid", page.grid_figure(run_id)),
        ("retrieval-test-grid", page.test_grid_figure(run_id, 0)),
    ]:
        sent = json.loads(to_json(fig))  # as the browser sends it back: typed arrays and all
        patch = _post(
            app,
            _outline_callback(app, graph_id),
            [(graph_id, "figure", sent)],
            [("retrieval-focus-head", "data", store)],
        )
        assert _patched_rects(patch)[-1:] == [("x", "y", 4, 3)]
        assert focus.outline(fig, store).layout.shapes[-1].name == focus.SHAPE_NAME
        with pytest.raises(PreventUpdate):  # outlined already: nothing to add
            focus.outline_patch(json.loads(to_json(fig)), store)
        with pytest.raises(PreventUpdate):  # no head focused
            focus.outline_patch(sent, None)
    far = page.layout({"run": run_id, "head": "L40H0"})
    assert _find(far, "retrieval-focus-head").data is None and "not a head" in to_json(far)


def test_the_act_map_outlines_the_focused_head(roots: Roots) -> None:
    page = _page(ActPage, roots.act)
    run_id = page.choose_run({}).run_id
    layout = page.layout({"head": "1-2"})
    store = _find(layout, "act-focus-head").data
    assert store is not None and (store["layer"], store["head"]) == (1, 2)
    assert "Focused on L1H2" in to_json(_find(layout, "act-focus"))
    app = Dash(__name__)
    app.layout = layout
    page.register_callbacks(app)
    for kind in ("kept", "hidden"):
        sent = json.loads(to_json(page.grid_figure(run_id, None, kind)))
        patch = _post(
            app,
            _outline_callback(app, "act-grid"),
            [("act-grid", "figure", sent)],
            [("act-focus-head", "data", store)],
        )
        assert _patched_rects(patch)[-1:] == [("x", "y", 2, 1)]


def test_the_duo_gate_map_outlines_the_focused_heads_kv_head() -> None:
    gates = go.Figure(
        go.Heatmap(z=[[0.1, 0.9], [0.5, 0.4], [0.2, 0.3]], x=["0", "1"], y=["0", "1 (sliding)", "2"])
    )
    gates.update_xaxes(type="category").update_yaxes(type="category")
    store = focus.read({"head": "L1H3"}, _heads(group=2)).data
    sent = json.loads(to_json(gates))
    assert _patched_rects(focus.outline_patch(sent, store, kv=True).to_plotly_json()) == [("x", "y", 1, 1)]


def test_every_analysis_page_shows_the_banner_and_none_fails_on_a_bad_head(roots: Roots) -> None:
    app = create_app(roots.retrieval)
    analysis_pages = [
        p for p in build_pages(roots.retrieval) if isinstance(p, AnalysisPage) and p.path != "/atlas"
    ]
    assert len(analysis_pages) == 8
    for page in analysis_pages:
        prefix = page.prefix
        focused = render_route(app, page.path, "?head=L1H2")
        assert f'"id": "{prefix}-focus"' in focused and "Focused on L1H2" in focused, page.path
        assert f'"id": "{prefix}-focus-head"' in focused, page.path
        junk = render_route(app, page.path, "?head=%3Cb%3E")
        assert "names no head" in junk and "Focused on" not in junk, page.path
    ours = render_route(app, "/retrieval", "?head=L40H0")
    assert "L40H0 is not a head of this run" in ours and "Focused on" not in ours
