"""The census page and report draw each head's pattern on the input set its metric is measured on:
the induction and duplicate-token heads on the repeated random block (where their stripes are),
the others on natural text; and a run without example patterns is described as it is (run with
``n_examples=0``, or incomplete), read from its config."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from dash import Dash

import probe
from analyses import runstore
from analyses.base import AnalysisResult
from analyses.census import CensusConfig, run_census
from dashboard.catalog import RunCatalog
from dashboard.census import report as census_section
from dashboard.census import views
from dashboard.census.page import CensusPage
from dashboard.core.page import Site
from tests.conftest import fixed_revision, post_callback, to_json

SMALL = CensusConfig(n_natural=4, n_repeated=3, seq_len=32, repeat_len=8, n_examples=2)


@dataclass(frozen=True)
class Runs:
    root: Path
    result: AnalysisResult
    full: str  # both input sets' examples
    none: str  # run with n_examples=0
    damaged: str  # config says n_examples=2, but no examples table or patterns
    old: str  # natural-text examples only (as runs made before the repeated ones were kept)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("census-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
        model = probe.load_model("tiny-llama", device="cpu")
        result = run_census(model, SMALL, progress=False)
        full = result.save(root)
        none = run_census(model, dataclasses.replace(SMALL, n_examples=0), progress=False).save(root)

        def without(tables: tuple[str, ...], arrays: tuple[str, ...]) -> Path:
            return dataclasses.replace(
                result,
                tables={k: v for k, v in result.tables.items() if k not in tables},
                arrays={k: v for k, v in result.arrays.items() if k not in arrays},
            ).save(root)

        damaged = without(("examples", "repeated_examples"), ("example_patterns", "repeated_patterns"))
        old = without(("repeated_examples",), ("repeated_patterns",))
    yield Runs(root, result, full.name, none.name, damaged.name, old.name)


def _page(root: Path) -> CensusPage:
    return CensusPage(Site(catalog=RunCatalog(root), analysis_paths={"census": "/census"}))


def _open(runs: Runs, run_id: str) -> runstore.Run:
    return runstore.open_run(runs.root / run_id)


def _message(fig: go.Figure) -> str:
    return str(fig.layout.annotations[0].text).replace("<br>", " ")


def test_a_census_run_keeps_patterns_of_the_repeated_sequence(runs: Runs) -> None:
    result = runs.result
    model_layers, model_heads = 3, 4  # the tiny llama
    bos = 1  # the tiny llama prepends BOS
    n = 2 * SMALL.repeat_len + bos
    patterns = result.arrays["repeated_patterns"]
    assert patterns.shape == (SMALL.n_examples, model_layers, model_heads, n, n)
    tokens = result.tables["repeated_examples"]
    assert sorted(tokens["example"].unique()) == [0, 1]
    for _, rows in tokens.groupby("example"):
        ids = rows.sort_values("position")["token_id"].to_list()
        assert len(ids) == n
        assert ids[bos : bos + SMALL.repeat_len] == ids[bos + SMALL.repeat_len :]  # the block, twice
    # each row of a kept pattern is a distribution over the keys up to the query
    rows = patterns.astype(np.float32).sum(-1)
    np.testing.assert_allclose(rows, 1.0, atol=1e-2)
    assert not np.allclose(patterns[0, :, :, :n, :n], result.arrays["example_patterns"][0, :, :, :n, :n])
    # at most n_repeated of them
    small = dataclasses.replace(SMALL, n_examples=3, n_repeated=2)
    again = run_census(probe.load_model("tiny-llama", device="cpu"), small, progress=False)
    assert again.arrays["repeated_patterns"].shape[0] == 2 and again.arrays["example_patterns"].shape[0] == 3


def test_the_page_draws_induction_and_duplicate_heads_on_the_repeated_sequence(runs: Runs) -> None:
    page = _page(runs.root)
    run = _open(runs, runs.full)
    assert views.default_input_set("induction") == "repeated"
    assert views.default_input_set("duplicate_token") == "repeated"
    assert views.default_input_set("prev_token") == "natural"
    # the layout's input choice follows the metric in the URL
    for metric, expected in (
        ("induction", "repeated"),
        ("duplicate_token", "repeated"),
        ("entropy", "natural"),
    ):
        layout = page.layout({"run": runs.full, "metric": metric})
        chooser = next(c for c in layout._traverse() if getattr(c, "id", None) == "census-input-set")
        assert chooser.value == expected
    selected = page.select_head(runs.full, None, "induction", None)
    assert selected is not None
    head = views.PickedHead(selected["layer"], selected["head"])
    options, value = page.example_options(runs.full, None, "repeated")
    assert [o["value"] for o in options] == [0, 1] and value == 0
    fig = page.pattern_figure(runs.full, selected, 0, "linear", "repeated")
    n = 2 * SMALL.repeat_len + 1
    weights = np.asarray(fig.data[0].customdata)
    assert weights.shape == (n, n)
    np.testing.assert_allclose(
        weights, run.array("repeated_patterns")[0, head.layer, head.head, :n, :n].astype(np.float32)
    )
    assert "repeated example 0" in fig.layout.title.text
    natural = page.pattern_figure(runs.full, selected, 0, "linear", "natural")
    assert np.asarray(natural.data[0].customdata).shape == (SMALL.seq_len + 1, SMALL.seq_len + 1)
    # the metric sets the input set through Dash (the callback is wired)
    app = _app(page, runs.full)
    assert post_callback(app, "census-input-set.value", [("census-metric", "duplicate_token")]) == "repeated"
    assert post_callback(app, "census-input-set.value", [("census-metric", "alpha_0")]) == "natural"


def _app(page: CensusPage, run_id: str) -> Dash:
    app = Dash(__name__)
    app.layout = page.layout({"run": run_id})
    page.register_callbacks(app)
    return app


def test_the_report_draws_the_induction_head_on_the_repeated_sequence(runs: Runs) -> None:
    section = next(
        s for s in census_section.report_sections(_open(runs, runs.full)) if s.anchor == "census-patterns"
    )
    assert ": top induction head, repeated example 0" in section.body
    assert ": top duplicate_token head, repeated example 0" in section.body
    assert ": top prev_token head, example 0" in section.body
    assert "repeated random tokens example 0 text" in section.body
    # a run made before the repeated examples were kept: natural text, with a note saying why
    old = next(
        s for s in census_section.report_sections(_open(runs, runs.old)) if s.anchor == "census-patterns"
    )
    assert ": top induction head, example 0" in old.body and 'class="warning"' in old.body


def test_a_run_without_example_patterns_is_described_from_its_config(runs: Runs) -> None:
    page = _page(runs.root)
    for run_id in (runs.none, runs.damaged, runs.old):
        assert page.example_options(run_id, None, "repeated") == ([], None)
    selected = {"run": runs.none, "layer": 0, "head": 0}
    none = _message(page.pattern_figure(runs.none, selected, None, "sqrt", "natural"))
    assert "it was run with n_examples=0" in none and "--set n_examples=2" in none
    selected = {"run": runs.damaged, "layer": 0, "head": 0}
    damaged = _message(page.pattern_figure(runs.damaged, selected, None, "sqrt", "natural"))
    assert "n_examples=0" not in damaged
    assert "incomplete: its config says n_examples=2" in damaged and "re-run headlab run census" in damaged
    selected = {"run": runs.old, "layer": 0, "head": 0}
    old = _message(page.pattern_figure(runs.old, selected, 0, "sqrt", "repeated"))
    assert "no example patterns of repeated random tokens" in old and "pick natural text" in old
    # the report says the same
    body = next(
        s.body
        for s in census_section.report_sections(_open(runs, runs.damaged))
        if s.anchor == "census-patterns"
    )
    assert "incomplete: its config says n_examples=2" in body and "n_examples=0" not in body
    body = next(
        s.body
        for s in census_section.report_sections(_open(runs, runs.none))
        if s.anchor == "census-patterns"
    )
    assert "it was run with n_examples=0" in body
    assert "incomplete" in to_json(
        page.pattern_figure(runs.damaged, selected | {"run": runs.damaged}, 0, "sqrt")
    )
