"""Atlases of several models side by side (what :func:`analyses.atlas.compare` computes), drawn.

The models are put on one axis by relative depth (layer / layers): for one role, the share of each
model's heads that have it in each depth bin, one line per model; for one key metric, each model's
distribution over its heads as a box (25–75 %, median, mean) with whiskers at 10 and 90 %. A role or
metric a model's atlas lacks (no joined run gives it) is absent for that model, never drawn as 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go

from analyses.atlas import compare
from dashboard.core import common, figures

MODEL_COLOURS = ("#31688e", "#e4572e", "#2a9d8f", "#8f5fbf", "#e9a23b", "#5b6475", "#c2185b", "#35b779")
Tables = dict[str, pd.DataFrame]


def tables(atlases: Sequence[common.Source], depth_bins: int = 5) -> Tables:
    """``role_totals``, ``role_depth`` and ``metrics`` of the atlases (one per model)."""
    return compare(list(atlases), depth_bins)


def models(frames: Tables) -> list[str]:
    """The models compared, in the order given."""
    return list(dict.fromkeys(frames["role_totals"]["model"].tolist() + frames["metrics"]["model"].tolist()))


def colours(names: Sequence[str]) -> dict[str, str]:
    return {m: MODEL_COLOURS[i % len(MODEL_COLOURS)] for i, m in enumerate(names)}


def roles(frames: Tables) -> list[str]:
    """Every role some model's atlas gives, most heads (over the models) first."""
    totals = frames["role_totals"].groupby("role", sort=False)["n_heads"].sum()
    return totals.sort_values(ascending=False, kind="stable").index.tolist()


def metrics(frames: Tables) -> list[str]:
    """Every key metric some model's atlas has, in first-seen order."""
    return list(dict.fromkeys(frames["metrics"]["metric"].tolist()))


def _missing(frames: Tables, present: set[str]) -> str:
    lacking = [m for m in models(frames) if m not in present]
    return f" Not given by the runs of: {', '.join(lacking)}." if lacking else ""


def depth_figure(frames: Tables, role: str) -> go.Figure:
    """Share of each model's heads with ``role`` per relative-depth bin: one line per model."""
    depth = frames["role_depth"]
    rows = depth[(depth["role"] == role) & (depth["heads"] > 0)]  # a bin no layer falls in: no point
    if rows.empty:
        return figures.message_figure(f"no model's atlas gives the role {role!r}")
    palette = colours(models(frames))
    fig = go.Figure()
    for model, own in rows.groupby("model", sort=False):
        own = own.sort_values("bin")
        middle = (own["depth_low"] + own["depth_high"]) / 2
        fig.add_trace(
            go.Scatter(
                x=middle.tolist(),
                y=own["share"].tolist(),
                mode="lines+markers",
                name=str(model),
                line={"color": palette[str(model)], "width": 2},
                customdata=own[["with_role", "heads", "depth_low", "depth_high"]].to_numpy(),
                hovertemplate=(
                    f"{model}<br>depth %{{customdata[2]:.2f}}–%{{customdata[3]:.2f}}: "
                    "%{customdata[0]} of %{customdata[1]} heads (%{y:.0%})<extra></extra>"
                ),
            )
        )
    n_bins = int(depth["bin"].max()) + 1 if len(depth) else 0
    fig.update_layout(
        title=figures.titled(
            f"Heads with the role {role}, by relative depth",
            f"Share of each model's heads in each of {n_bins} relative-depth bins (layer / layers)."
            + _missing(frames, set(rows["model"])),
        ),
        xaxis={"title": {"text": "relative depth"}, "range": [0, 1], "tickformat": ".1f"},
        yaxis={"title": {"text": "share of the bin's heads"}, "tickformat": ".0%", "rangemode": "tozero"},
        height=420,
        margin={"l": 70, "r": 20, "t": 70, "b": 50},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 1, "xanchor": "right"},
        plot_bgcolor="#ffffff",
    )
    fig.update_xaxes(showgrid=True, gridcolor="#eceef2")
    fig.update_yaxes(showgrid=True, gridcolor="#eceef2")
    return fig


def distribution_figure(frames: Tables, metric: str) -> go.Figure:
    """``metric`` over each model's heads: one box per model (quartiles, median, mean; whiskers at
    the 10th and 90th percentiles)."""
    dist = frames["metrics"]
    rows = dist[(dist["metric"] == metric) & (dist["n"] > 0)]
    if rows.empty:
        return figures.message_figure(f"no model's atlas has values of {metric!r}")
    palette = colours(models(frames))
    fig = go.Figure()
    for r in rows.itertuples(index=False):
        fig.add_trace(
            go.Box(
                x=[str(r.model)],
                q1=[r.q25],
                median=[r.q50],
                q3=[r.q75],
                lowerfence=[r.q10],
                upperfence=[r.q90],
                mean=[r.mean],
                name=str(r.model),
                marker={"color": palette[str(r.model)]},
                hovertemplate=f"{r.model} ({int(r.n)} heads)<extra></extra>",
            )
        )
    fig.update_layout(
        title=figures.titled(
            f"{metric} across each model's heads",
            "Box: 25–75 % with the median (dashed: mean); whiskers: 10 and 90 %."
            + _missing(frames, set(rows["model"])),
        ),
        yaxis={"title": {"text": metric}},
        height=420,
        margin={"l": 70, "r": 20, "t": 70, "b": 50},
        showlegend=False,
        plot_bgcolor="#ffffff",
    )
    fig.update_yaxes(showgrid=True, gridcolor="#eceef2")
    return fig


def totals_table(frames: Tables) -> pd.DataFrame:
    """Heads per role (rows) and model (columns) as ``n (share)``; blank where the model's atlas
    has no run giving the role."""
    totals = frames["role_totals"]
    if totals.empty:
        return pd.DataFrame(columns=["role"])
    totals = totals.assign(
        text=[f"{int(n)} ({s:.0%})" for n, s in zip(totals["n_heads"], totals["share"], strict=True)]
    )
    wide = totals.pivot(index="role", columns="model", values="text").reindex(roles(frames))
    wide = wide.reindex(columns=[m for m in models(frames) if m in wide.columns]).fillna("")
    return wide.reset_index()


__all__ = ["depth_figure", "distribution_figure", "metrics", "models", "roles", "tables", "totals_table"]
