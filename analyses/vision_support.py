"""The vision analyses' rows of the vision support matrix: vit-heads and VHD on each vision family.

:mod:`probe.vision_support` checks what probe computes; this module adds a column per vision
analysis: each family either passes the analysis's own check (the numbers it is built from are
right) or is refused with a one-line ConfigError by the analysis's entry point.
``tests/test_vision_architectures.py`` and ``scripts/support_table.py`` call
:func:`family_results`.

See docs/support.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from probe.model import LoadedModel
from probe.support import ATOL, KERNEL_ATOL, CheckResult, _max_diff
from probe.vision_support import CHECKS as MODEL_CHECKS
from probe.vision_support import PROMPT, ModelCheck, Reference, _pixels
from probe.vision_support import family_results as model_results

if TYPE_CHECKING:
    from analyses.vhd.forward import Rows

ANALYSIS_CHECKS: dict[str, str] = {
    "vit-heads": (
        "vit-heads accepts the model, and its pruned embeddings (analyses.vit_heads.pruned_embeddings, "
        "resuming from the intact residual stream, 2 images batched) equal probe.vision.gate_heads "
        f"pruning each image alone to {ATOL:g} and differ from the intact embedding; else its entry point "
        "refuses the model"
    ),
    "vhd": (
        "VHD of every head (analyses.vhd.divergence.step_vhd: image and text-only rows, SDPA) equals the "
        f"distance of the eager hook_z outputs to {KERNEL_ATOL:g}, and two images batched equal each alone "
        f"to {ATOL:g}; else its entry point refuses the model"
    ),
}
"""check name -> what it asserts, after :data:`probe.vision_support.CHECKS`."""

CHECKS: dict[str, str] = {**MODEL_CHECKS, **ANALYSIS_CHECKS}
"""Every column of the vision table, in order."""


@torch.no_grad()
def check_vit_heads(model: LoadedModel, ref: Reference) -> CheckResult:
    from analyses.vit_heads import PruneCondition, VitHeadsConfig, pruned_embeddings
    from analyses.vit_heads.run import require_vision_model
    from probe import vision

    require_vision_model(model, VitHeadsConfig())
    pixels = _pixels(model)
    last = model.n_layers - 1
    # a head of the last layer (its condition resumes from the stream entering that layer) and two
    # of the first layer together
    conditions = [PruneCondition((last, 1)), PruneCondition((0, 2), others=((0, 3),))]
    pruned = pruned_embeddings(model, pixels, conditions, batch_size=2, resume=True)
    intact = vision.embed(model, pixels)
    worst = 0.0
    for c, condition in enumerate(conditions):
        for i in range(pixels.shape[0]):
            with vision.gate_heads(model, condition.heads):
                alone = vision.embed(model, pixels[i : i + 1])[0]
            worst = max(worst, _max_diff(pruned[c, i], alone))
        if _max_diff(pruned[c], intact) <= ATOL:
            return CheckResult("fail", f"pruning {condition.heads} did not change the embedding")
    if worst > ATOL:
        return CheckResult("fail", f"pruned embeddings differ from gate_heads by {worst:.2g}")
    return CheckResult("pass")


def _eager_z(model: LoadedModel, rows: Rows, row: int, n_steps: int) -> torch.Tensor:
    """The eager bridge's head outputs ``[n_steps, L, H, d_head]`` of one row at its answer steps."""
    from probe.hooks import attn_hook

    assert model.bridge is not None and rows.pixels is not None
    positions = (rows.mask.cumsum(-1) - 1).clamp(min=0)
    span = slice(rows.width - 1, rows.width - 1 + n_steps)
    seen: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Callable[..., None]:
        def hook(z: torch.Tensor, hook: Any) -> None:
            seen[layer] = z[0, span].float()

        return hook

    extra: dict[str, Any] = {}
    if row < rows.n_image_rows:
        extra["pixel_values"] = rows.pixels[row : row + 1]
    model.bridge.run_with_hooks(
        rows.ids[row : row + 1],
        attention_mask=rows.mask[row : row + 1],
        position_ids=positions[row : row + 1],
        fwd_hooks=[(attn_hook(layer, "z"), keep(layer)) for layer in range(model.n_layers)],
        **extra,
    )
    return torch.stack([seen[layer] for layer in range(model.n_layers)], dim=1)


@torch.no_grad()
def check_vhd(model: LoadedModel, ref: Reference) -> CheckResult:
    from analyses.vhd.captions import require_llava
    from analyses.vhd.divergence import step_vhd
    from analyses.vhd.forward import make_rows

    require_llava(model)
    assert model.bridge is not None
    pixels = _pixels(model)
    answer = [int(t) for t in model.tokenizer(" A red star.", add_special_tokens=False).input_ids]
    rows = make_rows(model, [PROMPT] * 2, pixels, [answer] * 2)
    n_steps = len(answer)
    vhd, _, _ = step_vhd(model, rows, n_steps)
    # by hand: the eager bridge's per-head outputs of each image row and its text-only twin
    z = [_eager_z(model, rows, row, n_steps) for row in range(rows.ids.shape[0])]
    b = rows.n_image_rows
    by_hand = torch.stack([torch.linalg.vector_norm(z[i] - z[i + b], dim=-1) for i in range(b)])
    if (d := _max_diff(vhd, by_hand)) > KERNEL_ATOL:
        return CheckResult("fail", f"VHD differs from the eager hook_z distance by {d:.2g}")
    alone = torch.cat(
        [
            step_vhd(model, make_rows(model, [PROMPT], pixels[i : i + 1], [answer]), n_steps)[0]
            for i in range(b)
        ]
    )
    if (d := _max_diff(vhd, alone)) > ATOL:
        return CheckResult("fail", f"VHD of two images batched differs from each alone by {d:.2g}")
    return CheckResult("pass")


_ANALYSIS_CHECKS: dict[str, ModelCheck] = {"vit-heads": check_vit_heads, "vhd": check_vhd}


def family_results(family: str, root: str | Path) -> dict[str, CheckResult]:
    """Write ``family``'s tiny checkpoint under ``root`` and run every check of :data:`CHECKS` on it."""
    return model_results(family, root, _ANALYSIS_CHECKS)
