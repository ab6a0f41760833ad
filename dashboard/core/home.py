"""The start page: what the dashboard is, the sweeps under its root, and every run with its status.

``?sweep=NAME`` keeps the runs of one sweep (in task order) and lists that sweep's tasks;
``?sweep=(none)`` keeps the runs made outside any sweep (see :mod:`dashboard.core.sweep_listing`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from dash import dcc, html
from dash.development.base_component import Component

from dashboard.catalog import RunEntry
from dashboard.core import sweep_listing
from dashboard.core.page import Page
from dashboard.sweeps import NO_SWEEP


class HomePage(Page):
    path: ClassVar[str] = "/"
    title: ClassVar[str] = "Runs"

    def runs_table(self, entries: Sequence[RunEntry], with_sweeps: bool) -> Component:
        """The run listing (``with_sweeps``: with the column naming each run's sweep and seed)."""
        rows = []
        for e in entries:
            link = self.site.link_for(e.analysis, e.run_id) if e.ok else None
            name: Component | str = dcc.Link(e.run_id, href=link) if link else e.run_id
            sweep = [html.Td("" if e.sweep is None else e.sweep.label)] if with_sweeps else []
            rows.append(
                html.Tr(
                    [
                        html.Td(name, className="mono"),
                        html.Td(e.analysis or "?"),
                        html.Td(e.model or "?"),
                        *sweep,
                        html.Td(e.created_label),
                        html.Td("" if e.n_heads is None else str(e.n_heads), className="num"),
                        html.Td(e.status, className="status"),
                    ],
                    className="" if e.ok else "damaged",
                )
            )
        names = [
            "run",
            "analysis",
            "model",
            *(["sweep"] if with_sweeps else []),
            "created",
            "heads",
            "status",
        ]
        header = html.Tr([html.Th(h) for h in names])
        return html.Table([html.Thead(header), html.Tbody(rows)], className="data", id="runs-table")

    def sweep_parts(
        self, entries: Sequence[RunEntry], wanted: str | None
    ) -> tuple[list[Component], list[RunEntry], bool]:
        """The sweeps overview (and the chosen sweep's tasks), the entries the filter keeps, and
        whether any sweep is known (then the listing shows the sweep column and the filter)."""
        overviews = self.catalog.sweeps()
        names = sweep_listing.known_sweeps(entries, overviews)
        if not names:
            return [], list(entries), False
        current = wanted if wanted == NO_SWEEP or wanted in names else None
        parts: list[Component] = []
        if overviews:
            parts += [html.H3("Sweeps"), sweep_listing.overview_table(overviews, current)]
        chosen = next((o for o in overviews if o.name == current and o.ok), None)
        if chosen is not None:
            parts += [
                html.H3(f"Tasks of sweep {chosen.name}"),
                sweep_listing.tasks_table(chosen, entries, self.site),
            ]
        if wanted is not None and current is None:
            parts.append(
                html.P(f"No sweep {wanted[:80]!r} under the root; showing every run.", className="error")
            )
        parts.append(sweep_listing.filter_links(entries, names, current))
        return parts, sweep_listing.select(entries, current), True

    def layout(self, params: Mapping[str, str]) -> Component:
        entries = self.catalog.entries()
        sweeps, shown, with_sweeps = self.sweep_parts(entries, params.get("sweep"))
        if shown:
            table: Component = self.runs_table(shown, with_sweeps)
        elif entries:
            table = html.P("No run under the root matches this filter.", id="runs-table", className="hint")
        else:
            table = html.P(
                [
                    f"No runs under {self.catalog.root}. Make one with ",
                    html.Code(f"headlab run census --root {self.catalog.root}"),
                    ".",
                ],
                id="runs-table",
            )
        pages = ", ".join(sorted(self.site.analysis_paths)) or "none"
        return html.Div(
            [
                html.H2("Runs"),
                html.P(
                    [
                        "headlab shows what attention heads do. Each run below is one analysis of one "
                        "model, read from the run store under ",
                        html.Code(str(self.catalog.root)),
                        f". Runs of analyses with a page ({pages}) link to it. Damaged runs (files "
                        "that no longer match their manifest) are listed but not opened; re-run the "
                        "analysis or remove them. Runs made by ",
                        html.Code("headlab sweep"),
                        " name their sweep and seed; pick a sweep to see its tasks and only its runs. "
                        "Static reports: ",
                        html.Code("headlab report <run id>"),
                        ".",
                    ]
                ),
                *sweeps,
                table,
            ],
            className="page",
        )
