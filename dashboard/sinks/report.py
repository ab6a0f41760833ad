"""The sinks report: Sink_1 per input set, per-head alpha maps, the per-position sink map with the
hidden sinks (positions and tokens), and the norms of the first token against the others."""

from __future__ import annotations

import html

from analyses.runstore import Run
from dashboard.core import generic
from dashboard.core.section import ReportSection, figure_html, fmt, table_html
from dashboard.sinks import figures as sink_figures
from dashboard.sinks import views


def _summary(run: Run) -> ReportSection:
    table = run.table("summary")
    bos = run.manifest.model.get("bos", {})
    policy = (
        f"BOS prepended ({html.escape(str(bos.get('token')))}, mode {html.escape(str(bos.get('mode')))})"
        if bos.get("prepend")
        else f"no BOS prepended (mode {html.escape(str(bos.get('mode')))})"
    )
    rows = [
        [
            html.escape(views.INPUT_LABELS.get(str(r.input_set), str(r.input_set))),
            f"<b>{fmt(float(r.sink_1), 4)}</b> ± {fmt(float(r.sink_1_sem), 2)}",
            html.escape(fmt(float(r.alpha0_mean))),
            html.escape(fmt(float(r.hidden_heads_pct), 3)),
            html.escape(
                f"{int(r.top_hidden_position)} ({fmt(float(r.top_hidden_position_pct), 2)}%)"
                if int(r.top_hidden_position) >= 0
                else "-"
            ),
            html.escape(repr(str(r.top_hidden_token)) if r.top_hidden_token else "-"),
            html.escape(str(r.first_token)),
        ]
        for r in table.itertuples(index=False)
    ]
    header = [
        "input set",
        "Sink_1 % (± sem)",
        "mean alpha_0",
        "% heads with a hidden sink",
        "top hidden position (Sink %)",
        "most listed hidden-sink token",
        "first token",
    ]
    first = table.iloc[0]
    intro = (
        f"<p>{int(first['n_sequences'])} sequences of T = {int(first['seq_len'])} tokens per input set "
        f"(T counts the BOS token), eps = {fmt(float(first['eps']))}; {policy}. Sink_1 is the share of all "
        "heads whose alpha_0 (mean attention to the first real token over the queries) exceeds eps, "
        "thresholded per sample and averaged over samples (Gu et al., ICLR 2025; the papers' position 1 "
        "is our position 0). A hidden sink is a later position k &gt;= 1 with alpha_k &gt; eps.</p>"
    )
    bars = figure_html(views.sink_bars(run), "sinks-bars-figure", wide=True)
    body = intro + table_html(header, rows, escape=False) + bars
    return ReportSection("sinks-summary", "Attention sinks: Sink_1 per input set", body)


def _head_maps(run: Run) -> ReportSection:
    figs = sink_figures.overview_figures(run.heads)
    divs = "".join(
        figure_html(figs[f"alpha0_{s}"], f"sinks-alpha0-{s}")
        for s in views.input_sets(run)
        if f"alpha0_{s}" in figs
    )
    intro = (
        "<p>Mean alpha_0 of every head (rows: layers, layer 0 at the top; columns: heads), one map per "
        "input set, colours fixed to 0..1. The sink rate (share of samples with alpha_0 &gt; eps) is in "
        "the heads table as <code>sink_rate_&lt;set&gt;</code>.</p>"
    )
    return ReportSection(
        "sinks-heads", "Sink heads: alpha_0 per head", intro + f'<div class="grid">{divs}</div>'
    )


def _positions(run: Run) -> ReportSection:
    fig = views.position_map(run)
    parts = [
        "<p>Sink_k for every position k: the share of heads with alpha_k &gt; eps, averaged over "
        "samples. The last positions are seen by few queries (alpha_{T-1} is a single attention "
        "weight, the last token's attention to itself), which is why the map rises at the end; those "
        "positions are not counted as hidden sinks.</p>",
        figure_html(fig, "sinks-positions-figure", wide=True),
    ]
    for input_set in views.input_sets(run):
        label = html.escape(views.INPUT_LABELS[input_set])
        positions = views.top_hidden_positions(run, input_set, k=6)
        pos_rows = [
            [str(int(r.position)), f"{fmt(float(r.sink_pct), 3)} ± {fmt(float(r.sink_pct_sem), 2)}"]
            for r in positions.itertuples(index=False)
        ]
        tokens = views.top_hidden_tokens(run, input_set, k=10)
        tok_rows = [
            [
                repr(str(r.token)),
                str(int(r.sink_occurrences)),
                str(int(r.occurrences)),
                fmt(float(r.mean_sink_pct), 3),
                fmt(float(r.max_sink_pct), 3),
            ]
            for r in tokens.itertuples(index=False)
        ]
        parts.append(f"<h3>{label}</h3>")
        parts.append('<div class="grid">')
        parts.append(
            "<div><p>Positions k &gt;= 1 with the highest Sink_k</p>"
            + table_html(["k", "Sink_k % ± sem"], pos_rows)
            + "</div>"
        )
        tokens_html = (
            table_html(
                ["token", "as hidden sink", "occurrences", "mean % of heads", "max % of heads"], tok_rows
            )
            if tok_rows
            else "<p>No position beyond the first is a sink for enough heads.</p>"
        )
        parts.append(f"<div><p>Tokens listed as hidden sinks</p>{tokens_html}</div>")
        parts.append("</div>")
    return ReportSection("sinks-positions", "Per-position sink map and hidden sinks", "".join(parts))


def _norms(run: Run) -> ReportSection:
    if not views.has_norms(run):
        return ReportSection("sinks-norms", "Norms", "<p>This run measured no norms (norms=False).</p>")
    fig = views.norms_figure(run)
    parts = [
        "<p>L2 norm of the first real token's hidden state (residual stream entering each layer), key "
        "(per KV head, as the attention uses it) and value, against the mean over the other tokens; "
        "keys and values averaged over KV heads. Ratio = first / others.</p>",
        figure_html(fig, "sinks-norms-figure", wide=True),
    ]
    for input_set in views.input_sets(run):
        ratios = views.norm_ratios(run, input_set)
        rows = [
            [str(int(r.layer)), fmt(float(r.hidden)), fmt(float(r.key)), fmt(float(r.value))]
            for r in ratios.itertuples(index=False)
        ]
        parts.append(
            f"<details><summary>ratios per layer: {html.escape(views.INPUT_LABELS[input_set])}</summary>"
            + table_html(["layer", "hidden", "key", "value"], rows)
            + "</details>"
        )
    return ReportSection("sinks-norms", "Norms: the sink token against the others", "".join(parts))


REQUIRED_TABLES = frozenset({"heads", "summary", "positions", "hidden_tokens"})


def report_sections(run: Run) -> list[ReportSection]:
    """The sinks sections; a run without the sinks tables (written by other code under the name
    ``sinks``) gets the generic heads heat maps instead of an error."""
    if not REQUIRED_TABLES.issubset(run.table_names):
        return generic.report_sections(run)
    return [_summary(run), _head_maps(run), _positions(run), _norms(run)]
