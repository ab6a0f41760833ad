"""The held-out validation primitives: null sets, the permutation test, significance, evidence."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analyses import validation as v
from probe.errors import ConfigError

HEADS = [(layer, h) for layer in range(4) for h in range(3)]


def test_split_is_disjoint_seeded_and_covers_everything():
    disc, held = v.split_indices(10, 0.3, seed=1)
    assert len(held) == 3 and len(disc) == 7
    assert sorted([*disc, *held]) == list(range(10))
    again = v.split_indices(10, 0.3, seed=1)
    assert np.array_equal(again[1], held)
    with pytest.raises(ConfigError):
        v.split_indices(1, 0.5, 0)


def test_null_sets_avoid_the_tested_heads_and_enumerate_small_pools():
    tested = [(0, 0), (1, 1)]
    sets = v.null_sets(HEADS, 2, 60, seed=0, exclude=tested)
    assert len(sets) == 45  # C(10, 2) = 45 <= 60: every distinct set once
    assert len({tuple(s) for s in sets}) == 45
    assert all(not set(s) & set(tested) for s in sets)
    big = v.null_sets(HEADS, 3, 50, seed=0, exclude=tested)
    assert len(big) == 50 and all(len(set(s)) == 3 for s in big)
    assert all(not set(s) & set(tested) for s in big)
    with pytest.raises(ConfigError, match="fewer than the set size"):
        v.null_sets(HEADS, 11, 50, seed=0, exclude=tested)


def test_row_percentile_p_value_and_validation():
    null = np.arange(99, dtype=float)  # 0 .. 98
    inputs = v.Inputs("held-out prompts", 8, "seed 5")
    strong = v.test_row(
        "mover", [(1, 2)], np.full(8, -200.0), -null, measure="drop", direction="lower", inputs=inputs
    )
    assert strong["percentile"] == 100.0 and strong["p_value"] == pytest.approx(1 / 100)
    assert strong["validated"] and strong["inputs"] == "held-out prompts (n=8; seed 5)"
    # beats 95 of 99 null sets (the effect -95 lies below null values -94 .. 0): p = (1 + 4) / 100
    mid = v.test_row("m", [(1, 2)], np.full(8, -94.5), -null, measure="d", direction="lower", inputs=inputs)
    assert mid["percentile"] == pytest.approx(100 * 95 / 99)
    assert mid["p_value"] == pytest.approx(5 / 100) and mid["validated"]
    weak = v.test_row("m", [(1, 2)], np.full(8, -50.0), -null, measure="d", direction="lower", inputs=inputs)
    assert not weak["validated"] and weak["p_value"] > 0.05
    # strong against the null but the interval crosses zero: not validated
    noisy = v.test_row(
        "m",
        [(1, 2)],
        np.array([-30.0, 29.0, -30.0, 29.0]),
        null + 1,
        measure="d",
        direction="lower",
        inputs=inputs,
    )
    assert noisy["percentile"] == 100.0 and not noisy["validated"]
    up = v.test_row("neg", [(0, 1)], np.full(4, 200.0), null, measure="d", direction="higher", inputs=inputs)
    assert up["validated"] and up["percentile"] == 100.0


def test_significance_finds_the_planted_heads_only():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (40, 30))
    x[:, 3] += 2.0
    x[:, 7] -= 2.0
    x[:, 11] = np.nan
    up, p = v.significant(x, "higher")
    assert np.flatnonzero(up).tolist() == [3] and p[11] == 1.0
    down, _ = v.significant(x, "lower")
    assert np.flatnonzero(down).tolist() == [7]
    const = np.zeros((5, 2))
    const[:, 0] = 1.0
    ok, _ = v.significant(const, "higher", correction="none")
    assert ok.tolist() == [True, False]


def test_evidence_columns_prefer_a_heads_own_test():
    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1]})
    inputs = v.Inputs("held-out", 4)
    rows = [
        v.test_row(
            "mover",
            [(0, 1), (1, 0)],
            np.full(4, -3.0),
            np.zeros(60),
            measure="d",
            direction="lower",
            inputs=inputs,
        ),
        v.test_row(
            "mover",
            [(1, 0)],
            np.full(4, 1.0),
            np.zeros(60),
            measure="d",
            direction="lower",
            inputs=inputs,
            scope="head",
        ),
        v.test_row(
            "backup", [(1, 0)], np.full(4, 2.0), np.zeros(60), measure="d", direction="higher", inputs=inputs
        ),
    ]
    table = v.frame(rows)
    out = v.evidence_columns(heads, table, "ioi")
    assert out["ioi_role"].tolist() == ["", "mover", "mover+backup", ""]
    assert out["ioi_validated"].tolist() == [False, True, False, False]
    assert out["ioi_effect"].iloc[1] == -3.0 and out["ioi_effect"].iloc[2] == 1.0
    assert math.isnan(out["ioi_effect"].iloc[0]) and out["ioi_validated_on"].iloc[1] == "held-out (n=4)"


def test_check_null_refuses_small_nulls():
    with pytest.raises(ConfigError, match="at least 50"):
        v.check_null(20)
    v.check_null(50)
