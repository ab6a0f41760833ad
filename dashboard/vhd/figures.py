"""The VHD / T-VHD / VHR figures: heads' VHD, T-VHD along a caption and of object words, the image
a scene was captioned from, and CHAIR and POPE per VHR setting with their paired changes.

Every figure takes a saved run or an unsaved result alike and reads it through
:mod:`dashboard.vhd.views`; runs without object words or without VHR settings get a message figure.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.core import figures as shared
from dashboard.core.common import Source
from dashboard.vhd.views import (
    BASELINE,
    HEAD_METRICS,
    KIND_NAMES,
    LENGTH_DROP,
    METRIC_NAMES,
    METRIC_NOTES,
    RECALL_DROP,
    Collapse,
    analysis,
    array,
    benchmark_panels,
    caption_tokens,
    collapses,
    deltas_table,
    has_array,
    heads,
    interval_level,
    layer_ranges,
    main_setting,
    num,
    object_class,
    object_label,
    scene_classes,
    setting_order,
    settings_table,
    summary_table,
    tokens,
    tvhd_test_row,
    verdict,
    vhr_layers,
    words,
)

WARNING_COLOUR = "#b3261e"
HALLUCINATED_COLOUR = "#d62728"  # red
CORRECT_COLOUR = "#2ca02c"  # green
TOKEN_COLOUR = "#b8c4d6"  # other tokens
BASELINE_COLOUR = "#5b6475"
MAIN_COLOUR = "#31688e"
SETTING_COLOUR = "#7fa7c9"
RANDOM_COLOUR = "#e4572e"
UNCLEAR_COLOUR = "#9e9e9e"
VHR_LAYER_COLOUR = "#e4572e"
KIND_COLOURS = {"hallucinated": HALLUCINATED_COLOUR, "correct": CORRECT_COLOUR, "other": TOKEN_COLOUR}
VERDICT_COLOURS = {"better": CORRECT_COLOUR, "worse": HALLUCINATED_COLOUR, "unclear": UNCLEAR_COLOUR}


def _setting_colours(source: Source) -> dict[str, str]:
    """The marker colour of each setting that has its own (others: :data:`SETTING_COLOUR`): the
    baseline, the main VHR setting and the settings reinforcing random heads."""
    s = settings_table(source)
    colours: dict[str, str] = {}
    if len(s) and "random" in s:
        colours = {str(n): RANDOM_COLOUR for n, r in zip(s["name"], s["random"], strict=True) if bool(r)}
    main = main_setting(source)
    if main is not None:
        colours[main] = MAIN_COLOUR
    colours[BASELINE] = BASELINE_COLOUR
    return colours


def heads_figure(source: Source, metric: str = "vhd_mean") -> go.Figure:
    """Layer x head heat map of one head metric; the main VHR setting's layers are outlined and
    their tick labels marked."""
    if metric not in HEAD_METRICS:
        raise KeyError(f"unknown metric {metric!r}; choose from {', '.join(HEAD_METRICS)}")
    h = heads(source)
    if metric not in h:
        raise KeyError(f"this {analysis(source)} run has no head metric {metric!r} (a vhr run has it)")
    grid = h.pivot(index="layer", columns="head", values=metric).astype(float)
    z = grid.to_numpy()
    layers = [int(v) for v in grid.index]
    marked = set(vhr_layers(source))
    in_vhr = np.array([["yes" if layer in marked else "no"] * z.shape[1] for layer in layers])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(c) for c in grid.columns],
            y=[str(v) for v in layers],
            customdata=in_vhr,
            colorscale=shared.COLORSCALE,
            colorbar={"title": {"text": metric}},
            hovertemplate="layer %{y}, head %{x}<br>" + metric + " = %{z:.4f}<br>in the VHR layers: "
            "%{customdata}<extra></extra>",
        )
    )
    subtitle = METRIC_NOTES[metric]
    if marked:
        subtitle += f"<br>outlined (▸): the main VHR setting's layers {layer_ranges(sorted(marked))}"
    shared.head_grid_layout(fig, f"Heads: {METRIC_NAMES[metric]}", subtitle, len(layers))
    for i, layer in enumerate(layers):
        if layer in marked:
            fig.add_shape(
                type="rect",
                xref="x domain",
                yref="y",
                x0=0,
                x1=1,
                y0=i - 0.5,
                y1=i + 0.5,
                line={"color": VHR_LAYER_COLOUR, "width": 1.5},
                fillcolor="rgba(0,0,0,0)",
            )
    fig.update_yaxes(
        tickmode="array",
        tickvals=[str(v) for v in layers],
        ticktext=[f"▸ {v}" if v in marked else str(v) for v in layers],
    )
    fig.update_layout(plot_bgcolor="#ebebeb", margin={"l": 60, "r": 20, "t": 95 if marked else 75, "b": 50})
    return fig


def _tick(token: object) -> str:
    """A generated token as a tick label: newlines and tabs shown, HTML escaped, empty shown as ·."""
    text = str(token).replace("\n", "⏎").replace("\t", "⇥").strip()
    return html.escape(text or "·", quote=False)


def tvhd_caption_figure(source: Source, scene: int) -> go.Figure:
    """T-VHD of every token of ``scene``'s baseline caption (bars; token texts on the x axis):
    object words green when correct and red when hallucinated, the class the word names written
    over its bar (the scene's and CHAIR's name for it: "crescent" over "moon"), the tick labels in
    the same colours; the dashed line is the mean T-VHD of all tokens of the run."""
    rows = caption_tokens(source, scene)
    fig = go.Figure()
    for kind in ("other", "correct", "hallucinated"):
        part = rows[rows["kind"] == kind]
        if part.empty and kind != "other":
            continue
        fig.add_trace(
            go.Bar(
                x=part["step"].astype(int).tolist(),
                y=part["t_vhd"].astype(float).tolist(),
                name=KIND_NAMES[kind],
                marker_color=KIND_COLOURS[kind],
                width=0.8,
                text=[object_class(r) for _, r in part.iterrows()] if kind != "other" else None,
                textposition="outside" if kind != "other" else None,
                textfont={"size": 11, "color": KIND_COLOURS[kind]},
                constraintext="none",
                cliponaxis=False,
                customdata=np.column_stack(
                    [[_tick(v) for v in part["token"]], [object_label(r) for _, r in part.iterrows()]]
                )
                if len(part)
                else None,
                hovertemplate="step %{x}: %{customdata[0]}<br>T-VHD %{y:.2f}"
                + ("" if kind == "other" else f"<br>{KIND_NAMES[kind]} %{{customdata[1]}}")
                + "<extra></extra>",
            )
        )
    mean_all = float(pd.to_numeric(tokens(source)["t_vhd"], errors="coerce").mean())
    if math.isfinite(mean_all):
        steps = rows["step"].astype(int)
        fig.add_trace(
            go.Scatter(
                x=[int(steps.min()) - 0.5, int(steps.max()) + 0.5],
                y=[mean_all, mean_all],
                mode="lines",
                name=f"mean T-VHD, all tokens ({mean_all:.2f})",
                line={"dash": "dash", "color": "#555", "width": 1},
                hoverinfo="skip",
            )
        )
    ticks = []
    for _, r in rows.iterrows():
        label = _tick(r["token"])
        if r["kind"] != "other":
            label = f'<span style="color:{KIND_COLOURS[r["kind"]]}"><b>{label}</b></span>'
        ticks.append(label)
    n_bad = int((rows["kind"] == "hallucinated").sum())
    n_ok = int((rows["kind"] == "correct").sum())
    # The legend sits at the foot of the figure, under the axis title: the bottom margin holds the
    # tick labels (tokens at -60°, about 5 px a character), the axis title and two legend rows.
    longest = max((len(_tick(t)) for t in rows["token"]), default=1)
    ticks_px = int(12 + 5.2 * min(longest, 24))
    fig.update_layout(
        title=shared.titled(
            f"T-VHD along the baseline caption of scene {int(scene)}",
            f"{len(rows)} tokens: {n_ok} correct and {n_bad} hallucinated object word(s)<br>T-VHD: sum over "
            "layers of each layer's top-k VHD at the step that produced the token",
        ),
        xaxis={
            "title": {"text": "generated token"},
            "tickmode": "array",
            "tickvals": rows["step"].astype(int).tolist(),
            "ticktext": ticks,
            "tickangle": -60,
            "tickfont": {"size": 10},
        },
        yaxis={"title": {"text": "T-VHD"}},
        barmode="overlay",
        height=430 + ticks_px,
        margin={"l": 60, "r": 20, "t": 105, "b": ticks_px + 80},
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0},
    )
    return fig


def image_figure(source: Source, scene: int) -> go.Figure:
    """The evaluated (noisy) image of ``scene``; a message when the run did not store it."""
    scene = int(scene)
    images = array(source, "images") if has_array(source, "images") else np.empty((0, 0, 0, 3), np.uint8)
    if not 0 <= scene < len(images):
        return shared.message_figure(
            f"The image of scene {scene} was not stored (the run keeps the first {len(images)} "
            "images; raise n_display to keep more)."
        )
    noise = source.config.noise
    fig = go.Figure(go.Image(source=shared.png_uri(images[scene]), hoverinfo="skip"))
    fig.update_layout(
        title=shared.titled(
            f"Scene {scene}: {scene_classes(source).get(scene, '?')}",
            "the image the model saw" + (f" (pixel noise std {noise})" if noise else ""),
        ),
        xaxis={"visible": False},
        yaxis={"visible": False, "scaleanchor": "x"},
        height=380,
        margin={"l": 10, "r": 10, "t": 70, "b": 10},
    )
    return fig


def tvhd_distribution_figure(source: Source) -> go.Figure:
    """T-VHD of hallucinated vs correct object words of the baseline captions: a box per group
    with every word drawn as a point beside it (hover: scene and word)."""
    w = words(source)
    if w.empty:
        return shared.message_figure(
            "The baseline captions name no object word, so there is no T-VHD distribution to show."
        )
    fig = go.Figure()
    labels = []
    for kind, flag in (("correct", False), ("hallucinated", True)):
        part = w[w["hallucinated"].astype(bool) == flag]
        label = f"{KIND_NAMES[kind]}s (n = {len(part)})"
        labels.append(label)
        if part.empty:
            # keep the category on the axis, and say why it is empty
            fig.add_trace(go.Scatter(x=[label], y=[None], mode="markers", showlegend=False, hoverinfo="skip"))
            fig.add_annotation(
                x=label,
                y=0.5,
                xref="x",
                yref="paper",
                showarrow=False,
                text=f"no {KIND_NAMES[kind]}",
                font={"color": KIND_COLOURS[kind]},
            )
            continue
        fig.add_trace(
            go.Box(
                y=part["t_vhd"].astype(float).tolist(),
                x=[label] * len(part),
                name=label,
                marker={"color": KIND_COLOURS[kind], "opacity": 0.8, "size": 7},
                line={"color": KIND_COLOURS[kind]},
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                boxmean=True,
                width=0.5,
                customdata=np.column_stack(
                    [part["scene"].astype(int), [object_label(r) for _, r in part.iterrows()]]
                ),
                hovertemplate="scene %{customdata[0]}, %{customdata[1]}<br>T-VHD %{y:.2f}<extra></extra>",
            )
        )
    r = tvhd_test_row(source)
    sub = (
        f"Mann–Whitney p = {num(r.get('p_value'), '.3g')}, AUROC (correct) {num(r.get('auroc_correct'), '.3f')}"
        if r
        else ""
    )
    fig.update_layout(
        title=shared.titled("T-VHD of object words: hallucinated vs correct", sub or "no test row"),
        yaxis={"title": {"text": "T-VHD"}},
        xaxis={
            "categoryorder": "array",
            "categoryarray": labels,
        },
        height=420,
        margin={"l": 60, "r": 20, "t": 90, "b": 50},
        showlegend=False,
    )
    return fig


def _panel_grid(titles: list[str], cols: int = 2) -> tuple[go.Figure, int, int]:
    """A figure of one panel per title, ``cols`` to a row, and its (rows, cols)."""
    n = len(titles)
    rows, cols = max(1, -(-n // cols)), min(cols, max(1, n))
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=titles,
        horizontal_spacing=0.1,
        vertical_spacing=min(0.5 / rows + 0.05, 0.3),
    )
    return fig, rows, cols


def _add_points(
    fig: go.Figure, i: int, cols: int, values: np.ndarray, low: Any, high: Any, **trace: Any
) -> tuple[int, int]:
    """Draw ``values`` (one per setting, ``trace["x"]``) as markers with their intervals [``low``,
    ``high``] in panel ``i`` of a :func:`_panel_grid` figure; return the panel's (row, col)."""
    row, col = i // cols + 1, i % cols + 1
    fig.add_trace(
        go.Scatter(
            y=values.tolist(),
            mode="markers",
            error_y=shared.error_bars(values, low, high, clip=True, width=5),
            **trace,
        ),
        row=row,
        col=col,
    )
    return row, col


def _panel_layout(fig: go.Figure, rows: int, title: str, subtitle: str) -> go.Figure:
    """The settings along each panel's x axis, the title, and a height for ``rows`` rows of panels;
    the top margin grows with the subtitle's lines, so that none runs into the panels' titles."""
    fig.update_xaxes(tickangle=-30, type="category")
    top = 95 + 20 * (subtitle.count("<br>") + 1)
    fig.update_layout(
        title=shared.titled(title, subtitle),
        showlegend=False,
        height=top + 15 + 290 * rows,
        margin={"l": 60, "r": 20, "t": top, "b": 90},
    )
    return fig


def benchmark_figure(source: Source) -> go.Figure:
    """CHAIR_S, CHAIR_I and POPE F1 / accuracy per setting (baseline first) with the percentile
    bootstrap intervals of ``summary``; dotted line: the baseline's value."""
    s = summary_table(source)
    panels = benchmark_panels(source)
    if not panels:
        return shared.message_figure("The run's summary has no CHAIR or POPE metric.")
    order = [n for n in setting_order(source) if n in set(s["vhr_setting"].astype(str))]
    colours = _setting_colours(source)
    level = interval_level(source)
    fig, rows, cols = _panel_grid([p[3] for p in panels])
    for i, (bench, kind, metric, _) in enumerate(panels):
        part = s[(s["benchmark"] == bench) & (s["setting"] == kind) & (s["metric"] == metric)]
        part = part.set_index(part["vhr_setting"].astype(str)).reindex(
            [n for n in order if n in set(part["vhr_setting"])]
        )
        values = part["value"].to_numpy(float)
        row, col = _add_points(
            fig,
            i,
            cols,
            values,
            part["lo"],
            part["hi"],
            x=list(part.index),
            name=f"{bench} {kind} {metric}",
            marker={"size": 11, "color": [colours.get(n, SETTING_COLOUR) for n in part.index]},
            customdata=np.column_stack(
                [part["lo"].to_numpy(float), part["hi"].to_numpy(float), part["n"].to_numpy(float)]
            ),
            hovertemplate="%{x}: " + metric + " %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
            f"<br>({level} bootstrap interval; n = %{{customdata[2]}})<extra></extra>",
        )
        if BASELINE in part.index and math.isfinite(float(part.loc[BASELINE, "value"])):
            fig.add_hline(
                y=float(part.loc[BASELINE, "value"]),
                line={"dash": "dot", "color": BASELINE_COLOUR, "width": 1},
                row=row,
                col=col,
            )
            drop = {"recall": RECALL_DROP, "words": LENGTH_DROP}.get(metric) if bench == "CHAIR" else None
            if drop is not None:
                fig.add_hline(
                    y=(1 - drop) * float(part.loc[BASELINE, "value"]),
                    line={"dash": "dash", "color": WARNING_COLOUR, "width": 1},
                    row=row,
                    col=col,
                )
        if not np.isfinite(values).any():
            fig.add_annotation(
                text="undefined (no object mentioned)",
                showarrow=False,
                x=0.5,
                y=0.5,
                xref=f"x{i + 1 if i else ''} domain",
                yref=f"y{i + 1 if i else ''} domain",
            )
    found = collapses(source)
    _flag_settings(fig, {c.setting for c in found}, order)
    subtitle = (
        f"{level} percentile bootstrap intervals; dotted: the baseline; red dashes: "
        f"recall −{100 * RECALL_DROP:.0f}%, length −{100 * LENGTH_DROP:.0f}%<br>"
        "CHAIR (share hallucinated): lower is better, read with recall and length; POPE: higher is better"
    )
    if found:
        subtitle += "<br>" + _warning_line(found)
    return _panel_layout(fig, rows, "CHAIR, recall, caption length and POPE per setting", subtitle)


def _flag_settings(fig: go.Figure, flagged: set[str], names: Sequence[str]) -> None:
    """Mark the ``flagged`` settings' tick labels (⚠, red) on every panel's x axis."""
    if not flagged:
        return
    fig.update_xaxes(
        tickmode="array",
        tickvals=list(names),
        ticktext=[
            f'<span style="color:{WARNING_COLOUR}"><b>⚠ {html.escape(n)}</b></span>'
            if n in flagged
            else html.escape(n)
            for n in names
        ],
    )


def _warning_line(found: list[Collapse]) -> str:
    """One red line naming the flagged settings (plotly's title markup)."""
    names = html.escape(", ".join(f"{c.setting} (recall {num(c.recall, '.2f')})" for c in found))
    return f'<span style="color:{WARNING_COLOUR}"><b>⚠ recall or length collapses under {names}</b></span>'


def deltas_figure(source: Source) -> go.Figure:
    """Paired change of each VHR setting against the baseline (scenes resampled together) with its
    interval, zero line drawn; green: the interval shows an improvement, red: a worsening, grey:
    the interval holds zero."""
    d = deltas_table(source)
    if d.empty:
        return shared.message_figure(
            "No VHR setting in this run (a vhd run), so there are no paired changes against the baseline."
        )
    panels = [
        p
        for p in benchmark_panels(source)
        if ((d["benchmark"] == p[0]) & (d["kind"] == p[1]) & (d["metric"] == p[2])).any()
    ]
    if not panels:
        return shared.message_figure("The run's deltas have no CHAIR or POPE metric.")
    order = [n for n in setting_order(source) if n != BASELINE]
    colours = _setting_colours(source)
    fig, rows, cols = _panel_grid([f"Δ {p[3]}" for p in panels])
    for i, (bench, kind, metric, _) in enumerate(panels):
        part = d[(d["benchmark"] == bench) & (d["kind"] == kind) & (d["metric"] == metric)]
        part = part.set_index(part["setting"].astype(str))
        part = part.reindex([n for n in order if n in part.index] + [n for n in part.index if n not in order])
        values = part["delta"].to_numpy(float)
        lo, hi = part["lo"].to_numpy(float), part["hi"].to_numpy(float)
        verdicts = [verdict(metric, a, b) for a, b in zip(lo, hi, strict=True)]
        row, col = _add_points(
            fig,
            i,
            cols,
            values,
            lo,
            hi,
            x=list(part.index),
            name=f"Δ {bench} {kind} {metric}",
            marker={
                "size": 11,
                "color": [VERDICT_COLOURS[v] for v in verdicts],
                "line": {"width": 1.5, "color": [colours.get(n, SETTING_COLOUR) for n in part.index]},
            },
            customdata=[[float(a), float(b), v] for a, b, v in zip(lo, hi, verdicts, strict=True)],
            hovertemplate="%{x}: Δ" + metric + " %{y:+.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
            "<br>%{customdata[2]}<extra></extra>",
        )
        fig.add_hline(y=0, line={"color": "#222", "width": 1.2}, row=row, col=col)
    found = collapses(source)
    _flag_settings(fig, {c.setting for c in found}, order)
    subtitle = (
        "setting − baseline, scenes resampled together, with its interval<br>"
        "green: better, red: worse, grey: the interval holds 0"
    )
    if found:
        subtitle += "<br>" + _warning_line(found)
    return _panel_layout(fig, rows, "Paired change against the baseline", subtitle)
