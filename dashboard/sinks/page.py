"""The sinks page: which heads sink on which position, per input set; hidden sinks on an example.

Elements (stable ids): ``sinks-run`` (run picker), ``sinks-input`` (input set), ``sinks-quantity``
(mean alpha_k or the share of samples with alpha_k > eps), ``sinks-position`` (k), ``sinks-heatmap``
(layer x head map), ``sinks-bars`` (Sink_1 per input set), ``sinks-positions`` (the per-position
sink map), ``sinks-example`` (example picker), ``sinks-example-figure`` (% of heads per position
of that example, tokens on the axis), ``sinks-example-table`` (its listed hidden sinks),
``sinks-tokens`` (the tokens most often hidden sinks), ``sinks-norms`` (first token vs others);
``sinks-focus`` and ``sinks-focus-head``: the head the URL's ``head=L<layer>H<head>`` focuses, outlined
on the map.

The callbacks are methods taking plain values, so tests call them directly;
:meth:`SinksPage.register_callbacks` only wires them to the elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, html
from dash.development.base_component import Component

from analyses.runstore import Run
from dashboard.core import figures, focus
from dashboard.core import page as ui
from dashboard.core.page import AnalysisPage, empty_figure, why
from dashboard.sinks import views
from probe.errors import HeadlabError

DEFAULT_INPUT = "natural"
DEFAULT_QUANTITY: views.HeadQuantity = "alpha"
_FIGURE_ERRORS = (HeadlabError, KeyError)  # the run-wide figures let a ValueError through


class SinksPage(AnalysisPage):
    path: ClassVar[str] = "/sinks"
    title: ClassVar[str] = "Sinks"
    analysis: ClassVar[str] = "sinks"

    # ------------------------------------------------------------------------------------ layout

    def layout(self, params: Mapping[str, str]) -> Component:
        choice = self.choose_run(params)
        input_set = params.get("input") if params.get("input") in views.INPUT_LABELS else DEFAULT_INPUT
        return html.Div(
            [
                html.H2("Attention sinks"),
                *self.focus_elements(self.focus(params, choice.run_id)),
                html.P(
                    "alpha_k is the mean attention position k receives from the queries that see it; a head "
                    "sinks on k when alpha_k > eps (per sample). Sink_k is the share of all heads that do, "
                    "averaged over samples (Gu et al., ICLR 2025). Position 0 is the first real token.",
                    className="hint",
                ),
                ui.controls(
                    self.run_picker(choice),
                    ui.radio(
                        "input set",
                        "sinks-input",
                        [{"label": label, "value": s} for s, label in views.INPUT_LABELS.items()],
                        input_set,
                    ),
                ),
                *choice.notes,
                ui.columns(
                    ui.panel(ui.graph("sinks-bars")),
                    ui.panel(ui.graph("sinks-positions"), css=ui.DETAIL_PANEL),
                ),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(
                            ui.radio(
                                "map of",
                                "sinks-quantity",
                                [
                                    {"label": views.HEAD_QUANTITY_LABELS[q], "value": q}
                                    for q in views.HEAD_QUANTITIES
                                ],
                                DEFAULT_QUANTITY,
                            ),
                            ui.dropdown("position k", "sinks-position", value=0),
                        ),
                        ui.graph("sinks-heatmap"),
                    ),
                    ui.panel(
                        ui.dropdown("example", "sinks-example"),
                        ui.graph("sinks-example-figure"),
                        html.Div(id="sinks-example-table"),
                        html.Div(id="sinks-tokens"),
                        css=ui.DETAIL_PANEL,
                    ),
                ),
                ui.panel(ui.graph("sinks-norms"), css="panel"),
            ],
            className="page",
        )

    # --------------------------------------------------------------------------------- callbacks

    def _set(self, run: Run, input_set: str | None) -> str:
        sets = views.input_sets(run)
        if input_set in sets:
            return str(input_set)
        raise KeyError(
            f"this run did not measure {views.INPUT_LABELS.get(str(input_set), input_set)!r}; "
            f"it has {', '.join(sets)}"
        )

    def position_options(self, run_id: str | None, current: int | None) -> tuple[list[dict[str, Any]], int]:
        """k = 0 … T-1 of the run (0 is the first real token)."""
        if not run_id:
            return [], 0
        try:
            T = views.seq_len(self._run(run_id))
        except (HeadlabError, KeyError):
            return [], 0
        options = [{"label": "0 (first token)" if k == 0 else str(k), "value": k} for k in range(T)]
        return options, current if isinstance(current, int) and 0 <= current < T else 0

    def heatmap_figure(
        self, run_id: str | None, input_set: str | None, quantity: str | None, position: int | None
    ) -> go.Figure:
        def draw(run: Run) -> go.Figure:
            q: views.HeadQuantity = "rate" if quantity == "rate" else "alpha"
            fig = views.heatmap(run, self._set(run, input_set), q, int(position or 0))
            fig.update_layout(margin={"l": 50, "r": 10, "t": 50, "b": 45})
            return fig

        return self._figure(run_id, draw, uirevision=str(run_id))

    def bars_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, views.sink_bars, errors=_FIGURE_ERRORS)

    def positions_figure(self, run_id: str | None, input_set: str | None) -> go.Figure:
        return self._figure(
            run_id, lambda run: views.position_map(run, highlight=input_set), errors=_FIGURE_ERRORS
        )

    def norms_figure(self, run_id: str | None, input_set: str | None) -> go.Figure:
        return self._figure(
            run_id, lambda run: views.norms_figure(run, self._set(run, input_set)), errors=_FIGURE_ERRORS
        )

    def example_options(
        self, run_id: str | None, input_set: str | None, current: int | None
    ) -> tuple[list[dict[str, Any]], int | None]:
        if not run_id:
            return [], None
        try:
            run = self._run(run_id)
            shown = self._set(run, input_set)
            ids = views.example_ids(run, shown)
            options = [{"label": views.example_preview(run, shown, e), "value": e} for e in ids]
        except (HeadlabError, KeyError):
            return [], None
        if not ids:
            return [], None
        return options, current if current in ids else ids[0]

    def example_figure(self, run_id: str | None, input_set: str | None, example: int | None) -> go.Figure:
        if not run_id:
            return empty_figure("no sinks run selected")
        try:
            run = self._run(run_id)
            shown = self._set(run, input_set)
            if not views.example_ids(run, shown):
                return empty_figure(views.missing_examples(run, shown))
            if example is None:
                return empty_figure("select an example")
            fig = views.example_figure(run, shown, int(example))
        except (HeadlabError, KeyError, ValueError) as err:
            return empty_figure(f"cannot show the example: {why(err)}")
        fig.update_layout(uirevision=f"{run_id}/{input_set}/{example}")
        return figures.clear_modebar(fig)

    def example_table(self, run_id: str | None, input_set: str | None, example: int | None) -> Component:
        if not run_id or example is None:
            return html.P("No example selected.", className="hint")
        try:
            run = self._run(run_id)
            rows = views.hidden_sinks_of_example(run, self._set(run, input_set), int(example))
        except (HeadlabError, KeyError, ValueError) as err:
            return html.P(f"cannot list hidden sinks: {why(err)}", className="error")
        if rows.empty:
            return html.P(f"Example {example} has no hidden sinks beyond the first token.", className="hint")
        return html.Div(
            [
                html.H3(f"Hidden sinks of example {example}"),
                _table(
                    rows,
                    {"position": "k", "token": "token", "sink_pct": "% of heads", "n_heads": "heads"},
                ),
            ]
        )

    def tokens_table(self, run_id: str | None, input_set: str | None) -> Component:
        if not run_id:
            return html.P("No run selected.", className="hint")
        try:
            run = self._run(run_id)
            shown = self._set(run, input_set)
            rows = views.top_hidden_tokens(run, shown)
        except (HeadlabError, KeyError) as err:
            return html.P(f"cannot list hidden-sink tokens: {why(err)}", className="error")
        title = html.H3(f"Tokens that become hidden sinks: {views.INPUT_LABELS[shown]}")
        if rows.empty:
            return html.Div(
                [title, html.P("No position beyond the first is a listed sink.", className="hint")]
            )
        return html.Div(
            [
                title,
                _table(
                    rows,
                    {
                        "token": "token",
                        "sink_occurrences": "as hidden sink",
                        "occurrences": "occurrences",
                        "mean_sink_pct": "mean % of heads",
                        "max_sink_pct": "max % of heads",
                    },
                ),
            ]
        )

    def register_callbacks(self, app: Dash) -> None:
        app.callback(
            Output("sinks-position", "options"),
            Output("sinks-position", "value"),
            Input("sinks-run", "value"),
            State("sinks-position", "value"),
        )(self.position_options)
        app.callback(
            Output("sinks-heatmap", "figure"),
            Input("sinks-run", "value"),
            Input("sinks-input", "value"),
            Input("sinks-quantity", "value"),
            Input("sinks-position", "value"),
        )(self.heatmap_figure)
        focus.register_outline(app, "sinks-heatmap", "sinks-focus-head")
        app.callback(Output("sinks-bars", "figure"), Input("sinks-run", "value"))(self.bars_figure)
        app.callback(
            Output("sinks-positions", "figure"), Input("sinks-run", "value"), Input("sinks-input", "value")
        )(self.positions_figure)
        app.callback(
            Output("sinks-norms", "figure"), Input("sinks-run", "value"), Input("sinks-input", "value")
        )(self.norms_figure)
        app.callback(
            Output("sinks-example", "options"),
            Output("sinks-example", "value"),
            Input("sinks-run", "value"),
            Input("sinks-input", "value"),
            State("sinks-example", "value"),
        )(self.example_options)
        app.callback(
            Output("sinks-example-figure", "figure"),
            Input("sinks-run", "value"),
            Input("sinks-input", "value"),
            Input("sinks-example", "value"),
        )(self.example_figure)
        app.callback(
            Output("sinks-example-table", "children"),
            Input("sinks-run", "value"),
            Input("sinks-input", "value"),
            Input("sinks-example", "value"),
        )(self.example_table)
        app.callback(
            Output("sinks-tokens", "children"), Input("sinks-run", "value"), Input("sinks-input", "value")
        )(self.tokens_table)


def _table(rows: pd.DataFrame, columns: Mapping[str, str]) -> Component:
    def cell(column: str, value: Any) -> Component:
        if column == "token":
            return html.Td(html.Code(repr(str(value))))
        if isinstance(value, float):
            return html.Td(f"{value:.1f}", className="num")
        return html.Td(str(value), className="num")

    header = html.Tr(
        [html.Th(label, className="" if c == "token" else "num") for c, label in columns.items()]
    )
    body = [html.Tr([cell(c, row[c]) for c in columns]) for _, row in rows.iterrows()]
    return html.Table([html.Thead(header), html.Tbody(body)], className="data")
