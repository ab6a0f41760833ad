"""The run store: round trip, atomic writes, damaged runs, listing, resolving references, names."""

from __future__ import annotations

import enum
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from analyses import runstore
from analyses.runstore import RunManifest, RunSummary
from probe import tempdirs
from probe.errors import ConfigError, RunStoreError

_REAL_CODE_REVISION = runstore.code_revision
FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"

FAKE_MODEL: dict[str, Any] = {
    "name": "fake-model",
    "kind": "language",
    "family": "llama",
    "source": "tiny",
    "path": None,
    "weight_sha256": "ab" * 32,
    "n_layers": 2,
    "n_heads": 3,
    "n_kv_heads": 1,
    "d_head": 4,
    "d_model": 12,
    "n_ctx": 64,
    "dtype": "float32",
    "device": "cpu",
    "bos": {"mode": "default", "prepend": True, "token_id": 1, "token": "<s>"},
    "layer_types": None,
    "sliding_window": None,
    "caveat": "",
    "licence": "n/a",
}


class Mode(enum.Enum):
    FAST = "fast"


@dataclass
class Inner:
    window: tuple[int, int] = (4, 8)


@dataclass
class FakeConfig:
    seq_len: int = 32
    threshold: np.float32 = field(default_factory=lambda: np.float32(0.5))
    out: Path = Path("/tmp/somewhere")
    dtype: torch.dtype = torch.bfloat16
    layers: tuple[int, ...] = (0, 1)
    mode: Mode = Mode.FAST
    inner: Inner = field(default_factory=Inner)


@pytest.fixture(autouse=True)
def _no_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """Most tests need no real code revision; the round trip puts the real function back."""
    monkeypatch.setattr(runstore, "code_revision", lambda source_dir=None: FAKE_REVISION)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def heads_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(2), 3),
            "head": np.tile(np.arange(3), 2),
            "score": np.linspace(0.0, 1.0, 6),
            "role": ["sink", "other", "other", "sink", "induction", "other"],
        }
    )


def write(root: Path | None, analysis: str = "sinks", **kw: Any) -> Path:
    kw.setdefault("model_info", FAKE_MODEL)
    kw.setdefault("config", {"seq_len": 16})
    kw.setdefault("tables", {"heads": heads_table()})
    return runstore.write_run(root, analysis=analysis, **kw)


def common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def root_is_empty(root: Path) -> bool:
    return not root.exists() or list(root.iterdir()) == []


# ---------------------------------------------------------------------------------------- round trip


def test_round_trip(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runstore, "code_revision", _REAL_CODE_REVISION)
    positions = pd.DataFrame(
        {"layer": [0, 0, 1], "head": [0, 1, 2], "position": [0, 5, 9], "mass": [0.9, 0.1, np.nan]}
    )
    arrays: dict[str, np.ndarray] = {
        "mass": np.arange(12, dtype=np.float32).reshape(2, 2, 3),
        "tokens": np.array([1, 2, 3], dtype=np.int64),
    }
    path = write(
        root,
        config=FakeConfig(),
        tables={"heads": heads_table(), "positions": positions},
        arrays=arrays,
        seeds={"data": 0, "torch": np.int64(7)},
        timings={"capture": 1.5},
        notes={"why": "test"},
    )
    assert path.parent == root
    assert re.fullmatch(r"\d{8}-\d{6}-sinks-fake-model-[0-9a-f]{4}", path.name)
    assert sorted(p.name for p in path.rglob("*")) == sorted(
        ["manifest.json", "heads.parquet", "positions.parquet", "arrays", "mass.npy", "tokens.npy"]
    )

    run = runstore.open_run(path)
    pd.testing.assert_frame_equal(run.table("heads"), heads_table())
    pd.testing.assert_frame_equal(run.heads, heads_table())
    pd.testing.assert_frame_equal(run.table("positions"), positions)
    for name, arr in arrays.items():
        got = run.array(name)
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)
    assert run.table_names == ["heads", "positions"]
    assert run.array_names == ["mass", "tokens"]

    # The cache hands out copies: changing one does not change the next.
    first = run.heads
    first.loc[0, "score"] = 99.0
    assert run.heads.loc[0, "score"] == 0.0

    m = run.manifest
    assert m.schema_version == runstore.SCHEMA_VERSION == 1
    assert m.run_id == path.name == run.run_id
    assert m.analysis == "sinks"
    offset = datetime.fromisoformat(m.created).utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    assert m.model == FAKE_MODEL
    assert m.config == {
        "seq_len": 32,
        "threshold": 0.5,
        "out": "/tmp/somewhere",
        "dtype": "bfloat16",
        "layers": [0, 1],
        "mode": "fast",
        "inner": {"window": [4, 8]},
    }
    assert m.seeds == {"data": 0, "torch": 7}
    assert m.timings == {"capture": 1.5}
    assert m.notes == {"why": "test"}
    versions = m.package_versions
    for key in ("python", "torch", "transformers", "transformer-lens", "numpy", "pandas", "headlab"):
        assert key in versions
    assert versions["numpy"] == np.__version__
    assert versions["pandas"] == pd.__version__
    assert m.code_revision is None or re.fullmatch(r"[0-9a-f]{40,64}(-dirty)?", m.code_revision)
    assert m.tables["heads"]["rows"] == 6
    assert m.tables["heads"]["columns"] == ["layer", "head", "score", "role"]
    assert m.arrays["mass"]["shape"] == [2, 2, 3]
    assert m.arrays["mass"]["dtype"] == "float32"
    assert all(len(e["sha256"]) == 64 for e in [*m.tables.values(), *m.arrays.values()])

    on_disk = json.loads((path / "manifest.json").read_text())
    assert on_disk["schema_version"] == 1
    assert RunManifest.from_json(m.to_json()) == m


def test_unknown_table_or_array_names_the_available_ones(root: Path) -> None:
    run = runstore.open_run(write(root))
    with pytest.raises(ConfigError, match=r"no table 'nope'; its tables are: heads"):
        run.table("nope")
    with pytest.raises(ConfigError, match=r"no array 'nope'"):
        run.array("nope")


def test_to_jsonable_conversions_and_refusals() -> None:
    assert runstore.to_jsonable({1: float("nan"), "s": {3, 1, 2}, "inf": -float("inf")}) == {
        "1": "nan",
        "s": [1, 2, 3],
        "inf": "-inf",
    }
    assert runstore.to_jsonable(torch.device("cpu")) == "cpu"
    assert runstore.to_jsonable(np.arange(3)) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"config\.fn holds a function.*convert it"):
        runstore.to_jsonable({"fn": lambda: None}, "config")
    with pytest.raises(ConfigError, match="config must be a dataclass instance or a mapping"):
        write(Path("/nonexistent-never-written"), config=[1, 2])


def test_sanitised_model_name_in_run_id(root: Path) -> None:
    assert runstore.sanitise("HuggingFaceTB/SmolLM2-1.7B") == "HuggingFaceTB-SmolLM2-1-7B"
    assert runstore.sanitise("///") == "model"
    path = write(root, model_info={**FAKE_MODEL, "name": "org/My Model.v2"})
    assert "-sinks-org-My-Model-v2-" in path.name
    [summary] = runstore.list_runs(root, model="org/My Model.v2")
    assert summary.model == "org/My Model.v2"


# ---------------------------------------------------------------------------------------- atomicity


def test_unserialisable_table_leaves_nothing(root: Path) -> None:
    bad = pd.DataFrame({"x": [1, "a"]})  # mixed object column: pyarrow cannot store it
    with pytest.raises(ConfigError, match=r"table 'bad' cannot be written as Parquet.*astype\(str\)"):
        write(root, tables={"heads": heads_table(), "bad": bad})
    assert root_is_empty(root)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_while_writing_the_manifest_leaves_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    def fail(self: RunManifest) -> str:
        raise exc

    monkeypatch.setattr(RunManifest, "to_json", fail)
    with pytest.raises(type(exc)):
        write(root, arrays={"a": np.zeros(3)})
    assert root_is_empty(root)


def test_failure_while_writing_an_array_leaves_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = np.save
    calls = []

    def save_then_fail(*args: Any, **kwargs: Any) -> None:
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("disk gone")
        real_save(*args, **kwargs)

    monkeypatch.setattr(runstore.np, "save", save_then_fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        write(root, arrays={"a": np.zeros(3), "b": np.ones(3)})
    assert len(calls) == 2
    assert root_is_empty(root)


def test_failure_at_rename_is_a_runstore_error_and_leaves_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_rename(src: Any, dst: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runstore.os, "rename", no_rename)
    with pytest.raises(RunStoreError, match=r"could not write run .* writable"):
        write(root)
    assert root_is_empty(root)


def test_temporary_directories_are_not_listed(root: Path) -> None:
    path = write(root)
    (root / f".{path.name}x.tmp").mkdir()
    assert [s.run_id for s in runstore.list_runs(root)] == [path.name]


# ---------------------------------------------------------------------------------------- damage


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(change: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        data = json.loads((run / "manifest.json").read_text())
        change(data)
        (run / "manifest.json").write_text(json.dumps(data))

    return apply


DAMAGE: dict[str, tuple[Callable[[Path], object], str, str]] = {
    "missing manifest": (
        lambda run: (run / "manifest.json").unlink(),
        "manifest.json is missing",
        "re-run the analysis, or remove the directory",
    ),
    "truncated manifest": (
        lambda run: (run / "manifest.json").write_text((run / "manifest.json").read_text()[:40]),
        "manifest.json is not valid JSON",
        "re-run the analysis, or remove the directory",
    ),
    "manifest not an object": (
        lambda run: (run / "manifest.json").write_text("[1, 2]"),
        "does not hold a JSON object",
        "re-run the analysis",
    ),
    "manifest field missing": (
        _edit_manifest(lambda d: d.pop("tables")),
        "field 'tables' is missing",
        "re-run the analysis",
    ),
    "newer schema": (
        _edit_manifest(lambda d: d.update(schema_version=99)),
        "schema version 99, newer than this headlab reads",
        "upgrade headlab",
    ),
    "unknown old schema": (
        _edit_manifest(lambda d: d.update(schema_version=0)),
        "schema version 0, which this headlab does not read",
        "re-run the analysis",
    ),
    "table deleted": (
        lambda run: (run / "heads.parquet").unlink(),
        "table file heads.parquet listed in manifest.json is missing",
        "re-run the analysis, or remove the directory",
    ),
    "table truncated": (
        lambda run: (run / "heads.parquet").write_bytes((run / "heads.parquet").read_bytes()[:-10]),
        "table file heads.parquet has",
        "re-run the analysis",
    ),
    "table bytes changed": (
        lambda run: _flip_middle_byte(run / "heads.parquet"),
        "heads.parquet does not match its sha256",
        "re-run the analysis, or remove the directory",
    ),
    "array deleted": (
        lambda run: (run / "arrays" / "a.npy").unlink(),
        "array file arrays/a.npy listed in manifest.json is missing",
        "re-run the analysis",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_run_is_refused_and_listed_as_damaged(root: Path, damage: str) -> None:
    damage_fn, why, fix = DAMAGE[damage]
    intact = write(root, analysis="other")
    run = write(root, arrays={"a": np.arange(4.0)})
    damage_fn(run)

    with pytest.raises(RunStoreError) as err:
        runstore.open_run(run)
    message = str(err.value)
    assert run.name in message
    assert why in message
    assert fix in message

    summaries = {s.path.name: s for s in runstore.list_runs(root)}
    assert summaries[intact.name].status == "ok"
    assert summaries[run.name].status.startswith("damaged: ")
    assert why in summaries[run.name].status
    assert "damaged" in runstore.format_runs_table(list(summaries.values()))


def test_verify_false_checks_sizes_not_hashes(root: Path) -> None:
    run = write(root)
    _flip_middle_byte(run / "heads.parquet")
    runstore.open_run(run, verify=False)  # same size: only hashing would notice
    with pytest.raises(RunStoreError, match="sha256"):
        runstore.open_run(run)
    (run / "heads.parquet").write_bytes(b"short")
    with pytest.raises(RunStoreError, match="has 5 bytes"):
        runstore.open_run(run, verify=False)


def test_missing_run_directory(root: Path) -> None:
    with pytest.raises(RunStoreError, match=r"no run directory at .*headlab runs"):
        runstore.open_run(root / "nothing-here")


def test_manifest_from_json_rejects_garbage() -> None:
    with pytest.raises(RunStoreError, match=r"invalid run manifest: manifest.json is not valid JSON"):
        RunManifest.from_json("{")


# ---------------------------------------------------------------------------------------- listing


def test_list_runs_newest_first_with_filters(root: Path) -> None:
    assert runstore.list_runs(root) == []
    assert runstore.format_runs_table([]) == "(no runs)"
    a = write(root, analysis="sinks")
    b = write(root, analysis="induction", tables={"heads": heads_table().iloc[:4]})
    c = write(root, analysis="sinks", model_info={**FAKE_MODEL, "name": "other-model"})
    (root / "notes.txt").write_text("not a run")

    summaries = runstore.list_runs(root)
    assert [s.path for s in summaries] == [c, b, a]
    assert all(isinstance(s, RunSummary) and s.ok for s in summaries)
    assert [s.n_heads for s in summaries] == [6, 4, 6]
    assert [s.path for s in runstore.list_runs(root, analysis="sinks")] == [c, a]
    assert [s.path for s in runstore.list_runs(root, model="fake-model")] == [b, a]
    assert [s.path for s in runstore.list_runs(root, analysis="sinks", model="other-model")] == [c]
    assert runstore.list_runs(root, analysis="nope") == []

    table = runstore.format_runs_table(summaries).splitlines()
    assert table[0].split() == ["run_id", "analysis", "model", "created", "(UTC)", "heads", "status"]
    assert len(table) == 2 + 3
    assert table[2].startswith(c.name) and table[2].rstrip().endswith("ok")


def test_default_root_comes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADLAB_RUNS", str(tmp_path / "elsewhere"))
    path = write(None)
    assert path.parent == tmp_path / "elsewhere"
    assert [s.path for s in runstore.list_runs()] == [path]
    monkeypatch.delenv("HEADLAB_RUNS")
    monkeypatch.chdir(tmp_path)
    assert runstore.runs_root() == Path("runs")


# ---------------------------------------------------------------------------------------- resolving


def test_resolve_run_by_id_prefix_path_and_latest(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write(root, analysis="sinks")
    second = write(root, analysis="induction")
    assert runstore.resolve_run(first.name, root) == first
    assert runstore.resolve_run(str(second), root) == second
    assert runstore.resolve_run(second, root) == second

    common = common_prefix(first.name, second.name)
    assert runstore.resolve_run(first.name[: len(common) + 1], root) == first
    assert runstore.resolve_run(second.name[: len(common) + 1], root) == second

    assert runstore.resolve_run("latest", root) == second
    assert runstore.resolve_run("latest:sinks", root) == first
    assert runstore.resolve_run("latest:induction", root) == second

    # The default root.
    monkeypatch.setenv("HEADLAB_RUNS", str(root))
    assert runstore.resolve_run("latest") == second


def test_resolve_run_latest_skips_damaged_runs(root: Path) -> None:
    older = write(root)
    newer = write(root)
    (newer / "heads.parquet").unlink()
    assert runstore.resolve_run("latest", root) == older
    (older / "manifest.json").unlink()
    with pytest.raises(RunStoreError, match=r"no intact run under .*damaged: .*remove them"):
        runstore.resolve_run("latest", root)


def test_resolve_run_ambiguous_and_unknown(root: Path) -> None:
    first = write(root)
    second = write(root)
    common = common_prefix(first.name, second.name)
    with pytest.raises(RunStoreError) as err:
        runstore.resolve_run(common, root)
    message = str(err.value)
    assert "ambiguous" in message and first.name in message and second.name in message
    assert "give more characters" in message

    with pytest.raises(RunStoreError, match=r"no run matches 'zzz' .*newest are: .*latest"):
        runstore.resolve_run("zzz", root)
    with pytest.raises(RunStoreError, match="no run directory at"):
        runstore.resolve_run("./does/not/exist", root)
    with pytest.raises(RunStoreError, match=r"no sinks run under .*run an analysis first"):
        runstore.resolve_run("latest:sinks", root.parent / "empty")
    with pytest.raises(ConfigError, match="empty run reference"):
        runstore.resolve_run("  ", root)


# ---------------------------------------------------------------------------------------- names & args


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"analysis": "bad name"}, "invalid analysis name 'bad name'.*'bad-name'"),
        ({"analysis": "../escape"}, "invalid analysis name"),
        ({"analysis": ""}, "invalid analysis name"),
        ({"tables": {"a/b": heads_table()}}, "invalid table name 'a/b'"),
        ({"tables": {"heads": heads_table(), "x.y": heads_table()}}, "invalid table name 'x.y'"),
        ({"tables": {"heads": heads_table(), "Heads": heads_table()}}, "differ only in case"),
        ({"arrays": {"arr ay": np.zeros(2)}}, "invalid array name 'arr ay'"),
        ({"tables": {}}, "at least one table"),
        ({"tables": {"heads": [1, 2]}}, "table 'heads' is a list; pass a pandas DataFrame"),
        ({"tables": {"heads": pd.DataFrame({0: [1]})}}, "non-string column names"),
        ({"arrays": {"a": [1, 2]}}, "array 'a' is a list; convert it with np.asarray"),
        ({"arrays": {"a": np.array([None, 1])}}, "Python objects"),
        ({"model_info": {"kind": "language"}}, "model_info has no 'name'.*describe"),
    ],
)
def test_bad_arguments_are_config_errors(root: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        write(root, **kwargs)
    assert root_is_empty(root)


# ---------------------------------------------------------------------------------------- code revision


def test_code_revision_is_none_outside_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _REAL_CODE_REVISION(tmp_path) is None
    assert _REAL_CODE_REVISION(tmp_path / "missing") is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git to be found
    assert _REAL_CODE_REVISION() is None


# ---------------------------------------------------------------------------------------- trust


def _set_manifest(run: Path, **fields: Any) -> None:
    data = json.loads((run / "manifest.json").read_text())
    data.update(fields)
    (run / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"run_id": "../../../../tmp/x/pwned"}, "field 'run_id' is not a plain name"),
        ({"run_id": "/etc/cron.d/x"}, "field 'run_id' is not a plain name"),
        ({"run_id": ".hidden"}, "field 'run_id' is not a plain name"),
        ({"analysis": "../census"}, "field 'analysis' is not a plain name"),
    ],
)
def test_manifest_names_that_are_not_plain_make_the_run_damaged(
    root: Path, fields: dict[str, str], why: str
) -> None:
    run = write(root)
    _set_manifest(run, **fields)
    with pytest.raises(RunStoreError, match=re.escape(why)):
        runstore.open_run(run)
    [summary] = runstore.list_runs(root)
    assert summary.damaged and why in summary.status
    with pytest.raises(RunStoreError, match="no intact run"):
        runstore.resolve_run("latest", root)


def test_run_directory_linking_out_of_the_root_is_damaged(root: Path, tmp_path: Path) -> None:
    intact = write(root)
    elsewhere = write(tmp_path / "elsewhere")
    link = root / "99999999-999999-sinks-fake-model-beef"  # newer than any run, by name and manifest
    link.symlink_to(elsewhere, target_is_directory=True)
    _set_manifest(elsewhere, created="2999-01-01T00:00:00+00:00")

    summaries = {s.run_id: s for s in runstore.list_runs(root)}
    assert summaries[intact.name].ok
    assert summaries[link.name].status.startswith("damaged: the run directory is a symbolic link to")
    with pytest.raises(RunStoreError, match=r"symbolic link to .*outside .*copy it"):
        runstore.open_run(link)
    with pytest.raises(RunStoreError, match="symbolic link"):
        runstore.open_run(runstore.resolve_run(link.name, root))
    assert runstore.resolve_run("latest", root) == intact
    runstore.open_run(elsewhere)  # the run itself, at its real place, is fine

    alias = root / "alias"  # a link to a run inside the root is no escape
    alias.symlink_to(intact, target_is_directory=True)
    assert runstore.open_run(alias).run_id == intact.name


@pytest.mark.parametrize("what", ["table", "arrays dir", "array", "manifest"])
def test_files_linking_out_of_the_run_are_damaged(root: Path, tmp_path: Path, what: str) -> None:
    run = write(root, arrays={"a": np.arange(4.0)})
    outside = tmp_path / "outside"
    outside.mkdir()
    inner = {
        "table": run / "heads.parquet",
        "arrays dir": run / "arrays",
        "array": run / "arrays" / "a.npy",
        "manifest": run / "manifest.json",
    }[what]
    moved = outside / inner.name
    inner.rename(moved)  # the same bytes: sizes and hashes still match
    inner.symlink_to(moved, target_is_directory=moved.is_dir())

    with pytest.raises(RunStoreError, match="symbolic link out of the run directory"):
        runstore.open_run(run)
    [summary] = runstore.list_runs(root)
    assert summary.damaged and "symbolic link out of the run directory" in summary.status
    with pytest.raises(RunStoreError, match="no intact run"):
        runstore.resolve_run("latest", root)


def test_copied_and_renamed_runs_are_listed_by_directory_name(root: Path) -> None:
    run = write(root)
    copy = root / "copy-of-run"
    shutil.copytree(run, copy)
    renamed = root / "my-favourite"
    shutil.copytree(run, renamed)
    shutil.rmtree(run)

    summaries = runstore.list_runs(root)
    assert sorted(s.run_id for s in summaries) == ["copy-of-run", "my-favourite"]
    assert all(s.ok and s.recorded_id == run.name for s in summaries)
    lines = runstore.format_runs_table(summaries).splitlines()
    assert lines[0].split()[-1] == "note"
    first_column = [line.split()[0] for line in lines[2:]]
    assert sorted(first_column) == ["copy-of-run", "my-favourite"]  # what `report` takes, all distinct
    assert all(f"copied/renamed from {run.name}" in line for line in lines[2:])
    assert runstore.resolve_run("my-favourite", root) == renamed
    assert runstore.open_run(runstore.resolve_run("copy", root)).run_id == run.name


def test_a_directory_that_is_no_run_is_not_advised_for_removal(root: Path, tmp_path: Path) -> None:
    stuff = tmp_path / "home"
    stuff.mkdir()
    (stuff / "notes.txt").write_text("mine")
    with pytest.raises(RunStoreError) as err:
        runstore.open_run(stuff)
    message = str(err.value)
    assert "is not a run directory" in message and "headlab runs" in message
    assert "remove" not in message

    run = write(root)
    (root / "scratch").mkdir()  # not a run, under the root
    summaries = {s.run_id: s for s in runstore.list_runs(root)}
    assert summaries["scratch"].status.startswith("not a run: ")
    assert not summaries["scratch"].damaged
    (run / "manifest.json").unlink()  # a run that lost its manifest is still damaged
    with pytest.raises(RunStoreError, match=r"manifest\.json is missing.*remove the directory"):
        runstore.open_run(run)
    with pytest.raises(RunStoreError) as err:
        runstore.resolve_run("latest", root)
    assert run.name in str(err.value) and "scratch" not in str(err.value)


# ---------------------------------------------------------------------------------------- the root


def test_a_root_that_cannot_take_runs_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(
        RunStoreError, match=r"runs root .*file is a file, not a directory; choose another root"
    ):
        runstore.check_root(a_file)
    with pytest.raises(RunStoreError, match=r"cannot be created: .*file is a file"):
        write(a_file / "runs")
    assert a_file.read_text() == "not a directory"

    missing = tmp_path / "new" / "runs"
    assert runstore.check_root(missing) == missing and not missing.exists()  # checked, not made

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempdirs.tempfile, "mkstemp", refuse)
    with pytest.raises(RunStoreError, match=r"cannot write into the runs root .*Permission denied.*--root"):
        runstore.check_root(tmp_path)
    with pytest.raises(RunStoreError, match="cannot write into the runs root"):
        write(tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------- temporaries

# Subprocesses load probe/tempdirs.py alone (it needs only the standard library): fast to start.
_LOAD_TEMPDIRS = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tempdirs", {str(Path(tempdirs.__file__))!r})
tempdirs = sys.modules["tempdirs"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tempdirs)
"""
_KILLED_WRITER = (
    _LOAD_TEMPDIRS
    + """
import os, signal
from pathlib import Path
with tempdirs.locked_tempdir(Path(sys.argv[1]), "", name=sys.argv[2]) as tmp:
    (tmp / "heads.parquet").write_bytes(b"x" * 2_000_000)
    os.kill(os.getpid(), signal.SIGKILL)
"""
)
_CLEANER = (
    _LOAD_TEMPDIRS + "print(len(tempdirs.remove_stale(__import__('pathlib').Path(sys.argv[1]), sys.argv[2])))"
)


def test_temporary_of_a_killed_writer_is_removed_and_reported(root: Path) -> None:
    root.mkdir()
    name = ".20250101-000000-sinks-fake-model-dead.tmp"
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(root), name], check=False)
    assert done.returncode == -signal.SIGKILL
    assert (root / name / "heads.parquet").is_file()  # what kill -9 leaves behind
    assert runstore.temporaries(root)[0][1].startswith("stale")

    [removed] = runstore.remove_stale_temporaries(root)
    assert removed.path == root / name and removed.bytes >= 2_000_000
    assert removed.pid is not None and "is gone" in removed.why
    assert not (root / name).exists()


def test_write_run_removes_dead_temporaries_but_never_a_live_writers(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root.mkdir()
    live = root / ".20250101-000000-sinks-fake-model-1111.tmp"
    live.mkdir()
    lock = live / tempdirs.LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 0}))
    old = time.time() - 7 * 86400
    os.utime(live, (old, old))
    dead = root / ".20250101-000000-sinks-fake-model-2222.tmp"
    dead.mkdir()
    (dead / "heads.parquet").write_bytes(b"half")
    os.utime(dead, (old, old))  # no lock, untouched for a week: left by a crash
    fresh = root / ".20250101-000000-sinks-fake-model-3333.tmp"
    fresh.mkdir()  # no lock yet, just made: a writer starting now

    with lock.open("r") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # this live process is the writer
        path = write(root)
        assert live.is_dir() and fresh.is_dir() and not dead.exists()
        assert runstore.remove_stale_temporaries(root) == []
        assert [p.name for p, _ in runstore.temporaries(root)] == sorted([live.name, fresh.name])
    [removed] = runstore.remove_stale_temporaries(root)  # the lock was let go: its writer is gone
    assert removed.path == live and not live.exists()
    assert runstore.open_run(path).run_id == path.name


def test_another_process_never_removes_the_temporary_being_written(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def meanwhile(source_dir: Any = None) -> str:  # called while the run is being written
        [tmp] = list(root.glob(".*.tmp"))
        done = subprocess.run(
            [sys.executable, "-c", _CLEANER, str(root), runstore.TEMP_GLOB], capture_output=True, text=True
        )
        seen.append(done.stdout.strip())
        assert tmp.is_dir() and (tmp / tempdirs.LOCK_NAME).is_file()
        return FAKE_REVISION

    monkeypatch.setattr(runstore, "code_revision", meanwhile)
    path = write(root)
    assert seen == ["0"]
    assert sorted(p.name for p in root.iterdir()) == [path.name]
    assert not (path / tempdirs.LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------- NaN heads


def test_heads_without_any_number_are_refused(root: Path) -> None:
    heads = heads_table()
    heads["entropy"] = np.linspace(0.5, 1.0, 6)
    heads["entropy_sem"] = 0.0  # standard errors do not count as measurements
    heads.loc[3:, ["score", "entropy"]] = np.nan  # layer 1: nothing measured
    with pytest.raises(RunStoreError) as err:
        write(root, tables={"heads": heads})
    message = str(err.value)
    assert "NaN in every metric column for 3 of 6 heads" in message and "L1H0" in message
    assert "non-finite attention" in message and "`headlab fetch fake-model --force`" in message
    assert root_is_empty(root)

    partly = heads_table()
    partly["entropy"] = [0.1, np.nan, 0.3, np.nan, 0.5, 0.6]  # some heads lack one score: fine
    partly.loc[2, "score"] = np.nan
    runstore.open_run(write(root, tables={"heads": partly}))
    declared = write(root, tables={"heads": heads.drop(columns="score")}, nan_ok=("entropy",))
    assert runstore.open_run(declared).heads["entropy"].isna().sum() == 3


# ---------------------------------------------------------------------------------------- versions


def test_version_differences(root: Path) -> None:
    run = runstore.open_run(write(root))
    assert runstore.version_differences(run.manifest) == []
    recorded = run.manifest.package_versions
    now = {**recorded, "torch": "9.9.9", "pandas": None}
    assert runstore.version_differences(run.manifest, now) == [
        ("pandas", recorded["pandas"], None),
        ("torch", recorded["torch"], "9.9.9"),
    ]
    text = runstore.format_version_differences(runstore.version_differences(run.manifest, now))
    assert text == f"pandas {recorded['pandas']} (now not installed), torch {recorded['torch']} (now 9.9.9)"
