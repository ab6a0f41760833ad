"""The ACT report: accuracy before and after calibration per task (with intervals, chance and the
paired change), the heads kept and the head search behind them, per-item margins, and the tokens
that are hidden sinks. The same figures as the dashboard's ACT page, as static plotly."""

from __future__ import annotations

import html

from analyses.runstore import Run
from dashboard.act import views
from dashboard.core import generic
from dashboard.core.section import ReportSection, figure_html, table_html
from dashboard.core.validation import validation_sections


def _accuracy(run: Run) -> ReportSection:
    rows = views.task_rows(run)
    intro = (
        "<p>Attention calibration (ACT, Yu et al., ICML 2024): on every head of the searched layers, "
        "keys whose mean received attention alpha_k exceeds the threshold are sinks; the first sink is "
        "not calibrated and each query row keeps beta of its attention on the later (hidden) sinks, the "
        "rest going to the other keys in proportion (with first_sink=share, the official code's variant "
        "and the default, the first sink takes back its proportional share too; with first_sink=frozen "
        "its column stays as it was; the settings below say which this run used). Heads are "
        "searched one at a time on a calibration "
        "split and kept by the run's keep rule; the kept heads are calibrated together and scored "
        "zero-shot on a held-out split, and tested there against random head sets of the same size. "
        "Settings: "
        f"{html.escape(views.settings_line(run))}.</p>"
    )
    table = table_html([views.TASK_COLUMNS[c] for c in views.TASK_COLUMNS], rows.itertuples(index=False))
    figs = figure_html(views.accuracy_figure(run), "act-accuracy-figure") + figure_html(
        views.delta_figure(run), "act-delta-figure"
    )
    note = (
        "<p>Accuracies on the held-out split with 95% intervals; the change is paired over the same "
        "items, so its interval is narrower than the two accuracies' intervals suggest.</p>"
    )
    body = intro + table + note + f'<div class="grid">{figs}</div>'
    return ReportSection("act-accuracy", "ACT: accuracy before and after calibration", body)


def _heads(run: Run) -> ReportSection:
    kept = views.kept_heads(run)
    parts = [
        "<p>Rows: layers (layer 0 at the top); columns: heads. The first map counts the tasks that "
        f"kept each head ({len(kept)} heads kept by at least one task); grey layers were not searched. "
        "One map per head search (one per task, or one pooled over the tasks) then shows each head's "
        "calibration delta (accuracy change on the calibration split when the head alone is "
        "calibrated), kept heads ringed. The last map shows the hidden sinks per input found on each "
        "head of every layer, before calibration.</p>",
        '<div class="grid">',
        figure_html(views.head_grid(run), "act-grid-kept"),
    ]
    shown: set[str] = set()
    for i, task in enumerate(views.task_names(run)):
        scope = views.scope_of(run, task)
        if scope in shown or not views.searched(run, scope):  # pooled: one map serves every task
            continue
        shown.add(scope)
        parts.append(figure_html(views.head_grid(run, task), f"act-grid-scope-{i}"))
    parts.append(figure_html(views.head_grid(run, kind="hidden"), "act-grid-hidden"))
    parts.append("</div>")
    return ReportSection("act-heads", "Heads kept for calibration", "".join(parts))


def _search(run: Run) -> ReportSection:
    keep = views.KEEP_LABELS.get(str(getattr(run.config, "keep", "not_lower")), "")
    parts = [
        f"<p>Calibration delta of every searched head, one scope at a time; {html.escape(keep)}.</p>",
        figure_html(views.search_figure(run), "act-search-all", wide=True),
        '<div class="grid">',
    ]
    shown: set[str] = set()
    for i, task in enumerate(views.task_names(run)):
        scope = views.scope_of(run, task)
        if scope in shown or not views.searched(run, scope):
            continue
        shown.add(scope)
        parts.append(figure_html(views.search_figure(run, task), f"act-search-scope-{i}"))
    parts.append("</div>")
    return ReportSection("act-search", "Head search", "".join(parts))


def _items(run: Run) -> ReportSection:
    if "items" not in run.table_names:
        return ReportSection("act-items", "Held-out items", "<p>This run kept no per-item table.</p>")
    items = views.items_table(run)
    counts = items.groupby(["task", "outcome"]).size().unstack(fill_value=0)
    rows = [
        [str(task), *(str(int(counts.loc[task].get(o, 0))) for o in views.OUTCOMES)] for task in counts.index
    ]
    header = ["task", *(label for label, _ in views.OUTCOMES.values())]
    body = (
        "<p>Every held-out item: the label's margin (its log-probability minus the best other "
        "choice's) before and after calibration.</p>"
        + table_html(header, rows)
        + figure_html(views.margin_figure(run), "act-margins-figure", wide=True)
    )
    return ReportSection("act-items", "Held-out items", body)


def _tokens(run: Run) -> ReportSection:
    top = views.top_sink_tokens(run, k=20)
    if top.empty:
        return ReportSection("act-tokens", "Hidden sink tokens", "<p>No hidden sink token was found.</p>")
    rows = [
        [repr(str(r.token)), str(int(r.count)), f"{100 * float(r.share_of_heads):.1f}%"]
        for r in top.itertuples(index=False)
    ]
    body = (
        "<p>The tokens found as sinks after the first one on the calibration inputs (before "
        "calibration): how many times, and for what share of the heads in range on average.</p>"
        + '<div class="grid">'
        + figure_html(views.sink_tokens_figure(run), "act-tokens-figure")
        + "<div>"
        + table_html(["token", "times a hidden sink", "mean share of heads"], rows)
        + "</div></div>"
    )
    return ReportSection("act-tokens", "Hidden sink tokens", body)


def _validation(run: Run) -> list[ReportSection]:
    """The shared validation section, opened by what ACT tested (none for an older run)."""
    sections = validation_sections(run)
    note = f"<p>{html.escape(views.validation_note(run))}</p>"
    return [
        ReportSection("act-validation", "Held-out validation of the kept heads", note + s.body)
        for s in sections
    ]


def report_sections(run: Run) -> list[ReportSection]:
    """The ACT sections; a run without the ACT tables (written by other code under the name ``act``)
    gets the generic heads heat maps instead of an error."""
    if not views.is_act(run):
        return generic.report_sections(run)
    return [_accuracy(run), _heads(run), _search(run), *_validation(run), _items(run), _tokens(run)]
