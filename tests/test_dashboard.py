"""The Dash app: pages and routing, census callbacks (called directly), and which runs it may open."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import probe
from analyses import census, runstore
from analyses.census import CensusConfig, run_census
from dashboard import figures
from dashboard.app import build_pages, create_app
from dashboard.catalog import RunCatalog
from dashboard.pages import (
    ActPage,
    CensusPage,
    CircuitsPage,
    HomePage,
    RetrievalPage,
    SinksPage,
    VhdPage,
    VitPage,
)
from dashboard.views import census as views
from probe.errors import RunStoreError
from tests.conftest import post_callback, render_route, to_json

SMALL = CensusConfig(n_natural=4, n_repeated=2, seq_len=32, repeat_len=8, n_examples=2)


@pytest.fixture(scope="module")
def census_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A runs root holding two census runs of the tiny llama (different seeds)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", lambda source_dir=None: "0" * 40)
        model = probe.load_model("tiny-llama", device="cpu")
        run_census(model, SMALL, progress=False).save(root)
        run_census(model, CensusConfig(**{**SMALL.__dict__, "seed": 1}), progress=False).save(root)
    yield root


@pytest.fixture
def root(census_root: Path, tmp_path: Path) -> Path:
    """A private copy of the two runs, free to damage."""
    copy = tmp_path / "runs"
    shutil.copytree(census_root, copy)
    return copy


def _run_ids(root: Path) -> list[str]:
    return [s.path.name for s in runstore.list_runs(root)]


def _census_page(root: Path) -> CensusPage:
    page = next(p for p in build_pages(root) if isinstance(p, CensusPage))
    return page


def _find(component: Any, element_id: str) -> Any:
    """The element with ``element_id`` in a Dash component tree."""
    return next(c for c in component._traverse() if getattr(c, "id", None) == element_id)


def _click(layer: int, head: int) -> dict[str, Any]:
    """What dcc.Graph puts in clickData for a click on cell (layer, head) of the census map."""
    return {"points": [{"curveNumber": 0, "x": str(head), "y": str(layer), "z": 0.5}]}


def test_create_app_builds_every_page_and_wires_the_census_callbacks(root: Path) -> None:
    app = create_app(root)
    assert {
        "census-heatmap.figure",
        "census-head.data",
        "census-head-detail.children",
        "census-pattern.figure",
    } <= set(app.callback_map)
    client = app.server.test_client()
    index = client.get("/")
    assert index.status_code == 200 and b"<title>headlab</title>" in index.data
    assert b"--accent" in index.data  # the stylesheet is inlined: nothing outside the packages is needed
    assert client.get("/_dash-layout").status_code == 200
    assert [type(p) for p in build_pages(root)] == [
        HomePage,
        CensusPage,
        SinksPage,
        ActPage,
        RetrievalPage,
        CircuitsPage,
        VitPage,
        VhdPage,
    ]


def test_routing_renders_the_census_page_on_the_requested_run(root: Path) -> None:
    app = create_app(root)
    older = _run_ids(root)[-1]
    text = render_route(app, "/census", f"?run={older}")
    assert '"id": "census-run"' in text and f'"value": "{older}"' in text
    assert "Not found" in render_route(app, "/nowhere")
    home = json.dumps(
        post_callback(app, "page-content.children", [("url", "pathname", "/"), ("url", "search", "")], [])
    )
    assert all(f"/census?run={run_id}" in home for run_id in _run_ids(root))


def test_heatmap_differs_between_metrics(root: Path) -> None:
    page = _census_page(root)
    run_id = _run_ids(root)[0]
    heads = runstore.open_run(root / run_id).heads
    z_by_metric = {}
    for metric in census.METRICS:
        fig = page.heatmap_figure(run_id, metric, None)
        assert census.METRIC_LABELS[metric] in fig.layout.title.text
        z = np.asarray(fig.data[0].z, dtype=float)
        np.testing.assert_allclose(z, heads.pivot(index="layer", columns="head", values=metric).to_numpy())
        z_by_metric[metric] = z
    assert not np.allclose(z_by_metric["entropy"], z_by_metric["induction"])
    assert len({z.tobytes() for z in z_by_metric.values()}) == len(census.METRICS)


def test_clicking_a_head_selects_it_and_shows_its_numbers_and_pattern(root: Path) -> None:
    page = _census_page(root)
    run_id = _run_ids(root)[0]
    heads = runstore.open_run(root / run_id).heads
    selected = page.select_head(run_id, _click(1, 2), "induction", None, "census-heatmap")
    assert selected == {"run": run_id, "layer": 1, "head": 2}

    detail = to_json(page.head_detail(run_id, selected, "induction"))
    assert "L1H2: layer 1, head 2" in detail
    row = heads[(heads["layer"] == 1) & (heads["head"] == 2)].iloc[0]
    assert f"{row['induction']:.4g}" in detail and f"{row['entropy']:.4g}" in detail

    fig = page.heatmap_figure(run_id, "induction", selected)
    (shape,) = fig.layout.shapes  # the selected cell is outlined
    assert (shape.x0, shape.x1, shape.y0, shape.y1) == (1.5, 2.5, 0.5, 1.5)

    pattern = page.pattern_figure(run_id, selected, 0, "linear")
    other = page.pattern_figure(run_id, {"run": run_id, "layer": 0, "head": 0}, 0, "linear")
    image = pattern.data[0]
    assert image.type == "image" and image.source.startswith("data:image/png;base64,")
    assert image.source != other.data[0].source
    tokens = views.example_tokens(runstore.open_run(root / run_id), 0)
    n = len(tokens)
    assert np.asarray(image.customdata).shape == (n, n)
    assert image.hovertext[5][3].startswith(f"query 5 {figures.token_label(tokens[5])}<br>key 3 ")
    np.testing.assert_allclose(
        np.asarray(image.customdata),
        runstore.open_run(root / run_id).array("example_patterns")[0, 1, 2, :n, :n].astype(np.float32),
    )


def test_head_selection_follows_the_run_not_a_stale_click(root: Path) -> None:
    page = _census_page(root)
    first, second = _run_ids(root)
    held = {"run": first, "layer": 1, "head": 2}
    # The run changed: the old click is ignored and the new run's most notable head is chosen.
    chosen = page.select_head(second, _click(1, 2), "entropy", held, "census-run")
    top = views.top_head(runstore.open_run(root / second).heads, "entropy")
    assert chosen == {"run": second, "layer": top.layer, "head": top.head}
    # A click outside the heads of the run, or a malformed one, keeps the current head.
    assert page.select_head(first, _click(99, 0), "entropy", held, "census-heatmap") == held
    assert page.select_head(first, {"points": []}, "entropy", held, "census-heatmap") == held
    # A stored head of another run does not leak into this run's detail or pattern.
    assert "No head selected" in to_json(page.head_detail(second, held, "entropy"))


def test_select_head_reaches_the_callback_through_dash_context(root: Path) -> None:
    app = create_app(root)
    run_id = _run_ids(root)[0]
    result = post_callback(
        app,
        "census-head.data",
        [
            ("census-run", "value", run_id),
            ("census-heatmap", "clickData", _click(2, 3)),
            ("census-metric", "value", "induction"),
            ("census-head", "data", None),
        ],
        ["census-heatmap.clickData"],
    )
    assert result == {"run": run_id, "layer": 2, "head": 3}


def test_only_runs_under_the_root_are_offered_or_opened(root: Path, tmp_path: Path) -> None:
    other_root = tmp_path / "other"
    other_run = Path(shutil.copytree(root / _run_ids(root)[0], other_root / "20990101-000000-census-x-0000"))
    page = _census_page(root)
    offered = [o["value"] for o in page.run_options()]
    assert offered == _run_ids(root)
    catalog = RunCatalog(root)
    for bad in (
        other_run.name,
        str(other_run),
        f"../other/{other_run.name}",
        "..",
        ".",
        f".{_run_ids(root)[0]}.tmp",
        "",
    ):
        with pytest.raises(RunStoreError, match="only opens run directories under its root"):
            catalog.open(bad)
    fig = page.heatmap_figure(str(other_run), "induction", None)
    assert len(fig.data) == 0 and "cannot show run" in fig.layout.annotations[0].text
    assert page.select_head(str(other_run), None, "induction", None) is None
    layout = page.layout({"run": str(other_run)})  # a path in the URL: ignored, newest run shown
    assert _find(layout, "census-run").value == _run_ids(root)[0]
    assert "is not an intact census run under the root" in to_json(layout)


def test_damaged_run_is_listed_as_damaged_and_not_offered(root: Path) -> None:
    good, bad = _run_ids(root)
    page = _census_page(root)
    page.heatmap_figure(bad, "induction", None)  # opened (and cached) while intact
    table = root / bad / "heads.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF
    table.write_bytes(bytes(data))  # same size: only the sha256 tells

    options = {o["value"]: o for o in page.run_options()}
    assert not options[good].get("disabled")
    assert options[bad]["disabled"] is True and "damaged" in options[bad]["label"]
    with pytest.raises(RunStoreError, match="sha256"):
        page.catalog.open(bad)
    assert "cannot show run" in page.heatmap_figure(bad, "induction", None).layout.annotations[0].text
    home = next(p for p in build_pages(root) if isinstance(p, HomePage))
    listing = to_json(home.layout({}))
    assert "damaged" in listing and f"/census?run={good}" in listing and f"/census?run={bad}" not in listing


def test_example_picker_and_empty_root(root: Path, tmp_path: Path) -> None:
    page = _census_page(root)
    run_id = _run_ids(root)[0]
    options, value = page.example_options(run_id, None)
    assert [o["value"] for o in options] == [0, 1] and value == 0
    assert page.example_options(run_id, 1)[1] == 1
    empty = _census_page(tmp_path / "no-runs-here")
    assert empty.run_options() == []
    layout = to_json(empty.layout({}))
    assert "No intact census run" in layout and "headlab run census" in layout
    assert (
        empty.heatmap_figure(None, "induction", None).layout.annotations[0].text == "no census run selected"
    )


def test_pattern_colours_mark_masked_cells_but_keep_leaks_visible() -> None:
    weights = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=np.float32)
    rgb = figures.pattern_rgb(weights)
    assert rgb.shape == (3, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == figures.MASKED_RGB and tuple(rgb[1, 0]) != figures.MASKED_RGB
    leaking = weights.copy()
    leaking[0, 2] = 0.25  # attention to a future key must stay visible
    assert tuple(figures.pattern_rgb(leaking)[0, 2]) != figures.MASKED_RGB
    assert figures.token_label("<|im_start|>\n") == "'&lt;|im_start|&gt;\\n'"
