"""Census views: what the census page and the census report section show, read from a run.

A census run holds the ``heads`` table (six metrics and their standard errors) and, for natural text
and the repeated random block, a few examples' tokens and full attention patterns (runs made before
the repeated ones were kept have natural text only; see docs/analyses/census.md). This module turns
them into rankings (notable first: low entropy, high values of every other metric), per-head
summaries and figures; the page and the report only arrange them. The induction and duplicate-token
patterns are drawn on the repeated block by default (:func:`default_input_set`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses import census
from analyses.runstore import Run
from dashboard.census.figures import metric_heatmaps
from dashboard.core import figures
from dashboard.core.figures import PatternScale

METRICS: tuple[str, ...] = census.METRICS
METRIC_LABELS: dict[str, str] = census.METRIC_LABELS
LOW_IS_NOTABLE = frozenset({"entropy"})
# Heads whose patterns the report draws: the clearest signatures first.
PATTERN_METRICS: tuple[str, ...] = ("induction", "prev_token", "duplicate_token", "alpha_0")

InputSet = Literal["natural", "repeated"]
INPUT_SETS: tuple[InputSet, ...] = ("natural", "repeated")
INPUT_SET_LABELS: dict[str, str] = {"natural": "natural text", "repeated": "repeated random tokens"}
# The metrics measured on the repeated block: their patterns are drawn on it by default.
REPEATED_METRICS = frozenset({"induction", "duplicate_token"})
# Where each input set's examples are kept: (tokens table, patterns array).
_EXAMPLES: dict[str, tuple[str, str]] = {
    "natural": ("examples", "example_patterns"),
    "repeated": ("repeated_examples", "repeated_patterns"),
}


def default_input_set(metric: str | None) -> InputSet:
    """The input set a metric was measured on: repeated for induction and duplicate-token, else
    natural."""
    return "repeated" if metric in REPEATED_METRICS else "natural"


def as_input_set(value: object) -> InputSet:
    """``value`` if it names an input set, else natural."""
    return "repeated" if value == "repeated" else "natural"


class PickedHead(NamedTuple):
    """A head the page or the report picked (selected, clicked, top of a metric), printed ``L{l}H{h}``."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"


def ranked_heads(heads: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``heads`` sorted notable first for ``metric`` (lowest first for entropy), NaN last."""
    if metric not in heads.columns:
        raise KeyError(f"the heads table has no column {metric!r}; its metrics are {', '.join(METRICS)}")
    ascending = metric in LOW_IS_NOTABLE
    return heads.sort_values([metric, "layer", "head"], ascending=[ascending, True, True], na_position="last")


def top_head(heads: pd.DataFrame, metric: str) -> PickedHead:
    row = ranked_heads(heads, metric).iloc[0]
    return PickedHead(int(row["layer"]), int(row["head"]))


def top_heads(heads: pd.DataFrame, metric: str, k: int = 5) -> list[tuple[PickedHead, float, float | None]]:
    """The ``k`` most notable heads for ``metric``: (head, value, standard error or None)."""
    sem = f"{metric}_sem"
    out = []
    for row in ranked_heads(heads, metric).head(k).itertuples(index=False):
        values = row._asdict()
        err = values.get(sem)
        out.append(
            (
                PickedHead(int(values["layer"]), int(values["head"])),
                float(values[metric]),
                None if err is None or pd.isna(err) else float(err),
            )
        )
    return out


def has_head(heads: pd.DataFrame, head: PickedHead) -> bool:
    return bool(((heads["layer"] == head.layer) & (heads["head"] == head.head)).any())


def head_summary(heads: pd.DataFrame, head: PickedHead) -> pd.DataFrame:
    """One row per metric for ``head``: metric, label, value, sem, rank (1 = most notable), of."""
    row = heads[(heads["layer"] == head.layer) & (heads["head"] == head.head)]
    if row.empty:
        raise KeyError(f"no head {head} in this run")
    record = row.iloc[0]
    out = []
    for metric in METRICS:
        order = ranked_heads(heads, metric)
        position = np.flatnonzero(
            (order["layer"].to_numpy() == head.layer) & (order["head"].to_numpy() == head.head)
        )
        sem = record.get(f"{metric}_sem")
        out.append(
            {
                "metric": metric,
                "label": METRIC_LABELS[metric],
                "value": float(record[metric]),
                "sem": None if sem is None or pd.isna(sem) else float(sem),
                "rank": int(position[0]) + 1,
                "of": len(order),
            }
        )
    return pd.DataFrame(out)


def heatmap(heads: pd.DataFrame, metric: str, selected: PickedHead | None = None) -> go.Figure:
    """The census's own layer x head map of ``metric`` (:func:`dashboard.census.figures.metric_heatmaps`), sized
    to the page, with the selected head outlined."""
    if metric not in METRICS:
        raise KeyError(f"unknown census metric {metric!r}; choose one of {', '.join(METRICS)}")
    fig = metric_heatmaps(heads)[metric]
    n_layers = int(heads["layer"].nunique())
    fig.update_layout(width=None, autosize=True, height=figures.heatmap_height(n_layers))
    if selected is not None:
        figures.mark_head(fig, selected.layer, selected.head)
    return fig


def example_ids(run: Run, input_set: InputSet = "natural") -> list[int]:
    """The examples of ``input_set`` whose patterns the run kept ([] when it has none:
    :func:`missing_examples` says why)."""
    table, array = _EXAMPLES[input_set]
    if table not in run.table_names or array not in run.array_names:
        return []
    return sorted(int(e) for e in run.table(table)["example"].unique())


def missing_examples(run: Run, input_set: InputSet = "natural") -> str:
    """Why ``run`` has no example patterns of ``input_set``, read from its config, with what to do."""
    n_examples = run.config.n_examples
    noun = INPUT_SET_LABELS[input_set]
    if n_examples == 0:
        return (
            "this run kept no example patterns: it was run with n_examples=0; re-run it with "
            f"headlab run census --set n_examples={census.CensusConfig().n_examples} to see them"
        )
    if input_set == "repeated" and "examples" in run.table_names:
        return (
            f"this run has no example patterns of {noun} (runs made before the census kept them have "
            "natural text only); re-run headlab run census to see the induction and duplicate-token "
            "stripes, or pick natural text"
        )
    table, array = _EXAMPLES[input_set]
    lacking = [n for n, names in ((table, run.table_names), (array, run.array_names)) if n not in names]
    return (
        f"this run is incomplete: its config says n_examples={n_examples} but it has no {' or '.join(lacking)} ({noun}); "
        f"re-run headlab run census to get a complete run"
    )


def _example_rows(run: Run, example: int, input_set: InputSet) -> pd.DataFrame:
    table = run.table(_EXAMPLES[input_set][0])
    rows = table[table["example"] == example].sort_values("position")
    if rows.empty:
        raise KeyError(
            f"run {run.run_id} has no {INPUT_SET_LABELS[input_set]} example {example}; "
            f"it has {example_ids(run, input_set)}"
        )
    return rows


def example_tokens(run: Run, example: int, input_set: InputSet = "natural") -> list[str]:
    """The tokens of ``example`` in position order (BOS included when the run prepended it)."""
    return [str(t) for t in _example_rows(run, example, input_set)["token"]]


def example_preview(run: Run, example: int, n_tokens: int = 10, input_set: InputSet = "natural") -> str:
    text = "".join(example_tokens(run, example, input_set)[:n_tokens]).replace("\n", " ").strip()
    return f"example {example}: {text[:60]}…"


def pattern(run: Run, example: int, head: PickedHead, input_set: InputSet = "natural") -> np.ndarray:
    """``[n, n]`` attention of ``head`` on ``example`` over its ``n`` real tokens (float32)."""
    patterns = run.array(_EXAMPLES[input_set][1])
    if not 0 <= example < patterns.shape[0]:
        raise KeyError(
            f"run {run.run_id} kept patterns of {patterns.shape[0]} {INPUT_SET_LABELS[input_set]} "
            f"examples, not example {example}"
        )
    n = len(example_tokens(run, example, input_set))
    return patterns[example, head.layer, head.head, :n, :n].astype(np.float32)


def pattern_figure(
    run: Run,
    example: int,
    head: PickedHead,
    *,
    scale: PatternScale = "linear",
    input_set: InputSet = "natural",
) -> go.Figure:
    tokens = example_tokens(run, example, input_set)
    where = "repeated example" if input_set == "repeated" else "example"
    return figures.pattern_figure(
        pattern(run, example, head, input_set),
        tokens,
        title=f"{head} on {where} {example} ({len(tokens)} tokens)",
        scale=scale,
    )


def pattern_heads(
    heads: pd.DataFrame, metrics: tuple[str, ...] = PATTERN_METRICS
) -> list[tuple[str, PickedHead]]:
    """The top head of each of ``metrics``, each head once: what the report draws patterns of."""
    seen: set[PickedHead] = set()
    out = []
    for metric in metrics:
        head = top_head(heads, metric)
        if head not in seen:
            seen.add(head)
            out.append((metric, head))
    return out
