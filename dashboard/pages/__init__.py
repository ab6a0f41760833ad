"""The dashboard's pages, built from the analyses' registrations (see :mod:`dashboard.registry`)."""

from __future__ import annotations

from typing import Any

from dashboard.core.home import HomePage
from dashboard.core.page import Page, Site
from dashboard.registry import pages

PAGES: tuple[type[Page], ...] = pages()
_BY_NAME = {page.__name__: page for page in PAGES}


def __getattr__(name: str) -> Any:
    """A page class by its name (``from dashboard.pages import SinksPage``)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PAGES", "HomePage", "Page", "Site"]
