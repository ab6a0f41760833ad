"""``--run-missing``: run, with their fast presets, the analyses an atlas would join but has no run of."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from analyses import registry, runstore
from analyses.atlas.build import atlas_analyses, mismatch
from analyses.registry import Analysis
from probe.loading import LoadedModel


def preset(entry: Analysis) -> dict[str, Any] | None:
    """The fast preset ``--run-missing`` runs ``entry`` with: its demo settings, else its
    ``atlas_preset`` (None: it has neither)."""
    if entry.demo is not None:
        return dict(entry.demo)
    return None if entry.atlas_preset is None else dict(entry.atlas_preset)


def missing_analyses(model: LoadedModel, root: Any = None) -> tuple[list[Analysis], list[tuple[str, str]]]:
    """``(to run, not runnable)``: the atlas analyses of ``model``'s kind without an intact run of these
    weights and BOS policy under ``root``; those without a fast preset come with the reason."""
    have: set[str] = set()
    reference = model.describe()
    for summary in runstore.list_runs(root, model=model.name, verify=False):
        if summary.ok and summary.model == model.name and summary.analysis:
            run = runstore.open_run(summary.path, verify=False)
            if mismatch(run.manifest.model, reference) is None:
                have.add(registry.canonical(summary.analysis))
    todo, cannot = [], []
    for entry in atlas_analyses(model.kind):
        if entry.name in have:
            continue
        if preset(entry) is None:
            cannot.append((entry.name, entry.opt_outs.get("demo", "no fast preset")))
        else:
            todo.append(entry)
    return todo, cannot


def run_missing(model: LoadedModel, root: Any = None, echo: Callable[[str], None] = print) -> list[Path]:
    """Run every analysis :func:`missing_analyses` finds, with its preset, saving each run; say which
    could not be run and why. Returns the new runs' directories."""
    from analyses.base import config_from_overrides

    todo, cannot = missing_analyses(model, root)
    for name, why in cannot:
        echo(
            f"  not run: {name} (no fast preset: {why}); run it with `headlab run {name} --model {model.name}`"
        )
    paths = []
    for i, entry in enumerate(todo, 1):
        settings = preset(entry) or {}
        shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
        echo(f"[{i}/{len(todo)}] {entry.name} on {model.name} ({shown})")
        t0 = time.perf_counter()
        result = entry.run(model, config_from_overrides(entry.config_cls, settings))
        paths.append(result.save(root))
        echo(f"      saved {paths[-1].name} in {time.perf_counter() - t0:.0f} s")
    return paths


__all__ = ["missing_analyses", "preset", "run_missing"]
