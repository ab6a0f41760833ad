"""Figures of a census run's ``heads`` table: one layer x head heat map per metric."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from analyses.census import METRIC_LABELS, METRICS


def metric_heatmaps(heads: pd.DataFrame) -> dict[str, go.Figure]:
    """One layer x head heat map per metric (plotly figures)."""
    figs: dict[str, go.Figure] = {}
    for metric in METRICS:
        grid = heads.pivot(index="layer", columns="head", values=metric)
        fig = go.Figure(
            go.Heatmap(
                z=grid.values,
                x=[str(h) for h in grid.columns],
                y=[str(layer) for layer in grid.index],
                colorscale="Viridis",
                colorbar={"title": metric},
                hovertemplate="layer %{y}, head %{x}<br>" + metric + " = %{z:.3f}<extra></extra>",
            )
        )
        fig.update_layout(
            title=METRIC_LABELS[metric],
            xaxis_title="head",
            yaxis_title="layer",
            height=520,
            width=520,
            yaxis={"autorange": "reversed"},
            margin={"l": 60, "r": 20, "t": 50, "b": 50},
        )
        figs[metric] = fig
    return figs
