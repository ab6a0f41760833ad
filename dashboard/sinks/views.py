"""Sink views: what the sinks page and the sinks report section show, read from a sinks run.

A sinks run holds, per input set, the ``summary`` (Sink_1), the per-position sink map, per-head
alpha_0 and sink rates, the hidden sinks and their tokens, the norms and a few examples (see
docs/analyses/sinks.md). This module turns them into figures and small tables; the page and the
report only arrange them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses import sinks
from analyses.runstore import Run
from dashboard.core import figures
from dashboard.sinks import figures as sink_figures

HeadQuantity = Literal["alpha", "rate"]
HEAD_QUANTITIES: tuple[HeadQuantity, ...] = ("alpha", "rate")
HEAD_QUANTITY_LABELS = {
    "alpha": "mean alpha_k over samples",
    "rate": "share of samples with alpha_k > eps",
}
INPUT_LABELS = sinks.INPUT_LABELS


def input_sets(run: Run) -> list[str]:
    """The input sets the run measured, in the analysis's order."""
    present = set(run.table("summary")["input_set"])
    return [s for s in sinks.INPUT_SETS if s in present]


def eps(run: Run) -> float:
    return float(run.table("summary")["eps"].iloc[0])


def seq_len(run: Run) -> int:
    return int(run.table("summary")["seq_len"].iloc[0])


def _check_set(run: Run, input_set: str) -> None:
    if input_set not in input_sets(run):
        raise KeyError(
            f"run {run.run_id} has no input set {input_set!r}; it has {', '.join(input_sets(run))}"
        )


def head_map(run: Run, input_set: str, quantity: HeadQuantity, position: int) -> np.ndarray:
    """``[L, H]``: mean ``alpha_position`` (``alpha``) or the share of samples where it exceeds eps
    (``rate``), for every head."""
    _check_set(run, input_set)
    if quantity not in HEAD_QUANTITIES:
        raise KeyError(f"unknown quantity {quantity!r}; choose from {', '.join(HEAD_QUANTITIES)}")
    arr = run.array(f"{'alpha' if quantity == 'alpha' else 'sink_rate'}_{input_set}")
    if not 0 <= position < arr.shape[-1]:
        raise KeyError(f"position {position} is outside 0..{arr.shape[-1] - 1}")
    return np.asarray(arr[..., position], dtype=np.float64)


def heatmap(
    run: Run,
    input_set: str,
    quantity: HeadQuantity = "alpha",
    position: int = 0,
    selected: tuple[int, int] | None = None,
) -> go.Figure:
    """Layer x head map of :func:`head_map` on a fixed 0..1 colour scale."""
    z = head_map(run, input_set, quantity, position)
    where = " (first real token)" if position == 0 else ""
    label = "alpha_k" if quantity == "alpha" else "P(alpha_k > eps)"
    what = "mean alpha" if quantity == "alpha" else "P(alpha > eps)"
    title = f"{what} at k = {position}{where}"
    fig = sink_figures.heatmap_grid(z, title=title, label=label, subtitle=INPUT_LABELS[input_set])
    fig.update_layout(height=figures.heatmap_height(z.shape[0]))
    if selected is not None:
        figures.mark_head(fig, selected[0], selected[1])
    return fig


def sink_bars(run: Run) -> go.Figure:
    """Sink_1 (% of heads whose alpha_0 > eps, averaged over samples) per input set, ± sem."""
    table = run.table("summary")
    order = [s for s in sinks.INPUT_SETS if s in set(table["input_set"])]
    table = table.set_index("input_set").loc[order]
    fig = go.Figure(
        go.Bar(
            x=[INPUT_LABELS[s] for s in order],
            y=table["sink_1"],
            error_y={"type": "data", "array": table["sink_1_sem"], "visible": True},
            text=[f"{v:.2f}%" for v in table["sink_1"]],
            textposition="outside",
            marker_color="#31688e",
            hovertemplate="%{x}<br>Sink_1 = %{y:.2f}%<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": f"Sink_1 (eps {eps(run):g})", "x": 0.02},
        yaxis={"title": {"text": "% of heads"}, "range": [0, 105]},
        height=360,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def position_map(run: Run, highlight: str | None = None) -> go.Figure:
    """The per-position sink map of every input set, ``highlight`` drawn bold."""
    fig = sink_figures.sink_map_figure(run.table("positions"), highlight=highlight)
    return fig


def has_norms(run: Run) -> bool:
    return "norms" in run.table_names


def norms_figure(run: Run, input_set: str | None = None) -> go.Figure:
    """First token vs other tokens per layer: of ``input_set`` (default: every set, one row each)."""
    if not has_norms(run):
        return figures.message_figure("this run measured no norms (norms=False)")
    if input_set is not None:
        _check_set(run, input_set)
    return sink_figures.norms_figure(run.table("norms"), None if input_set is None else [input_set])


def norm_ratios(run: Run, input_set: str) -> pd.DataFrame:
    """One row per layer: the first token's norm / the others' for hidden state, key and value."""
    norms = run.table("norms")
    part = norms[norms["input_set"] == input_set]
    return part.pivot(index="layer", columns="quantity", values="ratio")[list(sinks.QUANTITIES)].reset_index()


def example_ids(run: Run, input_set: str) -> list[int]:
    if "examples" not in run.table_names:
        return []
    table = run.table("examples")
    return sorted(int(e) for e in table[table["input_set"] == input_set]["example"].unique())


def missing_examples(run: Run, input_set: str) -> str:
    """Why ``run`` has no examples of ``input_set``, read from its config, with what to do."""
    n_examples = run.config.n_examples
    if n_examples == 0:
        return (
            "this run kept no examples: it was run with n_examples=0; re-run it with "
            f"headlab run sinks --set n_examples={sinks.SinksConfig().n_examples} to see them"
        )
    where = "has no examples table" if "examples" not in run.table_names else f"has no {input_set} examples"
    return (
        f"this run is incomplete: its config says n_examples={n_examples} but it {where}; "
        "re-run headlab run sinks to get a complete run"
    )


def example_rows(run: Run, input_set: str, example: int) -> pd.DataFrame:
    """The example's positions: token, share of heads for which it is a sink, mean and max alpha."""
    table = run.table("examples")
    rows = table[(table["input_set"] == input_set) & (table["example"] == example)].sort_values("position")
    if rows.empty:
        raise KeyError(
            f"run {run.run_id} has no {input_set} example {example}; it has {example_ids(run, input_set)}"
        )
    return rows.reset_index(drop=True)


def example_preview(run: Run, input_set: str, example: int, n_tokens: int = 10) -> str:
    tokens = example_rows(run, input_set, example)["token"].tolist()
    text = "".join(str(t) for t in tokens[:n_tokens]).replace("\n", " ").strip()
    return f"example {example}: {text[:50]}…"


def example_figure(run: Run, input_set: str, example: int) -> go.Figure:
    """Per position of one example: the share of heads for which it is a sink (bars; hidden-sink
    candidates beyond the first token in orange), with the tokens on the axis."""
    rows = example_rows(run, input_set, example)
    positions = run.table("positions")
    eligible = set(
        positions[(positions["input_set"] == input_set) & positions["hidden_eligible"]]["position"].astype(
            int
        )
    )
    min_share = 100.0 * float(run.config.hidden_min_share)
    labels = [figures.token_label(str(t)) for t in rows["token"]]
    colours = [
        "#31688e" if p == 0 else ("#e4572e" if p in eligible and s >= min_share else "#9fb4c7")
        for p, s in zip(rows["position"], rows["sink_pct"], strict=True)
    ]
    fig = go.Figure(
        go.Bar(
            x=rows["position"],
            y=rows["sink_pct"],
            marker_color=colours,
            customdata=np.stack([labels, rows["alpha_max"].round(3).astype(str)], axis=-1),
            hovertemplate="position %{x} %{customdata[0]}<br>sink for %{y:.1f}% of heads"
            "<br>max alpha over heads %{customdata[1]}<extra></extra>",
        )
    )
    fig.add_hline(y=min_share, line_dash="dot", line_color="#e4572e")
    show_ticks = len(rows) <= 80
    fig.update_layout(
        title={
            "text": f"{INPUT_LABELS[input_set]}, example {example}: % of heads with alpha_k > eps",
            "x": 0.02,
            "subtitle": {
                "text": f"orange: hidden sinks (>= {min_share:g}% of heads, seen by enough queries)"
            },
        },
        xaxis={
            "title": {"text": "position k (token)"},
            "tickvals": list(rows["position"]) if show_ticks else None,
            "ticktext": labels if show_ticks else None,
            "tickangle": -60,
            "tickfont": {"size": 9},
        },
        yaxis={"title": {"text": "% of heads"}, "range": [0, 100]},
        height=460,
        margin={"l": 60, "r": 20, "t": 70, "b": 110},
    )
    return fig


def hidden_sinks_of_example(run: Run, input_set: str, example: int) -> pd.DataFrame:
    """The listed hidden sinks (position, token, % of heads) of one example (sample index)."""
    table = run.table("hidden_sinks")
    part = table[(table["input_set"] == input_set) & (table["sample"] == example)]
    return part[["position", "token", "sink_pct", "n_heads"]].sort_values("position").reset_index(drop=True)


def top_hidden_tokens(run: Run, input_set: str, k: int = 12) -> pd.DataFrame:
    """Tokens most often listed as hidden sinks (then by mean share of heads), at most ``k``."""
    table = run.table("hidden_tokens")
    part = table[table["input_set"] == input_set]
    part = part[part["sink_occurrences"] > 0]
    return (
        part.sort_values(["sink_occurrences", "mean_sink_pct"], ascending=[False, False])
        .head(k)
        .reset_index(drop=True)
    )


def top_hidden_positions(run: Run, input_set: str, k: int = 8) -> pd.DataFrame:
    """Eligible positions ``k >= 1`` with the highest Sink_k."""
    positions = run.table("positions")
    part = positions[(positions["input_set"] == input_set) & positions["hidden_eligible"]]
    return part.sort_values("sink_pct", ascending=False).head(k)[["position", "sink_pct", "sink_pct_sem"]]
