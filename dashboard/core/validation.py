"""The held-out validation of head roles, shown one way everywhere: terminal lines, a figure of each
role's effect against its null, a dashboard block and a report section (docs/validation.md)."""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go
from dash import dcc
from dash import html as dhtml
from dash.development.base_component import Component

from analyses.runstore import Run
from analyses.validation import context_columns, label, number, summary_lines, verdict

__all__ = ["summary_lines", "validation_block", "validation_figure", "validation_sections"]
from dashboard.core import figures
from dashboard.core.page import GRAPH_CONFIG
from dashboard.core.section import ReportSection, figure_html, table_html

PASS, FAIL = "#2a9d8f", "#d1495b"
NULL_COLOUR = "rgba(120, 120, 120, 0.35)"


def validation_figure(table: pd.DataFrame, title: str = "Held-out validation of head roles") -> go.Figure:
    """Per test, the null's 5–95% band (grey) with its mean, and the effect with its interval
    (green when validated, red when not)."""
    fig = go.Figure()
    if table is None or not len(table):
        return figures.message_figure("No role was tested on held-out inputs in this run.")
    context = context_columns(table)
    table = table.reset_index(drop=True)
    labels = [label(row, context) for _, row in table.iterrows()]
    fig.add_trace(
        go.Bar(
            y=labels,
            x=(table["null_high"] - table["null_low"]).tolist(),
            base=table["null_low"].tolist(),
            orientation="h",
            marker_color=NULL_COLOUR,
            name="null: 5–95% of random sets",
            hovertemplate="null 5–95%%: %{base:.3g} to %{x:.3g} wide<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            y=labels,
            x=table["null_mean"].tolist(),
            mode="markers",
            marker={"symbol": "line-ns-open", "size": 14, "color": "#555"},
            name="null mean",
        )
    )
    for ok, colour in ((True, PASS), (False, FAIL)):
        part = table[table["validated"].astype(bool) == ok]
        if not len(part):
            continue
        ys = [labels[i] for i in part.index]
        fig.add_trace(
            go.Scatter(
                y=ys,
                x=part["effect"].tolist(),
                mode="markers",
                marker={"size": 10, "color": colour},
                error_x=figures.error_bars(
                    part["effect"].to_numpy(float),
                    part["effect_low"].to_numpy(float),
                    part["effect_high"].to_numpy(float),
                ),
                name="validated" if ok else "not validated",
                customdata=part[["percentile", "p_value", "measure"]].to_numpy(),
                hovertemplate="effect %{x:.3g}<br>percentile %{customdata[0]:.0f}, p = %{customdata[1]:.2g}"
                "<br>%{customdata[2]}<extra></extra>",
            )
        )
    measures = sorted(set(map(str, table["measure"])))
    fig.update_layout(
        title=figures.titled(title, "; ".join(measures)),
        height=160 + 34 * len(labels),
        xaxis_title="effect on held-out inputs",
        yaxis={"autorange": "reversed"},
        barmode="overlay",
        legend={"orientation": "h", "y": -0.2},
        margin={"l": 20, "r": 20},
    )
    return fig


def _rows(table: pd.DataFrame) -> list[list[str]]:
    context = context_columns(table)
    return [
        [
            *(str(row[c]) for c in context),
            str(row["role"]),
            str(row["heads"]),
            str(row["measure"]),
            f"{number(row['effect'])} [{number(row['effect_low'])}, {number(row['effect_high'])}]",
            f"{number(row['null_mean'])} ± {number(row['null_std'])} (n={int(row['n_null'])})",
            number(row["percentile"], ".0f"),
            number(row["p_value"], ".2g"),
            verdict(row),
            str(row["inputs"]),
        ]
        for _, row in table.iterrows()
    ]


def _header(table: pd.DataFrame) -> list[str]:
    return [
        *context_columns(table),
        "role",
        "heads",
        "measure",
        "effect (95%)",
        "null",
        "percentile",
        "p",
        "verdict",
        "held-out inputs",
    ]


def intro(table: pd.DataFrame) -> str:
    """What the block shows, with the run's own significance level."""
    levels = sorted({float(a) for a in table["alpha"]}) if "alpha" in table else [0.05]
    level = " or ".join(f"{a:g}" for a in levels) or "0.05"
    return (
        "Each role was found on discovery inputs and tested on held-out inputs it was not found on. The "
        "effect of intervening on its heads is compared with the same intervention on random head sets "
        "of the same size drawn from outside the role. A role is validated when the effect goes the "
        f"predicted way, its 95% interval excludes zero and p ≤ {level}."
    )


def validation_block(table: pd.DataFrame, graph_id: str = "validation-graph") -> Component:
    """The dashboard's block: the figure and the table."""
    if table is None or not len(table):
        return dhtml.P("No role was tested on held-out inputs in this run.")
    return dhtml.Div(
        [
            dhtml.P(intro(table)),
            dcc.Graph(id=graph_id, figure=validation_figure(table), config=GRAPH_CONFIG),
            dhtml.Table(
                [
                    dhtml.Thead(dhtml.Tr([dhtml.Th(h) for h in _header(table)])),
                    dhtml.Tbody([dhtml.Tr([dhtml.Td(c) for c in row]) for row in _rows(table)]),
                ],
                className="data",
            ),
        ],
        className="validation",
    )


def validation_sections(run: Run, table_name: str = "validation") -> list[ReportSection]:
    """The report section of a run's validation table (none when the run has no such table)."""
    if table_name not in run.table_names:
        return []
    table = run.table(table_name)
    body = (
        f"<p>{html.escape(intro(table))}</p>"
        + figure_html(validation_figure(table), f"{table_name}-figure", wide=True)
        + table_html(_header(table), _rows(table))
    )
    return [ReportSection(table_name, "Held-out validation of head roles", body)]
