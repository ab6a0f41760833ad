"""What the views of analyses with an unsaved-result form share: reading a saved
:class:`~analyses.runstore.Run` and the :class:`~analyses.base.AnalysisResult` an analysis returns
alike (so a notebook can draw a result before saving it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pandas as pd

from analyses.base import AnalysisResult
from analyses.runstore import Run

Source = Run | AnalysisResult


def table(source: Source, name: str, *, kind: str) -> pd.DataFrame:
    """Table ``name`` of a saved run or of an unsaved result (a copy either way); ``kind`` names the
    analysis in the error of a result without that table."""
    if isinstance(source, AnalysisResult):
        if name not in source.tables:
            raise KeyError(f"this {kind} result has no table {name!r}; it has {', '.join(source.tables)}")
        return source.tables[name].copy()
    return source.table(name)


def table_names(source: Source) -> list[str]:
    return list(source.tables) if isinstance(source, AnalysisResult) else source.table_names


def config(source: Source) -> dict[str, Any]:
    """The run's config as plain values (the manifest's, or the result's dataclass)."""
    if isinstance(source, AnalysisResult):
        cfg = source.config
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            return dataclasses.asdict(cfg)
        return dict(cfg) if isinstance(cfg, Mapping) else {}
    return dict(source.manifest.config)
