"""The sinks page: which heads sink on which position, per input set; hidden sinks on an example.

Elements (stable ids): ``sinks-run`` (run picker), ``sinks-input`` (input set), ``sinks-quantity``
(mean alpha_k or the share of samples with alpha_k > eps), ``sinks-position`` (k), ``sinks-heatmap``
(layer x head map), ``sinks-bars`` (Sink_1 per input set), ``sinks-positions`` (the per-position
sink map), ``sinks-example`` (example picker), ``sinks-example-figure`` (% of heads per position
of that example, tokens on the axis), ``sinks-example-table`` (its listed hidden sinks),
``sinks-tokens`` (the tokens most often hidden sinks), ``sinks-norms`` (first token vs others).

The callbacks are methods taking plain values, so tests call them directly;
:meth:`SinksPage.register_callbacks` only wires them to the elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dcc, html
from dash.development.base_component import Component

from analyses.runstore import Run
from dashboard import figures
from dashboard.pages.base import Page
from dashboard.views import sinks as views
from probe.errors import HeadlabError

GRAPH_CONFIG: dcc.Graph.Config = {"displaylogo": False, "responsive": True}
DEFAULT_INPUT = "natural"
DEFAULT_QUANTITY: views.HeadQuantity = "alpha"


class SinksPage(Page):
    path: ClassVar[str] = "/sinks"
    title: ClassVar[str] = "Sinks"
    analysis: ClassVar[str | None] = "sinks"

    # ------------------------------------------------------------------------------------ layout

    def run_options(self) -> list[dict[str, Any]]:
        """Intact sinks runs (newest first), then damaged ones, listed but disabled."""
        entries = self.catalog.entries("sinks")
        ok = [{"label": e.label, "value": e.run_id} for e in entries if e.ok]
        damaged = [
            {"label": f"⚠ {e.run_id} ({e.status})"[:160], "value": e.run_id, "disabled": True}
            for e in entries
            if not e.ok
        ]
        return ok + damaged

    def layout(self, params: Mapping[str, str]) -> Component:
        options = self.run_options()
        offered = [o["value"] for o in options if not o.get("disabled")]
        wanted = params.get("run")
        run_id = wanted if wanted in offered else (offered[0] if offered else None)
        input_set = params.get("input") if params.get("input") in views.INPUT_LABELS else DEFAULT_INPUT
        notes: list[Component | str] = []
        if not offered:
            notes.append(
                html.P(
                    [
                        f"No intact sinks run under {self.catalog.root}. Make one with ",
                        html.Code(f"headlab run sinks --root {self.catalog.root}"),
                        ".",
                    ],
                    className="error",
                )
            )
        elif wanted and wanted != run_id:
            notes.append(
                html.P(
                    f"Run {wanted!r} is not an intact sinks run under the root; showing the newest.",
                    className="error",
                )
            )
        if len(options) > len(offered):
            notes.append(
                html.P(
                    f"{len(options) - len(offered)} damaged sinks run(s) listed but not offered; see the Runs page.",
                    className="hint",
                )
            )

        def control(label: str, element: Component, element_id: str, css: str = "control") -> Component:
            return html.Div([html.Label(label, htmlFor=element_id), element], className=css)

        def graph(element_id: str) -> Component:
            return dcc.Graph(id=element_id, config=GRAPH_CONFIG, figure=_empty("loading…"))

        return html.Div(
            [
                html.H2("Attention sinks"),
                html.P(
                    "alpha_k is the mean attention position k receives from the queries that see it; a head "
                    "sinks on k when alpha_k > eps (per sample). Sink_k is the share of all heads that do, "
                    "averaged over samples (Gu et al., ICLR 2025). Position 0 is the first real token.",
                    className="hint",
                ),
                html.Div(
                    [
                        control(
                            "run",
                            dcc.Dropdown(
                                id="sinks-run",
                                options=options,
                                value=run_id,
                                clearable=False,
                                placeholder="no sinks runs",
                            ),
                            "sinks-run",
                            "control control-run",
                        ),
                        control(
                            "input set",
                            dcc.RadioItems(
                                id="sinks-input",
                                options=[
                                    {"label": label, "value": s} for s, label in views.INPUT_LABELS.items()
                                ],
                                value=input_set,
                                inline=True,
                                className="radio-inline",
                            ),
                            "sinks-input",
                        ),
                    ],
                    className="controls",
                ),
                *notes,
                html.Div(
                    [
                        html.Div([graph("sinks-bars")], className="col-map panel"),
                        html.Div([graph("sinks-positions")], className="col-detail panel"),
                    ],
                    className="columns",
                ),
                html.Div(
                    [
                        html.Div(
                            [
                                html.Div(
                                    [
                                        control(
                                            "map of",
                                            dcc.RadioItems(
                                                id="sinks-quantity",
                                                options=[
                                                    {"label": views.HEAD_QUANTITY_LABELS[q], "value": q}
                                                    for q in views.HEAD_QUANTITIES
                                                ],
                                                value=DEFAULT_QUANTITY,
                                                inline=True,
                                                className="radio-inline",
                                            ),
                                            "sinks-quantity",
                                        ),
                                        control(
                                            "position k",
                                            dcc.Dropdown(id="sinks-position", value=0, clearable=False),
                                            "sinks-position",
                                            "control control-example",
                                        ),
                                    ],
                                    className="detail-controls",
                                ),
                                graph("sinks-heatmap"),
                            ],
                            className="col-map panel",
                        ),
                        html.Div(
                            [
                                control(
                                    "example",
                                    dcc.Dropdown(id="sinks-example", clearable=False),
                                    "sinks-example",
                                    "control control-example",
                                ),
                                graph("sinks-example-figure"),
                                html.Div(id="sinks-example-table"),
                                html.Div(id="sinks-tokens"),
                            ],
                            className="col-detail panel",
                        ),
                    ],
                    className="columns",
                ),
                html.Div([graph("sinks-norms")], className="panel"),
            ],
            className="page",
        )

    # --------------------------------------------------------------------------------- callbacks

    def _run(self, run_id: str) -> Run:
        return self.catalog.open(run_id, analysis="sinks")

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
        if not run_id:
            return _empty("no sinks run selected")
        try:
            run = self._run(run_id)
            shown = self._set(run, input_set)
            q: views.HeadQuantity = "rate" if quantity == "rate" else "alpha"
            fig = views.heatmap(run, shown, q, int(position or 0))
        except (HeadlabError, KeyError, ValueError) as err:
            return _empty(f"cannot show run {run_id}: {_why(err)}")
        fig.update_layout(uirevision=run_id, margin={"l": 50, "r": 10, "t": 50, "b": 45})
        return fig

    def bars_figure(self, run_id: str | None) -> go.Figure:
        if not run_id:
            return _empty("no sinks run selected")
        try:
            return views.sink_bars(self._run(run_id))
        except (HeadlabError, KeyError) as err:
            return _empty(f"cannot show run {run_id}: {_why(err)}")

    def positions_figure(self, run_id: str | None, input_set: str | None) -> go.Figure:
        if not run_id:
            return _empty("no sinks run selected")
        try:
            return views.position_map(self._run(run_id), highlight=input_set)
        except (HeadlabError, KeyError) as err:
            return _empty(f"cannot show run {run_id}: {_why(err)}")

    def norms_figure(self, run_id: str | None, input_set: str | None) -> go.Figure:
        if not run_id:
            return _empty("no sinks run selected")
        try:
            run = self._run(run_id)
            return views.norms_figure(run, self._set(run, input_set))
        except (HeadlabError, KeyError) as err:
            return _empty(f"cannot show run {run_id}: {_why(err)}")

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
            return _empty("no sinks run selected")
        try:
            run = self._run(run_id)
            shown = self._set(run, input_set)
            if not views.example_ids(run, shown):
                return _empty("this run kept no examples (n_examples=0)")
            if example is None:
                return _empty("select an example")
            fig = views.example_figure(run, shown, int(example))
        except (HeadlabError, KeyError, ValueError) as err:
            return _empty(f"cannot show the example: {_why(err)}")
        fig.update_layout(uirevision=f"{run_id}/{input_set}/{example}")
        return fig

    def example_table(self, run_id: str | None, input_set: str | None, example: int | None) -> Component:
        if not run_id or example is None:
            return html.P("No example selected.", className="hint")
        try:
            run = self._run(run_id)
            rows = views.hidden_sinks_of_example(run, self._set(run, input_set), int(example))
        except (HeadlabError, KeyError, ValueError) as err:
            return html.P(f"cannot list hidden sinks: {_why(err)}", className="error")
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
            return html.P(f"cannot list hidden-sink tokens: {_why(err)}", className="error")
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


def _empty(message: str) -> go.Figure:
    return figures.message_figure(message)


def _why(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
