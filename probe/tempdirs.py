"""Temporary directories that say whether their writer is still alive, and the clean-up of dead ones.

A writer builds in a hidden temporary directory and renames it into place when complete
(:func:`locked_tempdir`, :func:`publish`); the lock file :data:`LOCK_NAME` inside it is flocked while
the writer lives, so :func:`stale_tempdirs` and :func:`remove_stale` can tell the leftovers of a
killed writer from a directory still being written. Leave the lock file out when listing or
checksumming a directory before publishing it.

See docs/models.md (the model cache) for how liveness is decided and why it is sound.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX; liveness falls back to the pid
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".headlab-writer.lock"
GRACE_S = 600.0

_HELD: dict[Path, int] = {}  # temporary directory -> fd of its held lock file


@dataclass(frozen=True)
class StaleTemp:
    """A temporary directory whose writer is gone."""

    path: Path
    bytes: int
    pid: int | None  # the dead writer's pid, when its lock said
    why: str  # e.g. "its writer (pid 123, started 2025-01-01 12:00:00) is gone"

    def describe(self) -> str:
        return f"{self.path.name} ({self.bytes / 1e6:.1f} MB): {self.why}"


def _hostname() -> str:
    return socket.gethostname()


def _take_lock(directory: Path) -> int:
    """Create ``directory/LOCK_NAME`` already flocked by this process; return its fd."""
    fd, staging = tempfile.mkstemp(prefix=".headlab-lock-", dir=directory)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        info = {"pid": os.getpid(), "host": _hostname(), "started": time.time()}
        os.write(fd, json.dumps(info).encode())
        os.rename(staging, directory / LOCK_NAME)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(directory: Path) -> None:
    fd = _HELD.pop(directory, None)
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            (directory / LOCK_NAME).unlink()
        os.close(fd)


@contextlib.contextmanager
def locked_tempdir(parent: Path, prefix: str, *, name: str | None = None) -> Iterator[Path]:
    """A new directory ``parent/<prefix><random>`` (or exactly ``parent/name``) locked as being written.

    Call :func:`publish` inside the block to move it into place. On leaving the block the lock is
    released and, unless published, the directory is removed (also on an exception).
    """
    parent.mkdir(parents=True, exist_ok=True)
    if name is not None:
        tmp = parent / name
        tmp.mkdir()
    else:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        _HELD[tmp] = _take_lock(tmp)
        yield tmp
    finally:
        _release(tmp)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, target: Path) -> None:
    """Release ``tmp``'s lock and rename ``tmp`` to ``target`` (which must not exist, or be empty)."""
    _release(tmp)
    os.rename(tmp, target)


def _dir_bytes(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _when(epoch: object) -> str:
    if isinstance(epoch, int | float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
    return "at an unknown time"


def _verdict(directory: Path, grace_s: float) -> tuple[str | None, int | None, int | None]:
    """(why it is stale or None if live/unknown, the writer's pid, an fd holding its flock or None)."""
    lock = directory / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        try:
            age = time.time() - directory.stat().st_mtime
        except FileNotFoundError:
            return None, None, None
        if age < grace_s:
            return None, None, None
        return f"no writer lock and untouched for {age / 3600:.1f} h (left by a crash)", None, None
    except OSError:
        return None, None, None
    try:
        raw = os.read(fd, 4096)
        try:
            info = json.loads(raw.decode() or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            info = {}
        pid = info.get("pid") if isinstance(info.get("pid"), int) else None
        host = info.get("host")
        if host is not None and host != _hostname():
            os.close(fd)
            return None, pid, None  # written on another machine: cannot tell, leave it
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    return None, pid, None  # held: a live writer
                raise
        elif pid is not None and _pid_alive(pid):  # pragma: no cover - non-POSIX fallback
            os.close(fd)
            return None, pid, None
        who = f"pid {pid}" if pid is not None else "unknown pid"
        return f"its writer ({who}, started {_when(info.get('started'))}) is gone", pid, fd
    except BaseException:
        os.close(fd)
        raise


def stale_tempdirs(parent: Path, prefix_glob: str, *, grace_s: float = GRACE_S) -> list[StaleTemp]:
    """Temporary directories ``parent/<prefix_glob>`` whose writer is gone (nothing is removed)."""
    found = []
    for path in sorted(parent.glob(prefix_glob)) if parent.is_dir() else []:
        if not path.is_dir() or path.is_symlink() or path in _HELD:
            continue
        why, pid, fd = _verdict(path, grace_s)
        if fd is not None:
            os.close(fd)
        if why is not None:
            found.append(StaleTemp(path, _dir_bytes(path), pid, why))
    return found


def remove_stale(parent: Path, prefix_glob: str, *, grace_s: float = GRACE_S) -> list[StaleTemp]:
    """Remove the temporary directories :func:`stale_tempdirs` would report; return those removed.

    Each is re-checked while holding its lock, and never removed while a writer holds it.
    """
    removed = []
    for path in sorted(parent.glob(prefix_glob)) if parent.is_dir() else []:
        if not path.is_dir() or path.is_symlink() or path in _HELD:
            continue
        why, pid, fd = _verdict(path, grace_s)
        if why is None:
            continue
        try:
            size = _dir_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
        if not path.exists():
            removed.append(StaleTemp(path, size, pid, why))
    return removed


def check_writable(directory: Path) -> None:
    """Create and remove a file in ``directory``: raises the OSError that a real write would meet."""
    fd, path = tempfile.mkstemp(prefix=".headlab-write-check-", dir=directory)
    os.close(fd)
    os.unlink(path)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all: a hidden temporary file next to it, flushed to
    disk, then renamed into place; on any error the temporary is removed and an earlier ``path`` is
    kept. Errors propagate (the caller says what to do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path
