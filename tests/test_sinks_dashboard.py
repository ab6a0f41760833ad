"""The sinks page (callbacks called directly and through Dash) and the sinks report section."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dash import Dash

import probe
from analyses import runstore
from analyses.sinks import SinksConfig, run_sinks
from dashboard import report
from dashboard.catalog import RunCatalog
from dashboard.core import figures
from dashboard.core.page import Site
from dashboard.registry import section_builder
from dashboard.sinks import figures as sink_figures
from dashboard.sinks import report as sinks_section
from dashboard.sinks import views
from dashboard.sinks.page import SinksPage
from probe.tiny import BOS
from tests.conftest import decode_array, fixed_revision, post_callback, to_json

FULL = SinksConfig(seq_len=24, n_sequences=6, batch_size=6, n_examples=2, hidden_min_queries=4, eps=0.1)
NATURAL_ONLY = SinksConfig(seq_len=16, n_sequences=2, inputs=("natural",), n_examples=0, norms=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A runs root with a full sinks run and a natural-text-only run without examples or norms."""
    root = tmp_path_factory.mktemp("sink-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
        model = probe.load_model("tiny-llama", device="cpu")
        run_sinks(model, NATURAL_ONLY, progress=False).save(root)
        run_sinks(model, FULL, progress=False).save(root)
    yield root


def _ids(root: Path) -> tuple[str, str]:
    """(full run, natural-only run): the newest first in the listing."""
    newest, older = (s.path.name for s in runstore.list_runs(root))
    return newest, older


def _page(root: Path) -> SinksPage:
    return SinksPage(Site(catalog=RunCatalog(root), analysis_paths={"sinks": SinksPage.path}))


def _z(fig: Any) -> np.ndarray:
    return np.asarray(fig.data[0].z, dtype=float)


def test_overview_figures_of_a_full_run(root: Path) -> None:
    full, _ = _ids(root)
    run = runstore.open_run(root / full)
    figs = sink_figures.overview_figures(run.heads, run.table("positions"), run.table("norms"))
    assert set(figs) == {"alpha0_natural", "alpha0_random", "alpha0_repeated", "sink_map", "norms"}


def test_heatmap_follows_input_set_quantity_and_position(root: Path) -> None:
    page = _page(root)
    full, _ = _ids(root)
    run = runstore.open_run(root / full)
    maps = {s: _z(page.heatmap_figure(full, s, "alpha", 0)) for s in ("natural", "random", "repeated")}
    for s, z in maps.items():
        np.testing.assert_allclose(z, run.array(f"alpha_{s}")[..., 0], rtol=1e-6)
        assert z.shape == (3, 4)  # tiny llama: 3 layers x 4 heads
    assert not np.allclose(maps["natural"], maps["repeated"])
    assert not np.allclose(maps["natural"], maps["random"])
    fig = page.heatmap_figure(full, "natural", "alpha", 0)
    assert "natural text" in fig.layout.title.subtitle.text.replace(
        "<br>", " "
    ) and "first real token" in fig.layout.title.text.replace("<br>", " ")
    assert (
        page.heatmap_figure(full, "repeated", "alpha", 0).layout.title.subtitle.text.replace("<br>", " ")
        == "one random token repeated"
    )
    rate = _z(page.heatmap_figure(full, "natural", "rate", 0))
    np.testing.assert_allclose(rate, run.array("sink_rate_natural")[..., 0], rtol=1e-6)
    assert not np.allclose(rate, maps["natural"])
    later = _z(page.heatmap_figure(full, "natural", "alpha", 5))
    np.testing.assert_allclose(later, run.array("alpha_natural")[..., 5], rtol=1e-6)
    options, value = page.position_options(full, 99)
    assert len(options) == FULL.seq_len and value == 0 and options[0]["label"] == "0 (first token)"


def test_overview_figures_and_the_selected_set(root: Path) -> None:
    page = _page(root)
    full, _ = _ids(root)
    run = runstore.open_run(root / full)
    bars = page.bars_figure(full)
    summary = run.table("summary").set_index("input_set")
    np.testing.assert_allclose(list(bars.data[0].y), summary.loc[["natural", "random", "repeated"], "sink_1"])
    natural = page.positions_figure(full, "natural")
    repeated = page.positions_figure(full, "repeated")
    assert len(natural.data) == 3
    widths = [t.line.width for t in natural.data]
    assert widths[0] > widths[2] and [t.line.width for t in repeated.data][2] > widths[2]
    norms = page.norms_figure(full, "natural")
    assert len(norms.data) == 3 * 2  # quantities x (first token, others)
    ratios = run.table("norms").query("input_set == 'natural' and quantity == 'hidden'")["sink_norm"]
    np.testing.assert_allclose(list(norms.data[0].y), ratios)
    other = page.norms_figure(full, "repeated")
    # the first token is the same BOS in every set; the other tokens differ
    assert list(other.data[0].y) == list(norms.data[0].y)
    assert list(other.data[1].y) != list(norms.data[1].y) and "repeated" in other.layout.annotations[
        0
    ].text.replace("<br>", " ")
    assert len(views.norms_figure(run).data) == 3 * 3 * 2  # the report: every set
    # whole layers only: ticks from 0 in whole steps (a short axis would otherwise tick 0.5, 1.5)
    xaxes = [norms.layout[k] for k in norms.layout if k.startswith("xaxis")]
    assert xaxes and all(a.tick0 == 0 and float(a.dtick).is_integer() and a.dtick >= 1 for a in xaxes)


def test_example_changes_with_the_input_set(root: Path) -> None:
    page = _page(root)
    full, _ = _ids(root)
    run = runstore.open_run(root / full)
    options, value = page.example_options(full, "natural", None)
    assert [o["value"] for o in options] == [0, 1] and value == 0
    assert page.example_options(full, "random", 1)[1] == 1
    figs = {s: page.example_figure(full, s, 0) for s in ("natural", "random", "repeated")}
    for s, fig in figs.items():
        rows = views.example_rows(run, s, 0)
        np.testing.assert_allclose(list(fig.data[0].y), rows["sink_pct"])
        assert len(fig.data[0].y) == FULL.seq_len
    assert list(figs["natural"].data[0].y) != list(figs["repeated"].data[0].y)
    assert figs["natural"].layout.xaxis.ticktext != figs["repeated"].layout.xaxis.ticktext
    assert "natural text" in figs["natural"].layout.title.text.replace("<br>", " ")
    assert figs["natural"].layout.xaxis.ticktext[0] == figures.token_label(BOS)  # the tiny llama's BOS
    table = to_json(page.example_table(full, "natural", 0))
    assert "hidden sinks" in table.lower()
    tokens = to_json(page.tokens_table(full, "natural"))
    assert "Tokens that become hidden sinks: natural text" in tokens


def test_a_run_without_a_set_examples_or_norms_says_so(root: Path) -> None:
    page = _page(root)
    _, natural_only = _ids(root)
    fig = page.heatmap_figure(natural_only, "repeated", "alpha", 0)
    assert len(fig.data) == 0 and "did not measure" in fig.layout.annotations[0].text.replace("<br>", " ")
    assert page.example_options(natural_only, "natural", None) == ([], None)
    assert "kept no examples" in page.example_figure(natural_only, "natural", None).layout.annotations[
        0
    ].text.replace("<br>", " ")
    assert "no norms" in page.norms_figure(natural_only, "natural").layout.annotations[0].text.replace(
        "<br>", " "
    )
    assert len(page.bars_figure(natural_only).data[0].y) == 1
    assert "no sinks run selected" in page.heatmap_figure(None, "natural", "alpha", 0).layout.annotations[
        0
    ].text.replace("<br>", " ")
    assert "cannot show run" in page.heatmap_figure("../elsewhere", "natural", "alpha", 0).layout.annotations[
        0
    ].text.replace("<br>", " ")


def test_layout_and_callbacks_through_dash(root: Path, tmp_path: Path) -> None:
    page = _page(root)
    full, older = _ids(root)
    layout = page.layout({"run": older, "input": "random"})
    text = to_json(layout)
    for element in ("sinks-run", "sinks-input", "sinks-heatmap", "sinks-example-figure", "sinks-norms"):
        assert f'"id": "{element}"' in text
    assert f'"value": "{older}"' in text and '"value": "random"' in text
    app = Dash(__name__)
    app.layout = layout
    page.register_callbacks(app)
    assert {"sinks-heatmap.figure", "sinks-bars.figure", "sinks-example-figure.figure"} <= set(
        app.callback_map
    )
    figure = post_callback(
        app,
        "sinks-heatmap.figure",
        [
            ("sinks-run", full),
            ("sinks-input", "repeated"),
            ("sinks-quantity", "alpha"),
            ("sinks-position", 0),
        ],
        ["sinks-input.value"],
    )
    z = figure["data"][0]["z"]
    expected = runstore.open_run(root / full).array("alpha_repeated")[..., 0]
    np.testing.assert_allclose(np.asarray(decode_array(z), dtype=float), expected, rtol=1e-6)
    empty = to_json(_page(tmp_path / "none").layout({}))
    assert "No intact sinks run" in empty and "headlab run sinks" in empty


def test_report_section_renders(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full, natural_only = _ids(root)
    run = runstore.open_run(root / full)
    sections = sinks_section.report_sections(run)
    assert [s.anchor for s in sections] == ["sinks-summary", "sinks-heads", "sinks-positions", "sinks-norms"]
    body = "".join(s.body for s in sections)
    for needle in (
        "Sink_1",
        "sinks-bars-figure",
        "sinks-alpha0-natural",
        "sinks-alpha0-repeated",
        "sinks-positions-figure",
        "sinks-norms-figure",
        "one random token repeated",
    ):
        assert needle in body
    sink_1 = run.table("summary").set_index("input_set").loc["natural", "sink_1"]
    assert f"{sink_1:.4g}" in body
    small = sinks_section.report_sections(runstore.open_run(root / natural_only))
    assert "measured no norms" in small[-1].body and "sinks-alpha0-random" not in small[1].body
    assert section_builder("sinks") is sinks_section.report_sections
    foreign = runstore.write_run(
        tmp_path / "runs",
        analysis="sinks",
        model_info={"name": "m"},
        config={},
        tables={"heads": run.heads[["layer", "head", "kv_head", "alpha0_natural"]]},
    )
    generic = report.render_report(runstore.open_run(foreign))
    assert 'id="heads-heatmap-0"' in generic  # not a sinks run's tables: the generic heat maps
    html = report.render_report(run)
    assert 'id="sinks-summary"' in html and "Per-position sink map and hidden sinks" in html


def test_a_run_whose_config_kept_examples_but_has_none_is_called_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not "run with n_examples=0": the config says what was asked for, so a missing examples table
    means the run is damaged or incomplete, and the fix is a re-run."""
    monkeypatch.setattr(runstore, "code_revision", fixed_revision)
    model = probe.load_model("tiny-llama", device="cpu")
    cfg = dataclasses.replace(NATURAL_ONLY, n_examples=2)
    result = run_sinks(model, cfg, progress=False)
    assert "examples" in result.tables
    tables = {k: v for k, v in result.tables.items() if k != "examples"}
    arrays = {k: v for k, v in result.arrays.items() if not k.startswith("example_")}
    path = dataclasses.replace(result, tables=tables, arrays=arrays).save(tmp_path)
    page = _page(tmp_path)
    message = page.example_figure(path.name, "natural", None).layout.annotations[0].text.replace("<br>", " ")
    assert "n_examples=0" not in message
    assert "incomplete: its config says n_examples=2" in message and "re-run headlab run sinks" in message
    run = runstore.open_run(path)
    assert views.missing_examples(run, "natural") == message
