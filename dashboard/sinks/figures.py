"""Figures of a sinks run's tables: per-head alpha maps, the per-position sink map and the norms.

The sinks views (:mod:`dashboard.sinks.views`) draw the dashboard page and the report with these;
notebooks can call them on an unsaved result's tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.sinks import INPUT_LABELS, INPUT_SETS, QUANTITIES, QUANTITY_LABELS


def overview_figures(
    heads: pd.DataFrame,
    positions: pd.DataFrame | None = None,
    norms: pd.DataFrame | None = None,
) -> dict[str, go.Figure]:
    """Plotly figures: ``alpha0_<set>`` (per-head first-token alpha maps, one per input set),
    ``sink_map`` (Sink_k per position and input set), ``norms`` (first token vs others per layer)."""
    figs: dict[str, go.Figure] = {}
    for input_set in INPUT_SETS:
        column = f"alpha0_{input_set}"
        if column in heads.columns:
            figs[column] = alpha_heatmap(
                heads, column, title="alpha_0 per head", subtitle=INPUT_LABELS[input_set]
            )
    if positions is not None and len(positions):
        figs["sink_map"] = sink_map_figure(positions)
    if norms is not None and len(norms):
        figs["norms"] = norms_figure(norms)
    return figs


def alpha_heatmap(heads: pd.DataFrame, column: str, *, title: str = "", subtitle: str = "") -> go.Figure:
    """Layer x head heat map of ``heads[column]`` on a fixed 0..1 scale (alpha and rates)."""
    grid = heads.pivot(index="layer", columns="head", values=column)
    return heatmap_grid(grid.to_numpy(), title=title or column, label=column, subtitle=subtitle)


def heatmap_grid(
    z: np.ndarray, *, title: str, label: str, zmax: float = 1.0, subtitle: str = ""
) -> go.Figure:
    """Layer x head heat map of ``z`` ``[L, H]`` (layer 0 at the top), colours fixed to ``0..zmax``."""
    n_layers, n_heads = z.shape
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(h) for h in range(n_heads)],
            y=[str(layer) for layer in range(n_layers)],
            zmin=0.0,
            zmax=zmax,
            colorscale="Viridis",
            colorbar={"title": {"text": label}},
            hovertemplate="layer %{y}, head %{x}<br>" + label + " = %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": title, "x": 0.02, "subtitle": {"text": subtitle}},
        xaxis_title="head",
        yaxis_title="layer",
        yaxis={"autorange": "reversed"},
        height=int(min(900, max(320, 110 + 16 * n_layers))),
        margin={"l": 60, "r": 20, "t": 70 if subtitle else 50, "b": 50},
    )
    return fig


def sink_map_figure(positions: pd.DataFrame, *, highlight: str | None = None) -> go.Figure:
    """Sink_k^eps (% of heads, averaged over samples) against position k, one line per input set."""
    fig = go.Figure()
    for input_set in [s for s in INPUT_SETS if s in set(positions["input_set"])]:
        part = positions[positions["input_set"] == input_set].sort_values("position")
        fig.add_trace(
            go.Scatter(
                x=part["position"],
                y=part["sink_pct"],
                error_y={"type": "data", "array": part["sink_pct_sem"], "visible": True, "thickness": 1},
                mode="lines+markers",
                name=INPUT_LABELS[input_set],
                line={"width": 3 if input_set == highlight else 1.5},
                opacity=1.0 if highlight in (None, input_set) else 0.45,
                hovertemplate="position %{x}<br>Sink = %{y:.2f}% of heads<extra>" + input_set + "</extra>",
            )
        )
    fig.update_layout(
        title={"text": "Sink_k per position: % of heads with alpha_k > eps", "x": 0.02},
        xaxis_title="position k (0 = first real token)",
        yaxis_title="% of heads",
        height=420,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def norms_figure(norms: pd.DataFrame, input_sets: Sequence[str] | None = None) -> go.Figure:
    """Per layer, the first real token's norm (solid) and the other tokens' mean norm (dotted): one
    row per input set (``input_sets``, default all in the table), one column per quantity (hidden
    state, key, value); log scale. Rows keep the sets apart: their curves overlap (on repeated
    tokens every token carries the first token's state)."""
    present = set(norms["input_set"])
    sets = [s for s in (input_sets or INPUT_SETS) if s in present]
    if not sets:
        raise KeyError(f"the norms table has no input set among {list(input_sets or INPUT_SETS)}")
    titles = [f"{QUANTITY_LABELS[q]}: {s}" for s in sets for q in QUANTITIES]
    fig = make_subplots(rows=len(sets), cols=3, subplot_titles=titles, vertical_spacing=0.3 / len(sets))
    colours = {"sink_norm": "#e4572e", "other_norm": "#31688e"}
    for i, input_set in enumerate(sets):
        for j, quantity in enumerate(QUANTITIES):
            part = norms[(norms["input_set"] == input_set) & (norms["quantity"] == quantity)]
            part = part.sort_values("layer")
            for column, dash, who in (
                ("sink_norm", "solid", "first token"),
                ("other_norm", "dot", "other tokens"),
            ):
                fig.add_trace(
                    go.Scatter(
                        x=part["layer"],
                        y=part[column],
                        mode="lines+markers",
                        line={"color": colours[column], "dash": dash},
                        marker={"size": 4},
                        name=who,
                        legendgroup=who,
                        showlegend=i == 0 and j == 0,
                        hovertemplate=f"layer %{{x}}<br>{who} ‖{quantity}‖ = %{{y:.3g}}<extra>{input_set}</extra>",
                    ),
                    row=i + 1,
                    col=j + 1,
                )
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="layer", row=len(sets))
    # Whole layers only (plotly would tick 0.5, 1.5 on a short axis): about ten ticks at most.
    n_layers = int(norms["layer"].max()) + 1 if len(norms) else 1
    fig.update_xaxes(tick0=0, dtick=max(1, -(-n_layers // 10)))
    fig.update_yaxes(title_text="L2 norm", col=1)
    fig.update_layout(
        title={"text": "L2 norms: first real token (solid) vs mean of the other tokens (dotted)", "x": 0.02},
        height=150 + 280 * len(sets),
        margin={"l": 60, "r": 20, "t": 80, "b": 90},
        legend={"orientation": "h", "yref": "container", "y": 0.01, "yanchor": "bottom", "x": 0.0},
    )
    return fig
