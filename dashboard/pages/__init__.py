"""Dashboard pages, one per analysis plus the start page.

To give a new analysis a page, write ``dashboard/pages/<analysis>.py`` with a :class:`Page`
subclass (``path``, ``title``, ``analysis``, ``layout``, ``register_callbacks``; ids prefixed with
the analysis name) and add the class to :data:`PAGES`. The start page then links that
analysis's runs to it.
"""

from __future__ import annotations

from dashboard.pages.base import Page, Site
from dashboard.pages.census import CensusPage
from dashboard.pages.home import HomePage
from dashboard.pages.sinks import SinksPage

PAGES: tuple[type[Page], ...] = (HomePage, CensusPage, SinksPage)

__all__ = ["PAGES", "CensusPage", "HomePage", "Page", "SinksPage", "Site"]
