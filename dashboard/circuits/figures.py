"""Circuit figures: the task metrics, the layer × head patching maps, faithfulness, the overlap
curve and the intervention, drawn from an ``ioi``, ``colored-objects`` or ``circuit-reuse`` run
(saved, or the result before saving). Blue carries the answer, red works against it."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.circuits import STAGES
from dashboard.circuits.views import (
    AXES,
    AXIS_LABELS,
    AXIS_NOTES,
    CLASS_LABELS,
    IV_METRIC_LABELS,
    IV_METRICS,
    METRIC_NOTES,
    PAPER_PERCENT,
    WHOLE_MODEL_AXES,
    IvMetric,
    Source,
    chance,
    circuit_rows,
    counted,
    faithfulness_summary,
    faithfulness_table,
    head_classes,
    head_label,
    intervention_table,
    is_reuse,
    metrics_table,
    overlap_at,
    overlap_table,
    score_grid,
    shape,
    task_label,
    tasks,
)
from dashboard.core.figures import error_bars, head_rings, heatmap_height, message_figure, titled

CLASS_COLOURS = {
    "name_mover": "#1b9e77",
    "negative_mover": "#d95f02",
    "backup_mover": "#a6761d",
    "s_inhibition": "#7570b3",
    "induction": "#e7298a",
    "duplicate_token": "#66a61e",
    "previous_token": "#e6ab02",
}
FOUND_COLOUR = "#31688e"
RANDOM_COLOUR = "#9fb4c7"
EMPTY_COLOUR = "#5b6475"
CHANCE_COLOUR = "#e4572e"
STAGE_COLOURS = {
    "logits": "#1b9e77",
    "mover_queries": "#7570b3",
    "inhibition_kv": "#e7298a",
    "induction_k": "#e6ab02",
    "all": "#1d2330",
    "activation": "#5b6475",
}
HEAT_SCALE = "RdBu_r"  # blue: negative (carries the answer), red: positive
LD_COLOUR = "#3b528b"
ACCURACY_COLOUR = "#21918c"


def legend_below() -> dict[str, Any]:
    """A horizontal legend at the bottom of the figure, under the x axis title (margin b >= 90)."""
    return {"orientation": "h", "yref": "container", "y": 0.01, "yanchor": "bottom", "x": 0.0}


# ---------------------------------------------------------------------------------------- metrics


def metrics_figure(source: Source) -> go.Figure:
    """Per task: the logit difference on clean prompts (95% interval) and on the corrupted ones; the
    accuracy among the candidates (with chance) and top-1 over the vocabulary."""
    m = metrics_table(source)
    names = [task_label(t) for t in m["task"]]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=["logit difference at END", "accuracy"],
        horizontal_spacing=0.14,
    )
    ld = m["logit_diff"].to_numpy(float)
    notes_ = [METRIC_NOTES.get(t, "logit difference") for t in m["task"]]
    fig.add_trace(
        go.Bar(
            x=names,
            y=ld,
            name="clean prompts",
            marker_color=LD_COLOUR,
            error_y=error_bars(ld, m["logit_diff_low"], m["logit_diff_high"]),
            customdata=np.column_stack([m["logit_diff_low"], m["logit_diff_high"], m["n_items"], notes_]),
            hovertemplate="%{x}, clean prompts: %{customdata[3]}<br>mean %{y:.2f} "
            "[%{customdata[0]:.2f}, %{customdata[1]:.2f}] (95% bootstrap interval) over "
            "%{customdata[2]} prompts<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=names,
            y=m["logit_diff_corrupt"].to_numpy(float),
            mode="markers",
            name="corrupted prompts",
            marker={"symbol": "diamond", "size": 12, "color": CHANCE_COLOUR},
            customdata=np.column_stack([m["gap"].to_numpy(float)]),
            hovertemplate="%{x}, corrupted prompts: mean logit difference %{y:.2f}<br>clean − corrupted "
            "gap %{customdata[0]:.2f}: every patching score is a share of it<extra></extra>",
        ),
        row=1,
        col=1,
    )
    for column, label, colour in (
        ("accuracy", "among the candidates", ACCURACY_COLOUR),
        ("vocab_accuracy", "top-1 over the vocabulary", RANDOM_COLOUR),
    ):
        values = m[column].to_numpy(float)
        what = (
            "the right answer beats the other candidates (IOI: IO beats S; Colored Objects: the "
            "right colour beats the scene's other colours)"
            if column == "accuracy"
            else "the right answer is the top token over the whole vocabulary"
        )
        fig.add_trace(
            go.Bar(
                x=names,
                y=values,
                name=label,
                marker_color=colour,
                error_y=error_bars(values, m[f"{column}_low"], m[f"{column}_high"]),
                customdata=np.column_stack([m[f"{column}_low"], m[f"{column}_high"], m["n_items"]]),
                hovertemplate=f"%{{x}}, {label}: %{{y:.1%}} "
                "[%{customdata[0]:.1%}, %{customdata[1]:.1%}] (95% interval) of %{customdata[2]} "
                f"prompts<br>share of prompts where {what}<extra></extra>",
            ),
            row=1,
            col=2,
        )
    fig.add_trace(
        go.Scatter(
            x=names,
            y=m["accuracy_chance"].to_numpy(float),
            mode="markers",
            name="chance (among the candidates)",
            marker={"symbol": "line-ew", "size": 40, "line": {"color": CHANCE_COLOUR, "width": 2.5}},
            hovertemplate="%{x}: chance among the candidates %{y:.1%} (1 / number of candidates)"
            "<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(title_text="logit difference", row=1, col=1, zeroline=True)
    fig.update_yaxes(title_text="accuracy", tickformat=".0%", range=[0, 1.05], row=1, col=2)
    fig.update_layout(
        title=titled("Task performance", "bars: clean prompts with 95% intervals"),
        barmode="group",
        height=470,
        margin={"l": 60, "r": 20, "t": 110, "b": 100},
        legend=legend_below(),
    )
    return fig


# ---------------------------------------------------------------------------------------- heat maps


def _score_hover(
    task: str, axis: str, grid: np.ndarray, classes: dict[tuple[int, int], list[str]]
) -> list[list[str]]:
    what = AXIS_NOTES[axis]
    rows = []
    for layer in range(grid.shape[0]):
        row = []
        for h in range(grid.shape[1]):
            v = grid[layer, h]
            head = f"{task_label(task)} · {head_label(layer, h)}"
            if not np.isfinite(v):
                text = (
                    f"{head}<br>not tested: the run patched only the strongest heads by attribution "
                    "patching (max_senders)"
                )
            else:
                effect = (
                    "carries the answer" if v < 0 else "works against the answer" if v > 0 else "no effect"
                )
                text = (
                    f"{head}<br>{AXIS_LABELS[axis]}: {v:+.3f} of the clean–corrupt gap ({effect})"
                    f"<br>{what}<br>−1: the patch removes the whole gap"
                )
            member = classes.get((layer, h))
            if member:
                text += "<br>circuit: " + ", ".join(CLASS_LABELS.get(c, c) for c in member)
            row.append(text)
        rows.append(row)
    return rows


def _ringed(source: Source, task: str, axis: str) -> dict[str, list[tuple[int, int]]]:
    """Class -> heads to ring on ``axis``'s map: the classes that stage found (activation: all)."""
    rows = circuit_rows(source, task)
    if axis not in WHOLE_MODEL_AXES:
        rows = rows[rows["stage"].astype(str) == axis]
    out: dict[str, list[tuple[int, int]]] = {}
    seen: set[tuple[int, int]] = set()
    for r in rows.to_dict("records"):
        head = (int(r["layer"]), int(r["head"]))
        if axis in WHOLE_MODEL_AXES and head in seen:  # ring a head once, in its first class's colour
            continue
        seen.add(head)
        out.setdefault(str(r["class"]), []).append(head)
    return out


def patching_heatmaps(source: Source, axis: str = "activation") -> go.Figure:
    """Layer × head maps of one score axis (activation patching or a path-patching stage), one per
    task side by side on one shared colour scale centred at 0; the heads of the classes that the
    stage found ringed in their class colour (activation: every circuit head)."""
    if axis not in AXES:
        raise KeyError(f"no score axis {axis!r}; choose one of {', '.join(AXES)}")
    names = tasks(source)
    n_layers, n_heads = shape(source)
    grids = [score_grid(source, t, axis) for t in names]
    finite = np.concatenate([g[np.isfinite(g)] for g in grids]) if grids else np.array([])
    zmax = float(np.abs(finite).max()) if finite.size else 1.0
    zmax = zmax if zmax > 0 else 1.0
    fig = make_subplots(
        rows=1,
        cols=len(names),
        subplot_titles=[task_label(t) for t in names],
        shared_yaxes=True,
        horizontal_spacing=0.06,
    )
    xs = [str(h) for h in range(n_heads)]
    ys = [str(layer) for layer in range(n_layers)]
    legend_done: set[str] = set()
    for col, (task, grid) in enumerate(zip(names, grids, strict=True), start=1):
        classes = head_classes(source, task)
        fig.add_trace(
            go.Heatmap(
                z=grid,
                x=xs,
                y=ys,
                name=f"{task_label(task)}: {AXIS_LABELS[axis]}",
                coloraxis="coloraxis",
                text=_score_hover(task, axis, grid, classes),
                hovertemplate="%{text}<extra></extra>",
                hoverongaps=True,
            ),
            row=1,
            col=col,
        )
        for cls, marks in _ringed(source, task, axis).items():
            ring = head_rings(
                marks,
                CLASS_LABELS.get(cls, cls),
                CLASS_LABELS.get(cls, cls),
                color=CLASS_COLOURS.get(cls, "#000"),
            )
            ring.legendgroup = cls
            ring.showlegend = cls not in legend_done
            legend_done.add(cls)
            fig.add_trace(ring, row=1, col=col)
    fig.update_xaxes(type="category", title_text="head")
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_yaxes(title_text="layer", col=1)
    untested = int(sum(int((~np.isfinite(g)).sum()) for g in grids))
    subtitle = "share of the clean–corrupt gap; blue: carries the answer, red: works against it"
    if untested:
        subtitle += f"; grey: not tested ({untested} cells)"
    fig.update_layout(
        title=titled(f"{AXIS_LABELS[axis]}", subtitle),
        coloraxis={
            "colorscale": HEAT_SCALE,
            "cmin": -zmax,
            "cmax": zmax,
            "cmid": 0.0,
            "colorbar": {"title": {"text": "share of gap"}},
        },
        height=heatmap_height(n_layers) + 60,
        margin={"l": 60, "r": 20, "t": 115, "b": 100},
        plot_bgcolor="#e6e6e6",
        legend=legend_below(),
    )
    return fig


def faithfulness_figure(source: Source) -> go.Figure:
    """Per task: the found circuit's faithfulness (mean logit difference with every other head
    mean-ablated, over the full model's) against random circuits of the same size and the empty one."""
    faith = faithfulness_table(source)
    names = tasks(source)
    fig = go.Figure()
    rand = faith[faith["circuit"] == "random"]
    if len(rand):
        fig.add_trace(
            go.Box(
                x=[task_label(t) for t in rand["task"]],
                y=rand["faithfulness"].to_numpy(float),
                name="random circuits (same size)",
                boxpoints="all",
                jitter=0.5,
                pointpos=0,
                marker={"color": RANDOM_COLOUR, "size": 7},
                line={"color": RANDOM_COLOUR},
                fillcolor="rgba(159,180,199,0.2)",
                customdata=np.column_stack([rand["size"], rand["logit_diff"], rand["full_logit_diff"]]),
                hoveron="points",
                hovertemplate="%{x}, a random circuit of %{customdata[0]} heads: faithfulness %{y:.2f}"
                "<br>logit difference %{customdata[1]:.2f} with every other head mean-ablated, full "
                "model %{customdata[2]:.2f}<extra></extra>",
            )
        )
    for kind, label, symbol, colour, size in (
        ("empty", "empty circuit (every head ablated)", "x", EMPTY_COLOUR, 12),
        ("found", "found circuit", "diamond", FOUND_COLOUR, 16),
    ):
        part = faith[faith["circuit"] == kind]
        if part.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=[task_label(t) for t in part["task"]],
                y=part["faithfulness"].to_numpy(float),
                mode="markers",
                name=label,
                marker={
                    "symbol": symbol,
                    "size": size,
                    "color": colour,
                    "line": {"width": 1, "color": "#fff"},
                },
                customdata=np.column_stack([part["size"], part["logit_diff"], part["full_logit_diff"]]),
                hovertemplate=f"%{{x}}, {label}, %{{customdata[0]}} heads: faithfulness %{{y:.2f}}"
                "<br>= logit difference %{customdata[1]:.2f} with every head outside it mean-ablated / "
                "full model %{customdata[2]:.2f}<extra></extra>",
            )
        )
    fig.add_hline(
        y=1.0,
        line_dash="dot",
        line_color="#5b6475",
        annotation_text="full model",
        annotation_position="top left",
    )
    fig.add_hline(y=0.0, line_color="#d9dde5")
    sizes = ", ".join(f"{task_label(t)} {counted(faithfulness_summary(source, t)['size'])}" for t in names)
    fig.update_layout(
        title=titled("Faithfulness of the circuit", f"{sizes}; mean ablation outside the circuit"),
        yaxis={"title": {"text": "faithfulness (share of full logit diff.)"}},
        height=440,
        margin={"l": 60, "r": 20, "t": 80, "b": 100},
        legend=legend_below(),
    )
    return fig


# ---------------------------------------------------------------------------------------- reuse


def overlap_figure(source: Source) -> go.Figure:
    """The overlap curve: per path-patching stage and pooled over stages ("all"), the share of IOI's
    top-p% heads that are Colored Objects' top-p% heads of the same stage, against p; activation
    patching dashed, the chance level dotted and the paper's 2% point marked."""
    if not is_reuse(source):
        return message_figure("the overlap needs a circuit-reuse run (both tasks)", height=360)
    overlap = overlap_table(source)
    fig = go.Figure()
    percents = sorted({float(p) for p in overlap["percent"]})
    order = [(s, "path_patching") for s in (*STAGES, "all")] + [("activation", "activation_patching")]
    for stage, kind in order:
        part = overlap[(overlap["source"] == kind) & (overlap["stage"] == stage)].sort_values("percent")
        if part.empty:
            continue
        label = "all stages (pooled)" if stage == "all" else AXIS_LABELS.get(stage, stage)
        fig.add_trace(
            go.Scatter(
                x=part["percent"].to_numpy(float),
                y=part["overlap"].to_numpy(float),
                mode="lines+markers",
                name=label,
                line={
                    "color": STAGE_COLOURS.get(stage, "#444"),
                    "width": 3.5 if stage == "all" else 1.8,
                    "dash": "dash" if stage == "activation" else "solid",
                },
                customdata=np.column_stack([part["shared"], part["k"], part["jaccard"]]),
                hovertemplate=f"{label}, top %{{x:g}}%: %{{customdata[0]}} of IOI's %{{customdata[1]}} top "
                "heads are Colored Objects' top heads too<br>overlap %{y:.0%}, Jaccard %{customdata[2]:.2f}"
                "<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=percents,
            y=[p / 100.0 for p in percents],
            mode="lines",
            name="chance (independent rankings)",
            line={"color": CHANCE_COLOUR, "dash": "dot", "width": 1.5},
            hovertemplate="top %{x:g}%: two independent rankings share about %{y:.0%} of their top heads"
            "<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[PAPER_PERCENT, PAPER_PERCENT],
            y=[0.0, 1.0],
            mode="lines",
            name="2% (Merullo et al.)",
            line={"color": "#5b6475", "dash": "dashdot", "width": 1},
            hovertemplate="top 2%: Merullo et al. find 78% (25 of 32) on GPT2-Medium<extra></extra>",
        )
    )
    at2 = overlap_at(source)
    if at2 is not None:
        fig.add_trace(
            go.Scatter(
                x=[PAPER_PERCENT],
                y=[float(at2["overlap"])],
                mode="markers+text",
                name="all stages at 2%",
                marker={"symbol": "star", "size": 18, "color": STAGE_COLOURS["all"]},
                text=[f"{int(at2['shared'])} of {int(at2['k'])} ({float(at2['overlap']):.0%})"],
                textposition="middle right",
                hovertemplate="top 2%% pooled over stages: %{text} of IOI's top stage heads are "
                "Colored Objects' too<extra></extra>",
                showlegend=False,
            )
        )
    fig.update_layout(
        title=titled(
            "Circuit reuse: overlap of the top heads",
            "IOI's top-p% heads per stage that are Colored Objects' too",
        ),
        xaxis={
            "title": {"text": "top p% of heads by |score|"},
            "type": "log",
            "tickvals": percents,
            "ticktext": [f"{p:g}%" for p in percents],
        },
        yaxis={
            "title": {"text": "overlap (share of IOI's top heads)"},
            "tickformat": ".0%",
            "range": [0, 1.05],
        },
        height=420,
        margin={"l": 60, "r": 20, "t": 80, "b": 50},
    )
    return fig


def intervention_figure(source: Source, metric: IvMetric = "accuracy") -> go.Figure:
    """Colored Objects before the edit, with the IOI inhibition heads' END attention moved onto the
    wrong colours, and with as many random heads edited (their distribution): bars with 95% intervals
    and, for accuracy among the scene's colours, chance."""
    if not is_reuse(source):
        return message_figure("the intervention needs a circuit-reuse run (both tasks)", height=360)
    if metric not in IV_METRICS:
        raise KeyError(f"no intervention metric {metric!r}; choose one of {', '.join(IV_METRICS)}")
    iv = intervention_table(source)
    label = IV_METRIC_LABELS[metric]
    pct = metric != "logit_diff"
    spec = ".1%" if pct else ".2f"
    before = iv[iv["condition"] == "before"]
    target = iv[iv["condition"] == "ioi_heads"]
    rand = iv[iv["condition"] == "random"]
    n_heads = int(target["n_heads"].iloc[0]) if len(target) else 0
    x_before, x_target = "no edit", f"IOI heads ({n_heads})"
    x_random = f"random heads ({n_heads} each)"
    why = str(source.notes.get("intervention_heads", "IOI s_inhibition and negative_mover heads"))
    fig = go.Figure()
    for part, x, name, colour, chosen in (
        (before, x_before, "before: no edit", RANDOM_COLOUR, ""),
        (target, x_target, "IOI inhibition heads edited", FOUND_COLOUR, f" ({why})"),
    ):
        if part.empty:
            continue
        values = part[metric].to_numpy(float)
        has_ci = f"{metric}_low" in part.columns
        interval = f" [%{{customdata[0]:{spec}}}, %{{customdata[1]:{spec}}}] (95% interval)" if has_ci else ""
        fig.add_trace(
            go.Bar(
                x=[x],
                y=values,
                name=name,
                marker_color=colour,
                error_y=error_bars(values, part[f"{metric}_low"], part[f"{metric}_high"]) if has_ci else None,
                customdata=np.column_stack(
                    [
                        part[f"{metric}_low"] if has_ci else values,
                        part[f"{metric}_high"] if has_ci else values,
                        part["heads"].astype(str).replace("", "none"),
                    ]
                ),
                hovertemplate=f"{name}: {label} %{{y:{spec}}}{interval}<br>edited heads: %{{customdata[2]}}"
                f"{html.escape(chosen)}<extra></extra>",
            )
        )
    if len(rand):
        fig.add_trace(
            go.Box(
                x=[x_random] * len(rand),
                y=rand[metric].to_numpy(float),
                name=f"random heads edited ({len(rand)} sets)",
                boxpoints="all",
                jitter=0.5,
                pointpos=0,
                marker={"color": EMPTY_COLOUR, "size": 7},
                line={"color": EMPTY_COLOUR},
                hoveron="points",
                customdata=np.column_stack([rand["heads"].astype(str)]),
                hovertemplate=f"a random set: {label} %{{y:{spec}}}<br>edited heads: %{{customdata[0]}}"
                "<extra></extra>",
            )
        )
    xs = [x_before, x_target, x_random]
    if metric == "accuracy":
        c = chance(source)
        if math.isfinite(c):
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=[c] * 3,
                    mode="lines",
                    name="chance (1 / colours in the scene)",
                    line={"color": CHANCE_COLOUR, "dash": "dash", "width": 2},
                    hovertemplate=f"chance {c:.1%}: one of the scene's colours at random<extra></extra>",
                )
            )
    fig.update_layout(
        title=titled(
            "Intervention on Colored Objects",
            "the edited heads' END attention put on the scene's wrong colours",
        ),
        xaxis={"type": "category", "categoryorder": "array", "categoryarray": xs},
        yaxis={"title": {"text": label}, **({"tickformat": ".0%", "range": [0, 1.05]} if pct else {})},
        height=420,
        margin={"l": 60, "r": 20, "t": 80, "b": 100},
        legend=legend_below(),
    )
    return fig
