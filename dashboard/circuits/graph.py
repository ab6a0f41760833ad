"""The circuit graph: the heads of one task's circuit at (layer, head), coloured by class, with the
path-patching edges into the next stage's receivers and the logits as the sink on the right."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses.circuits import CLASSES
from dashboard.circuits.figures import CLASS_COLOURS, legend_below
from dashboard.circuits.views import (
    AXIS_LABELS,
    CLASS_LABELS,
    CLASS_SIGNATURE,
    Source,
    check_task,
    circuit_rows,
    counted,
    head_classes,
    head_label,
    num,
    shape,
    signature_label,
    stand_ins,
    task_label,
)
from dashboard.core.figures import message_figure, titled

STAND_IN = "stand-in receiver"
SUPPORT_COLOUR = "#2166ac"  # negative share: the path carries the answer
OPPOSE_COLOUR = "#b2182b"  # positive share: the path works against it
STAND_IN_COLOUR = "#9e9e9e"
LOGITS_COLOUR = "#1d2330"


# ---------------------------------------------------------------------------------------- graph


def _node_hover(source: Source, task: str, head: tuple[int, int], classes: Sequence[str]) -> str:
    rows = circuit_rows(source, task)
    mine = rows[(rows["layer"] == head[0]) & (rows["head"] == head[1])]
    parts = [f"{head_label(*head)}: " + " + ".join(CLASS_LABELS.get(c, c) for c in classes)]
    for r in mine.to_dict("records"):
        cls = str(r["class"])
        sig = CLASS_SIGNATURE.get(cls)
        line = f"{CLASS_LABELS.get(cls, cls)}: {AXIS_LABELS.get(str(r['stage']), r['stage'])} {num(r['score'], '+.3f')}"
        if sig:
            line += f", attention {signature_label(task, sig)} {num(r.get(f'sig_{sig}'), '.2f')}"
        parts.append(line)
    if len(mine):
        parts.append(f"activation patching {num(mine['activation'].iloc[0], '+.3f')} of the gap")
    return "<br>".join(parts)


def _node_label(fig: go.Figure, x: float, y: float, text: str, radius: float, colour: str = "#222") -> None:
    """``text`` just above the node at (x, y) of ``radius`` pixels, on a white ground."""
    fig.add_annotation(
        x=x,
        y=y,
        text=text,
        showarrow=False,
        yshift=radius + 8,
        font={"size": 10, "color": colour},
        bgcolor="rgba(255,255,255,0.9)",
        borderpad=1,
        name="node label",
    )


Point = tuple[float, float]
EDGE_INPUTS = {"logits": "logits at END", "q": "query at END", "kv": "keys and values", "k": "keys"}


def circuit_graph(source: Source, task: str | None = None) -> go.Figure:
    """The circuit of ``task`` as a graph: every circuit head at (layer, head), coloured by class,
    and the path-patching edges of the ``edges`` table from each found head into the receivers of the
    next stage (the logits a sink node at the right), width by |share|, blue when the path carries
    the answer (negative share), red when it works against it."""
    task = check_task(source, task)
    n_layers, n_heads = shape(source)
    classes = head_classes(source, task)
    edges = source.table("edges")
    edges = edges[edges["task"].astype(str) == task]
    if not classes and edges.empty:
        return message_figure(
            f"{task_label(task)}: no head passed both tests of any class (path score and attention "
            "signature), so there is no circuit to draw",
            height=360,
        )
    sink = (float(n_layers), (n_heads - 1) / 2.0)
    fig = go.Figure()
    _add_edges(fig, edges, sink)
    _add_class_nodes(fig, source, task, classes)
    _add_class_rings(fig, classes)
    extra = _add_stand_ins(fig, source, task, classes, edges)
    _add_sink(fig, sink)
    # Labels are annotations, drawn over every trace on a white ground: no edge crosses them.
    for lay, h in sorted(classes):
        rings_around = len(classes[(lay, h)]) - 1  # the outermost ring's radius: 9 + 4 per ring
        _node_label(fig, float(lay), float(h), head_label(lay, h), 9 + 4 * rings_around)
    for lay, h in extra:
        _node_label(fig, float(lay), float(h), head_label(lay, h), 7, STAND_IN_COLOUR)
    _node_label(fig, sink[0], sink[1], "logits", 12)
    _graph_layout(fig, task, n_layers, n_heads, len(classes))
    return fig


def _add_edges(fig: go.Figure, edges: pd.DataFrame, sink: Point) -> None:
    """One line per finite edge (width by |share|, coloured by sign), then one diamond at each
    edge's middle that carries its hover text."""

    def where(layer: int, head: int) -> Point:
        return sink if layer < 0 else (float(layer), float(head))

    shares = edges["share"].to_numpy(float)
    finite = np.abs(shares[np.isfinite(shares)])
    biggest = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    shown_sign: set[bool] = set()
    mids_x, mids_y, mids_text, mids_colour = [], [], [], []
    for r in edges.to_dict("records"):
        share = float(r["share"])
        if not math.isfinite(share):
            continue
        x0, y0 = where(int(r["sender_layer"]), int(r["sender_head"]))
        x1, y1 = where(int(r["receiver_layer"]), int(r["receiver_head"]))
        supports = share <= 0
        colour = SUPPORT_COLOUR if supports else OPPOSE_COLOUR
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                line={"color": colour, "width": 0.8 + 7.0 * abs(share) / biggest},
                opacity=0.65,
                name="edge: carries the answer" if supports else "edge: works against the answer",
                legendgroup="support" if supports else "oppose",
                showlegend=supports not in shown_sign,
                hoverinfo="skip",
            )
        )
        shown_sign.add(supports)
        mids_x.append((x0 + x1) / 2)
        mids_y.append((y0 + y1) / 2)
        mids_colour.append(colour)
        mids_text.append(_edge_hover(r, share))
    if mids_x:
        fig.add_trace(
            go.Scatter(
                x=mids_x,
                y=mids_y,
                mode="markers",
                name="edge shares",
                marker={"size": 7, "color": mids_colour, "symbol": "diamond"},
                text=mids_text,
                hovertemplate="%{text}<extra></extra>",
                showlegend=False,
            )
        )


def _edge_hover(r: dict[str, Any], share: float) -> str:
    sender = head_label(r["sender_layer"], r["sender_head"])
    receiver = (
        "the logits" if int(r["receiver_layer"]) < 0 else head_label(r["receiver_layer"], r["receiver_head"])
    )
    into = EDGE_INPUTS.get(str(r["input"]), str(r["input"]))
    return (
        f"{sender} → {receiver} ({into}, stage {AXIS_LABELS.get(str(r['stage']), r['stage'])})<br>"
        f"share {share:+.3f}: patching this path alone changes the logit difference by "
        f"{100 * share:+.1f}% of the clean–corrupt gap"
    )


def _add_class_nodes(
    fig: go.Figure, source: Source, task: str, classes: dict[tuple[int, int], list[str]]
) -> None:
    """One node trace per class present, named with its number of heads; a head is filled in its
    first class's colour."""
    primary: dict[str, list[tuple[int, int]]] = {}
    members: dict[str, int] = {}
    for head, member in classes.items():
        primary.setdefault(member[0], []).append(head)
        for cls in member:
            members[cls] = members.get(cls, 0) + 1
    for cls in [c for c in CLASSES if c in members] + sorted(set(members) - set(CLASSES)):
        heads = sorted(primary.get(cls, []))
        fig.add_trace(
            go.Scatter(
                x=[float(lay) for lay, _ in heads] if heads else [None],
                y=[float(h) for _, h in heads] if heads else [None],
                mode="markers",
                name=f"{CLASS_LABELS.get(cls, cls)} ({members[cls]})",
                legendgroup=cls,
                marker={
                    "size": 18,
                    "color": CLASS_COLOURS.get(cls, "#444"),
                    "line": {"color": "#fff", "width": 1},
                },
                text=[head_label(*h) for h in heads],
                hovertext=[_node_hover(source, task, h, classes[h]) for h in heads],
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )


def _add_class_rings(fig: go.Figure, classes: dict[tuple[int, int], list[str]]) -> None:
    """A head of several classes: one ring per further class around its node."""
    rings: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for head, member in classes.items():
        for level, cls in enumerate(member[1:], start=1):
            rings.setdefault((cls, level), []).append(head)
    for (cls, level), heads in sorted(rings.items(), key=lambda item: item[0][1]):
        fig.add_trace(
            go.Scatter(
                x=[float(lay) for lay, _ in heads],
                y=[float(h) for _, h in heads],
                mode="markers",
                name=f"also {CLASS_LABELS.get(cls, cls)}",
                legendgroup=cls,
                showlegend=False,
                marker={
                    "size": 18 + 8 * level,
                    "symbol": "circle-open",
                    "color": CLASS_COLOURS.get(cls, "#444"),
                    "line": {"width": 2.5},
                },
                hoverinfo="skip",
            )
        )


def _add_stand_ins(
    fig: go.Figure,
    source: Source,
    task: str,
    classes: dict[tuple[int, int], list[str]],
    edges: pd.DataFrame,
) -> list[tuple[int, int]]:
    """Receivers that are no circuit head (stand-ins, or ends of edges), as open grey nodes; returns them."""
    extra = stand_ins(source, task)
    ends = {(int(r["receiver_layer"]), int(r["receiver_head"])) for r in edges.to_dict("records")}
    extra = sorted(set(extra) | {h for h in ends if h[0] >= 0 and h not in classes})
    if extra:
        fig.add_trace(
            go.Scatter(
                x=[float(lay) for lay, _ in extra],
                y=[float(h) for _, h in extra],
                mode="markers",
                name=STAND_IN,
                marker={
                    "size": 14,
                    "color": STAND_IN_COLOUR,
                    "symbol": "circle-open",
                    "line": {"width": 2.5},
                },
                text=[head_label(*h) for h in extra],
                hovertemplate="%{text}: receiver of a stage whose class was not found (one of the "
                "previous stage's strongest heads stands in)<extra></extra>",
            )
        )
    return extra


def _add_sink(fig: go.Figure, sink: Point) -> None:
    fig.add_trace(
        go.Scatter(
            x=[sink[0]],
            y=[sink[1]],
            mode="markers",
            name="logits at END",
            marker={"size": 24, "color": LOGITS_COLOUR, "symbol": "square"},
            text=["logits"],
            hovertemplate="the logits at END: edges into it are the name movers' and negative movers' "
            "direct path scores<extra></extra>",
        )
    )


def _graph_layout(fig: go.Figure, task: str, n_layers: int, n_heads: int, n_heads_in: int) -> None:
    fig.update_layout(
        title=titled(
            f"{task_label(task)} circuit",
            f"{counted(n_heads_in)} by class; edges: path patching into the next stage's receivers "
            "(width: |share of the gap|), left to right",
        ),
        xaxis={
            "title": {"text": "layer"},
            "tickvals": [*range(n_layers), n_layers],
            "ticktext": [*(str(i) for i in range(n_layers)), "logits"],
            "range": [-0.7, n_layers + 0.7],
            "zeroline": False,
            "showgrid": True,
        },
        yaxis={
            "title": {"text": "head"},
            "tickvals": list(range(n_heads)),
            "autorange": "reversed",
            "zeroline": False,
        },
        height=int(min(940, max(420, 180 + 38 * n_heads))),
        margin={"l": 60, "r": 20, "t": 80, "b": 100},
        plot_bgcolor="#ffffff",
        legend=legend_below(),
    )
