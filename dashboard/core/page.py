"""What a dashboard page is: a path, a title, a layout built per visit, and its callbacks.

:class:`AnalysisPage` is a page that shows the runs of one analysis: it lists them for the run
picker (damaged ones disabled), picks the run the URL asks for and says why when it cannot, opens
the chosen run (checking that it has the tables the page draws), and draws a figure of it or a
message saying why there is none; :class:`MultiAnalysisPage` is one that shows the runs of several
analyses (the circuits and VHD pages). The helpers
:func:`control`, :func:`radio`, :func:`dropdown`, :func:`graph`, :func:`panel`, :func:`columns`…,
:func:`empty_figure` and :func:`why` are what those pages' layouts and callbacks share.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import plotly.graph_objects as go
from dash import Dash, dcc, html
from dash.development.base_component import Component

from analyses.runstore import Run
from dashboard.catalog import RunCatalog, RunEntry
from dashboard.core import figures
from dashboard.core import focus as head_focus
from probe.errors import HeadlabError, RunStoreError

GRAPH_CONFIG: dcc.Graph.Config = {
    "displaylogo": False,
    "responsive": True,
    "modeBarButtonsToRemove": figures.MODEBAR_REMOVE,
}
RUN_ERRORS: tuple[type[Exception], ...] = (HeadlabError, KeyError, ValueError)
MAP_PANEL = "col-map panel"
DETAIL_PANEL = "col-detail panel"


@dataclass(frozen=True)
class Site:
    """What every page may use: the runs, and which page shows which analysis."""

    catalog: RunCatalog
    analysis_paths: Mapping[str, str] = field(default_factory=dict)

    def link_for(self, analysis: str | None, run_id: str) -> str | None:
        """The URL of the page showing ``run_id`` of ``analysis`` (None: no page for it)."""
        path = self.analysis_paths.get(analysis or "")
        return f"{path}?run={run_id}" if path else None


class Page(ABC):
    """One page of the dashboard.

    ``layout(params)`` is called on every visit with the URL's query parameters (so the run list is
    current); ``register_callbacks(app)`` once, when the app is built. Element ids must be unique
    across pages: prefix them with the page's name (``census-run``).
    """

    path: ClassVar[str]
    title: ClassVar[str]
    analysis: ClassVar[str | None] = None  # the analysis whose runs this page shows, if any

    def __init__(self, site: Site) -> None:
        self.site = site

    @classmethod
    def shown_analyses(cls) -> tuple[str, ...]:
        """The analyses whose runs this page shows (the start page links their runs to it)."""
        return (cls.analysis,) if cls.analysis else ()

    @property
    def catalog(self) -> RunCatalog:
        return self.site.catalog

    @abstractmethod
    def layout(self, params: Mapping[str, str]) -> Component: ...

    def register_callbacks(self, app: Dash) -> None:  # noqa: B027  (pages without callbacks are fine)
        """Register this page's callbacks on ``app`` (none by default)."""


def empty_figure(message: str) -> go.Figure:
    """An empty figure saying why there is nothing to show."""
    return figures.message_figure(message)


def why(err: BaseException) -> str:
    """An error's message (a KeyError's without the quotes ``str`` adds)."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def control(label: str, element: Component, element_id: str, css: str = "control") -> Component:
    """A labelled control: ``element`` under a label for ``element_id``."""
    return html.Div([html.Label(label, htmlFor=element_id), element], className=css)


def graph(element_id: str) -> Component:
    """A graph that says "loading…" until its callback draws it."""
    return dcc.Graph(id=element_id, config=GRAPH_CONFIG, figure=empty_figure("loading…"))


def radio(label: str, element_id: str, options: list[dict[str, Any]], value: Any) -> Component:
    """A labelled row of radio buttons."""
    return control(
        label,
        dcc.RadioItems(id=element_id, options=options, value=value, inline=True, className="radio-inline"),
        element_id,
    )


def dropdown(label: str, element_id: str, css: str = "control control-example", **props: Any) -> Component:
    """A labelled dropdown that cannot be cleared (``props``: options, value…)."""
    return control(label, dcc.Dropdown(id=element_id, clearable=False, **props), element_id, css)


def controls(*elements: Component) -> Component:
    """The row of controls under a page's title."""
    return html.Div(list(elements), className="controls")


def detail_controls(*elements: Component) -> Component:
    """A row of controls inside a panel, above what they steer."""
    return html.Div(list(elements), className="detail-controls")


def panel(*children: Component, css: str = MAP_PANEL) -> Component:
    """One column of a :func:`columns` row (``MAP_PANEL``: the wide one, ``DETAIL_PANEL``: the other)."""
    return html.Div(list(children), className=css)


def columns(*panels: Component) -> Component:
    """Panels side by side."""
    return html.Div(list(panels), className="columns")


@dataclass(frozen=True)
class RunChoice:
    """The run picker's options, the run shown (None: none offered) and notes on the choice."""

    options: list[dict[str, Any]]
    run_id: str | None
    notes: list[Component | str]


class AnalysisPage(Page):
    """A page showing one run of :attr:`analysis`, picked with the ``<prefix>-run`` dropdown."""

    analysis: ClassVar[str]
    run_noun: ClassVar[str] = ""  # how the page names the analysis's runs ("ACT"); "": the analysis
    element_prefix: ClassVar[str] = ""  # the prefix of the page's element ids ("vit"); "": the analysis
    # The tables a run must have for the page to draw it (none: every intact run is drawn), and how
    # the error naming the missing ones calls them ("circuit"; "": the analysis).
    required_tables: ClassVar[frozenset[str]] = frozenset()
    tables_noun: ClassVar[str] = ""

    @property
    def noun(self) -> str:
        return self.run_noun or self.analysis

    @property
    def prefix(self) -> str:
        return self.element_prefix or self.analysis

    @property
    def run_id_element(self) -> str:
        return f"{self.prefix}-run"

    # ------------------------------------------------------------------------------------ layout

    def run_entries(self) -> list[RunEntry]:
        """The catalog's entries of the runs this page offers (newest first)."""
        return self.catalog.entries(self.analysis)

    def run_label(self, entry: RunEntry) -> str:
        """How the run picker lists an intact run."""
        return entry.label

    def run_options(self) -> list[dict[str, Any]]:
        """Intact runs of the analysis (newest first), then damaged ones, listed but disabled."""
        entries = self.run_entries()
        ok = [{"label": self.run_label(e), "value": e.run_id} for e in entries if e.ok]
        damaged = [
            {"label": f"⚠ {e.run_id} ({e.status})"[:160], "value": e.run_id, "disabled": True}
            for e in entries
            if not e.ok
        ]
        return ok + damaged

    def choose_run(self, params: Mapping[str, str]) -> RunChoice:
        """The run the URL's ``run`` asks for if it is offered, else the newest, with notes saying
        when there is none, when the wanted one is not offered, and how many are damaged."""
        options = self.run_options()
        offered = [o["value"] for o in options if not o.get("disabled")]
        wanted = params.get("run")
        run_id = wanted if wanted in offered else (offered[0] if offered else None)
        root = self.catalog.root
        notes: list[Component | str] = []
        if not offered:
            notes.append(
                html.P(
                    [
                        f"No intact {self.noun} run under {root}. Make one with ",
                        html.Code(f"headlab run {self.analysis} --root {root}"),
                        ".",
                    ],
                    className="error",
                )
            )
        elif wanted and wanted != run_id:
            notes.append(
                html.P(
                    f"Run {wanted!r} is not an intact {self.noun} run under the root; showing the newest.",
                    className="error",
                )
            )
        if len(options) > len(offered):
            notes.append(
                html.P(
                    f"{len(options) - len(offered)} damaged {self.noun} run(s) listed but not offered; "
                    "see the Runs page.",
                    className="hint",
                )
            )
        versions = self.catalog.version_note(run_id) if run_id else ""
        if versions:
            notes.append(html.P(versions, className="hint"))
        return RunChoice(options, run_id, notes)

    def focus(self, params: Mapping[str, str], run_id: str | None) -> head_focus.Focus:
        """The head the URL's ``head`` parameter focuses, checked against run ``run_id``'s heads
        (not checked when there is no run or its heads cannot be read)."""
        heads = None
        if run_id:
            try:
                heads = self._run(run_id).heads
            except RUN_ERRORS:
                heads = None
        return head_focus.read(params, heads)

    def focus_elements(self, focus: head_focus.Focus) -> list[Component]:
        """The focus banner ``<prefix>-focus`` and store ``<prefix>-focus-head`` (see :mod:`dashboard.core.focus`)."""
        return head_focus.elements(focus, self.prefix)

    def run_picker(self, choice: RunChoice) -> Component:
        """The labelled ``<analysis>-run`` dropdown."""
        return dropdown(
            "run",
            self.run_id_element,
            "control control-run",
            options=choice.options,
            value=choice.run_id,
            placeholder=f"no {self.noun} runs",
        )

    def run_header(
        self, choice: RunChoice, *extra: Component, findings: bool = True
    ) -> list[Component | str]:
        """The top of the page under its title and introduction: the run picker (and ``extra``
        controls), the run's settings (``<prefix>-settings``), the notes on the choice of run and,
        with ``findings``, the open panel of what the run's numbers say (``<prefix>-findings``)."""
        parts: list[Component | str] = [
            controls(self.run_picker(choice), *extra),
            html.P(id=f"{self.prefix}-settings", className="hint"),
            *choice.notes,
        ]
        if findings:
            parts.append(
                html.Details(
                    [html.Summary("What this run's numbers say"), html.Div(id=f"{self.prefix}-findings")],
                    open=True,
                    className="panel",
                )
            )
        return parts

    # --------------------------------------------------------------------------------- callbacks

    def _run(self, run_id: str) -> Run:
        """Open run ``run_id`` of the analysis (HeadlabError when it is missing or damaged)."""
        return self.catalog.open(run_id, analysis=self.analysis)

    def _complete(self, run: Run) -> bool:
        """Whether ``run`` has what the page draws: every one of :attr:`required_tables`."""
        return self.required_tables.issubset(run.table_names)

    def _checked(self, run_id: str) -> Run:
        """The run the figures draw: :meth:`_run`, refused (KeyError naming the missing tables and
        how to get them) when it is not :meth:`_complete`."""
        run = self._run(run_id)
        if not self._complete(run):
            missing = sorted(self.required_tables - set(run.table_names))
            noun = self.tables_noun or self.analysis
            raise KeyError(
                f"run {run_id} lacks the {noun} tables {', '.join(missing)}; pick another run, or re-run "
                f"headlab run {run.analysis} to make one that has them"
            )
        return run

    def _text(self, run_id: str | None, read: Callable[[Run], str], failure: str = "") -> str:
        """``read`` of the run; "" when no run is selected, ``<failure>: <why>`` when reading fails
        (``failure`` "": "cannot read run <run_id>")."""
        if not run_id:
            return ""
        try:
            return read(self._checked(run_id))
        except RUN_ERRORS as err:
            return f"{failure or f'cannot read run {run_id}'}: {why(err)}"

    def _block(self, run_id: str | None, build: Callable[[Run], Component], failure: str = "") -> Component:
        """``build`` of the run; a hint when no run is selected, an error line ``<failure>: <why>``
        when reading fails (``failure`` "": "cannot read run <run_id>")."""
        if not run_id:
            return html.P("No run selected.", className="hint")
        try:
            return build(self._checked(run_id))
        except RUN_ERRORS as err:
            return html.P(f"{failure or f'cannot read run {run_id}'}: {why(err)}", className="error")

    def _figure(
        self,
        run_id: str | None,
        draw: Callable[[Run], go.Figure],
        uirevision: str = "",
        errors: tuple[type[Exception], ...] = RUN_ERRORS,
    ) -> go.Figure:
        """``draw`` of the run, or a message figure when no run is selected or drawing fails."""
        if not run_id:
            return empty_figure(f"no {self.noun} run selected")
        try:
            fig = draw(self._checked(run_id))
        except errors as err:
            return empty_figure(f"cannot show run {run_id}: {why(err)}")
        if uirevision:
            fig.update_layout(uirevision=uirevision)
        return figures.clear_modebar(fig)


class MultiAnalysisPage(AnalysisPage):
    """A page showing one run of any of :attr:`analyses`; :attr:`analysis` is the one whose
    ``headlab run`` command the page suggests when there is no run."""

    analyses: ClassVar[tuple[str, ...]]

    @classmethod
    def shown_analyses(cls) -> tuple[str, ...]:
        return cls.analyses

    def run_entries(self) -> list[RunEntry]:
        """Runs of the analyses (and damaged runs whose name says one of them), newest first."""
        return [
            e
            for e in self.catalog.entries()
            if e.analysis in self.analyses
            or (e.analysis is None and any(f"-{a}-" in e.run_id for a in self.analyses))
        ]

    def run_label(self, entry: RunEntry) -> str:
        return f"[{entry.analysis}] {entry.label}"

    def _run(self, run_id: str) -> Run:
        """Open run ``run_id`` (RunStoreError when it is of another analysis, HeadlabError when it is
        missing or damaged)."""
        run = self.catalog.open(run_id)
        if run.analysis not in self.analyses:
            raise RunStoreError(
                f"run {run_id} is a {run.analysis} run, not one of {', '.join(self.analyses)}; pick another"
            )
        return run
