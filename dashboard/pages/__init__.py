"""Dashboard pages, one per analysis plus the start page.

To give a new analysis a page, write ``dashboard/pages/<analysis>.py`` with a
:class:`~dashboard.core.page.AnalysisPage` subclass (``path``, ``title``, ``analysis``, ``layout``,
``register_callbacks``; ids prefixed with the analysis name or ``element_prefix``; the run picker, the choice of run and
its notes, opening the run and the layout pieces come from :mod:`dashboard.core.page`) and add the
class to :data:`PAGES`. The start page then links that
analysis's runs to it. A page that shows the runs of several analyses subclasses
:class:`~dashboard.core.page.MultiAnalysisPage` and lists them in ``analyses`` (the circuits page:
``ioi``, ``colored-objects`` and ``circuit-reuse``). A page whose figures need some tables names
them in ``required_tables``: a run without them is refused with a message naming the missing ones.
"""

from __future__ import annotations

from dashboard.core.home import HomePage
from dashboard.core.page import Page, Site
from dashboard.pages.act import ActPage
from dashboard.pages.census import CensusPage
from dashboard.pages.circuits import CircuitsPage
from dashboard.pages.retrieval import RetrievalPage
from dashboard.pages.sinks import SinksPage
from dashboard.pages.vhd import VhdPage
from dashboard.pages.vit import VitPage
from dashboard.registry import pages

PAGES: tuple[type[Page], ...] = pages()

__all__ = [
    "PAGES",
    "ActPage",
    "CensusPage",
    "CircuitsPage",
    "HomePage",
    "Page",
    "RetrievalPage",
    "SinksPage",
    "Site",
    "VhdPage",
    "VitPage",
]
