"""The census report: six heat maps, their distributions, top heads, and a few heads' patterns."""

from __future__ import annotations

import html

from analyses import census
from analyses.runstore import Run
from dashboard import figures
from dashboard.sections.base import ReportSection, figure_html, fmt, table_html
from dashboard.views import census as views

TOP_K = 5


def _heatmaps(run: Run) -> ReportSection:
    heads = run.heads
    maps = census.figures(heads)
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
    examples = views.example_ids(run)
    if not examples:
        body = "<p>This run kept no example patterns (it was run with <code>n_examples=0</code>).</p>"
        return ReportSection("census-patterns", "Attention patterns", body)
    example = examples[0]
    tokens = views.example_tokens(run, example)
    chosen = views.pattern_heads(run.heads)
    divs = []
    for metric, head in chosen:
        fig = views.pattern_figure(run, example, head, scale="sqrt")
        fig.update_layout(title_text=f"{head}: top {metric} head, example {example}", height=500)
        divs.append(figure_html(fig, f"census-pattern-{metric}"))
    text = html.escape("".join(tokens))
    intro = (
        f"<p>Full attention patterns (row: query, column: key) of the top head of "
        f"{', '.join(html.escape(m) for m, _ in chosen)} on natural-text example {example} "
        f"({len(tokens)} tokens). Colour is the square root of the weight, so that weights well below the first-token sink stay visible; grey cells are causally masked. Hover a cell for its tokens and weight.</p>"
        f'<details><summary>example {example} text</summary><pre class="tokens">{text}</pre></details>'
    )
    return ReportSection(
        "census-patterns", "Attention patterns", intro + f'<div class="grid">{"".join(divs)}</div>'
    )


def report_sections(run: Run) -> list[ReportSection]:
    return [_heatmaps(run), _distributions(run), _top_heads(run), _patterns(run)]
