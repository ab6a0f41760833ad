"""The ViT page: which heads of a vision transformer matter, how far they look, which patterns they use.

It shows one ``vit-heads`` run (:mod:`analyses.vit_heads`).

Elements (stable ids): ``vit-run`` (run picker), ``vit-settings`` (the run's settings),
``vit-findings`` (sentences reading the run's numbers), ``vit-metric`` (importance metric),
``vit-importance`` (layer x head map of that metric; clicking a cell picks the head),
``vit-agreement`` (Spearman matrix of the metrics), ``vit-intervals`` (the top heads by that metric
with their intervals over images), ``vit-concentration`` (the top heads' share of the total against
a shuffled null), ``vit-validation`` (the held-out validation of the top heads), ``vit-trend-metric`` and ``vit-trend`` (a head
statistic per layer with its spread), ``vit-head`` (the chosen head), ``vit-head-info`` (its numbers),
``vit-distance`` (its strength against distance), ``vit-offset`` (its offset map),
``vit-clusters`` (the pattern-cluster gallery), and the overlay: ``vit-display-image`` (a display
image of the run), ``vit-overlay`` (the chosen head's attention from one query patch over that image;
clicking a patch makes it the query), ``vit-query`` (a store holding the clicked patch; empty: the
centre patch) and ``vit-overlay-info`` (the attention to CLS and the most attended patch). The URL's
``head`` (``<layer>-<head>`` or ``L<layer>H<head>``) picks the head first; ``vit-focus`` says so.

Runs saved before the display patterns were stored show a hint to re-run the analysis in place of
the overlay. The callbacks are methods taking plain values, so tests call them directly;
:meth:`VitPage.register_callbacks` only wires them to the elements. See docs/analyses/vit-heads.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import plotly.graph_objects as go
from dash import Dash, Input, Output, State, ctx, dcc, html
from dash.development.base_component import Component

from analyses.runstore import Run
from dashboard.core import page as ui
from dashboard.core.page import RUN_ERRORS, AnalysisPage, why
from dashboard.core.validation import validation_block
from dashboard.vit_heads import statistics, views

DEFAULT_METRIC = "confidence_drop"
DEFAULT_TREND = "mean_attention_distance"


class VitPage(AnalysisPage):
    path: ClassVar[str] = "/vit"
    title: ClassVar[str] = "ViT heads"
    analysis: ClassVar[str] = views.ANALYSIS
    run_noun: ClassVar[str] = "vit-heads"
    element_prefix: ClassVar[str] = "vit"
    required_tables: ClassVar[frozenset[str]] = views.REQUIRED_TABLES

    # ------------------------------------------------------------------------------------ layout

    def layout(self, params: Mapping[str, str]) -> Component:
        choice = self.choose_run(params)
        metric = params.get("metric") if params.get("metric") in views.METRICS else DEFAULT_METRIC
        head_options = self.head_options(choice.run_id)
        focus = self.focus(params, choice.run_id)
        head = self.select_head(choice.run_id, None, views.head_key(*focus.head) if focus.head else None)
        display_options, display_value = self.display_choice(choice.run_id, None)
        return html.Div(
            [
                html.H2("ViT heads: importance, attention distance and patterns"),
                *self.focus_elements(focus),
                html.P(
                    "Importance: each head's output is removed (pruned) and the linear probes on the image "
                    "embedding are scored again: accuracy and true-class confidence drops, the embedding's "
                    "cosine drop, and the gradient of the probes' loss with respect to the head's gate "
                    "(every head; the drops only for the heads that were pruned, the others blank). "
                    "Attention strength: mean attention from a patch to the patches at each offset and "
                    "distance; patterns: clusters of autoencoded per-query attention maps "
                    "(Li et al., TVCG 2023). The overlay shows the chosen head's attention on a few stored "
                    "images from the patch you click.",
                    className="hint",
                ),
                *self.run_header(choice),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(
                            ui.dropdown(
                                "metric",
                                "vit-metric",
                                options=[{"label": views.METRIC_NAMES[m], "value": m} for m in views.METRICS],
                                value=metric,
                            )
                        ),
                        ui.graph("vit-importance"),
                    ),
                    ui.panel(ui.graph("vit-agreement"), css=ui.DETAIL_PANEL),
                ),
                ui.columns(
                    ui.panel(ui.graph("vit-intervals")),
                    ui.panel(ui.graph("vit-concentration"), css=ui.DETAIL_PANEL),
                ),
                html.Div(id="vit-validation"),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(
                            ui.radio(
                                "per layer",
                                "vit-trend-metric",
                                [{"label": views.TREND_LABELS[m], "value": m} for m in views.TREND_METRICS],
                                DEFAULT_TREND,
                            )
                        ),
                        ui.graph("vit-trend"),
                    ),
                    ui.panel(
                        ui.detail_controls(
                            ui.dropdown("head", "vit-head", options=head_options, value=head),
                        ),
                        html.Div(id="vit-head-info"),
                        ui.graph("vit-distance"),
                        css=ui.DETAIL_PANEL,
                    ),
                ),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(
                            ui.dropdown(
                                "image",
                                "vit-display-image",
                                options=display_options,
                                value=display_value,
                                placeholder="no stored display images",
                            )
                        ),
                        ui.graph("vit-overlay"),
                        dcc.Store(id="vit-query", data=None),
                    ),
                    ui.panel(html.Div(id="vit-overlay-info"), css=ui.DETAIL_PANEL),
                ),
                ui.columns(
                    ui.panel(ui.graph("vit-clusters")),
                    ui.panel(ui.graph("vit-offset"), css=ui.DETAIL_PANEL),
                ),
            ],
            className="page",
        )

    # --------------------------------------------------------------------------------- callbacks

    def head_options(self, run_id: str | None) -> list[dict[str, Any]]:
        """The run's heads as dropdown options (pruned heads marked)."""
        if not run_id:
            return []
        try:
            return views.head_options(self._checked(run_id))
        except RUN_ERRORS:
            return []

    def select_head(
        self,
        run_id: str | None,
        click: Mapping[str, Any] | None,
        current: str | None,
        triggered: str | None = None,
    ) -> str | None:
        """The head to show: the clicked importance-map cell (when the map was clicked), else
        ``current`` if the run has it, else the run's head with the largest confidence drop."""
        if not run_id:
            return None
        try:
            run = self._checked(run_id)
            keys = {o["value"] for o in views.head_options(run)}
            default = views.head_key(*views.default_head(run))
        except RUN_ERRORS:
            return None
        if triggered == "vit-importance":
            points = (click or {}).get("points") or []
            if points:
                x, y = str(points[0].get("x")), str(points[0].get("y"))
                clicked = views.head_key(int(y), int(x)) if x.isdigit() and y.isdigit() else None
                if clicked in keys:
                    return clicked
        return current if current in keys else default

    def settings(self, run_id: str | None) -> str:
        return self._text(run_id, views.settings_line, "cannot read the run's settings")

    def findings(self, run_id: str | None) -> Component:
        return self._block(
            run_id,
            lambda run: html.Ul([html.Li(line) for line in views.findings(run)]),
            "cannot read the run",
        )

    def head_info(self, run_id: str | None, head: str | None) -> Component:
        chosen = views.parse_head(head)
        if not run_id or chosen is None:
            return html.P("No head selected.", className="hint")
        try:
            lines = views.head_lines(self._checked(run_id), *chosen)
        except RUN_ERRORS as err:
            return html.P(f"cannot show the head: {why(err)}", className="error")
        return html.Div(
            [
                html.H3(f"Layer {chosen[0]}, head {chosen[1]}"),
                *[html.P(line, className="hint") for line in lines],
            ]
        )

    def importance_figure(self, run_id: str | None, metric: str | None, head: str | None) -> go.Figure:
        chosen = views.parse_head(head)
        shown = metric if metric in views.METRICS else DEFAULT_METRIC
        return self._figure(
            run_id, lambda run: views.importance_grid(run, shown, chosen), uirevision=f"{run_id}/{shown}"
        )

    def agreement_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, views.agreement_figure)

    def intervals_figure(self, run_id: str | None, metric: str | None) -> go.Figure:
        shown = metric if metric in views.METRICS else DEFAULT_METRIC
        return self._figure(run_id, lambda run: statistics.interval_figure(run, shown))

    def concentration_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, statistics.concentration_figure)

    def validation(self, run_id: str | None) -> Component:
        def build(run: Run) -> Component:
            table = statistics.validation_table(run)
            if table is None:
                return html.P(
                    "This run has no held-out validation; re-run headlab run vit-heads.", className="hint"
                )
            return html.Div(
                [
                    html.H3("Held-out validation of the top heads"),
                    *[html.P(line, className="hint") for line in statistics.ranking_lines(run)],
                    validation_block(table, graph_id="vit-validation-graph"),
                ]
            )

        return self._block(run_id, build, "cannot show the validation")

    def trend_figure(self, run_id: str | None, metric: str | None) -> go.Figure:
        shown = metric if metric in views.TREND_METRICS else DEFAULT_TREND
        return self._figure(run_id, lambda run: views.trend_figure(run, shown))

    def _head_figure(
        self,
        run_id: str | None,
        head: str | None,
        draw: Callable[[Run, int, int], go.Figure],
        uirevision: str | None = None,
    ) -> go.Figure:
        """``draw(run, layer, head)`` of the chosen head (``uirevision`` None: ``<run_id>/<head>``)."""
        chosen = views.parse_head(head)
        if run_id and chosen is None:
            return ui.empty_figure("select a head")
        layer, h = chosen or (0, 0)
        return self._figure(
            run_id, lambda run: draw(run, layer, h), uirevision=uirevision or f"{run_id}/{head}"
        )

    def distance_figure(self, run_id: str | None, head: str | None) -> go.Figure:
        return self._head_figure(run_id, head, views.distance_figure)

    def offset_figure(self, run_id: str | None, head: str | None) -> go.Figure:
        return self._head_figure(run_id, head, views.offset_map_figure)

    def clusters_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, views.cluster_gallery)

    # ------------------------------------------------------------------------------ the overlay

    def display_choice(self, run_id: str | None, current: Any) -> tuple[list[dict[str, Any]], int | None]:
        """The run's display images as options, and the one to show: ``current`` if the run has it,
        else the first (None: the run stores none)."""
        if not run_id:
            return [], None
        try:
            options = views.display_options(self._checked(run_id))
        except RUN_ERRORS:
            return [], None
        values = [o["value"] for o in options]
        if not values:
            return [], None
        return options, (current if current in values else values[0])

    def select_query(
        self,
        run_id: str | None,
        click: Mapping[str, Any] | None,
        current: Any,
        triggered: str | None = None,
    ) -> list[int] | None:
        """The query patch [row, col]: the clicked patch when the overlay was clicked, else
        ``current``; None (the centre patch) when the run changes."""
        if not run_id or triggered == "vit-run":
            return None
        if triggered == "vit-overlay":
            try:
                clicked = views.query_from_click(self._checked(run_id), click)
            except RUN_ERRORS:
                clicked = None
            if clicked is not None:
                return [clicked[0], clicked[1]]
        kept = _as_query(current)
        return None if kept is None else [kept[0], kept[1]]

    def overlay_figure(self, run_id: str | None, image: Any, head: str | None, query: Any) -> go.Figure:
        """The chosen head's attention from the query patch over the display image (a hint when
        the run stores no display patterns)."""

        def draw(run: Run, layer: int, h: int) -> go.Figure:
            if not views.has_display(run):
                return ui.empty_figure(views.DISPLAY_HINT)
            return views.overlay_figure(run, _display_image(run, image), layer, h, _as_query(query))

        return self._head_figure(run_id, head, draw, uirevision=f"{run_id}/{image}")

    def overlay_info(self, run_id: str | None, image: Any, head: str | None, query: Any) -> Component:
        chosen = views.parse_head(head)
        if not run_id or chosen is None:
            return html.P("No head selected.", className="hint")
        try:
            run = self._checked(run_id)
            if not views.has_display(run):
                return html.P(
                    [
                        "This run has no stored display patterns; re-run ",
                        html.Code("headlab run vit-heads"),
                        " to overlay a head's attention on an image.",
                    ],
                    className="hint",
                )
            lines = views.overlay_lines(
                run, _display_image(run, image), chosen[0], chosen[1], _as_query(query)
            )
        except RUN_ERRORS as err:
            return html.P(f"cannot show the overlay: {why(err)}", className="error")
        return html.Div(
            [
                html.H3(f"Layer {chosen[0]}, head {chosen[1]}: attention on the image"),
                *[html.P(line, className="hint") for line in lines],
            ]
        )

    def register_callbacks(self, app: Dash) -> None:
        app.callback(Output("vit-head", "options"), Input("vit-run", "value"))(self.head_options)

        def select_head(
            run_id: str | None, click: Mapping[str, Any] | None, current: str | None
        ) -> str | None:
            return self.select_head(run_id, click, current, ctx.triggered_id)

        app.callback(
            Output("vit-head", "value"),
            Input("vit-run", "value"),
            Input("vit-importance", "clickData"),
            State("vit-head", "value"),
        )(select_head)
        app.callback(Output("vit-settings", "children"), Input("vit-run", "value"))(self.settings)
        app.callback(Output("vit-findings", "children"), Input("vit-run", "value"))(self.findings)
        app.callback(
            Output("vit-head-info", "children"), Input("vit-run", "value"), Input("vit-head", "value")
        )(self.head_info)
        app.callback(
            Output("vit-importance", "figure"),
            Input("vit-run", "value"),
            Input("vit-metric", "value"),
            Input("vit-head", "value"),
        )(self.importance_figure)
        app.callback(Output("vit-agreement", "figure"), Input("vit-run", "value"))(self.agreement_figure)
        app.callback(
            Output("vit-intervals", "figure"), Input("vit-run", "value"), Input("vit-metric", "value")
        )(self.intervals_figure)
        app.callback(Output("vit-concentration", "figure"), Input("vit-run", "value"))(
            self.concentration_figure
        )
        app.callback(Output("vit-validation", "children"), Input("vit-run", "value"))(self.validation)
        app.callback(
            Output("vit-trend", "figure"), Input("vit-run", "value"), Input("vit-trend-metric", "value")
        )(self.trend_figure)
        app.callback(Output("vit-distance", "figure"), Input("vit-run", "value"), Input("vit-head", "value"))(
            self.distance_figure
        )
        app.callback(Output("vit-offset", "figure"), Input("vit-run", "value"), Input("vit-head", "value"))(
            self.offset_figure
        )
        app.callback(Output("vit-clusters", "figure"), Input("vit-run", "value"))(self.clusters_figure)
        app.callback(
            Output("vit-display-image", "options"),
            Output("vit-display-image", "value"),
            Input("vit-run", "value"),
            State("vit-display-image", "value"),
        )(self.display_choice)

        def select_query(
            run_id: str | None, click: Mapping[str, Any] | None, current: Any
        ) -> list[int] | None:
            return self.select_query(run_id, click, current, ctx.triggered_id)

        app.callback(
            Output("vit-query", "data"),
            Input("vit-run", "value"),
            Input("vit-overlay", "clickData"),
            State("vit-query", "data"),
        )(select_query)
        overlay_inputs = (
            Input("vit-run", "value"),
            Input("vit-display-image", "value"),
            Input("vit-head", "value"),
            Input("vit-query", "data"),
        )
        app.callback(Output("vit-overlay", "figure"), *overlay_inputs)(self.overlay_figure)
        app.callback(Output("vit-overlay-info", "children"), *overlay_inputs)(self.overlay_info)


def _display_image(run: Run, image: Any) -> int:
    """``image`` if the run has that display image, else its first (the picker may lag a run change)."""
    values = [int(o["value"]) for o in views.display_options(run)]
    return int(image) if isinstance(image, int) and image in values else values[0]


def _as_query(value: Any) -> tuple[int, int] | None:
    """A stored query ``[row, col]`` as a tuple; None for anything else (the centre patch)."""
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None
