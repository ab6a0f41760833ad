"""Where converted models live, and how they are written and checked.

A converted model is one directory ``models/<name>/`` under the cache root (``$HEADLAB_CACHE`` or
the platform cache directory): a transformers checkpoint, its licence files and the marker
``headlab-model.json`` with the sha256 of the source and of every file written. Directories appear
only by renaming a finished temporary directory (:func:`atomic_dir`, with a writer lock);
:func:`cache_problem` checks the files against the marker before a model is read, and a verified
stamp lets a later check skip the hashing when no file changed.

See docs/models.md (the model cache).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from probe import tempdirs
from probe.errors import CacheNotWritableError

MARKER = "headlab-model.json"
STAMP = ".headlab-verified.json"
RACY_NS = 2_000_000_000  # files changed less than this before a check are hashed again next time
TEMP_GLOB = ".*.tmp-*"  # the temporary directories atomic_dir makes beside its targets
TURN_SUFFIX = ".writer-turn"  # the lock file of writer_turn (see lock_path)
_NOT_LISTED = {MARKER, STAMP, tempdirs.LOCK_NAME}  # never part of a model: not in its marker


def cache_root() -> Path:
    env = os.environ.get("HEADLAB_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("headlab"))


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_concat(paths: list[Path], out: Path | None = None, chunk: int = 1 << 20) -> str:
    """sha256 of the concatenation of ``paths``; also writes the concatenation to ``out``."""
    digest = hashlib.sha256()
    sink = out.open("wb") if out is not None else None
    try:
        for path in paths:
            with path.open("rb") as fh:
                while block := fh.read(chunk):
                    digest.update(block)
                    if sink is not None:
                        sink.write(block)
    finally:
        if sink is not None:
            sink.close()
    return digest.hexdigest()


def read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def cache_problem(directory: Path, *, deep: bool = True, trust_stamp: bool = True) -> str | None:
    """Why ``directory`` is not a usable converted model, or None when it is.

    ``deep`` checks every file's content against the marker's sha256 (skipped, when ``trust_stamp``,
    for files unchanged since a verified stamp, see docs/models.md); otherwise only sizes are
    compared (what ``headlab models`` shows, not enough to trust the numbers).
    """
    if not directory.is_dir():
        return "not converted"
    marker = read_marker(directory)
    if marker is None:
        return f"marker {MARKER} missing or unreadable"
    files = marker.get("files", {})
    if not files or not isinstance(files, dict):
        return "marker lists no files"
    for rel, meta in files.items():
        path = directory / rel
        if not isinstance(meta, dict):
            return f"marker entry of {rel} unreadable"
        if not path.is_file():
            return f"file {rel} missing"
        if path.stat().st_size != meta.get("bytes"):
            return f"file {rel} has {path.stat().st_size} bytes, marker says {meta.get('bytes')}"
    if not deep or (trust_stamp and _stamp_matches(directory, files)):
        return None
    start = time.time_ns()
    seen = {MARKER: _stat_key(directory / MARKER)}
    for rel, meta in files.items():
        path = directory / rel
        before = _stat_key(path)
        if sha256_file(path) != meta.get("sha256"):
            return f"file {rel} does not match its recorded sha256"
        seen[rel] = before if _stat_key(path) == before else []  # changed while hashed: never stamped
    _write_stamp(directory, seen, start)
    return None


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _stamp_matches(directory: Path, files: dict[str, Any]) -> bool:
    try:
        stamp = json.loads((directory / STAMP).read_text())
        wanted = {MARKER, *files}
        if not isinstance(stamp, dict) or set(stamp) != wanted:
            return False
        return all(stamp[rel] == _stat_key(directory / rel) for rel in wanted)
    except (OSError, ValueError):
        return False


def _write_stamp(directory: Path, seen: dict[str, list[int]], start_ns: int) -> None:
    """Record the stats of files just verified; skipped when any is too recent or changed meanwhile."""
    if any(not key or key[2] > start_ns - RACY_NS for key in seen.values()):
        return
    tmp = directory / f"{STAMP}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(seen))
        os.replace(tmp, directory / STAMP)
    except OSError:  # a read-only cache is still usable; it is hashed on every load
        tmp.unlink(missing_ok=True)


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _not_writable(path: Path, err: OSError) -> CacheNotWritableError:
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space there, or set HEADLAB_CACHE (now {cache_root()}) to a directory on a disk with room"
    else:
        fix = f"set HEADLAB_CACHE (now {cache_root()}) to a writable directory, or make that one writable"
    return CacheNotWritableError(f"cannot write the model cache at {path} ({reason}); {fix}")


def ensure_writable(directory: Path) -> None:
    """Create ``directory`` and check that a file can be written in it, or raise CacheNotWritableError."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempdirs.check_writable(directory)
    except OSError as err:
        raise _not_writable(directory, err) from None


def clean_stale(parent: Path) -> list[tempdirs.StaleTemp]:
    """Remove the temporary directories in ``parent`` left by killed writers; return those removed."""
    try:
        return tempdirs.remove_stale(parent, TEMP_GLOB)
    except OSError:  # a parent this process may not change: nothing removed
        return []


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target``.

    On any exception the temporary directory is removed and ``target`` is left as it was. The
    temporary directory holds a writer lock, so if this process is killed the next ``atomic_dir`` on
    the same parent (or ``headlab models`` / ``headlab fetch``) removes it. A cache that cannot be
    created or written (HEADLAB_CACHE under a file, a read-only directory, a full disk) raises
    :class:`~probe.errors.CacheNotWritableError`.
    """
    ensure_writable(target.parent)
    clean_stale(target.parent)
    with ExitStack() as stack:
        try:
            tmp = stack.enter_context(tempdirs.locked_tempdir(target.parent, f".{target.name}.tmp-"))
        except OSError as err:
            raise _not_writable(target.parent, err) from None
        try:
            yield tmp
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise _not_writable(tmp, err) from None
            raise
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.tmp-old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
        tempdirs.publish(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def lock_path(target: Path) -> Path:
    """The lock file of :func:`writer_turn` for ``target``: hidden, beside it, there only while held."""
    return target.parent / f".{target.name}{TURN_SUFFIX}"


def _take_turn(path: Path, target: Path) -> int | None:
    """An fd of ``path`` holding its exclusive flock, or None where it cannot be created (read-only).

    A holder removes the file before it lets go, so a lock taken on a file no longer at ``path`` (a
    waiter that opened it before) is dropped and taken again on the file that is there now."""
    warned = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # the parent was removed meanwhile: make it again
        except OSError:
            return None
        if tempdirs.fcntl is None:
            return fd
        try:
            tempdirs.fcntl.flock(fd, tempdirs.fcntl.LOCK_EX | tempdirs.fcntl.LOCK_NB)
        except BlockingIOError:
            if not warned:
                print(f"waiting for another process writing {target} …", file=sys.stderr, flush=True)
                warned = True
            tempdirs.fcntl.flock(fd, tempdirs.fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed it after we opened it: take the one there now


@contextmanager
def writer_turn(target: Path) -> Iterator[None]:
    """Hold, among the processes sharing this cache, the one right to check and (re)write ``target``.

    A second fetch of the same model (another notebook, another GPU's worker) waits here and then
    finds the model converted, instead of converting it again and renaming the first one's directory
    away under a process reading it. The lock is a hidden file beside ``target``
    (:func:`lock_path`), flocked while held and removed before it is let go, so nothing stays behind.
    A cache where it cannot be created (read-only) is used without one: nobody can write it then.
    """
    path = lock_path(target)
    fd = _take_turn(path, target)
    if fd is None:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # still holding the flock: a waiter on this file retakes the next one
        os.close(fd)


def write_marker(directory: Path, info: dict[str, Any], skip: Callable[[Path], bool] | None = None) -> None:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in _NOT_LISTED and not (skip and skip(path)):
            rel = str(path.relative_to(directory))
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    payload = {**info, "files": files}
    (directory / MARKER).write_text(json.dumps(payload, indent=2, sort_keys=True))
