"""The start page and the run pickers show which sweep made a run, filter the listing by sweep, and
give an overview of every sweep under the root (its counts, failed tasks' errors, links to its runs);
a damaged or misplaced sweep.json is one line on the page, never a crash or a file outside the root."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import probe
from analyses import runstore
from analyses import sweep as sweeps
from analyses.census import CensusConfig, run_census
from analyses.sweep.state import STATE_FILE, SWEEPS_DIR
from dashboard.app import build_pages, create_app
from dashboard.census.page import CensusPage
from dashboard.core.home import HomePage
from tests.conftest import fixed_code_revision, render_route, to_json

CENSUS = {"n_natural": 2, "n_repeated": 2, "seq_len": 16, "repeat_len": 4, "batch_size": 2, "n_examples": 1}


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A runs root holding the two runs of sweep ``small`` (seeds 0 and 1) and one census run made
    by hand, outside any sweep."""
    root = tmp_path_factory.mktemp("sweep") / "runs"
    spec = sweeps.check_spec(
        {"name": "small", "models": ["tiny-llama"], "seeds": [0, 1], "analyses": {"census": {"set": CENSUS}}}
    )
    with fixed_code_revision():
        sweeps.run_sweep(spec, root=root, in_process=True, progress=False)
        model = probe.load_model("tiny-llama", device="cpu")
        run_census(model, CensusConfig(**CENSUS, seed=5), progress=False).save(root)
    yield root


@pytest.fixture
def root(sweep_root: Path, tmp_path: Path) -> Path:
    """A private copy of the runs and the sweep's manifest, free to change."""
    return Path(shutil.copytree(sweep_root, tmp_path / "runs"))


def _home(root: Path) -> HomePage:
    return next(p for p in build_pages(root) if isinstance(p, HomePage))


def _find(component: Any, element_id: str) -> Any:
    return next(c for c in component._traverse() if getattr(c, "id", None) == element_id)


def _text(node: Any) -> str:
    """The text a component shows (its children's, joined)."""
    if node is None:
        return ""
    if isinstance(node, str | int | float):
        return str(node)
    if isinstance(node, list | tuple):
        return "".join(_text(n) for n in node)
    return _text(getattr(node, "children", None))


def _rows(layout: Any, table_id: str) -> list[dict[str, str]]:
    """A table of the page as one {header: cell text} dict per body row."""
    thead, tbody = _find(layout, table_id).children
    headers = [_text(th) for th in thead.children.children]
    return [dict(zip(headers, (_text(td) for td in tr.children), strict=False)) for tr in tbody.children]


def _sweep_notes(root: Path) -> dict[str, dict[str, Any]]:
    """run id -> the sweep its manifest records (missing for runs made outside a sweep)."""
    notes = {s.run_id: runstore.open_run(s.path).notes.get("sweep") for s in runstore.list_runs(root)}
    return {run_id: note for run_id, note in notes.items() if note is not None}


def _manifest(root: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / SWEEPS_DIR / name / STATE_FILE).read_text())
    return data


def _write_manifest(root: Path, name: str, data: dict[str, Any] | str) -> Path:
    path = root / SWEEPS_DIR / name / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_the_listing_names_each_runs_sweep_and_seed_and_filters_by_sweep(root: Path) -> None:
    notes = _sweep_notes(root)
    (outside,) = {s.run_id for s in runstore.list_runs(root)} - set(notes)
    assert sorted(n["seed"] for n in notes.values()) == [0, 1] and len(notes) == 2
    home = _home(root)
    rows = {r["run"]: r for r in _rows(home.layout({}), "runs-table")}
    assert set(rows) == {*notes, outside}
    for run_id, note in notes.items():
        assert rows[run_id]["sweep"] == f"small (seed {note['seed']})"
    assert rows[outside]["sweep"] == ""

    by_task = sorted(notes, key=lambda run_id: notes[run_id]["task"])
    assert [r["run"] for r in _rows(home.layout({"sweep": "small"}), "runs-table")] == by_task
    assert [r["run"] for r in _rows(home.layout({"sweep": "(none)"}), "runs-table")] == [outside]
    for unknown in ("../../etc", "nope"):  # names no sweep under the root has: every run, and a message
        layout = home.layout({"sweep": unknown})
        assert {r["run"] for r in _rows(layout, "runs-table")} == set(rows)
        assert f"No sweep {unknown!r} under the root" in to_json(layout)
    links = _text(_find(home.layout({"sweep": "small"}), "runs-filter"))
    assert "all runs (3)" in links and "outside sweeps (1)" in links and "sweep small (2)" in links

    # Through the app's routing, as a browser asks for it; and the census page's run picker says it too.
    app = create_app(root)
    page = render_route(app, "/", "?sweep=small")
    assert all(f"/census?run={run_id}" in page for run_id in notes) and f"/census?run={outside}" not in page
    census = next(p for p in build_pages(root) if isinstance(p, CensusPage))
    labels = {o["value"]: o["label"] for o in census.run_options()}
    for run_id, note in notes.items():
        assert labels[run_id].endswith(f"sweep small (seed {note['seed']})")
    assert "sweep" not in labels[outside]


def test_the_overview_counts_a_finished_sweep_and_links_each_task_to_its_run(root: Path) -> None:
    manifest = _manifest(root, "small")
    home = _home(root)
    (row,) = _rows(home.layout({}), "sweeps-table")
    assert row["sweep"] == "small" and row["state"] == "finished" and row["models loaded"] == "1"
    assert [row[s] for s in ("done", "skipped", "failed", "refused", "pending", "running")] == [
        "2",
        "0",
        "0",
        "0",
        "0",
        "0",
    ]
    assert row["updated"].startswith(manifest["updated"][:10]) and row["errors"] == ""
    layout = home.layout({"sweep": "small"})
    tasks = _rows(layout, "sweep-tasks")
    assert [(t["task"], t["seed"], t["status"]) for t in tasks] == [("0", "0", "done"), ("1", "1", "done")]
    assert [t["run"] for t in tasks] == [t["run_id"] for t in manifest["tasks"]]
    text = to_json(layout)
    assert all(f'"href": "/census?run={t["run_id"]}"' in text for t in manifest["tasks"])


def test_the_overview_shows_a_failed_tasks_error_and_every_count(root: Path) -> None:
    done = _manifest(root, "small")["tasks"][0]
    base = {"model": "tiny-gpt2", "analysis": "census", "label": "census on tiny-gpt2", "settings": {}}
    tasks = [
        {**done, "status": "done"},
        {
            **base,
            "index": 1,
            "seed": 1,
            "status": "failed",
            "attempts": 3,
            "error": "RuntimeError: CUDA out of memory",
        },
        {
            **base,
            "index": 2,
            "seed": 2,
            "status": "refused",
            "attempts": 1,
            "error": "ConfigError: seq_len too long",
        },
        {**base, "index": 3, "seed": 3, "status": "pending"},
        {**base, "index": 4, "seed": 4, "status": "running", "run_id": "../../etc"},  # a run id no run has
    ]
    _write_manifest(
        root,
        "gpu-run",
        {"name": "gpu-run", "state": "interrupted", "updated": "2025-03-04T05:06:07+00:00", "tasks": tasks},
    )
    home = _home(root)
    rows = {r["sweep"]: r for r in _rows(home.layout({}), "sweeps-table")}
    assert list(rows) == ["gpu-run", "small"]
    row = rows["gpu-run"]
    assert row["state"] == "interrupted" and row["updated"] == "2025-03-04 05:06:07 UTC"
    assert [row[s] for s in ("done", "skipped", "failed", "refused", "pending", "running")] == [
        "1",
        "0",
        "1",
        "1",
        "1",
        "1",
    ]
    assert row["models loaded"] == ""  # not recorded: left blank
    assert "1 failed, 1 refused" in row["errors"]
    assert (
        "task 1 (census on tiny-gpt2, seed 1), failed after 3 attempt(s): RuntimeError: CUDA out of memory"
        in row["errors"]
    )
    assert "ConfigError: seq_len too long" in row["errors"]

    tasks_shown = {t["task"]: t for t in _rows(home.layout({"sweep": "gpu-run"}), "sweep-tasks")}
    assert tasks_shown["0"]["run"] == done["run_id"] and tasks_shown["1"]["error"].startswith("RuntimeError")
    assert tasks_shown["4"]["run"] == "../../etc (not under the root)"  # shown, never linked or opened
    text = to_json(home.layout({"sweep": "gpu-run"}))
    assert f"/census?run={done['run_id']}" in text and "?run=../../etc" not in text
    # The sweep has a manifest but no run of its own records it: the filter keeps no run.
    assert "No run under the root matches this filter" in text


def test_a_damaged_or_misplaced_sweep_manifest_is_one_line_not_a_crash(root: Path, tmp_path: Path) -> None:
    broken = _write_manifest(root, "broken", '{"name": "broken", "tasks": [')
    _write_manifest(root, "wrong", {"name": "wrong", "tasks": [{"index": 0, "status": "exploded"}]})
    outside = _write_manifest(tmp_path / "elsewhere", "secret", _manifest(root, "small"))
    (root / SWEEPS_DIR / "linked").mkdir()
    (root / SWEEPS_DIR / "linked" / STATE_FILE).symlink_to(outside)
    (root / SWEEPS_DIR / "no-manifest").mkdir()
    app = create_app(root)
    page = render_route(app, "/")
    assert "could not be drawn" not in page and "Something went wrong" not in page
    home = _home(root)
    rows = {r["sweep"]: r for r in _rows(home.layout({}), "sweeps-table")}
    assert list(rows) == ["broken", "linked", "no-manifest", "small", "wrong"]
    messages = {name: next(v for k, v in row.items() if k != "sweep") for name, row in rows.items()}
    assert messages["broken"].startswith(".sweeps/broken/sweep.json is damaged: not JSON")
    assert messages["wrong"] == (
        ".sweeps/wrong/sweep.json is damaged: task 0 has no index or no known status; its runs are still "
        "listed, and the next `headlab sweep` of it writes the manifest again"
    )
    assert "lies outside the run store" in messages["linked"] and "secret" not in page
    assert "written no manifest" in messages["no-manifest"]
    assert all("\n" not in m for m in messages.values())
    assert rows["small"]["done"] == "2"  # the readable sweep is still shown in full
    # Mended, the manifest is read again (the cache follows the file).
    data = _manifest(root, "small")
    broken.write_text(json.dumps({**data, "name": "broken", "state": "running"}))
    (mended,) = [r for r in _rows(home.layout({}), "sweeps-table") if r["sweep"] == "broken"]
    assert mended["state"] == "running" and mended["done"] == "2"


def test_a_running_sweep_whose_driver_died_is_shown_as_interrupted(root: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is now no process's
    here = socket.gethostname()
    task = {"index": 0, "key": "k", "model": "tiny-llama", "analysis": "census", "status": "running"}
    for name, pid, host in (
        ("dead", gone.pid, here),
        ("alive", os.getpid(), here),
        ("remote", gone.pid, "elsewhere"),
    ):
        _write_manifest(
            root,
            name,
            {"name": name, "state": "running", "driver": {"host": host, "pid": pid}, "tasks": [task]},
        )
    rows = {r["sweep"]: r["state"] for r in _rows(_home(root).layout({}), "sweeps-table")}
    assert rows["dead"] == "interrupted (its driver is gone)"
    assert rows["alive"] == "running"
    assert rows["remote"] == "running"  # another host's process cannot be asked
