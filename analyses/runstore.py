"""The run store: one directory per analysis run, written atomically and checked when read.

This module writes runs (:func:`write_run`) and cleans up after writers that died; it also
re-exports the manifest (:mod:`analyses.manifest`) and the readers (:mod:`analyses.runs`), so
``from analyses import runstore`` gives the whole interface::

    path = runstore.write_run(None, analysis="sinks", model_info=model.describe(), config=cfg,
                              tables={"heads": heads_df}, arrays={"first_token_mass": mass})
    run = runstore.open_run(runstore.resolve_run("latest:sinks"))

See docs/run-store.md for the layout of a run, atomic writes, damage checks and run references.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.manifest import (
    ARRAY_SUFFIX,
    ARRAYS_DIR,
    MANIFEST,
    PACKAGES,
    RUN_ID_RE,
    SCHEMA_VERSION,
    TABLE_SUFFIX,
    RunManifest,
    StrPath,
    _check_name,
    _config_dict,
    format_version_differences,
    package_versions,
    sanitise,
    to_jsonable,
    version_differences,
)
from analyses.runs import (
    Run,
    RunSummary,
    format_runs_table,
    list_runs,
    open_run,
    resolve_run,
    runs_root,
)
from probe import tempdirs
from probe.cache import sha256_file
from probe.errors import ConfigError, RunStoreError
from probe.tempdirs import StaleTemp

__all__ = [
    "ARRAYS_DIR",
    "ARRAY_SUFFIX",
    "ID_COLUMNS",
    "MANIFEST",
    "PACKAGES",
    "RUN_ID_RE",
    "SCHEMA_VERSION",
    "TABLE_SUFFIX",
    "TEMP_GLOB",
    "Run",
    "RunManifest",
    "RunSummary",
    "StrPath",
    "check_root",
    "code_revision",
    "format_runs_table",
    "format_version_differences",
    "git_output",
    "list_runs",
    "open_run",
    "package_versions",
    "remove_stale_temporaries",
    "resolve_run",
    "runs_root",
    "sanitise",
    "temporaries",
    "to_jsonable",
    "version_differences",
    "write_run",
]

TEMP_GLOB = ".*.tmp"
"""The hidden temporaries of runs being written: ``.<run_id>.tmp``."""
ID_COLUMNS = ("layer", "head", "kv_head")
"""Columns of a heads table that say which head a row is, rather than measure it."""
_SOURCE_TREE = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- root


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


def git_output(directory: Path, *args: str) -> str | None:
    """What ``git -C directory ARGS`` prints, run read-only (no optional locks); None when git is
    missing, fails or times out. Never raises."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
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


def code_revision(source_dir: StrPath | None = None) -> str | None:
    """The git commit of the headlab source tree, ``+ "-dirty"`` when it has uncommitted changes.

    None when the tree is not a git checkout (e.g. an installed wheel), git is missing or fails.
    Never raises. Git is run read-only, without taking optional locks.
    """
    directory = Path(source_dir) if source_dir is not None else _SOURCE_TREE

    def git(*args: str) -> str | None:
        return git_output(directory, *args)

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


def _check_tables_and_arrays(tables: Mapping[str, pd.DataFrame], arrays: Mapping[str, np.ndarray]) -> None:
    """Check what :func:`write_run` is given to store: plain names, no two that differ only in
    case, DataFrames with string column names, numpy arrays without Python objects."""
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
    _check_tables_and_arrays(tables, arrays)
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
