"""The ACT page: held-out accuracy before and after attention calibration, which heads were kept,
the head search behind that choice, and the tokens that are hidden sinks.

Elements (stable ids): ``act-run`` (run picker), ``act-task`` (all tasks or one task: picks the head
search scope that task used), ``act-map`` (what the head map shows), ``act-settings`` (the run's
calibration settings), ``act-accuracy`` (accuracy before/after per task with 95% intervals and
chance), ``act-delta`` (the paired change with its interval), ``act-grid`` (layer x head map: tasks
keeping each head, or the chosen task's calibration delta with kept heads ringed, or hidden sinks),
``act-search`` (calibration delta of every searched head), ``act-margins`` (per held-out item,
margin before vs after), ``act-tokens`` (hidden-sink tokens), ``act-table`` (the tasks table),
``act-validation`` (each head search's kept set on held-out items against random head sets);
``act-focus`` and ``act-focus-head``: the head the URL's ``head=L<layer>H<head>`` focuses, outlined
on the map.

The callbacks are methods taking plain values, so tests call them directly;
:meth:`ActPage.register_callbacks` only wires them to the elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import plotly.graph_objects as go
from dash import Dash, Input, Output, State, html
from dash.development.base_component import Component

from dashboard.act import views
from dashboard.core import focus
from dashboard.core import page as ui
from dashboard.core.page import RUN_ERRORS, AnalysisPage, why
from dashboard.core.validation import validation_block

DEFAULT_MAP: views.MapKind = "kept"


class ActPage(AnalysisPage):
    path: ClassVar[str] = "/act"
    title: ClassVar[str] = "ACT"
    analysis: ClassVar[str] = "act"
    run_noun: ClassVar[str] = "ACT"

    # ------------------------------------------------------------------------------------ layout

    def layout(self, params: Mapping[str, str]) -> Component:
        choice = self.choose_run(params)
        kind = params.get("map") if params.get("map") in views.MAP_KINDS else DEFAULT_MAP
        task_options, task = self.task_options(choice.run_id, params.get("task"))
        return html.Div(
            [
                html.H2("ACT: attention calibration of hidden sinks"),
                *self.focus_elements(self.focus(params, choice.run_id)),
                html.P(
                    "A head has a sink on key k when alpha_k (mean attention k receives) exceeds the "
                    "threshold; the first sink is not calibrated and the later, hidden ones are: each "
                    "query row keeps beta of its attention on them and gives the rest to the other keys "
                    "(the first sink included with first_sink=share, the default; not with frozen). Heads are "
                    "searched one at a time on a calibration split and kept by the run's keep rule; the kept "
                    "heads are then calibrated together and scored on held-out items (Yu et al., ICML "
                    "2024), and tested there against random head sets of the same size.",
                    className="hint",
                ),
                *self.run_header(
                    choice,
                    ui.dropdown("task (head search scope)", "act-task", options=task_options, value=task),
                    findings=False,
                ),
                ui.columns(
                    ui.panel(ui.graph("act-accuracy"), css=ui.DETAIL_PANEL), ui.panel(ui.graph("act-delta"))
                ),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(
                            ui.radio(
                                "map of",
                                "act-map",
                                [{"label": views.MAP_LABELS[k], "value": k} for k in views.MAP_KINDS],
                                kind,
                            )
                        ),
                        ui.graph("act-grid"),
                    ),
                    ui.panel(ui.graph("act-search"), ui.graph("act-margins"), css=ui.DETAIL_PANEL),
                ),
                ui.columns(
                    ui.panel(ui.graph("act-tokens")), ui.panel(html.Div(id="act-table"), css=ui.DETAIL_PANEL)
                ),
                ui.panel(html.Div(id="act-validation")),
            ],
            className="page",
        )

    # --------------------------------------------------------------------------------- callbacks

    def task_options(self, run_id: str | None, current: str | None) -> tuple[list[dict[str, Any]], str]:
        """ "All tasks" and the run's tasks (each labelled with the search scope it used)."""
        options: list[dict[str, Any]] = [{"label": "all tasks", "value": views.ALL_TASKS}]
        if not run_id:
            return options, views.ALL_TASKS
        try:
            run = self._run(run_id)
            tasks = views.tasks_table(run)
        except RUN_ERRORS:
            return options, views.ALL_TASKS
        for row in tasks.itertuples(index=False):
            scope = str(row.scope)
            if not views.searched(run, scope):
                where = "no head search"
            else:
                where = "pooled head search" if scope == views.POOLED else "own head search"
            options.append(
                {"label": f"{row.task} ({where}, {int(row.n_kept)} heads kept)", "value": str(row.task)}
            )
        values = [o["value"] for o in options]
        return options, current if current is not None and current in values else views.ALL_TASKS

    def settings_text(self, run_id: str | None) -> str:
        return self._text(run_id, views.settings_line)

    def accuracy_figure(self, run_id: str | None, task: str | None) -> go.Figure:
        return self._figure(run_id, lambda run: views.accuracy_figure(run, highlight=task))

    def delta_figure(self, run_id: str | None, task: str | None) -> go.Figure:
        return self._figure(run_id, lambda run: views.delta_figure(run, highlight=task))

    def grid_figure(self, run_id: str | None, task: str | None, kind: str | None) -> go.Figure:
        shown: views.MapKind = "hidden" if kind == "hidden" else "kept"
        return self._figure(run_id, lambda run: views.head_grid(run, task, shown), f"{run_id}/grid")

    def search_figure(self, run_id: str | None, task: str | None) -> go.Figure:
        return self._figure(run_id, lambda run: views.search_figure(run, task))

    def margin_figure(self, run_id: str | None, task: str | None) -> go.Figure:
        return self._figure(run_id, lambda run: views.margin_figure(run, task))

    def tokens_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, views.sink_tokens_figure)

    def tasks_table(self, run_id: str | None, task: str | None) -> Component:
        if not run_id:
            return html.P("No run selected.", className="hint")
        try:
            rows = views.task_rows(self._run(run_id))
        except RUN_ERRORS as err:
            return html.P(f"cannot list the tasks: {why(err)}", className="error")
        header = html.Tr(
            [
                html.Th(label, className="" if c in ("task", "kind", "scope") else "num")
                for c, label in views.TASK_COLUMNS.items()
            ]
        )
        body = [
            html.Tr(
                [
                    html.Td(row[c], className="" if c in ("task", "kind", "scope") else "num")
                    for c in views.TASK_COLUMNS
                ],
                className="current" if row["task"] == task else "",
            )
            for _, row in rows.iterrows()
        ]
        return html.Div(
            [
                html.H3("Tasks"),
                html.Table([html.Thead(header), html.Tbody(body)], className="data", id="act-tasks-table"),
                html.P(
                    "Accuracies on the held-out split, 95% intervals; the change is paired over the same "
                    "items. 'head search': the scope whose kept heads the task was calibrated with.",
                    className="hint",
                ),
            ]
        )

    def validation_panel(self, run_id: str | None) -> Component:
        """The held-out validation of every head search's kept set (the shared block), with what was
        tested."""

        def build(run: Any) -> Component:
            checks = views.validation_table(run)
            if checks is None:
                return html.P(
                    "This run was made before ACT validated its kept heads; run it again to see the test.",
                    className="hint",
                )
            return html.Div(
                [
                    html.H3("Held-out validation of the kept heads"),
                    html.P(views.validation_note(run), className="hint"),
                    validation_block(checks, graph_id="act-validation-graph"),
                ]
            )

        return self._block(run_id, build, "cannot show the validation")

    def register_callbacks(self, app: Dash) -> None:
        app.callback(
            Output("act-task", "options"),
            Output("act-task", "value"),
            Input("act-run", "value"),
            State("act-task", "value"),
        )(self.task_options)
        app.callback(Output("act-settings", "children"), Input("act-run", "value"))(self.settings_text)
        app.callback(Output("act-accuracy", "figure"), Input("act-run", "value"), Input("act-task", "value"))(
            self.accuracy_figure
        )
        app.callback(Output("act-delta", "figure"), Input("act-run", "value"), Input("act-task", "value"))(
            self.delta_figure
        )
        app.callback(
            Output("act-grid", "figure"),
            Input("act-run", "value"),
            Input("act-task", "value"),
            Input("act-map", "value"),
        )(self.grid_figure)
        focus.register_outline(app, "act-grid", "act-focus-head")
        app.callback(Output("act-search", "figure"), Input("act-run", "value"), Input("act-task", "value"))(
            self.search_figure
        )
        app.callback(Output("act-margins", "figure"), Input("act-run", "value"), Input("act-task", "value"))(
            self.margin_figure
        )
        app.callback(Output("act-tokens", "figure"), Input("act-run", "value"))(self.tokens_figure)
        app.callback(Output("act-validation", "children"), Input("act-run", "value"))(self.validation_panel)
        app.callback(Output("act-table", "children"), Input("act-run", "value"), Input("act-task", "value"))(
            self.tasks_table
        )
