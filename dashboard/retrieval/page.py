"""The retrieval page: which heads copy the needle's answer out of a long context while decoding.

Elements (stable ids): ``retrieval-run`` (run picker), ``retrieval-gate`` (how many tests passed the
ROUGE-1 gate: what every score rests on), ``retrieval-settings`` (the run's grid and scoring
settings), ``retrieval-grid`` (layer x head map of the retrieval score, retrieval heads ringed),
``retrieval-histogram`` (score distribution with the threshold and the share above it),
``retrieval-top-n`` (how many top heads), ``retrieval-top`` (top heads: bars) and
``retrieval-top-table`` (the same as a table), ``retrieval-mask-metric`` (recall or share recalled),
``retrieval-masking`` (recall against K, top-K vs random-K heads masked), ``retrieval-recall``
(recall over depth x length), ``retrieval-validation`` (the held-out validation of the retrieval
heads: the shared block of :mod:`dashboard.core.validation`), ``retrieval-test`` (test picker), ``retrieval-test-detail`` (what it asked
for, the generated text, recall), ``retrieval-test-grid`` (which heads copy-pasted on it) and
``retrieval-test-heads`` (the same as a table). ``retrieval-focus`` and ``retrieval-focus-head``: the
head the URL's ``head=L<layer>H<head>`` focuses, outlined on both maps.

The callbacks are methods taking plain values, so tests call them directly;
:meth:`RetrievalPage.register_callbacks` only wires them to the elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, html
from dash.development.base_component import Component

from analyses.runstore import Run
from dashboard.core import focus
from dashboard.core import page as ui
from dashboard.core.page import RUN_ERRORS, AnalysisPage, empty_figure, why
from dashboard.core.validation import validation_block
from dashboard.retrieval import views

TOP_N_CHOICES = (10, 20, 50)
DEFAULT_TOP_N = 20
DEFAULT_METRIC: views.MaskMetric = "recall"


class RetrievalPage(AnalysisPage):
    path: ClassVar[str] = "/retrieval"
    title: ClassVar[str] = "Retrieval"
    analysis: ClassVar[str] = "retrieval"
    required_tables: ClassVar[frozenset[str]] = views.REQUIRED_TABLES

    # ------------------------------------------------------------------------------------ layout

    def layout(self, params: Mapping[str, str]) -> Component:
        choice = self.choose_run(params)
        wanted_test: int | None = None
        if (params.get("test") or "").isdigit():
            wanted_test = int(params["test"])
        test_options, test = self.test_options(choice.run_id, wanted_test)
        metric = params.get("metric") if params.get("metric") in views.MASK_METRICS else DEFAULT_METRIC
        return html.Div(
            [
                html.H2("Retrieval heads"),
                *self.focus_elements(self.focus(params, choice.run_id)),
                html.P(
                    "A needle sentence is put at a depth of a haystack and the model answers a question "
                    "about it by greedy decoding. Under the needle protocol (Wu et al. 2024) it is asked "
                    "to reproduce the whole needle; under the answer protocol only the needle's answer. "
                    "At each step a head copy-pastes when its attention argmax lies in the scored span "
                    "(the needle, or its answer) on the very token being generated; each hit adds "
                    "1/|span| to its score on that test. Only tests whose reference was recalled "
                    "(ROUGE-1 recall above the gate) count; a head's retrieval score is the mean over "
                    "them, and a retrieval head scores above the run's threshold (0.1 in the paper). "
                    "The retrieval heads are then masked on held-out needles, against random head sets.",
                    className="hint",
                ),
                ui.controls(self.run_picker(choice)),
                html.Div(id="retrieval-gate", children=self.gate_banner(choice.run_id)),
                html.P(id="retrieval-settings", className="hint"),
                *choice.notes,
                ui.columns(
                    ui.panel(ui.graph("retrieval-grid")),
                    ui.panel(ui.graph("retrieval-histogram"), css=ui.DETAIL_PANEL),
                ),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(
                            ui.radio(
                                "top heads",
                                "retrieval-top-n",
                                [{"label": str(n), "value": n} for n in TOP_N_CHOICES],
                                DEFAULT_TOP_N,
                            )
                        ),
                        ui.graph("retrieval-top"),
                    ),
                    ui.panel(html.Div(id="retrieval-top-table"), css=ui.DETAIL_PANEL),
                ),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(
                            ui.radio(
                                "masking curve of",
                                "retrieval-mask-metric",
                                [
                                    {"label": views.MASK_METRIC_LABELS[m], "value": m}
                                    for m in views.MASK_METRICS
                                ],
                                metric,
                            )
                        ),
                        ui.graph("retrieval-masking"),
                    ),
                    ui.panel(ui.graph("retrieval-recall"), css=ui.DETAIL_PANEL),
                ),
                ui.panel(html.Div(id="retrieval-validation")),
                html.H3("One needle test"),
                ui.controls(
                    ui.dropdown(
                        "test", "retrieval-test", "control control-run", options=test_options, value=test
                    )
                ),
                ui.columns(
                    ui.panel(ui.graph("retrieval-test-grid")),
                    ui.panel(
                        html.Div(id="retrieval-test-detail"),
                        html.Div(id="retrieval-test-heads"),
                        css=ui.DETAIL_PANEL,
                    ),
                ),
            ],
            className="page",
        )

    # --------------------------------------------------------------------------------- callbacks

    def test_options(
        self, run_id: str | None, current: int | None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Every test of the run (labelled with length, depth, needle, verdict); keeps ``current``
        when the run has it, else the first test that passed the gate (else the first test)."""
        if not run_id:
            return [], None
        try:
            tests = views.tests_table(self._checked(run_id))
        except RUN_ERRORS:
            return [], None
        if tests.empty:
            return [], None
        ids = [int(t) for t in tests["test"]]
        options: list[dict[str, Any]] = [
            {"label": views.test_label(row), "value": int(row["test"])} for _, row in tests.iterrows()
        ]
        if current is not None and current in ids:
            return options, int(current)
        passed = tests[tests["passed"]]
        return options, int(passed["test"].iloc[0]) if len(passed) else ids[0]

    def gate_banner(self, run_id: str | None) -> Component:
        """The number of tests that passed the gate, large; a warning style when it is small."""
        if not run_id:
            return html.P("No run selected.", className="hint")
        try:
            run = self._checked(run_id)
            passed, total = views.gate_counts(run)
            line = views.gate_line(run)
            info = views.overview(run)
        except RUN_ERRORS as err:
            return html.P(f"cannot read run {run_id}: {why(err)}", className="error")
        weak = passed < views.WEAK_EVIDENCE
        share = (
            f"{info['retrieval_heads']} of {info['heads']} heads ({info['share_retrieval_heads']:.1%}) "
            f"score > {info['threshold']:g}"
            if passed
            else "no head scores"
        )
        return html.Div(
            [
                html.Span(
                    f"{passed} / {total}",
                    id="retrieval-gate-count",
                    style={"fontSize": "30px", "fontWeight": "bold", "marginRight": "14px"},
                ),
                html.Span("tests passed the gate", style={"fontWeight": "bold", "marginRight": "14px"}),
                html.Span(share, style={"marginRight": "14px"}),
                html.Div(line, className="hint" if not weak else ""),
                html.Div(views.protocol_line(run), className="hint", id="retrieval-protocol"),
            ],
            className="caveat" if weak else "panel",
            style={"margin": "6px 0 10px"},
        )

    def settings_text(self, run_id: str | None) -> str:
        return self._text(run_id, lambda run: f"{run.model_name}: {views.settings_line(run)}")

    def grid_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, views.score_grid, f"{run_id}/grid")

    def histogram_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, views.score_histogram)

    def top_figure(self, run_id: str | None, n: int | None) -> go.Figure:
        return self._figure(run_id, lambda run: views.top_heads_figure(run, _top_n(n)))

    def masking_figure(self, run_id: str | None, metric: str | None) -> go.Figure:
        shown: views.MaskMetric = "recalled" if metric == "recalled" else "recall"
        return self._figure(run_id, lambda run: views.masking_figure(run, shown))

    def recall_figure(self, run_id: str | None, test: int | None) -> go.Figure:
        def draw(run: Run) -> go.Figure:
            chosen = test if test is not None and test in views.test_ids(run) else None
            return views.recall_grid(run, chosen)

        return self._figure(run_id, draw)

    def test_grid_figure(self, run_id: str | None, test: int | None) -> go.Figure:
        if run_id and test is None:
            return empty_figure("select a test")
        return self._figure(run_id, lambda run: views.test_grid(run, int(test or 0)), f"{run_id}/test-grid")

    def top_table(self, run_id: str | None, n: int | None) -> Component:
        if not run_id:
            return html.P("No run selected.", className="hint")
        try:
            run = self._checked(run_id)
            top = views.top_heads(run, _top_n(n))
            passed, _ = views.gate_counts(run)
        except RUN_ERRORS as err:
            return html.P(f"cannot list the top heads: {why(err)}", className="error")
        if top.empty:
            return html.P("No test passed the gate, so no head has a score.", className="hint")
        return html.Div(
            [
                html.H3(f"Top {len(top)} heads"),
                _table(
                    top.assign(head=top["label"]),
                    views.TOP_COLUMNS,
                    table_id="retrieval-top-rows",
                ),
                html.P(
                    f"Retrieval score: mean copy-paste share of {views.span_noun(run)} over the {passed} "
                    "passing tests. Activation frequency: share of those tests in which the head copy-pasted at "
                    "least once (a high score with a low frequency is a specialist of a few needles).",
                    className="hint",
                ),
            ]
        )

    def validation_panel(self, run_id: str | None) -> Component:
        """The held-out validation of the retrieval heads (the shared block), with what was tested."""

        def build(run: Run) -> Component:
            table = views.validation_table(run)
            parts: list[Component] = [
                html.H3("Held-out validation of the retrieval heads"),
                html.P(views.validation_note(run), className="hint", id="retrieval-validation-note"),
            ]
            if table is not None:
                parts.append(validation_block(table, graph_id="retrieval-validation-graph"))
            return html.Div(parts)

        return self._block(run_id, build, "cannot show the validation")

    def test_detail(self, run_id: str | None, test: int | None) -> Component:
        if not run_id or test is None:
            return html.P("No test selected.", className="hint")
        try:
            info = views.test_summary(self._checked(run_id), int(test))
        except RUN_ERRORS as err:
            return html.P(f"cannot show test {test}: {why(err)}", className="error")
        verdict = (
            "passed the gate: its scores count"
            if info["passed"]
            else "did not pass the gate: its scores do not count"
        )
        rows = [
            ("needle", f"{info['needle_kind']} (needle {info['needle']})"),
            ("context", f"{info['n_tokens']} tokens (asked {info['length']})"),
            ("depth", f"{info['depth']:g} asked, {info['depth_actual']:.2f} reached"),
            (
                "scored span",
                f"tokens {info['span'][0]}–{info['span'][1] - 1} ({info['span'][1] - info['span'][0]} tokens)",
            ),
            ("decoding", f"{info['n_steps']} steps, stopped on {info['stopped_on']}"),
            ("ROUGE-1 recall", f"{info['rouge1_recall']:.2f}: {verdict}"),
            ("heads that copy-pasted", str(info["heads_hit"])),
        ]
        return html.Div(
            [
                html.H3(f"Test {info['test']}"),
                html.P(["asked for: ", html.Code(info["reference"], id="retrieval-test-answer")]),
                html.P(["generated: ", html.Code(info["generated"], id="retrieval-test-generated")]),
                html.Table(
                    html.Tbody([html.Tr([html.Td(k), html.Td(v)]) for k, v in rows]), className="data kv"
                ),
            ]
        )

    def test_heads_table(self, run_id: str | None, test: int | None) -> Component:
        if not run_id or test is None:
            return html.P("No test selected.", className="hint")
        try:
            rows = views.test_heads(self._checked(run_id), int(test))
        except RUN_ERRORS as err:
            return html.P(f"cannot list the heads of test {test}: {why(err)}", className="error")
        if rows.empty:
            return html.P(f"No head copy-pasted on test {test}.", className="hint")
        return html.Div(
            [
                html.H3(f"Heads that copy-pasted on test {test}"),
                _table(
                    rows.assign(head=rows["label"]),
                    {
                        "head": "head",
                        "score": "score on this test",
                        "retrieval_score": "retrieval score",
                        "is_retrieval": "retrieval head",
                    },
                    table_id="retrieval-test-rows",
                ),
            ]
        )

    def register_callbacks(self, app: Dash) -> None:
        app.callback(
            Output("retrieval-test", "options"),
            Output("retrieval-test", "value"),
            Input("retrieval-run", "value"),
            State("retrieval-test", "value"),
        )(self.test_options)
        app.callback(Output("retrieval-gate", "children"), Input("retrieval-run", "value"))(self.gate_banner)
        app.callback(Output("retrieval-settings", "children"), Input("retrieval-run", "value"))(
            self.settings_text
        )
        app.callback(Output("retrieval-grid", "figure"), Input("retrieval-run", "value"))(self.grid_figure)
        for graph_id in ("retrieval-grid", "retrieval-test-grid"):
            focus.register_outline(app, graph_id, "retrieval-focus-head")
        app.callback(Output("retrieval-validation", "children"), Input("retrieval-run", "value"))(
            self.validation_panel
        )
        app.callback(Output("retrieval-histogram", "figure"), Input("retrieval-run", "value"))(
            self.histogram_figure
        )
        app.callback(
            Output("retrieval-top", "figure"),
            Input("retrieval-run", "value"),
            Input("retrieval-top-n", "value"),
        )(self.top_figure)
        app.callback(
            Output("retrieval-top-table", "children"),
            Input("retrieval-run", "value"),
            Input("retrieval-top-n", "value"),
        )(self.top_table)
        app.callback(
            Output("retrieval-masking", "figure"),
            Input("retrieval-run", "value"),
            Input("retrieval-mask-metric", "value"),
        )(self.masking_figure)
        app.callback(
            Output("retrieval-recall", "figure"),
            Input("retrieval-run", "value"),
            Input("retrieval-test", "value"),
        )(self.recall_figure)
        app.callback(
            Output("retrieval-test-grid", "figure"),
            Input("retrieval-run", "value"),
            Input("retrieval-test", "value"),
        )(self.test_grid_figure)
        app.callback(
            Output("retrieval-test-detail", "children"),
            Input("retrieval-run", "value"),
            Input("retrieval-test", "value"),
        )(self.test_detail)
        app.callback(
            Output("retrieval-test-heads", "children"),
            Input("retrieval-run", "value"),
            Input("retrieval-test", "value"),
        )(self.test_heads_table)


def _top_n(n: int | None) -> int:
    return int(n) if isinstance(n, int) and n > 0 else DEFAULT_TOP_N


def _table(rows: pd.DataFrame, columns: Mapping[str, str], *, table_id: str) -> Component:
    text_columns = {"head", "label"}

    def cell(column: str, value: Any) -> Component:
        if isinstance(value, bool) or column == "is_retrieval":
            return html.Td("yes" if bool(value) else "no")
        if column in text_columns:
            return html.Td(str(value), className="mono")
        if column == "activation_frequency":
            return html.Td(f"{float(value):.0%}", className="num")
        if isinstance(value, float):
            return html.Td(f"{value:.3f}", className="num")
        return html.Td(str(value), className="num")

    header = html.Tr(
        [
            html.Th(label, className="" if c in text_columns | {"is_retrieval"} else "num")
            for c, label in columns.items()
        ]
    )
    body = [html.Tr([cell(c, row[c]) for c in columns]) for _, row in rows.iterrows()]
    return html.Table([html.Thead(header), html.Tbody(body)], className="data", id=table_id)
