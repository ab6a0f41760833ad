"""What a report section is: a titled HTML fragment built from one run."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

from analyses.runstore import Run
from dashboard.core import figures


@dataclass(frozen=True)
class ReportSection:
    """One section of a report: ``anchor`` (the HTML id, for the table of contents), a title and
    a body. ``body`` is HTML built by section code: it must escape every string from the run."""

    anchor: str
    title: str
    body: str


SectionBuilder = Callable[[Run], list[ReportSection]]


def table_html(
    header: Sequence[str] | None,
    rows: Iterable[Sequence[object]],
    *,
    css_class: str = "data",
    escape: bool = True,
) -> str:
    """A plain HTML table (no header row when ``header`` is None); cells are escaped unless
    ``escape=False`` (cells already HTML)."""

    def cell(value: object) -> str:
        text = "" if value is None else str(value)
        return html.escape(text) if escape else text

    head = ""
    if header is not None:
        head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}">{head}<tbody>{body}</tbody></table>'


def fmt(value: object, digits: int = 3) -> str:
    """Numbers with ``digits`` significant digits, everything else as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def figure_html(fig: go.Figure, div_id: str, *, wide: bool = False) -> str:
    """A figure as a report block (``wide``: one spanning the page's width)."""
    css = "figure wide" if wide else "figure"
    return f'<div class="{css}">{figures.figure_div(fig, div_id)}</div>'
