"""What every analysis shares: its result type and typed configs settable from the CLI.

An analysis is a function ``run(model, config) -> AnalysisResult``: tidy tables (``heads`` is one
row per head, so the head atlas can join analyses), small arrays, and timings. It never writes
files; :meth:`AnalysisResult.save` hands everything to the run store.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses import registry, runstore
from probe.errors import ConfigError
from probe.loading import LoadedModel


@dataclass
class AnalysisResult:
    analysis: str
    model_info: dict[str, Any]
    config: Any
    tables: dict[str, pd.DataFrame]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    # heads-table columns that may be NaN for some heads, left out of the check that refuses a
    # heads table in which a head has no number at all (see runstore.write_run)
    nan_ok: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # the config is always the analysis's typed dataclass (a mapping is read as one), so views
        # read `result.config.x` from a fresh result as from a saved run
        if isinstance(self.config, Mapping) and self.analysis in registry.ANALYSES:
            self.config = registry.config_from_saved(registry.ANALYSES[self.analysis].config_cls, self.config)

    @property
    def heads(self) -> pd.DataFrame:
        return self.tables["heads"]

    # the read interface a saved run (analyses.runstore.Run) has too, so views take either

    @property
    def model_name(self) -> str:
        return str(self.model_info.get("name", "?"))

    @property
    def table_names(self) -> list[str]:
        return list(self.tables)

    @property
    def array_names(self) -> list[str]:
        return list(self.arrays)

    def table(self, name: str) -> pd.DataFrame:
        """The table ``name`` (a copy)."""
        if name not in self.tables:
            known = ", ".join(self.tables) or "(none)"
            raise ConfigError(f"this {self.analysis} result has no table {name!r}; its tables are: {known}")
        return self.tables[name].copy()

    def array(self, name: str) -> np.ndarray:
        """The array ``name`` (a copy)."""
        if name not in self.arrays:
            known = ", ".join(self.arrays) or "(none)"
            raise ConfigError(f"this {self.analysis} result has no array {name!r}; its arrays are: {known}")
        return np.array(self.arrays[name])

    def save(self, root: str | Path | None = None) -> Path:
        return runstore.write_run(
            root,
            analysis=self.analysis,
            model_info=self.model_info,
            config=self.config,
            tables=self.tables,
            arrays=self.arrays,
            seeds=self.seeds,
            timings=self.timings,
            notes=self.notes,
            nan_ok=self.nan_ok,
        )


def heads_frame(model: LoadedModel, columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """One row per (layer, head) with kv_head, from ``[n_layers, n_heads]`` arrays."""
    layers, heads = np.meshgrid(np.arange(model.n_layers), np.arange(model.n_heads), indexing="ij")
    frame = pd.DataFrame({"layer": layers.ravel(), "head": heads.ravel()})
    frame["kv_head"] = frame["head"] // model.group_size
    for name, values in columns.items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (model.n_layers, model.n_heads):
            raise ValueError(
                f"column {name} has shape {arr.shape}, expected {(model.n_layers, model.n_heads)}"
            )
        frame[name] = arr.ravel()
    return frame


def _coerce(value: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == value:
                return choice
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        if value.lower() == "none" and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _coerce(value, options[0], key)
    if origin in (list, tuple):
        element = args[0] if args else str
        items = [_coerce(v.strip(), element, key) for v in value.split(",") if v.strip()]
        return tuple(items) if origin is tuple else items
    try:
        if annotation is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, str):
            return annotation(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a valid {annotation.__name__}") from None
    return json.loads(value)


def config_from_overrides(cls: type[Any], overrides: list[str] | Mapping[str, Any] | None = None) -> Any:
    """Build config ``cls`` from ``key=value`` strings (CLI ``--set``) or a mapping, with validation."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    items: list[tuple[str, Any]]
    if overrides is None:
        items = []
    elif isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: write key=value, e.g. --set seed=1")
            k, v = item.split("=", 1)
            items.append((k.strip(), v.strip()))
    for key, raw in items:
        if key not in names:
            raise ConfigError(
                f"unknown setting {key!r} for {cls.__name__}; valid: {', '.join(sorted(names))}"
            )
        values[key] = _coerce(raw, hints[key], key) if isinstance(raw, str) else raw
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config
