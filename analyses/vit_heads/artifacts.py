"""Vision sinks of the vit-heads analysis: high-norm artifact tokens (residual norms far above the
median patch norm) and how much attention every head gives to CLS and to them.
See docs/analyses/vit-heads.md (vision sinks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analyses.vit_heads.capture import Capture, artifact_mask
from analyses.vit_heads.config import VitHeadsConfig
from probe.loading import LoadedModel


def nanmean0(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite values (NaN where there is none)."""
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=0)
    count = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _norm_rows(
    norms_all: np.ndarray,
    art: np.ndarray,
    names: Sequence[str],
    input_set: str,
    n_layers: int,
    n_prefix: int,
    gc: int,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Rows of ``norms`` (CLS and the artifact tokens per layer) and of ``artifacts`` (per token)."""
    norm_rows = []
    listing = []
    for layer in range(n_layers):
        norms = norms_all[:, layer]  # resid_pre of this layer [n, T]
        mask = art[:, layer]
        patch_mask = np.zeros_like(mask)
        patch_mask[:, n_prefix:] = True
        other = patch_mask & ~mask
        other_norm = float(norms[other].mean()) if other.any() else math.nan
        median = np.median(norms[:, n_prefix:], axis=-1)
        norm_rows.append(
            {
                "input_set": input_set,
                "layer": layer,
                "quantity": "hidden",
                "token": "cls",
                "sink_norm": float(norms[:, 0].mean()),
                "other_norm": other_norm,
                "n_tokens": 1.0,
                "median_norm": float(median.mean()),
            }
        )
        norm_rows.append(
            {
                "input_set": input_set,
                "layer": layer,
                "quantity": "hidden",
                "token": "artifacts",
                "sink_norm": float(norms[mask].mean()) if mask.any() else math.nan,
                "other_norm": other_norm,
                "n_tokens": float(mask.sum(-1).mean()),
                "median_norm": float(median.mean()),
            }
        )
        for i, token in zip(*np.nonzero(mask), strict=True):
            patch = int(token) - n_prefix
            listing.append(
                {
                    "input_set": input_set,
                    "image": names[int(i)],
                    "layer": layer,
                    "token": int(token),
                    "row": patch // gc,
                    "col": patch % gc,
                    "norm": float(norms[i, token]),
                    "median_norm": float(median[i]),
                    "ratio": float(norms[i, token] / median[i]),
                }
            )
    return norm_rows, listing


def sink_tables(
    model: LoadedModel, cap: Capture, names: Sequence[str], input_set: str, cfg: VitHeadsConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(``sinks`` per (layer, head), ``norms`` per (layer, token kind), ``artifacts`` per token)."""
    L, H = model.n_layers, model.n_heads
    n_prefix = int(model.extra["n_prefix"])
    gc = int(model.extra["grid"][1])
    n_img = cap.alpha0.shape[0]
    art = artifact_mask(cap.norms, n_prefix, cfg.artifact_ratio)  # [n, L+1, T]
    n_art = art[:, :L].sum(-1)  # [n, L]
    sem = np.nanstd(cap.alpha0, axis=0, ddof=1) / math.sqrt(n_img) if n_img > 1 else np.zeros((L, H))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_token = cap.alpha_artifacts / np.where(n_art > 0, n_art, np.nan)[:, :, None]
    sinks = pd.DataFrame(
        {
            "input_set": input_set,
            "layer": np.repeat(np.arange(L), H),
            "head": np.tile(np.arange(H), L),
            "alpha0": np.nanmean(cap.alpha0, axis=0).ravel(),
            "alpha0_sem": np.asarray(sem).ravel(),
            "sink_rate": (cap.alpha0 > cfg.sink_eps).mean(axis=0).ravel(),
            "alpha_prefix": np.nanmean(cap.alpha_prefix, axis=0).ravel(),
            "alpha_artifacts": nanmean0(cap.alpha_artifacts).ravel(),
            "alpha_artifacts_per_token": nanmean0(per_token).ravel(),
            "uniform_artifacts": np.repeat(n_art.mean(axis=0) / model.n_ctx, H),
            "images_with_artifacts": np.repeat((n_art > 0).sum(axis=0), H),
        }
    )
    norm_rows, listing = _norm_rows(cap.norms, art, names, input_set, L, n_prefix, gc)
    norms_frame = pd.DataFrame(norm_rows)
    norms_frame["ratio"] = norms_frame["sink_norm"] / norms_frame["other_norm"]
    artifacts = pd.DataFrame(
        listing,
        columns=["input_set", "image", "layer", "token", "row", "col", "norm", "median_norm", "ratio"],
    )
    return sinks, norms_frame, artifacts


def head_sink_columns(cap: Capture, cfg: VitHeadsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[L, H]`` columns of the heads table: ``alpha0``, ``sink_rate`` and ``alpha_artifacts``."""
    with np.errstate(invalid="ignore"):
        alpha0_head = np.nanmean(cap.alpha0, axis=0)
        sink_rate = np.nanmean((cap.alpha0 > cfg.sink_eps).astype(np.float64), axis=0)
    return alpha0_head, sink_rate, nanmean0(cap.alpha_artifacts)
