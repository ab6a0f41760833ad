"""Vision-aware head divergence (VHD), token VHD (T-VHD) and vision-aware head reinforcement (VHR)
on a LLaVA (He et al., ACL 2025), with CHAIR and POPE on the scene-llava testbed.

The package runs by stage: :mod:`~analyses.vhd.config` (settings), :mod:`~analyses.vhd.forward`
(the language model's own forward and ``o_proj`` hooks), :mod:`~analyses.vhd.divergence` (VHD,
T-VHD), :mod:`~analyses.vhd.reinforcement` (VHR's head choice), :mod:`~analyses.vhd.captions`
(scenes and the model's answers), :mod:`~analyses.vhd.evaluation` (tables),
:mod:`~analyses.vhd.sweep` (the alpha × layers sweep), :mod:`~analyses.vhd.heldout` (held-out
validation of VHR's heads) and :mod:`~analyses.vhd.run` (``run_vhd``, ``run_vhr``). Importing it
registers ``vhd`` and ``vhr``.

See docs/analyses/vhd.md.
"""

from __future__ import annotations

from analyses.registry import Analysis, register
from analyses.roles import Role
from analyses.vhd.captions import Answers, EvalInputs, eval_inputs, generate_ids, noisy_images
from analyses.vhd.config import (
    BASELINE,
    DEFAULT_SETTINGS,
    MAIN,
    PAPER_PROMPT,
    VhdConfig,
    VhrSetting,
    parse_layers,
    sweep_settings,
)
from analyses.vhd.divergence import TOKEN_COLUMNS, step_vhd, t_vhd, token_table, tvhd_test
from analyses.vhd.evaluation import paired_deltas
from analyses.vhd.forward import Rows, embed_rows, forward_rows, make_rows, project_images, scale_heads
from analyses.vhd.heldout import discrimination, head_scales, margins_under, run_validation, vhr_heads
from analyses.vhd.reinforcement import Selection, select_heads
from analyses.vhd.run import run_vhd, run_vhr, summary
from analyses.vhd.sweep import plan as sweep_plan
from analyses.vhd.sweep import sweep_lines, sweep_table

VHD = register(
    Analysis(
        name="vhd",
        config_cls=VhdConfig,
        run=run_vhd,
        summary=summary,
        help=(
            "Vision-aware head divergence on a LLaVA (default scene-llava): VHD per head and step, "
            "T-VHD of hallucinated vs correct words, CHAIR, POPE."
        ),
        default_model="scene-llava",
        page="dashboard.vhd.page:VhdPage",
        report="dashboard.vhd.report:report_sections",
        docs="docs/analyses/vhd.md",
        opt_outs={"demo": "the vhr run computes VHD first and saves the same tables"},
        atlas_metrics=("vhd_mean",),
        roles=(
            Role(
                "vhd_sensitive",
                "vision-aware head (top 10% VHD)",
                "vhd_mean",
                "top_share",
                0.1,
                "He et al. 2025, Cracking the code of hallucination in LVLMs with vision-aware head divergence",
            ),
        ),
        model_kinds=("vision-language",),
    )
)
VHR = register(
    Analysis(
        name="vhr",
        config_cls=VhdConfig,
        run=run_vhr,
        summary=summary,
        help=(
            "Vision-aware head reinforcement: CHAIR and POPE before and after VHR, with ablations "
            "(alpha, layers, outliers), a random-heads control, an alpha x layers sweep and a held-out "
            "validation of the reinforced heads against random head sets."
        ),
        default_model="scene-llava",
        page="dashboard.vhd.page:VhdPage",
        report="dashboard.vhd.report:report_sections",
        docs="docs/analyses/vhd.md",
        atlas_metrics=("vhd_mean", "selected_share"),
        roles=(
            Role(
                "vhr_reinforced",
                "reinforced by VHR (most inputs)",
                "selected_share",
                "at_least",
                0.5,
                "He et al. 2025, Cracking the code of hallucination in LVLMs with vision-aware head divergence",
                evidence="vhr_validated",
            ),
        ),
        model_kinds=("vision-language",),
        # a few noisy held-out scenes and the main VHR setting only; no sweep, no validation
        demo={
            "n_scenes": 8,
            "max_new_tokens": 32,
            "ablations": False,
            "pope_kinds": ("adversarial",),
            "pope_per_scene": 1,
            "n_stats": 2000,
            "batch_size": 8,
            "sweep": "off",
            "validation": False,
        },
    )
)

__all__ = [
    "BASELINE",
    "DEFAULT_SETTINGS",
    "MAIN",
    "PAPER_PROMPT",
    "TOKEN_COLUMNS",
    "VHD",
    "VHR",
    "Answers",
    "EvalInputs",
    "Rows",
    "Selection",
    "VhdConfig",
    "VhrSetting",
    "discrimination",
    "embed_rows",
    "eval_inputs",
    "forward_rows",
    "generate_ids",
    "head_scales",
    "make_rows",
    "margins_under",
    "noisy_images",
    "paired_deltas",
    "parse_layers",
    "project_images",
    "run_validation",
    "run_vhd",
    "run_vhr",
    "scale_heads",
    "select_heads",
    "step_vhd",
    "summary",
    "sweep_lines",
    "sweep_plan",
    "sweep_settings",
    "sweep_table",
    "t_vhd",
    "token_table",
    "tvhd_test",
    "vhr_heads",
]
