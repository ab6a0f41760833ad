"""The VHD page: which heads use the image (VHD), T-VHD of hallucinated and correct object words, and
whether reinforcing the vision-aware heads (VHR) changes CHAIR and POPE.

It shows one ``vhd`` or ``vhr`` run (:mod:`analyses.vhd`, He et al., ACL 2025); a ``vhd``
run has no VHR settings, so its reinforcement panels say so.

Elements (stable ids): ``vhd-run`` (run picker), ``vhd-settings`` (the run's settings),
``vhd-findings`` (sentences reading the run's numbers), ``vhd-metric`` (head metric),
``vhd-heads`` (layer x head map of that metric, the VHR layers marked), ``vhd-words`` (T-VHD of
hallucinated vs correct object words), ``vhd-test`` (the Mann–Whitney test row as text),
``vhd-scene`` (a scene with a caption), ``vhd-caption`` (T-VHD along its baseline caption),
``vhd-image`` (its image), ``vhd-captions`` (its baseline and main-VHR captions with CHAIR's reading),
``vhd-warnings`` (settings whose object recall or caption length collapses, so that their low CHAIR
means nothing), ``vhd-benchmarks`` (CHAIR with object recall and caption length beside it, and POPE,
per setting), ``vhd-deltas`` (paired changes against the baseline), ``vhd-sweep`` (the alpha × layers
sweep's paired changes), ``vhd-sweep-text`` (its reading) and ``vhd-validation`` (the held-out
validation of VHR's heads against random head sets). ``vhd-focus`` and ``vhd-focus-head``: the head the
URL's ``head=L<layer>H<head>`` focuses, outlined on the head map.

The callbacks are methods taking plain values, so tests call them directly;
:meth:`VhdPage.register_callbacks` only wires them to the elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import plotly.graph_objects as go
from dash import Dash, Input, Output, State, ctx, html
from dash.development.base_component import Component

from dashboard.core import focus
from dashboard.core import page as ui
from dashboard.core.page import RUN_ERRORS, MultiAnalysisPage, why
from dashboard.core.validation import validation_block
from dashboard.vhd import figures, views
from dashboard.vhd import sweep as sw

DEFAULT_METRIC = "vhd_mean"


class VhdPage(MultiAnalysisPage):
    path: ClassVar[str] = "/vhd"
    title: ClassVar[str] = "VHD"
    analysis: ClassVar[str] = "vhr"  # the run kind suggested when there is none
    analyses: ClassVar[tuple[str, ...]] = views.ANALYSES
    run_noun: ClassVar[str] = "VHD (vhd or vhr)"
    element_prefix: ClassVar[str] = "vhd"
    required_tables: ClassVar[frozenset[str]] = views.REQUIRED_TABLES
    tables_noun: ClassVar[str] = "vhd"

    # ------------------------------------------------------------------------------------ layout

    def layout(self, params: Mapping[str, str]) -> Component:
        choice = self.choose_run(params)
        metric_options, metric = self.metric_choice(choice.run_id, params.get("metric"))
        wanted = params.get("scene") or ""
        scene_options, scene = self.scene_choice(choice.run_id, int(wanted) if wanted.isdigit() else None)
        return html.Div(
            [
                html.H2("Vision-aware heads: VHD, T-VHD and VHR"),
                *self.focus_elements(self.focus(params, choice.run_id)),
                html.P(
                    "VHD of a head (He et al., ACL 2025): the distance between its output with the image "
                    "and with the image tokens removed from the prompt, at each generated token; a head "
                    "whose output barely changes answers from the text alone. T-VHD of a generated token: "
                    "the sum over layers of each layer's top-k VHD at the step that produced it; the paper "
                    "finds it lower for hallucinated object words. VHR scales the outputs of the heads "
                    "with above-median VHD (outliers with a large text-only norm set aside) in chosen "
                    "layers, at every step. CHAIR counts hallucinated objects in the captions, POPE asks "
                    "yes/no questions about present and absent objects; intervals are bootstraps over "
                    "scenes.",
                    className="hint",
                ),
                *self.run_header(choice),
                html.Div(id="vhd-warnings"),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(
                            ui.dropdown(
                                "head metric",
                                "vhd-metric",
                                options=metric_options,
                                value=metric,
                                placeholder="no head metrics",
                            )
                        ),
                        ui.graph("vhd-heads"),
                    ),
                    ui.panel(
                        ui.graph("vhd-words"),
                        html.P(id="vhd-test", className="hint"),
                        css=ui.DETAIL_PANEL,
                    ),
                ),
                html.Div(
                    [
                        ui.detail_controls(
                            ui.dropdown(
                                "scene",
                                "vhd-scene",
                                options=scene_options,
                                value=scene,
                                placeholder="no captioned scenes",
                            )
                        ),
                        ui.columns(
                            ui.panel(ui.graph("vhd-caption"), css=ui.DETAIL_PANEL),
                            ui.panel(ui.graph("vhd-image"), html.Div(id="vhd-captions")),
                        ),
                    ],
                    className="panel",
                    style={"margin": "20px 0"},
                ),
                html.H3("CHAIR, object recall, caption length and POPE under VHR"),
                html.P(
                    "CHAIR is low both when captions hallucinate less and when they name fewer objects or "
                    f"say less: read it with recall and length. The red dashes mark the flag: "
                    f"{views.collapse_rule()}.",
                    className="hint",
                ),
                ui.columns(
                    ui.panel(ui.graph("vhd-benchmarks"), css=ui.DETAIL_PANEL),
                    ui.panel(ui.graph("vhd-deltas"), css=ui.DETAIL_PANEL),
                ),
                html.H3("Where VHR helps: the sweep and the held-out test of its heads"),
                html.P(
                    "Each alpha at the main setting's layers and each layer set at its alpha (alpha < 1 "
                    "suppresses the selected heads: the converse control), against the unmodified model "
                    "on the same scenes. Below, the heads VHR selects on most scenes, scaled on held-out "
                    "scenes, against random head sets of the same size from the same layers.",
                    className="hint",
                ),
                ui.panel(ui.graph("vhd-sweep"), html.Ul(id="vhd-sweep-text")),
                html.Div(id="vhd-validation", className="panel"),
            ],
            className="page",
        )

    # --------------------------------------------------------------------------------- callbacks

    def metric_choice(
        self, run_id: str | None, current: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The run's head metrics as options; keeps ``current`` when the run has it, else VHD (mean)."""
        if not run_id:
            return [], None
        try:
            names = views.head_metrics(self._checked(run_id))
        except RUN_ERRORS:
            return [], None
        options: list[dict[str, Any]] = [{"label": views.METRIC_NAMES[m], "value": m} for m in names]
        if current in names:
            return options, current
        return options, DEFAULT_METRIC if DEFAULT_METRIC in names else (names[0] if names else None)

    def scene_choice(
        self, run_id: str | None, current: Any, triggered: str | None = None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """The run's captioned scenes as options, and the one to show: ``current`` if the run has it
        (unless the run just changed), else the first scene with a hallucinated word, else the first."""
        if not run_id:
            return [], None
        try:
            run = self._checked(run_id)
            options = views.scene_options(run)
            default = views.default_scene(run)
        except RUN_ERRORS:
            return [], None
        values = [o["value"] for o in options]
        if triggered != "vhd-run" and isinstance(current, int) and current in values:
            return options, current
        return options, default

    def settings(self, run_id: str | None) -> str:
        return self._text(run_id, views.settings_line)

    def findings(self, run_id: str | None) -> Component:
        return self._block(
            run_id,
            lambda run: html.Ul(
                [
                    html.Li(line, className="warning" if line.startswith("Warning:") else None)
                    for line in views.findings(run)
                ],
                id="vhd-findings-list",
            ),
        )

    def warnings(self, run_id: str | None) -> Component:
        """A warning box per setting whose recall or caption length collapses (nothing when none)."""

        def build(run: Any) -> Component:
            found = views.collapses(run)
            if not found:
                return html.Div()
            return html.Div(
                [html.P([html.B("⚠ Warning: "), c.message()], className="warning") for c in found]
                + [html.P(f"The rule: {views.collapse_rule()}.", className="hint")],
                id="vhd-warnings-list",
            )

        if not run_id:
            return html.Div()
        return self._block(run_id, build, "cannot check recall and caption length")

    def test_text(self, run_id: str | None) -> str:
        return self._text(run_id, views.tvhd_test_line, "cannot read the T-VHD test")

    def heads_figure(self, run_id: str | None, metric: str | None) -> go.Figure:
        shown = metric if metric in views.HEAD_METRICS else DEFAULT_METRIC
        return self._figure(
            run_id, lambda run: figures.heads_figure(run, shown), uirevision=f"{run_id}/heads"
        )

    def words_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, figures.tvhd_distribution_figure)

    def caption_figure(self, run_id: str | None, scene: Any) -> go.Figure:
        if run_id and not isinstance(scene, int):
            return ui.empty_figure("no scene with a caption in this run")
        return self._figure(run_id, lambda run: figures.tvhd_caption_figure(run, int(scene)))

    def image_figure(self, run_id: str | None, scene: Any) -> go.Figure:
        if run_id and not isinstance(scene, int):
            return ui.empty_figure("no scene selected")
        return self._figure(run_id, lambda run: figures.image_figure(run, int(scene)))

    def captions_block(self, run_id: str | None, scene: Any) -> Component:
        if not run_id or not isinstance(scene, int):
            return html.P("No scene selected.", className="hint")
        try:
            run = self._checked(run_id)
            captions = views.scene_captions(run, scene)
            truth = views.scene_truth(run, scene)
        except RUN_ERRORS as err:
            return html.P(f"cannot show the captions: {why(err)}", className="error")
        parts: list[Component] = []
        for cap in captions:
            label = (
                "baseline caption" if cap.setting == views.BASELINE else f"caption under VHR ({cap.setting})"
            )
            parts.append(html.H3(label))
            parts.append(html.P(cap.text or "(empty)", className="mono"))
            bad: Component | str = (
                html.Span(
                    ", ".join(cap.hallucinated),
                    style={"color": figures.HALLUCINATED_COLOUR, "fontWeight": "bold"},
                )
                if cap.hallucinated
                else "none"
            )
            facts = [
                f"objects named: {', '.join(cap.mentioned) or 'none'}; ",
                "hallucinated: ",
                bad,
                f"; missed: {', '.join(cap.missed) or 'none'}.",
            ]
            parts.append(html.P(facts, className="hint"))
        if truth:
            parts.append(html.P(f"Ground truth: {truth}", className="hint"))
        return html.Div(parts, id="vhd-captions-text")

    def benchmarks_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, figures.benchmark_figure)

    def deltas_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, figures.deltas_figure)

    def sweep_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, sw.sweep_figure)

    def sweep_text(self, run_id: str | None) -> Component:
        return self._block(run_id, lambda run: html.Ul([html.Li(line) for line in sw.sweep_sentences(run)]))

    def validation(self, run_id: str | None) -> Component:
        return self._block(
            run_id,
            lambda run: validation_block(sw.validation_table(run), graph_id="vhd-validation-graph"),
            "cannot show the held-out validation",
        )

    def register_callbacks(self, app: Dash) -> None:
        run = Input("vhd-run", "value")
        app.callback(
            Output("vhd-metric", "options"), Output("vhd-metric", "value"), run, State("vhd-metric", "value")
        )(self.metric_choice)

        def scene_choice(run_id: str | None, current: Any) -> tuple[list[dict[str, Any]], int | None]:
            return self.scene_choice(run_id, current, ctx.triggered_id)

        app.callback(
            Output("vhd-scene", "options"), Output("vhd-scene", "value"), run, State("vhd-scene", "value")
        )(scene_choice)
        app.callback(Output("vhd-settings", "children"), run)(self.settings)
        app.callback(Output("vhd-findings", "children"), run)(self.findings)
        app.callback(Output("vhd-warnings", "children"), run)(self.warnings)
        app.callback(Output("vhd-test", "children"), run)(self.test_text)
        app.callback(Output("vhd-heads", "figure"), run, Input("vhd-metric", "value"))(self.heads_figure)
        focus.register_outline(app, "vhd-heads", "vhd-focus-head")
        app.callback(Output("vhd-words", "figure"), run)(self.words_figure)
        scene = Input("vhd-scene", "value")
        app.callback(Output("vhd-caption", "figure"), run, scene)(self.caption_figure)
        app.callback(Output("vhd-image", "figure"), run, scene)(self.image_figure)
        app.callback(Output("vhd-captions", "children"), run, scene)(self.captions_block)
        app.callback(Output("vhd-benchmarks", "figure"), run)(self.benchmarks_figure)
        app.callback(Output("vhd-deltas", "figure"), run)(self.deltas_figure)
        app.callback(Output("vhd-sweep", "figure"), run)(self.sweep_figure)
        app.callback(Output("vhd-sweep-text", "children"), run)(self.sweep_text)
        app.callback(Output("vhd-validation", "children"), run)(self.validation)
