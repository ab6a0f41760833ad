"""The circuits page: the IOI / Colored Objects circuit found by path patching, and its reuse.

One page serves the three run kinds of :mod:`analyses.circuits`: ``ioi`` and ``colored-objects``
(one task each) and ``circuit-reuse`` (both tasks, their overlap and the intervention).

Elements (stable ids): ``circuits-run`` (run picker), ``circuits-settings`` (the run's settings),
``circuits-findings`` (sentences reading the run's numbers), ``circuits-metrics`` (logit difference
and accuracies per task), ``circuits-faithfulness`` (found circuit vs random and empty circuits),
``circuits-task`` (the task whose circuit is drawn), ``circuits-graph`` (the circuit as a graph of
heads by class with the path-patching edges), ``circuits-classes`` (its heads by class, as a table,
and what each stage patched into), ``circuits-validation`` (each class tested on held-out prompts
against random head sets), ``circuits-stage`` (activation patching or a path-patching stage),
``circuits-heatmaps`` (layer x head maps of that stage, the tasks side by side), ``circuits-overlap``
(overlap vs top-p% per stage, the 2% point marked), ``circuits-iv-metric`` and
``circuits-intervention`` (Colored Objects before, with IOI heads edited, with random heads edited);
those two sit in ``circuits-reuse``, which is drawn only for a circuit-reuse run (another run gets
the line ``circuits-reuse-note`` saying why there is no overlap or intervention instead).
``circuits-focus`` and ``circuits-focus-head``: the head the URL's ``head=L<layer>H<head>`` focuses,
outlined on the stage's maps.

The callbacks are methods taking plain values, so tests call them directly;
:meth:`CircuitsPage.register_callbacks` only wires them to the elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import plotly.graph_objects as go
from dash import Dash, Input, Output, State, html
from dash.development.base_component import Component

from analyses.runstore import Run
from dashboard.circuits import figures, graph, views
from dashboard.core import focus
from dashboard.core import page as ui
from dashboard.core.page import RUN_ERRORS, MultiAnalysisPage, why
from dashboard.core.validation import validation_block

DEFAULT_AXIS = "activation"
DEFAULT_IV_METRIC: views.IvMetric = "accuracy"
FINDING_TITLES = {
    "metrics": "Task performance",
    "circuit": "Heads by class",
    "faithfulness": "Faithfulness",
    "reuse": "Reuse",
    "intervention": "Intervention",
}


class CircuitsPage(MultiAnalysisPage):
    path: ClassVar[str] = "/circuits"
    title: ClassVar[str] = "Circuits"
    analysis: ClassVar[str] = "circuit-reuse"  # the run kind suggested when there is none
    analyses: ClassVar[tuple[str, ...]] = views.ANALYSES
    run_noun: ClassVar[str] = "circuit (ioi, colored-objects or circuit-reuse)"
    element_prefix: ClassVar[str] = "circuits"
    required_tables: ClassVar[frozenset[str]] = views.REQUIRED_TABLES
    tables_noun: ClassVar[str] = "circuit"

    # ------------------------------------------------------------------------------------ layout

    def layout(self, params: Mapping[str, str]) -> Component:
        choice = self.choose_run(params)
        task_options, task = self.task_options(choice.run_id, params.get("task"))
        axis = params.get("stage") if params.get("stage") in views.AXES else DEFAULT_AXIS
        metric = params.get("metric") if params.get("metric") in views.IV_METRICS else DEFAULT_IV_METRIC
        return html.Div(
            [
                html.H2("Circuits: IOI, Colored Objects and circuit reuse"),
                *self.focus_elements(self.focus(params, choice.run_id)),
                html.P(
                    "Every score is a share of the clean–corrupt gap of the logit difference at END "
                    "(IOI: logit(IO) − logit(S); Colored Objects: the right colour's logit minus the colour "
                    "the corrupted question asks for): −1 means the patch removed the whole gap. "
                    "Activation patching replaces one head's output with its value on the corrupted "
                    "prompt; path patching (Wang et al. 2022) lets it reach only chosen receivers: the "
                    "logits (name movers), the name movers' queries (S-inhibition), the S-inhibition "
                    "heads' keys and values (induction, duplicate token), the induction heads' keys "
                    "(previous token). A head joins a class when its path score and its attention "
                    "signature both pass; every class is then tested on held-out prompts against random "
                    "head sets (the validation block below the graph). Reuse (Merullo et al. 2024): how many of IOI's top heads per "
                    "stage are Colored Objects' too, and whether editing IOI's inhibition heads repairs "
                    "Colored Objects.",
                    className="hint",
                ),
                *self.run_header(choice),
                ui.columns(
                    ui.panel(ui.graph("circuits-metrics"), css=ui.DETAIL_PANEL),
                    ui.panel(ui.graph("circuits-faithfulness")),
                ),
                html.Div(
                    [
                        ui.detail_controls(ui.radio("circuit of", "circuits-task", task_options, task)),
                        ui.graph("circuits-graph"),
                        html.Div(id="circuits-classes"),
                    ],
                    className="panel",
                    style={"margin": "20px 0"},
                ),
                html.Div(
                    [html.H3("Held-out validation of the classes"), html.Div(id="circuits-validation")],
                    className="panel",
                    style={"margin": "20px 0"},
                ),
                html.Div(
                    [
                        ui.detail_controls(
                            ui.radio(
                                "stage",
                                "circuits-stage",
                                [{"label": views.AXIS_LABELS[a], "value": a} for a in views.AXES],
                                axis,
                            )
                        ),
                        ui.graph("circuits-heatmaps"),
                    ],
                    className="panel",
                    style={"margin": "20px 0"},
                ),
                html.P(self.reuse_note(choice.run_id), id="circuits-reuse-note", className="hint"),
                html.Div(
                    ui.columns(
                        ui.panel(ui.graph("circuits-overlap"), css=ui.DETAIL_PANEL),
                        ui.panel(
                            ui.detail_controls(
                                ui.radio(
                                    "intervention metric",
                                    "circuits-iv-metric",
                                    [
                                        {"label": views.IV_METRIC_LABELS[m], "value": m}
                                        for m in views.IV_METRICS
                                    ],
                                    metric,
                                )
                            ),
                            ui.graph("circuits-intervention"),
                        ),
                    ),
                    id="circuits-reuse",
                    style=self.reuse_style(choice.run_id),
                ),
            ],
            className="page",
        )

    # --------------------------------------------------------------------------------- callbacks

    def task_options(
        self, run_id: str | None, current: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The run's tasks (each with the size of its circuit); keeps ``current`` when the run has it."""
        if not run_id:
            return [], None
        try:
            run = self._checked(run_id)
            names = views.tasks(run)
            sizes = {t: len(views.head_classes(run, t)) for t in names}
        except RUN_ERRORS:
            return [], None
        options: list[dict[str, Any]] = [
            {"label": f"{views.task_label(t)} ({sizes[t]} heads)", "value": t} for t in names
        ]
        return options, current if current in names else (names[0] if names else None)

    def _is_reuse(self, run_id: str | None) -> bool | None:
        """Whether the run is a circuit-reuse run (None: no run, or it cannot be read)."""
        if not run_id:
            return None
        try:
            return views.is_reuse(self._checked(run_id))
        except RUN_ERRORS:
            return None

    def reuse_style(self, run_id: str | None) -> dict[str, str]:
        """The overlap and intervention panels are drawn only for a circuit-reuse run (and while the
        run cannot be read, so that their figures say why)."""
        return {"display": "none"} if self._is_reuse(run_id) is False else {}

    def reuse_note(self, run_id: str | None) -> str:
        """Why the overlap and intervention panels are not drawn ("" when they are)."""
        if self._is_reuse(run_id) is not False:
            return ""
        run = self._checked(str(run_id))
        return (
            f"No overlap or intervention panels: they compare the IOI and Colored Objects circuits, and "
            f"this is a{'n' if run.analysis[0] in 'aeiou' else ''} {run.analysis} run of one task. "
            "A circuit-reuse run (headlab run circuit-reuse) has both."
        )

    def settings_text(self, run_id: str | None) -> str:
        return self._text(
            run_id, lambda run: f"{run.analysis} run of {run.model_name}: {views.settings_line(run)}"
        )

    def findings(self, run_id: str | None) -> Component:
        def build(run: Run) -> Component:
            parts: list[Component] = []
            for key, lines in views.findings(run).items():
                if lines:
                    parts.append(html.H3(FINDING_TITLES.get(key, key)))
                    parts.extend(html.P(line) for line in lines)
            return html.Div(parts, id="circuits-findings-text")

        return self._block(run_id, build)

    def validation(self, run_id: str | None) -> Component:
        def build(run: Run) -> Component:
            if "validation" not in run.table_names:
                return html.P("This run predates held-out validation: run it again.", className="hint")
            return validation_block(run.table("validation"), "circuits-validation-graph")

        return self._block(run_id, build)

    def metrics_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, figures.metrics_figure)

    def faithfulness_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, figures.faithfulness_figure)

    def graph_figure(self, run_id: str | None, task: str | None) -> go.Figure:
        return self._figure(run_id, lambda run: graph.circuit_graph(run, task), f"{run_id}/graph/{task}")

    def heatmap_figure(self, run_id: str | None, axis: str | None) -> go.Figure:
        chosen = axis if axis in views.AXES else DEFAULT_AXIS
        return self._figure(run_id, lambda run: figures.patching_heatmaps(run, chosen), f"{run_id}/maps")

    def overlap_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, figures.overlap_figure)

    def intervention_figure(self, run_id: str | None, metric: str | None) -> go.Figure:
        chosen: views.IvMetric = metric if metric in views.IV_METRICS else DEFAULT_IV_METRIC
        return self._figure(run_id, lambda run: figures.intervention_figure(run, chosen))

    def classes_table(self, run_id: str | None, task: str | None) -> Component:
        if not run_id or not task:
            return html.P("No run selected.", className="hint")
        try:
            run = self._checked(run_id)
            rows = views.class_rows(run, task)
            receivers = views.receiver_notes(run, task)
        except RUN_ERRORS as err:
            return html.P(f"cannot list the heads: {why(err)}", className="error")
        label = views.task_label(task)
        if rows.empty:
            body: Component = html.P(f"No head passed both tests of any class on {label}.", className="hint")
        else:
            header = html.Tr([html.Th(v, className=_css(c)) for c, v in views.CLASS_COLUMNS.items()])
            body = html.Table(
                [
                    html.Thead(header),
                    html.Tbody(
                        [
                            html.Tr([html.Td(row[c], className=_css(c)) for c in views.CLASS_COLUMNS])
                            for _, row in rows.iterrows()
                        ]
                    ),
                ],
                className="data",
                id="circuits-classes-table",
            )
        return html.Div(
            [
                html.H3(f"{label}: heads by class"),
                body,
                html.P(
                    "Path score: share of the clean–corrupt gap in the stage that found the class "
                    "(negative: the head carries the answer). Attention: the clean prompts' mean "
                    "attention on the class's signature (query → keys).",
                    className="hint",
                ),
                html.H3("Receivers of each stage"),
                html.Ul([html.Li(line) for line in receivers])
                if receivers
                else html.P("none", className="hint"),
            ]
        )

    def register_callbacks(self, app: Dash) -> None:
        run = Input("circuits-run", "value")
        app.callback(
            Output("circuits-task", "options"),
            Output("circuits-task", "value"),
            run,
            State("circuits-task", "value"),
        )(self.task_options)
        app.callback(Output("circuits-settings", "children"), run)(self.settings_text)
        app.callback(Output("circuits-findings", "children"), run)(self.findings)
        app.callback(Output("circuits-metrics", "figure"), run)(self.metrics_figure)
        app.callback(Output("circuits-validation", "children"), run)(self.validation)
        app.callback(Output("circuits-faithfulness", "figure"), run)(self.faithfulness_figure)
        app.callback(Output("circuits-graph", "figure"), run, Input("circuits-task", "value"))(
            self.graph_figure
        )
        app.callback(Output("circuits-classes", "children"), run, Input("circuits-task", "value"))(
            self.classes_table
        )
        focus.register_outline(app, "circuits-heatmaps", "circuits-focus-head")
        app.callback(Output("circuits-heatmaps", "figure"), run, Input("circuits-stage", "value"))(
            self.heatmap_figure
        )
        app.callback(Output("circuits-reuse", "style"), run)(self.reuse_style)
        app.callback(Output("circuits-reuse-note", "children"), run)(self.reuse_note)
        app.callback(Output("circuits-overlap", "figure"), run)(self.overlap_figure)
        app.callback(Output("circuits-intervention", "figure"), run, Input("circuits-iv-metric", "value"))(
            self.intervention_figure
        )


def _css(column: str) -> str:
    return "num" if column in ("score", "activation", "attention") else ""
