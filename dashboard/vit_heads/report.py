"""The vit-heads report: what the run's numbers say, head importance per metric and the metrics'
agreement, the intervals and concentration of importance, its held-out validation, attention distance across layers and for the most important head, and the pattern
clusters (the figures of the ViT page, through :mod:`dashboard.vit_heads.views`).
See docs/analyses/vit-heads.md."""

from __future__ import annotations

import html

from analyses.runstore import Run
from dashboard.core import generic
from dashboard.core.section import ReportSection, figure_html, fmt, table_html
from dashboard.core.validation import validation_sections
from dashboard.vit_heads import statistics, views


def _overview(run: Run) -> ReportSection:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in views.findings(run))
    parts = [f"<p>{html.escape(views.settings_line(run))}.</p>", f"<ul>{items}</ul>"]
    if "probes" in run.table_names:
        probes = run.table("probes")
        rows = [
            [
                str(r.task),
                str(r.source),
                fmt(float(r.test_accuracy)),
                fmt(float(r.chance)),
                fmt(float(getattr(r, "eval_accuracy", float("nan")))),
                str(r.status),
            ]
            for r in probes.itertuples(index=False)
        ]
        parts.append(
            "<p>The tasks are linear probes on the image embedding, frozen while the heads are pruned.</p>"
            + table_html(["task", "source", "test accuracy", "chance", "eval accuracy", "status"], rows)
        )
    return ReportSection("vit-overview", "ViT heads: what the run says", "".join(parts))


def _importance(run: Run) -> ReportSection:
    divs = "".join(figure_html(views.importance_grid(run, m), f"vit-importance-{m}") for m in views.METRICS)
    top = views.top_heads(run, "confidence_drop")
    rows = [
        [f"L{int(r.layer)} H{int(r.head)}", *[fmt(float(getattr(r, m)), 3) for m in views.METRICS]]
        for r in top.itertuples(index=False)
    ]
    intro = (
        "<p>Each head's output is removed and the probes are scored again (rows: layers, layer 0 at the "
        "top; columns: heads). Blank cells: heads that were not pruned (only the gradient importance "
        "covers every head). The agreement is the Spearman rank correlation over the pruned heads "
        f"(n = {int(views.heads(run)['pruned'].sum())}).</p>"
    )
    body = (
        intro
        + f'<div class="grid">{divs}</div>'
        + figure_html(views.agreement_figure(run), "vit-agreement")
        + "<p>The heads with the largest confidence drop</p>"
        + table_html(["head", *[views.METRIC_NAMES[m] for m in views.METRICS]], rows)
    )
    return ReportSection("vit-importance", "Head importance and metric agreement", body)


def _statistics(run: Run) -> ReportSection:
    if not statistics.has_intervals(run):
        body = "<p>This run has no intervals over images; re-run <code>headlab run vit-heads</code>.</p>"
        return ReportSection("vit-statistics", "How much to trust the importance", body)
    parts = [
        "<p>Each head's effect is its mean over the discovery images, with a 95% bootstrap interval over "
        "those images. The concentration compares the share of the total effect held by the top heads "
        "with the same share when each image's effects are shuffled over the heads.</p>",
        '<div class="grid">',
        figure_html(statistics.interval_figure(run, "cosine_drop"), "vit-intervals-cosine"),
        figure_html(statistics.interval_figure(run, "confidence_drop"), "vit-intervals-confidence"),
        "</div>",
        figure_html(statistics.concentration_figure(run), "vit-concentration"),
    ]
    if "concentration" in run.table_names:
        rows = [
            [
                views.METRIC_NAMES.get(str(r.metric), str(r.metric)),
                f"{int(r.top_heads)} of {int(r.n_heads)}",
                f"{fmt(100 * float(r.share), 3)}% [{fmt(100 * float(r.share_low), 3)}, {fmt(100 * float(r.share_high), 3)}]",
                f"{fmt(100 * float(r.null_mean), 3)}% [{fmt(100 * float(r.null_low), 3)}, {fmt(100 * float(r.null_high), 3)}]",
                fmt(float(r.p_value), 2),
            ]
            for r in run.table("concentration").itertuples(index=False)
        ]
        parts.append(
            table_html(["metric", "top heads", "share (95% CI)", "shuffled null (95% range)", "p"], rows)
        )
    parts += [f"<p>{html.escape(line)}</p>" for line in statistics.ranking_lines(run)]
    return ReportSection("vit-statistics", "How much to trust the importance", "".join(parts))


def _distance(run: Run) -> ReportSection:
    layer, head = views.default_head(run)
    body = (
        "<p>Mean attention distance (patch units, CLS mass renormalised away) of every head by layer, "
        "with the interquartile band and min–max whiskers; then, for the head with the largest "
        f"confidence drop (layer {layer}, head {head}), the strength at each patch distance and its "
        "offset map (mean attention to the patch at each offset from the query).</p>"
        + figure_html(views.trend_figure(run), "vit-trend", wide=True)
        + '<div class="grid">'
        + figure_html(views.distance_figure(run, layer, head), "vit-distance")
        + figure_html(views.offset_map_figure(run, layer, head), "vit-offset")
        + "</div>"
        + "".join(f"<p>{html.escape(line)}</p>" for line in views.head_lines(run, layer, head))
    )
    return ReportSection("vit-distance", "Attention distance", body)


def _patterns(run: Run) -> ReportSection:
    if not views.has_clusters(run):
        return ReportSection("vit-patterns", "Attention patterns", "<p>This run has no pattern clusters.</p>")
    info = run.table("cluster_info")
    rows = [
        [
            str(int(r.cluster)),
            str(int(r.n_maps)),
            fmt(100 * float(r.map_share), 3),
            str(int(r.n_heads_dominant)),
            fmt(float(r.prototype_self), 3),
            fmt(float(r.prototype_distance), 3),
        ]
        for r in info.itertuples(index=False)
    ]
    body = (
        "<p>Per-query attention maps (centred on the query) of every head were encoded by an autoencoder "
        "and clustered with k-means on the codes; each prototype is the mean map of its cluster.</p>"
        + figure_html(views.cluster_gallery(run), "vit-clusters", wide=True)
        + table_html(["cluster", "maps", "% of maps", "heads dominated", "self share", "mean distance"], rows)
    )
    return ReportSection("vit-patterns", "Attention-pattern clusters", body)


def report_sections(run: Run) -> list[ReportSection]:
    """The vit-heads sections; a run without the vit-heads tables gets the generic heads heat maps."""
    if not views.is_vit(run):
        return generic.report_sections(run)
    return [
        _overview(run),
        _importance(run),
        _statistics(run),
        *validation_sections(run),
        _distance(run),
        _patterns(run),
    ]
