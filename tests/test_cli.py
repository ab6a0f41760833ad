"""The command line end to end on a tiny model: run, list, report, bad input."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import probe
from analyses import runstore
from analyses.base import AnalysisResult
from analyses.registry import ANALYSES
from dashboard import report as report_module
from headlab import cli
from probe import tempdirs

_SETTINGS = ("n_natural=3", "seq_len=24", "n_repeated=2", "repeat_len=6")
TINY_CENSUS = ("run", "census", "--model", "tiny-llama", *(a for s in _SETTINGS for a in ("--set", s)))
"""A census run small enough for a test."""


def headlab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "headlab.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def test_run_census_then_runs_then_report(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    proc = headlab(
        *TINY_CENSUS,
        "--root",
        str(root),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "census of tiny-llama: 12 heads" in proc.stdout
    runs = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1 and (runs[0] / "heads.parquet").is_file() and (runs[0] / "manifest.json").is_file()
    listing = headlab("runs", "--root", str(root), cwd=tmp_path)
    assert listing.returncode == 0 and runs[0].name in listing.stdout
    out = tmp_path / "r.html"
    rep = headlab("report", "latest:census", "--root", str(root), "--out", str(out), cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    html = out.read_text()
    assert "tiny-llama" in html and html.count("<html") == 1


def test_bad_settings_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = headlab("run", "census", "--model", "tiny-llama", "--set", "n_natural=0", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "n_natural" in proc.stderr
    monkeypatch.chdir(tmp_path)  # the rest through the same main() in this process
    for args, words in (
        (("run", "census", "--model", "tiny-llama", "--set", "colour=red"), "valid:"),
        (("run", "census", "--model", "tiny-llama", "--set", "mode=fused"), "eager"),
        (("report", "no-such-run", "--root", str(tmp_path)), "error:"),
        (("run", "census", "--model", "tiny-gpt2", "--set", "seq_len=400"), "longer than tiny-gpt2 allows"),
    ):
        code, _, err = main(monkeypatch, capsys, *args)
        assert code == 2 and words in err and err.strip().count("\n") == 0, (args, err)


def test_every_registered_analysis_has_a_run_command(tmp_path: Path) -> None:
    from analyses.registry import ANALYSES
    from headlab.cli import run_app

    commands = {c.name: c for c in run_app.registered_commands}
    aliases = {alias for entry in ANALYSES.values() for alias in entry.aliases}
    assert set(commands) == set(ANALYSES) | aliases
    assert all(commands[a].hidden for a in aliases) and not any(commands[n].hidden for n in ANALYSES)
    proc = headlab("run", "colored_objects", "--show-config", cwd=tmp_path)  # an alias runs its analysis
    assert proc.returncode == 0 and '"n_items"' in proc.stdout, proc.stderr
    from typer.testing import CliRunner

    for name in ANALYSES:  # the same command in this process (a process each costs seconds of imports)
        shown = CliRunner().invoke(cli.app, ["run", name, "--show-config"])
        assert shown.exit_code == 0, shown.output
        assert shown.stdout.lstrip().startswith("{")


# ---------------------------------------------------------------------------------------- in process


FAKE_MODEL = {"name": "fake-model", "n_layers": 1, "n_heads": 2}


def main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """``headlab ARGS`` through :func:`headlab.cli.main` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["headlab", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    captured = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), captured.out, captured.err


def saved_run(root: Path) -> Path:
    heads = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "score": [0.5, 0.25]})
    return runstore.write_run(
        root, analysis="unregistered", model_info=FAKE_MODEL, config={}, tables={"heads": heads}
    )


def test_ctrl_c_says_what_was_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    earlier = saved_run(root)

    def interrupted(model: object, config: object) -> AnalysisResult:
        raise KeyboardInterrupt

    monkeypatch.setitem(ANALYSES, "census", dataclasses.replace(ANALYSES["census"], run=interrupted))
    code, _, err = main(monkeypatch, capsys, "run", "census", "--model", "tiny-llama", "--root", str(root))
    assert code == 130
    assert err == (
        "interrupted: nothing was saved for this run (a run is written only once complete); runs "
        f"already saved under {root} are intact\n"
    )
    assert sorted(p.name for p in root.iterdir()) == [earlier.name]

    def slow_render(run: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "render_report", slow_render)
    out = tmp_path / "r.html"
    code, _, err = main(monkeypatch, capsys, "report", earlier.name, "--root", str(root), "--out", str(out))
    assert code == 130 and err.startswith("interrupted: no report was written") and not out.exists()


def test_a_root_that_cannot_take_the_run_fails_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded although the run could not be saved")

    monkeypatch.setattr(probe, "load_model", no_loading)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for root, why in [(a_file, "is a file, not a directory"), (a_file / "runs", "cannot be created")]:
        code, _, err = main(
            monkeypatch, capsys, "run", "census", "--model", "tiny-llama", "--root", str(root)
        )
        assert code == 2 and err.startswith("error: the runs root") and why in err
        assert err.count("\n") == 1 and "--root" in err

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempdirs.tempfile, "mkstemp", refuse)
    code, _, err = main(monkeypatch, capsys, "run", "census", "--root", str(tmp_path))
    assert code == 2 and "cannot write into the runs root" in err and "Permission denied" in err


def test_report_of_what_is_no_run_and_to_where_nothing_can_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    code, _, err = main(monkeypatch, capsys, "report", str(home))
    assert code == 2 and err.count("\n") == 1
    assert f"error: {home} is not a run directory" in err and "headlab runs" in err and "remove" not in err
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]

    run = saved_run(tmp_path / "runs")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = main(monkeypatch, capsys, "report", str(run), "--out", str(a_file / "r.html"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: cannot write the report to {a_file / 'r.html'}") and "--out" in err


def test_runs_lists_directory_names_and_temporaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    run = saved_run(root)
    shutil.copytree(run, root / "copy")
    stale = root / f".{run.name[:-4]}dead.tmp"
    stale.mkdir()
    (stale / "heads.parquet").write_bytes(b"x" * 3_000_000)
    week_ago = time.time() - 7 * 86400
    os.utime(stale, (week_ago, week_ago))
    fresh = root / f".{run.name[:-4]}live.tmp"
    fresh.mkdir()

    code, out, _ = main(monkeypatch, capsys, "runs", "--root", str(root))
    assert code == 0
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    assert sorted(line.split()[0] for line in lines[rule + 1 :]) == sorted([run.name, "copy"])
    assert f"copied/renamed from {run.name}" in out
    assert f"stale temporary: {stale.name} (3.0 MB): no writer lock" in out and "; removed" in out
    assert f"temporary: {fresh.name}: being written" in out
    assert not stale.exists() and fresh.is_dir()


def test_a_model_with_non_finite_attention_is_not_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_load = probe.load_model

    def broken(*args: Any, **kwargs: Any) -> Any:
        model = real_load(*args, **kwargs)
        with torch.no_grad():
            for name, weight in model.hf_model.named_parameters():
                if "layers.1." in name and "q_proj" in name:
                    weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(probe, "load_model", broken)
    root = tmp_path / "runs"
    code, _, err = main(
        monkeypatch,
        capsys,
        *TINY_CENSUS,
        "--root",
        str(root),
    )
    assert code == 2 and err.count("\n") == 1
    assert "refusing to save the census run of tiny-llama" in err and "for 8 of 12 heads" in err
    assert "'entropy' 8" in err and "`headlab fetch tiny-llama --force`" in err
    assert not root.exists() or list(root.iterdir()) == []


def test_analyses_lists_every_registration_with_its_pieces_or_reasons(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = main(monkeypatch, capsys, "analyses")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert list(rows) == list(ANALYSES)
    for entry in ANALYSES.values():
        assert entry.docs is not None and entry.docs in rows[entry.name]
        if entry.demo is None:
            assert f"(not run: {entry.opt_outs['demo']}" in rows[entry.name]
        elif not entry.demo:
            assert rows[entry.name].rstrip().endswith("defaults")
