"""Static HTML reports: one self-contained file, every census figure, atomic writes, damaged runs."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.offline
import pytest
import torch

import probe
from analyses import census, runstore
from analyses.census import CensusConfig, run_census
from dashboard import report
from dashboard.catalog import RunCatalog
from dashboard.census.page import CensusPage
from dashboard.core.page import Site
from dashboard.report import write_report
from probe.errors import HeadlabError, RunStoreError
from probe.loading import LoadedModel
from tests.conftest import fixed_revision

SMALL = CensusConfig(n_natural=4, n_repeated=2, seq_len=32, repeat_len=8, n_examples=2)


@pytest.fixture(scope="module")
def census_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One census run of the tiny llama, shared by the module (runs are immutable)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
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
    with pytest.raises(report.ReportWriteError, match=r"cannot write the report to .*disk full"):
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


# ---------------------------------------------------------------------------------------- trust


def _copy(run: Path, root: Path, name: str | None = None) -> Path:
    copy = root / (name or run.name)
    shutil.copytree(run, copy)
    return copy


def _edit_manifest(run: Path, **fields: object) -> None:
    data = json.loads((run / runstore.MANIFEST).read_text())
    data.update(fields)
    (run / runstore.MANIFEST).write_text(json.dumps(data))


def test_run_id_from_a_crafted_manifest_never_leaves_the_reports_dir(
    census_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crafted = _copy(census_run, tmp_path / "runs")
    _edit_manifest(crafted, run_id="../../../../x/pwned")
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(RunStoreError, match=r"field 'run_id' is not a plain name"):
        write_report(crafted)  # default: ./reports/<run_id>.html
    with pytest.raises(RunStoreError, match=r"not a plain name"):
        write_report(crafted, work / "out")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.suffix == ".html") == []
    assert not (tmp_path / "x").exists() and not (work / "reports").exists()
    with pytest.raises(RunStoreError, match="not a plain name"):  # the same check at the last step
        report._target(work / "out", "../pwned")


def test_run_linked_from_outside_the_root_is_not_reported(census_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    link = root / census_run.name
    link.symlink_to(census_run, target_is_directory=True)
    with pytest.raises(RunStoreError, match="symbolic link"):
        write_report(link, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()

    catalog = RunCatalog(root)
    [entry] = catalog.entries()
    assert entry.status.startswith("damaged: the run directory is a symbolic link")
    with pytest.raises(RunStoreError, match="symbolic link"):
        catalog.open(census_run.name)


def test_catalog_notices_a_run_replaced_by_a_link(census_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = _copy(census_run, root)
    catalog = RunCatalog(root)
    assert catalog.open(run.name).run_id == run.name  # intact, and now cached
    elsewhere = _copy(census_run, tmp_path / "elsewhere")
    shutil.rmtree(run)
    run.symlink_to(elsewhere, target_is_directory=True)  # the same files, behind a link
    with pytest.raises(RunStoreError, match="symbolic link"):
        catalog.open(run.name)
    (elsewhere / "heads.parquet").rename(tmp_path / "heads.parquet")
    shutil.rmtree(root)
    _copy(census_run, root)
    (root / run.name / "heads.parquet").unlink()
    (root / run.name / "heads.parquet").symlink_to(tmp_path / "heads.parquet")
    assert not catalog.entries()[0].ok
    with pytest.raises(RunStoreError, match="symbolic link out of the run directory"):
        catalog.open(run.name)


def test_unwritable_output_is_a_one_line_error_and_keeps_nothing(census_run: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file / "r.html", a_file / "reports"):
        with pytest.raises(
            report.ReportWriteError,
            match=r"cannot write the report to .*file is a file, not a directory; choose another output",
        ):
            write_report(census_run, out)
    assert a_file.read_text() == "x"
    assert isinstance(report.ReportWriteError("x"), HeadlabError)


def test_report_says_when_the_run_was_made_under_other_versions(census_run: Path, tmp_path: Path) -> None:
    same = write_report(census_run, tmp_path / "same.html").read_text(encoding="utf-8")
    assert "Other versions" not in same
    older = _copy(census_run, tmp_path / "runs")
    recorded = runstore.open_run(older).manifest.package_versions
    _edit_manifest(older, package_versions={**recorded, "torch": "1.0.0", "numpy": "1.0.1"})
    text = write_report(older, tmp_path / "older.html").read_text(encoding="utf-8")
    assert "<b>Other versions:</b> this run was made under other package versions" in text
    assert f"numpy 1.0.1 (now {np.__version__}), torch 1.0.0 (now {torch.__version__})" in text
    assert f"<td>torch</td><td>1.0.0 (now {torch.__version__})</td>" in text

    catalog = RunCatalog(tmp_path / "runs")
    assert "torch 1.0.0 (now" in catalog.version_note(older.name)
    assert catalog.version_note("nope") == ""
    page = CensusPage(Site(catalog))
    notes = json.dumps([n.to_plotly_json() for n in page.choose_run({}).notes], default=str)
    assert "made under other package versions" in notes and "torch 1.0.0" in notes
    assert RunCatalog(census_run.parent).version_note(census_run.name) == ""


def test_copies_of_a_run_get_reports_named_after_their_directories(census_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    first = _copy(census_run, root)
    second = _copy(census_run, root, name=f"{census_run.name}-copy")
    out = tmp_path / "reports"
    written = {write_report(first, out), write_report(second, out)}
    assert written == {out / f"{first.name}.html", out / f"{second.name}.html"}
    odd = _copy(census_run, root, name="a copy (2)")  # no plain name: the manifest's id is used
    assert write_report(odd, out) == out / f"{census_run.name}.html"
