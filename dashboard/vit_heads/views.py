"""ViT head views: the figures and sentences of the ViT page and the vit-heads report, read from a
``vit-heads`` run (its ``heads``, ``agreement``, ``probes``, ``distance``, ``attention_trend`` and
cluster tables, the ``offset_maps`` and ``cluster_prototypes`` arrays, and the display patterns of
the overlay). Every function takes a saved run or the unsaved result alike, so a notebook draws a
result before saving it. See docs/analyses/vit-heads.md (dashboard and report).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses import vit_heads
from analyses.vit_heads import DISPLAY_HINT, METRIC_LABELS, VitHeadsConfig
from dashboard.core import common, figures
from dashboard.core.common import Source
from dashboard.core.common import table as _table
from dashboard.vit_heads.statistics import (
    METRIC_NAMES,
    METRICS,
    ranking_lines,
    validation_table,
)

ANALYSIS = "vit-heads"
TREND_METRICS: tuple[str, ...] = (
    "mean_attention_distance",
    "patch_share",
    "self_strength",
    "neighbour_strength",
)
TREND_LABELS = {
    "mean_attention_distance": "mean attention distance (patches)",
    "patch_share": "share of attention on patches (not CLS)",
    "self_strength": "attention to the query's own patch",
    "neighbour_strength": "attention per patch at distance 1",
}
# The y axis of the per-layer figure: short, so that it fits the plot's height (the title says the rest).
TREND_UNITS = {
    "mean_attention_distance": "distance (patches)",
    "patch_share": "share on patches",
    "self_strength": "attention to self",
    "neighbour_strength": "attention per patch",
}
REQUIRED_TABLES = frozenset({"heads", "agreement", "distance", "attention_trend"})
BLUE = "#31688e"
ORANGE = "#e4572e"


def table(source: Source, name: str) -> pd.DataFrame:
    return _table(source, name, kind=ANALYSIS)


def array(source: Source, name: str) -> np.ndarray:
    return common.array(source, name, kind=ANALYSIS)


has_array = common.has_array


def is_vit(source: Source) -> bool:
    """Whether the source has the tables this module reads."""
    return common.has_tables(source, REQUIRED_TABLES)


def heads(source: Source) -> pd.DataFrame:
    return table(source, "heads")


def head_key(layer: int, head: int) -> str:
    return f"{int(layer)}-{int(head)}"


def parse_head(key: str | None) -> tuple[int, int] | None:
    """``"3-7"`` → (3, 7); None for anything else."""
    if not isinstance(key, str) or key.count("-") != 1:
        return None
    a, b = key.split("-")
    return (int(a), int(b)) if a.isdigit() and b.isdigit() else None


def head_options(source: Source) -> list[dict[str, str]]:
    """Every head as a dropdown option (pruned heads marked)."""
    h = heads(source)
    return [
        {
            "label": f"L{int(r.layer)} H{int(r.head)}" + (" (pruned)" if bool(r.pruned) else ""),
            "value": head_key(int(r.layer), int(r.head)),
        }
        for r in h.itertuples(index=False)
    ]


def default_head(source: Source) -> tuple[int, int]:
    """The head with the largest confidence drop (else gradient importance)."""
    h = heads(source)
    for metric in ("confidence_drop", "grad_importance"):
        values = pd.to_numeric(h[metric], errors="coerce") if metric in h else None
        if values is not None and values.notna().any():
            row = h.loc[values.idxmax()]
            return int(row["layer"]), int(row["head"])
    return int(h["layer"].iloc[0]), int(h["head"].iloc[0])


def settings_line(source: Source) -> str:
    """One line naming the run's settings (plain text)."""
    cfg: VitHeadsConfig = source.config
    h = heads(source)
    parts = [f"preset {cfg.preset}", f"{cfg.ablation} ablation"]
    parts.append(f"{int(h['pruned'].sum())} of {len(h)} heads pruned")
    parts.append(f"at most {cfg.n_eval} eval images per source")
    parts.append("tasks " + ", ".join(str(t) for t in cfg.tasks))
    parts.append(f"attention on {cfg.n_attention_images} {cfg.attention_images} images")
    parts.append(f"seed {cfg.seed}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------- importance


def importance_grid(source: Source, metric: str, selected: tuple[int, int] | None = None) -> go.Figure:
    """Layer x head heat map of one importance metric; heads that were not pruned are blank (NaN)."""
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    h = heads(source)
    grid = h.pivot(index="layer", columns="head", values=metric).astype(float)
    z = grid.to_numpy()
    status = np.where(np.isfinite(z), "", "not pruned")
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(c) for c in grid.columns],
            y=[str(i) for i in grid.index],
            customdata=status,
            colorscale=figures.COLORSCALE,
            colorbar={"title": {"text": METRIC_NAMES[metric]}},
            hoverongaps=True,
            hovertemplate="layer %{y}, head %{x}<br>" + metric + " = %{z:.4f} %{customdata}<extra></extra>",
        )
    )
    n_missing = int((~np.isfinite(z)).sum())
    subtitle = METRIC_LABELS[metric] + (f"; blank: {n_missing} heads not pruned" if n_missing else "")
    figures.head_grid_layout(fig, f"Head importance: {METRIC_NAMES[metric]}", subtitle, z.shape[0])
    fig.update_layout(plot_bgcolor="#ebebeb")
    if selected is not None:
        figures.mark_head(fig, selected[0], selected[1])
    return fig


def agreement_matrix(source: Source) -> pd.DataFrame:
    """Spearman correlations between the metrics (metric x metric)."""
    agree = table(source, "agreement")
    present = [m for m in METRICS if m in set(agree["metric_a"])]
    return agree.pivot(index="metric_a", columns="metric_b", values="spearman").loc[present, present]


def agreement_figure(source: Source) -> go.Figure:
    """Heat map of the Spearman rank correlations between the importance metrics."""
    matrix = agreement_matrix(source)
    agree = table(source, "agreement")
    n = int(agree["n_heads"].max()) if len(agree) else 0
    names = [METRIC_NAMES[m] for m in matrix.index]
    z = matrix.to_numpy(dtype=float)
    text = [["–" if not math.isfinite(v) else f"{v:.2f}" for v in row] for row in z]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=names,
            y=names,
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            text=text,
            texttemplate="%{text}",
            colorbar={"title": {"text": "Spearman"}},
            hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=figures.titled("Metric agreement", f"Spearman rank correlation over the {n} pruned heads"),
        yaxis={"autorange": "reversed"},
        height=380,
        margin={"l": 130, "r": 20, "t": 70, "b": 90},
    )
    return fig


def top_heads(source: Source, metric: str, k: int = 5) -> pd.DataFrame:
    """The ``k`` heads with the largest ``metric`` (not-pruned heads left out)."""
    h = heads(source)
    h = h[np.isfinite(h[metric].astype(float))]
    return h.nlargest(k, metric)[["layer", "head", *METRICS]].reset_index(drop=True)


# ---------------------------------------------------------------------------------- distance


def trend_figure(source: Source, metric: str = "mean_attention_distance") -> go.Figure:
    """Per layer: the mean over heads (line), the interquartile band, min–max whiskers and the heads."""
    if metric not in TREND_METRICS:
        raise KeyError(f"unknown trend metric {metric!r}; choose from {', '.join(TREND_METRICS)}")
    trend = table(source, "attention_trend")
    rows = trend[trend["metric"] == metric].sort_values("layer")
    if rows.empty:
        raise KeyError(f"the run's attention_trend has no {metric!r}")
    layers = rows["layer"].astype(int).tolist()
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=layers + layers[::-1],
            y=rows["q75"].tolist() + rows["q25"].tolist()[::-1],
            fill="toself",
            fillcolor="rgba(49,104,142,0.2)",
            line={"width": 0},
            name="interquartile range",
            hoverinfo="skip",
        )
    )
    h = heads(source)
    if metric in h:
        fig.add_trace(
            go.Scatter(
                x=h["layer"],
                y=h[metric],
                mode="markers",
                marker={"size": 5, "color": "#9fb4c7"},
                name="heads",
                customdata=h["head"],
                hovertemplate="layer %{x}, head %{customdata}: %{y:.3f}<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=layers,
            y=rows["mean"],
            mode="lines+markers",
            line={"color": BLUE, "width": 2.5},
            error_y={
                "type": "data",
                "array": (rows["max"] - rows["mean"]).tolist(),
                "arrayminus": (rows["mean"] - rows["min"]).tolist(),
                "visible": True,
                "color": "rgba(49,104,142,0.5)",
            },
            name="mean over heads (whiskers: min–max)",
            hovertemplate="layer %{x}: mean %{y:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=figures.titled(f"{TREND_LABELS[metric]} by layer", "spread over the heads of each layer"),
        xaxis={"title": {"text": "layer"}, "dtick": 1},
        yaxis={"title": {"text": TREND_UNITS[metric]}},
        height=420,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def distance_figure(source: Source, layer: int, head: int) -> go.Figure:
    """Strength (mean attention per patch pair) against patch distance for one head, with the
    mean over its layer's heads for reference."""
    dist = table(source, "distance")
    mine = dist[(dist["layer"] == layer) & (dist["head"] == head)].sort_values("distance")
    if mine.empty:
        raise KeyError(f"the run has no distance profile for layer {layer}, head {head}")
    layer_mean = dist[dist["layer"] == layer].groupby("distance")["strength"].mean()
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=layer_mean.index,
            y=layer_mean.values,
            mode="lines",
            line={"color": "#9fb4c7", "dash": "dot"},
            name=f"mean of layer {layer}",
            hovertemplate="distance %{x}: %{y:.4f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=mine["distance"],
            y=mine["strength"],
            mode="lines+markers",
            line={"color": ORANGE, "width": 2.5},
            name=f"L{layer} H{head}",
            hovertemplate="distance %{x}: %{y:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=figures.titled(
            f"Strength vs distance: layer {layer}, head {head}",
            "mean attention per (patch query, patch key) pair at each integer distance",
        ),
        xaxis={"title": {"text": "distance (patches)"}, "dtick": 1},
        yaxis={"title": {"text": "attention per key"}, "rangemode": "tozero"},
        height=380,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def _offset_axes(n_rows: int, n_cols: int) -> tuple[list[int], list[int]]:
    return list(range(-(n_rows // 2), n_rows // 2 + 1)), list(range(-(n_cols // 2), n_cols // 2 + 1))


def offset_map_figure(source: Source, layer: int, head: int) -> go.Figure:
    """Mean attention from a patch query to the patch at each (row, column) offset, for one head."""
    maps = array(source, "offset_maps")
    if not (0 <= layer < maps.shape[0] and 0 <= head < maps.shape[1]):
        raise KeyError(f"no head ({layer}, {head}) in offset_maps of shape {maps.shape[:2]}")
    z = np.asarray(maps[layer, head], dtype=float)
    rows, cols = _offset_axes(*z.shape)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=cols,
            y=rows,
            colorscale=figures.COLORSCALE,
            colorbar={"title": {"text": "attention"}},
            hovertemplate="offset (row %{y}, col %{x}): %{z:.4f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[0],
            y=[0],
            mode="markers",
            marker={"symbol": "x-thin-open", "size": 12, "color": ORANGE, "line": {"width": 2}},
            name="the query",
            hoverinfo="skip",
            showlegend=False,
        )
    )
    fig.update_layout(
        title=figures.titled(
            f"Offset map: layer {layer}, head {head}",
            "mean attention to the patch at each offset from the query",
        ),
        xaxis={"title": {"text": "column offset"}, "scaleanchor": "y", "constrain": "domain"},
        yaxis={"title": {"text": "row offset"}, "autorange": "reversed", "constrain": "domain"},
        height=420,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
    )
    return fig


# ---------------------------------------------------------------------------------- patterns


def has_clusters(source: Source) -> bool:
    return has_array(source, "cluster_prototypes") and "cluster_info" in source.table_names


def cluster_gallery(source: Source, per_row: int = 4) -> go.Figure:
    """The pattern clusters' prototype maps (centred on the query) as small heat maps, with their
    share of the maps and how many heads they dominate."""
    if not has_clusters(source):
        return figures.message_figure("this run has no pattern clusters (too few maps)")
    protos = np.asarray(array(source, "cluster_prototypes"), dtype=float)
    info = table(source, "cluster_info").set_index("cluster")
    k = protos.shape[0]
    n_cols = min(per_row, k)
    n_rows = math.ceil(k / n_cols)
    titles = []
    for c in range(k):
        share = float(info.loc[c, "map_share"]) if c in info.index else math.nan
        dom = int(info.loc[c, "n_heads_dominant"]) if c in info.index else 0
        # two short lines: one line would run into the neighbouring panel's title
        titles.append(f"cluster {c}<br>{100 * share:.0f}% of maps, {dom} heads")
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=titles,
        horizontal_spacing=0.06,
        vertical_spacing=min(0.5 / n_rows, 0.12) if n_rows > 1 else 0.0,
    )
    rows, cols = _offset_axes(*protos.shape[1:])
    for c in range(k):
        fig.add_trace(
            go.Heatmap(
                z=protos[c],
                x=cols,
                y=rows,
                colorscale=figures.COLORSCALE,
                showscale=False,
                hovertemplate=f"cluster {c}<br>offset (row %{{y}}, col %{{x}}): %{{z:.4f}}<extra></extra>",
            ),
            row=c // n_cols + 1,
            col=c % n_cols + 1,
        )
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    for i in range(1, k + 1):
        suffix = "" if i == 1 else str(i)
        fig.update_layout({f"yaxis{suffix}": {"scaleanchor": f"x{suffix}"}})
    fig.update_annotations(font={"size": 11})
    fig.update_layout(
        title=figures.titled(
            "Attention-pattern clusters", "prototype (mean) map of each cluster, centred on the query"
        ),
        height=110 + 250 * n_rows,
        margin={"l": 20, "r": 20, "t": 110, "b": 20},
        plot_bgcolor="#ffffff",  # no grey bands beside the square maps
    )
    return fig


# ---------------------------------------------------------------------------------- overlay

# Viridis with rising opacity: weak attention leaves the image visible, strong attention covers it.
OVERLAY_COLORSCALE = [
    [0.0, "rgba(68,1,84,0.0)"],
    [0.25, "rgba(59,82,139,0.35)"],
    [0.5, "rgba(33,145,140,0.55)"],
    [0.75, "rgba(94,201,98,0.7)"],
    [1.0, "rgba(253,231,37,0.85)"],
]


has_display = vit_heads.has_display


def display_options(source: Source) -> list[dict[str, Any]]:
    """The run's display images as dropdown options (value: the image index); [] for older runs."""
    if not has_display(source):
        return []
    return [
        {"label": f"{img.name} ({img.source})", "value": img.index}
        for img in vit_heads.display_images(source)
    ]


def query_from_click(source: Source, click: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """The patch (row, col) under a click on :func:`overlay_figure` (its axes are crop pixels, 0 at
    the top left corner); None when there is no point or the run has no display patterns."""
    points = (click or {}).get("points") or []
    if not points or not has_display(source):
        return None
    x, y = points[0].get("x"), points[0].get("y")
    if not isinstance(x, int | float) or not isinstance(y, int | float):
        return None
    geometry = vit_heads.display_geometry(source)
    rows, cols = geometry["grid"]
    size = geometry["patch_size"]
    row = min(max(math.floor(float(y) / size), 0), rows - 1)
    col = min(max(math.floor(float(x) / size), 0), cols - 1)
    return row, col


def overlay_figure(
    source: Source, image: int, layer: int, head: int, query: tuple[int, int] | None = None
) -> go.Figure:
    """Display image ``image`` with head ``(layer, head)``'s attention from query patch ``query``
    ((row, col); None: the centre patch; an unstored patch: the nearest stored one) as a
    semi-transparent heat map over the key patches (trace 1, ``z`` = the pattern ``[rows, cols]``),
    the query patch outlined and the attention to CLS in the subtitle. Axes are crop pixels. A run
    without display patterns gets a message figure saying how to make them."""
    if not has_display(source):
        return figures.message_figure(DISPLAY_HINT)
    images = {img.index: img for img in vit_heads.display_images(source)}
    if int(image) not in images:
        raise KeyError(f"no display image {image}; the run has {', '.join(map(str, images))}")
    shown = images[int(image)]
    geometry = vit_heads.display_geometry(source)
    size = int(geometry["patch_size"])
    pattern = vit_heads.display_pattern(source, int(image), layer, head, query, snap=True)
    assert pattern.query is not None
    rows, cols = pattern.patches.shape
    height_px, width_px = shown.pixels.shape[:2]
    r_idx, c_idx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    z = pattern.patches.astype(float)
    zmax = float(np.nanmax(z)) if z.size and float(np.nanmax(z)) > 0 else 1.0
    fig = go.Figure()
    fig.add_trace(
        go.Image(
            source=figures.png_uri(shown.pixels), x0=0.5, y0=0.5, dx=1, dy=1, hoverinfo="skip", name="image"
        )
    )
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=(np.arange(cols) + 0.5) * size,
            y=(np.arange(rows) + 0.5) * size,
            customdata=np.stack([r_idx, c_idx], axis=-1),
            zmin=0.0,
            zmax=zmax,
            colorscale=OVERLAY_COLORSCALE,
            colorbar={"title": {"text": "attention"}},
            name="attention",
            hovertemplate="key patch (row %{customdata[0]}, col %{customdata[1]})<br>attention %{z:.4f}"
            "<extra></extra>",
        )
    )
    q_row, q_col = pattern.query
    fig.add_shape(
        type="rect",
        x0=q_col * size,
        x1=(q_col + 1) * size,
        y0=q_row * size,
        y1=(q_row + 1) * size,
        line={"color": ORANGE, "width": 3},
        fillcolor="rgba(0,0,0,0)",
    )
    note = (
        f"; the nearest stored query (one every {geometry['stride']} rows and columns)"
        if pattern.snapped
        else ""
    )
    fig.update_layout(
        title=figures.titled(
            f"Layer {layer}, head {head} on {shown.name}: attention from patch ({q_row}, {q_col})",
            f"attention to CLS {pattern.cls:.3f}, to the patches {float(z.sum()):.3f}{note}; click a patch",
        ),
        xaxis={
            "range": [0, width_px],
            "showticklabels": False,
            "showgrid": False,
            "zeroline": False,
            "constrain": "domain",
        },
        yaxis={
            "range": [height_px, 0],
            "showticklabels": False,
            "showgrid": False,
            "zeroline": False,
            "scaleanchor": "x",
            "constrain": "domain",
        },
        height=480,
        margin={"l": 20, "r": 20, "t": 70, "b": 20},
        clickmode="event",
    )
    return fig


def overlay_lines(
    source: Source, image: int, layer: int, head: int, query: tuple[int, int] | None = None
) -> list[str]:
    """Sentences under the overlay: the query, the attention to CLS and the most attended patch."""
    if not has_display(source):
        return [DISPLAY_HINT + "."]
    pattern = vit_heads.display_pattern(source, int(image), layer, head, query, snap=True)
    geometry = vit_heads.display_geometry(source)
    assert pattern.query is not None
    top = np.unravel_index(int(np.argmax(pattern.patches)), pattern.patches.shape)
    lines = [
        f"Query patch ({pattern.query[0]}, {pattern.query[1]})"
        + (" (the stored query nearest to the clicked patch)" if pattern.snapped else "")
        + f": attention to CLS {pattern.cls:.3f}, to the patches {float(pattern.patches.sum()):.3f}.",
        f"Most attended patch: ({int(top[0])}, {int(top[1])}) with {float(pattern.patches[top]):.3f}.",
    ]
    if geometry["stride"] > 1:
        lines.append(
            f"The run stores a query patch every {geometry['stride']} rows and columns; "
            "a click on another patch shows the nearest stored one."
        )
    return lines


# ---------------------------------------------------------------------------------- findings


def head_lines(source: Source, layer: int, head: int) -> list[str]:
    """Sentences on one head's numbers."""
    h = heads(source)
    row = h[(h["layer"] == layer) & (h["head"] == head)]
    if row.empty:
        raise KeyError(f"the run has no head ({layer}, {head})")
    r = row.iloc[0]
    lines = []
    if bool(r["pruned"]):
        drops = ", ".join(
            f"{METRIC_NAMES[m]} {float(r[m]):.4f}"
            + (f" [{float(r[m + '_low']):.4f}, {float(r[m + '_high']):.4f}]" if m + "_low" in r else "")
            for m in METRICS
        )
        lines.append(f"Pruned: {drops}.")
    if str(r.get("vit_role", "") or ""):
        verdict = "validated" if bool(r["vit_validated"]) else "not validated"
        lines.append(
            f"Among the top heads tested together on held-out images: effect {float(r['vit_effect']):.4f} "
            f"[{float(r['vit_effect_low']):.4f}, {float(r['vit_effect_high']):.4f}], percentile "
            f"{float(r['vit_percentile']):.0f} of random sets, p = {float(r['vit_p_value']):.2g}: {verdict}."
        )
    else:
        lines.append(f"Not pruned; gradient importance {float(r['grad_importance']):.4f}.")
    lines.append(
        f"Mean attention distance {float(r['mean_attention_distance']):.2f} patches, "
        f"{100 * float(r['patch_share']):.0f}% of its attention on patches, "
        f"self {float(r['self_strength']):.3f}, distance-1 neighbours {float(r['neighbour_strength']):.3f} per patch."
    )
    if "cluster" in r and not pd.isna(r["cluster"]):
        lines.append(
            f"Dominant pattern cluster {int(r['cluster'])} ({100 * float(r['cluster_share']):.0f}% of its maps)."
        )
    return lines


def findings(source: Source) -> list[str]:
    """Plain-text sentences reading the run's numbers."""
    h = heads(source)
    lines = []
    pruned = h[h["pruned"].astype(bool)]
    if "probes" in source.table_names:
        probes = table(source, "probes")
        ok = probes[probes["status"] == "ok"] if "status" in probes else probes
        if len(ok):
            acc = ", ".join(
                f"{t} {a:.2f} (chance {c:.2f})"
                for t, a, c in zip(ok["task"], ok["test_accuracy"], ok["chance"], strict=True)
            )
            lines.append(f"Linear probes on the intact embedding, test accuracy: {acc}.")
    if len(pruned):
        best = pruned.loc[pruned["confidence_drop"].astype(float).idxmax()]
        lines.append(
            f"{len(pruned)} of {len(h)} heads were pruned; removing layer {int(best['layer'])}, head "
            f"{int(best['head'])} costs the most true-class confidence ({float(best['confidence_drop']):.3f}, "
            f"cosine drop {float(best['cosine_drop']):.3f})."
        )
        g = h.loc[h["grad_importance"].astype(float).idxmax()]
        lines.append(
            f"The largest gradient importance is layer {int(g['layer'])}, head {int(g['head'])} "
            f"({float(g['grad_importance']):.4f})."
        )
    try:
        matrix = agreement_matrix(source)
        pairs = [
            (a, b, float(matrix.loc[a, b]))
            for i, a in enumerate(matrix.index)
            for b in matrix.index[i + 1 :]
            if math.isfinite(float(matrix.loc[a, b]))
        ]
        if pairs:
            hi = max(pairs, key=lambda p: p[2])
            lo = min(pairs, key=lambda p: p[2])
            lines.append(
                f"Metrics agree most between {METRIC_NAMES[hi[0]]} and {METRIC_NAMES[hi[1]]} "
                f"(Spearman {hi[2]:.2f}) and least between {METRIC_NAMES[lo[0]]} and "
                f"{METRIC_NAMES[lo[1]]} ({lo[2]:.2f})."
            )
    except KeyError:
        pass
    lines += [line for line in ranking_lines(source) if line.startswith(METRIC_NAMES["grad_importance"])]
    if "concentration" in source.table_names:
        for r in table(source, "concentration").itertuples(index=False):
            if r.metric in ("cosine_drop", "grad_importance"):
                lines.append(
                    f"The top {int(r.top_heads)} of {int(r.n_heads)} heads hold {float(r.share):.0%} "
                    f"[{float(r.share_low):.0%}, {float(r.share_high):.0%}] of the {METRIC_NAMES[str(r.metric)]}; "
                    f"with each image's effects shuffled over the heads they would hold {float(r.null_mean):.0%} "
                    f"[{float(r.null_low):.0%}, {float(r.null_high):.0%}] (p = {float(r.p_value):.2g})."
                )
    checked = validation_table(source)
    if checked is not None and len(checked):
        first = checked.iloc[0]
        lines.append(
            f"Held-out check of {first['heads']} ({first['measure']}): {float(first['effect']):.4g} "
            f"[{float(first['effect_low']):.4g}, {float(first['effect_high']):.4g}] against "
            f"{float(first['null_mean']):.4g} for {int(first['n_null'])} random sets, p = {float(first['p_value']):.2g}: "
            + ("validated." if bool(first["validated"]) else "not validated.")
        )
    trend = table(source, "attention_trend")
    mad = trend[trend["metric"] == "mean_attention_distance"].sort_values("layer")
    if len(mad) >= 2:
        first, last = mad.iloc[0], mad.iloc[-1]
        direction = "grows" if float(last["mean"]) > float(first["mean"]) else "shrinks"
        lines.append(
            f"Mean attention distance {direction} from {float(first['mean']):.2f} patches in layer "
            f"{int(first['layer'])} to {float(last['mean']):.2f} in layer {int(last['layer'])}; the spread "
            f"over heads in the first layer is {float(first['min']):.2f}–{float(first['max']):.2f}."
        )
    if "cluster_info" in source.table_names:
        info = table(source, "cluster_info")
        if len(info):
            big = info.loc[info["map_share"].idxmax()]
            lines.append(
                f"{len(info)} attention-pattern clusters; the largest, cluster {int(big['cluster'])}, holds "
                f"{100 * float(big['map_share']):.0f}% of the maps (prototype: {100 * float(big['prototype_self']):.0f}% "
                f"on the query's own patch, mean distance {float(big['prototype_distance']):.2f} patches)."
            )
    return lines
