"""The retrieval report: the protocol and how many needle tests passed the gate, the retrieval score
of every head (grid, distribution, top heads), recall over depth × length with every test, the
masking curve and the held-out validation of the retrieval heads. The same figures as the
dashboard's retrieval page, as static plotly."""

from __future__ import annotations

import html

from analyses.runstore import Run
from dashboard.core import generic
from dashboard.core.section import ReportSection, figure_html, fmt, table_html
from dashboard.core.validation import validation_sections
from dashboard.retrieval import views

MAX_TEST_ROWS = 300
TOP_N = 20


def _summary(run: Run) -> ReportSection:
    info = views.overview(run)
    passed, total = info["tests_passed"], info["tests"]
    weak = passed < views.WEAK_EVIDENCE
    share = (
        f"{info['retrieval_heads']} of {info['heads']} heads ({info['share_retrieval_heads']:.1%}) score "
        f"&gt; {fmt(info['threshold'])}; the top head is {html.escape(str(info['top_head']))} "
        f"({info['top_score']:.2f})"
        if passed
        else "no head has a score"
    )
    intro = (
        "<p>Retrieval heads (Wu et al. 2024): a needle sentence is put at a depth of a haystack and the "
        "model answers a question about it by greedy decoding. At each decoding step a head "
        f"<i>copy-pastes</i> when its attention argmax lies in the scored span ({views.span_noun(run)}) "
        "and the token there is the token being generated; each hit adds 1/|span| to the head's score "
        "on that test. Only tests whose reference was recalled (ROUGE-1 recall above the gate) count: a "
        "head's retrieval score is its mean over those tests, and a retrieval head scores above the "
        f"threshold. This run: {html.escape(views.protocol_line(run))}. "
        f"Settings: {html.escape(views.settings_line(run))}.</p>"
    )
    css = ' class="caveat"' if weak else ""
    banner = (
        f'<p{css} style="font-size: 16px">'
        f'<b style="font-size: 26px">{passed} / {total}</b> tests passed the gate. {share}.<br>'
        f"{html.escape(views.gate_line(run))}</p>"
    )
    body = intro + banner
    if passed:
        body += (
            '<div class="grid">'
            + figure_html(views.score_histogram(run), "retrieval-histogram-figure")
            + "</div>"
        )
    return ReportSection("retrieval-summary", "Retrieval heads: tests and scores", body)


def _heads(run: Run) -> ReportSection:
    passed, _ = views.gate_counts(run)
    parts = [
        "<p>Rows: layers (layer 0 at the top); columns: heads. Ringed: retrieval heads. The activation "
        f"frequency is the share of the {passed} passing tests in which the head copy-pasted at least "
        "once; a high score with a low frequency is a specialist of a few needles.</p>",
        '<div class="grid">',
        figure_html(views.score_grid(run), "retrieval-grid-figure"),
        figure_html(views.top_heads_figure(run, TOP_N), "retrieval-top-figure"),
        "</div>",
    ]
    top = views.top_heads(run, TOP_N)
    if top.empty:
        parts.append("<p>No test passed the gate, so no head has a score.</p>")
    else:
        rows = [
            [
                str(int(r.rank)),
                r.label,
                str(int(r.kv_head)),
                fmt(float(r.retrieval_score)),
                f"{float(r.activation_frequency):.0%}",
                f"{int(r.tests_hit)} / {passed}",
                "yes" if bool(r.is_retrieval) else "no",
            ]
            for r in top.itertuples(index=False)
        ]
        header = [
            "rank",
            "head",
            "KV head",
            "retrieval score",
            "activation frequency",
            "passing tests hit",
            "retrieval head",
        ]
        parts.append(table_html(header, rows))
    return ReportSection("retrieval-heads", "Retrieval score per head", "".join(parts))


def _recall(run: Run) -> ReportSection:
    tests = views.tests_rows(run)
    shown = tests.head(MAX_TEST_ROWS)
    header = [
        "test",
        "length",
        "depth (reached)",
        "needle",
        "asked for",
        "generated",
        "ROUGE-1 recall",
        "passed",
        "heads hit",
    ]
    more = (
        f"<p>{len(tests) - MAX_TEST_ROWS} more tests not listed (see <code>tests.parquet</code>).</p>"
        if len(tests) > MAX_TEST_ROWS
        else ""
    )
    body = (
        "<p>Mean ROUGE-1 recall of the answer per (context length, needle depth) cell; n is the number of "
        "tests averaged in the cell (one per needle).</p>"
        + figure_html(views.recall_grid(run), "retrieval-recall-figure", wide=True)
        + f"<details><summary>every test ({len(tests)})</summary>"
        + table_html(header, shown.itertuples(index=False))
        + more
        + "</details>"
    )
    return ReportSection("retrieval-recall", "Needle recall over depth and length", body)


def _masking(run: Run) -> ReportSection:
    if not views.has_masking(run):
        return ReportSection(
            "retrieval-masking",
            "Masking retrieval heads",
            "<p>This run ran no masking experiment (mask_fractions was empty).</p>",
        )
    curve = views.masking_curve(run)
    rows = [
        [
            str(r.kind),
            str(int(r.k)),
            f"{float(r.fraction):.1%}",
            fmt(float(r.recall)),
            fmt(float(r.recall_sd)),
            f"{float(r.recalled):.0%}",
            str(int(r.n_seeds)),
        ]
        for r in curve.itertuples(index=False)
    ]
    body = (
        "<p>The top-K heads by retrieval score, or K heads drawn at random from the others (several "
        "seeds), attend uniformly while decoding (their output is the mean of the values they see; the "
        "prefill is untouched). The paper: recall collapses when the top ~5% of heads are masked and "
        "barely moves for as many random heads. The dotted line is the same tests' recall with no head "
        "masked.</p>"
        + '<div class="grid">'
        + figure_html(views.masking_figure(run, "recall"), "retrieval-masking-figure")
        + figure_html(views.masking_figure(run, "recalled"), "retrieval-masking-recalled-figure")
        + "</div>"
        + table_html(
            ["masked", "K", "share of heads", "mean recall", "sd over seeds", "recalled", "seeds"], rows
        )
    )
    return ReportSection("retrieval-masking", "Masking retrieval heads", body)


def report_sections(run: Run) -> list[ReportSection]:
    """The retrieval sections; a run without the retrieval tables (written by other code under the
    name ``retrieval``) gets the generic heads heat maps instead of an error."""
    if not views.is_retrieval(run):
        return generic.report_sections(run)
    return [_summary(run), _heads(run), _recall(run), _masking(run), *_validation(run)]


def _validation(run: Run) -> list[ReportSection]:
    """The held-out validation of the retrieval heads (the shared section), with what was tested."""
    note = f"<p>{html.escape(views.validation_note(run))}</p>"
    sections = validation_sections(run)
    if not sections:
        return [ReportSection("validation", "Held-out validation of the retrieval heads", note)]
    first = sections[0]
    return [ReportSection(first.anchor, "Held-out validation of the retrieval heads", note + first.body)]
