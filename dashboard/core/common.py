"""What the views of analyses with an unsaved-result form share: reading a saved
:class:`~analyses.runstore.Run` and the :class:`~analyses.base.AnalysisResult` an analysis returns
alike (so a notebook can draw a result before saving it)."""

from __future__ import annotations

import math

import numpy as np
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


def has_tables(source: Source, names: frozenset[str]) -> bool:
    """Whether the source has every table in ``names``."""
    return names.issubset(source.table_names)


def array(source: Source, name: str, *, kind: str) -> np.ndarray:
    """Array ``name`` of a saved run or of an unsaved result; ``kind`` names the analysis in the
    error of a result without that array."""
    if isinstance(source, AnalysisResult):
        if name not in source.arrays:
            raise KeyError(f"this {kind} result has no array {name!r}")
        return np.asarray(source.arrays[name])
    return source.array(name)


def has_array(source: Source, name: str) -> bool:
    return name in source.array_names


def num(value: object, spec: str) -> str:
    """``value`` formatted with ``spec``, or "n/a" when it is missing or not finite."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "n/a"
    return format(x, spec) if math.isfinite(x) else "n/a"
