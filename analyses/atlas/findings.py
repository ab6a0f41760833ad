"""Findings across analyses, computed on an atlas: role overlap, metric correlation, many-role heads,
and models side by side by relative depth."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analyses import registry


def role_names(atlas: pd.DataFrame) -> list[str]:
    """The roles an atlas flags, in column order."""
    return [c.removeprefix("role.") for c in atlas.columns if c.startswith("role.")]


def overlap(atlas: pd.DataFrame, min_heads: int = 1) -> pd.DataFrame:
    """One row per pair of roles (each with at least ``min_heads`` heads): the heads in both, the
    Jaccard index, and the number in both expected if the two were independent (``n_a * n_b / n``)."""
    n = len(atlas)
    rows = []
    names = [r for r in role_names(atlas) if int(atlas[f"role.{r}"].sum()) >= min_heads]
    for a, b in itertools.combinations(names, 2):
        fa, fb = atlas[f"role.{a}"].to_numpy(bool), atlas[f"role.{b}"].to_numpy(bool)
        both, either = int((fa & fb).sum()), int((fa | fb).sum())
        rows.append(
            {
                "role_a": a,
                "role_b": b,
                "n_a": int(fa.sum()),
                "n_b": int(fb.sum()),
                "both": both,
                "jaccard": both / either if either else math.nan,
                "expected_both": float(fa.sum() * fb.sum() / n) if n else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=["role_a", "role_b", "n_a", "n_b", "both", "jaccard", "expected_both"])


def key_metrics(atlas: pd.DataFrame) -> list[str]:
    """The atlas columns the correlations use: each joined analysis's ``atlas_metrics`` (else the
    columns its roles read), where numeric."""
    out = []
    for entry in registry.ANALYSES.values():
        chosen = entry.atlas_metrics or tuple(dict.fromkeys(r.column for r in entry.roles))
        for column in chosen:
            name = f"{entry.name}.{column}"
            if name in atlas.columns and pd.api.types.is_numeric_dtype(atlas[name]):
                out.append(name)
    return out


def correlations(atlas: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Spearman's rho of every pair of key metrics over the heads where both are finite, with its
    p-value, sorted by |rho| (largest first). Pairs within one analysis are kept and marked."""
    metrics = list(metrics) if metrics is not None else key_metrics(atlas)
    rows = []
    for a, b in itertools.combinations(metrics, 2):
        x, y = atlas[a].to_numpy(float), atlas[b].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        n = int(ok.sum())
        if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
            rho, p = math.nan, math.nan
        else:
            res = stats.spearmanr(x[ok], y[ok])
            rho, p = float(res.statistic), float(res.pvalue)
        rows.append(
            {
                "metric_a": a,
                "metric_b": b,
                "same_analysis": a.split(".", 1)[0] == b.split(".", 1)[0],
                "n": n,
                "spearman": rho,
                "p_value": p,
            }
        )
    frame = pd.DataFrame(rows, columns=["metric_a", "metric_b", "same_analysis", "n", "spearman", "p_value"])
    order = frame["spearman"].abs().fillna(-1).sort_values(ascending=False, kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def multi_role(atlas: pd.DataFrame, top: int = 20) -> pd.DataFrame:
    """The heads with at least two roles, most roles first (then by layer and head), at most ``top``."""
    many = atlas[atlas["n_roles"] >= 2]
    many = many.sort_values(["n_roles", "layer", "head"], ascending=[False, True, True], kind="stable")
    return many[["layer", "head", "kv_head", "depth", "n_roles", "roles"]].head(top).reset_index(drop=True)


# ------------------------------------------------------------------------------- models side by side


def depth_bins(n_bins: int) -> np.ndarray:
    """The edges of ``n_bins`` equal relative-depth bins over [0, 1]."""
    return np.linspace(0.0, 1.0, n_bins + 1)


def role_depth(atlases: Mapping[str, pd.DataFrame], n_bins: int = 5) -> pd.DataFrame:
    """Per model, role and relative-depth bin: the heads of the bin, those with the role, the share."""
    edges = depth_bins(n_bins)
    rows = []
    for model, atlas in atlases.items():
        bins = np.clip(np.digitize(atlas["depth"].to_numpy(float), edges[1:-1]), 0, n_bins - 1)
        for role in role_names(atlas):
            flag = atlas[f"role.{role}"].to_numpy(bool)
            for b in range(n_bins):
                inside = bins == b
                rows.append(
                    {
                        "model": model,
                        "role": role,
                        "bin": b,
                        "depth_low": float(edges[b]),
                        "depth_high": float(edges[b + 1]),
                        "heads": int(inside.sum()),
                        "with_role": int((flag & inside).sum()),
                        "share": float((flag & inside).sum() / inside.sum()) if inside.any() else math.nan,
                    }
                )
    columns = ["model", "role", "bin", "depth_low", "depth_high", "heads", "with_role", "share"]
    return pd.DataFrame(rows, columns=columns)


def role_totals(atlases: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per model and role: heads with the role and their share of the model's heads (roles a model's
    atlas lacks are absent, not zero)."""
    rows = []
    for model, atlas in atlases.items():
        for role in role_names(atlas):
            flag = atlas[f"role.{role}"].to_numpy(bool)
            rows.append(
                {"model": model, "role": role, "n_heads": int(flag.sum()), "share": float(flag.mean())}
            )
    return pd.DataFrame(rows, columns=["model", "role", "n_heads", "share"])


QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def metric_distributions(atlases: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per model and key metric: count, mean and the 10/25/50/75/90 % quantiles over its heads."""
    rows = []
    for model, atlas in atlases.items():
        for metric in key_metrics(atlas):
            x = atlas[metric].to_numpy(float)
            x = x[np.isfinite(x)]
            qs = np.quantile(x, QUANTILES) if x.size else np.full(len(QUANTILES), np.nan)
            rows.append(
                {
                    "model": model,
                    "metric": metric,
                    "n": int(x.size),
                    "mean": float(x.mean()) if x.size else math.nan,
                    **{f"q{int(q * 100)}": float(v) for q, v in zip(QUANTILES, qs, strict=True)},
                }
            )
    columns = ["model", "metric", "n", "mean", *[f"q{int(q * 100)}" for q in QUANTILES]]
    return pd.DataFrame(rows, columns=columns)


__all__ = [
    "QUANTILES",
    "correlations",
    "depth_bins",
    "key_metrics",
    "metric_distributions",
    "multi_role",
    "overlap",
    "role_depth",
    "role_names",
    "role_totals",
]
