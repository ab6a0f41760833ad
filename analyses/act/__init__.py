"""ACT: calibrate the hidden attention sinks of chosen heads and measure what it does to accuracy.

Yu et al. (ICML 2024). A key whose column importance ``alpha_k`` exceeds a threshold is a sink; the
first sink is kept and each query row keeps ``beta`` of its attention on the later (hidden) ones,
the rest going to the other keys in proportion. Heads are calibrated one at a time on a calibration
split of zero-shot choice tasks (:mod:`analyses.tasks.choice`) and kept by ``keep``: by default when
they raise the label's margin significantly (Benjamini-Hochberg over the heads), with the paper's
rule (accuracy does not drop) as ``keep="not_lower"``. The kept heads are then calibrated together
and scored on a held-out split, before and after, with bootstrap intervals, and tested there against
random sets of as many heads from outside them (the ``validation`` table).

>>> result = run_act(model, ActConfig(tasks=("sentiment", "topic"), filter="pooled", n_calibration=60))
>>> result.tables["tasks"][["task", "acc_before", "acc_after", "delta_low", "delta_high"]]

See docs/analyses/act.md.
"""

from __future__ import annotations

from analyses.act.calibration import (
    FIRST_SINKS,
    THRESHOLDS,
    Calibration,
    FirstSink,
    Threshold,
    calibrate_heads,
    calibrate_pattern,
    column_importance,
    detect_sinks,
    sink_threshold,
)
from analyses.act.config import (
    ALL_HEADS,
    ALL_TASKS,
    FILTERS,
    KEEP_RULES,
    POOLED,
    ActConfig,
    FilterMode,
    resolve_layers,
)
from analyses.act.heldout import (
    MEASURES,
    keep_heads,
)
from analyses.act.run import (
    FILTER_COLUMNS,
    HEADS_COLUMNS,
    ITEMS_COLUMNS,
    TASKS_COLUMNS,
    VALIDATION_COLUMNS,
    run_act,
)
from analyses.act.scoring import (
    ChoiceScorer,
    margins,
    paired_difference,
    search_heads,
)
from analyses.act.statistics import (
    SINK_TOKENS_COLUMNS,
)
from analyses.act.summary import (
    summary,
)
from analyses.act.tasks import (
    load_tasks,
)
from analyses.registry import Analysis, register
from analyses.roles import Role

__all__ = [
    "ALL_HEADS",
    "ALL_TASKS",
    "FILTERS",
    "FILTER_COLUMNS",
    "FIRST_SINKS",
    "HEADS_COLUMNS",
    "ITEMS_COLUMNS",
    "KEEP_RULES",
    "MEASURES",
    "POOLED",
    "SINK_TOKENS_COLUMNS",
    "TASKS_COLUMNS",
    "THRESHOLDS",
    "VALIDATION_COLUMNS",
    "ActConfig",
    "Calibration",
    "ChoiceScorer",
    "FilterMode",
    "FirstSink",
    "Threshold",
    "calibrate_heads",
    "calibrate_pattern",
    "column_importance",
    "detect_sinks",
    "keep_heads",
    "load_tasks",
    "margins",
    "paired_difference",
    "resolve_layers",
    "run_act",
    "search_heads",
    "sink_threshold",
    "summary",
]

ANALYSIS = register(
    Analysis(
        name="act",
        config_cls=ActConfig,
        run=run_act,
        summary=summary,
        help="ACT: calibrate hidden attention sinks head by head; held-out accuracy before and after.",
        page="dashboard.act.page:ActPage",
        report="dashboard.act.report:report_sections",
        docs="docs/analyses/act.md",
        atlas_metrics=("mean_delta", "hidden_sinks"),
        roles=(
            Role(
                "act_calibrated",
                "calibrated by ACT",
                "act_role",
                "label",
                "kept:*",
                "Yu et al. 2024, Unveiling and harnessing hidden attention sinks (ACT)",
                evidence="act_validated",
            ),
        ),
        # ACT is a search over heads (one forward pass per head and calibration batch): a small config
        # keeps the demo to a few minutes on a CPU
        demo={
            "tasks": ("sentiment", "topic"),
            "n_calibration": 16,
            "n_heldout": 32,
            "layer_start": 2,
            "layer_end": 5,
        },
    )
)
