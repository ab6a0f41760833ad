"""The sweeps under the dashboard's root: which sweep made a run, and each sweep's manifest, read safely.

Background
----------
A run written by ``headlab sweep`` records ``notes["sweep"] = {"name", "task", "seed"}``
(:func:`sweep_tag` reads it), and each sweep keeps its manifest in
``<root>/.sweeps/<name>/sweep.json`` (:mod:`analyses.sweep.state`). :class:`SweepShelf` lists the
sweep directories under the root and reads their manifests; a page names a sweep only by a name it
compares with that listing, so nothing the browser sends becomes a path. A manifest that resolves
outside the root (a symbolic link), is too large, is not JSON or lacks the fields a manifest has is
shown as a one-line :attr:`SweepOverview.problem`, never raised. Parsed manifests are cached until
the file changes (size, modification time or inode), so a page load does not re-read them.

Usage
-----
>>> shelf = SweepShelf(Path("runs"))
>>> [(s.name, s.state, s.counts["done"]) for s in shelf.overviews() if s.problem is None]
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from analyses.sweep.state import STATE_FILE, STATUSES, SWEEPS_DIR, driver_gone

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a sweep's name can be (``headlab sweep`` takes letters, digits, '_' and '-' only)."""
NO_SWEEP = "(none)"
"""The filter value of runs made outside any sweep: no sweep can have this name."""
MAX_MANIFEST_BYTES = 64 * 2**20
"""A larger sweep.json is not read (about 60,000 tasks: reading it would slow every page load)."""
SHOWN_ERROR = 500  # characters of a task's error shown (the driver keeps 500)

_Signature = tuple[int, int, int]


def is_sweep_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def time_label(text: str | None) -> str:
    """An ISO 8601 time as ``YYYY-mm-dd HH:MM:SS UTC`` ("" for none; unparsable text as it is)."""
    if not text:
        return ""
    try:
        return datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return text


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class SweepTag:
    """Which sweep made a run: its name, the task's index and seed (None when not recorded)."""

    name: str
    task: int | None
    seed: int | None

    @property
    def label(self) -> str:
        """The sweep column's text: ``name (seed N)``, or the name alone for a task without a seed."""
        return self.name if self.seed is None else f"{self.name} (seed {self.seed})"


def sweep_tag(notes: Mapping[str, Any]) -> SweepTag | None:
    """The sweep a run's manifest notes name (None: made outside a sweep, or notes no sweep wrote)."""
    tag = notes.get("sweep")
    if not isinstance(tag, Mapping) or not is_sweep_name(tag.get("name")):
        return None
    return SweepTag(str(tag["name"]), _int_or_none(tag.get("task")), _int_or_none(tag.get("seed")))


@dataclass(frozen=True)
class SweepTask:
    """One task of a sweep manifest, as the overview shows it."""

    index: int
    model: str
    analysis: str
    label: str
    seed: int | None
    status: str
    run_id: str | None
    attempts: int
    error: str | None
    seconds: float | None


@dataclass(frozen=True)
class SweepOverview:
    """One sweep directory under the root: its manifest's summary, or why it cannot be read."""

    name: str  # the directory's name under <root>/.sweeps: the only handle pages pass around
    problem: str | None = None  # one line: why the manifest cannot be shown (the fields below are empty)
    state: str = ""
    started: str | None = None
    updated: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    models_loaded: int | None = None
    tasks: tuple[SweepTask, ...] = ()
    driver: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def shown_state(self) -> str:
        """The state, asked again each time: ``running`` whose driver died on this host says so
        (the manifest, and so the cached overview, cannot change after its driver is killed)."""
        if driver_gone({"state": self.state, "driver": self.driver}):
            return "interrupted (its driver is gone)"
        return self.state

    @property
    def troubled(self) -> tuple[SweepTask, ...]:
        """The failed and refused tasks, in task order."""
        return tuple(t for t in self.tasks if t.status in ("failed", "refused"))


class _Unreadable(Exception):
    """Why a sweep manifest cannot be shown (one line)."""


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _Unreadable(f"its {what} is not text")
    return value


def _task(item: object, position: int) -> SweepTask:
    if not isinstance(item, Mapping):
        raise _Unreadable(f"task {position} is not an object")
    index = _int_or_none(item.get("index"))
    status = item.get("status")
    if index is None or status not in STATUSES:
        raise _Unreadable(f"task {position} has no index or no known status")
    run_id, error, seconds = item.get("run_id"), item.get("error"), item.get("seconds")
    return SweepTask(
        index=index,
        model=str(item.get("model", "?")),
        analysis=str(item.get("analysis", "?")),
        label=str(item.get("label", "")),
        seed=_int_or_none(item.get("seed")),
        status=str(status),
        run_id=run_id if isinstance(run_id, str) and run_id else None,
        attempts=_int_or_none(item.get("attempts")) or 0,
        error=" ".join(error.split())[:SHOWN_ERROR] if isinstance(error, str) and error else None,
        seconds=float(seconds)
        if isinstance(seconds, int | float) and not isinstance(seconds, bool)
        else None,
    )


def parse_manifest(name: str, data: object) -> SweepOverview:
    """The overview of sweep ``name`` from its parsed sweep.json (``_Unreadable`` when it is no manifest)."""
    if not isinstance(data, Mapping):
        raise _Unreadable("it is not a JSON object")
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, list):
        raise _Unreadable("it has no list of tasks")
    tasks = tuple(_task(item, i) for i, item in enumerate(raw_tasks))
    # The counts as the tasks say (the driver writes both; the tasks are what the table lists).
    counts = {status: sum(t.status == status for t in tasks) for status in STATUSES}
    started, updated = data.get("started"), data.get("updated")
    return SweepOverview(
        name=name,
        state=_text(data.get("state", "?"), "state"),
        started=started if isinstance(started, str) else None,
        updated=updated if isinstance(updated, str) else None,
        counts=counts,
        models_loaded=_int_or_none(data.get("models_loaded")),
        tasks=tasks,
        driver=dict(data["driver"]) if isinstance(data.get("driver"), Mapping) else {},
    )


def _contained(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (through any symbolic link) to a place under ``root``."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, base]) == base and real != base


class SweepShelf:
    """The sweeps under ``root`` (``<root>/.sweeps/<name>/sweep.json``), manifests cached per file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[_Signature, SweepOverview]] = {}

    @property
    def directory(self) -> Path:
        return self.root / SWEEPS_DIR

    def names(self) -> list[str]:
        """The sweep directories under the root, sorted (names no sweep can have are skipped)."""
        try:
            with os.scandir(self.directory) as it:
                return sorted(e.name for e in it if is_sweep_name(e.name) and e.is_dir())
        except OSError:  # no sweeps yet, or a .sweeps that is no directory
            return []

    def overviews(self) -> list[SweepOverview]:
        """Every sweep under the root, by name; an unreadable manifest as an overview with a problem."""
        names = self.names()
        found = [self._read(name) for name in names]
        with self._lock:
            for gone in set(self._cache) - set(names):
                del self._cache[gone]
        return found

    def _read(self, name: str) -> SweepOverview:
        path = self.directory / name / STATE_FILE
        shown = f"{SWEEPS_DIR}/{name}/{STATE_FILE}"
        if not _contained(path, self.root):
            return SweepOverview(name, f"{shown} lies outside the run store (a symbolic link); not read")
        try:
            st = path.stat()
        except OSError:
            return SweepOverview(name, f"{shown} does not exist yet: the sweep has written no manifest")
        if not path.is_file():
            return SweepOverview(name, f"{shown} is not a file; not read")
        if st.st_size > MAX_MANIFEST_BYTES:
            return SweepOverview(name, f"{shown} is {st.st_size:,} bytes, too large to show here")
        signature = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            overview = parse_manifest(name, json.loads(path.read_bytes()))
        except OSError as err:
            overview = SweepOverview(name, f"{shown} cannot be read ({err.strerror or type(err).__name__})")
        except (ValueError, RecursionError) as err:  # not JSON (or not UTF-8)
            why = " ".join(str(err).split())[:120]
            overview = SweepOverview(name, f"{shown} is damaged: not JSON ({why}); {_REWRITE}")
        except _Unreadable as err:
            overview = SweepOverview(name, f"{shown} is damaged: {err}; {_REWRITE}")
        with self._lock:
            self._cache[name] = (signature, overview)
        return overview


_REWRITE = "its runs are still listed, and the next `headlab sweep` of it writes the manifest again"
