"""Held-out validation of VHR's heads: the heads the main setting selects on most evaluated
(discovery) scenes, scaled on further scenes never used to choose them, against random same-size
head sets of the same layers.

The effect is read without generating: per held-out scene, how much more the model leans to "Yes"
for a present class than for an absent one (POPE's adversarial question pair, the first answer
step's Yes − No logit), and how scaling a head set changes that. See docs/analyses/vhd.md
("Held-out validation").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses import validation as va
from analyses.tasks import scene_captions as scc
from analyses.vhd.captions import EvalInputs, noisy_images
from analyses.vhd.config import VhdConfig, parse_layers
from analyses.vhd.forward import Rows, forward_rows, make_rows, project_images, scale_heads, spans
from analyses.vhd.reinforcement import Selection
from probe.loading import LoadedModel
from probe.types import Head

MEASURE = "change in present − absent Yes−No logit (POPE adversarial pair, first answer step)"
KIND: scc.PopeKind = "adversarial"
EXTRA = ("scale",)


def vhr_heads(
    selections: Sequence[Selection], min_share: float = 0.5, limit: int | None = None
) -> list[Head]:
    """The heads a VHR setting selected on at least ``min_share`` of the inputs (sorted); with
    ``limit``, only that many of them, the most often selected first (ties: lower layer, head)."""
    if not selections:
        return []
    share = torch.cat([s.selected for s in selections]).float().mean(0)
    layers, heads = torch.nonzero(share >= min_share, as_tuple=True)
    found = list(zip(layers.tolist(), heads.tolist(), strict=True))
    found.sort(key=lambda h: (-float(share[h]), h))
    return sorted(found[:limit] if limit is not None else found)


def discrimination(scene: np.ndarray, label: np.ndarray, margin: np.ndarray, n_scenes: int) -> np.ndarray:
    """Per scene: mean Yes − No margin of its present-class questions minus that of its absent-class
    ones (NaN for a scene without both)."""
    out = np.full(n_scenes, math.nan)
    for k in range(n_scenes):
        here = scene == k
        yes, no = margin[here & label], margin[here & ~label]
        if len(yes) and len(no):
            out[k] = float(yes.mean() - no.mean())
    return out


def head_scales(model: LoadedModel, heads: Sequence[Head], scale: float) -> torch.Tensor:
    """``[1, layers, heads]``: ``scale`` at ``heads``, 1 elsewhere."""
    out = torch.ones(1, model.n_layers, model.n_heads)
    for layer, head in heads:
        out[0, layer, head] = scale
    return out


def _yes_no_ids(model: LoadedModel) -> tuple[int, int]:
    tok = model.tokenizer
    return (
        int(tok("Yes", add_special_tokens=False)["input_ids"][0]),
        int(tok("No", add_special_tokens=False)["input_ids"][0]),
    )


def held_out_inputs(cfg: VhdConfig, inputs: EvalInputs) -> tuple[np.ndarray, list[scc.PopeQuestion]]:
    """The ``held_out_scenes`` scenes after the evaluated ones (same stream and noise) and one
    adversarial POPE pair (a present and an absent class) for each."""
    scenes = scc.eval_scenes(inputs.data, cfg.split, cfg.n_scenes + cfg.held_out_scenes)  # type: ignore[arg-type]
    held = scenes[cfg.n_scenes :]
    stats = inputs.stats if inputs.stats is not None else scc.training_statistics(inputs.data, cfg.n_stats)
    questions = scc.pope_questions(held, stats, KIND, n_per_scene=1, seed=cfg.seed)
    return noisy_images(held, cfg.noise, cfg.seed), questions


def margins_under(
    model: LoadedModel, rows: Rows, yes_no: tuple[int, int], scales: torch.Tensor | None
) -> np.ndarray:
    """First-step Yes − No logit of each row, with head ``scales`` (or none)."""
    if scales is None:
        logits = forward_rows(model, rows)[:, 0]
    else:
        with scale_heads(model, scales):
            logits = forward_rows(model, rows)[:, 0]
    return (logits[:, yes_no[0]] - logits[:, yes_no[1]]).cpu().numpy().astype(np.float64)


def _pool(model: LoadedModel, cfg: VhdConfig) -> list[Head]:
    """The null's pool: the heads of the main setting's layers."""
    layers = parse_layers(cfg.settings[0].layers, model.n_layers)
    return [(layer, h) for layer in layers for h in range(model.n_heads)]


def run_validation(
    model: LoadedModel, cfg: VhdConfig, inputs: EvalInputs, selections: Sequence[Selection], bar: Any
) -> pd.DataFrame:
    """The ``validation`` table: one row per scale in ``validation_scales`` (role ``vhr-suppress``
    below 1, ``vhr-reinforce`` above), each against ``n_null`` random sets (see module doc)."""
    pool = _pool(model, cfg)
    tested = vhr_heads(selections, limit=len(pool) // 2)  # at most half: the null needs the rest
    if not tested:
        return va.frame([], extra=EXTRA)
    nulls = va.null_sets(pool, len(tested), cfg.n_null, cfg.seed, exclude=tested)
    images, questions = held_out_inputs(cfg, inputs)
    head_sets = [tested, *nulls]
    yes_no = _yes_no_ids(model)
    base = np.zeros(len(questions))
    got = np.zeros((len(cfg.validation_scales), len(head_sets), len(questions)))
    for start, stop in spans(len(questions), cfg.batch_size):
        part = questions[start:stop]
        pixels = model.preprocess(images[[q.scene for q in part]])
        rows = make_rows(model, [q.text for q in part], pixels, text_twin=False)
        rows.features = project_images(model, pixels)  # once for every head set
        base[start:stop] = margins_under(model, rows, yes_no, None)
        for i, scale in enumerate(cfg.validation_scales):
            for j, heads in enumerate(head_sets):
                got[i, j, start:stop] = margins_under(model, rows, yes_no, head_scales(model, heads, scale))
                bar.update(len(part))
    scene = np.array([q.scene for q in questions])
    label = np.array([q.label for q in questions], dtype=bool)
    n_held = cfg.held_out_scenes
    d_base = discrimination(scene, label, base, n_held)
    detail = (
        f"{cfg.split} scenes {cfg.n_scenes}-{cfg.n_scenes + n_held - 1} of the evaluation stream, "
        f"noise {cfg.noise:g}; heads chosen on scenes 0-{cfg.n_scenes - 1}; null from the other {len(pool) - len(tested)} heads of those layers"
    )
    rows_out = []
    for i, scale in enumerate(cfg.validation_scales):
        effects = np.stack(
            [discrimination(scene, label, got[i, j], n_held) - d_base for j in range(len(head_sets))]
        )
        keep = np.isfinite(effects).all(0)
        suppress = scale < 1
        rows_out.append(
            va.test_row(
                "vhr-suppress" if suppress else "vhr-reinforce",
                tested,
                effects[0, keep],
                effects[1:, keep].mean(1),
                measure=MEASURE,
                direction="lower" if suppress else "higher",
                inputs=va.Inputs("held-out scenes", int(keep.sum()), detail),
                n_boot=cfg.n_boot,
                seed=cfg.seed,
                alpha=cfg.alpha_ci,
                scale=float(scale),
            )
        )
    return va.frame(rows_out, extra=EXTRA)


def validation_work(cfg: VhdConfig) -> int:
    """Progress-bar units of :func:`run_validation`: questions × head sets × scales."""
    return 2 * cfg.held_out_scenes * (cfg.n_null + 1) * len(cfg.validation_scales)
