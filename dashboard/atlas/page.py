"""The atlas page: the home of a model, every role of every head joined from its runs.

Elements (stable ids): ``atlas-run`` (run picker), ``atlas-settings``, ``atlas-findings``,
``atlas-grid`` (layer x head map, one stripe per role of each head; click a head),
``atlas-head`` (store: the selected head), ``atlas-head-card`` (the head's roles, every number with
its percentile and run, links to the source pages), ``atlas-pattern`` (its attention pattern from
the joined census run), the heads table's filters ``atlas-filter-roles``, ``atlas-filter-match``,
``atlas-filter-metric``, ``atlas-filter-low``, ``atlas-filter-high``, ``atlas-filter-layers``,
``atlas-sort``, ``atlas-order`` and the table ``atlas-table`` (a row's button
``{"type": "atlas-row", "where": "heads", "head": "L3H7"}`` selects the head), the findings
``atlas-overlap``, ``atlas-correlations``, ``atlas-many``, and the comparison of models
``atlas-compare-runs``, ``atlas-compare-role``, ``atlas-compare-metric``, ``atlas-compare-depth``,
``atlas-compare-metrics``, ``atlas-compare-totals``.

URL parameters: ``run`` (an atlas run id) and ``head`` (``L<layer>H<head>``: the head whose card
opens). The head card links to each source run's page as ``<page>?run=<id>&head=L<layer>H<head>``:
every page focuses that head (:mod:`dashboard.core.focus`: a banner linking back here, the head
selected where the page has a head picker and outlined on its layer x head maps); the ViT page gets it
as ``<layer>-<head>``.

The callbacks are methods taking plain values, so tests call them directly;
:meth:`AtlasPage.register_callbacks` only wires them to the elements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import plotly.graph_objects as go
from dash import ALL, Dash, Input, Output, State, ctx, dcc, html
from dash.development.base_component import Component
from dash.exceptions import PreventUpdate

from analyses.registry import ANALYSES
from analyses.runstore import Run
from dashboard.atlas import comparison, views
from dashboard.atlas.views import PickedHead
from dashboard.core import figures
from dashboard.core import page as ui
from dashboard.core.page import RUN_ERRORS, AnalysisPage, RunChoice, empty_figure, why
from probe.errors import ConfigError

MAX_ROWS = 60  # heads listed at most; the count says how many match
MAX_COMPARED = 6  # atlases compared by default (the newest of each model)
SelectedHead = dict[str, Any]  # {"run": run id, "layer": int, "head": int}, the atlas-head store
ROW = "atlas-row"


class AtlasPage(AnalysisPage):
    path: ClassVar[str] = "/atlas"
    title: ClassVar[str] = "Atlas"
    analysis: ClassVar[str] = views.ANALYSIS
    required_tables: ClassVar[frozenset[str]] = views.REQUIRED_TABLES

    # ------------------------------------------------------------------------------------ layout

    def layout(self, params: Mapping[str, str]) -> Component:
        choice = self.choose_run(params)
        wanted = views.parse_head(params.get("head"))
        selected = (
            {"run": choice.run_id, "layer": wanted.layer, "head": wanted.head}
            if wanted is not None and choice.run_id
            else None
        )
        roles, metrics, sorts, low, high, layers, marks = self.filter_options(choice.run_id)
        compare_options, compared = self.compare_choice(choice.run_id)
        return html.Div(
            [
                html.H2("Head atlas: every role of every head"),
                html.P(
                    "One table per model, joined from its newest runs: each analysis's numbers for "
                    "every head, and the roles they give it by the rule and threshold of the paper the "
                    "role comes from. A head may have several roles; the map shows them all. Click a "
                    "head on the map or in the table for its card: every number with its percentile "
                    "in the model, the run it comes from, and links to the pages of those runs.",
                    className="hint",
                ),
                *self.run_header(choice),
                ui.columns(
                    ui.panel(
                        ui.graph("atlas-grid"),
                        html.P("Click a cell to open that head's card.", className="hint"),
                        ui.graph("atlas-pattern"),
                    ),
                    ui.panel(html.Div(id="atlas-head-card"), css=ui.DETAIL_PANEL),
                ),
                html.H3("Heads"),
                html.Div(
                    [
                        _filters(roles, metrics, sorts, low, high, layers, marks),
                        html.Div(id="atlas-table"),
                    ],
                    className="panel",
                ),
                html.H3("Across analyses"),
                ui.columns(
                    ui.panel(ui.graph("atlas-overlap")),
                    ui.panel(
                        html.Div(id="atlas-correlations"), html.Div(id="atlas-many"), css=ui.DETAIL_PANEL
                    ),
                ),
                html.H3("Models side by side"),
                html.P(
                    [
                        "Pick atlases of several models (one each): the share of heads with a role by "
                        "relative depth (layer / layers), and each key metric's spread over the heads. "
                        "Atlases of several models at once: ",
                        html.Code("headlab atlas --model A --model B"),
                        ".",
                    ],
                    className="hint",
                ),
                ui.controls(
                    ui.control(
                        "atlases",
                        dcc.Dropdown(
                            id="atlas-compare-runs", options=compare_options, value=compared, multi=True
                        ),
                        "atlas-compare-runs",
                        "control control-run",
                    ),
                ),
                ui.columns(
                    ui.panel(
                        ui.detail_controls(ui.dropdown("role", "atlas-compare-role")),
                        ui.graph("atlas-compare-depth"),
                    ),
                    ui.panel(
                        ui.detail_controls(ui.dropdown("metric", "atlas-compare-metric")),
                        ui.graph("atlas-compare-metrics"),
                        css=ui.DETAIL_PANEL,
                    ),
                ),
                html.Div(id="atlas-compare-totals"),
                dcc.Store(id="atlas-head", data=selected),
            ],
            className="page",
        )

    def choose_run(self, params: Mapping[str, str]) -> RunChoice:
        """As every page chooses its run; when there is no atlas, a note saying how to build one."""
        choice = super().choose_run(params)
        if choice.run_id is not None:
            return choice
        return RunChoice(choice.options, None, [self.no_atlas_note(), *choice.notes[1:]])

    def no_atlas_note(self) -> Component:
        """No atlas under the root: what one is, and the command that builds one for each model
        with runs the atlas joins (or, with none, the command that runs them first)."""
        root = self.catalog.root
        joinable = {name for name, entry in ANALYSES.items() if entry.roles}
        models: dict[str, list[str]] = {}
        for entry in self.catalog.entries():
            if entry.ok and entry.model and entry.analysis in joinable:
                models.setdefault(entry.model, [])
                if entry.analysis not in models[entry.model]:
                    models[entry.model].append(entry.analysis)
        if models:
            steps: list[Component] = [
                html.Li(
                    [
                        f"{model} (runs of {', '.join(analyses)}): ",
                        html.Code(f"headlab atlas --model {model} --root {root}"),
                    ]
                )
                for model, analyses in models.items()
            ]
            how: Component = html.Div([html.P("Models with runs an atlas joins:"), html.Ul(steps)])
        else:
            how = html.P(
                [
                    "No run here gives a head role yet; run the analyses the atlas joins first, with "
                    "their fast settings: ",
                    html.Code(f"headlab atlas --model M --run-missing --root {root}"),
                    ".",
                ]
            )
        return html.Div(
            [
                html.P(
                    [
                        html.B(f"No head atlas under {root} yet. "),
                        "An atlas joins the newest runs of one model (census, sinks, retrieval, "
                        "circuits…) into one table of every role of every head. Build one with ",
                        html.Code(f"headlab atlas --model M --root {root}"),
                        " (M: the model's name), then reload this page.",
                    ]
                ),
                how,
            ],
            className="warning",
            id="atlas-none",
        )

    # ------------------------------------------------------------------------- run and head

    def settings(self, run_id: str | None) -> str:
        return self._text(run_id, views.settings_line, "cannot read the atlas's settings")

    def findings(self, run_id: str | None) -> Component:
        return self._block(
            run_id,
            lambda run: html.Ul(
                [html.Li(line) for line in views.findings_lines(run)], id="atlas-findings-list"
            ),
            "cannot read the atlas",
        )

    def select_head(
        self,
        run_id: str | None,
        click_data: Mapping[str, Any] | None,
        current: SelectedHead | None,
        triggered: object = None,
    ) -> SelectedHead | None:
        """The head to show: the clicked one (a cell of the map, ``triggered == "atlas-grid"``, or a
        row's button, ``triggered`` its id), else ``current`` if it is of this run, else the head
        with the most roles."""
        if not run_id:
            return None
        try:
            heads = self._checked(run_id).table("heads")
        except RUN_ERRORS:
            return None
        clicked: PickedHead | None = None
        if triggered == "atlas-grid":
            clicked = views.clicked_head(click_data)
        elif isinstance(triggered, Mapping) and triggered.get("type") == ROW:
            clicked = views.parse_head(triggered.get("head"))
        if clicked is not None and views.has_head(heads, clicked):
            return _store(run_id, clicked)
        held = _as_head(current, run_id)
        if held is not None and views.has_head(heads, held):
            return _store(run_id, held)
        return _store(run_id, views.default_head(heads))

    def grid_figure(self, run_id: str | None, selected: SelectedHead | None) -> go.Figure:
        return self._figure(
            run_id, lambda run: views.role_grid(run, _as_head(selected, run_id)), uirevision=f"{run_id}/grid"
        )

    def head_card(self, run_id: str | None, selected: SelectedHead | None) -> Component:
        head = _as_head(selected, run_id)
        if not run_id:
            return html.P("No atlas selected.", className="hint")
        if head is None:
            return html.P("No head selected: click one on the map.", className="hint")
        return self._block(run_id, lambda run: self._card(run, head), f"cannot show head {head}")

    def _card(self, run: Run, head: PickedHead) -> Component:
        card = views.head_card(run, head)
        n = len(card.roles)
        parts: list[Component] = [
            html.H3(
                f"{head}: layer {head.layer}, head {head.head}, KV head {card.kv_head}, "
                f"relative depth {card.depth:.2f}",
                id="atlas-head-title",
            ),
            html.P(f"{n} role{'s' if n != 1 else ''}" + (":" if n else "."), id="atlas-head-count"),
        ]
        if n:
            parts.append(_roles_table(card))
        parts.append(self._metrics_table(card))
        parts.append(
            html.P(
                "percentile: the share of the model's heads with this value or a lower one. ± is the "
                "standard error the analysis recorded. Links open the source run on its page with "
                f"head={head} in the URL: the page selects that head where it can and outlines it on its maps.",
                className="hint",
            )
        )
        return html.Div(parts)

    def _metrics_table(self, card: views.HeadCard) -> Component:
        rows: list[Component] = []
        for analysis, group in card.metrics.groupby("analysis", sort=False):
            run_id = str(group["run_id"].iloc[0])
            link = self.site.link_for(str(analysis), run_id)
            target: Component | str = "(no page)"
            if link:
                href = f"{link}&head={views.head_parameter(str(analysis), card.head)}"
                target = dcc.Link(f"open on its page ({link.split('?')[0]})", href=href)
            rows.append(
                html.Tr(
                    html.Td([html.B(str(analysis)), " · run ", html.Code(run_id), " · ", target], colSpan=4),
                    className="current",
                )
            )
            for r in group.itertuples(index=False):
                rows.append(
                    html.Tr(
                        [
                            html.Td(str(r.source_column)),
                            html.Td(views.value_text(r.value), className="num"),
                            html.Td("" if r.sem != r.sem else f"± {r.sem:.2g}", className="num"),
                            html.Td(
                                "" if r.percentile != r.percentile else f"{r.percentile:.0f}", className="num"
                            ),
                        ]
                    )
                )
        header = html.Tr(
            [html.Th("number")] + [html.Th(h, className="num") for h in ("value", "±", "percentile")]
        )
        return html.Table([html.Thead(header), html.Tbody(rows)], className="data", id="atlas-head-metrics")

    def pattern_figure(self, run_id: str | None, selected: SelectedHead | None) -> go.Figure:
        head = _as_head(selected, run_id)
        if not run_id or head is None:
            return empty_figure("select a head")

        def draw(run: Run) -> go.Figure:
            census = views.source_run(run, views.PATTERN_ANALYSIS)
            if census is None:
                joined = ", ".join(views.sources(run)["analysis"]) or "none"
                return empty_figure(
                    f"no attention pattern: of the analyses this atlas joined ({joined}), none kept whole "
                    "patterns; the census keeps a few examples' patterns: run headlab run census on "
                    "this model, then rebuild the atlas"
                )
            try:
                source = self.catalog.open(census)
            except RUN_ERRORS as err:
                return empty_figure(
                    f"no attention pattern: the census run {census} cannot be opened: {why(err)}"
                )
            roles = views.head_roles(
                views.head_row(run.table("heads"), head), views.role_names(run.table("heads"))
            )
            fig = views.pattern_figure(source, head, roles)
            fig.update_layout(title={"text": f"{fig.layout.title.text} · census run"})
            return fig

        return self._figure(run_id, draw, uirevision=f"{run_id}/pattern")

    # ------------------------------------------------------------------------------ heads table

    def filter_options(
        self, run_id: str | None
    ) -> tuple[
        list[dict[str, str]], list[dict[str, str]], list[dict[str, str]], int, int, list[int], dict[Any, str]
    ]:
        """The filters' choices for the run: roles, metrics, sort columns, the layer slider's
        bounds, value and marks."""
        empty: tuple[Any, ...] = ([], [], [], 0, 0, [0, 0], {})
        if not run_id:
            return empty
        try:
            run = self._checked(run_id)
            heads = run.table("heads")
            roles = views.role_options(run)
        except RUN_ERRORS:
            return empty
        metrics = [{"label": c, "value": c} for c in views.metric_columns(heads)]
        last = views.grid_shape(heads)[0] - 1
        step = max(1, (last + 1) // 6)
        marks = {i: str(i) for i in range(0, last + 1, step)} | {last: str(last)}
        return roles, metrics, views.sort_options(heads), 0, last, [0, last], marks

    def heads_table(
        self,
        run_id: str | None,
        roles: Sequence[str] | None,
        match: str | None,
        metric: str | None,
        low: float | None,
        high: float | None,
        layers: Sequence[int] | None,
        sort: str | None,
        order: str | None,
    ) -> Component:
        def build(run: Run) -> Component:
            shown = views.filter_heads(
                run,
                roles=list(roles or ()),
                match="all" if match == "all" else "any",
                metric=metric,
                low=_number(low),
                high=_number(high),
                layers=layers,
                sort=sort,
                descending=order != "ascending",
            )
            total = len(run.table("heads"))
            extra = [
                c for c in dict.fromkeys([sort, metric]) if c and c in shown.columns and c not in views.KEYS
            ]
            count = f"{len(shown)} of {total} heads match"
            if len(shown) > MAX_ROWS:
                count += f"; the first {MAX_ROWS} are listed (narrow the filters to see the others)"
            return html.Div(
                [
                    html.P(count + ".", className="hint", id="atlas-table-count"),
                    html.Div(
                        _head_rows(shown.head(MAX_ROWS), extra, views.role_labels(run), "heads"),
                        style={"maxHeight": "560px", "overflowY": "auto"},
                    ),
                ]
            )

        return self._block(run_id, build, "cannot list the heads")

    # --------------------------------------------------------------------------------- findings

    def overlap_figure(self, run_id: str | None) -> go.Figure:
        return self._figure(run_id, views.overlap_figure)

    def correlations(self, run_id: str | None) -> Component:
        def build(run: Run) -> Component:
            top = views.top_correlations(run)
            parts: list[Component] = [html.H3("Strongest correlations across analyses")]
            if not len(top):
                parts.append(
                    html.P(
                        "No pair of key metrics from two analyses varies over enough heads.", className="hint"
                    )
                )
                return html.Div(parts)
            header = html.Tr(
                [html.Th("metric"), html.Th("metric")]
                + [html.Th(h, className="num") for h in ("Spearman", "heads", "p")]
            )
            body = [
                html.Tr(
                    [
                        html.Td(str(r.metric_a)),
                        html.Td(str(r.metric_b)),
                        html.Td(f"{r.spearman:+.2f}", className="num"),
                        html.Td(str(int(r.n)), className="num"),
                        html.Td(f"{r.p_value:.1g}", className="num"),
                    ]
                )
                for r in top.itertuples(index=False)
            ]
            parts += [
                html.Table(
                    [html.Thead(header), html.Tbody(body)], className="data", id="atlas-correlation-rows"
                ),
                html.P(
                    "Spearman's rank correlation over the heads where both are defined, strongest first; "
                    "pairs within one analysis are left out.",
                    className="hint",
                ),
            ]
            return html.Div(parts)

        return self._block(run_id, build, "cannot list the correlations")

    def many_roles(self, run_id: str | None) -> Component:
        def build(run: Run) -> Component:
            many = views.many_roles(run)
            parts: list[Component] = [html.H3("Heads with the most roles")]
            if not len(many):
                parts.append(html.P("No head has two roles or more.", className="hint"))
            else:
                parts.append(_head_rows(many, [], views.role_labels(run), "many"))
            return html.Div(parts)

        return self._block(run_id, build, "cannot list the heads with several roles")

    # ------------------------------------------------------------------------------- comparison

    def compare_choice(self, run_id: str | None) -> tuple[list[dict[str, Any]], list[str]]:
        """Every intact atlas (labelled by model) and the ones compared at first: ``run_id`` and the
        newest atlas of each other model, at most :data:`MAX_COMPARED`."""
        entries = [e for e in self.run_entries() if e.ok]
        options = [{"label": f"[{e.model}] {e.label}", "value": e.run_id} for e in entries]
        chosen: list[str] = []
        seen: set[str | None] = set()
        first = next((e for e in entries if e.run_id == run_id), None)
        for entry in ([first] if first else []) + entries:
            if entry.model not in seen and len(chosen) < MAX_COMPARED:
                seen.add(entry.model)
                chosen.append(entry.run_id)
        return options, chosen

    def _compared(self, run_ids: Sequence[str] | None) -> comparison.Tables:
        """The comparison tables of the atlases ``run_ids`` (ConfigError when none, or when two are
        of one model)."""
        ids = [r for r in (run_ids or []) if r]
        if not ids:
            raise ConfigError("pick one atlas or more to compare")
        runs = [self._checked(r) for r in ids]
        bins = int(getattr(runs[0].config, "depth_bins", 5))
        return comparison.tables(runs, bins)

    def compare_controls(
        self, run_ids: Sequence[str] | None, role: str | None, metric: str | None
    ) -> tuple[list[dict[str, str]], str | None, list[dict[str, str]], str | None]:
        """The roles and metrics of the compared atlases; keeps ``role`` and ``metric`` when they
        are among them."""
        try:
            frames = self._compared(run_ids)
        except RUN_ERRORS:
            return [], None, [], None
        roles, metrics = comparison.roles(frames), comparison.metrics(frames)
        role = role if role in roles else (roles[0] if roles else None)
        metric = metric if metric in metrics else (metrics[0] if metrics else None)
        return (
            [{"label": r, "value": r} for r in roles],
            role,
            [{"label": m, "value": m} for m in metrics],
            metric,
        )

    def _compare_figure(self, run_ids: Sequence[str] | None, draw: Any) -> go.Figure:
        try:
            fig = draw(self._compared(run_ids))
        except RUN_ERRORS as err:
            return empty_figure(f"cannot compare: {why(err)}")
        return figures.clear_modebar(fig)

    def compare_depth(self, run_ids: Sequence[str] | None, role: str | None) -> go.Figure:
        if not role:
            return self._compare_figure(run_ids, lambda _: empty_figure("no role to compare"))
        return self._compare_figure(run_ids, lambda frames: comparison.depth_figure(frames, role))

    def compare_metrics(self, run_ids: Sequence[str] | None, metric: str | None) -> go.Figure:
        if not metric:
            return self._compare_figure(run_ids, lambda _: empty_figure("no metric to compare"))
        return self._compare_figure(run_ids, lambda frames: comparison.distribution_figure(frames, metric))

    def compare_totals(self, run_ids: Sequence[str] | None) -> Component:
        try:
            wide = comparison.totals_table(self._compared(run_ids))
        except RUN_ERRORS as err:
            return html.P(f"cannot compare: {why(err)}", className="error")
        header = html.Tr(
            [html.Th(str(c)) if c == "role" else html.Th(str(c), className="num") for c in wide.columns]
        )
        body = [
            html.Tr(
                [html.Td(str(v)) if i == 0 else html.Td(str(v), className="num") for i, v in enumerate(row)]
            )
            for row in wide.itertuples(index=False)
        ]
        return html.Div(
            [
                html.H3("Heads per role and model"),
                html.Table([html.Thead(header), html.Tbody(body)], className="data", id="atlas-compare-rows"),
                html.P("Blank: no run of that model gives the role.", className="hint"),
            ]
        )

    # ------------------------------------------------------------------------------- callbacks

    def register_callbacks(self, app: Dash) -> None:
        run = Input("atlas-run", "value")
        app.callback(Output("atlas-settings", "children"), run)(self.settings)
        app.callback(Output("atlas-findings", "children"), run)(self.findings)

        def select(
            run_id: str | None, click: dict[str, Any] | None, _rows: list[Any], current: SelectedHead | None
        ) -> SelectedHead | None:
            triggered = ctx.triggered_id
            if isinstance(triggered, Mapping) and not (ctx.triggered and ctx.triggered[0].get("value")):
                raise PreventUpdate  # a table drawn anew, not a click on one of its rows
            return self.select_head(run_id, click, current, triggered)

        app.callback(
            Output("atlas-head", "data"),
            run,
            Input("atlas-grid", "clickData"),
            Input({"type": ROW, "where": ALL, "head": ALL}, "n_clicks"),
            State("atlas-head", "data"),
        )(select)
        head = Input("atlas-head", "data")
        app.callback(Output("atlas-grid", "figure"), run, head)(self.grid_figure)
        app.callback(Output("atlas-head-card", "children"), run, head)(self.head_card)
        app.callback(Output("atlas-pattern", "figure"), run, head)(self.pattern_figure)
        app.callback(
            Output("atlas-filter-roles", "options"),
            Output("atlas-filter-metric", "options"),
            Output("atlas-sort", "options"),
            Output("atlas-filter-layers", "min"),
            Output("atlas-filter-layers", "max"),
            Output("atlas-filter-layers", "value"),
            Output("atlas-filter-layers", "marks"),
            run,
        )(self.filter_options)
        app.callback(
            Output("atlas-table", "children"),
            run,
            *(Input(f"atlas-filter-{name}", "value") for name in ("roles", "match", "metric", "low", "high")),
            Input("atlas-filter-layers", "value"),
            Input("atlas-sort", "value"),
            Input("atlas-order", "value"),
        )(self.heads_table)
        app.callback(Output("atlas-overlap", "figure"), run)(self.overlap_figure)
        app.callback(Output("atlas-correlations", "children"), run)(self.correlations)
        app.callback(Output("atlas-many", "children"), run)(self.many_roles)
        app.callback(Output("atlas-compare-runs", "options"), Output("atlas-compare-runs", "value"), run)(
            self.compare_choice
        )
        compared = Input("atlas-compare-runs", "value")
        app.callback(
            Output("atlas-compare-role", "options"),
            Output("atlas-compare-role", "value"),
            Output("atlas-compare-metric", "options"),
            Output("atlas-compare-metric", "value"),
            compared,
            State("atlas-compare-role", "value"),
            State("atlas-compare-metric", "value"),
        )(self.compare_controls)
        app.callback(Output("atlas-compare-depth", "figure"), compared, Input("atlas-compare-role", "value"))(
            self.compare_depth
        )
        app.callback(
            Output("atlas-compare-metrics", "figure"), compared, Input("atlas-compare-metric", "value")
        )(self.compare_metrics)
        app.callback(Output("atlas-compare-totals", "children"), compared)(self.compare_totals)


# ----------------------------------------------------------------------------------- helpers


def _store(run_id: str, head: PickedHead) -> SelectedHead:
    return {"run": run_id, "layer": head.layer, "head": head.head}


def _as_head(selected: Mapping[str, Any] | None, run_id: str | None) -> PickedHead | None:
    """The head in the ``atlas-head`` store, if it belongs to ``run_id``."""
    if not isinstance(selected, Mapping) or selected.get("run") != run_id:
        return None
    try:
        return PickedHead(int(selected["layer"]), int(selected["head"]))
    except (KeyError, TypeError, ValueError):
        return None


def _number(value: object) -> float | None:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def _filters(
    roles: list[dict[str, str]],
    metrics: list[dict[str, str]],
    sorts: list[dict[str, str]],
    low: int,
    high: int,
    layers: list[int],
    marks: dict[Any, str],
) -> Component:
    """The heads table's filters and sort order."""
    return ui.detail_controls(
        ui.control(
            "roles",
            dcc.Dropdown(
                id="atlas-filter-roles", options=roles, value=[], multi=True, placeholder="any head"
            ),
            "atlas-filter-roles",
            "control control-example",
        ),
        ui.radio(
            "heads with",
            "atlas-filter-match",
            [{"label": "any of them", "value": "any"}, {"label": "all of them", "value": "all"}],
            "any",
        ),
        ui.control(
            "metric",
            dcc.Dropdown(id="atlas-filter-metric", options=metrics, value=None, placeholder="no range"),
            "atlas-filter-metric",
            "control control-example",
        ),
        ui.control("from", _number_input("atlas-filter-low"), "atlas-filter-low"),
        ui.control("to", _number_input("atlas-filter-high"), "atlas-filter-high"),
        ui.control(
            "layers",
            html.Div(
                dcc.RangeSlider(
                    id="atlas-filter-layers", min=low, max=high, step=1, value=layers, marks=marks
                ),
                style={"width": "260px"},
            ),
            "atlas-filter-layers",
        ),
        ui.dropdown("sort by", "atlas-sort", "control", options=sorts, value="n_roles"),
        ui.radio(
            "order",
            "atlas-order",
            [
                {"label": "highest first", "value": "descending"},
                {"label": "lowest first", "value": "ascending"},
            ],
            "descending",
        ),
    )


def _number_input(element_id: str) -> Component:
    return dcc.Input(id=element_id, type="number", debounce=True, placeholder="any", style={"width": "7em"})


def _roles_table(card: views.HeadCard) -> Component:
    header = html.Tr([html.Th(h) for h in ("role", "rule", "held-out validation", "paper")])
    body = [
        html.Tr(
            [
                html.Td([html.B(r.label), f" ({r.analysis})"]),
                html.Td(html.Code(r.threshold)),
                html.Td(r.validated),
                html.Td(r.paper),
            ]
        )
        for r in card.roles.itertuples(index=False)
    ]
    return html.Table([html.Thead(header), html.Tbody(body)], className="data", id="atlas-head-roles")


def _head_rows(frame: Any, extra: list[str], labels: dict[str, str], where: str) -> Component:
    """A table of heads, each row's head a button that opens its card (``where``: which table)."""
    header = html.Tr(
        [html.Th("head"), html.Th("layer", className="num"), html.Th("KV head", className="num")]
        + [html.Th("depth", className="num"), html.Th("roles")]
        + [html.Th(c, className="num") for c in extra]
    )
    body = []
    for r in frame.to_dict(orient="records"):
        head = PickedHead(int(r["layer"]), int(r["head"]))
        body.append(
            html.Tr(
                [
                    html.Td(
                        html.Button(
                            str(head),
                            id={"type": ROW, "where": where, "head": str(head)},
                            n_clicks=0,
                            className="mono",
                            title=f"open the card of {head}",
                        )
                    ),
                    html.Td(str(int(r["layer"])), className="num"),
                    html.Td(str(int(r["kv_head"])), className="num"),
                    html.Td(f"{float(r['depth']):.2f}", className="num"),
                    html.Td(views.role_text(str(r["roles"]), labels)),
                ]
                + [html.Td(views.value_text(r[c]), className="num") for c in extra]
            )
        )
    return html.Table([html.Thead(header), html.Tbody(body)], className="data", id=f"atlas-{where}-rows")
