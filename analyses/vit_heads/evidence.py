"""How much to trust head importance: intervals over images for every per-head effect, the gradient
screen against the exact pruning effect, how concentrated importance is against a permutation null,
and the held-out validation of the most important heads. See docs/analyses/vit-heads.md
(importance statistics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses import validation
from analyses.vit_heads.config import IMPORTANCE_METRICS, VitHeadsConfig
from analyses.vit_heads.importance import (
    EvalSet,
    FullPruning,
    PruneCondition,
    pruned_embeddings,
    pruning_effects,
)
from analyses.vit_heads.probes import LinearProbe
from probe.loading import LoadedModel
from probe.types import Head

CONCENTRATION_COLUMNS = [
    "metric",
    "n_heads",
    "n_images",
    "top_heads",
    "share",
    "share_low",
    "share_high",
    "null_mean",
    "null_low",
    "null_high",
    "p_value",
]
RANKING_COLUMNS = [
    "metric",
    "reference",
    "n_heads",
    "spearman",
    "top_heads",
    "top_found",
    "reference_best",
    "best_rank",
]


def head_intervals(per_image: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, ...]:
    """Mean and 95% bootstrap interval over images of each column of ``per_image [N, C]``
    (:func:`analyses.validation.bootstrap_interval`; NaN for a column with a NaN)."""
    x = np.asarray(per_image, dtype=np.float64)
    out = np.full((3, x.shape[1]), np.nan)
    for c in range(x.shape[1]):
        if np.isfinite(x[:, c]).all():
            out[:, c] = validation.bootstrap_interval(x[:, c], n_boot, seed)
    return out[0], out[1], out[2]


def top_share(values: np.ndarray, fraction: float) -> np.ndarray:
    """Share of the total held by the largest ``round(fraction · C)`` (at least 1) of the last axis
    ``[..., C]``, on the positive parts (negative effects count 0); NaN where the total is 0."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    m = max(1, round(fraction * v.shape[-1]))
    total = v.sum(-1)
    top = -np.sort(-v, axis=-1)[..., :m].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, top / np.where(total > 0, total, 1.0), np.nan)


def _resampled_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Column means ``[n_boot, C]`` of ``n_boot`` resamples of the rows of ``x [N, C]``."""
    n = x.shape[0]
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], rng.integers(0, n, (n_boot, n))), 1.0)
    return counts @ x / n


def concentration(
    per_image: np.ndarray, fraction: float, *, n_perm: int, n_boot: int, seed: int
) -> dict[str, Any]:
    """How much of the total effect the top ``fraction`` of heads hold, against a null.

    ``per_image [N, C]``: each image's effect of each head (columns with a NaN are left out). The
    share of the head means is :func:`top_share`; its interval is a bootstrap over images. The null
    shuffles each image's effects over the heads (heads exchangeable: no head more important than
    another), ``n_perm`` times; ``p_value = (1 + #null ≥ share) / (1 + n_perm)``. With few images
    the null share is far above ``fraction``: noise alone makes some heads look important.
    """
    x = np.asarray(per_image, dtype=np.float64)
    x = x[:, np.isfinite(x).all(axis=0)]
    n, c = x.shape
    row: dict[str, Any] = {"n_heads": c, "n_images": n, "top_heads": max(1, round(fraction * c)) if c else 0}
    if n == 0 or c < 2:
        return {**row, **dict.fromkeys(CONCENTRATION_COLUMNS[4:], math.nan)}
    rng = np.random.default_rng(seed)
    share = float(top_share(x.mean(0), fraction))
    boot = top_share(_resampled_means(x, n_boot, rng), fraction)
    null = np.asarray([top_share(rng.permuted(x, axis=1).mean(0), fraction) for _ in range(n_perm)])
    finite = null[np.isfinite(null)]
    return {
        **row,
        "share": share,
        "share_low": float(np.nanquantile(boot, 0.025)) if np.isfinite(boot).any() else math.nan,
        "share_high": float(np.nanquantile(boot, 0.975)) if np.isfinite(boot).any() else math.nan,
        "null_mean": float(finite.mean()) if finite.size else math.nan,
        "null_low": float(np.quantile(finite, 0.025)) if finite.size else math.nan,
        "null_high": float(np.quantile(finite, 0.975)) if finite.size else math.nan,
        "p_value": (1.0 + float(np.sum(finite >= share))) / (1.0 + finite.size)
        if finite.size and math.isfinite(share)
        else math.nan,
    }


def ranking(reference: np.ndarray, metric: np.ndarray, fraction: float) -> dict[str, Any]:
    """How well ``metric`` ranks the heads that ``reference`` (the exact effect) ranks, over the heads
    where both are finite: Spearman, how many of the reference's top ``round(fraction · n)`` heads
    are also the metric's top ones, and the metric's rank (1 = first) of the reference's top head."""
    from scipy import stats

    ref, met = np.asarray(reference, dtype=np.float64), np.asarray(metric, dtype=np.float64)
    keep = np.flatnonzero(np.isfinite(ref) & np.isfinite(met))
    n = keep.size
    m = max(1, round(fraction * n)) if n else 0
    if n < 3:
        return {
            "n_heads": n,
            "spearman": math.nan,
            "top_heads": m,
            "top_found": 0,
            "best": -1,
            "best_rank": 0,
        }
    r, v = ref[keep], met[keep]
    rho = float(stats.spearmanr(r, v).statistic) if np.ptp(r) > 0 and np.ptp(v) > 0 else math.nan
    top_ref = set(np.argsort(-r, kind="stable")[:m].tolist())
    order = np.argsort(-v, kind="stable")
    best = int(np.argmax(r))
    return {
        "n_heads": n,
        "spearman": rho,
        "top_heads": m,
        "top_found": len(top_ref & set(order[:m].tolist())),
        "best": int(keep[best]),
        "best_rank": int(np.flatnonzero(order == best)[0]) + 1,
    }


def ranking_table(
    heads: Sequence[Head], values: Mapping[str, np.ndarray], reference: str, fraction: float
) -> pd.DataFrame:
    """One :func:`ranking` row per metric of ``values`` (each ``[len(heads)]``) against ``reference``."""
    rows = []
    for metric, v in values.items():
        if metric == reference:
            continue
        r = ranking(values[reference], v, fraction)
        best = heads[r["best"]] if r["best"] >= 0 else None
        rows.append(
            {
                "metric": metric,
                "reference": reference,
                "n_heads": r["n_heads"],
                "spearman": r["spearman"],
                "top_heads": r["top_heads"],
                "top_found": r["top_found"],
                "reference_best": validation.head_label(best) if best else "",
                "best_rank": r["best_rank"],
            }
        )
    return pd.DataFrame(rows, columns=RANKING_COLUMNS)


VALIDATION_MEASURES = ("cosine_drop", "confidence_drop", "accuracy_drop")


def validate_top(
    model: LoadedModel,
    cfg: VitHeadsConfig,
    held: EvalSet,
    probes: Mapping[str, LinearProbe],
    means: Mapping[int, torch.Tensor] | None,
    tested: Sequence[Head],
    candidates: Sequence[Head],
) -> pd.DataFrame:
    """Prune the ``tested`` heads together on the held-out images, and ``n_null`` random sets of as
    many other ``candidates`` (:func:`analyses.validation.null_sets`): one ``validation`` row per
    measure (role ``important``, direction ``higher``: pruning them should cost more)."""
    tested = list(tested)
    nulls = validation.null_sets(candidates, len(tested), cfg.n_null, cfg.seed, exclude=tested)
    conditions = [
        PruneCondition(s[0], name, others=tuple(s[1:]))
        for name, s in [("tested", tested), *((f"null_{i}", s) for i, s in enumerate(nulls))]
    ]
    emb = pruned_embeddings(
        model,
        held.pixels,
        conditions,
        mode=cfg.ablation,
        means=means,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        desc="validation",
    )
    per = pruning_effects(probes, held.labels, held.clean, emb).per_image()
    inputs = validation.Inputs(
        "held-out eval images", len(held.rows), "test-split images not used to rank the heads"
    )
    rows = [
        validation.test_row(
            "important",
            tested,
            per[m][0],
            per[m][1:].mean(axis=1),
            measure=m,
            direction="higher",
            inputs=inputs,
            n_boot=cfg.n_boot,
            seed=cfg.seed,
        )
        for m in VALIDATION_MEASURES
        if np.isfinite(per[m]).all()
    ]
    return validation.frame(rows)


@dataclass
class ImportanceStats:
    """The statistics of a run's pruning: ``[L, H]`` columns of the heads table (each metric's
    ``_low``/``_high`` interval, and ``_significant``), the ``concentration`` and ``ranking``
    tables, and counts for the notes."""

    columns: dict[str, np.ndarray]
    concentration: pd.DataFrame
    ranking: pd.DataFrame
    notes: dict[str, Any]
    per_image: np.ndarray  # [metric (IMPORTANCE_METRICS order), L, H, N]; NaN: not pruned


def importance_stats(
    model: LoadedModel, cfg: VitHeadsConfig, full: FullPruning, grad_per_image: np.ndarray
) -> ImportanceStats:
    """Intervals, significance (one-sided t-test per head, Benjamini–Hochberg over the pruned heads),
    concentration and the ranking against the exact cosine drop, over the pruned heads and the
    discovery images. ``grad_per_image [L·H, N]`` as :func:`pooled_per_image` gives it."""
    L, H = model.n_layers, model.n_heads
    flat = [layer * H + h for layer, h in full.heads]
    per = {**full.per_image, "grad_importance": np.asarray(grad_per_image)[flat]}
    columns: dict[str, np.ndarray] = {}
    rows = []
    notes: dict[str, Any] = {"discovery_images": int(full.effects.cosine.shape[1])}
    for metric, values in per.items():
        mean, low, high = head_intervals(values.T, cfg.n_boot, cfg.seed)
        for suffix, v in (("low", low), ("high", high)):
            grid = np.full((L, H), np.nan)
            grid[tuple(np.asarray(full.heads).T)] = v
            columns[f"{metric}_{suffix}"] = grid
        excludes = int(np.sum((low > 0) | (high < 0)))
        notes[metric] = {
            "interval_excludes_zero": excludes,
            "exactly_zero": int(np.sum(np.abs(mean) <= 1e-12)),
        }
        if metric != "grad_importance":
            passed, _ = validation.significant(values.T, "higher") if values.shape[1] >= 2 else (None, None)
            grid = np.zeros((L, H))
            if passed is not None:
                grid[tuple(np.asarray(full.heads).T)] = passed
            columns[f"{metric}_significant"] = grid.astype(bool)
            notes[metric]["significant"] = int(grid.sum())
        row = concentration(values.T, cfg.top_fraction, n_perm=cfg.n_perm, n_boot=cfg.n_boot, seed=cfg.seed)
        rows.append({"metric": metric, **row})
    cube = np.full((len(IMPORTANCE_METRICS), L, H, full.effects.cosine.shape[1]), np.nan)
    for i, metric in enumerate(IMPORTANCE_METRICS):
        cube[i][tuple(np.asarray(full.heads).T)] = per[metric]
    means = {m: v.mean(axis=1) for m, v in per.items()}
    rank = ranking_table(
        full.heads, {"cosine_drop": means["cosine_drop"], **means}, "cosine_drop", cfg.top_fraction
    )
    return ImportanceStats(columns, pd.DataFrame(rows, columns=CONCENTRATION_COLUMNS), rank, notes, cube)
