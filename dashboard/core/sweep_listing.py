"""The start page's sweep parts: the overview of every sweep, one sweep's tasks, and the filter of
the run listing by sweep (``?sweep=NAME``; ``?sweep=(none)`` for runs made outside a sweep).

A sweep is named in the URL only to be compared with the names the catalog lists (its sweep
directories and the sweeps its runs record); a task's run id from a manifest is only looked up in
the catalog's listing, and linked when that lists it as an intact run of an analysis with a page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import urlencode

from dash import dcc, html
from dash.development.base_component import Component

from dashboard.catalog import RunEntry
from dashboard.core.page import Site
from dashboard.sweeps import NO_SWEEP, SweepOverview, SweepTask, time_label

COUNTED = ("done", "skipped", "failed", "refused", "pending", "running")
_OPEN_ERRORS = 3  # a sweep's list of failed tasks is open when it has at most this many
_NOWRAP = {"whiteSpace": "nowrap"}


def sweep_href(name: str | None) -> str:
    """The start page filtered to sweep ``name`` (None: every run)."""
    return "/" if name is None else f"/?{urlencode({'sweep': name})}"


def known_sweeps(entries: Sequence[RunEntry], overviews: Sequence[SweepOverview]) -> list[str]:
    """The sweeps the listing can be filtered by: those with a manifest and those runs record."""
    return sorted({o.name for o in overviews} | {e.sweep.name for e in entries if e.sweep is not None})


def select(entries: Sequence[RunEntry], wanted: str | None) -> list[RunEntry]:
    """The entries of sweep ``wanted`` in task order (NO_SWEEP: those of no sweep; None: all)."""
    if wanted is None:
        return list(entries)
    if wanted == NO_SWEEP:
        return [e for e in entries if e.sweep is None]
    return sorted((e for e in entries if e.sweep is not None and e.sweep.name == wanted), key=_task_order)


def _task_order(entry: RunEntry) -> tuple[bool, int]:
    """Task index order, runs without one last (newest first among runs of one task, as listed)."""
    task = None if entry.sweep is None else entry.sweep.task
    return (task is None, task or 0)


def filter_links(entries: Sequence[RunEntry], names: Sequence[str], current: str | None) -> Component:
    """The line of filters over the run listing: every run, runs of no sweep, each sweep's runs."""
    choices: list[tuple[str | None, str, int]] = [
        (None, "all runs", len(entries)),
        (NO_SWEEP, "outside sweeps", sum(e.sweep is None for e in entries)),
    ]
    choices += [
        (n, f"sweep {n}", sum(e.sweep is not None and e.sweep.name == n for e in entries)) for n in names
    ]
    parts: list[Component | str] = ["Show: "]
    for i, (value, text, count) in enumerate(choices):
        if i:
            parts.append(" · ")
        shown = f"{text} ({count})"
        parts.append(html.B(shown) if value == current else dcc.Link(shown, href=sweep_href(value)))
    return html.P(parts, id="runs-filter", className="hint")


def _problems(overview: SweepOverview) -> Component | str:
    """The failed and refused tasks' errors, one line each, in a box that opens."""
    troubled = overview.troubled
    if not troubled:
        return ""
    failed = sum(t.status == "failed" for t in troubled)
    words = ", ".join(
        f"{n} {status}" for n, status in ((failed, "failed"), (len(troubled) - failed, "refused")) if n
    )
    items = [
        html.Li(
            f"task {t.index} ({t.analysis} on {t.model}{'' if t.seed is None else f', seed {t.seed}'}), "
            f"{t.status} after {t.attempts} attempt(s): {t.error or 'no error recorded'}"
        )
        for t in troubled
    ]
    return html.Details([html.Summary(words), html.Ul(items)], open=len(troubled) <= _OPEN_ERRORS)


def overview_table(overviews: Sequence[SweepOverview], current: str | None) -> Component:
    """One row per sweep: state, task counts, models loaded, last update, failed tasks' errors."""
    heads = ["sweep", "state", *COUNTED, "models loaded", "updated", "errors"]
    header = html.Tr([html.Th(h, className="num" if h in COUNTED else "") for h in heads])
    rows = []
    for o in overviews:
        name: Component | str = (
            html.B(o.name) if o.name == current else dcc.Link(o.name, href=sweep_href(o.name))
        )
        if o.problem is not None:
            cells = [html.Td(o.problem, colSpan=len(heads) - 1, className="status")]
            rows.append(
                html.Tr([html.Td(name, className="mono", style=_NOWRAP), *cells], className="damaged")
            )
            continue
        counts = [html.Td(str(o.counts.get(status, 0)), className="num") for status in COUNTED]
        loaded = "" if o.models_loaded is None else str(o.models_loaded)
        rows.append(
            html.Tr(
                [
                    html.Td(name, className="mono", style=_NOWRAP),
                    html.Td(o.shown_state),
                    *counts,
                    html.Td(loaded, className="num"),
                    html.Td(time_label(o.updated), style=_NOWRAP),
                    html.Td(_problems(o)),
                ],
                className="current" if o.name == current else "",
            )
        )
    return html.Table([html.Thead(header), html.Tbody(rows)], className="data", id="sweeps-table")


def _run_cell(task: SweepTask, by_id: Mapping[str, RunEntry], site: Site) -> Component | str:
    if task.run_id is None:
        return ""
    entry = by_id.get(task.run_id)
    shown = task.run_id[:80]
    if entry is None:
        return f"{shown} (not under the root)"
    if not entry.ok:
        return f"{shown} (damaged)"
    link = site.link_for(entry.analysis, entry.run_id)
    return dcc.Link(entry.run_id, href=link) if link else entry.run_id


def tasks_table(overview: SweepOverview, entries: Sequence[RunEntry], site: Site) -> Component:
    """Sweep ``overview``'s tasks, each done or skipped one linked to its run's page."""
    by_id = {e.run_id: e for e in entries}
    heads = ["task", "analysis", "model", "seed", "status", "run", "attempts", "seconds", "error"]
    numeric = {"task", "seed", "attempts", "seconds"}
    rows = [
        html.Tr(
            [
                html.Td(str(t.index), className="num"),
                html.Td(t.analysis),
                html.Td(t.model),
                html.Td("" if t.seed is None else str(t.seed), className="num"),
                html.Td(t.status),
                html.Td(_run_cell(t, by_id, site), className="mono"),
                html.Td(str(t.attempts), className="num"),
                html.Td("" if t.seconds is None else f"{t.seconds:.1f}", className="num"),
                html.Td(t.error or "", className="status"),
            ],
            title=t.label,
            className="damaged" if t.status in ("failed", "refused") else "",
        )
        for t in overview.tasks
    ]
    header = html.Tr([html.Th(h, className="num" if h in numeric else "") for h in heads])
    return html.Table([html.Thead(header), html.Tbody(rows)], className="data", id="sweep-tasks")
