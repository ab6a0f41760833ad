"""Report sections, one builder per analysis.

A builder takes an opened run and returns its sections (:class:`ReportSection`: anchor, title,
HTML body). To give a new analysis (sinks, retrieval, circuits, ViT...) its report, write
``dashboard/sections/<analysis>.py`` with ``report_sections(run) -> list[ReportSection]`` and add
it to :data:`REPORT_SECTIONS`. Analyses without a builder get :mod:`dashboard.core.generic`
(their ``heads`` table as heat maps).
"""

from __future__ import annotations

from analyses.registry import ANALYSES
from dashboard.core.section import ReportSection, SectionBuilder
from dashboard.registry import section_builder, sections_for

REPORT_SECTIONS: dict[str, SectionBuilder] = {name: section_builder(name) for name in ANALYSES}


__all__ = ["REPORT_SECTIONS", "ReportSection", "SectionBuilder", "sections_for"]
