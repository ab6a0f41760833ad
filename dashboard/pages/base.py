"""What a dashboard page is: a path, a title, a layout built per visit, and its callbacks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from dash import Dash
from dash.development.base_component import Component

from dashboard.catalog import RunCatalog


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

    @property
    def catalog(self) -> RunCatalog:
        return self.site.catalog

    @abstractmethod
    def layout(self, params: Mapping[str, str]) -> Component: ...

    def register_callbacks(self, app: Dash) -> None:  # noqa: B027  (pages without callbacks are fine)
        """Register this page's callbacks on ``app`` (none by default)."""
