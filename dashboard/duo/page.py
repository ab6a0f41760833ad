"""The DuoAttention page: which KV heads need the whole context, and what keeping only them costs.

Elements (stable ids): ``duo-run`` (run picker), ``duo-settings`` (the run's settings),
``duo-findings`` (sentences reading the run's numbers), ``duo-share`` (the share whose retrieval
heads the gate map rings), ``duo-gates`` (layer x KV head map of the trained gates, sliding-window
layers marked), ``duo-loss`` (distillation and regulariser per training step), ``duo-metric``
(recall or share recalled), ``duo-length`` (one evaluated length or every length pooled),
``duo-accuracy`` (the metric against the share of retrieval heads for Duo's gates, the retrieval
score and random heads, the full model as the reference), ``duo-accuracy-table`` (the pooled numbers),
``duo-memory`` (the KV cache kept against context length: formula curves, measured points) and
``duo-agreement`` (Duo's gates against the retrieval score); ``duo-focus`` and ``duo-focus-head``: the
head the URL's ``head=L<layer>H<head>`` focuses, its KV head outlined on the gate map.

The callbacks are methods taking plain values, so tests call them directly;
:meth:`DuoPage.register_callbacks` only wires them to the elements. See docs/analyses/duo.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import plotly.graph_objects as go
from dash import Dash, Input, Output, State, html
from dash.development.base_component import Component

from analyses.runstore import Run
from dashboard.core import focus
from dashboard.core import page as ui
from dashboard.core.page import RUN_ERRORS, AnalysisPage
from dashboard.duo import views

DEFAULT_METRIC: views.Metric = "recall"


class DuoPage(AnalysisPage):
    path: ClassVar[str] = "/duo"
    title: ClassVar[str] = "DuoAttention"
    analysis: ClassVar[str] = "duo"
    required_tables: ClassVar[frozenset[str]] = views.REQUIRED_TABLES

    # ------------------------------------------------------------------------------------ layout

    def layout(self, params: Mapping[str, str]) -> Component:
        choice = self.choose_run(params)
        metric = params.get("metric") if params.get("metric") in views.METRICS else DEFAULT_METRIC
        share_options, share = self.share_options(choice.run_id, None)
        length_options, length = self.length_options(choice.run_id, None)
        return html.Div(
            [
                html.H2("DuoAttention: retrieval and streaming heads"),
                *self.focus_elements(self.focus(params, choice.run_id)),
                html.P(
                    "Every KV head gets a gate between full attention and streaming attention (the first "
                    "sink and the last recent keys). The gates are trained to keep the full model's final "
                    "hidden states on multi-needle contexts while an L1 term pulls them to 0 (Xiao et al. "
                    "2025). The top share of KV heads by gate are kept whole (retrieval heads), the others "
                    "stream; needle-test recall with them is compared with the same share chosen by the "
                    "retrieval score (Wu et al. 2024) and at random, and the full model is the reference.",
                    className="hint",
                ),
                *self.run_header(choice),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(
                            ui.radio("retrieval heads at share", "duo-share", share_options, share)
                        ),
                        ui.graph("duo-gates"),
                    ),
                    ui.panel(ui.graph("duo-loss"), css=ui.DETAIL_PANEL),
                ),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(
                            ui.radio(
                                "accuracy as",
                                "duo-metric",
                                [{"label": views.METRIC_LABELS[m], "value": m} for m in views.METRICS],
                                metric,
                            ),
                            ui.dropdown("length", "duo-length", options=length_options, value=length),
                        ),
                        ui.graph("duo-accuracy"),
                    ),
                    ui.panel(html.Div(id="duo-accuracy-table"), css=ui.DETAIL_PANEL),
                ),
                ui.columns(
                    ui.panel(ui.graph("duo-memory")),
                    ui.panel(html.Div(id="duo-agreement"), css=ui.DETAIL_PANEL),
                ),
            ],
            className="page",
        )

    # --------------------------------------------------------------------------------- callbacks

    def share_options(
        self, run_id: str | None, current: float | None
    ) -> tuple[list[dict[str, Any]], float | None]:
        """The run's shares (labelled with k of n); keeps ``current`` when the run has it, else the first."""
        if not run_id:
            return [], None
        try:
            run = self._checked(run_id)
            n = views.n_kv_total(run)
            options: list[dict[str, Any]] = [
                {"label": f"{s:g} (k = {views.top_k(run, s)} of {n})", "value": s} for s in views.shares(run)
            ]
        except RUN_ERRORS:
            return [], None
        values = [o["value"] for o in options]
        if current is not None and any(math.isclose(float(current), v) for v in values):
            return options, float(current)
        return options, values[0] if values else None

    def length_options(
        self, run_id: str | None, current: int | None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Every length pooled, then each evaluated length; keeps ``current`` when the run has it."""
        if not run_id:
            return [], None
        try:
            lengths = views.lengths(self._checked(run_id))
        except RUN_ERRORS:
            return [], None
        options: list[dict[str, Any]] = [{"label": views.length_label(n), "value": n} for n in lengths]
        return options, int(current) if current in lengths else 0

    def settings(self, run_id: str | None) -> str:
        return self._text(run_id, views.settings_line, "cannot read the run's settings")

    def findings(self, run_id: str | None) -> Component:
        return self._block(
            run_id,
            lambda run: html.Ul([html.Li(line) for line in views.findings(run)], id="duo-findings-list"),
            "cannot read the run",
        )

    def gates_figure(self, run_id: str | None, share: float | None) -> go.Figure:
        return self._figure(run_id, lambda run: views.gate_map(run, _share(run, share)), f"{run_id}/gates")

    def loss_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, views.loss_figure)

    def accuracy_figure(self, run_id: str | None, metric: str | None, length: int | None) -> go.Figure:
        shown: views.Metric = "recalled" if metric == "recalled" else "recall"

        def draw(run: Run) -> go.Figure:
            chosen = int(length) if length in views.lengths(run) else 0
            return views.accuracy_figure(run, shown, chosen)

        return self._figure(run_id, draw)

    def memory_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, views.memory_figure)

    def accuracy_table(self, run_id: str | None) -> Component:
        def build(run: Run) -> Component:
            rows = views.accuracy_rows(run)
            header = html.Tr(
                [html.Th("selection"), html.Th("share", className="num"), html.Th("k", className="num")]
                + [html.Th(h, className="num") for h in ("recall", "recalled", "tests")]
            )
            body = []
            for r in rows.itertuples(index=False):
                random = r.selection == "random"
                body.append(
                    html.Tr(
                        [
                            html.Td(views.SELECTION_LABELS[str(r.selection)]),
                            html.Td(f"{r.share:g}", className="num"),
                            html.Td(str(int(r.k)), className="num"),
                            html.Td(
                                views.interval_text(r.recall, r.recall_low, r.recall_high, random=random),
                                className="num",
                            ),
                            html.Td(
                                views.interval_text(
                                    r.recalled, r.recalled_low, r.recalled_high, random=random
                                ),
                                className="num",
                            ),
                            html.Td(
                                f"{int(r.n_tests)} × {int(r.draws)} draws" if random else str(int(r.n_tests)),
                                className="num",
                            ),
                        ]
                    )
                )
            return html.Div(
                [
                    html.H3("Every length pooled"),
                    html.Table(
                        [html.Thead(header), html.Tbody(body)], className="data", id="duo-accuracy-rows"
                    ),
                    html.P(
                        "Brackets: 95% percentile-bootstrap intervals over the tests. Random heads: the mean "
                        "over the draws, with the lowest and the highest draw.",
                        className="hint",
                    ),
                ]
            )

        return self._block(run_id, build, "cannot list the accuracy")

    def agreement_panel(self, run_id: str | None) -> Component:
        def build(run: Run) -> Component:
            rows = views.agreement_rows(run)
            parts: list[Component] = [
                html.H3("Duo's gates against the retrieval score"),
                html.P(views.agreement_note(run), className="hint", id="duo-agreement-note"),
            ]
            if len(rows):
                header = html.Tr(
                    [
                        html.Th(h, className="num")
                        for h in ("share", "k", "top-k overlap", "chance", "overlap / k", "Jaccard")
                    ]
                )
                body = [
                    html.Tr(
                        [
                            html.Td(f"{r.share:g}", className="num"),
                            html.Td(str(int(r.k)), className="num"),
                            html.Td(str(int(r.overlap)), className="num"),
                            html.Td(f"{r.chance:.1f}", className="num"),
                            html.Td(f"{r.overlap_share:.2f}", className="num"),
                            html.Td(f"{r.jaccard:.2f}", className="num"),
                        ]
                    )
                    for r in rows.itertuples(index=False)
                ]
                parts.append(
                    html.Table(
                        [html.Thead(header), html.Tbody(body)], className="data", id="duo-agreement-rows"
                    )
                )
            return html.Div(parts)

        return self._block(run_id, build, "cannot show the agreement")

    def register_callbacks(self, app: Dash) -> None:
        run = Input("duo-run", "value")
        app.callback(
            Output("duo-share", "options"), Output("duo-share", "value"), run, State("duo-share", "value")
        )(self.share_options)
        app.callback(
            Output("duo-length", "options"), Output("duo-length", "value"), run, State("duo-length", "value")
        )(self.length_options)
        app.callback(Output("duo-settings", "children"), run)(self.settings)
        app.callback(Output("duo-findings", "children"), run)(self.findings)
        app.callback(Output("duo-gates", "figure"), run, Input("duo-share", "value"))(self.gates_figure)
        focus.register_outline(app, "duo-gates", "duo-focus-head", kv=True)
        app.callback(Output("duo-loss", "figure"), run)(self.loss_figure)
        app.callback(
            Output("duo-accuracy", "figure"), run, Input("duo-metric", "value"), Input("duo-length", "value")
        )(self.accuracy_figure)
        app.callback(Output("duo-accuracy-table", "children"), run)(self.accuracy_table)
        app.callback(Output("duo-memory", "figure"), run)(self.memory_figure)
        app.callback(Output("duo-agreement", "children"), run)(self.agreement_panel)


def _share(run: Run, share: float | None) -> float | None:
    """``share`` when the run evaluated it, else None (the run's first)."""
    if share is None:
        return None
    return float(share) if any(math.isclose(float(share), s) for s in views.shares(run)) else None
