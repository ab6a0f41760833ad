"""Reading the run store: open a run directory after checking it, list runs, resolve a reference.

:class:`Run` is an opened run; it reads like an :class:`analyses.base.AnalysisResult` (``table``,
``array``, ``table_names``, ``array_names``, ``model_name``, ``notes``, a typed ``config``).
Damaged runs raise :class:`RunStoreError` with the fix, and are listed as damaged.
See docs/run-store.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses import registry
from analyses.manifest import (
    ARRAY_SUFFIX,
    ARRAYS_DIR,
    MANIFEST,
    TABLE_SUFFIX,
    RunManifest,
    StrPath,
    _check_name,
    _Damage,
    _parse_manifest,
    sanitise,
)
from probe.cache import sha256_file
from probe.errors import ConfigError, RunStoreError

_STAMP_RE = re.compile(r"(\d{8}-\d{6})-")
_FIX_NOT_A_RUN = (
    "pass a run id, a unique prefix of one, 'latest', or the directory of a run "
    "(list the runs with `headlab runs`)"
)


def runs_root(root: StrPath | None = None) -> Path:
    """``root`` if given, else ``$HEADLAB_RUNS``, else ``./runs``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("HEADLAB_RUNS")
    return Path(env).expanduser() if env else Path("runs")


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
    if analysis is not None:
        analysis = registry.canonical(analysis)  # an alias finds its analysis's runs
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
