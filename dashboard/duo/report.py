"""The DuoAttention report: what the run's numbers say, the trained gates and their loss, needle
recall against the share of retrieval heads (Duo's gates, the retrieval score, random heads, the
full model), the KV-cache memory and the gates' agreement with the retrieval score. The same figures
as the dashboard's duo page, as static plotly (through :mod:`dashboard.duo.views`)."""

from __future__ import annotations

import html
import math

from analyses.runstore import Run
from dashboard.core import generic
from dashboard.core.section import ReportSection, figure_html, fmt, table_html
from dashboard.duo import views

TOP_GATES = 12


def _summary(run: Run) -> ReportSection:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in views.findings(run))
    body = (
        "<p>DuoAttention (Xiao et al. 2025): every KV head gets a gate between full attention and "
        "streaming attention (the first <i>sink</i> and the last <i>recent</i> keys). The gates are "
        "trained to keep the full model's final hidden states on multi-needle contexts while an L1 term "
        "pulls them towards 0; the top share of KV heads by gate are kept whole (<i>retrieval heads</i>) "
        "and the others stream. Needle-test recall with them is compared with the same share chosen by "
        "the retrieval score (Wu et al. 2024) and at random.</p>"
        f"<p>Settings: {html.escape(views.settings_line(run))}.</p>"
        f"<ul>{items}</ul>"
    )
    return ReportSection("duo-summary", "DuoAttention: what the run says", body)


def _gates(run: Run) -> ReportSection:
    gates = views.gates_table(run).sort_values("rank").head(TOP_GATES)
    rows = [
        [
            str(int(r.rank)),
            str(int(r.layer)),
            str(int(r.kv_head)),
            str(r.layer_type),
            f"{float(r.gate):.3f}",
            "n/a" if math.isnan(float(r.retrieval_score)) else f"{float(r.retrieval_score):.3f}",
        ]
        for r in gates.itertuples(index=False)
    ]
    maps = "".join(
        figure_html(views.gate_map(run, share), f"duo-gates-{i}") for i, share in enumerate(views.shares(run))
    )
    body = (
        "<p>Rows: layers (layer 0 at the top); columns: KV heads. Gate 1 keeps full attention, 0 streams; "
        "ringed: the KV heads kept whole at each share (the top k by gate, ties to the earlier layer).</p>"
        + f'<div class="grid">{maps}{figure_html(views.loss_figure(run), "duo-loss-figure")}</div>'
        + f"<p>The {len(rows)} highest gates</p>"
        + table_html(["rank", "layer", "KV head", "layer type", "gate", "retrieval score"], rows)
    )
    return ReportSection("duo-gates", "Gates per KV head and their training", body)


def _accuracy(run: Run) -> ReportSection:
    rows = []
    for r in views.accuracy_rows(run).itertuples(index=False):
        random = r.selection == "random"
        rows.append(
            [
                views.SELECTION_LABELS[str(r.selection)],
                fmt(float(r.share)),
                str(int(r.k)),
                views.interval_text(r.recall, r.recall_low, r.recall_high, random=random),
                views.interval_text(r.recalled, r.recalled_low, r.recalled_high, random=random),
                f"{int(r.n_tests)} × {int(r.draws)} draws" if random else str(int(r.n_tests)),
            ]
        )
    body = (
        "<p>Each needle test is decoded greedily with the chosen KV heads kept whole and the others "
        "streaming, prefill and decode alike. Brackets: 95% percentile-bootstrap intervals over the tests; "
        "random heads: the mean over the draws, with the lowest and the highest draw. Every length is "
        "pooled.</p>"
        + '<div class="grid">'
        + figure_html(views.accuracy_figure(run, "recall"), "duo-accuracy-figure")
        + figure_html(views.accuracy_figure(run, "recalled"), "duo-recalled-figure")
        + "</div>"
        + table_html(["selection", "share", "k", "recall", "recalled", "tests"], rows)
    )
    return ReportSection("duo-accuracy", "Needle recall against the share of retrieval heads", body)


def _memory(run: Run) -> ReportSection:
    rows = [
        [
            fmt(float(r.share)),
            f"{int(r.k)} ({float(r.share_kept):.1%})",
            str(int(r.n_tokens)),
            f"{float(r.kv_ratio):.3f}",
            "n/a" if math.isnan(float(r.kv_ratio_layers)) else f"{float(r.kv_ratio_layers):.3f}",
            "not measured" if math.isnan(float(r.measured_ratio)) else f"{float(r.measured_ratio):.3f}",
        ]
        for r in views.memory_rows(run).itertuples(index=False)
    ]
    body = (
        "<p>The KV cache kept relative to the full cache at context length N, with r = k / n of the KV "
        "heads kept whole: r + (1 − r) · min(1, (S + R) / N). Measured: the bytes of the key and value "
        "tensors the cut cache keeps after prefilling the first test of that length, over what a full "
        "cache holds. Layer by layer: the same count with each sliding-window layer's full cache capped "
        "at its window, as the model really keeps it (equal to the formula on models without such layers).</p>"
        + figure_html(views.memory_figure(run), "duo-memory-figure", wide=True)
        + table_html(["share", "k (k / n)", "N (tokens)", "formula", "layer by layer", "measured"], rows)
    )
    return ReportSection("duo-memory", "KV-cache memory", body)


def _agreement(run: Run) -> ReportSection:
    note = f"<p>{html.escape(views.agreement_note(run))}</p>"
    agreement = views.agreement_rows(run)
    if not len(agreement):
        return ReportSection("duo-agreement", "Agreement with the retrieval score", note)
    rows = [
        [
            fmt(float(r.share)),
            str(int(r.k)),
            str(int(r.overlap)),
            f"{float(r.chance):.1f}",
            f"{float(r.overlap_share):.2f}",
            f"{float(r.jaccard):.2f}",
        ]
        for r in agreement.itertuples(index=False)
    ]
    body = note + table_html(["share", "k", "top-k overlap", "chance", "overlap / k", "Jaccard"], rows)
    return ReportSection("duo-agreement", "Agreement with the retrieval score", body)


def report_sections(run: Run) -> list[ReportSection]:
    """The duo sections; a run without the duo tables (written by other code under the name ``duo``)
    gets the generic heads heat maps instead of an error."""
    if not views.is_duo(run):
        return generic.report_sections(run)
    return [_summary(run), _gates(run), _accuracy(run), _memory(run), _agreement(run)]
