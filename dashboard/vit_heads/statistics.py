"""The importance statistics of a vit-heads run, for the ViT page and report: each head's interval
over images, how concentrated importance is against a shuffled null, how the other metrics rank the
heads against the exact cosine drop, and the run's held-out validation table.
See docs/analyses/vit-heads.md (importance statistics).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses.vit_heads import IMPORTANCE_METRICS
from dashboard.core import common, figures
from dashboard.core.common import Source

ANALYSIS = "vit-heads"
METRICS: tuple[str, ...] = IMPORTANCE_METRICS
METRIC_NAMES = {
    "accuracy_drop": "accuracy drop",
    "confidence_drop": "confidence drop",
    "cosine_drop": "cosine drop",
    "grad_importance": "gradient importance",
}
BLUE = "#31688e"
ORANGE = "#e4572e"


def table(source: Source, name: str) -> pd.DataFrame:
    return common.table(source, name, kind=ANALYSIS)


def heads(source: Source) -> pd.DataFrame:
    return table(source, "heads")


def has_intervals(source: Source) -> bool:
    """Whether the run has intervals over images (runs saved before them have not)."""
    return "cosine_drop_low" in heads(source).columns


def interval_figure(source: Source, metric: str, k: int = 15) -> go.Figure:
    """The ``k`` pruned heads with the largest ``metric``, each with its 95% bootstrap interval over
    the discovery images (dark: the interval excludes 0)."""
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if not has_intervals(source):
        return figures.message_figure("This run has no intervals over images; re-run headlab run vit-heads.")
    h = heads(source)
    finite = np.isfinite(h[metric].astype(float)) & np.isfinite(h[f"{metric}_low"].astype(float))
    h = h[finite].nlargest(k, metric).iloc[::-1]
    values = h[metric].to_numpy(dtype=float)
    low, high = h[f"{metric}_low"].to_numpy(dtype=float), h[f"{metric}_high"].to_numpy(dtype=float)
    clear = (low > 0) | (high < 0)
    labels = [f"L{int(r.layer)}H{int(r.head)}" for r in h.itertuples(index=False)]
    fig = go.Figure(
        go.Scatter(
            x=values,
            y=labels,
            mode="markers",
            marker={"color": [BLUE if c else "#9fb4c7" for c in clear], "size": 8},
            error_x=figures.error_bars(values, low, high),
            customdata=np.stack([low, high], axis=1),
            hovertemplate="%{y}: %{x:.4g} [%{customdata[0]:.4g}, %{customdata[1]:.4g}]<extra></extra>",
        )
    )
    fig.add_vline(x=0, line={"color": "#888", "dash": "dot"})
    n_images = int(getattr(source, "notes", {}).get("statistics", {}).get("discovery_images", 0))
    fig.update_layout(
        title=figures.titled(
            f"Top {len(h)} heads by {METRIC_NAMES[metric]}",
            f"mean over {n_images} discovery images, 95% bootstrap interval; dark: excludes 0",
        ),
        xaxis={"title": {"text": METRIC_NAMES[metric]}},
        height=120 + 22 * len(h),
        margin={"l": 70, "r": 20, "t": 80, "b": 50},
        showlegend=False,
    )
    return fig


def concentration_figure(source: Source) -> go.Figure:
    """Per metric, the share of the total effect held by the top heads (with its interval over
    images) against the same share when each image's effects are shuffled over the heads."""
    if "concentration" not in source.table_names:
        return figures.message_figure("This run has no concentration table; re-run headlab run vit-heads.")
    t = table(source, "concentration")
    names = [METRIC_NAMES.get(str(m), str(m)) for m in t["metric"]]
    share = t["share"].to_numpy(dtype=float)
    null = t["null_mean"].to_numpy(dtype=float)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=null,
            y=names,
            mode="markers",
            marker={"color": "#999", "size": 9, "symbol": "line-ns-open"},
            error_x=figures.error_bars(null, t["null_low"], t["null_high"]),
            name="heads shuffled per image (null, 95% range)",
            hovertemplate="%{y}: null %{x:.1%}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=share,
            y=names,
            mode="markers",
            marker={"color": ORANGE, "size": 10},
            error_x=figures.error_bars(share, t["share_low"], t["share_high"]),
            customdata=t["p_value"],
            name="the run (95% bootstrap interval)",
            hovertemplate="%{y}: %{x:.1%} (p = %{customdata:.2g})<extra></extra>",
        )
    )
    top = int(t["top_heads"].max()) if len(t) else 0
    n = int(t["n_heads"].max()) if len(t) else 0
    fig.update_layout(
        title=figures.titled(
            "How concentrated is importance?", f"share of the total held by the top {top} of {n} heads"
        ),
        xaxis={"title": {"text": "share of the total"}, "tickformat": ".0%", "rangemode": "tozero"},
        height=360,
        margin={"l": 150, "r": 20, "t": 80, "b": 50},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def ranking_lines(source: Source) -> list[str]:
    """Sentences on how the other metrics rank the heads against the exact cosine drop."""
    if "ranking" not in source.table_names:
        return []
    return [
        f"{METRIC_NAMES.get(str(r.metric), str(r.metric))} against the exact {METRIC_NAMES.get(str(r.reference))} "
        f"over {int(r.n_heads)} heads: Spearman {float(r.spearman):.2f}; it finds {int(r.top_found)} of the top "
        f"{int(r.top_heads)} and ranks {r.reference_best}, the largest, #{int(r.best_rank)}."
        for r in table(source, "ranking").itertuples(index=False)
    ]


def validation_table(source: Source) -> pd.DataFrame | None:
    """The run's ``validation`` table (None for runs saved before it)."""
    return table(source, "validation") if "validation" in source.table_names else None
