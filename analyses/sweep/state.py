"""A sweep's state in the run store: its manifest, its lock, and which of its tasks are done.

The truth about a task is the run store: a task is done when a complete run carries its key
(``notes.task_key``); runs are written whole or not at all, so a sweep killed at any moment leaves
no half task behind. Next to the runs, ``<root>/.sweeps/<name>/sweep.json`` (hidden, so it is no
run) records the sweep: its file, its tasks with their keys, and for each the last thing the
driver saw (running, failed with its error after so many attempts, refused, done with its run id,
skipped). The driver rewrites it atomically after every change and holds ``driver.lock`` while it
runs, so :func:`read_status` tells a live sweep from one whose driver died.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from analyses import runstore
from analyses.manifest import to_jsonable
from analyses.runs import open_run
from analyses.sweep.spec import SweepSpec, TaskSpec
from probe.errors import RunStoreError
from probe.tempdirs import _pid_alive, write_text_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

SWEEPS_DIR = ".sweeps"
STATE_FILE = "sweep.json"
LOCK_FILE = "driver.lock"
STATUSES = ("pending", "running", "done", "skipped", "failed", "refused")
"""What a task can be: not started; in flight; run by this sweep; found done before it started;
failed on every attempt; refused (an error any attempt would meet again, not retried)."""


@dataclass
class TaskState:
    """One task as the sweep manifest records it."""

    index: int
    key: str
    model: str
    analysis: str
    label: str
    seed: int | None
    settings: dict[str, Any]
    status: str = "pending"
    run_id: str | None = None
    attempts: int = 0
    error: str | None = None
    seconds: float | None = None
    loaded_model: bool | None = None
    worker: dict[str, Any] = field(default_factory=dict)


def sweep_dir(root: Path, name: str) -> Path:
    return root / SWEEPS_DIR / name


def done_runs(root: Path) -> dict[str, str]:
    """task key -> run id of every complete run under ``root`` that records one (newest wins).

    Damaged runs do not count (their task is run again); files are checked by size, not hashed."""
    found: dict[str, tuple[str, str]] = {}
    for summary in runstore.list_runs(root, verify=False):
        if not summary.ok:
            continue
        try:
            run = open_run(summary.path, verify=False, root=root)
        except RunStoreError:
            continue
        key = run.notes.get("task_key")
        if isinstance(key, str):
            created = run.manifest.created
            if key not in found or created > found[key][1]:
                found[key] = (run.run_id, created)
    return {key: run_id for key, (run_id, _) in found.items()}


class SweepState:
    """The manifest of one sweep, kept by its driver (see the module docstring)."""

    def __init__(self, root: Path, spec: SweepSpec, tasks: Sequence[TaskState]) -> None:
        self.root = root
        self.spec = spec
        self.tasks = list(tasks)
        self.by_key = {t.key: t for t in self.tasks}
        self.directory = sweep_dir(root, spec.name)
        self.state = "planned"
        self.started = datetime.now(UTC).isoformat()

    @property
    def models_loaded(self) -> int:
        """How many of the tasks loaded their model (the others reused a worker's)."""
        return sum(bool(t.loaded_model) for t in self.tasks)

    def counts(self) -> dict[str, int]:
        return {status: sum(t.status == status for t in self.tasks) for status in STATUSES}

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.spec.name,
                "spec_path": self.spec.path,
                "spec": self.spec.raw,
                "state": self.state,
                "started": self.started,
                "updated": datetime.now(UTC).isoformat(),
                "driver": {"host": socket.gethostname(), "pid": os.getpid()},
                "counts": self.counts(),
                "models_loaded": self.models_loaded,
                "tasks": [to_jsonable(asdict(t), "task") for t in self.tasks],
            },
            indent=1,
        )

    def save(self) -> None:
        try:
            write_text_atomic(self.directory / STATE_FILE, self.to_json())
        except OSError as err:
            raise RunStoreError(
                f"cannot write the sweep manifest under {self.directory}: {err}; check the run store's "
                "permissions and free space"
            ) from err

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the sweep's driver lock; a second driver of the same sweep is refused."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    raise RunStoreError(
                        f"sweep {self.spec.name!r} is being run by {holder} on this run store; wait for "
                        f"it (headlab sweep status {self.spec.path}) or stop it first"
                    ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode(), 0)
            yield
        finally:
            os.close(fd)


def task_states(tasks: Sequence[TaskSpec], keys: Sequence[str]) -> list[TaskState]:
    return [
        TaskState(
            index=t.index,
            key=k,
            model=t.model,
            analysis=t.analysis,
            label=t.label(),
            seed=t.seed,
            settings=to_jsonable(dict(t.settings), "settings"),
        )
        for t, k in zip(tasks, keys, strict=True)
    ]


def driver_alive(directory: Path) -> bool:
    """Whether a driver holds the sweep's lock now (on this host; another host's lock on a shared
    filesystem is seen as held when the filesystem supports flock across hosts)."""
    path = directory / LOCK_FILE
    if fcntl is None or not path.is_file():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def driver_gone(manifest: Mapping[str, Any]) -> bool:
    """Whether a manifest that says ``running`` was left by a driver that no longer lives: its
    recorded process is not alive on this host (a driver on another host cannot be asked, so it
    is not called gone). Reads no lock, so a read-only viewer may ask."""
    if manifest.get("state") != "running":
        return False
    driver = manifest.get("driver")
    if not isinstance(driver, Mapping) or driver.get("host") != socket.gethostname():
        return False
    pid = driver.get("pid")
    return isinstance(pid, int) and not isinstance(pid, bool) and not _pid_alive(pid)


def read_manifest(root: Path, name: str) -> Mapping[str, Any] | None:
    """The sweep manifest as last written (None: this sweep never ran under ``root``)."""
    path = sweep_dir(root, name) / STATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunStoreError(
            f"the sweep manifest {path} cannot be read ({err}); remove it: the runs are the record, and "
            "the next `headlab sweep` writes it again"
        ) from None
    return data if isinstance(data, Mapping) else None


def merge_status(
    tasks: Sequence[TaskState], manifest: Mapping[str, Any] | None, done: Mapping[str, str], alive: bool
) -> None:
    """Fill each task's status from the run store (done) and the manifest (the rest); a task the
    manifest says is running while no driver lives is pending again (its run never completed)."""
    recorded = {t.get("key"): t for t in (manifest or {}).get("tasks", []) if isinstance(t, Mapping)}
    for task in tasks:
        old = recorded.get(task.key, {})
        for name in ("attempts", "error", "seconds", "loaded_model", "worker"):
            if name in old:
                setattr(task, name, old[name])
        if task.key in done:
            task.run_id = done[task.key]
            task.status = str(old["status"]) if old.get("status") in ("done", "skipped") else "done"
        elif old.get("status") in ("failed", "refused") or (old.get("status") == "running" and alive):
            task.status = str(old["status"])
        else:
            task.status = "pending"
