"""The census report: six heat maps, their distributions, top heads, and a few heads' patterns."""

from __future__ import annotations

import html

from analyses.runstore import Run
from dashboard.census import views
from dashboard.census.figures import metric_heatmaps
from dashboard.core import figures
from dashboard.core.section import ReportSection, figure_html, fmt, table_html

TOP_K = 5


def _heatmaps(run: Run) -> ReportSection:
    heads = run.heads
    maps = metric_heatmaps(heads)
    divs = "".join(figure_html(maps[m], f"census-heatmap-{m}") for m in views.METRICS)
    intro = (
        "<p>One value per head (rows: layers, layer 0 at the top; columns: heads), averaged over "
        "each sample's eligible queries and then over samples. Natural text gives entropy, "
        "first-token mass, previous-token score and mean distance; a random block repeated twice "
        "gives the induction and duplicate-token scores.</p>"
    )
    return ReportSection(
        "census-heatmaps", "Head census: heat maps", intro + f'<div class="grid">{divs}</div>'
    )


def _distributions(run: Run) -> ReportSection:
    fig = figures.distributions(run.heads, views.METRICS, views.METRIC_LABELS)
    body = figure_html(fig, "census-distributions-figure", wide=True)
    return ReportSection("census-distributions", "Distributions across heads", body)


def _top_heads(run: Run) -> ReportSection:
    heads = run.heads
    columns = [views.top_heads(heads, m, TOP_K) for m in views.METRICS]
    header = ["rank"] + [
        f"{views.METRIC_LABELS[m]} ({'lowest' if m in views.LOW_IS_NOTABLE else 'highest'})"
        for m in views.METRICS
    ]
    rows = []
    for rank in range(TOP_K):
        row: list[object] = [str(rank + 1)]
        for col in columns:
            if rank < len(col):
                head, value, sem = col[rank]
                err = f" ± {fmt(sem, 2)}" if sem is not None else ""
                row.append(f"<b>{head}</b> {html.escape(fmt(value))}{html.escape(err)}")
            else:
                row.append("")
        rows.append(row)
    note = "<p>± is the standard error over samples. L<i>l</i>H<i>h</i> is layer <i>l</i>, head <i>h</i>.</p>"
    return ReportSection(
        "census-top-heads", "Top heads per metric", note + table_html(header, rows, escape=False)
    )


def _patterns(run: Run) -> ReportSection:
    """The top heads' patterns, each on the input set its metric was measured on (induction and
    duplicate-token on the repeated block, when the run kept it)."""
    chosen = views.pattern_heads(run.heads)
    shown = {k: views.example_ids(run, k) for k in views.INPUT_SETS}
    divs, used, notes = [], [], []
    for metric, head in chosen:
        input_set = views.default_input_set(metric)
        if not shown[input_set] and shown["natural"]:
            notes.append(f"{views.missing_examples(run, input_set)}.")
            input_set = "natural"
        if not shown[input_set]:
            continue
        example = shown[input_set][0]
        where = "repeated example" if input_set == "repeated" else "example"
        fig = views.pattern_figure(run, example, head, scale="sqrt", input_set=input_set)
        fig.update_layout(title_text=f"{head}: top {metric} head, {where} {example}", height=500)
        divs.append(figure_html(fig, f"census-pattern-{metric}"))
        used.append((metric, input_set, example))
    if not divs:
        body = f"<p>{html.escape(views.missing_examples(run, 'natural'))}.</p>"
        return ReportSection("census-patterns", "Attention patterns", body)
    heads_on = "; ".join(
        f"{html.escape(m)} on {'the repeated random block' if k == 'repeated' else 'natural text'}"
        for m, k, _ in used
    )
    texts = "".join(
        f"<details><summary>{views.INPUT_SET_LABELS[k]} example {ids[0]} text</summary>"
        f'<pre class="tokens">{html.escape("".join(views.example_tokens(run, ids[0], k)))}</pre></details>'
        for k, ids in shown.items()
        if ids and any(u[1] == k for u in used)
    )
    intro = (
        f"<p>Full attention patterns (row: query, column: key) of the top head of each metric, drawn "
        f"on the input set the metric is measured on: {heads_on}. On the repeated block an induction "
        f"head's weight lies on a stripe one token right of the diagonal offset by the block length, a "
        f"duplicate-token head's on the diagonal offset by the block length. Colour is the square root "
        f"of the weight, so that weights well below the first-token sink stay visible; grey cells are "
        f"causally masked. Hover a cell for its tokens and weight.</p>"
        + "".join(f'<p class="warning">{html.escape(n)}</p>' for n in dict.fromkeys(notes))
        + texts
    )
    return ReportSection(
        "census-patterns", "Attention patterns", intro + f'<div class="grid">{"".join(divs)}</div>'
    )


def report_sections(run: Run) -> list[ReportSection]:
    return [_heatmaps(run), _distributions(run), _top_heads(run), _patterns(run)]
