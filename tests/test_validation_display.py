"""The shared display of held-out validation: terminal lines, figure, dashboard block, report."""

from __future__ import annotations

import numpy as np

from analyses import validation as v
from dashboard.core import validation as show


def _table():
    inputs = v.Inputs("held-out IOI prompts", 6, "seed 7")
    rows = [
        v.test_row(
            "name_mover",
            [(9, 9), (10, 0)],
            np.full(6, -2.0),
            np.linspace(-0.5, 0.5, 60),
            measure="logit-diff change",
            direction="lower",
            inputs=inputs,
            task="ioi",
        ),
        v.test_row(
            "negative_mover",
            [(11, 10)],
            np.array([0.1, -0.1] * 3),
            np.linspace(-0.5, 0.5, 60),
            measure="logit-diff change",
            direction="higher",
            inputs=inputs,
            task="ioi",
        ),
    ]
    return v.frame(rows, extra=("task",))


def test_summary_lines_name_every_test_and_its_verdict():
    lines = show.summary_lines(_table())
    assert "60 random same-size sets" in lines[0]
    assert "ioi · name_mover [L9H9 L10H0]" in lines[1] and lines[1].endswith(": validated")
    assert "percentile 100" in lines[1]
    assert lines[2].endswith("NOT validated")
    assert show.summary_lines(v.frame([])) == []


def test_figure_colours_each_test_by_its_verdict():
    fig = show.validation_figure(_table())
    names = [t.name for t in fig.data]
    assert names == ["null: 5–95% of random sets", "null mean", "validated", "not validated"]
    assert list(fig.data[2].y) == ["ioi · name_mover [L9H9 L10H0]"] and fig.data[2].x[0] == -2.0
    assert fig.data[0].base[0] < 0 < fig.data[0].base[0] + fig.data[0].x[0]


def test_block_has_a_row_per_test():
    block = show.validation_block(_table())
    table = block.children[2]
    assert len(table.children[1].children) == 2
    assert [c.children for c in table.children[0].children.children][:2] == ["task", "role"]
