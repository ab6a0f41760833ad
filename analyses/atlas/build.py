"""Building the atlas of one model: pick its runs, check they are of one model, join their heads.

The atlas reads only the run store. For each registered analysis that declares roles and runs on
the model's kind, it takes the newest intact run of that model (or the run named in
``AtlasConfig.runs``), and joins the heads tables on ``(layer, head)``. A run whose weights
(sha256) or BOS policy differ from the reference is never joined: a named one is refused, and a
newer one skipped for an older that matches is listed in the ``skipped`` table, so a stale atlas is
visible.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analyses import registry, runstore
from analyses.registry import Analysis
from analyses.roles import Role
from probe.errors import ConfigError

KEYS = ("layer", "head", "kv_head")


@dataclass(frozen=True)
class Source:
    """One run joined into an atlas."""

    analysis: str
    run: runstore.Run

    @property
    def provenance(self) -> dict[str, Any]:
        m = self.run.manifest
        return {
            "analysis": self.analysis,
            "run_id": self.run.run_id,
            "created": m.created,
            "config_hash": config_hash(m.config),
            "model_sha256": str(m.model.get("weight_sha256") or ""),
            "bos": bos_text(m.model.get("bos")),
            "dtype": str(m.model.get("dtype") or ""),
            "code_revision": str(m.code_revision or ""),
        }


def config_hash(config: Mapping[str, Any]) -> str:
    """The first 12 hex digits of the sha256 of the config as sorted JSON."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def bos_text(bos: Any) -> str:
    """A BOS policy record as one comparable string: ``default (prepend=False, id 1)``."""
    if not isinstance(bos, Mapping):
        return str(bos or "")
    return f"{bos.get('mode')} (prepend={bos.get('prepend')}, id {bos.get('token_id')})"


def atlas_analyses(kind: str) -> list[Analysis]:
    """The registered analyses that declare roles and run on models of ``kind``, in registry order."""
    return [e for e in registry.ANALYSES.values() if e.roles and kind in e.model_kinds]


def bos_key(bos: Any) -> tuple[Any, Any]:
    """What a BOS policy does to the tokens: whether a BOS is prepended, and which (the mode's name,
    ``default`` or ``always``, is left out: two modes that prepend the same token give the same runs)."""
    if not isinstance(bos, Mapping):
        return (str(bos or ""), None)
    return (bool(bos.get("prepend")), bos.get("token_id") if bos.get("prepend") else None)


def mismatch(model: Mapping[str, Any], reference: Mapping[str, Any]) -> str | None:
    ref_sha, sha = reference.get("weight_sha256"), model.get("weight_sha256")
    if ref_sha and sha != ref_sha:
        return f"weights sha256 {str(sha)[:12]}… differ from the reference's {str(ref_sha)[:12]}…"
    if bos_key(model.get("bos")) != bos_key(reference.get("bos")):
        return f"BOS policy {bos_text(model.get('bos'))} differs from the reference's {bos_text(reference.get('bos'))}"
    return None


def _named(refs: Sequence[str], root: Any) -> dict[str, runstore.Run]:
    named: dict[str, runstore.Run] = {}
    for ref in refs:
        run = runstore.open_run(runstore.resolve_run(ref, root), root=runstore.runs_root(root))
        analysis = registry.canonical(run.analysis)
        if analysis in named:
            raise ConfigError(
                f"--runs names two runs of {analysis} ({named[analysis].run_id} and {run.run_id}); an atlas "
                "joins one run per analysis, so name one"
            )
        named[analysis] = run
    return named


def select_runs(
    model_name: str,
    kind: str,
    root: Any,
    *,
    refs: Sequence[str] = (),
    reference: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[Source], pd.DataFrame]:
    """``(reference model record, the runs to join, the skipped runs)`` for ``model_name``.

    With ``reference`` (a loaded model's ``describe()``), each analysis's newest run of those weights
    and BOS policy is joined and newer runs that differ are listed as skipped. Without it, the newest
    run of each analysis (or the named one) is joined, and they must agree on weights and BOS policy
    or :class:`ConfigError` says which differ. Named runs (``refs``) must be of the model and match.
    """
    named = _named(refs, root)
    candidates = {e.name: e for e in atlas_analyses(kind)}
    for analysis, run in named.items():
        if run.model_name != model_name:
            raise ConfigError(
                f"run {run.run_id} is of model {run.model_name}, not {model_name}; name runs of {model_name} only"
            )
        if analysis not in candidates:
            known = ", ".join(candidates) or "(none)"
            raise ConfigError(
                f"run {run.run_id} is of {analysis}, which gives no atlas roles for a {kind} model; "
                f"the atlas joins: {known}"
            )
    latest: dict[str, list[runstore.RunSummary]] = {}
    for summary in runstore.list_runs(root, model=model_name):
        if summary.ok and summary.analysis in candidates and summary.model == model_name:
            latest.setdefault(summary.analysis, []).append(summary)
    if reference is None:
        reference = _agreed_reference(model_name, root, candidates, named, latest)
    reference = dict(reference)
    sources: list[Source] = []
    skipped: list[dict[str, str]] = []
    for name in candidates:
        if name in named:
            run = named[name]
            why = mismatch(run.manifest.model, reference)
            if why:
                raise ConfigError(
                    f"run {run.run_id} ({name}) cannot join this atlas: its {why}; rerun {name} on the model "
                    "as it is now, or name a matching run"
                )
            sources.append(Source(name, run))
            continue
        for summary in latest.get(name, []):
            run = runstore.open_run(summary.path, root=runstore.runs_root(root))
            why = mismatch(run.manifest.model, reference)
            if why is None:
                sources.append(Source(name, run))
                break
            skipped.append({"analysis": name, "run_id": run.run_id, "reason": why})
    skipped_frame = pd.DataFrame(skipped, columns=["analysis", "run_id", "reason"])
    return reference, sources, skipped_frame


def _agreed_reference(
    model_name: str,
    root: Any,
    candidates: Mapping[str, Analysis],
    named: Mapping[str, runstore.Run],
    latest: Mapping[str, list[runstore.RunSummary]],
) -> dict[str, Any]:
    """The model record the runs to join share: the named run, else the newest, of each analysis.
    Runs that disagree on weights or BOS policy are refused, naming which."""
    chosen = dict(named)
    for name, summaries in latest.items():
        if name not in chosen and summaries:
            chosen[name] = runstore.open_run(summaries[0].path, verify=False)
    if not chosen:
        raise ConfigError(
            f"no intact run of {model_name} by an analysis the atlas joins ({', '.join(candidates)}) under "
            f"{runstore.runs_root(root)}; run some (`headlab run census --model {model_name}`) or pass --run-missing"
        )
    groups: dict[tuple[str, str], list[str]] = {}
    for name, run in chosen.items():
        key = (
            str(run.manifest.model.get("weight_sha256") or "")[:12],
            str(bos_key(run.manifest.model.get("bos"))),
        )
        groups.setdefault(key, []).append(f"{name} {run.run_id}")
    if len(groups) > 1:
        parts = "; ".join(
            f"weights {sha}… BOS {bos}: {', '.join(runs)}" for (sha, bos), runs in groups.items()
        )
        raise ConfigError(
            f"the newest runs of {model_name} are of different weights or BOS policies ({parts}); build the atlas "
            "with --run-missing (it loads the model and joins only runs of its weights) or name matching runs with --runs"
        )
    newest = max(chosen.values(), key=lambda r: (r.manifest.created, r.run_id))
    return dict(newest.manifest.model)


def metric_columns(heads: pd.DataFrame) -> list[str]:
    """Every column of a heads table but the keys (numbers, flags and labels alike)."""
    return [c for c in heads.columns if c not in KEYS]


def join(
    reference: Mapping[str, Any], sources: Sequence[Source]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(heads, columns, roles, unread)``: one row per head with every source's columns as
    ``<analysis>.<column>``, a ``role.<name>`` flag per declared role (and ``validated.<name>`` where
    the analysis tested it on held-out inputs); the provenance of every column; one row per role;
    the roles a run could not give (a column it lacks), with why."""
    n_layers, n_heads = int(reference["n_layers"]), int(reference["n_heads"])
    n_kv = int(reference.get("n_kv_heads") or n_heads)
    group = max(1, n_heads // n_kv)
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    atlas = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "kv_head": head.ravel() // group})
    atlas["depth"] = atlas["layer"] / n_layers
    provenance: list[dict[str, Any]] = []
    role_rows: list[dict[str, Any]] = []
    flags: dict[str, pd.Series] = {}
    unread: list[dict[str, str]] = []
    joined: dict[str, np.ndarray] = {}  # the atlas's columns, added at once after the loop
    for source in sources:
        entry = registry.ANALYSES[source.analysis]
        heads = source.run.heads
        if len(heads) != len(atlas) or set(zip(heads["layer"], heads["head"], strict=True)) != set(
            zip(atlas["layer"], atlas["head"], strict=True)
        ):
            raise ConfigError(
                f"run {source.run.run_id} ({source.analysis}) has {len(heads)} heads, not the "
                f"{n_layers} x {n_heads} of the model; the run is of another shape: rerun it"
            )
        heads = heads.sort_values(["layer", "head"]).reset_index(drop=True)
        prov = source.provenance
        for column in metric_columns(heads):
            name = f"{source.analysis}.{column}"
            joined[name] = heads[column].to_numpy()
            provenance.append({"column": name, "source_column": column, **prov})
        for role in entry.roles:
            if role.column not in heads.columns:
                unread.append(
                    {
                        "analysis": source.analysis,
                        "run_id": source.run.run_id,
                        "reason": f"role {role.name} not given: the run has no column {role.column} "
                        f"(written by an older headlab); rerun {source.analysis}",
                    }
                )
                continue
            flag = role.flags(heads).to_numpy()
            flags[role.name] = pd.Series(flag)
            joined[f"role.{role.name}"] = flag
            provenance.append({"column": f"role.{role.name}", "source_column": role.column, **prov})
            tested = _tested(heads, role)
            if tested:
                validated = flag & heads[role.evidence].map(_bool).to_numpy()
                joined[f"validated.{role.name}"] = validated
                provenance.append(
                    {"column": f"validated.{role.name}", "source_column": role.evidence, **prov}
                )
            role_rows.append(
                {
                    **{k: v for k, v in role.describe().items() if k not in ("value",)},
                    "value": str(role.value),
                    "analysis": source.analysis,
                    "run_id": source.run.run_id,
                    "n_heads": int(flag.sum()),
                    "share": float(flag.mean()),
                    "mean_depth": float(atlas["depth"].to_numpy()[flag].mean())
                    if flag.any()
                    else float("nan"),
                    "n_validated": int(validated.sum()) if tested else -1,
                }
            )
    atlas = pd.concat([atlas, pd.DataFrame(joined, index=atlas.index)], axis=1)
    names = [r["role"] for r in role_rows]
    matrix = (
        np.column_stack([flags[n].to_numpy() for n in names]) if names else np.zeros((len(atlas), 0), bool)
    )
    atlas.insert(4, "n_roles", matrix.sum(axis=1).astype(np.int64))
    atlas.insert(5, "roles", ["+".join(n for n, f in zip(names, row, strict=True) if f) for row in matrix])
    columns = pd.DataFrame(
        provenance,
        columns=[
            "column",
            "source_column",
            "analysis",
            "run_id",
            "created",
            "config_hash",
            "model_sha256",
            "bos",
            "dtype",
            "code_revision",
        ],
    )
    roles = pd.DataFrame(
        role_rows,
        columns=[
            "role",
            "label",
            "analysis",
            "column",
            "rule",
            "value",
            "threshold",
            "paper",
            "per_kv_head",
            "evidence",
            "run_id",
            "n_heads",
            "share",
            "mean_depth",
            "n_validated",
        ],
    )
    roles["evidence"] = roles["evidence"].fillna("").astype(str)
    return atlas, columns, roles, pd.DataFrame(unread, columns=["analysis", "run_id", "reason"])


def _tested(heads: pd.DataFrame, role: Role) -> bool:
    """Whether the run tested its roles on held-out inputs: the evidence column is there, some head
    holds a tested role (``<prefix>_role`` non-empty; a run with its validation off has the columns
    but no role in them) and the test measured an effect (``<prefix>_effect`` finite somewhere)."""
    if role.evidence is None or role.evidence not in heads.columns:
        return False
    prefix = role.evidence.removesuffix("_validated")
    labels, effect = f"{prefix}_role", f"{prefix}_effect"
    if labels in heads.columns and not heads[labels].fillna("").astype(str).str.len().gt(0).any():
        return False
    # a test with no usable input (e.g. no held-out needle recalled unmasked) has no effect: untested
    return effect not in heads.columns or bool(
        np.isfinite(pd.to_numeric(heads[effect], errors="coerce")).any()
    )


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() == "true"
    try:
        return bool(v) and not (isinstance(v, float) and np.isnan(v))
    except (TypeError, ValueError):
        return False


__all__ = [
    "KEYS",
    "Source",
    "atlas_analyses",
    "bos_text",
    "config_hash",
    "join",
    "metric_columns",
    "select_runs",
]
