"""The head a page is asked to focus on: the URL parameter ``head=L<layer>H<head>`` (also
``<layer>-<head>``), as the head atlas's links pass it.

:func:`read` parses the parameter and checks it against the shown run's ``heads`` table;
:func:`elements` gives a page its banner ("Focused on L3H7 (from the head atlas)", with a link back
to the atlas; a one-line hint when the parameter names no head of the run) and a ``dcc.Store``
holding the focused head (:data:`FocusData`, None when there is none) for the callbacks that draw
layer x head maps; :func:`register_outline` outlines that head on a graph each time the page
draws it (a callback on the graph's own figure, so the page's callbacks keep their inputs), and
:func:`outline` on a figure. Nothing here raises on a bad parameter: it only says why the head is
not focused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, Patch, State, dcc, html
from dash.development.base_component import Component
from dash.exceptions import PreventUpdate

FocusData = dict[str, int]  # {"layer": l, "head": h} and "kv_head" where the run knows it
_HEAD = re.compile(r"[Ll](\d{1,4})[Hh](\d{1,4})|(\d{1,4})-(\d{1,4})")
ATLAS_PATH = "/atlas"
SHAPE_NAME = "head-focus"  # the outline's name, so that it is added once
COLOR = "#e4572e"  # as :func:`dashboard.core.figures.mark_head`


def parse_head(value: object) -> tuple[int, int] | None:
    """``L<layer>H<head>`` or ``<layer>-<head>`` as (layer, head); None for anything else."""
    if not isinstance(value, str):
        return None
    match = _HEAD.fullmatch(value.strip())
    if match is None:
        return None
    layer, head = (match[1], match[2]) if match[1] is not None else (match[3], match[4])
    return int(layer), int(head)


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


@dataclass(frozen=True)
class Focus:
    """What the ``head`` parameter asked for: ``wanted`` as given (None: absent), the focused
    ``data`` (None: no head focused) and ``problem``, why the parameter names no head (or "")."""

    wanted: str | None = None
    data: FocusData | None = None
    problem: str = ""
    atlas_run: str | None = None

    @property
    def head(self) -> tuple[int, int] | None:
        return None if self.data is None else (self.data["layer"], self.data["head"])

    @property
    def label(self) -> str:
        return head_label(*self.head) if self.head is not None else ""


def read(params: Mapping[str, str], heads: pd.DataFrame | None = None) -> Focus:
    """The focus ``params`` ask for, checked against ``heads`` (a run's heads table, with ``layer``
    and ``head`` columns; None: not checked, e.g. when no run is shown)."""
    wanted = params.get("head")
    atlas_run = params.get("atlas_run") or None
    if wanted is None or not wanted.strip():
        return Focus(atlas_run=atlas_run)
    parsed = parse_head(wanted)
    if parsed is None:
        shown = wanted if len(wanted) <= 40 else wanted[:40] + "…"
        return Focus(
            wanted, None, f"head={shown!r} names no head: write it as L<layer>H<head>, e.g. L3H7", atlas_run
        )
    layer, head = parsed
    data: FocusData = {"layer": layer, "head": head}
    if heads is None or not {"layer", "head"}.issubset(heads.columns):
        return Focus(wanted, data, "", atlas_run)
    row = heads[(heads["layer"] == layer) & (heads["head"] == head)]
    if row.empty:
        n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
        return Focus(
            wanted,
            None,
            f"{head_label(layer, head)} is not a head of this run's model "
            f"({n_layers} layers × {n_heads} heads); no head is focused",
            atlas_run,
        )
    if "kv_head" in heads.columns:
        data["kv_head"] = int(row["kv_head"].iloc[0])
    return Focus(wanted, data, "", atlas_run)


def atlas_link(focus: Focus) -> str:
    """The atlas page on the focused head (and the atlas run named by ``atlas_run``, if any)."""
    query = {"run": focus.atlas_run} if focus.atlas_run else {}
    return f"{ATLAS_PATH}?{urlencode({**query, 'head': focus.label})}"


def banner(focus: Focus, element_id: str) -> Component:
    """A line at the top of the page: the focused head with a link back to the atlas, or why the
    ``head`` parameter focuses nothing; empty when there is no such parameter."""
    if focus.wanted is None:
        return html.Div(id=element_id)
    if focus.data is None:
        return html.Div(html.P(focus.problem, className="hint"), id=element_id)
    return html.Div(
        html.P(
            [
                html.B(f"Focused on {focus.label}"),
                " (from the head atlas) · ",
                dcc.Link("back to the atlas", href=atlas_link(focus)),
            ],
            className="hint",
        ),
        id=element_id,
    )


def elements(focus: Focus, prefix: str) -> list[Component]:
    """The banner ``<prefix>-focus`` and the store ``<prefix>-focus-head`` (the focused head)."""
    return [banner(focus, f"{prefix}-focus"), dcc.Store(id=f"{prefix}-focus-head", data=focus.data)]


def as_data(value: Any) -> FocusData | None:
    """The store's content as :data:`FocusData`; None for anything else."""
    if not isinstance(value, Mapping):
        return None
    try:
        data = {"layer": int(value["layer"]), "head": int(value["head"])}
        if value.get("kv_head") is not None:
            data["kv_head"] = int(value["kv_head"])
    except (KeyError, TypeError, ValueError):
        return None
    return data


def head_of(value: Any) -> tuple[int, int] | None:
    """The focused (layer, head) in the store, or None."""
    data = as_data(value)
    return None if data is None else (data["layer"], data["head"])


def _numeric(labels: Any) -> bool:
    try:
        [float(str(v)) for v in labels]
    except ValueError:
        return False
    return True


def _size(z: Any) -> tuple[int, int]:
    """(rows, columns) of a heat map's ``z``: nested lists, an array, or plotly's typed array
    (``{"dtype", "bdata", "shape"}``, as the browser sends a figure back)."""
    if isinstance(z, Mapping):
        shape = z.get("shape")
        parts = [int(v) for v in (shape.split(",") if isinstance(shape, str) else shape or [])]
        return (parts[0], parts[1]) if len(parts) == 2 else (0, 0)
    rows = len(z)
    return rows, (len(z[0]) if rows else 0)


def _position(
    layout: Mapping[str, Any], axis: str, labels: Any, wanted: int, size: int, *, leading: bool = False
) -> float | None:
    """Where ``wanted`` sits on a heat map's ``axis`` ("x", "y2"...): its place among the axis
    labels (``leading``: a label's first word, as in ``"3 (sliding)"``), or the number itself on a
    numeric axis; with no labels, ``wanted`` if it is within ``size``."""
    if labels is None:
        return wanted if 0 <= wanted < size else None
    texts = [str(v).split()[0] if leading and str(v).split() else str(v) for v in labels]
    if str(wanted) not in texts:
        return None
    kind = (layout.get(f"{axis[0]}axis{axis[1:]}") or {}).get("type")
    if kind not in ("category", "multicategory") and _numeric(labels):
        return wanted
    return texts.index(str(wanted))


def focus_shapes(figure: Mapping[str, Any], focus: Any, *, kv: bool = False) -> list[dict[str, Any]]:
    """The outlines of the focused head (``focus``: the store's content) on each layer x head heat
    map of ``figure`` (a figure as plotly JSON; ``kv``: maps of KV heads, where the head's KV head is
    outlined); none when nothing is focused or no map has that cell."""
    data = as_data(focus)
    if data is None or (kv and "kv_head" not in data):
        return []
    column = data["kv_head"] if kv else data["head"]
    layout = figure.get("layout") or {}
    shapes: list[dict[str, Any]] = []
    done: set[tuple[str, str]] = set()
    for trace in figure.get("data") or []:
        if trace.get("type") != "heatmap" or trace.get("z") is None:
            continue
        axes = (trace.get("xaxis") or "x", trace.get("yaxis") or "y")
        rows, cols = _size(trace["z"])
        x = _position(layout, axes[0], trace.get("x"), column, cols)
        y = _position(layout, axes[1], trace.get("y"), data["layer"], rows, leading=True)
        if axes in done or x is None or y is None:
            continue
        done.add(axes)
        shapes.append(
            {
                "type": "rect",
                "name": SHAPE_NAME,
                "xref": axes[0],
                "yref": axes[1],
                "x0": x - 0.5,
                "x1": x + 0.5,
                "y0": y - 0.5,
                "y1": y + 0.5,
                "line": {"color": COLOR, "width": 3},
                "fillcolor": "rgba(0,0,0,0)",
            }
        )
    return shapes


def outline(fig: go.Figure, focus: Any, *, kv: bool = False) -> go.Figure:
    """``fig`` with :func:`focus_shapes` added."""
    for shape in focus_shapes(fig.to_plotly_json(), focus, kv=kv):
        fig.add_shape(**shape)
    return fig


def outline_patch(figure: Any, focus: Any, *, kv: bool = False) -> Patch:
    """The update that adds :func:`focus_shapes` to ``figure`` as the browser holds it (only its
    shapes travel back); PreventUpdate when there is nothing to add or it is outlined already."""
    if not isinstance(figure, Mapping):
        raise PreventUpdate
    shapes = list((figure.get("layout") or {}).get("shapes") or [])
    added = focus_shapes(figure, focus, kv=kv)
    if not added or any(isinstance(s, Mapping) and s.get("name") == SHAPE_NAME for s in shapes):
        raise PreventUpdate
    patch = Patch()
    patch["layout"]["shapes"] = [*shapes, *added]
    return patch


def register_outline(app: Dash, graph_id: str, store_id: str, *, kv: bool = False) -> None:
    """Outline the head in ``store_id`` on graph ``graph_id`` each time the page's own callback
    draws it (so that callback keeps its inputs)."""

    def draw(figure: Any, focus: Any) -> Patch:
        return outline_patch(figure, focus, kv=kv)

    app.callback(
        Output(graph_id, "figure", allow_duplicate=True),
        Input(graph_id, "figure"),
        State(store_id, "data"),
        prevent_initial_call=True,
    )(draw)
