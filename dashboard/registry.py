"""The dashboard's pages and the reports' sections, read from the analyses' registrations.

Each registered analysis names its page class and its report-section builder as
``"module:attribute"`` (see :mod:`analyses.registry`); this module imports them. An analysis that
opted out of a report gets the generic heads section.
"""

from __future__ import annotations

import importlib
from typing import Any

from analyses.registry import ANALYSES, canonical
from analyses.runstore import Run
from dashboard.core import generic
from dashboard.core.home import HomePage
from dashboard.core.page import Page
from dashboard.core.section import ReportSection, SectionBuilder


def resolve(reference: str) -> Any:
    """The object a ``"module:attribute"`` reference names (ImportError/AttributeError if none)."""
    module, _, attribute = reference.partition(":")
    if not attribute:
        raise ValueError(f"{reference!r} is not a 'module:attribute' reference")
    return getattr(importlib.import_module(module), attribute)


def analysis_pages() -> tuple[type[Page], ...]:
    """Every registered analysis's page class, once each, in registration order."""
    pages: list[type[Page]] = []
    for entry in ANALYSES.values():
        if entry.page is not None:
            page = resolve(entry.page)
            if page not in pages:
                pages.append(page)
    return tuple(pages)


def pages() -> tuple[type[Page], ...]:
    """The start page, then one page per analysis (several analyses may share one)."""
    return (HomePage, *analysis_pages())


def section_builder(analysis: str) -> SectionBuilder:
    """The report-section builder of ``analysis`` (the generic heads section when it has none)."""
    name = canonical(analysis)
    entry = ANALYSES.get(name)
    if entry is None or entry.report is None:
        return generic.report_sections
    builder: SectionBuilder = resolve(entry.report)
    return builder


def sections_for(run: Run) -> list[ReportSection]:
    """The report sections of ``run``'s analysis."""
    return section_builder(run.analysis)(run)


__all__ = ["analysis_pages", "pages", "resolve", "section_builder", "sections_for"]
