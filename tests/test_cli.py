"""The command line end to end on a tiny model: run, list, report, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def headlab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "analyses.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def test_run_census_then_runs_then_report(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    proc = headlab(
        "run", "census", "--model", "tiny-llama", "--root", str(root),
        "--set", "n_natural=3", "--set", "seq_len=24", "--set", "n_repeated=2", "--set", "repeat_len=6",
        cwd=tmp_path,
    )  # fmt: skip
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


def test_bad_settings_are_one_line_errors(tmp_path: Path) -> None:
    proc = headlab("run", "census", "--model", "tiny-llama", "--set", "n_natural=0", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "n_natural" in proc.stderr
    proc = headlab("run", "census", "--model", "tiny-llama", "--set", "colour=red", cwd=tmp_path)
    assert proc.returncode == 2 and "valid:" in proc.stderr
    proc = headlab("run", "census", "--model", "tiny-llama", "--set", "mode=fused", cwd=tmp_path)
    assert proc.returncode == 2 and "eager" in proc.stderr
    proc = headlab("report", "no-such-run", "--root", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
    proc = headlab("run", "census", "--model", "tiny-gpt2", "--set", "seq_len=400", cwd=tmp_path)
    assert proc.returncode == 2 and "longer than tiny-gpt2 allows" in proc.stderr


def test_every_registered_analysis_has_a_run_command(tmp_path: Path) -> None:
    from analyses.cli import RUN_COMMANDS
    from analyses.registry import ANALYSES

    assert set(RUN_COMMANDS) == set(ANALYSES)
    for name in ANALYSES:
        proc = headlab("run", name, "--show-config", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.lstrip().startswith("{")
