"""Plotly figures shared by the dashboard pages and the HTML reports.

Nothing here reads files or changes global plotly state (no default templates are touched): each
function takes tables or arrays and returns a new figure.

* :func:`head_heatmap`: a layer x head heat map of one column of a ``heads`` table (for analyses
  without a figure of their own); :func:`mark_head` outlines one head on any such map.
* :func:`pattern_figure`: one head's attention pattern as a PNG image inside a plotly figure, so a
  long sequence costs one compressed image; hover shows tokens and weights while the pattern is
  small enough for per-cell hover data.
* :func:`distributions`: one histogram per metric, of the values across heads.
* :func:`error_bars`: asymmetric error bars out to each value's interval.
* :func:`png_uri`: an RGB image as a PNG data URI, the ``source`` of a ``go.Image``.
* :func:`titled`, :func:`head_rings`, :func:`head_grid_layout`: the title, the ringed heads and the
  axes of the analyses' own figures (left-aligned title with a subtitle; layer x head maps drawn
  with category axes, layer 0 at the top).
* :func:`figure_div`: a figure as an HTML fragment that expects plotly.js to be loaded once by the
  page (the report inlines it in ``<head>``).
"""

from __future__ import annotations

import base64
import functools
import html
import io
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from numpy.typing import ArrayLike
from plotly.colors import sample_colorscale, unlabel_rgb
from plotly.subplots import make_subplots

PatternScale = Literal["linear", "sqrt"]
PATTERN_SCALES: tuple[PatternScale, ...] = ("linear", "sqrt")
COLORSCALE = "Viridis"
MASKED_RGB = (235, 235, 235)  # causally masked cells (key after query, weight exactly 0)
# The mode bar (plotly's toolbar, top right) without the buttons these figures do not need, so that
# it covers less; titles start below its band (:func:`clear_modebar`).
MODEBAR_REMOVE = ["select2d", "lasso2d", "zoomIn2d", "zoomOut2d", "autoScale2d"]
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": MODEBAR_REMOVE}
MODEBAR_PX = 30  # the height of the mode bar's band at the top of a figure
_TITLE_LINE_PX, _SUBTITLE_LINE_PX, _SUBPLOT_TITLE_PX = 22, 16, 22


@functools.cache
def _lut(colorscale: str = COLORSCALE) -> np.ndarray:
    """``[256, 3]`` uint8 colours of ``colorscale`` at 0, 1/255, ..., 1."""
    colours = sample_colorscale(colorscale, list(np.linspace(0.0, 1.0, 256)))
    return np.array([unlabel_rgb(c) for c in colours], dtype=np.float64).round().astype(np.uint8)


def token_label(token: str) -> str:
    """A token as shown in hovers and ticks: quoted (leading spaces stay visible), newlines and
    tabs escaped, HTML-escaped (plotly renders a few tags, and tokens such as ``<|im_start|>``)."""
    shown = token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return html.escape(f"'{shown}'", quote=False)


def head_heatmap(
    heads: pd.DataFrame, metric: str, title: str | None = None, *, colorscale: str = COLORSCALE
) -> go.Figure:
    """Layer x head heat map of ``heads[metric]`` (layer 0 at the top), like the analyses' own maps."""
    grid = heads.pivot(index="layer", columns="head", values=metric)
    fig = go.Figure(
        go.Heatmap(
            z=grid.values,
            x=[str(h) for h in grid.columns],
            y=[str(layer) for layer in grid.index],
            colorscale=colorscale,
            colorbar={"title": {"text": metric}},
            hovertemplate="layer %{y}, head %{x}<br>" + metric + " = %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": title or metric},
        xaxis_title="head",
        yaxis_title="layer",
        yaxis={"autorange": "reversed"},
        height=heatmap_height(grid.shape[0]),
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def heatmap_height(n_layers: int) -> int:
    """A height that keeps layer rows readable: about 16 px a layer, between 320 and 900 px."""
    return int(min(900, max(320, 110 + 16 * n_layers)))


def mark_head(fig: go.Figure, layer: int, head: int, *, color: str = "#e4572e") -> go.Figure:
    """Outline cell (layer, head) on a layer x head heat map whose axes are category labels."""
    trace = fig.data[0]
    xs = [str(v) for v in trace.x]
    ys = [str(v) for v in trace.y]
    if str(head) in xs and str(layer) in ys:
        x, y = xs.index(str(head)), ys.index(str(layer))
        fig.add_shape(
            type="rect",
            xref="x",
            yref="y",
            x0=x - 0.5,
            x1=x + 0.5,
            y0=y - 0.5,
            y1=y + 0.5,
            line={"color": color, "width": 3},
            fillcolor="rgba(0,0,0,0)",
        )
    return fig


TITLE_WIDTH, SUBTITLE_WIDTH = 52, 72  # characters a title / subtitle line holds before it wraps
_TAG = re.compile(r"<[^>]*>")


def wrap_markup(text: str, width: int) -> str:
    """``text`` (plotly's markup: ``<br>``, ``<b>``, ``<span …>``) with every line longer than
    ``width`` visible characters broken at spaces: a figure's text never wraps by itself, so a
    long title runs out of a narrow panel. Tags count for nothing and are never split."""
    out: list[str] = []
    for line in text.split("<br>"):
        words = _TAG.sub(lambda m: m.group(0).replace(" ", "\0"), line).split(" ")
        current: list[str] = []
        length = 0
        for word in words:
            n = len(_TAG.sub("", word))
            if current and length + 1 + n > width:
                out.append(" ".join(current))
                current, length = [], 0
            length += n + (1 if current else 0)
            current.append(word)
        out.append(" ".join(current))
    return "<br>".join(line.replace("\0", " ") for line in out)


def titled(text: str, subtitle: str) -> dict[str, object]:
    """A figure title with a subtitle, left-aligned and wrapped to lines that fit a narrow panel
    (:func:`clear_modebar` sets it below the mode bar)."""
    return {
        "text": wrap_markup(text, TITLE_WIDTH),
        "x": 0.02,
        "subtitle": {"text": wrap_markup(subtitle, SUBTITLE_WIDTH)},
    }


def _lines(text: object) -> int:
    return str(text).count("<br>") + 1 if text else 0


def title_top(fig: go.Figure) -> int:
    """The top margin ``fig`` needs for its title and subtitle set below the mode bar's band, and
    for the subplot titles drawn above the top row of panels."""
    title = fig.layout.title
    n_title, n_sub = _lines(title.text), _lines(title.subtitle.text)
    need = MODEBAR_PX + _TITLE_LINE_PX * n_title + (6 + _SUBTITLE_LINE_PX * n_sub if n_sub else 0) + 12
    subplot_titles = [
        a
        for a in fig.layout.annotations or ()
        if a.yref == "paper" and a.yanchor == "bottom" and (a.y or 0) >= 0.99
    ]
    lines = max((_lines(a.text) for a in subplot_titles), default=0)
    return need + (_SUBPLOT_TITLE_PX + _SUBTITLE_LINE_PX * (lines - 1) if lines else 0)


def clear_modebar(fig: go.Figure) -> go.Figure:
    """Set ``fig``'s title below the mode bar's band (which would otherwise cover a title in a
    narrow panel) and widen the top margin to hold it; the plot area keeps its height (a fixed
    height grows by what the margin gains). Figures without a title are left alone."""
    if not fig.layout.title.text:
        return fig
    top = title_top(fig)
    old = fig.layout.margin.t
    old = 100 if old is None else int(old)  # plotly's default top margin
    fig.update_layout(title={"y": 1, "yref": "container", "yanchor": "top", "pad": {"t": MODEBAR_PX}})
    if top > old:
        fig.update_layout(margin={"t": top})
        if fig.layout.height is not None:
            fig.update_layout(height=int(fig.layout.height) + top - old)
    return fig


def error_bars(
    values: np.ndarray, low: ArrayLike, high: ArrayLike, *, clip: bool = False, width: int | None = None
) -> dict[str, Any]:
    """Asymmetric plotly error bars from ``values`` out to their intervals [``low``, ``high``] (no bar
    where a bound is NaN). ``clip``: no bar, rather than a negative one, on a side where the value
    lies outside its interval; ``width``: the bars' caps in pixels (None: plotly's default)."""
    up = np.asarray(high, dtype=float) - values
    down = values - np.asarray(low, dtype=float)
    if clip:
        up, down = np.maximum(up, 0), np.maximum(down, 0)
    bars: dict[str, Any] = {
        "type": "data",
        "symmetric": False,
        "array": np.nan_to_num(up),
        "arrayminus": np.nan_to_num(down),
        "visible": True,
        "thickness": 1.5,
    }
    if width is not None:
        bars["width"] = width
    return bars


def png_uri(rgb: np.ndarray) -> str:
    """An ``[h, w, 3]`` RGB image (0..255) as a PNG data URI (a ``go.Image`` source)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def head_rings(marks: Sequence[tuple[int, int]], name: str, hover: str, *, color: str) -> go.Scatter:
    """Open circles on the (layer, head) cells ``marks`` of a layer x head map with category axes."""
    return go.Scatter(
        x=[str(h) for _, h in marks],
        y=[str(layer) for layer, _ in marks],
        mode="markers",
        name=name,
        marker={"symbol": "circle-open", "size": 13, "color": color, "line": {"width": 2.5}},
        hovertemplate="layer %{y}, head %{x}: " + hover + "<extra></extra>",
    )


def head_grid_layout(fig: go.Figure, title: str, subtitle: str, n_layers: int) -> go.Figure:
    """Lay out a layer x head map drawn with category axes: head across, layer 0 at the top."""
    fig.update_layout(
        title=titled(title, subtitle),
        xaxis={"title": {"text": "head"}, "type": "category"},
        yaxis={"title": {"text": "layer"}, "type": "category", "autorange": "reversed"},
        height=heatmap_height(n_layers),
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        showlegend=False,
        plot_bgcolor="#ffffff",
    )
    return fig


def pattern_rgb(weights: np.ndarray, *, scale: PatternScale = "linear", causal: bool = True) -> np.ndarray:
    """``[n, n]`` attention weights (row = query, column = key) -> ``[n, n, 3]`` uint8 colours.

    Colours map weights 0..1 (``sqrt``: their square root, which shows small weights) through
    Viridis. With ``causal``, cells after the query whose weight is exactly 0 are drawn light grey
    (masked, not "attended 0"); a non-zero weight there keeps its colour, so a leak stays visible.
    """
    w = np.nan_to_num(np.asarray(weights, dtype=np.float32), nan=0.0).clip(0.0, 1.0)
    shown = np.sqrt(w) if scale == "sqrt" else w
    rgb = _lut()[np.rint(shown * 255).astype(np.intp)]
    if causal:
        n_q, n_k = w.shape
        future = np.arange(n_k)[None, :] > np.arange(n_q)[:, None]
        rgb[future & (w == 0.0)] = MASKED_RGB
    return rgb


def pattern_figure(
    weights: np.ndarray,
    tokens: Sequence[str] | None = None,
    *,
    title: str = "",
    scale: PatternScale = "linear",
    causal: bool = True,
    max_token_hover_cells: int = 160 * 160,
    max_value_hover_cells: int = 512 * 512,
    max_tick_tokens: int = 40,
    height: int = 560,
) -> go.Figure:
    """One head's attention pattern ``weights`` ``[n_query, n_key]`` as a PNG image.

    Hovering a cell shows its query and key positions, their tokens while the pattern has at most
    ``max_token_hover_cells`` cells (one hover string per cell), and its weight while it has at
    most ``max_value_hover_cells`` (4 bytes per cell). Tick labels are the tokens for at most
    ``max_tick_tokens`` positions.
    """
    w = np.asarray(weights, dtype=np.float32)
    n_q, n_k = w.shape
    fig = px.imshow(pattern_rgb(w, scale=scale, causal=causal), binary_string=True)
    labels = [token_label(t) for t in tokens] if tokens is not None else None
    if labels is not None and len(labels) < max(n_q, n_k):
        labels = labels + [""] * (max(n_q, n_k) - len(labels))
    where = "query %{y}<br>key %{x}"
    if labels is not None and n_q * n_k <= max_token_hover_cells:
        q_part = [f"query {i} {labels[i]}<br>" for i in range(n_q)]
        k_part = [f"key {j} {labels[j]}" for j in range(n_k)]
        fig.update_traces(hovertext=[[q + k for k in k_part] for q in q_part])
        where = "%{hovertext}"
    if n_q * n_k <= max_value_hover_cells:
        # numpy goes into the figure as a typed array: 4 bytes a cell, not a decimal string.
        fig.update_traces(customdata=w, hovertemplate=where + "<br>weight %{customdata:.3f}<extra></extra>")
    else:
        fig.update_traces(hovertemplate=where + "<extra></extra>")
    axis: dict[str, object] = {"showgrid": False, "zeroline": False}
    xaxis, yaxis = dict(axis, title={"text": "key position"}), dict(axis, title={"text": "query position"})
    if labels is not None and max(n_q, n_k) <= max_tick_tokens:
        xaxis.update(tickvals=list(range(n_k)), ticktext=labels[:n_k], tickangle=-60, tickfont={"size": 10})
        yaxis.update(tickvals=list(range(n_q)), ticktext=labels[:n_q], tickfont={"size": 10})
    scale_note = (
        "colour: √weight (shows weights far below the largest)" if scale == "sqrt" else "colour: weight"
    )
    fig.update_layout(
        # Left-aligned so that the mode bar (top right) never covers it.
        title={"text": title, "x": 0.02, "xanchor": "left", "subtitle": {"text": scale_note}},
        xaxis=xaxis,
        yaxis=yaxis,
        height=height,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
    )
    return fig


def distributions(
    heads: pd.DataFrame, metrics: Sequence[str], labels: Mapping[str, str] | None = None, *, cols: int = 3
) -> go.Figure:
    """One histogram per metric of its values across all heads."""
    labels = labels or {}
    rows = max(1, -(-len(metrics) // cols))
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[labels.get(m, m) for m in metrics],
        horizontal_spacing=0.08,
        vertical_spacing=0.16,
    )
    for i, metric in enumerate(metrics):
        fig.add_trace(
            go.Histogram(
                x=heads[metric],
                nbinsx=30,
                name=metric,
                marker_color="#31688e",
                hovertemplate=metric + " %{x}<br>%{y} heads<extra></extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_yaxes(title_text="heads", col=1)
    fig.update_layout(
        showlegend=False, height=300 * rows, margin={"l": 60, "r": 20, "t": 50, "b": 40}, bargap=0.05
    )
    return fig


MESSAGE_WIDTH = 60  # characters a line of a message figure holds before it wraps


def wrap_message(message: str, width: int = MESSAGE_WIDTH) -> str:
    """``message`` HTML-escaped and broken into lines of at most ``width`` characters (plotly's
    ``<br>``): a figure's text never wraps by itself, so a long message would run out of the figure.
    Words longer than a line (run ids, paths) are broken too."""
    lines = textwrap.wrap(message, width, break_long_words=True, break_on_hyphens=False) or [""]
    return "<br>".join(html.escape(line) for line in lines)


def message_figure(message: str, *, height: int = 320) -> go.Figure:
    """An empty figure that says why there is nothing to show: the message, wrapped, on a blank
    ground (no grey plot area that looks like a figure that failed to draw)."""
    fig = go.Figure()
    fig.add_annotation(
        text=wrap_message(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", align="center"
    )
    fig.update_layout(
        xaxis={"visible": False},
        yaxis={"visible": False},
        height=height,
        margin={"t": 20, "b": 20, "l": 20, "r": 20},
        plot_bgcolor="rgba(0,0,0,0)",
        paper_bgcolor="rgba(0,0,0,0)",
    )
    return fig


def figure_div(fig: go.Figure, div_id: str) -> str:
    """``fig`` as an HTML fragment (a div and its plot script); plotly.js must be on the page.

    The div gets the figure's own height (a percentage height would collapse inside a page). The
    title is set below the mode bar (:func:`clear_modebar`).
    """
    clear_modebar(fig)
    height = fig.layout.height
    return str(
        fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            include_mathjax=False,
            div_id=div_id,
            config=PLOTLY_CONFIG,
            default_width="100%",
            default_height=f"{int(height)}px" if height else "450px",
        )
    )
