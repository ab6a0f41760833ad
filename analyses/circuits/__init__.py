"""IOI and Colored Objects circuits: activation and path patching, head classes, faithfulness,
circuit reuse and the inhibition intervention, on any language model probe loads.

The package runs in stages, each module importing only those before it: :mod:`.config` (settings,
stages, classes) <- :mod:`.data` (prompt sets) <- :mod:`.forward` (runner, caches, signatures) <-
:mod:`.patching` <- :mod:`.classes` (staged discovery) <- :mod:`.faithfulness` <- :mod:`.reuse` <-
:mod:`.run`. This module re-exports their public names and registers ``ioi``, ``colored-objects``
and ``circuit-reuse``. See docs/analyses/circuits.md.
"""

from __future__ import annotations

from analyses.circuits.classes import (
    Discovery,
    circuit_edges,
    classify,
    discover,
    screened_senders,
    stand_ins,
)
from analyses.circuits.config import (
    CLASSES,
    ROLES,
    SIGNATURES,
    STAGE_CLASSES,
    STAGE_RECEIVERS,
    STAGES,
    TASK_LABELS,
    CircuitConfig,
    HeadClass,
    ReceiverInput,
    Stage,
    TaskName,
)
from analyses.circuits.data import TASK_BUILDERS, PromptSet, TaskData, colored_objects_task, ioi_task
from analyses.circuits.faithfulness import mean_ablated_logit_diff, random_head_sets, template_means
from analyses.circuits.forward import (
    EndReadout,
    GroupCache,
    Runner,
    SignatureSums,
    attention_signatures,
    cache_group,
)
from analyses.circuits.patching import (
    Receivers,
    activation_patching,
    attribution_patching,
    clean_corrupt_gap,
    path_patching,
    path_patching_raw,
    path_patching_reference,
)
from analyses.circuits.reuse import (
    intervene,
    intervention_heads,
    overlap_curve,
    rank_correlations,
    top_heads,
    wrong_options_edit,
)
from analyses.circuits.run import (
    HEADS_METRICS,
    SCORE_COLUMNS,
    TaskAnalysis,
    analyse_task,
    bootstrap_mean,
    prepare,
    run_circuit_reuse,
    run_colored_objects,
    run_ioi,
    summary,
    task_tables,
)
from analyses.registry import Analysis, register
from analyses.roles import Role

__all__ = [
    "CLASSES",
    "HEADS_METRICS",
    "ROLES",
    "SCORE_COLUMNS",
    "SIGNATURES",
    "STAGES",
    "STAGE_CLASSES",
    "STAGE_RECEIVERS",
    "TASK_BUILDERS",
    "TASK_LABELS",
    "CircuitConfig",
    "Discovery",
    "EndReadout",
    "GroupCache",
    "HeadClass",
    "PromptSet",
    "ReceiverInput",
    "Receivers",
    "Runner",
    "SignatureSums",
    "Stage",
    "TaskAnalysis",
    "TaskData",
    "TaskName",
    "activation_patching",
    "analyse_task",
    "attention_signatures",
    "attribution_patching",
    "bootstrap_mean",
    "cache_group",
    "circuit_edges",
    "classify",
    "clean_corrupt_gap",
    "colored_objects_task",
    "discover",
    "intervene",
    "intervention_heads",
    "ioi_task",
    "mean_ablated_logit_diff",
    "overlap_curve",
    "path_patching",
    "path_patching_raw",
    "path_patching_reference",
    "prepare",
    "random_head_sets",
    "rank_correlations",
    "run_circuit_reuse",
    "run_colored_objects",
    "run_ioi",
    "screened_senders",
    "stand_ins",
    "summary",
    "task_tables",
    "template_means",
    "top_heads",
    "wrong_options_edit",
]


_IOI_PAPER = "Wang et al. 2023, Interpretability in the wild (IOI)"
_CO_PAPER = "Merullo et al. 2024, Circuit component reuse across tasks"
_CLASS_LABELS = {
    "name_mover": "name mover",
    "negative_mover": "negative name mover",
    "backup_mover": "backup name mover",
    "s_inhibition": "S-inhibition head",
    "induction": "induction head",
    "duplicate_token": "duplicate-token head",
    "previous_token": "previous-token head",
}


def _class_roles(prefix: str, task: str, paper: str) -> tuple[Role, ...]:
    """One role per head class of a task's path patching: the class label in ``<prefix>_class``,
    the held-out verdict in ``<prefix>_validated``."""
    return tuple(
        Role(
            f"{prefix}_{c}",
            f"{task} {label}",
            f"{prefix}_class",
            "label",
            c,
            paper,
            evidence=f"{prefix}_validated",
        )
        for c, label in _CLASS_LABELS.items()
    )


# the demo's path patching, also the fast preset of Colored Objects in the atlas's --run-missing
_IOI_DEMO = {
    "n_items": 8,
    "max_senders": 12,
    "n_random": 5,
    "batch_size": 64,
    "n_heldout": 12,
    "n_reference": 24,
}


ANALYSIS = register(
    Analysis(
        name="ioi",
        config_cls=CircuitConfig,
        run=run_ioi,
        summary=summary,
        help="IOI circuit: logit difference, activation and path patching, head classes, faithfulness.",
        atlas_metrics=("ioi_attribution", "ioi_activation"),
        roles=_class_roles("ioi", "IOI", _IOI_PAPER),
        page="dashboard.circuits.page:CircuitsPage",
        report="dashboard.circuits.report:report_sections",
        docs="docs/analyses/circuits.md",
        # every path-patching stage costs two forward passes per sender and prompt: on a CPU the demo
        # screens the senders (the 12 strongest by attribution patching) on 8 prompts, and tests the
        # classes on 12 held-out prompts
        demo=_IOI_DEMO,
    )
)
COLORED_OBJECTS = register(
    Analysis(
        name="colored-objects",
        config_cls=CircuitConfig,
        run=run_colored_objects,
        summary=summary,
        help="Colored Objects: the same staged path patching on one-shot colour questions.",
        atlas_metrics=("co_attribution", "co_activation"),
        roles=_class_roles("co", "Colored Objects", _CO_PAPER),
        aliases=("colored_objects",),
        page="dashboard.circuits.page:CircuitsPage",
        report="dashboard.circuits.report:report_sections",
        docs="docs/analyses/circuits.md",
        opt_outs={"demo": "a second path-patching circuit; circuit-reuse runs it with IOI when asked"},
        atlas_preset=_IOI_DEMO,
    )
)
CIRCUIT_REUSE = register(
    Analysis(
        name="circuit-reuse",
        config_cls=CircuitConfig,
        run=run_circuit_reuse,
        summary=summary,
        help="IOI vs Colored Objects: stage overlap over top-p%, rank correlation, inhibition intervention.",
        aliases=("circuit_reuse",),
        page="dashboard.circuits.page:CircuitsPage",
        report="dashboard.circuits.report:report_sections",
        docs="docs/analyses/circuits.md",
        opt_outs={"demo": "runs both circuits (twice the IOI demo's time); run it on its own"},
    )
)
