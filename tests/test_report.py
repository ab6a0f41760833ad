"""Static HTML reports: one self-contained file, every census figure, atomic writes, damaged runs."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.offline
import pytest

import probe
from analyses import census, runstore
from analyses.census import CensusConfig, run_census
from dashboard import report
from dashboard.report import write_report
from probe.errors import RunStoreError
from probe.loading import LoadedModel

SMALL = CensusConfig(n_natural=4, n_repeated=2, seq_len=32, repeat_len=8, n_examples=2)


@pytest.fixture(scope="module")
def census_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One census run of the tiny llama, shared by the module (runs are immutable)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", lambda source_dir=None: "0" * 40)
        model = probe.load_model("tiny-llama", device="cpu")
        path = run_census(model, SMALL, progress=False).save(tmp_path_factory.mktemp("runs"))
    yield path


def _damaged_copy(run: Path, root: Path) -> Path:
    """A copy of ``run`` under ``root`` whose heads table no longer matches its sha256."""
    copy = root / run.name
    shutil.copytree(run, copy)
    table = copy / "heads.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF
    table.write_bytes(bytes(data))
    return copy


def test_report_is_one_self_contained_file_with_every_census_figure(census_run: Path, tmp_path: Path) -> None:
    out = write_report(census_run, tmp_path / "census.html")
    assert out == tmp_path / "census.html"
    text = out.read_text(encoding="utf-8")
    bundle = plotly.offline.get_plotlyjs()
    middle = bundle[len(bundle) // 2 : len(bundle) // 2 + 300]
    assert text.count(middle) == 1  # plotly.js inlined exactly once
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing fetched: opens offline
    outside_bundle = text.replace(bundle, "")  # (the bundle itself mentions a CDN it never uses here)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", outside_bundle)
    for metric in census.METRICS:
        assert f'id="census-heatmap-{metric}"' in text
        assert census.METRIC_LABELS[metric] in text
    for part in ("census-distributions-figure", "census-top-heads", "census-pattern-induction"):
        assert part in text
    manifest = runstore.open_run(census_run).manifest
    assert "tiny-llama" in text and manifest.model["weight_sha256"][:16] in text
    for key, value in manifest.config.items():
        assert f"<td>{key}</td><td>{value}</td>" in text
    assert manifest.run_id in text and "transformer-lens" in text


def test_report_draws_patterns_as_images_with_token_hover(census_run: Path, tmp_path: Path) -> None:
    text = write_report(census_run, tmp_path / "r.html").read_text(encoding="utf-8")
    assert '"type":"image"' in text and "data:image\\u002fpng;base64," in text
    assert '"hovertext":[["query 0 ' in text and "weight %{customdata:.3f}" in text


def test_default_output_is_reports_dir_and_the_run_is_untouched(
    census_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(census_run) for p in census_run.rglob("*"))
    out = write_report(census_run)
    assert out == Path("reports") / f"{census_run.name}.html" and out.is_file()
    assert sorted(p.relative_to(census_run) for p in census_run.rglob("*")) == before
    runstore.open_run(census_run, verify=True)  # still intact: checksums unchanged


def test_out_directory_receives_run_id_file_and_no_temporaries(census_run: Path, tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    assert write_report(census_run, existing) == existing / f"{census_run.name}.html"
    fresh = tmp_path / "fresh" / "reports"  # no suffix: a directory, made on demand
    assert write_report(census_run, fresh) == fresh / f"{census_run.name}.html"
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_failed_write_keeps_previous_report_and_leaves_no_temporary(
    census_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r.html"
    out.write_text("previous report")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(census_run, out)
    assert out.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]

    monkeypatch.undo()
    monkeypatch.setattr(report.os, "fsync", fail)  # fails after the temporary file was written
    with pytest.raises(OSError):
        write_report(census_run, out)
    assert out.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_damaged_run_raises_run_store_error_and_writes_nothing(census_run: Path, tmp_path: Path) -> None:
    damaged = _damaged_copy(census_run, tmp_path / "runs")
    out = tmp_path / "out" / "r.html"
    with pytest.raises(RunStoreError, match=r"heads\.parquet.*sha256.*re-run the analysis"):
        write_report(damaged, out)
    (damaged / runstore.MANIFEST).unlink()
    with pytest.raises(RunStoreError, match=r"manifest\.json is missing"):
        write_report(damaged, out)
    with pytest.raises(RunStoreError, match="no run directory"):
        write_report(tmp_path / "nowhere", out)
    assert not out.exists()


def test_analysis_without_a_section_gets_generic_heat_maps_with_escaped_names(tmp_path: Path) -> None:
    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "kv_head": [0, 0, 0, 0]})
    heads["sink_score"] = np.array([0.1, 0.9, 0.2, 0.3])
    heads["sink_score_sem"] = 0.01
    model = {"name": "<script>alert(1)</script>", "weight_sha256": "cd" * 32, "caveat": "made up"}
    path = runstore.write_run(
        tmp_path / "runs", analysis="unregistered", model_info=model, config={"k": 1}, tables={"heads": heads}
    )
    text = write_report(path, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="heads-heatmap-0"' in text and "sink_score" in text
    assert "heads-heatmap-1" not in text  # standard errors are not drawn as maps
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "made up" in text


@pytest.mark.real
def test_real_model_report_shows_the_quantised_weights_caveat(smollm: LoadedModel, tmp_path: Path) -> None:
    config = CensusConfig(n_natural=4, n_repeated=2, seq_len=48, repeat_len=12, n_examples=1)
    path = run_census(smollm, config, progress=False).save(tmp_path / "runs")
    text = write_report(path, tmp_path / "real.html").read_text(encoding="utf-8")
    assert smollm.caveat.startswith("4-bit") and smollm.caveat in text
    assert "smollm2-135m" in text and smollm.weight_sha256[:16] in text
    top = runstore.open_run(path).heads.nlargest(1, "induction").iloc[0]
    assert f"L{int(top['layer'])}H{int(top['head'])}: top induction head" in text
