"""The ACT page (callbacks called directly and through Dash), its views and its report section, on
synthetic ACT runs with the analysis's result schema (small, random but seeded)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dash import Dash

from analyses import runstore, validation
from analyses.act.heldout import head_roles
from analyses.base import AnalysisResult
from dashboard import report
from dashboard.act import report as act_section
from dashboard.act import views
from dashboard.act.page import ActPage
from dashboard.catalog import RunCatalog
from dashboard.core import figures
from dashboard.core.page import Site
from dashboard.registry import section_builder
from tests.conftest import fixed_revision, post_callback, to_json

N_LAYERS, N_HEADS, GROUP = 6, 4, 2
LAYER_START, LAYER_END = 2, 5  # layers 2, 3, 4 searched
TASKS = {
    "sentiment": ("classification", 2),
    "topic": ("classification", 6),
    "capital": ("multiple_choice", 4),
}
TOKENS = [" the", ",", "\n", "<|im_start|>", " and", "."]


@dataclass
class FakeActConfig:
    """The fields of analyses.act.ActConfig the dashboard reads."""

    tasks: tuple[str, ...] = tuple(TASKS)
    beta: float = 0.4
    threshold: str = "alpha"
    alpha_threshold: float = 0.1
    filter: str = "task"  # or "pooled" (one search for every task) or "none" (no search)
    layer_start: int = LAYER_START
    layer_end: int = LAYER_END
    n_calibration: int = 20
    n_heldout: int = 40
    seed: int = 0
    first_sink: str = "share"
    keep: str = "not_lower"
    significance: float = 0.05


def _interval(rng: np.random.Generator, value: float, width: float) -> tuple[float, float]:
    return value - width * rng.uniform(0.5, 1.0), value + width * rng.uniform(0.5, 1.0)


def _validation(
    filt: pd.DataFrame, scopes: list[str], searched: list[tuple[int, int]], rng: np.random.Generator
) -> pd.DataFrame:
    """Two tests (margin, correctness) per head search that kept heads; ``capital``'s set beats its
    null for sure; a set with fewer heads outside it than it holds has no null."""
    rows = []
    for scope in scopes:
        part = filt[(filt["scope"] == scope) & filt["kept"]]
        kept = [(int(r.layer), int(r.head)) for r in part.itertuples()] if len(filt) else searched
        if not kept:
            continue
        n_null = 50 if len(searched) - len(kept) >= len(kept) else 0
        shift = 0.5 if scope == "capital" else 0.0
        for measure in ("margin", "correct"):
            rows.append(
                validation.test_row(
                    "kept",
                    kept,
                    rng.normal(shift, 0.2, 40),
                    rng.normal(0.0, 0.05, n_null),
                    measure=measure,
                    direction="higher",
                    inputs=validation.Inputs(f"held-out items of {scope}", 40),
                    n_boot=200,
                    head_search=scope,
                )
            )
    return validation.frame(rows, extra=("head_search",))


def make_result(cfg: FakeActConfig, seed: int = 0) -> AnalysisResult:
    """A synthetic ACT result with every table of the schema; ``capital`` improves for sure."""
    rng = np.random.default_rng(seed)
    tasks = list(cfg.tasks)
    scopes = {"task": tasks, "pooled": ["pooled"], "none": []}[cfg.filter]
    searched = [(lay, h) for lay in range(cfg.layer_start, cfg.layer_end) for h in range(N_HEADS)]
    filter_rows = []
    for scope in scopes:
        base = float(rng.integers(8, 15)) / cfg.n_calibration
        for lay, h in searched:
            calibrated = base + float(rng.integers(-2, 3)) / cfg.n_calibration
            delta = calibrated - base
            filter_rows.append(
                {
                    "scope": scope,
                    "layer": lay,
                    "head": h,
                    "acc_base": base,
                    "acc_calibrated": calibrated,
                    "delta": delta,
                    "kept": bool(delta >= 0),
                }
            )
    filt = pd.DataFrame(
        filter_rows, columns=["scope", "layer", "head", "acc_base", "acc_calibrated", "delta", "kept"]
    )
    item_rows, task_rows = [], []
    for task in tasks:
        kind, n_choices = TASKS[task]
        labels = rng.integers(0, n_choices, cfg.n_heldout)
        before = rng.random(cfg.n_heldout) < 0.55
        after = before.copy()
        flip = rng.random(cfg.n_heldout) < (0.4 if task == "capital" else 0.15)
        after[flip] = ~before[flip] if task != "capital" else True
        margin_b = np.where(before, 1.0, -1.0) * rng.uniform(0.1, 3.0, cfg.n_heldout)
        margin_a = np.where(after, 1.0, -1.0) * rng.uniform(0.1, 3.0, cfg.n_heldout)
        for i in range(cfg.n_heldout):
            wrong = (labels[i] + 1) % n_choices
            item_rows.append(
                {
                    "task": task,
                    "item": i,
                    "label": int(labels[i]),
                    "pred_before": int(labels[i] if before[i] else wrong),
                    "pred_after": int(labels[i] if after[i] else wrong),
                    "correct_before": bool(before[i]),
                    "correct_after": bool(after[i]),
                    "margin_before": float(margin_b[i]),
                    "margin_after": float(margin_a[i]),
                }
            )
        scope = {"task": task, "pooled": "pooled", "none": "all"}[cfg.filter]
        acc_b, acc_a = float(before.mean()), float(after.mean())
        delta = acc_a - acc_b
        b_lo, b_hi = _interval(rng, acc_b, 0.12)
        a_lo, a_hi = _interval(rng, acc_a, 0.12)
        d_lo, d_hi = (delta - 0.03, delta + 0.04) if task == "capital" else _interval(rng, delta, 0.2)
        task_rows.append(
            {
                "task": task,
                "kind": kind,
                "chance": 1.0 / n_choices,
                "n_calibration": cfg.n_calibration,
                "n_heldout": cfg.n_heldout,
                "scope": scope,
                "n_kept": int(filt[(filt["scope"] == scope)]["kept"].sum()) if scopes else len(searched),
                "acc_before": acc_b,
                "before_low": b_lo,
                "before_high": b_hi,
                "acc_after": acc_a,
                "after_low": a_lo,
                "after_high": a_hi,
                "delta": delta,
                "delta_low": d_lo,
                "delta_high": d_hi,
            }
        )
    task_frame = pd.DataFrame(task_rows)
    head_rows = []
    for lay in range(N_LAYERS):
        for h in range(N_HEADS):
            in_range = cfg.layer_start <= lay < cfg.layer_end
            mine = filt[(filt["layer"] == lay) & (filt["head"] == h)]
            n_kept = sum(
                bool(mine[mine["scope"] == scope]["kept"].any()) for scope in task_frame["scope"]
            )  # tasks whose scope kept the head
            n_kept = n_kept if scopes else 1  # no search: every head in range calibrated once
            head_rows.append(
                {
                    "layer": lay,
                    "head": h,
                    "kv_head": h // GROUP,
                    "in_range": in_range,
                    "n_tasks_kept": int(n_kept) if in_range else 0,
                    "mean_delta": float(mine["delta"].mean()) if in_range and scopes else float("nan"),
                    "hidden_sinks": float(rng.uniform(0, 3)),
                    "first_sink_pos": int(rng.choice([-1, 0])),
                }
            )
    checks = _validation(filt, list(dict.fromkeys(task_frame["scope"])), searched, rng)
    heads = validation.evidence_columns(pd.DataFrame(head_rows), head_roles(checks), "act")
    sink_tokens = pd.DataFrame(
        {
            "token": TOKENS,
            "count": rng.integers(1, 50, len(TOKENS)),
            "share_of_heads": rng.uniform(0, 1, len(TOKENS)),
        }
    )
    return AnalysisResult(
        analysis="act",
        model_info={
            "name": "synthetic",
            "n_layers": N_LAYERS,
            "n_heads": N_HEADS,
            "n_kv_heads": N_HEADS // GROUP,
        },
        config=dataclasses.asdict(cfg),  # as analyses.act stores it
        tables={
            "heads": heads,
            "filter": filt,
            "tasks": task_frame,
            "items": pd.DataFrame(item_rows),
            "sink_tokens": sink_tokens,
            "validation": checks,
        },
        seeds={"seed": cfg.seed},
    )


@dataclass(frozen=True)
class Runs:
    root: Path
    per_task: str  # run id: three tasks, one head search each
    pooled: str  # run id: two tasks sharing one pooled search, without items, sink tokens, validation
    unsearched: str  # run id: filter="none", every head in range calibrated, no search


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("act-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
        per_task = make_result(FakeActConfig()).save(root)
        pooled_result = make_result(FakeActConfig(tasks=("sentiment", "topic"), filter="pooled"), seed=1)
        for name in ("items", "sink_tokens", "validation"):  # as an older run
            del pooled_result.tables[name]
        pooled = pooled_result.save(root)
        unsearched = make_result(FakeActConfig(tasks=("topic",), filter="none"), seed=2).save(root)
    yield Runs(root, per_task.name, pooled.name, unsearched.name)


def _page(root: Path) -> ActPage:
    return ActPage(Site(catalog=RunCatalog(root), analysis_paths={"act": ActPage.path}))


def _open(runs: Runs, run_id: str) -> runstore.Run:
    return runstore.open_run(runs.root / run_id)


def test_accuracy_bars_and_delta_equal_the_tasks_table(runs: Runs) -> None:
    run = _open(runs, runs.per_task)
    tasks = run.table("tasks").set_index("task").loc[list(TASKS)]
    fig = views.accuracy_figure(run)
    before, after, chance = fig.data
    assert list(before.x) == list(TASKS) and list(after.x) == list(TASKS)
    np.testing.assert_allclose(before.y, tasks["acc_before"])
    np.testing.assert_allclose(after.y, tasks["acc_after"])
    np.testing.assert_allclose(np.asarray(after.y) + after.error_y.array, tasks["after_high"])
    np.testing.assert_allclose(np.asarray(before.y) - before.error_y.arrayminus, tasks["before_low"])
    np.testing.assert_allclose(chance.y, [0.5, 1 / 6, 0.25])
    assert chance.name == "chance" and fig.layout.yaxis.tickformat == ".0%"
    # the acc_before of the table is the share of held-out items answered right
    items = run.table("items")
    assert items.groupby("task")["correct_before"].mean()["topic"] == pytest.approx(
        tasks.loc["topic", "acc_before"]
    )
    highlighted = views.accuracy_figure(run, highlight="topic")
    assert list(highlighted.data[1].marker.opacity) == [0.35, 1.0, 0.35]

    delta = views.delta_figure(run)
    (points,) = delta.data
    assert list(points.y) == list(TASKS)
    np.testing.assert_allclose(points.x, tasks["delta"])
    np.testing.assert_allclose(np.asarray(points.x) + points.error_x.array, tasks["delta_high"])
    np.testing.assert_allclose(np.asarray(points.x) - points.error_x.arrayminus, tasks["delta_low"])
    # capital's interval lies above 0 (green); the others' colours follow their own intervals
    colours = dict(zip(points.y, points.marker.color, strict=True))
    assert colours["capital"] == views.KEPT_COLOUR
    for task in ("sentiment", "topic"):
        low, high = tasks.loc[task, ["delta_low", "delta_high"]]
        expected = views.KEPT_COLOUR if low > 0 else views.DROPPED_COLOUR if high < 0 else "#6c757d"
        assert colours[task] == expected


def test_head_grid_counts_tasks_and_greys_unsearched_layers(runs: Runs) -> None:
    run = _open(runs, runs.per_task)
    heads = run.heads
    fig = views.head_grid(run)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (N_LAYERS, N_HEADS)
    expected = heads.pivot(index="layer", columns="head", values="n_tasks_kept").to_numpy(dtype=float)
    searched = slice(LAYER_START, LAYER_END)
    np.testing.assert_array_equal(z[searched], expected[searched])
    assert np.isnan(z[:LAYER_START]).all() and np.isnan(z[LAYER_END:]).all()
    grey = np.asarray(fig.data[1].z, dtype=float)
    assert (grey[:LAYER_START] == 1).all() and np.isnan(grey[searched]).all()
    assert fig.data[0].zmax == 3 and "of the 3 tasks" in fig.layout.title.text.replace("<br>", " ")
    assert views.kept_heads(run) == sorted(
        (int(r.layer), int(r.head)) for r in heads[heads["n_tasks_kept"] > 0].itertuples()
    )
    hidden = views.head_grid(run, kind="hidden")
    np.testing.assert_allclose(
        np.asarray(hidden.data[0].z, dtype=float),
        heads.pivot(index="layer", columns="head", values="hidden_sinks"),
    )
    assert len(hidden.data) == 1 and "Hidden sinks" in hidden.layout.title.text.replace("<br>", " ")


def test_head_grid_of_a_task_shows_its_deltas_and_rings_its_kept_heads(runs: Runs) -> None:
    run = _open(runs, runs.per_task)
    filt = run.table("filter")
    for task in TASKS:
        fig = views.head_grid(run, task)
        mine = filt[filt["scope"] == task]
        z = np.asarray(fig.data[0].z, dtype=float)
        for row in mine.itertuples():
            assert z[row.layer, row.head] == pytest.approx(row.delta)
        assert np.isnan(z[:LAYER_START]).all()
        rings = fig.data[-1]
        assert rings.name == "kept"
        ringed = sorted(zip((int(y) for y in rings.y), (int(x) for x in rings.x), strict=True))
        kept = sorted((int(r.layer), int(r.head)) for r in mine[mine["kept"]].itertuples())
        assert ringed == kept == views.kept_heads(run, task) and kept
        assert f"{len(kept)} kept" in fig.layout.title.text.replace("<br>", " ")
        assert fig.data[0].zmid == 0
    # different tasks searched differently
    assert views.kept_heads(run, "sentiment") != views.kept_heads(run, "topic")
    # a pooled run: every task shows the one pooled search
    pooled = _open(runs, runs.pooled)
    a, b = (np.asarray(views.head_grid(pooled, t).data[0].z, dtype=float) for t in ("sentiment", "topic"))
    np.testing.assert_array_equal(a, b)
    assert "pooled" in views.head_grid(pooled, "topic").layout.title.subtitle.text.replace("<br>", " ")
    with pytest.raises(KeyError, match="no task 'capital'"):
        views.head_grid(pooled, "capital")


def test_search_distribution_and_sink_tokens(runs: Runs) -> None:
    run = _open(runs, runs.per_task)
    filt = run.table("filter")
    mine = filt[filt["scope"] == "topic"]
    fig = views.search_figure(run, "topic")
    kept, dropped = fig.data
    assert kept.name == f"kept ({int(mine['kept'].sum())})" and len(dropped.y) == int((~mine["kept"]).sum())
    ranked = sorted(mine["delta"], reverse=True)
    shown = sorted([*zip(kept.x, kept.y, strict=True), *zip(dropped.x, dropped.y, strict=True)])
    np.testing.assert_allclose([y for _, y in shown], ranked)
    assert (np.asarray(kept.y) >= 0).all() and (np.asarray(dropped.y) < 0).all()
    overview = views.search_figure(run)
    assert [t.name for t in overview.data] == [
        *TASKS,
        f"kept ({int(filt['kept'].sum())})",
        f"dropped ({int((~filt['kept']).sum())})",
    ]
    np.testing.assert_allclose(overview.data[2].y, filt[filt["scope"] == "capital"]["delta"])
    assert sorted(overview.data[3].y) == sorted(filt[filt["kept"]]["delta"])
    assert list(overview.layout.xaxis.ticktext) == list(TASKS)

    tokens = views.sink_tokens_figure(run)
    table = run.table("sink_tokens").sort_values("count", ascending=False)
    np.testing.assert_array_equal(tokens.data[0].x, table["count"])
    assert list(tokens.data[0].y) == [figures.token_label(t) for t in table["token"]]
    np.testing.assert_allclose(tokens.data[0].customdata, table["share_of_heads"])
    np.testing.assert_allclose(tokens.data[0].marker.color, table["share_of_heads"])
    pooled = _open(runs, runs.pooled)
    assert "no hidden sink tokens" in views.sink_tokens_figure(pooled).layout.annotations[0].text.replace(
        "<br>", " "
    )


def test_margins_split_items_by_outcome(runs: Runs) -> None:
    run = _open(runs, runs.per_task)
    items = run.table("items")
    capital = items[items["task"] == "capital"]
    fig = views.margin_figure(run, "capital")
    by_name = {t.name.split(" (")[0]: t for t in fig.data}
    fixed = capital[~capital["correct_before"] & capital["correct_after"]]
    assert len(by_name["wrong → right"].x) == len(fixed) > 0
    assert len(by_name["right → wrong"].x) == 0  # capital only ever gains
    np.testing.assert_allclose(sorted(by_name["wrong → right"].y), sorted(fixed["margin_after"]))
    assert sum(len(t.x) for t in views.margin_figure(run).data) == len(items)


def test_views_read_an_unsaved_result_like_a_saved_run(runs: Runs) -> None:
    result = make_result(FakeActConfig())
    run = _open(runs, runs.per_task)
    assert views.settings_line(result) == views.settings_line(run)
    line = views.settings_line(run)
    assert "beta 0.4" in line and "alpha_k > 0.1" in line and "layers 2–4 in range" in line
    assert "head search per task" in line
    assert "first_sink=share, the official code's variant" in line
    frozen = views.settings_line(make_result(dataclasses.replace(FakeActConfig(), first_sink="frozen")))
    assert "first_sink=frozen" in frozen and "share" not in frozen
    np.testing.assert_allclose(views.accuracy_figure(result).data[1].y, views.accuracy_figure(run).data[1].y)
    assert views.kept_heads(result, "capital") == views.kept_heads(run, "capital")


def test_page_callbacks_follow_the_chosen_task(runs: Runs) -> None:
    page = _page(runs.root)
    run = _open(runs, runs.per_task)
    options, value = page.task_options(runs.per_task, "topic")
    assert [o["value"] for o in options] == [views.ALL_TASKS, *TASKS] and value == "topic"
    assert page.task_options(runs.pooled, "capital")[1] == views.ALL_TASKS  # not a task of that run
    assert "pooled head search" in to_json(page.task_options(runs.pooled, None)[0])
    grid = page.grid_figure(runs.per_task, "sentiment", "kept")
    kept = views.kept_heads(run, "sentiment")
    assert sorted(zip(map(int, grid.data[-1].y), map(int, grid.data[-1].x), strict=True)) == kept
    assert (
        page.grid_figure(runs.per_task, views.ALL_TASKS, "kept").data[0].colorbar.title.text
        == "tasks keeping it"
    )
    assert "Hidden sinks" in page.grid_figure(runs.per_task, "sentiment", "hidden").layout.title.text.replace(
        "<br>", " "
    )
    search = page.search_figure(runs.per_task, "sentiment")
    assert "sentiment" in search.layout.title.text.replace("<br>", " ") and len(search.data) == 2
    accuracy = page.accuracy_figure(runs.per_task, "capital")
    assert list(accuracy.data[0].marker.opacity) == [0.35, 0.35, 1.0]
    assert len(page.delta_figure(runs.per_task, "capital").data[0].x) == 3
    assert "capital" in page.margin_figure(runs.per_task, "capital").layout.title.text.replace("<br>", " ")
    assert "no per-item table" in page.margin_figure(runs.pooled, None).layout.annotations[0].text.replace(
        "<br>", " "
    )
    assert len(page.tokens_figure(runs.per_task).data[0].x) == len(TOKENS)
    table = to_json(page.tasks_table(runs.per_task, "topic"))
    row = views.task_rows(run).set_index("task").loc["topic"]
    assert row["before"] in table and row["delta"] in table and '"className": "current"' in table
    assert "beta 0.4" in page.settings_text(runs.per_task)
    assert "no ACT run selected" in page.grid_figure(None, None, "kept").layout.annotations[0].text.replace(
        "<br>", " "
    )
    assert "cannot show run" in page.accuracy_figure("../elsewhere", None).layout.annotations[0].text.replace(
        "<br>", " "
    )


def test_layout_and_callbacks_through_dash(runs: Runs, tmp_path: Path) -> None:
    page = _page(runs.root)
    layout = page.layout({"run": runs.per_task, "task": "topic", "map": "hidden"})
    text = to_json(layout)
    for element in (
        "act-run",
        "act-task",
        "act-map",
        "act-accuracy",
        "act-delta",
        "act-grid",
        "act-search",
        "act-margins",
        "act-tokens",
        "act-table",
        "act-validation",
    ):
        assert f'"id": "{element}"' in text
    assert (
        f'"value": "{runs.per_task}"' in text and '"value": "topic"' in text and '"value": "hidden"' in text
    )
    app = Dash(__name__)
    app.layout = layout
    page.register_callbacks(app)
    assert {"act-grid.figure", "act-accuracy.figure", "act-search.figure", "act-table.children"} <= set(
        app.callback_map
    )
    data = post_callback(
        app,
        "act-grid.figure",
        [("act-run", runs.per_task), ("act-task", "capital"), ("act-map", "kept")],
        ["act-task.value"],
    )["data"]
    rings = data[-1]
    assert rings["name"] == "kept"
    kept = views.kept_heads(_open(runs, runs.per_task), "capital")
    assert sorted(zip(map(int, rings["y"]), map(int, rings["x"]), strict=True)) == kept
    empty = to_json(_page(tmp_path / "none").layout({}))
    assert "No intact ACT run" in empty and "headlab run act" in empty


def test_report_section_renders(runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _open(runs, runs.per_task)
    sections = act_section.report_sections(run)
    assert [s.anchor for s in sections] == [
        "act-accuracy",
        "act-heads",
        "act-search",
        "act-validation",
        "act-items",
        "act-tokens",
    ]
    body = "".join(s.body for s in sections)
    for needle in (
        "act-accuracy-figure",
        "act-delta-figure",
        "act-grid-kept",
        "act-grid-scope-2",
        "act-grid-hidden",
        "act-search-all",
        "act-margins-figure",
        "act-tokens-figure",
        "validation-figure",
        "keep=not_lower",
    ):
        assert needle in body
    for row in views.task_rows(run).itertuples(index=False):
        assert row.before in body and row.delta in body
    assert "&#x27;&lt;|im_start|&gt;&#x27;" in body  # tokens are escaped
    pooled = act_section.report_sections(_open(runs, runs.pooled))
    heads_body = pooled[1].body
    assert "act-grid-scope-0" in heads_body and "act-grid-scope-1" not in heads_body  # one pooled search
    assert "act-validation" not in [s.anchor for s in pooled]  # an older run: no validation table
    assert "kept no per-item table" in pooled[3].body and "No hidden sink token" in pooled[4].body
    html = report.render_report(run)
    assert 'id="act-accuracy"' in html and "Heads kept for calibration" in html and "beta 0.4" in html
    assert section_builder("act") is act_section.report_sections
    foreign = runstore.write_run(
        tmp_path / "runs",
        analysis="act",
        model_info={"name": "m"},
        config={},
        tables={"heads": run.heads[["layer", "head", "kv_head", "hidden_sinks"]]},
    )
    generic = report.render_report(runstore.open_run(foreign))
    assert 'id="heads-heatmap-0"' in generic and 'id="act-accuracy"' not in generic


def test_a_run_without_head_search_calibrates_every_head_in_range(runs: Runs) -> None:
    run = _open(runs, runs.unsearched)
    in_range = [(lay, h) for lay in range(LAYER_START, LAYER_END) for h in range(N_HEADS)]
    assert views.scopes(run) == [] and views.kept_heads(run, "topic") == in_range
    fig = views.head_grid(run, "topic")
    rings = fig.data[-1]
    assert sorted(zip(map(int, rings.y), map(int, rings.x), strict=True)) == in_range
    assert "no head search" in fig.layout.title.text.replace("<br>", " ")
    assert "no head search" in views.search_figure(run, "topic").layout.annotations[0].text.replace(
        "<br>", " "
    )
    assert "no head search" in views.search_figure(run).layout.annotations[0].text.replace("<br>", " ")
    assert "no head search" in views.settings_line(run)
    assert views.task_rows(run)["scope"].tolist() == ["none: all in range"]
    page = _page(runs.root)
    assert "no head search" in to_json(page.task_options(runs.unsearched, None)[0])
    sections = act_section.report_sections(run)
    body = "".join(s.body for s in sections)
    assert "act-grid-kept" in body and "act-grid-scope" not in body and "act-search-scope" not in body


def test_validation_panel_and_verdicts(runs: Runs) -> None:
    run = _open(runs, runs.per_task)
    checks = run.table("validation")
    verdicts = views.validation_verdicts(run)
    assert verdicts["capital"].startswith("validated: percentile 100")
    rows = views.task_rows(run).set_index("task")
    for task, verdict in verdicts.items():
        assert rows.loc[task, "validated"] == verdict
        tested = checks[(checks["head_search"] == task) & (checks["measure"] == "margin")].iloc[0]
        assert verdict.startswith("validated") == bool(tested["validated"])
    # the heads table carries each kept head's evidence, named after the search that kept it
    heads = run.heads
    capital = heads[heads["act_role"].str.contains("kept:capital", regex=False)]
    assert len(capital) == int(rows.loc["capital", "n_kept"])
    first = capital[capital["act_role"].str.startswith("kept:capital")]  # its own numbers come first
    capital_p = checks[(checks["head_search"] == "capital") & (checks["measure"] == "margin")]["p_value"]
    assert len(first) and np.allclose(first["act_p_value"], float(capital_p.iloc[0]))
    page = _page(runs.root)
    text = to_json(page.validation_panel(runs.per_task))
    assert "act-validation-graph" in text and "Held-out validation of the kept heads" in text
    assert "keep=not_lower" in text and "capital" in text
    older = to_json(page.validation_panel(runs.pooled))
    assert "made before ACT validated" in older and "act-validation-graph" not in older
    assert set(views.task_rows(_open(runs, runs.pooled))["validated"]) == {"not tested (an older run)"}
    # every head in range calibrated: nothing lies outside the set, so there is no null
    unsearched = _open(runs, runs.unsearched)
    assert views.validation_verdicts(unsearched) == {"all": "no null (too few heads outside the set)"}
    assert "No null for all: 12 heads kept, only 0 in-range heads outside them" in views.validation_note(
        unsearched
    )
    assert "validated" not in to_json(page.validation_panel(None)).replace("not validated", "")
