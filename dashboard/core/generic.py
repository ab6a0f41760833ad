"""The section every analysis gets until it registers its own: its heads table as heat maps."""

from __future__ import annotations

import html

import pandas as pd

from analyses.runstore import Run
from dashboard.core import figures
from dashboard.core.section import ReportSection, figure_html

_ID_COLUMNS = frozenset({"layer", "head", "kv_head"})
MAX_MAPS = 12


def metric_columns(heads: pd.DataFrame) -> list[str]:
    """Numeric per-head columns other than identifiers and standard errors."""
    return [
        str(c)
        for c in heads.columns
        if c not in _ID_COLUMNS
        and not str(c).endswith("_sem")
        and pd.api.types.is_numeric_dtype(heads[c])
        and not pd.api.types.is_bool_dtype(heads[c])
    ]


def report_sections(run: Run) -> list[ReportSection]:
    heads = run.heads
    columns = metric_columns(heads) if {"layer", "head"} <= set(heads.columns) else []
    intro = (
        f"<p>No report section is registered for the analysis <code>{html.escape(run.analysis)}</code>; "
        "this is one heat map per numeric column of its <code>heads</code> table.</p>"
    )
    if not columns:
        return [
            ReportSection("heads", "Heads", intro + "<p>The heads table has no numeric metric columns.</p>")
        ]
    maps = "".join(
        figure_html(figures.head_heatmap(heads, c), f"heads-heatmap-{i}")
        for i, c in enumerate(columns[:MAX_MAPS])
    )
    more = f"<p>{len(columns) - MAX_MAPS} more columns not drawn.</p>" if len(columns) > MAX_MAPS else ""
    return [ReportSection("heads", "Heads", intro + f'<div class="grid">{maps}</div>' + more)]
