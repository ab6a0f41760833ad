"""The start page: what the dashboard is, and every run under its root with its status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from dash import dcc, html
from dash.development.base_component import Component

from dashboard.core.page import Page


class HomePage(Page):
    path: ClassVar[str] = "/"
    title: ClassVar[str] = "Runs"

    def layout(self, params: Mapping[str, str]) -> Component:
        entries = self.catalog.entries()
        rows = []
        for e in entries:
            link = self.site.link_for(e.analysis, e.run_id) if e.ok else None
            name: Component | str = dcc.Link(e.run_id, href=link) if link else e.run_id
            rows.append(
                html.Tr(
                    [
                        html.Td(name, className="mono"),
                        html.Td(e.analysis or "?"),
                        html.Td(e.model or "?"),
                        html.Td(e.created_label),
                        html.Td("" if e.n_heads is None else str(e.n_heads), className="num"),
                        html.Td(e.status, className="status"),
                    ],
                    className="" if e.ok else "damaged",
                )
            )
        header = html.Tr(
            [html.Th(h) for h in ("run", "analysis", "model", "created", "heads")] + [html.Th("status")]
        )
        if entries:
            table: Component = html.Table(
                [html.Thead(header), html.Tbody(rows)], className="data", id="runs-table"
            )
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
                        "analysis or remove them. Static reports: ",
                        html.Code("headlab report <run id>"),
                        ".",
                    ]
                ),
                table,
            ],
            className="page",
        )
