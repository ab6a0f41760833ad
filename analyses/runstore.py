"""The run store: one directory per analysis run, written atomically and checked when read.

Background
----------
The run store is the only thing the dashboard, the reports and the head atlas read, so
a run must be complete, self-describing and checkable. A run is one directory under the runs root
(``$HEADLAB_RUNS``, else ``./runs``) named ``<UTC YYYYmmdd-HHMMSS>-<analysis>-<model>-<4 hex>``::

    runs/20250101-120000-sinks-smollm2-135m-3fa2/
        manifest.json        what was run, on what, with what; size and sha256 of every file
        heads.parquet        one row per head (every analysis writes it; the atlas joins on it)
        <table>.parquet      other tidy tables
        arrays/<name>.npy    small numpy arrays

What a manifest records: everything needed to reproduce and compare the run. The model
(``LoadedModel.describe()``: name, source, weight sha256, dtype, device, BOS policy, shapes), the
analysis config as plain JSON, the seeds, the versions of python and the key packages, the code
revision of headlab (git commit, with ``-dirty`` when the tree had uncommitted changes), timings,
free-form notes, and for every table its rows and columns and for every array its shape and dtype,
each with the size and sha256 of its file.

Why runs are atomic: a run is written into a hidden temporary directory ``.<run_id>.tmp`` inside the
root, flushed to disk, and renamed into place only once every table, array and the manifest are
written. A crash, a Ctrl-C or a table that cannot be serialised therefore leaves either a complete
run or nothing (the temporary directory is removed on any error), never a half-written directory
that the dashboard would show as a result. Readers skip hidden directories. A visible run whose
files no longer match its manifest (deleted, truncated or edited afterwards) is reported as damaged
with the fix, never read silently.

Stale temporaries: a writer killed outright (``kill -9``, out of memory, power loss) cannot remove
its temporary directory. While it writes, the writer holds a lock inside it
(:mod:`probe.tempdirs`: a lock file with its pid, host and start time, flocked for as long as it
lives), so a temporary whose lock is no longer held, or one without a lock untouched for a while,
is known to be dead. :func:`write_run` removes such leftovers before it writes, and ``headlab runs``
removes them and says so (:func:`remove_stale_temporaries`); a live writer's temporary is never
touched.

What is trusted: nothing read from a run is used as a path before it is checked. Names in a
manifest (run id, analysis, tables, arrays) must be plain names (letters, digits, ``_``, ``-``); a
run directory must lie inside the root that lists it, and its files inside the run directory (a
symbolic link out of either makes the run damaged). A heads table in which some head has no number
at all (every metric column NaN: the model produced non-finite attention) is refused when saving
(:func:`write_run`, ``nan_ok``). A run records the package versions it was made with;
:func:`version_differences` lists those that differ from the ones installed now.

Usage
-----
::

    from analyses import runstore

    path = runstore.write_run(
        None,                                 # root: $HEADLAB_RUNS or ./runs
        analysis="sinks",
        model_info=model.describe(),
        config=cfg,                           # a dataclass or a mapping
        tables={"heads": heads_df, "positions": pos_df},
        arrays={"first_token_mass": mass},
        seeds={"data": 0},
        timings={"capture": 12.3},
    )
    run = runstore.open_run(runstore.resolve_run("latest:sinks"))
    run.heads                                 # the heads table, a DataFrame
    print(runstore.format_runs_table(runstore.list_runs(model="smollm2-135m")))
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
import secrets
import subprocess
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd

from analyses import registry
from probe import tempdirs
from probe.cache import sha256_file
from probe.errors import ConfigError, RunStoreError
from probe.tempdirs import StaleTemp

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
TEMP_GLOB = ".*.tmp"
"""The hidden temporaries of runs being written: ``.<run_id>.tmp``."""
ID_COLUMNS = ("layer", "head", "kv_head")
"""Columns of a heads table that say which head a row is, rather than measure it."""
_STAMP_RE = re.compile(r"(\d{8}-\d{6})-")
_SOURCE_TREE = Path(__file__).resolve().parent.parent
_FIX_DAMAGED = "re-run the analysis, or remove the directory"
_FIX_NOT_A_RUN = (
    "pass a run id, a unique prefix of one, 'latest', or the directory of a run "
    "(list the runs with `headlab runs`)"
)


# ---------------------------------------------------------------------------------------- manifest


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


# ---------------------------------------------------------------------------------------- helpers


def runs_root(root: StrPath | None = None) -> Path:
    """``root`` if given, else ``$HEADLAB_RUNS``, else ``./runs``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("HEADLAB_RUNS")
    return Path(env).expanduser() if env else Path("runs")


def check_root(root: StrPath | None = None) -> Path:
    """The runs root (:func:`runs_root`), checked to be usable before any work is done.

    It must be a directory that a file can be created in, or not exist yet under a directory that
    does (it is then made when the first run is written; nothing is created here but a probe file,
    removed at once). Raises :class:`RunStoreError` saying what is wrong and how to fix it.
    """
    base = runs_root(root)
    fix = "choose another root (--root, or HEADLAB_RUNS)"
    if base.is_symlink() and not base.exists():
        raise RunStoreError(f"the runs root {base} is a broken symbolic link; fix the link, or {fix}")
    if base.exists() and not base.is_dir():
        raise RunStoreError(f"the runs root {base} is a file, not a directory; {fix}")
    existing = base
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise RunStoreError(f"the runs root {base} cannot be created: {existing} is a file; {fix}")
    try:
        tempdirs.check_writable(existing)
    except OSError as err:
        where = "" if existing == base else f" (nor can it be created in {existing})"
        raise RunStoreError(
            f"cannot write into the runs root {base}{where}: {err.strerror or err}; fix its permissions, "
            f"or {fix}"
        ) from err
    return base


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


def code_revision(source_dir: StrPath | None = None) -> str | None:
    """The git commit of the headlab source tree, ``+ "-dirty"`` when it has uncommitted changes.

    None when the tree is not a git checkout (e.g. an installed wheel), git is missing or fails.
    Never raises. Git is run read-only, without taking optional locks.
    """
    directory = Path(source_dir) if source_dir is not None else _SOURCE_TREE
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(directory), *args],
                capture_output=True,
                text=True,
                timeout=20,
                env=env,
                check=False,
            )
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        return done.stdout if done.returncode == 0 else None

    if not directory.is_dir():
        return None
    # The tree must itself be in the repository (not, say, a site-packages inside an unrelated one).
    tracked = git("ls-files", "--", "analyses/__init__.py") if source_dir is None else git("ls-files")
    if not tracked or not tracked.strip():
        return None
    head = git("rev-parse", "--verify", "HEAD")
    if head is None or not re.fullmatch(r"[0-9a-f]{40,64}", head.strip()):
        return None
    status = git("status", "--porcelain", "--", ".")
    dirty = status is None or bool(status.strip())  # status failed: do not claim a clean tree
    return head.strip() + ("-dirty" if dirty else "")


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk (best effort: some platforms cannot open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_run_id(base: Path, analysis: str, model: str, now: datetime) -> str:
    stamp = now.strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        run_id = f"{stamp}-{analysis}-{sanitise(model)}-{secrets.token_hex(2)}"
        if not (base / run_id).exists() and not (base / f".{run_id}.tmp").exists():
            return run_id
    raise RunStoreError(
        f"could not find a free run id under {base}; remove stale runs or choose another root"
    )


# ---------------------------------------------------------------------------------------- writing


def _nan_heads(heads: pd.DataFrame, nan_ok: Collection[str], model_name: str) -> str | None:
    """Why ``heads`` must not be saved, or None: some head has NaN in every metric column.

    Metric columns are the floating-point columns other than :data:`ID_COLUMNS`, standard errors
    (``*_sem``, which say how sure a measurement is, not what it is) and those declared in
    ``nan_ok``. A column may be NaN for some heads (a score defined only for tested heads), but a
    head with no number at all was not measured: the model produced non-finite attention.
    """
    metrics = [
        c
        for c in heads.columns
        if c not in ID_COLUMNS
        and c not in nan_ok
        and not str(c).endswith("_sem")
        and pd.api.types.is_float_dtype(heads[c])
    ]
    if not metrics or heads.empty:
        return None
    values = heads[metrics].to_numpy(dtype=np.float64)
    empty = np.isnan(values).all(axis=1)
    if not empty.any():
        return None
    if {"layer", "head"} <= set(heads.columns):
        rows = heads.loc[empty, ["layer", "head"]].head(4)
        examples = ", ".join(f"L{layer}H{head}" for layer, head in rows.itertuples(index=False))
    else:
        examples = ", ".join(f"row {i}" for i in np.flatnonzero(empty)[:4])
    counts = np.isnan(values).sum(axis=0)
    per_column = ", ".join(f"{c!r} {n}" for c, n in zip(metrics, counts, strict=True) if n)[:300]
    return (
        f"the heads table has NaN in every metric column for {int(empty.sum())} of {len(heads)} heads "
        f"(e.g. {examples}; NaN heads per column: {per_column}): the model produced non-finite "
        f"attention, so nothing was measured there; check its weights (for a catalogue model: "
        f"`headlab fetch {model_name} --force`) and run in float32 (--dtype float32), or, for a column "
        "that may be NaN for some heads, declare it in nan_ok"
    )


def write_run(
    root: StrPath | None,
    *,
    analysis: str,
    model_info: Mapping[str, Any],
    config: Any,
    tables: Mapping[str, pd.DataFrame],
    arrays: Mapping[str, np.ndarray] | None = None,
    seeds: Mapping[str, Any] | None = None,
    timings: Mapping[str, Any] | None = None,
    notes: Mapping[str, Any] | None = None,
    nan_ok: Collection[str] = (),
) -> Path:
    """Write one run under ``root`` (None: :func:`runs_root`) atomically; return its directory.

    ``model_info`` is ``LoadedModel.describe()``; ``config`` a dataclass instance or a mapping
    (stored as plain JSON, see :func:`to_jsonable`). ``tables`` must not be empty; names (tables,
    arrays, the analysis) are letters, digits, ``_`` and ``-``. On any error nothing is left behind.

    The root is checked (:func:`check_root`) before anything is written. A ``heads`` table in which
    some head has NaN in every metric column is refused (:class:`RunStoreError`): the model produced
    non-finite attention. ``nan_ok`` names heads-table columns that may be NaN, which that check
    leaves out. Before writing, temporaries of earlier writers that died are removed
    (:func:`remove_stale_temporaries`); while writing, the temporary holds a lock that tells
    others this writer is alive.
    """
    _check_name("analysis", analysis)
    if not isinstance(model_info, Mapping):
        raise ConfigError(
            f"model_info must be a mapping, not {type(model_info).__qualname__}; pass model.describe()"
        )
    model = to_jsonable(model_info, "model_info")
    model_name = model.get("name")
    if not isinstance(model_name, str) or not model_name:
        raise ConfigError("model_info has no 'name'; pass model.describe() of the loaded model")
    config_json = _config_dict(config)
    extras = {
        key: to_jsonable(dict(value or {}), key)
        for key, value in (("seeds", seeds), ("timings", timings), ("notes", notes))
    }
    if not isinstance(tables, Mapping) or not tables:
        raise ConfigError("a run needs at least one table; pass tables={'heads': heads_df, ...}")
    arrays = arrays or {}
    for kind, items, typ, fix in (
        ("table", tables, pd.DataFrame, "pass a pandas DataFrame"),
        ("array", arrays, np.ndarray, "convert it with np.asarray"),
    ):
        lowered: dict[str, str] = {}
        for name, item in items.items():
            _check_name(kind, name)
            if name.lower() in lowered:
                raise ConfigError(
                    f"{kind} names {lowered[name.lower()]!r} and {name!r} differ only in case, which "
                    "some file systems cannot tell apart; rename one"
                )
            lowered[name.lower()] = name
            if not isinstance(item, typ):
                raise ConfigError(f"{kind} {name!r} is a {type(item).__qualname__}; {fix}")
    for name, df in tables.items():
        bad = [c for c in df.columns if not isinstance(c, str)]
        if bad:
            raise ConfigError(
                f"table {name!r} has non-string column names {bad[:5]!r}; Parquet needs string names "
                "(e.g. df.columns = df.columns.map(str))"
            )
    for name, arr in arrays.items():
        if arr.dtype.hasobject:
            raise ConfigError(
                f"array {name!r} has dtype {arr.dtype} (Python objects), which is not stored; "
                "give it a numeric or fixed-width string dtype, or store it as a table"
            )
    if "heads" in tables:
        problem = _nan_heads(tables["heads"], nan_ok, model_name)
        if problem is not None:
            raise RunStoreError(f"refusing to save the {analysis} run of {model_name}: {problem}")

    base = check_root(root)
    now = datetime.now(UTC)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunStoreError(
            f"cannot create the runs root {base}: {err}; choose a writable directory (HEADLAB_RUNS)"
        ) from err
    remove_stale_temporaries(base)
    run_id = _new_run_id(base, analysis, model_name, now)
    final = base / run_id
    try:
        with tempdirs.locked_tempdir(base, "", name=f".{run_id}.tmp") as tmp:
            table_meta, array_meta = _write_data(tmp, tables, arrays)
            manifest = RunManifest(
                run_id=run_id,
                analysis=analysis,
                created=now.isoformat(),
                model=model,
                config=config_json,
                seeds=extras["seeds"],
                package_versions=package_versions(),
                code_revision=code_revision(),
                timings=extras["timings"],
                tables=table_meta,
                arrays=array_meta,
                notes=extras["notes"],
            )
            (tmp / MANIFEST).write_text(manifest.to_json())
            _fsync(tmp / MANIFEST)
            _fsync(tmp)
            if final.exists():
                raise RunStoreError(f"run directory {final} appeared while writing; write the run again")
            tempdirs.publish(tmp, final)
            _fsync(base)
    except OSError as err:
        raise RunStoreError(
            f"could not write run {run_id} under {base}: {err}; check that the directory is writable "
            "and has free space, or choose another root (HEADLAB_RUNS)"
        ) from err
    return final


def _write_data(
    tmp: Path, tables: Mapping[str, pd.DataFrame], arrays: Mapping[str, np.ndarray]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Write the tables and arrays into ``tmp``, flushed; return their manifest entries."""
    table_meta: dict[str, dict[str, Any]] = {}
    for name, df in tables.items():
        path = tmp / f"{name}{TABLE_SUFFIX}"
        try:
            df.to_parquet(path, engine="pyarrow")
        except (ValueError, TypeError, NotImplementedError) as err:
            raise ConfigError(
                f"table {name!r} cannot be written as Parquet ({type(err).__name__}: {err}); give "
                "each column one plain type (numbers, strings, booleans), e.g. convert mixed "
                "object columns with .astype(str)"
            ) from err
        _fsync(path)
        table_meta[name] = {
            "rows": len(df),
            "columns": [str(c) for c in df.columns],
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    array_meta: dict[str, dict[str, Any]] = {}
    if arrays:
        (tmp / ARRAYS_DIR).mkdir()
    for name, arr in arrays.items():
        path = tmp / ARRAYS_DIR / f"{name}{ARRAY_SUFFIX}"
        np.save(path, arr, allow_pickle=False)
        _fsync(path)
        array_meta[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    if arrays:
        _fsync(tmp / ARRAYS_DIR)
    return table_meta, array_meta


def remove_stale_temporaries(root: StrPath | None = None) -> list[StaleTemp]:
    """Remove the temporaries (``.<run_id>.tmp``) under ``root`` whose writer is gone; return them.

    A temporary is stale when its lock is no longer held (its writer died, e.g. ``kill -9``), or
    when it has no lock and was not touched for :data:`probe.tempdirs.GRACE_S` seconds. One that a
    live writer holds, or one written from another host, is left alone. Never raises: a root that
    cannot be read or changed yields what could be removed.
    """
    try:
        return tempdirs.remove_stale(runs_root(root), TEMP_GLOB)
    except OSError:
        return []


def temporaries(root: StrPath | None = None) -> list[tuple[Path, str]]:
    """The temporaries still under ``root``, each with what is known of it (for ``headlab runs``)."""
    base = runs_root(root)
    try:
        stale = {t.path: t for t in tempdirs.stale_tempdirs(base, TEMP_GLOB)}
        found = sorted(p for p in base.glob(TEMP_GLOB) if p.is_dir() and not p.is_symlink())
    except OSError:
        return []
    result = []
    for path in found:
        if path in stale:
            result.append((path, f"stale ({stale[path].why}) but could not be removed; remove it by hand"))
        else:
            result.append((path, "being written by a live process (or from another host); left alone"))
    return result


# ---------------------------------------------------------------------------------------- reading


def _looks_like_a_run(directory: Path) -> bool:
    """Whether a directory without a manifest was a run (so it is damaged) or never was one."""
    if _STAMP_RE.match(directory.name) or (directory / ARRAYS_DIR).is_dir():
        return True
    try:
        return any(p.suffix == TABLE_SUFFIX for p in directory.iterdir())
    except OSError:
        return False


def _inside(path: Path, holder: Path) -> bool:
    """Whether ``path``, links followed, lies strictly inside ``holder`` (links followed)."""
    try:
        real, real_holder = path.resolve(), holder.resolve()
    except (OSError, RuntimeError):  # a link loop, an unreadable directory
        return False
    return real != real_holder and real.is_relative_to(real_holder)


def _check_contained(directory: Path, root: Path | None) -> None:
    """The run directory must lie inside the root listing it (default: the directory holding it)."""
    holder = Path(os.path.abspath(root)) if root is not None else Path(os.path.abspath(directory)).parent
    if not _inside(directory, holder):
        try:
            where = str(directory.resolve())
        except (OSError, RuntimeError):
            where = "a link loop"
        raise _Damage(
            f"the run directory is a symbolic link to {where}, outside {holder}",
            "open the run at its real location, or copy it (not a link to it) under the root",
        )


def _load_manifest(directory: Path) -> RunManifest:
    path = directory / MANIFEST
    if not path.is_file() and not path.is_symlink():
        if not _looks_like_a_run(directory):
            raise _Damage(f"it has no {MANIFEST} and none of a run's files", _FIX_NOT_A_RUN, not_a_run=True)
        raise _Damage(f"{MANIFEST} is missing (the run was not written by headlab, or it was deleted)")
    if not _inside(path, directory):
        raise _Damage(f"{MANIFEST} is a symbolic link out of the run directory")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise _Damage(f"{MANIFEST} cannot be read ({err})") from None
    return _parse_manifest(text)


def _check_files(directory: Path, manifest: RunManifest, *, verify: bool) -> None:
    entries = [("table", f"{name}{TABLE_SUFFIX}", meta) for name, meta in manifest.tables.items()] + [
        ("array", f"{ARRAYS_DIR}/{name}{ARRAY_SUFFIX}", meta) for name, meta in manifest.arrays.items()
    ]
    if manifest.arrays and not _inside(directory / ARRAYS_DIR, directory):
        raise _Damage(f"{ARRAYS_DIR}/ is a symbolic link out of the run directory")
    for kind, rel, meta in entries:
        path = directory / rel
        if (path.is_symlink() or path.exists()) and not _inside(path, directory):
            raise _Damage(f"{kind} file {rel} is a symbolic link out of the run directory")
        if not path.is_file():
            raise _Damage(f"{kind} file {rel} listed in {MANIFEST} is missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise _Damage(f"{kind} file {rel} has {size} bytes but {MANIFEST} says {meta['bytes']}")
        if verify and sha256_file(path) != meta["sha256"]:
            raise _Damage(
                f"{kind} file {rel} does not match its sha256 in {MANIFEST} (it changed after the run was written)"
            )


def _error(directory: Path, damage: _Damage) -> RunStoreError:
    if damage.not_a_run:
        return RunStoreError(f"{directory} is not a run directory: {damage.why}; {damage.fix}")
    return RunStoreError(f"run {directory.name} ({directory}) is unusable: {damage.why}; {damage.fix}")


class Run:
    """An opened, checked run directory. Tables and arrays are read lazily and cached."""

    def __init__(self, path: Path, manifest: RunManifest) -> None:
        self.path = path
        self.manifest = manifest
        self._tables: dict[str, pd.DataFrame] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._config: Any = None

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, analysis={self.analysis!r}, model={self.model_name!r}, path={str(self.path)!r})"

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    @property
    def analysis(self) -> str:
        return self.manifest.analysis

    @property
    def model_name(self) -> str:
        return self.manifest.model_name

    @property
    def table_names(self) -> list[str]:
        return list(self.manifest.tables)

    @property
    def array_names(self) -> list[str]:
        return list(self.manifest.arrays)

    @property
    def heads(self) -> pd.DataFrame:
        """The ``heads`` table: one row per head with its summary metrics."""
        return self.table("heads")

    @property
    def notes(self) -> dict[str, Any]:
        return dict(self.manifest.notes)

    @property
    def config(self) -> Any:
        """The run's config as its analysis's typed dataclass (defaults for settings the run predates)."""
        if self._config is None:
            if self.analysis not in registry.ANALYSES:
                raise ConfigError(
                    f"run {self.run_id} is of analysis {self.analysis!r}, which this headlab does not "
                    f"know (known: {', '.join(registry.ANALYSES)}); open it with the version that wrote it"
                )
            entry = registry.ANALYSES[self.analysis]
            self._config = registry.config_from_saved(entry.config_cls, self.manifest.config)
        return self._config

    def _unknown(self, kind: str, name: str, known: list[str]) -> ConfigError:
        return ConfigError(
            f"run {self.run_id} has no {kind} {name!r}; its {kind}s are: {', '.join(known) or '(none)'}"
        )

    def table(self, name: str) -> pd.DataFrame:
        """The table ``name`` (a copy: changing it does not change the cached one)."""
        if name not in self.manifest.tables:
            raise self._unknown("table", name, self.table_names)
        if name not in self._tables:
            path = self.path / f"{name}{TABLE_SUFFIX}"
            try:
                df = pd.read_parquet(path, engine="pyarrow")
            except Exception as err:
                raise _error(self.path, _Damage(f"table file {path.name} cannot be read ({err})")) from err
            if len(df) != self.manifest.tables[name]["rows"]:
                raise _error(
                    self.path,
                    _Damage(
                        f"table {name} has {len(df)} rows but {MANIFEST} says {self.manifest.tables[name]['rows']}"
                    ),
                )
            self._tables[name] = df
        return self._tables[name].copy()

    def array(self, name: str) -> np.ndarray:
        """The array ``name`` (a copy)."""
        if name not in self.manifest.arrays:
            raise self._unknown("array", name, self.array_names)
        if name not in self._arrays:
            path = self.path / ARRAYS_DIR / f"{name}{ARRAY_SUFFIX}"
            try:
                arr = np.load(path, allow_pickle=False)
            except Exception as err:
                raise _error(
                    self.path, _Damage(f"array file {ARRAYS_DIR}/{path.name} cannot be read ({err})")
                ) from err
            meta = self.manifest.arrays[name]
            if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
                raise _error(
                    self.path,
                    _Damage(
                        f"array {name} is {arr.dtype}{list(arr.shape)} but {MANIFEST} says "
                        f"{meta['dtype']}{meta['shape']}"
                    ),
                )
            self._arrays[name] = arr
        return self._arrays[name].copy()


def open_run(path: StrPath, *, verify: bool = True, root: StrPath | None = None) -> Run:
    """Open the run directory ``path`` after checking it.

    Checks that the manifest is present, parses, has a supported schema version, and that every
    table and array it lists exists with the recorded size and (``verify=True``) sha256.
    ``verify=False`` skips the hashing. The directory must lie inside ``root`` (default: the
    directory holding ``path``, as named) and its files inside it: a symbolic link out of either
    makes the run damaged. Any problem raises :class:`RunStoreError` with the fix.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        raise RunStoreError(
            f"no run directory at {directory}; check the path, or list runs with `headlab runs`"
        )
    if not directory.is_dir():
        raise RunStoreError(f"{directory} is a file, not a run directory; pass the run's directory")
    try:
        _check_contained(directory, None if root is None else Path(root).expanduser())
        manifest = _load_manifest(directory)
        _check_files(directory, manifest, verify=verify)
    except _Damage as damage:
        raise _error(directory, damage) from None
    return Run(directory, manifest)


# ---------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class RunSummary:
    """One line of :func:`list_runs`; fields the manifest would give are None for a damaged run."""

    run_id: str  # the directory's name under the root: what `headlab report` and resolve_run take
    analysis: str | None
    model: str | None
    created: str | None
    n_heads: int | None  # rows of the heads table
    path: Path
    status: str  # "ok", "damaged: <why>", or "not a run: <why>" (a directory that never was one)
    recorded_id: str | None = None  # the run id in the manifest; differs from run_id for a copy

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def damaged(self) -> bool:
        return self.status.startswith("damaged")

    @property
    def note(self) -> str:
        """Says "copied/renamed from <id>" when the manifest names another run id than the directory."""
        if self.recorded_id is None or self.recorded_id == self.run_id:
            return ""
        return f"copied/renamed from {self.recorded_id}"


def _summarise(directory: Path, *, verify: bool, root: Path | None = None) -> RunSummary:
    def unusable(damage: _Damage) -> RunSummary:
        kind = "not a run" if damage.not_a_run else "damaged"
        return RunSummary(directory.name, None, None, None, None, directory, f"{kind}: {damage.why}")

    try:
        _check_contained(directory, root)
        manifest = _load_manifest(directory)
    except _Damage as damage:
        return unusable(damage)
    try:
        _check_files(directory, manifest, verify=verify)
        status = "ok"
    except _Damage as damage:
        status = f"damaged: {damage.why}"
    heads = manifest.tables.get("heads", {}).get("rows")
    return RunSummary(
        run_id=directory.name,
        analysis=manifest.analysis,
        model=manifest.model_name,
        created=manifest.created,
        n_heads=heads if isinstance(heads, int) else None,
        path=directory,
        status=status,
        recorded_id=manifest.run_id,
    )


def _when(summary: RunSummary) -> float:
    if summary.created is not None:
        when = datetime.fromisoformat(summary.created)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    stamp = _STAMP_RE.match(summary.path.name)
    if stamp:
        try:
            return datetime.strptime(stamp.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=UTC).timestamp()
        except ValueError:
            pass
    try:
        return summary.path.stat().st_mtime
    except OSError:
        return 0.0


def _run_dirs(base: Path) -> list[Path]:
    if not base.is_dir():
        return []
    return [p for p in base.iterdir() if not p.name.startswith(".") and p.is_dir()]


def list_runs(
    root: StrPath | None = None,
    *,
    analysis: str | None = None,
    model: str | None = None,
    verify: bool = True,
) -> list[RunSummary]:
    """Every run under ``root``, newest first, optionally of one analysis and/or model.

    Damaged runs are listed with ``status="damaged: <why>"`` rather than raised (a run directory
    that is a symbolic link out of the root, or holds one out of itself, is damaged), and
    directories that are no runs at all with ``"not a run: <why>"``; hidden directories
    (temporaries of runs being written) are skipped. ``verify=False`` compares sizes only, without
    hashing every file. A root that does not exist holds no runs. Nothing is changed on disk (see
    :func:`remove_stale_temporaries`).
    """
    summaries = []
    base = runs_root(root)
    for directory in _run_dirs(base):
        summary = _summarise(directory, verify=verify, root=base)
        if analysis is not None:
            if summary.analysis is not None and summary.analysis != analysis:
                continue
            if summary.analysis is None and f"-{analysis}-" not in directory.name:
                continue
        if model is not None:
            if summary.model is not None and model not in (summary.model, sanitise(summary.model)):
                continue
            if summary.model is None and f"-{sanitise(model)}-" not in directory.name:
                continue
        summaries.append(summary)
    summaries.sort(key=lambda s: (_when(s), s.run_id), reverse=True)
    return summaries


def resolve_run(ref: StrPath, root: StrPath | None = None) -> Path:
    """The run directory that ``ref`` names.

    ``ref`` is a path to a run directory; a run id or a unique prefix of one under ``root``; or
    ``"latest"`` / ``"latest:<analysis>"`` (the newest intact run). Unknown or ambiguous references
    raise :class:`RunStoreError` listing candidates. The result is not opened: use :func:`open_run`.
    """
    base = runs_root(root)
    text = os.fspath(ref).strip()
    if not text:
        raise ConfigError("empty run reference; pass a run id, a prefix of one, a path, or 'latest'")
    if isinstance(ref, os.PathLike) or os.sep in text or (os.altsep and os.altsep in text) or text[0] in ".~":
        path = Path(text).expanduser()
        if not path.is_dir():
            raise RunStoreError(
                f"no run directory at {path}; check the path, or pass a run id (list them with `headlab runs`)"
            )
        return path
    if text == "latest" or text.startswith("latest:"):
        wanted = text.partition(":")[2] or None
        if wanted is not None:
            _check_name("analysis", wanted)
        summaries = list_runs(base, analysis=wanted, verify=False)
        for summary in summaries:
            if summary.ok:
                return summary.path
        what = f"{wanted} run" if wanted else "run"
        damaged_runs = [s for s in summaries if s.damaged]
        if damaged_runs:
            damaged = ", ".join(s.run_id for s in damaged_runs[:5])
            raise RunStoreError(
                f"no intact {what} under {base}; damaged: {damaged}; re-run the analysis, or remove them"
            )
        raise RunStoreError(
            f"no {what} under {base}; run an analysis first, or point HEADLAB_RUNS at the directory "
            "holding your runs"
        )
    names = sorted((p.name for p in _run_dirs(base)), reverse=True)
    if text in names:
        return base / text
    matches = [name for name in names if name.startswith(text)]
    if len(matches) == 1:
        return base / matches[0]
    if matches:
        shown = ", ".join(matches[:10]) + (f" (and {len(matches) - 10} more)" if len(matches) > 10 else "")
        raise RunStoreError(
            f"run reference {text!r} is ambiguous: it matches {len(matches)} runs under {base}: {shown}; "
            "give more characters of the run id"
        )
    local = Path(text)
    if local.is_dir():
        return local
    known = f"the newest are: {', '.join(names[:5])}" if names else "there are no runs there"
    raise RunStoreError(
        f"no run matches {text!r} under {base} ({known}); pass a run id or a unique prefix of one "
        "(see `headlab runs`), a run directory, or 'latest'"
    )


def format_runs_table(summaries: Sequence[RunSummary]) -> str:
    """A plain-text table of runs for ``headlab runs``.

    The first column is the directory name, which ``headlab report`` takes; a ``note`` column says
    when the manifest records another run id (a copied or renamed run).
    """
    if not summaries:
        return "(no runs)"
    columns = ["run_id", "analysis", "model", "created (UTC)", "heads", "status"]
    notes = any(s.note for s in summaries)
    rows = []
    for s in summaries:
        created = ""
        if s.created is not None:
            created = datetime.fromisoformat(s.created).strftime("%Y-%m-%d %H:%M:%S")
        rows.append(
            [
                s.run_id,
                s.analysis or "?",
                s.model or "?",
                created,
                "" if s.n_heads is None else str(s.n_heads),
                s.status,
                *([s.note] if notes else []),
            ]
        )
    if notes:
        columns.append("note")
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
