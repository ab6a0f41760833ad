"""The VHR sweep and the held-out validation of VHR's heads, read for the VHD page and the report:
the ``sweep`` table as a figure of paired changes (CHAIR_S, CHAIR_I, recall) per alpha and layer
set, its reading in sentences, and the ``validation`` table (drawn by :mod:`dashboard.core.validation`).

Both tables are optional: a ``vhd`` run, or a ``vhr`` run with ``sweep=off`` / ``validation=False``,
has none or empty ones, and the figures say so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses.vhd import sweep_lines
from dashboard.core import figures as shared
from dashboard.core.common import Source
from dashboard.vhd import figures, views

PANELS = (("CHAIR_S", "Δ CHAIR_S"), ("CHAIR_I", "Δ CHAIR_I"), ("recall", "Δ object recall"))
SUPPRESS_SYMBOL = "diamond"


def sweep_table(source: Source) -> pd.DataFrame:
    return views._optional(source, "sweep")


def validation_table(source: Source) -> pd.DataFrame:
    return views._optional(source, "validation")


def sweep_sentences(source: Source) -> list[str]:
    """The best and worst reinforcing setting and the converse control, as in the terminal."""
    return [line.strip() for line in sweep_lines(sweep_table(source))]


def sweep_figure(source: Source) -> go.Figure:
    """Paired change against the unmodified model of each sweep setting (alpha × layers), one panel
    per metric; circles reinforce, diamonds suppress (alpha < 1); green: the interval shows an
    improvement, red: a worsening, grey: it holds zero."""
    s = sweep_table(source)
    if s.empty:
        return shared.message_figure("No VHR sweep in this run (a vhd run, or sweep=off).")
    order = list(dict.fromkeys(s["setting"].astype(str)))
    fig, rows, cols = figures._panel_grid([title for _, title in PANELS], cols=3)
    for i, (metric, _) in enumerate(PANELS):
        part = s[s["metric"] == metric].set_index(s.loc[s["metric"] == metric, "setting"].astype(str))
        part = part.reindex(order)
        values = part["delta"].to_numpy(float)
        lo, hi = part["delta_lo"].to_numpy(float), part["delta_hi"].to_numpy(float)
        verdicts = [views.verdict(metric, a, b) for a, b in zip(lo, hi, strict=True)]
        symbols = [SUPPRESS_SYMBOL if k == "suppress" else "circle" for k in part["intervention"]]
        row, col = figures._add_points(
            fig,
            i,
            cols,
            values,
            lo,
            hi,
            x=order,
            name=f"Δ {metric}",
            marker={
                "size": 11,
                "symbol": symbols,
                "color": [figures.VERDICT_COLOURS[v] for v in verdicts],
                "line": {"width": 1, "color": "#222"},
            },
            customdata=np.stack([lo, hi, part["value"].to_numpy(float), part["baseline"].to_numpy(float)], 1),
            hovertemplate="%{x}: Δ" + metric + " %{y:+.3f} [%{customdata[0]:+.3f}, %{customdata[1]:+.3f}]"
            "<br>%{customdata[2]:.3f} against %{customdata[3]:.3f} unmodified<extra></extra>",
        )
        fig.add_hline(y=0, line={"color": "#222", "width": 1.2}, row=row, col=col)
    subtitle = (
        "setting − unmodified model on the same scenes, resampled together; circles reinforce, "
        "diamonds suppress<br>green: better, red: worse, grey: the interval holds 0"
    )
    return figures._panel_layout(fig, rows, "VHR sweep: alpha and layers", subtitle)
