"""The atlas as a run: build it from the run store, summarise it, compare several."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from analyses import runstore
from analyses.atlas import findings
from analyses.atlas.build import join, select_runs
from analyses.atlas.config import AtlasConfig
from analyses.base import AnalysisResult
from probe.errors import ConfigError
from probe.loading import LoadedModel

ATLAS = "atlas"
TABLES = ("heads", "columns", "roles", "sources", "skipped", "overlap", "correlations", "multi_role")


def build_atlas(
    model_name: str,
    config: AtlasConfig | None = None,
    *,
    kind: str = "language",
    reference: Mapping[str, Any] | None = None,
) -> AnalysisResult:
    """The atlas of ``model_name`` from the run store ``config.root`` (docs/atlas.md).

    ``reference`` is the model record runs must match (a loaded model's ``describe()``); without it,
    the newest intact run's."""
    cfg = config or AtlasConfig()
    cfg.validate()
    root = cfg.root or None
    t0 = time.perf_counter()
    ref, sources, skipped = select_runs(model_name, kind, root, refs=cfg.runs, reference=reference)
    if not sources:
        why = "; ".join(f"{r.run_id}: {r.reason}" for r in skipped.itertuples()) or "none found"
        raise ConfigError(
            f"no run of {model_name} matches the reference weights and BOS policy ({why}); rerun the analyses "
            "or pass --run-missing"
        )
    heads, columns, roles, unread = join(ref, sources)
    skipped = pd.concat([skipped, unread], ignore_index=True) if len(unread) else skipped
    t1 = time.perf_counter()
    tables = {
        "heads": heads,
        "columns": columns,
        "roles": roles,
        "sources": pd.DataFrame([s.provenance for s in sources]),
        "skipped": skipped,
        "overlap": findings.overlap(heads, cfg.min_heads),
        "correlations": findings.correlations(heads),
        "multi_role": findings.multi_role(heads, cfg.top_multi),
    }
    model_info = {k: v for k, v in ref.items() if k not in ("device",)}
    model_info.setdefault("kind", kind)
    return AnalysisResult(
        analysis=ATLAS,
        model_info=model_info,
        config=cfg,
        tables=tables,
        timings={"join": round(t1 - t0, 3), "findings": round(time.perf_counter() - t1, 3)},
        notes={"sources": {s.analysis: s.run.run_id for s in sources}},
        nan_ok=tuple(c for c in heads.columns if c not in ("layer", "head", "kv_head", "depth")),
    )


def run_atlas(model: LoadedModel, config: AtlasConfig | None = None) -> AnalysisResult:
    """The atlas of a loaded model: its runs must be of these weights and this BOS policy."""
    return build_atlas(model.name, config, kind=model.kind, reference=model.describe())


def summary(result: AnalysisResult) -> str:
    """A few lines: the runs joined, heads per role, the top overlaps and correlations, many-role heads."""
    t = result.tables
    heads = t["heads"]
    lines = [f"atlas of {result.model_name}: {len(heads)} heads, {len(t['sources'])} analyses joined"]
    for r in t["sources"].itertuples(index=False):
        lines.append(f"  {r.analysis:<16} {r.run_id} (config {r.config_hash})")
    for r in t["skipped"].itertuples(index=False):
        lines.append(f"  skipped {r.run_id} ({r.analysis}): {r.reason}")
    roles = ", ".join(
        f"{r.role} {r.n_heads}" + (f" ({r.n_validated} held-out)" if r.n_validated >= 0 and r.n_heads else "")
        for r in t["roles"].itertuples(index=False)
    )
    lines.append(
        f"  heads per role (passing the analysis's held-out check, where it ran one): {roles or '(no roles)'}"
    )
    lines.append(f"  heads with two roles or more: {int((heads['n_roles'] >= 2).sum())}")
    over = t["overlap"].dropna(subset=["jaccard"])
    over = over[over["both"] > 0].sort_values("jaccard", ascending=False).head(3)
    for r in over.itertuples(index=False):
        lines.append(
            f"  overlap {r.role_a} & {r.role_b}: {r.both} heads, Jaccard {r.jaccard:.2f} "
            f"(independent: {r.expected_both:.1f})"
        )
    cross = t["correlations"]
    cross = cross[~cross["same_analysis"]].dropna(subset=["spearman"]).head(3)
    for r in cross.itertuples(index=False):
        lines.append(f"  Spearman {r.metric_a} vs {r.metric_b}: {r.spearman:+.2f} (n = {r.n})")
    for r in t["multi_role"].head(3).itertuples(index=False):
        lines.append(f"  L{r.layer}H{r.head}: {r.roles}")
    return "\n".join(lines)


def compare(atlases: Sequence[Any], depth_bins: int = 5) -> dict[str, pd.DataFrame]:
    """Several atlases (results or runs) side by side: heads per role, shares per relative-depth bin,
    metric distributions. Keys are the models' names (a second atlas of one model is refused)."""
    by_model: dict[str, pd.DataFrame] = {}
    for atlas in atlases:
        if atlas.model_name in by_model:
            raise ConfigError(f"two atlases of {atlas.model_name}; compare one atlas per model")
        by_model[atlas.model_name] = atlas.table("heads")
    return {
        "role_totals": findings.role_totals(by_model),
        "role_depth": findings.role_depth(by_model, depth_bins),
        "metrics": findings.metric_distributions(by_model),
    }


def latest_atlas(model_name: str, root: Any = None) -> runstore.Run:
    """The newest intact atlas run of ``model_name``."""
    for s in runstore.list_runs(root, analysis=ATLAS, model=model_name):
        if s.ok and s.model == model_name:
            return runstore.open_run(s.path)
    raise ConfigError(
        f"no atlas of {model_name} under {runstore.runs_root(root)}; build one: headlab atlas --model {model_name}"
    )


__all__ = ["ATLAS", "TABLES", "build_atlas", "compare", "latest_atlas", "run_atlas", "summary"]
