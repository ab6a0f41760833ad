"""The retrieval page (callbacks called directly and through Dash), its views and its report section,
on synthetic retrieval runs with the analysis's result schema (small, random but seeded)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dash import Dash

from analyses import runstore, validation
from analyses.base import AnalysisResult
from analyses.retrieval import RetrievalConfig, aggregate_scores, masking_curve, validation_row
from dashboard import report
from dashboard.catalog import RunCatalog
from dashboard.core import figures
from dashboard.core.page import Site
from dashboard.registry import pages, section_builder
from dashboard.retrieval import report as retrieval_section
from dashboard.retrieval import views
from dashboard.retrieval.page import RetrievalPage
from tests.conftest import decode_array, fixed_code_revision, post_callback, render_route, to_json

N_LAYERS, N_HEADS, GROUP = 4, 6, 2
LENGTHS = (256, 512)
DEPTHS = (0.0, 0.5, 1.0)
N_NEEDLES = 3
N_TESTS = N_NEEDLES * len(LENGTHS) * len(DEPTHS)  # 18
PLANTED = [(2, 1), (3, 4)]  # copy-paste on every passing test
FAILED = {3, 8}  # tests whose answer was not recalled
N_PASSED = N_TESTS - len(FAILED)  # 16: not "few" (views.WEAK_EVIDENCE)
MASK_FRACTIONS = (0.1, 0.25)  # K = 2 and 6 of 24 heads
MASK_SEEDS = 3
MASK_TESTS = (0, 1, 2, 5)
KINDS = ("passphrase", "ship", "greeting")
HTML_GENERATED = "<b>amber</b> & falcon"  # test 0 generates markup: the report must escape it


HELDOUT = 4  # held-out tests; 3 recalled unmasked
N_NULL = 50


def _config(*, masking: bool = True) -> RetrievalConfig:
    """The run's settings, as analyses.retrieval.run_retrieval puts them in its result: the full run
    under the needle protocol with the held-out validation, the other under the answer protocol."""
    return RetrievalConfig(
        lengths=LENGTHS,
        depths=DEPTHS,
        n_needles=N_NEEDLES,
        seed=0,
        protocol="needle" if masking else "answer",
        threshold=0.1,
        rouge_gate=0.5,
        max_new_tokens=0,
        mask_fractions=MASK_FRACTIONS if masking else (),
        mask_seeds=MASK_SEEDS,
        mask_tests=len(MASK_TESTS),
        validation=masking,
        heldout_needles=2,
        heldout_depths=(0.25, 0.75),
        n_null=N_NULL,
        progress=False,
    )


def _validation_tables(rng: np.random.Generator, heads: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The held-out tests, the masked recalls and the validation row of the retrieval heads."""
    found = sorted((int(r.layer), int(r.head)) for r in heads[heads["is_retrieval"]].itertuples())
    recall = np.array([1.0, 1.0, 0.8, 0.2])
    held = pd.DataFrame(
        {
            "test": np.arange(HELDOUT),
            "length": 256,
            "n_tokens": 256,
            "depth": [0.25, 0.75, 0.25, 0.75],
            "needle": [0, 0, 1, 1],
            "needle_kind": "ship",
            "answer": "word colour thing",
            "reference": "The ship was named word colour thing.",
            "generated": "The ship was named word colour thing.",
            "rouge1_recall": recall,
            "passed": recall > 0.5,
        }
    )
    base = recall[:3]
    mine = np.array([0.2, 0.0, 0.4])
    null = np.clip(base[None, :] - rng.choice([0.0, 0.2], (N_NULL, 3)), 0, 1)
    row = validation_row(found, base, mine, null, inputs=validation.Inputs("held-out needle tests", 3))
    return {"heldout": held, "validation": validation.frame([row])}


def _masking_table(rng: np.random.Generator, tests: pd.DataFrame) -> pd.DataFrame:
    """The masking table: per masked test the unmasked recall, then top-K and random-K conditions."""
    mask_rows = []
    for t in MASK_TESTS:
        mask_rows.append(
            {
                "test": t,
                "kind": "none",
                "k": 0,
                "fraction": 0.0,
                "seed": 0,
                "rouge1_recall": float(tests.loc[t, "rouge1_recall"]),
                "heads": "",
            }
        )
        for frac in MASK_FRACTIONS:
            k = round(frac * N_LAYERS * N_HEADS)
            mask_rows.append(
                {
                    "test": t,
                    "kind": "top",
                    "k": k,
                    "fraction": frac,
                    "seed": 0,
                    "rouge1_recall": float(rng.choice([0.0, 1 / 3])),
                    "heads": "L2H1 L3H4",
                }
            )
            for s in range(MASK_SEEDS):
                mask_rows.append(
                    {
                        "test": t,
                        "kind": "random",
                        "k": k,
                        "fraction": frac,
                        "seed": s,
                        "rouge1_recall": float(rng.choice([1 / 3, 2 / 3, 1.0])),
                        "heads": "L0H0 L1H2",
                    }
                )
    frame = pd.DataFrame(mask_rows)
    frame["recalled"] = frame["rouge1_recall"] > 0.5
    return frame


def make_result(seed: int = 0, *, recalled: bool = True, masking: bool = True) -> AnalysisResult:
    """A synthetic retrieval result with every table of the schema (``recalled=False``: no test passes)."""
    rng = np.random.default_rng(seed)
    cells = [(n, length, d) for n in range(N_NEEDLES) for length in LENGTHS for d in DEPTHS]
    n_tests = len(cells)
    per_test = np.where(
        rng.random((n_tests, N_LAYERS, N_HEADS)) < 0.25,
        rng.integers(1, 3, (n_tests, N_LAYERS, N_HEADS)) / 4.0,
        0.0,
    )
    for layer, head in PLANTED:
        per_test[:, layer, head] = rng.integers(2, 5, n_tests) / 4.0
    rows = []
    for i, (needle, length, depth) in enumerate(cells):
        recall = (
            float(rng.choice([0.0, 1 / 3]))
            if (i in FAILED or not recalled)
            else float(rng.choice([2 / 3, 1.0]))
        )
        answer = f"word{i} colour{i} thing{i}"
        start = 20 + 7 * i
        rows.append(
            {
                "test": i,
                "length": length,
                "n_tokens": length,
                "depth": depth,
                "depth_actual": min(1.0, depth + float(rng.uniform(0, 0.04))),
                "needle": needle,
                "needle_kind": KINDS[needle],
                "answer": answer,
                "generated": HTML_GENERATED if i == 0 else f" {answer}." if recall == 1.0 else " something",
                "rouge1_recall": recall,
                "passed": recall > 0.5,
                "span_start": start,
                "span_end": start + 4,
                "n_steps": 12,
                "stopped_on": "eos",
                "prefill_s": 0.1,
                "decode_s": 0.2,
                "heads_hit": int((per_test[i] > 0).sum()),
            }
        )
    tests = pd.DataFrame(rows)
    passed = tests["passed"].to_numpy(dtype=bool)
    agg = aggregate_scores(per_test, passed, 0.1)
    layers, heads_ = np.meshgrid(np.arange(N_LAYERS), np.arange(N_HEADS), indexing="ij")
    heads = pd.DataFrame({"layer": layers.ravel(), "head": heads_.ravel()})
    heads["kv_head"] = heads["head"] // GROUP
    for name, values in agg.items():
        heads[name] = values.ravel()
    heads["is_retrieval"] = heads["is_retrieval"].astype(bool)
    scores_long = pd.DataFrame(
        {
            "test": np.repeat(np.arange(n_tests), N_LAYERS * N_HEADS),
            "layer": np.tile(np.repeat(np.arange(N_LAYERS), N_HEADS), n_tests),
            "head": np.tile(np.arange(N_HEADS), n_tests * N_LAYERS),
            "score": per_test.ravel(),
        }
    )
    tables = {
        "heads": heads,
        "tests": tests,
        "test_scores": scores_long[scores_long["score"] > 0].reset_index(drop=True),
    }
    if masking:
        tables["masking"] = _masking_table(rng, tests)
        tables.update(_validation_tables(rng, heads))
        tables["heads"] = validation.evidence_columns(heads, tables["validation"], "retrieval")
    return AnalysisResult(
        analysis="retrieval",
        model_info={
            "name": "synthetic",
            "n_layers": N_LAYERS,
            "n_heads": N_HEADS,
            "n_kv_heads": N_HEADS // GROUP,
        },
        config=_config(masking=masking),
        tables=tables,
        arrays={"scores": per_test.astype(np.float32)},
        seeds={"grid": 0, "masking": 0},
        notes={"tests": n_tests, "tests_passed": int(passed.sum())},
        # a run where no test passed has no retrieval score for any head
        nan_ok=(
            "retrieval_score",
            "activation_frequency",
            *(f"retrieval_{c}" for c in ("effect", "effect_low", "effect_high", "percentile", "p_value")),
        ),
    )


@dataclass(frozen=True)
class Runs:
    root: Path
    full: str  # run id: 16 of 18 tests passed, masking
    unrecalled: str  # run id: no test passed, no masking


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("retrieval-runs")
    with fixed_code_revision():
        unrecalled = make_result(1, recalled=False, masking=False).save(root)
        full = make_result().save(root)
    yield Runs(root, full.name, unrecalled.name)


def _page(root: Path) -> RetrievalPage:
    return RetrievalPage(Site(catalog=RunCatalog(root), analysis_paths={"retrieval": RetrievalPage.path}))


def _open(runs: Runs, run_id: str) -> runstore.Run:
    return runstore.open_run(runs.root / run_id)


def _pivot(heads: pd.DataFrame, column: str) -> np.ndarray:
    return heads.pivot(index="layer", columns="head", values=column).to_numpy(dtype=float)


def test_score_grid_equals_the_heads_table_and_rings_the_retrieval_heads(runs: Runs) -> None:
    run = _open(runs, runs.full)
    heads = run.heads
    fig = views.score_grid(run)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (N_LAYERS, N_HEADS)
    np.testing.assert_allclose(z, _pivot(heads, "retrieval_score"))
    custom = np.asarray(fig.data[0].customdata, dtype=float)
    np.testing.assert_allclose(custom[..., 0], _pivot(heads, "activation_frequency"))
    np.testing.assert_allclose(custom[..., 1], _pivot(heads, "activation_frequency") * N_PASSED)
    np.testing.assert_array_equal(custom[..., 2], _pivot(heads, "kv_head"))
    assert (
        "activation frequency" in fig.data[0].hovertemplate and "retrieval score" in fig.data[0].hovertemplate
    )
    rings = fig.data[1]
    ringed = sorted(zip(map(int, rings.y), map(int, rings.x), strict=True))
    expected = sorted((int(r.layer), int(r.head)) for r in heads[heads["is_retrieval"]].itertuples())
    assert ringed == expected and set(PLANTED) <= set(ringed)
    assert (heads.loc[heads["is_retrieval"], "retrieval_score"] > 0.1).all()
    assert f"{N_PASSED} of {N_TESTS} tests" in fig.layout.title.subtitle.text.replace("<br>", " ")
    assert f"{len(expected)} retrieval heads" in fig.layout.title.subtitle.text.replace("<br>", " ")
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"


def test_histogram_marks_the_threshold_and_the_share_above_it(runs: Runs) -> None:
    run = _open(runs, runs.full)
    scores = run.heads["retrieval_score"].to_numpy(dtype=float)
    fig = views.score_histogram(run)
    np.testing.assert_allclose(sorted(fig.data[0].x), sorted(scores))
    assert fig.layout.shapes[0].x0 == pytest.approx(0.1) == fig.layout.shapes[0].x1
    above = int((scores > 0.1).sum())
    assert 0 < above < len(scores)
    assert (
        f"{above} of {len(scores)} heads ({above / len(scores):.1%}) score > 0.1"
        in fig.layout.annotations[0].text.replace("<br>", " ")
    )
    info = views.overview(run)
    assert info["retrieval_heads"] == above and info["share_retrieval_heads"] == pytest.approx(above / 24)
    assert info["tests_passed"] == N_PASSED and info["tests"] == N_TESTS


def test_top_heads_are_sorted_by_score_with_their_frequency(runs: Runs) -> None:
    run = _open(runs, runs.full)
    heads = run.heads
    top = views.top_heads(run, 5)
    expected = heads.sort_values(["retrieval_score", "layer", "head"], ascending=[False, True, True]).head(5)
    assert top["label"].tolist() == [f"L{r.layer}H{r.head}" for r in expected.itertuples()]
    np.testing.assert_allclose(top["retrieval_score"], expected["retrieval_score"])
    np.testing.assert_allclose(top["activation_frequency"], expected["activation_frequency"])
    assert top["rank"].tolist() == [1, 2, 3, 4, 5]
    # a planted head copied on every passing test
    planted = top.set_index("label").loc[[f"L{lay}H{h}" for lay, h in PLANTED]]
    assert (planted["tests_hit"] == N_PASSED).all() and (planted["activation_frequency"] == 1.0).all()
    fig = views.top_heads_figure(run, 5)
    assert list(fig.data[0].y) == top["label"].tolist()
    np.testing.assert_allclose(fig.data[0].x, top["retrieval_score"])
    np.testing.assert_allclose(fig.data[0].marker.color, top["activation_frequency"])
    assert fig.layout.title.text == "Top 5 heads by retrieval score"
    assert len(views.top_heads(run, 100)) == N_LAYERS * N_HEADS


def test_masking_curve_points_equal_masking_curve(runs: Runs) -> None:
    run = _open(runs, runs.full)
    masking = run.table("masking")
    curve = masking_curve(masking)
    fig = views.masking_figure(run, "recall")
    top, rand = fig.data
    assert top.name == "top-K heads masked" and rand.name == "K random heads masked"
    for trace, kind in ((top, "top"), (rand, "random")):
        part = curve[curve["kind"] == kind].sort_values("k")
        assert list(trace.x) == [2, 6] == part["k"].tolist()
        np.testing.assert_allclose(trace.y, part["recall"])
    random_part = curve[curve["kind"] == "random"].sort_values("k")
    np.testing.assert_allclose(rand.error_y.array, random_part["recall_sd"])
    assert (random_part["recall_sd"] > 0).all() and (random_part["n_seeds"] == MASK_SEEDS).all()
    assert top.error_y.array is None
    unmasked = masking[masking["kind"] == "none"]["rouge1_recall"].mean()
    assert fig.layout.shapes[0].y0 == pytest.approx(unmasked)
    label = fig.layout.annotations[0]
    assert "no head masked" in label.text
    # at the left end of its line, clear of the largest K's points and whiskers at the right
    assert label.x == 0 and label.xanchor == "left" and label.yanchor == "bottom"
    # the subtitle is wrapped to lines that fit a panel, the title set below the mode bar
    page_fig = _page(runs.root).masking_figure(runs.full, "recall")
    lines = page_fig.layout.title.subtitle.text.split("<br>")
    assert len(lines) == 2 and all(len(line) <= figures.SUBTITLE_WIDTH for line in lines)
    assert page_fig.layout.title.pad.t == figures.MODEBAR_PX
    # the share recalled instead of the mean recall
    share = views.masking_figure(run, "recalled")
    np.testing.assert_allclose(share.data[0].y, curve[curve["kind"] == "top"].sort_values("k")["recalled"])
    assert share.layout.shapes[0].y0 == pytest.approx(masking[masking["kind"] == "none"]["recalled"].mean())
    assert (
        "4 test(s)" in fig.layout.title.subtitle.text.replace("<br>", " ")
        and fig.layout.xaxis.title.text == "K (heads masked)"
    )


def test_recall_grid_cells_equal_the_group_means(runs: Runs) -> None:
    run = _open(runs, runs.full)
    tests = run.table("tests")
    fig = views.recall_grid(run)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (len(LENGTHS), len(DEPTHS))
    assert list(fig.data[0].y) == [str(n) for n in LENGTHS] and list(fig.data[0].x) == ["0", "0.5", "1"]
    means = tests.groupby(["length", "depth"])["rouge1_recall"].mean()
    counts = tests.groupby(["length", "depth"]).size()
    passed = tests.groupby(["length", "depth"])["passed"].sum()
    custom = np.asarray(fig.data[0].customdata, dtype=float)
    for i, length in enumerate(LENGTHS):
        for j, depth in enumerate(DEPTHS):
            assert z[i, j] == pytest.approx(means[(length, depth)])
            assert fig.data[0].text[i][j] == f"n={counts[(length, depth)]}" == f"n={N_NEEDLES}"
            assert custom[i, j, 1] == passed[(length, depth)]
    assert z.min() < 1.0  # the failed tests pull their cells down
    cells = views.recall_cells(run)
    assert cells["n_tests"].sum() == len(tests) and cells["n_passed"].sum() == N_PASSED
    chosen = views.recall_grid(run, test=8)
    assert chosen.data[1].x == ("1",) and chosen.data[1].y == ("256",)  # test 8: needle 1, 256, depth 1


def test_one_test_shows_its_answer_and_the_heads_that_copy_pasted(runs: Runs) -> None:
    run = _open(runs, runs.full)
    scores = run.array("scores")
    rows = views.test_heads(run, 4)
    expected = run.table("test_scores").query("test == 4")
    assert len(rows) == len(expected) == int((scores[4] > 0).sum())
    assert rows["score"].is_monotonic_decreasing
    fig = views.test_grid(run, 4)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), scores[4], rtol=1e-6)
    hits = np.asarray(fig.data[0].customdata, dtype=float)[..., 0]
    np.testing.assert_allclose(hits, np.rint(scores[4] * 4))  # 4-token spans
    assert f"{int((scores[4] > 0).sum())} heads copy-pasted" in fig.layout.title.text.replace("<br>", " ")
    failed = views.test_grid(run, 3)
    assert "did not pass the gate" in failed.layout.title.subtitle.text.replace("<br>", " ")
    with pytest.raises(KeyError, match="no test 99"):
        views.test_grid(run, 99)

    page = _page(runs.root)
    options, value = page.test_options(runs.full, None)
    assert [o["value"] for o in options] == list(range(N_TESTS)) and value == 0
    assert "failed" in options[3]["label"] and "passed" in options[0]["label"]
    assert page.test_options(runs.full, 7)[1] == 7
    assert page.test_options(runs.unrecalled, 99)[1] == 0  # no passing test: the first one
    detail = to_json(page.test_detail(runs.full, 4))
    tests = run.table("tests").set_index("test")
    assert tests.loc[4, "answer"] in detail and tests.loc[4, "generated"] in detail
    assert "passed the gate" in detail
    assert "did not pass" in to_json(page.test_detail(runs.full, 3))
    table = to_json(page.test_heads_table(runs.full, 4))
    for label in rows["label"]:
        assert f'"{label}"' in table
    grid = page.test_grid_figure(runs.full, 4)
    np.testing.assert_allclose(np.asarray(grid.data[0].z, dtype=float), scores[4], rtol=1e-6)
    assert not np.allclose(np.asarray(page.test_grid_figure(runs.full, 5).data[0].z, dtype=float), scores[4])
    recall = page.recall_figure(runs.full, 4)
    assert recall.data[1].name == "test 4"


def test_a_run_where_no_test_passed_says_so(runs: Runs) -> None:
    run = _open(runs, runs.unrecalled)
    assert views.gate_counts(run) == (0, N_TESTS)
    assert "no head has a score" in views.gate_line(run)
    grid = views.score_grid(run)
    assert np.isnan(np.asarray(grid.data[0].z, dtype=float)).all() and len(grid.data) == 1
    assert f"no test of {N_TESTS} passed" in grid.layout.title.subtitle.text.replace("<br>", " ")
    assert "no retrieval scores" in views.score_histogram(run).layout.annotations[0].text.replace("<br>", " ")
    assert "no head has a score" in views.top_heads_figure(run).layout.annotations[0].text.replace(
        "<br>", " "
    )
    assert views.top_heads(run).empty
    assert "no masking experiment" in views.masking_figure(run).layout.annotations[0].text.replace(
        "<br>", " "
    )
    page = _page(runs.root)
    assert "no masking experiment" in page.masking_figure(runs.unrecalled, "recall").layout.annotations[
        0
    ].text.replace("<br>", " ")
    banner = to_json(page.gate_banner(runs.unrecalled))
    assert f"0 / {N_TESTS}" in banner and '"className": "caveat"' in banner
    assert "No test passed the gate" in to_json(page.top_table(runs.unrecalled, 20))
    sections = retrieval_section.report_sections(run)
    body = "".join(s.body for s in sections)
    assert f"0 / {N_TESTS}</b> tests passed" in body and "ran no masking experiment" in sections[-2].body
    assert "retrieval-histogram-figure" not in body


def test_views_read_an_unsaved_result_like_a_saved_run(runs: Runs) -> None:
    result = make_result()
    run = _open(runs, runs.full)
    assert views.settings_line(result) == views.settings_line(run)
    line = views.settings_line(run)
    assert (
        "lengths 256, 512 tokens" in line
        and "depths 0, 0.5, 1" in line
        and "masking K = 10%, 25% of heads, 3 random seed(s)" in line
    )
    np.testing.assert_allclose(
        np.asarray(views.score_grid(result).data[0].z, dtype=float),
        np.asarray(views.score_grid(run).data[0].z, dtype=float),
    )
    pd.testing.assert_frame_equal(views.top_heads(result), views.top_heads(run))
    pd.testing.assert_frame_equal(views.masking_curve(result), views.masking_curve(run))
    few = make_result()
    few.tables["tests"]["passed"] = few.tables["tests"]["test"] < 3
    assert views.gate_counts(few) == (3, N_TESTS)
    assert "mean over these 3 tests" in views.gate_line(few) and "weak evidence" in views.gate_line(few)
    assert "weak evidence" not in views.gate_line(run)


def test_page_callbacks(runs: Runs) -> None:
    page = _page(runs.root)
    run = _open(runs, runs.full)
    banner = to_json(page.gate_banner(runs.full))
    assert (
        f"{N_PASSED} / {N_TESTS}" in banner
        and "tests passed the gate" in banner
        and '"className": "panel"' in banner
    )
    assert "weak evidence" not in banner  # 16 passing tests: not flagged
    assert "synthetic: protocol needle, lengths 256, 512" in page.settings_text(runs.full)
    np.testing.assert_allclose(
        np.asarray(page.grid_figure(runs.full).data[0].z, dtype=float), _pivot(run.heads, "retrieval_score")
    )
    assert page.grid_figure(runs.full).layout.uirevision == f"{runs.full}/grid"
    assert len(page.histogram_figure(runs.full).data[0].x) == N_LAYERS * N_HEADS
    assert (
        len(page.top_figure(runs.full, 10).data[0].y) == 10
        and len(page.top_figure(runs.full, None).data[0].y) == 20
    )
    table = to_json(page.top_table(runs.full, 10))
    top = views.top_heads(run, 10)
    assert f'"{top["label"].iloc[0]}"' in table and "Top 10 heads" in table
    assert page.masking_figure(runs.full, "recalled").layout.yaxis.tickformat == ".0%"
    assert "no retrieval run selected" in page.grid_figure(None).layout.annotations[0].text.replace(
        "<br>", " "
    )
    assert "cannot show run" in page.grid_figure("../elsewhere").layout.annotations[0].text.replace(
        "<br>", " "
    )
    assert page.test_options("../elsewhere", None) == ([], None)


def test_layout_and_callbacks_through_dash(runs: Runs, tmp_path: Path) -> None:
    page = _page(runs.root)
    layout = page.layout({"run": runs.full, "test": "5", "metric": "recalled"})
    text = to_json(layout)
    for element in (
        "retrieval-run",
        "retrieval-gate",
        "retrieval-grid",
        "retrieval-histogram",
        "retrieval-top",
        "retrieval-top-table",
        "retrieval-masking",
        "retrieval-recall",
        "retrieval-validation",
        "retrieval-test",
        "retrieval-test-detail",
        "retrieval-test-grid",
        "retrieval-test-heads",
    ):
        assert f'"id": "{element}"' in text
    assert f'"value": "{runs.full}"' in text and '"value": 5' in text and '"value": "recalled"' in text
    app = Dash(__name__)
    app.layout = layout
    page.register_callbacks(app)
    assert {"retrieval-grid.figure", "retrieval-masking.figure", "retrieval-test-grid.figure"} <= set(
        app.callback_map
    )
    figure = post_callback(
        app, "retrieval-test-grid.figure", [("retrieval-run", runs.full), ("retrieval-test", 6)]
    )
    z = figure["data"][0]["z"]
    expected = _open(runs, runs.full).array("scores")[6]
    np.testing.assert_allclose(np.asarray(decode_array(z), dtype=float), expected, rtol=1e-6)
    empty = to_json(_page(tmp_path / "none").layout({}))
    assert "No intact retrieval run" in empty and "headlab run retrieval" in empty


def test_the_app_serves_the_registered_page(runs: Runs) -> None:
    from dashboard import app as app_module

    assert RetrievalPage in pages()
    app = app_module.create_app(runs.root)
    assert "retrieval-grid.figure" in app.callback_map
    page = render_route(app, "/retrieval", f"?run={runs.unrecalled}")
    assert "Retrieval heads" in page and f'"value": "{runs.unrecalled}"' in page and f"0 / {N_TESTS}" in page


def test_report_section_renders(runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _open(runs, runs.full)
    sections = retrieval_section.report_sections(run)
    assert [s.anchor for s in sections] == [
        "retrieval-summary",
        "retrieval-heads",
        "retrieval-recall",
        "retrieval-masking",
        "validation",
    ]
    body = "".join(s.body for s in sections)
    for needle in (
        "retrieval-histogram-figure",
        "retrieval-grid-figure",
        "retrieval-top-figure",
        "retrieval-recall-figure",
        "retrieval-masking-figure",
        "retrieval-masking-recalled-figure",
    ):
        assert needle in body
    assert f"{N_PASSED} / {N_TESTS}</b> tests passed the gate" in body
    for row in views.top_heads(run, 20).itertuples():
        assert f"<td>{row.label}</td>" in body
    assert "&lt;b&gt;amber&lt;/b&gt; &amp; falcon" in body and HTML_GENERATED not in body  # escaped
    curve = masking_curve(run.table("masking"))
    assert f"<td>{float(curve['recall'].iloc[-1]):.3g}</td>" in body
    html = report.render_report(run)
    assert 'id="run"' in html
    assert section_builder("retrieval") is retrieval_section.report_sections
    html = report.render_report(run)
    assert 'id="retrieval-summary"' in html and "Needle recall over depth and length" in html
    foreign = runstore.write_run(
        tmp_path / "runs",
        analysis="retrieval",
        model_info={"name": "m"},
        config={},
        tables={"heads": run.heads[["layer", "head", "kv_head", "retrieval_score"]]},
    )
    generic = report.render_report(runstore.open_run(foreign))
    assert 'id="heads-heatmap-0"' in generic and 'id="retrieval-summary"' not in generic


def test_the_protocol_is_named_wherever_the_scores_are(runs: Runs) -> None:
    full, legacy = _open(runs, runs.full), _open(runs, runs.unrecalled)
    assert views.protocol(full) == "needle" and views.protocol(legacy) == "answer"
    assert views.settings_line(full).startswith("protocol needle") and "scored span: whole needle" in (
        views.settings_line(full)
    )
    assert "scored span: answer tokens" in views.settings_line(legacy)
    assert "reproduce the whole needle" in views.protocol_line(full)
    assert "1/|answer|" in views.protocol_line(legacy)
    page = _page(runs.root)
    assert "reproduce the whole needle" in to_json(page.gate_banner(runs.full))
    assert "share of the needle" in views.score_histogram(full).layout.xaxis.title.text
    body = retrieval_section.report_sections(full)[0].body
    assert "protocol needle" in body and "(the needle)" in body


def test_the_held_out_validation_is_shown_with_its_null(runs: Runs) -> None:
    run = _open(runs, runs.full)
    table = views.validation_table(run)
    assert table is not None and list(table.columns) == list(validation.COLUMNS) and len(table) == 1
    row = table.iloc[0]
    assert row["role"] == "retrieval" and row["n_null"] == N_NULL and row["n_inputs"] == 3
    assert row["effect"] == pytest.approx(np.mean([0.2 - 1.0, 0.0 - 1.0, 0.4 - 0.8]))
    heads = run.heads
    ringed = heads[heads["is_retrieval"]]
    assert (ringed["retrieval_role"] == "retrieval").all() and (
        heads.loc[~heads["is_retrieval"], "retrieval_role"] == ""
    ).all()
    assert (ringed["retrieval_validated"] == bool(row["validated"])).all()
    note = views.validation_note(run)
    assert "4 held-out tests" in note and "3 were recalled" in note and f"{N_NULL} random" in note
    page = _page(runs.root)
    panel = to_json(page.validation_panel(runs.full))
    assert "retrieval-validation-graph" in panel and "Held-out validation of the retrieval heads" in panel
    assert row["inputs"] in panel
    # a run without the table says so instead of failing
    legacy = to_json(page.validation_panel(runs.unrecalled))
    assert "made before the retrieval heads were validated" in legacy
    sections = retrieval_section.report_sections(run)
    assert sections[-1].anchor == "validation" and "validation-figure" in sections[-1].body
    assert "3 were recalled" in sections[-1].body
    old = retrieval_section.report_sections(_open(runs, runs.unrecalled))[-1]
    assert "made before the retrieval heads were validated" in old.body
