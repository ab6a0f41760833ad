"""Report sections, one builder per analysis.

A builder takes an opened run and returns its sections (:class:`ReportSection`: anchor, title,
HTML body). To give a new analysis (sinks, retrieval, circuits, ViT...) its report, write
``dashboard/sections/<analysis>.py`` with ``report_sections(run) -> list[ReportSection]`` and add
it to :data:`REPORT_SECTIONS`. Analyses without a builder get :mod:`dashboard.core.generic`
(their ``heads`` table as heat maps).
"""

from __future__ import annotations

from analyses.runstore import Run
from dashboard.core import generic
from dashboard.core.section import ReportSection, SectionBuilder
from dashboard.sections import act, census, circuits, retrieval, sinks, vhd, vit

REPORT_SECTIONS: dict[str, SectionBuilder] = {
    "census": census.report_sections,
    "sinks": sinks.report_sections,
    "act": act.report_sections,
    "retrieval": retrieval.report_sections,
    "ioi": circuits.report_sections,
    "colored-objects": circuits.report_sections,
    "circuit-reuse": circuits.report_sections,
    "vit-heads": vit.report_sections,
    "vhd": vhd.report_sections,
    "vhr": vhd.report_sections,
}


def sections_for(run: Run) -> list[ReportSection]:
    """The sections of ``run``'s analysis (the generic heads section when none is registered)."""
    return REPORT_SECTIONS.get(run.analysis, generic.report_sections)(run)


__all__ = ["REPORT_SECTIONS", "ReportSection", "SectionBuilder", "sections_for"]
