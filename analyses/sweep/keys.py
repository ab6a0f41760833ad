"""The key of a task: what makes two runs the same computation.

A task's key is the sha256 of its analysis, its whole config (defaults included, so a changed
default is a new task) with the dtype and BOS policy, its seed, the checksum of the model's
weights and the code revision. A complete run carrying the key in its notes (``notes.task_key``)
means the task is done; ``headlab run`` records the key too, so a sweep also skips a run made by
hand with the same settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from analyses import runstore
from analyses.manifest import to_jsonable
from probe import zoo
from probe.cache import sha256_file
from probe.checksums import checkpoint_sha256

KEY_VERSION = 1
"""Bumped when the key's recipe changes (old keys then match nothing, so tasks are re-run)."""


RESULT_CODE = ("probe", "analyses", "headlab", "pyproject.toml")
"""The parts of the tree whose uncommitted changes can change a result (not the dashboard, docs,
notebooks or tests: editing those while a sweep runs changes no task's key)."""


@functools.cache
def code_fingerprint() -> str:
    """The code revision a key records (:func:`tree_fingerprint` of headlab's own source tree).
    Read once per process: the code a process runs is the code it imported."""
    return tree_fingerprint(None)


def tree_fingerprint(tree: Path | None) -> str:
    """The git commit of ``tree`` (None: headlab's source tree), and where :data:`RESULT_CODE` has
    uncommitted changes a digest of them (``<commit>-dirty-<12 hex>``), so two different edits of
    one commit differ; changes elsewhere in the tree (docs, tests, files a run leaves) do not count.
    Outside a git checkout: the installed headlab version."""
    revision = runstore.code_revision(tree)
    if revision is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"headlab {version('headlab')}"
        except PackageNotFoundError:
            return "headlab (unknown version)"
    commit = revision.removesuffix("-dirty")
    if commit == revision:
        return commit
    where = tree if tree is not None else Path(runstore.__file__).resolve().parent.parent
    changed = runstore.git_output(where, "diff", "HEAD", "--", *RESULT_CODE)
    untracked = runstore.git_output(where, "ls-files", "--others", "--exclude-standard", "--", *RESULT_CODE)
    if changed is None or untracked is None:  # git failed: never take that for a clean tree
        return f"{commit}-dirty-unknown"
    if not changed and not untracked:
        return commit
    digest = hashlib.sha256(f"{changed}\0{untracked}".encode())
    for name in untracked.splitlines():  # untracked files: their contents too
        file = where / name
        digest.update(sha256_file(file).encode() if file.is_file() else b"-")
    return f"{commit}-dirty-{digest.hexdigest()[:12]}"


def model_fingerprint(name: str) -> str:
    """The ``weight_sha256`` the loaded model ``name`` will report, found without loading it where
    that is certain (a catalogue language model, a checkpoint directory with weight files, a
    ``.gguf`` file); anything else (tiny, vision and assembled models) is loaded on the CPU once."""
    spec = zoo.CATALOGUE.get(name)
    if spec is not None and spec.kind == "language":
        return spec.weight_sha256
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return sha256_file(path)
    if path.is_dir() and [*path.glob("*.safetensors"), *path.glob("*.bin")]:
        return checkpoint_sha256(path)
    from probe import load_model

    return load_model(name, device="cpu", dtype="float32").weight_sha256


def task_key(
    analysis: str, config: Any, *, seed: int | None, weight_sha256: str, dtype: str, bos: str, code: str
) -> str:
    """The key of one task (64 hex)."""
    record = {
        "v": KEY_VERSION,
        "analysis": analysis,
        "config": to_jsonable(config, "config"),
        "dtype": dtype,
        "bos": bos,
        "seed": seed,
        "weights": weight_sha256,
        "code": code,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
