"""The head atlas: every role of every head of a model in one table, joined from its runs.

See docs/atlas.md. ``build_atlas`` joins the newest runs of a model; ``run_atlas`` does it for a
loaded model (its weights and BOS policy are the reference); ``compare`` puts several atlases side
by side by relative depth.
"""

from __future__ import annotations

from analyses.atlas.build import atlas_analyses, config_hash, join, select_runs
from analyses.atlas.config import AtlasConfig
from analyses.atlas.findings import (
    correlations,
    key_metrics,
    metric_distributions,
    multi_role,
    overlap,
    role_depth,
    role_names,
    role_totals,
)
from analyses.atlas.missing import missing_analyses, run_missing
from analyses.atlas.run import ATLAS, build_atlas, compare, latest_atlas, run_atlas, summary
from analyses.registry import Analysis, register

ANALYSIS = register(
    Analysis(
        name=ATLAS,
        config_cls=AtlasConfig,
        run=run_atlas,
        summary=summary,
        help="Head atlas: every role of every head, joined from the model's newest runs (headlab atlas).",
        page="dashboard.atlas.page:AtlasPage",
        report="dashboard.atlas.report:report_sections",
        docs="docs/atlas.md",
        # joins the runs the demo has just written for the default model
        demo={},
        model_kinds=("language", "vision", "vision-language"),
        reads_run_store=True,
    )
)

__all__ = [
    "ANALYSIS",
    "ATLAS",
    "AtlasConfig",
    "atlas_analyses",
    "build_atlas",
    "compare",
    "config_hash",
    "correlations",
    "join",
    "key_metrics",
    "latest_atlas",
    "metric_distributions",
    "missing_analyses",
    "multi_role",
    "overlap",
    "role_depth",
    "role_names",
    "role_totals",
    "run_atlas",
    "run_missing",
    "select_runs",
    "summary",
]
