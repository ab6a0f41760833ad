"""ViT heads: importance by pruning, attention strength and patterns, and vision sinks.

Asks three questions of every head of a vision transformer (Li et al., TVCG 2023): how important
it is (linear probes on the image embedding, scored with the head pruned), how strongly a patch
attends to the patches around it, and which attention patterns it has learned; and adds the
high-norm artifact tokens of large ViTs as the vision counterpart of :mod:`analyses.sinks`.

The stages live in submodules, each importing only the ones before it: ``config`` <- ``data`` <-
``probes`` <- ``importance``; ``attention`` <- ``patterns`` <- ``capture`` <- ``artifacts``;
``display``; ``run`` (:func:`run_vit_heads`, the steps in order) and ``summary``. This module
re-exports the public names and registers the analysis. See docs/analyses/vit-heads.md.
"""

from __future__ import annotations

from analyses.registry import Analysis, register
from analyses.roles import Role
from analyses.vit_heads.capture import artifact_mask
from analyses.vit_heads.config import (
    IMPORTANCE_METRICS,
    METRIC_LABELS,
    REGIONS,
    SMALL,
    VitHeadsConfig,
)
from analyses.vit_heads.data import ProbeSet, build_probe_set
from analyses.vit_heads.display import (
    DISPLAY_ARRAYS,
    DISPLAY_HINT,
    DisplayImage,
    DisplayPattern,
    capture_display,
    display_attention,
    display_geometry,
    display_images,
    display_pattern,
    display_query_grid,
    has_display,
    input_crops,
)
from analyses.vit_heads.evidence import concentration, head_intervals, ranking, top_share
from analyses.vit_heads.importance import (
    Effects,
    PruneCondition,
    agreement,
    head_gradients,
    head_gradients_per_image,
    pooled_per_image,
    pruned_embeddings,
    pruning_effects,
    query_masks,
)
from analyses.vit_heads.probes import LinearProbe
from analyses.vit_heads.run import run_vit_heads
from analyses.vit_heads.summary import summary

__all__ = [
    "DISPLAY_ARRAYS",
    "DISPLAY_HINT",
    "IMPORTANCE_METRICS",
    "METRIC_LABELS",
    "REGIONS",
    "SMALL",
    "DisplayImage",
    "DisplayPattern",
    "Effects",
    "LinearProbe",
    "ProbeSet",
    "PruneCondition",
    "VitHeadsConfig",
    "agreement",
    "artifact_mask",
    "build_probe_set",
    "capture_display",
    "concentration",
    "display_attention",
    "display_geometry",
    "display_images",
    "display_pattern",
    "display_query_grid",
    "has_display",
    "head_gradients",
    "head_gradients_per_image",
    "head_intervals",
    "input_crops",
    "pooled_per_image",
    "pruned_embeddings",
    "pruning_effects",
    "query_masks",
    "ranking",
    "run_vit_heads",
    "summary",
    "top_share",
]


ANALYSIS = register(
    Analysis(
        name="vit-heads",
        config_cls=VitHeadsConfig,
        run=run_vit_heads,
        summary=summary,
        help=(
            "ViT heads (vision models; default clip-vit-b16): pruning importance, attention strength, "
            "patterns, artifact tokens."
        ),
        default_model="clip-vit-b16",
        aliases=("vit_heads",),
        page="dashboard.vit_heads.page:VitPage",
        report="dashboard.vit_heads.report:report_sections",
        docs="docs/analyses/vit-heads.md",
        atlas_metrics=("accuracy_drop", "grad_importance", "mean_attention_distance", "sink_rate_natural"),
        roles=(
            Role(
                "vit_important",
                "important ViT head (pruning)",
                "vit_role",
                "label",
                "important",
                "Michel et al. 2019, Are sixteen heads really better than one?",
                evidence="vit_validated",
            ),
            Role(
                "vit_sink",
                "ViT sink head (CLS token)",
                "sink_rate_natural",
                "at_least",
                0.5,
                "Darcet et al. 2024, Vision transformers need registers",
            ),
        ),
        model_kinds=("vision",),
        # the small preset (every head pruned on 2 discovery images, validated on 2 held-out ones)
        demo={"preset": "small"},
    )
)
