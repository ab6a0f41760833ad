"""The run manifest: what a run directory's ``manifest.json`` holds, and how it is checked.

Also the plain-JSON form of configs and model descriptions, the plain names runs and their files
may have, and the package versions a run records. :mod:`analyses.runstore` writes runs and
:mod:`analyses.runs` reads them. See docs/run-store.md.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import PurePath
from typing import Any

import numpy as np

from probe.errors import ConfigError, RunStoreError

StrPath = str | os.PathLike[str]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS_DIR = "arrays"
TABLE_SUFFIX = ".parquet"
ARRAY_SUFFIX = ".npy"
PACKAGES = ("torch", "transformers", "transformer-lens", "numpy", "pandas", "pyarrow", "headlab")

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")
"""What a run id may be: a plain name, never a path (``..``, separators or a leading dot)."""
_FIX_DAMAGED = "re-run the analysis, or remove the directory"


@dataclass
class RunManifest:
    """The contents of ``manifest.json`` (schema version 1)."""

    run_id: str
    analysis: str
    created: str  # ISO 8601, UTC
    model: dict[str, Any]
    config: dict[str, Any]
    seeds: dict[str, Any] = field(default_factory=dict)
    package_versions: dict[str, str | None] = field(default_factory=dict)
    code_revision: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def model_name(self) -> str:
        return str(self.model.get("name", "?"))

    def to_json(self) -> str:
        data: dict[str, Any] = {"schema_version": self.schema_version}
        data.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return json.dumps(data, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunManifest:
        """Parse and check a manifest; :class:`RunStoreError` says what is wrong with it."""
        try:
            return _parse_manifest(text)
        except _Damage as err:
            raise RunStoreError(f"invalid run manifest: {err.why}; {err.fix}") from None


class _Damage(Exception):
    """Internal: why a run directory is unusable, and the fix; turned into RunStoreError."""

    def __init__(self, why: str, fix: str = _FIX_DAMAGED, *, not_a_run: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.fix = fix
        self.not_a_run = not_a_run  # the directory is no run at all (nothing to re-run or remove)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "analysis": (str,),
    "created": (str,),
    "model": (dict,),
    "config": (dict,),
    "seeds": (dict,),
    "package_versions": (dict,),
    "code_revision": (str, type(None)),
    "timings": (dict,),
    "tables": (dict,),
    "arrays": (dict,),
    "notes": (dict,),
}


def _parse_manifest(text: str) -> RunManifest:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _Damage(
            f"{MANIFEST} is not valid JSON ({err.msg} at line {err.lineno}); it was truncated or edited"
        ) from None
    if not isinstance(data, dict):
        raise _Damage(f"{MANIFEST} does not hold a JSON object")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _Damage(f"{MANIFEST} has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise _Damage(
            f"{MANIFEST} has schema version {version}, newer than this headlab reads ({SCHEMA_VERSION})",
            "upgrade headlab to read it, or re-run the analysis with this version",
        )
    if version < 1:
        raise _Damage(
            f"{MANIFEST} has schema version {version}, which this headlab does not read "
            f"(it reads {SCHEMA_VERSION})"
        )
    for name, types in _FIELD_TYPES.items():
        if name not in data or not isinstance(data[name], types):
            kind = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _Damage(f"{MANIFEST} field {name!r} is missing or not a {kind}")
    if not RUN_ID_RE.fullmatch(data["run_id"]):
        raise _Damage(
            f"{MANIFEST} field 'run_id' is not a plain name ({data['run_id'][:80]!r}): it was edited, "
            "and headlab never uses such a name as a file name"
        )
    if not _NAME_RE.fullmatch(data["analysis"]):
        raise _Damage(f"{MANIFEST} field 'analysis' is not a plain name ({data['analysis'][:80]!r})")
    try:
        datetime.fromisoformat(data["created"])
    except ValueError:
        raise _Damage(f"{MANIFEST} field 'created' is not an ISO timestamp: {data['created']!r}") from None
    if not data["tables"]:
        raise _Damage(f"{MANIFEST} lists no tables")
    for kind, entries, needs in (
        ("table", data["tables"], {"rows": int, "columns": list, "bytes": int, "sha256": str}),
        ("array", data["arrays"], {"shape": list, "dtype": str, "bytes": int, "sha256": str}),
    ):
        for name, entry in entries.items():
            if not _NAME_RE.fullmatch(name):
                raise _Damage(f"{MANIFEST} lists a {kind} with an invalid name {name!r}")
            if not isinstance(entry, dict) or any(
                not isinstance(entry.get(key), typ) for key, typ in needs.items()
            ):
                raise _Damage(f"{MANIFEST} entry for {kind} {name!r} lacks one of {', '.join(needs)}")
    fields = {name: data[name] for name in _FIELD_TYPES}
    return RunManifest(schema_version=version, **fields)


# ------------------------------------------------------------------------------------------ names


def sanitise(text: str, default: str = "model") -> str:
    """``text`` reduced to letters, digits, ``_`` and ``-`` (e.g. ``org/Model-1.5B`` -> ``org-Model-1-5B``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", text)
    cleaned = re.sub(r"-{2,}", "-", cleaned).strip("-")[:48].strip("-")
    return cleaned or default


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        hint = sanitise(str(name), default="name")
        raise ConfigError(
            f"invalid {kind} name {name!r}: use 1-64 letters, digits, '_' or '-' (e.g. {hint!r})"
        )
    return name


def _json_key(key: object, where: str) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float | np.integer | np.floating):
        return json.dumps(key.item() if isinstance(key, np.generic) else key)
    raise ConfigError(
        f"{where} has a key of type {type(key).__qualname__} ({key!r}); JSON keys must be strings, "
        "so use str keys"
    )


# ------------------------------------------------------------------------------------------- JSON


def to_jsonable(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON data: dataclasses -> dicts, paths -> str, tuples/sets -> lists,
    numpy scalars/arrays -> numbers/lists, torch dtypes/devices -> ``"float32"``/``"cuda:0"``,
    enums -> their value, dates -> ISO strings, non-finite floats -> ``"nan"``/``"inf"``/``"-inf"``.

    Anything else raises :class:`ConfigError` naming where it is (``where``).
    """
    if value is None or isinstance(value, str | bool):
        return str(value) if isinstance(value, str) else value
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, where)
    if isinstance(value, np.generic):
        return to_jsonable(value.item(), where)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else repr(float(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Same result as dataclasses.asdict, without deep-copying every field first.
        return {
            f.name: to_jsonable(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {_json_key(k, where): to_jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        items = [to_jsonable(v, f"{where}[]") for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if type(value).__module__.split(".")[0] == "torch":
        if type(value).__name__ in ("dtype", "device"):
            return str(value).removeprefix("torch.")
        if hasattr(value, "tolist"):  # a tensor
            return to_jsonable(value.tolist(), where)
    raise ConfigError(
        f"{where} holds a {type(value).__qualname__}, which cannot be stored as JSON in the run manifest; "
        "convert it to a string, number, list or dict first"
    )


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if not (
        isinstance(config, Mapping) or (dataclasses.is_dataclass(config) and not isinstance(config, type))
    ):
        raise ConfigError(
            f"config must be a dataclass instance or a mapping, not {type(config).__qualname__}; "
            "pass the analysis config object"
        )
    result = to_jsonable(config, "config")
    assert isinstance(result, dict)
    return result


# --------------------------------------------------------------------------------------- versions


def package_versions() -> dict[str, str | None]:
    """Python's version and those of the packages a result depends on (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except Exception:  # not installed, or broken metadata: record it as unknown
            versions[dist] = None
    return versions


@functools.lru_cache(maxsize=1)
def _installed_versions() -> dict[str, str | None]:
    return package_versions()


def _version_of(dist: str) -> str | None:
    if dist == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(dist)
    except Exception:  # not installed, or broken metadata
        return None


def version_differences(
    manifest: RunManifest, installed: Mapping[str, str | None] | None = None
) -> list[tuple[str, str | None, str | None]]:
    """``(package, recorded, now)`` for every package whose version in ``manifest`` differs from
    the one installed now (``installed``: default :func:`package_versions`, read once per
    process); None means not installed. Empty when the run was made under the same versions."""
    now = dict(_installed_versions() if installed is None else installed)
    differences = []
    for dist, recorded in sorted(manifest.package_versions.items()):
        current = now[dist] if dist in now else _version_of(dist)
        recorded_text = None if recorded is None else str(recorded)
        if recorded_text != current:
            differences.append((dist, recorded_text, current))
    return differences


def format_version_differences(differences: Sequence[tuple[str, str | None, str | None]]) -> str:
    """``"torch 2.3.0 (now 2.4.1), numpy 1.26.4 (now 2.0.0)"``; "" when there are none."""
    return ", ".join(
        f"{dist} {recorded or 'not installed'} (now {current or 'not installed'})"
        for dist, recorded, current in differences
    )
