"""Where converted models live, and how they are written and checked.

The cache root is ``$HEADLAB_CACHE`` or the platform cache directory (``platformdirs``). A converted
model is one directory ``models/<name>/`` holding a transformers checkpoint, the licence files and
``headlab-model.json`` (the marker): the source weight file's sha256 and the sha256 of every file
written. A directory is only ever created by renaming a finished temporary directory, so a reader
sees either nothing or a complete model; a marker that disagrees with the files marks it damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = "headlab-model.json"


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


def cache_problem(directory: Path, *, deep: bool = True) -> str | None:
    """Why ``directory`` is not a usable converted model, or None when it is.

    ``deep`` re-hashes every file (what ``fetch`` does); otherwise only sizes are compared.
    """
    if not directory.is_dir():
        return "not converted"
    marker = read_marker(directory)
    if marker is None:
        return f"marker {MARKER} missing or unreadable"
    files = marker.get("files", {})
    if not files:
        return "marker lists no files"
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            return f"file {rel} missing"
        if path.stat().st_size != meta["bytes"]:
            return f"file {rel} has {path.stat().st_size} bytes, marker says {meta['bytes']}"
        if deep and sha256_file(path) != meta["sha256"]:
            return f"file {rel} does not match its recorded sha256"
    return None


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target``.

    On any exception the temporary directory is removed and ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_marker(directory: Path, info: dict[str, Any], skip: Callable[[Path], bool] | None = None) -> None:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MARKER and not (skip and skip(path)):
            rel = str(path.relative_to(directory))
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    payload = {**info, "files": files}
    (directory / MARKER).write_text(json.dumps(payload, indent=2, sort_keys=True))
