"""Exporting an atlas: the heads table as CSV, and the whole atlas (heads, roles, provenance) as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probe.errors import ConfigError
from probe.tempdirs import write_text_atomic

JSON_TABLES = ("heads", "roles", "columns", "sources", "skipped")


def _plain(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def export_atlas(atlas: Any, out_dir: str | Path) -> list[Path]:
    """Write ``atlas-<model>.csv`` (the heads table) and ``atlas-<model>.json`` (heads, roles, column
    provenance, sources, skipped runs) under ``out_dir``; each file appears whole or not at all."""
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create the export folder {out}: {err.strerror}; pass a writable --export"
        ) from None
    stem = f"atlas-{atlas.model_name}".replace("/", "_")
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    heads = atlas.table("heads")
    write_text_atomic(csv_path, heads.to_csv(index=False))
    record = {
        "model": atlas.model_name,
        "run_id": getattr(atlas, "run_id", None),
        **{name: _records(atlas.table(name)) for name in JSON_TABLES},
    }
    write_text_atomic(json_path, json.dumps(record, indent=1, allow_nan=False) + "\n")
    return [csv_path, json_path]


def read_json_export(path: str | Path) -> dict[str, pd.DataFrame]:
    """The tables of a JSON export, as DataFrames (None read back as NaN in numeric columns)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {name: pd.DataFrame(data[name]) for name in JSON_TABLES}


__all__ = ["export_atlas", "read_json_export"]
