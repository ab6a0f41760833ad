"""IOI / Colored Objects circuits end to end: the three runs on the tiny GPT-2 (every table's columns,
saved runs read back equal, the reuse and intervention tables) and the staged discovery on the
embedded real model. The building blocks are tested against brute force in ``test_circuits.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import probe
from analyses import circuits, runstore
from analyses.circuits import CircuitConfig, Runner, heldout
from analyses.validation import COLUMNS as VALIDATION_COLUMNS
from analyses.validation import EVIDENCE
from probe import interventions as iv
from probe.hooks import attn_hook
from probe.loading import LoadedModel
from tests.conftest import fixed_revision, real_model
from tests.test_circuits import bridge_logit_diff, every_head, wordy

# --------------------------------------------------------------------------- 1. end to end (tiny)

TINY_CFG = CircuitConfig(
    n_items=8, n_random=3, batch_size=64, n_boot=50, progress=False, n_heldout=6, n_reference=6
)
IOI_CFG = dataclasses.replace(TINY_CFG, max_senders=5, batch_size=4)  # chunks of one prompt
STAGE_COLS = ["logits", "mover_queries", "inhibition_kv", "induction_k"]
SIG_COLS = [
    "end_to_target",
    "end_to_dup",
    "dup2_to_dup1",
    "dup2_to_dup1_next",
    "dup1_next_to_dup1",
    "previous_token",
]
COLUMNS = {
    "scores": ["task", "stage", "layer", "head", "score"],
    "metrics": [
        "task",
        "n_items",
        "logit_diff",
        "logit_diff_low",
        "logit_diff_high",
        "logit_diff_corrupt",
        "gap",
        "accuracy",
        "accuracy_low",
        "accuracy_high",
        "accuracy_chance",
        "vocab_accuracy",
        "vocab_accuracy_low",
        "vocab_accuracy_high",
    ],
    "items": [
        "task",
        "item",
        "text",
        "answer",
        "logit_diff",
        "logit_diff_corrupt",
        "correct",
        "vocab_correct",
    ],
    "circuit": [
        "task",
        "class",
        "stage",
        "layer",
        "head",
        "rank",
        "score",
        "activation",
        *(f"sig_{s}" for s in SIG_COLS),
    ],
    "receivers": ["task", "stage", "input", "layer", "head", "stand_in", "why"],
    "edges": [
        "task",
        "stage",
        "sender_layer",
        "sender_head",
        "receiver_layer",
        "receiver_head",
        "input",
        "share",
    ],
    "faithfulness": ["task", "circuit", "index", "size", "logit_diff", "full_logit_diff", "faithfulness"],
    "ablation": ["task", "ablated", "index", "size", "logit_diff", "drop", "heads"],
    "validation": ["task", *VALIDATION_COLUMNS],
    "overlap": ["source", "stage", "percent", "k", "shared", "overlap", "jaccard"],
    "rank_correlation": ["stage", "spearman", "p_value", "n_heads"],
    "intervention": [
        "condition",
        "index",
        "n_heads",
        "heads",
        "accuracy",
        "accuracy_low",
        "accuracy_high",
        "change",
        "change_low",
        "change_high",
        "chance",
        "vocab_accuracy",
        "vocab_accuracy_low",
        "vocab_accuracy_high",
        "logit_diff",
    ],
}


def heads_columns(prefixes: Sequence[str]) -> list[str]:
    cols = ["layer", "head", "kv_head"]
    for px in prefixes:
        cols += [
            f"{px}_activation",
            f"{px}_compensation",
            f"{px}_attribution",
            *(f"{px}_{s}" for s in STAGE_COLS),
            *(f"{px}_{s}" for s in SIG_COLS),
        ]
    cols += [f"{px}_class" for px in prefixes]
    for px in prefixes:
        cols += [f"{px}_{e}" for e in EVIDENCE]
    return cols


@pytest.fixture(scope="module")
def tiny_runs() -> dict[str, Any]:
    model = wordy("tiny-gpt2")
    return {
        "model": model,
        "ioi": circuits.run_ioi(model, IOI_CFG),
        "colored_objects": circuits.run_colored_objects(model, TINY_CFG),
        "reuse": circuits.run_circuit_reuse(model, TINY_CFG),
    }


def _check_task_tables(result: Any, model: LoadedModel, tasks: Sequence[str], cfg: CircuitConfig) -> None:
    t = result.tables
    for name, cols in COLUMNS.items():
        if name in t:
            assert list(t[name].columns) == cols, name
    px = ["ioi" if task == "ioi" else "co" for task in tasks]
    assert list(t["heads"].columns) == heads_columns(px)
    assert len(t["heads"]) == model.n_layers * model.n_heads
    metrics = t["metrics"].set_index("task")
    assert list(metrics.index) == list(tasks) and not metrics.isna().any().any()
    for task in tasks:
        m = metrics.loc[task]
        items = t["items"][t["items"]["task"] == task]
        assert m["n_items"] == cfg.n_items == len(items)
        assert items["item"].tolist() == list(range(cfg.n_items))
        assert m["logit_diff"] == pytest.approx(items["logit_diff"].mean())
        assert m["accuracy"] == pytest.approx(items["correct"].mean())
        assert m["gap"] == pytest.approx(m["logit_diff"] - m["logit_diff_corrupt"])
        assert m["logit_diff_low"] <= m["logit_diff"] <= m["logit_diff_high"]
        scores = t["scores"][t["scores"]["task"] == task]
        assert len(scores) == 6 * model.n_layers * model.n_heads  # attribution, activation, 4 stages
        grid = result.arrays[f"scores_{task}"]
        assert grid.shape == (5, model.n_layers, model.n_heads)
        for axis, name in enumerate(["activation", *STAGE_COLS]):
            col = t["heads"][f"{'ioi' if task == 'ioi' else 'co'}_{name}"].to_numpy()
            np.testing.assert_array_equal(col, grid[axis].ravel())
            np.testing.assert_array_equal(scores[scores["stage"] == name]["score"].to_numpy(), col)
        attribution = t["heads"][f"{'ioi' if task == 'ioi' else 'co'}_attribution"].to_numpy()
        assert np.isfinite(attribution).all()
        np.testing.assert_array_equal(
            scores[scores["stage"] == "attribution"]["score"].to_numpy(), attribution
        )
        faith = t["faithfulness"][t["faithfulness"]["task"] == task]
        assert faith["circuit"].tolist() == ["found", "empty", *["random"] * cfg.n_random]
        assert not faith.isna().any().any()
        circuit = t["circuit"][t["circuit"]["task"] == task]
        assert faith.iloc[0]["size"] == len(set(zip(circuit["layer"], circuit["head"], strict=True)))
        np.testing.assert_allclose(faith["full_logit_diff"], m["logit_diff"], rtol=1e-9)
        receivers = t["receivers"][t["receivers"]["task"] == task]
        assert set(receivers["stage"]) == {"mover_queries", "inhibition_kv", "induction_k"}
        assert not receivers.isna().any().any()


def test_run_ioi_end_to_end_with_screened_senders(
    tiny_runs: dict[str, Any], tmp_path: Any, monkeypatch: Any
) -> None:
    model, result = tiny_runs["model"], tiny_runs["ioi"]
    assert result.analysis == "ioi"
    _check_task_tables(result, model, ["ioi"], IOI_CFG)
    grid = result.arrays["scores_ioi"]
    attribution = result.tables["heads"]["ioi_attribution"].to_numpy().reshape(model.n_layers, model.n_heads)
    assert np.isfinite(attribution).all()
    screened = circuits.screened_senders(model, attribution, 5)
    top5 = np.argsort(-np.abs(attribution), axis=None)[:5]
    assert sorted(screened) == sorted((int(i) // model.n_heads, int(i) % model.n_heads) for i in top5)
    tested = np.zeros(attribution.shape, dtype=bool)
    for head in screened:
        tested[head] = True
    for axis in grid:  # activation patching and every stage: NaN = not tested, exactly
        assert np.array_equal(np.isfinite(axis), tested)
    # the empty circuit: every head mean-ablated with its template's mean, whatever the chunking
    data = circuits.ioi_task(model, IOI_CFG.n_items, IOI_CFG.seed, "discovery")
    assert max(len(g) for g in data.groups) > IOI_CFG.batch_size // 4
    lds = []
    for group in data.groups:
        means = iv.cache_z(model, group.corrupt)
        with iv.compose(
            *(
                iv.patch_activation(model, attn_hook(x, "z"), z.mean(0, keepdim=True))
                for x, z in means.items()
            )
        ):
            lds.append(bridge_logit_diff(model, group.clean, group))
    faith = result.tables["faithfulness"].set_index("circuit")
    assert faith.loc["empty", "logit_diff"] == pytest.approx(float(torch.cat(lds).double().mean()), abs=1e-5)
    assert "ioi on tiny-gpt2" in circuits.summary(result)
    monkeypatch.setattr(runstore, "code_revision", fixed_revision)
    run = runstore.open_run(result.save(tmp_path))
    assert run.analysis == "ioi" and set(run.table_names) == set(result.tables)
    for name, table in result.tables.items():
        pd.testing.assert_frame_equal(run.table(name), table, check_dtype=False, check_index_type=False)
    np.testing.assert_array_equal(run.array("scores_ioi"), grid)


def test_run_colored_objects_and_circuit_reuse_end_to_end(
    tiny_runs: dict[str, Any], tmp_path: Any, monkeypatch: Any
) -> None:
    model, single, reuse = tiny_runs["model"], tiny_runs["colored_objects"], tiny_runs["reuse"]
    _check_task_tables(single, model, ["colored_objects"], TINY_CFG)
    _check_task_tables(reuse, model, ["ioi", "colored_objects"], TINY_CFG)
    for name in ("ioi", "colored_objects"):
        assert not np.isnan(reuse.arrays[f"scores_{name}"]).any()  # every head tested
    # the reuse run's Colored Objects half is the single run
    np.testing.assert_allclose(
        reuse.arrays["scores_colored_objects"], single.arrays["scores_colored_objects"], atol=1e-6
    )
    pd.testing.assert_frame_equal(
        reuse.tables["metrics"].iloc[[1]].reset_index(drop=True), single.tables["metrics"], check_exact=False
    )

    t = reuse.tables
    overlap = t["overlap"]
    assert not overlap.isna().any().any()
    n_pct = len(TINY_CFG.reuse_percents)
    assert len(overlap) == n_pct * (len(STAGE_COLS) + 1) + n_pct
    assert set(overlap["source"]) == {"path_patching", "activation_patching"}
    assert set(overlap[overlap["source"] == "activation_patching"]["stage"]) == {"activation"}
    assert overlap["overlap"].between(0, 1).all() and (overlap["shared"] <= overlap["k"]).all()
    ioi_scores, co_scores = reuse.arrays["scores_ioi"], reuse.arrays["scores_colored_objects"]
    for p in TINY_CFG.reuse_percents:  # recompute one point from the saved grids
        row = overlap[
            (overlap["source"] == "path_patching")
            & (overlap["stage"] == "logits")
            & (overlap["percent"] == p)
        ]
        shared = circuits.top_heads(ioi_scores[1], p) & circuits.top_heads(co_scores[1], p)
        assert int(row["shared"].iloc[0]) == len(shared)

    corr = t["rank_correlation"]
    assert corr["stage"].tolist() == [*STAGE_COLS, "activation"]
    for axis, row in enumerate(corr.itertuples(), start=1):
        a, b = ioi_scores[axis % 5], co_scores[axis % 5]  # "activation" is axis 0
        constant = np.ptp(a) == 0 or np.ptp(b) == 0
        assert np.isnan(row.spearman) == constant and (constant or -1 <= row.spearman <= 1)

    iv_table = t["intervention"]
    assert iv_table["condition"].tolist() == ["before", "ioi_heads", *["random"] * TINY_CFG.n_random]
    assert not iv_table.drop(columns="heads").isna().any().any()
    before = iv_table.iloc[0]
    co_metrics = t["metrics"].set_index("task").loc["colored_objects"]
    assert before["n_heads"] == 0 and before["heads"] == ""
    assert before["accuracy"] == pytest.approx(co_metrics["accuracy"])
    assert before["logit_diff"] == pytest.approx(co_metrics["logit_diff"], abs=1e-5)
    sizes = iv_table["n_heads"].iloc[1:]
    assert (sizes == sizes.iloc[0]).all() and sizes.iloc[0] > 0  # random sets match the IOI set's size
    text = circuits.summary(reuse)
    assert "reuse:" in text and "intervention on Colored Objects" in text

    monkeypatch.setattr(runstore, "code_revision", fixed_revision)
    for result in (single, reuse):
        run = runstore.open_run(result.save(tmp_path))
        assert run.analysis == result.analysis and set(run.table_names) == set(result.tables)
        for name, table in result.tables.items():
            pd.testing.assert_frame_equal(run.table(name), table, check_dtype=False, check_index_type=False)
        for name, arr in result.arrays.items():
            np.testing.assert_array_equal(run.array(name), arr)


# --------------------------------------------------------------------- 2. the real model (smollm2)

REAL_CFG = CircuitConfig(n_items=6, max_senders=10, n_random=3, batch_size=64, n_boot=200, progress=False)
N_RANDOM_ABLATION = 12  # random head sets for the ablation control (a few heads of some sets matter a lot)


@pytest.fixture(scope="module")
def smol() -> dict[str, Any]:
    """IOI prompts, caches, signatures and the staged discovery on the real model, with the senders
    screened as ``analyse_task`` screens them (attribution patching, then the ``max_senders`` best)."""
    model = real_model(probe.DEFAULT_MODEL)
    runner = Runner(model)
    data, caches, signatures = circuits.prepare(runner, "ioi", REAL_CFG)
    screen = circuits.attribution_patching(runner, caches)
    found = circuits.discover(runner, caches, "ioi", REAL_CFG, signatures, screen)
    return dict(model=model, runner=runner, data=data, caches=caches, screen=screen, found=found)


@pytest.mark.real
def test_real_model_runner_and_ioi_behaviour(smol: dict[str, Any]) -> None:
    model, runner, data, caches = smol["model"], smol["runner"], smol["data"], smol["caches"]
    group, cache = data.groups[0], caches[0]
    with torch.no_grad():
        full = model.bridge(group.clean)  # type: ignore[misc]
    final = runner.run(group.clean, end=group.roles["end"])
    assert final is not None
    rows = torch.arange(len(group))
    torch.testing.assert_close(runner.logits(final), full[rows, group.roles["end"]], atol=2e-4, rtol=1e-4)
    at_end = full[rows, group.roles["end"]]
    torch.testing.assert_close(
        cache.clean.logit_diff, at_end[rows, group.right] - at_end[rows, group.wrong], atol=2e-4, rtol=1e-4
    )
    clean = torch.cat([c.clean.logit_diff for c in caches])
    corrupt = torch.cat([c.corrupt.logit_diff for c in caches])
    assert len(clean) == REAL_CFG.n_items
    assert (clean > 0).float().mean() > 0.5, f"IO should beat S on most prompts: {clean.tolist()}"
    assert clean.mean() > 0 and clean.mean() > corrupt.mean()


@pytest.mark.real
def test_real_model_path_scores_are_finite_exactly_where_tested(smol: dict[str, Any]) -> None:
    model, found = smol["model"], smol["found"]
    tested = np.zeros((model.n_layers, model.n_heads), dtype=bool)
    for head in circuits.screened_senders(model, smol["screen"], REAL_CFG.max_senders):
        tested[head] = True
    assert tested.sum() == REAL_CFG.max_senders
    for stage in circuits.STAGES:
        assert np.array_equal(np.isfinite(found.scores[stage]), tested), stage
    assert np.abs(found.scores["logits"][tested]).max() > REAL_CFG.min_share


@pytest.mark.real
def test_real_model_name_movers_matter_more_than_random_heads(smol: dict[str, Any]) -> None:
    model, runner, caches, found = smol["model"], smol["runner"], smol["caches"], smol["found"]
    movers = found.classes["name_mover"]
    if not movers:  # the strongest logits-stage heads stand in
        logits = np.where(np.isfinite(found.scores["logits"]), found.scores["logits"], np.inf)
        movers = [
            (int(i) // model.n_heads, int(i) % model.n_heads) for i in np.argsort(logits, axis=None)[:3]
        ]
    all_heads = every_head(model)
    randoms = circuits.random_head_sets(
        model, len(movers), N_RANDOM_ABLATION, REAL_CFG.seed + 1, exclude=movers
    )
    keep = [[h for h in all_heads if h not in set(s)] for s in [movers, *randoms]]
    means = circuits.template_means(runner, caches, smol["data"].groups)
    lds = circuits.mean_ablated_logit_diff(runner, caches, means, keep, batch_size=REAL_CFG.batch_size)
    full = float(torch.cat([c.clean.logit_diff for c in caches]).double().mean())
    drops = full - lds
    assert drops[0] > 0, f"ablating {movers} should lower the logit difference ({full:.3f} -> {lds[0]:.3f})"
    assert drops[0] > drops[1:].mean(), (
        f"ablating {movers} lowers the logit difference by {drops[0]:.3f}; random sets by "
        f"{drops[1:].mean():.3f} on average ({np.round(drops[1:], 3).tolist()})"
    )


@pytest.mark.real
def test_real_model_held_out_test_of_the_movers_recomputes(smol: dict[str, Any], monkeypatch: Any) -> None:
    """The held-out name-mover row: fresh prompts on the other half of the words, null sets that
    never hold a mover, the ablations recomputed with the faithfulness code, and the verdict
    following from the numbers."""
    model, runner, found = smol["model"], smol["runner"], smol["found"]
    movers = found.classes["name_mover"] or circuits.stand_ins(found.scores["logits"])
    cfg = dataclasses.replace(REAL_CFG, n_heldout=8, n_reference=8, n_null=50)
    held = heldout.build(runner, "ioi", cfg)
    assert held.data.n_items == 8 and held.inputs.n == 8
    assert not set(held.data.answers) & set(smol["data"].answers)  # no discovery answer is reused
    calls: list[Any] = []
    original = heldout.run_sets

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        calls.append((args[3], out))
        return out

    monkeypatch.setattr(heldout, "run_sets", spy)
    table = heldout.validate(runner, "ioi", held, {"name_mover": movers}, cfg)
    sets, readings = calls[0]
    first = sets.index(list(movers))
    nulls = [s for s in sets if len(s) == len(movers) and s != list(movers)]
    assert len(nulls) >= 50 and not any(set(s) & set(movers) for s in nulls)
    row = table[(table["role"] == "name_mover") & (table["scope"] == "set")].iloc[0]
    clean = held.clean.mean()
    assert row["effect"] == pytest.approx(float(readings.logit_diff[first].mean() - clean), abs=1e-9)
    every = every_head(model)
    pick = [first, sets.index(nulls[0]), sets.index(nulls[-1])]
    keeps = [[h for h in every if h not in set(sets[i])] for i in pick]
    lds = circuits.mean_ablated_logit_diff(runner, held.caches, held.means, keeps, batch_size=cfg.batch_size)
    np.testing.assert_allclose(lds, readings.logit_diff[pick].mean(1), rtol=1e-4, atol=1e-4)
    null_means = [readings.logit_diff[sets.index(s)].mean() - clean for s in nulls]
    assert row["null_mean"] == pytest.approx(float(np.mean(null_means)), abs=1e-9)
    assert row["validated"] == (row["p_value"] <= cfg.alpha and row["effect_high"] < 0)
