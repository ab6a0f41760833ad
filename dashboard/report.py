"""Static HTML reports: one self-contained file per run that opens offline.

Background
----------
A report is the run's manifest summary (what model, weights, dtype, device, BOS policy, config,
seeds, versions, code revision, timings, and the model's caveat, e.g. quantised weights) followed by
the sections of its analysis (its ``dashboard/<analysis>/report.py``, found by :mod:`dashboard.registry`). plotly.js is inlined once in ``<head>``
and every figure is a ``<div>`` plus a small script, so the file needs no network and no other
file. Runs are immutable and checksummed, so the report is written outside the run directory,
by default to ``./reports/<run_id>.html``; it is written to a temporary file in the target
directory and renamed, so a reader never sees half a report and an earlier report survives a
failed write. The file name comes from the run id only after the run store has checked it is a
plain name, and the file is never written outside the chosen directory. When the run was made
under other package versions than those installed now, the report says which, before anything else.

Usage
-----
>>> from dashboard.report import write_report
>>> write_report(Path("runs/20250101-120000-census-smollm2-135m-3fa2"))
PosixPath('reports/20250101-120000-census-smollm2-135m-3fa2.html')
"""

from __future__ import annotations

import html
import importlib.metadata
import importlib.resources
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import plotly.offline

from analyses import runstore
from analyses.runstore import Run
from dashboard.core.section import ReportSection, fmt, table_html
from dashboard.registry import sections_for
from probe.errors import HeadlabError, RunStoreError
from probe.tempdirs import write_text_atomic

DEFAULT_DIR = Path("reports")


class ReportWriteError(HeadlabError, OSError):
    """The report file cannot be written where asked (a directory without write permission, a path
    under a file, a full disk); the message says where and how to fix it."""


def stylesheet() -> str:
    """The CSS shared by the dashboard and the reports."""
    return importlib.resources.files("dashboard").joinpath("headlab.css").read_text(encoding="utf-8")


def _kv_table(items: list[tuple[str, object]]) -> str:
    return table_html(None, [(k, fmt(v)) for k, v in items], css_class="data kv")


def _bos_policy(bos: Any) -> str:
    if not isinstance(bos, dict):
        return str(bos)
    prepend = "prepends" if bos.get("prepend") else "does not prepend"
    token = bos.get("token")
    token_text = f" {token!r} (id {bos.get('token_id')})" if token is not None else ""
    return f"{bos.get('mode', '?')}: {prepend} BOS{token_text}"


def manifest_section(run: Run) -> ReportSection:
    """The run's manifest: model, environment, config, seeds, timings, files."""
    m = run.manifest
    model = m.model
    sha = str(model.get("weight_sha256") or "")
    shape = (
        f"{model.get('n_layers')} layers × {model.get('n_heads')} heads ({model.get('n_kv_heads')} KV heads), "
        f"d_head {model.get('d_head')}, d_model {model.get('d_model')}, context {model.get('n_ctx')}"
    )
    model_rows: list[tuple[str, object]] = [
        ("name", model.get("name")),
        ("source", f"{model.get('source')} ({model.get('family')}, {model.get('kind')})"),
        ("shape", shape),
        ("weights sha256", f"{sha[:16]}…" if sha else "unknown"),
        ("dtype", model.get("dtype")),
        ("device", model.get("device")),
        ("BOS policy", _bos_policy(model.get("bos"))),
        ("licence", model.get("licence")),
    ]
    run_rows: list[tuple[str, object]] = [
        ("run id", m.run_id),
        ("analysis", m.analysis),
        ("created", m.created),
        ("code revision", m.code_revision or "unknown (not a git checkout)"),
        ("schema version", m.schema_version),
    ]
    caveat = str(model.get("caveat") or "")
    caveat_html = f'<p class="caveat"><b>Model caveat:</b> {html.escape(caveat)}</p>' if caveat else ""
    differences = runstore.version_differences(m)
    if differences:
        caveat_html += (
            '<p class="caveat"><b>Other versions:</b> this run was made under other package versions '
            f"than those installed now: {html.escape(runstore.format_version_differences(differences))}. "
            "Its numbers may differ from a re-run with this installation.</p>"
        )
    now = {dist: current for dist, _, current in differences}
    versions: list[tuple[str, object]] = [
        (dist, f"{recorded} (now {now[dist] or 'not installed'})" if dist in now else recorded)
        for dist, recorded in sorted(m.package_versions.items())
    ]
    files = [(f"{name}.parquet", f"{meta['rows']} rows", "") for name, meta in m.tables.items()] + [
        (f"arrays/{name}.npy", meta["dtype"], "×".join(str(d) for d in meta["shape"]))
        for name, meta in m.arrays.items()
    ]
    blocks = [
        ("Model", _kv_table(model_rows)),
        ("Run", _kv_table(run_rows)),
        ("Config", _kv_table(sorted(m.config.items())) if m.config else "<p>(none)</p>"),
        ("Seeds", _kv_table(sorted(m.seeds.items())) if m.seeds else "<p>(none)</p>"),
        (
            "Timings (s)",
            _kv_table(list(m.timings.items())) if m.timings else "<p>(none)</p>",
        ),
        ("Package versions", _kv_table(versions)),
        ("Files", table_html(["file", "rows / dtype", "shape"], files)),
    ]
    body = caveat_html + '<div class="summary">'
    body += "".join(f"<div><h3>{html.escape(title)}</h3>{content}</div>" for title, content in blocks)
    body += "</div>"
    return ReportSection("run", "Run", body)


def render_report(run: Run) -> str:
    """The whole report of ``run`` as one HTML string."""
    m = run.manifest
    sections = [manifest_section(run), *sections_for(run)]
    toc = "".join(f'<li><a href="#{html.escape(s.anchor)}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "".join(
        f'<section id="{html.escape(s.anchor)}"><h2>{html.escape(s.title)}</h2>{s.body}</section>'
        for s in sections
    )
    try:
        version = importlib.metadata.version("headlab")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    title = f"{m.analysis} of {m.model_name}"
    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>headlab report: {html.escape(title)} ({html.escape(m.run_id)})</title>\n"
        f"<style>\n{stylesheet()}\n</style>\n"
        # plotly.js, once, inline: the report must open offline and from a single file.
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>\n'
        "</head>\n<body>\n"
        f'<main class="report">\n<header><h1>headlab report: {html.escape(title)}</h1>'
        f'<p class="muted">run <code>{html.escape(m.run_id)}</code>, created {html.escape(m.created)}</p></header>\n'
        f'<nav class="toc"><b>Contents</b><ol>{toc}</ol></nav>\n'
        f"{body}\n"
        f'<footer class="report-footer">written by headlab {html.escape(version)} on {written}</footer>\n'
        "</main>\n</body>\n</html>\n"
    )


def default_path(run_id: str) -> Path:
    return DEFAULT_DIR / f"{run_id}.html"


def _target(out: Path | None, run_id: str) -> Path:
    if out is not None:
        out = Path(out).expanduser()
        # A file the user named: written as named.
        if not (out.is_dir() or (not out.exists() and not out.suffix)):
            return out
    # A directory, existing or to be made (a path without a suffix such as ``reports``): the file is
    # named after the run id, which must stay inside it.
    directory = DEFAULT_DIR if out is None else out
    target = directory / f"{run_id}.html"
    if not runstore.RUN_ID_RE.fullmatch(run_id) or Path(os.path.abspath(target)).parent != Path(
        os.path.abspath(directory)
    ):
        raise RunStoreError(
            f"the run id {run_id[:80]!r} is not a plain name, so no report is named after it; "
            "the run's manifest was edited: re-run the analysis"
        )
    return target


def _why_unwritable(target: Path, err: OSError) -> str:
    """What is in the way of writing ``target``: a file where a directory must be, else ``err``."""
    for above in target.parents:
        if above.exists():
            if not above.is_dir():
                return f"{above} is a file, not a directory"
            break
    return str(err.strerror or err)


def write_report(run_path: Path, out: Path | None = None) -> Path:
    """Write the report of the run at ``run_path``; return the file written.

    ``out``: a file path, or a directory (an existing one, or a path without a suffix; the file is
    then ``<out>/<run directory name>.html``); default ``./reports/<run directory name>.html``. The run is checked first (size and sha256 of every file), so a
    damaged run raises :class:`probe.errors.RunStoreError` naming the problem and the fix. The file
    is written to a temporary file next to it and renamed into place; when that fails (no write
    permission, a path under a file, a full disk) :class:`ReportWriteError` says so, and an earlier
    report at ``target`` is kept.
    """
    run = runstore.open_run(run_path, verify=True)
    # Named after the directory (what `headlab runs` lists and `report` accepts), so copies of one
    # run get reports of their own; a directory name that is no plain run id falls back to the id.
    name = run.path.name if runstore.RUN_ID_RE.fullmatch(run.path.name) else run.run_id
    target = _target(out, name)
    text = render_report(run)
    try:
        return write_text_atomic(target, text)
    except OSError as err:
        raise ReportWriteError(
            f"cannot write the report to {target}: {_why_unwritable(target, err)}; choose another "
            "output (--out: a file, or a directory to put it in) where you may write"
        ) from err
