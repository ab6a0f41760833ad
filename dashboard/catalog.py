"""The runs the dashboard may show: only run directories directly under its root, checked once.

Background
----------
The dashboard is reachable from a browser, so nothing the browser sends is ever used as a path
(it only reads run directories under its root). Pages name runs by *run id* (the
directory name under the root); :meth:`RunCatalog.open` looks the id up in the current listing of
the root and opens that listed directory, so ``../elsewhere`` or an absolute path simply is not a
known run.

A run is offered for opening only if it is intact: the listing compares file sizes with the
manifest (cheap), and the first time a run is offered its files are also hashed against the
manifest (:func:`analyses.runstore.open_run` with ``verify=True``). The verdict is cached until a
file in the run directory changes (size or modification time, or whether it is a symbolic link) or
the directory comes to resolve elsewhere, so a page load does not re-hash every run, yet a run
damaged while the dashboard runs is noticed. A run directory that is a symbolic link out of the
root, or whose files link out of it, is damaged and never served.

Entries name the sweep that made the run (:class:`dashboard.sweeps.SweepTag`); :meth:`RunCatalog.sweeps`
reads the sweeps' manifests under ``<root>/.sweeps`` (:class:`dashboard.sweeps.SweepShelf`).

:meth:`RunCatalog.version_note` says when a run was made under other package versions than those
installed now, for the page showing it.

Usage
-----
>>> catalog = RunCatalog(Path("runs"))
>>> [e.run_id for e in catalog.entries("census") if e.ok]
>>> run = catalog.open(run_id, analysis="census")   # RunStoreError when unknown or damaged
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from analyses import runstore
from analyses.runstore import Run
from dashboard.sweeps import SweepOverview, SweepShelf, SweepTag, sweep_tag, time_label
from probe.errors import RunStoreError

_Signature = tuple[tuple[str, int, int], ...]
_Verdict = tuple[_Signature, str | None, SweepTag | None]  # signature, why damaged (None: intact), sweep


@dataclass(frozen=True)
class RunEntry:
    """One run directory under the root, as the dashboard lists it."""

    run_id: str  # the directory name under the root: the only handle pages pass around
    analysis: str | None
    model: str | None
    created: str | None  # ISO 8601 (UTC) from the manifest
    n_heads: int | None
    status: str  # "ok", "damaged: <why>" or "not a run: <why>"
    sweep: SweepTag | None = None  # the sweep that made the run (None: none, or the run is damaged)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def created_label(self) -> str:
        return time_label(self.created)

    @property
    def label(self) -> str:
        """A one-line description for pickers: id, model, size, time, and the sweep that made it."""
        if not self.ok:
            return f"{self.run_id} (damaged)"
        parts = [self.model or "?"]
        if self.n_heads is not None:
            parts.append(f"{self.n_heads} heads")
        if self.created_label:
            parts.append(self.created_label)
        if self.sweep is not None:
            parts.append(f"sweep {self.sweep.label}")
        return f"{self.run_id} — {', '.join(parts)}"


def _is_run_name(name: object) -> bool:
    """A visible directory name: what :func:`analyses.runstore.list_runs` lists under a root.
    Anything with a separator, ``..`` or a leading dot (hidden, temporary) is not a run id."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and os.sep not in name
        and (os.altsep is None or os.altsep not in name)
        and "\x00" not in name
        and len(os.fsencode(name)) <= _MAX_NAME_BYTES  # longer names are no file name on any disk
    )


_MAX_NAME_BYTES = 255


def _why_damaged(message: str, run_id: str, path: Path) -> str:
    """``open_run``'s message without its "run <id> (<path>) is unusable: " preamble."""
    return message.removeprefix(f"run {run_id} ({path}) is unusable: ")


def _signature(directory: Path) -> _Signature:
    """Name, size and mtime of every file of a run (manifest, tables, arrays), which of them are
    symbolic links, and where the directory resolves to: changes when any does."""
    found: list[tuple[str, int, int]] = [(f"real:{os.path.realpath(directory)}", 0, 0)]
    for sub in (directory, directory / runstore.ARRAYS_DIR):
        try:
            with os.scandir(sub) as it:
                for item in it:
                    if item.is_file() or item.is_symlink():
                        link = "@" if item.is_symlink() else ""
                        try:
                            st = item.stat()
                        except OSError:  # a dangling link
                            st = item.stat(follow_symlinks=False)
                        found.append((f"{sub.name}/{item.name}{link}", st.st_size, st.st_mtime_ns))
        except OSError:
            continue
        if sub.is_symlink():
            found.append((f"{sub.name}@", 0, 0))
    return tuple(sorted(found))


class RunCatalog:
    """The runs under ``root``, with checked opening by run id and a small cache of opened runs."""

    def __init__(self, root: Path, *, max_open: int = 4) -> None:
        self.root = Path(root).expanduser()
        self.max_open = max_open
        self._lock = threading.Lock()
        # run id -> (signature, None if intact else why it is damaged, the sweep that made it)
        self._verdicts: dict[str, _Verdict] = {}
        self._open: OrderedDict[str, tuple[_Signature, Run]] = OrderedDict()
        self._sweeps = SweepShelf(self.root)

    def entries(self, analysis: str | None = None) -> list[RunEntry]:
        """Every run directory under the root (newest first), intact ones hashed once."""
        result = []
        for summary in runstore.list_runs(self.root, analysis=analysis, verify=False):
            run_id = summary.path.name
            status, sweep = summary.status, None
            if summary.ok:
                why, sweep = self._verify(run_id, summary.path)
                status = "ok" if why is None else f"damaged: {why}"
            result.append(
                RunEntry(
                    run_id=run_id,
                    analysis=summary.analysis,
                    model=summary.model,
                    created=summary.created,
                    n_heads=summary.n_heads,
                    status=status,
                    sweep=sweep,
                )
            )
        return result

    def sweeps(self) -> list[SweepOverview]:
        """Every sweep under ``<root>/.sweeps`` by name, an unreadable manifest as a one-line problem."""
        return self._sweeps.overviews()

    def version_note(self, run_id: str) -> str:
        """A sentence saying which packages the run was made under in other versions than those
        installed now ("" when none differ, or when the run cannot be opened)."""
        try:
            run = self.open(run_id)
        except RunStoreError:
            return ""
        differences = runstore.version_differences(run.manifest)
        if not differences:
            return ""
        return (
            "This run was made under other package versions than those installed now: "
            f"{runstore.format_version_differences(differences)}; its numbers may differ from a "
            "re-run with this installation."
        )

    def intact(self, analysis: str | None = None) -> list[RunEntry]:
        return [e for e in self.entries(analysis) if e.ok]

    def open(self, run_id: str, *, analysis: str | None = None) -> Run:
        """The intact run whose directory under the root is named ``run_id``.

        ``run_id`` must be the name of a visible directory directly under the root (what
        :meth:`entries` lists): no separators, no ``..``, no leading dot, so it can name nothing
        else. Raises :class:`RunStoreError` when there is no such run, when it is damaged (sizes
        and sha256 checked, cached until a file changes), or when it is not a run of ``analysis``.
        """
        try:
            exists = _is_run_name(run_id) and (self.root / run_id).is_dir()
        except OSError:  # a name the file system refuses to look up
            exists = False
        if not exists:
            raise RunStoreError(
                f"no run {run_id[:80]!r} under {self.root}; pick one of the listed runs "
                "(the dashboard only opens run directories under its root)"
            )
        run = self._open_checked(run_id, self.root / run_id)
        if analysis is not None and run.analysis != analysis:
            raise RunStoreError(f"run {run_id} is a {run.analysis} run, not a {analysis} run; pick another")
        return run

    def _verify(self, run_id: str, path: Path) -> tuple[str | None, SweepTag | None]:
        """Why the run is damaged (None: intact), and the sweep that made it."""
        signature = _signature(path)
        with self._lock:
            cached = self._verdicts.get(run_id)
        if cached is not None and cached[0] == signature:
            return (None if cached[1] is None else _why_damaged(cached[1], run_id, path)), cached[2]
        try:
            run = self._open_checked(run_id, path)
        except RunStoreError as err:
            return _why_damaged(str(err), run_id, path), None
        return None, sweep_tag(run.notes)

    def _open_checked(self, run_id: str, path: Path) -> Run:
        signature = _signature(path)
        with self._lock:
            held = self._open.get(run_id)
            if held is not None and held[0] == signature:
                self._open.move_to_end(run_id)
                return held[1]
            verdict = self._verdicts.get(run_id)
        if verdict is not None and verdict[0] == signature and verdict[1] is not None:
            raise RunStoreError(verdict[1])
        try:
            run = runstore.open_run(path, verify=True, root=self.root)
        except RunStoreError as err:
            with self._lock:
                self._verdicts[run_id] = (signature, str(err), None)
                self._open.pop(run_id, None)
            raise
        with self._lock:
            self._verdicts[run_id] = (signature, None, sweep_tag(run.notes))
            self._open[run_id] = (signature, run)
            self._open.move_to_end(run_id)
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return run
