"""The census page: a layer x head map of one metric; click a head for its numbers and pattern.

Elements (stable ids, used by the browser test): ``census-run`` (run picker), ``census-metric``
(metric), ``census-heatmap`` (the map), ``census-head`` (store: the selected head),
``census-head-detail`` (the head's metrics), ``census-input-set``, ``census-example`` and
``census-scale`` (pattern controls: which input set, natural text or the repeated random block,
follows the metric until changed), ``census-pattern`` (the head's attention pattern, drawn as an
image). The URL's ``head=L<layer>H<head>`` selects that head first (``census-focus`` says so).

The callbacks are methods taking plain values (run id, metric, click data...), so tests call them
directly; :meth:`CensusPage.register_callbacks` only wires them to the elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import plotly.graph_objects as go
from dash import Dash, Input, Output, State, ctx, dcc, html
from dash.development.base_component import Component

from dashboard.census import views
from dashboard.census.views import PickedHead
from dashboard.core import figures
from dashboard.core import page as ui
from dashboard.core.figures import PATTERN_SCALES, PatternScale
from dashboard.core.page import AnalysisPage, empty_figure, why
from probe.errors import HeadlabError

DEFAULT_METRIC = "induction"
DEFAULT_SCALE: PatternScale = "sqrt"
SelectedHead = dict[str, Any]  # {"run": run id, "layer": int, "head": int}, the census-head store


class CensusPage(AnalysisPage):
    path: ClassVar[str] = "/census"
    title: ClassVar[str] = "Census"
    analysis: ClassVar[str] = "census"

    # ------------------------------------------------------------------------------------ layout

    def layout(self, params: Mapping[str, str]) -> Component:
        choice = self.choose_run(params)
        metric = params.get("metric") if params.get("metric") in views.METRICS else DEFAULT_METRIC
        focus = self.focus(params, choice.run_id)
        focused = (
            None
            if focus.head is None
            else {"run": choice.run_id, "layer": focus.head[0], "head": focus.head[1]}
        )
        return html.Div(
            [
                html.H2("Head census"),
                *self.focus_elements(focus),
                html.P(
                    "Six numbers per head from one pass over natural text and repeated random tokens. "
                    "Pick a metric, then click a head on the map for its values and its attention pattern.",
                    className="hint",
                ),
                ui.controls(
                    self.run_picker(choice),
                    ui.radio(
                        "metric",
                        "census-metric",
                        [{"label": views.METRIC_LABELS[m], "value": m} for m in views.METRICS],
                        metric,
                    ),
                ),
                *choice.notes,
                ui.columns(
                    ui.panel(
                        ui.graph("census-heatmap"),
                        html.P("Click a cell to select that head.", className="hint"),
                    ),
                    ui.panel(
                        html.Div(id="census-head-detail"),
                        ui.detail_controls(
                            ui.radio(
                                "input",
                                "census-input-set",
                                [{"label": views.INPUT_SET_LABELS[k], "value": k} for k in views.INPUT_SETS],
                                views.default_input_set(metric),
                            ),
                            ui.dropdown("example", "census-example"),
                            ui.radio(
                                "colour",
                                "census-scale",
                                [
                                    {"label": "√weight", "value": "sqrt"},
                                    {"label": "weight", "value": "linear"},
                                ],
                                DEFAULT_SCALE,
                            ),
                        ),
                        ui.graph("census-pattern"),
                        css=ui.DETAIL_PANEL,
                    ),
                ),
                dcc.Store(id="census-head", data=focused),
            ],
            className="page",
        )

    # --------------------------------------------------------------------------------- callbacks

    def select_head(
        self,
        run_id: str | None,
        click_data: Mapping[str, Any] | None,
        metric: str | None,
        current: SelectedHead | None,
        triggered: str | None = None,
    ) -> SelectedHead | None:
        """The head to show: the clicked one (when the map was clicked), else the current one if it
        belongs to this run, else the run's most notable head for ``metric``."""
        if not run_id:
            return None
        try:
            heads = self._run(run_id).heads
        except HeadlabError:
            return None
        if triggered == "census-heatmap":
            clicked = _clicked_head(click_data)
            if clicked is not None and views.has_head(heads, clicked):
                return {"run": run_id, "layer": clicked.layer, "head": clicked.head}
        held = _as_head(current, run_id)
        if held is not None and views.has_head(heads, held):
            return {"run": run_id, "layer": held.layer, "head": held.head}
        top = views.top_head(heads, metric if metric in views.METRICS else DEFAULT_METRIC)
        return {"run": run_id, "layer": top.layer, "head": top.head}

    def heatmap_figure(
        self, run_id: str | None, metric: str | None, selected: SelectedHead | None
    ) -> go.Figure:
        if not run_id:
            return empty_figure("no census run selected")
        if metric not in views.METRICS:
            return empty_figure(f"unknown metric {metric!r}")
        try:
            run = self._run(run_id)
            fig = views.heatmap(run.heads, metric, _as_head(selected, run_id))
        except (HeadlabError, KeyError) as err:
            return empty_figure(f"cannot show run {run_id}: {why(err)}")
        fig.update_layout(
            title={"text": views.METRIC_LABELS[metric], "x": 0.02, "xanchor": "left"},
            uirevision=run_id,  # keep zoom while the metric or the selected head changes
            margin={"l": 50, "r": 10, "t": 50, "b": 45},
        )
        return figures.clear_modebar(fig)

    def head_detail(self, run_id: str | None, selected: SelectedHead | None, metric: str | None) -> Component:
        head = _as_head(selected, run_id)
        if not run_id or head is None:
            return html.P("No head selected.", className="hint")
        try:
            run = self._run(run_id)
            summary = views.head_summary(run.heads, head)
            heads = run.heads
        except (HeadlabError, KeyError) as err:
            return html.P(f"cannot show head {head}: {why(err)}", className="error")
        row = heads[(heads["layer"] == head.layer) & (heads["head"] == head.head)].iloc[0]
        kv = f", KV head {int(row['kv_head'])}" if "kv_head" in heads.columns else ""
        body = []
        for r in summary.itertuples(index=False):
            sem = "" if r.sem is None else f"± {r.sem:.3g}"
            body.append(
                html.Tr(
                    [
                        html.Td(r.label),
                        html.Td(f"{r.value:.4g}", className="num"),
                        html.Td(sem, className="num"),
                        html.Td(f"{r.rank} / {r.of}", className="num"),
                    ],
                    className="current" if r.metric == metric else "",
                )
            )
        table = html.Table(
            [
                html.Thead(
                    html.Tr(
                        [
                            html.Th("metric"),
                            html.Th("value", className="num"),
                            html.Th("± sem", className="num"),
                            html.Th("rank", className="num"),
                        ]
                    )
                ),
                html.Tbody(body),
            ],
            className="data",
        )
        return html.Div(
            [
                html.H3(f"{head}: layer {head.layer}, head {head.head}{kv}", id="census-head-title"),
                table,
                html.P(
                    "rank 1 = most notable: lowest entropy, highest value of every other metric. "
                    "± is the standard error over samples.",
                    className="hint",
                ),
            ],
        )

    def example_options(
        self, run_id: str | None, current: int | None, input_set: str | None = "natural"
    ) -> tuple[list[dict[str, Any]], int | None]:
        if not run_id:
            return [], None
        shown = views.as_input_set(input_set)
        try:
            run = self._run(run_id)
            ids = views.example_ids(run, shown)
            options = [{"label": views.example_preview(run, e, input_set=shown), "value": e} for e in ids]
        except (HeadlabError, KeyError):
            return [], None
        if not ids:
            return [], None
        return options, current if current in ids else ids[0]

    def pattern_figure(
        self,
        run_id: str | None,
        selected: SelectedHead | None,
        example: int | None,
        scale: str | None,
        input_set: str | None = "natural",
    ) -> go.Figure:
        head = _as_head(selected, run_id)
        if not run_id or head is None:
            return empty_figure("select a head")
        kind = views.as_input_set(input_set)
        try:
            run = self._run(run_id)
            if not views.example_ids(run, kind):
                return empty_figure(views.missing_examples(run, kind))
            if example is None:
                return empty_figure("select an example")
            shown: PatternScale = scale if scale in PATTERN_SCALES else DEFAULT_SCALE
            fig = views.pattern_figure(run, int(example), head, scale=shown, input_set=kind)
        except (HeadlabError, KeyError, ValueError) as err:
            return empty_figure(f"cannot show the pattern: {why(err)}")
        fig.update_layout(uirevision=f"{run_id}/{kind}/{example}", height=600)
        return figures.clear_modebar(fig)

    def register_callbacks(self, app: Dash) -> None:
        def select(
            run_id: str | None, click: dict[str, Any] | None, metric: str | None, current: SelectedHead | None
        ) -> SelectedHead | None:
            return self.select_head(run_id, click, metric, current, ctx.triggered_id)

        app.callback(
            Output("census-head", "data"),
            Input("census-run", "value"),
            Input("census-heatmap", "clickData"),
            State("census-metric", "value"),
            State("census-head", "data"),
        )(select)
        app.callback(
            Output("census-heatmap", "figure"),
            Input("census-run", "value"),
            Input("census-metric", "value"),
            Input("census-head", "data"),
        )(self.heatmap_figure)
        app.callback(
            Output("census-head-detail", "children"),
            Input("census-run", "value"),
            Input("census-head", "data"),
            Input("census-metric", "value"),
        )(self.head_detail)
        app.callback(
            Output("census-input-set", "value"),
            Input("census-metric", "value"),
        )(views.default_input_set)

        def examples(
            run_id: str | None, input_set: str | None, current: int | None
        ) -> tuple[list[dict[str, Any]], int | None]:
            return self.example_options(run_id, current, input_set)

        app.callback(
            Output("census-example", "options"),
            Output("census-example", "value"),
            Input("census-run", "value"),
            Input("census-input-set", "value"),
            State("census-example", "value"),
        )(examples)
        app.callback(
            Output("census-pattern", "figure"),
            Input("census-run", "value"),
            Input("census-head", "data"),
            Input("census-example", "value"),
            Input("census-scale", "value"),
            Input("census-input-set", "value"),
        )(self.pattern_figure)


def _as_head(selected: Mapping[str, Any] | None, run_id: str | None) -> PickedHead | None:
    """The head in the ``census-head`` store, if it belongs to ``run_id``."""
    if not isinstance(selected, Mapping) or selected.get("run") != run_id:
        return None
    try:
        return PickedHead(int(selected["layer"]), int(selected["head"]))
    except (KeyError, TypeError, ValueError):
        return None


def _clicked_head(click_data: Mapping[str, Any] | None) -> PickedHead | None:
    """The head under a click on the layer x head map (x: head, y: layer)."""
    if not isinstance(click_data, Mapping):
        return None
    points = click_data.get("points")
    if not isinstance(points, list) or not points or not isinstance(points[0], Mapping):
        return None
    try:
        return PickedHead(int(points[0]["y"]), int(points[0]["x"]))
    except (KeyError, TypeError, ValueError):
        return None
