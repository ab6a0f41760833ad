"""The head-atlas report: the atlas in numbers with the runs it joined, every role with its rule,
paper, heads and held-out validation, the layer x head map of roles, the overlap of roles, the
strongest correlations across analyses and the heads with the most roles. The same figures as the
dashboard's atlas page, as static plotly (through :mod:`dashboard.atlas.views`)."""

from __future__ import annotations

import html

from analyses.runstore import Run
from dashboard.atlas import views
from dashboard.core import common, generic
from dashboard.core.section import ReportSection, figure_html, fmt, table_html

TOP_CORRELATIONS = 10


def _summary(run: Run) -> ReportSection:
    numbers = "".join(
        f"<div><b>{html.escape(value)}</b> {html.escape(what)}</div>"
        for what, value in views.summary_numbers(run)
    )
    items = "".join(f"<li>{html.escape(line)}</li>" for line in views.findings_lines(run))
    joined = [
        [str(r.analysis), str(r.run_id), str(r.created), str(r.config_hash), str(r.code_revision)]
        for r in views.sources(run).itertuples(index=False)
    ]
    skipped = views.table(run, "skipped")
    skipped_html = (
        "<p>Runs not joined:</p>"
        + table_html(
            ["analysis", "run", "why"], [[r.analysis, r.run_id, r.reason] for r in skipped.itertuples()]
        )
        if len(skipped)
        else "<p>No run of the model was left out.</p>"
    )
    body = (
        "<p>The head atlas joins the newest runs of one model (same weights, same BOS policy) into one "
        "table with a row per head: every analysis's numbers, and the roles they give each head by the "
        "rule and threshold of the paper the role comes from. A head may have several roles.</p>"
        f'<div class="summary">{numbers}</div>'
        f"<ul>{items}</ul>"
        "<p>Runs joined:</p>"
        + table_html(["analysis", "run", "created", "config hash", "code revision"], joined)
        + skipped_html
    )
    return ReportSection("atlas-summary", "Head atlas: what it says", body)


def _roles(run: Run) -> ReportSection:
    roles = views.roles_table(run)
    rows = [
        [
            str(r.role),
            str(r.label),
            str(r.analysis),
            str(r.threshold),
            str(r.paper),
            str(int(r.n_heads)),
            f"{float(r.share):.1%}",
            common.num(r.mean_depth, ".2f"),
            str(r.validated),
        ]
        for r in roles.itertuples(index=False)
    ]
    body = (
        "<p>Each role, the rule that admits a head to it, the paper the rule comes from, and the heads "
        "it admits: their number, share of the model's heads and mean relative depth (layer / "
        "layers). Validated: of those heads, how many the analysis's held-out test confirmed (not "
        "tested: the analysis runs no such test).</p>"
        + table_html(
            ["role", "label", "analysis", "rule", "paper", "heads", "share", "mean depth", "validated"], rows
        )
    )
    return ReportSection("atlas-roles", "Roles", body)


def _grid(run: Run) -> ReportSection:
    body = (
        "<p>Rows: layers (layer 0 at the top); columns: heads. A head's cell is split into one stripe "
        "per role it has; the number on a head with several says how many.</p>"
        + figure_html(views.role_grid(run), "atlas-grid-figure", wide=True)
    )
    return ReportSection("atlas-grid", "Every head's roles", body)


def _overlap(run: Run) -> ReportSection:
    over = views.table(run, "overlap").dropna(subset=["jaccard"])
    over = over[over["both"] > 0].sort_values("jaccard", ascending=False, kind="stable")
    rows = [
        [
            str(r.role_a),
            str(r.role_b),
            str(int(r.n_a)),
            str(int(r.n_b)),
            str(int(r.both)),
            f"{float(r.jaccard):.2f}",
            f"{float(r.expected_both):.1f}",
        ]
        for r in over.itertuples(index=False)
    ]
    table = (
        table_html(["role", "role", "heads", "heads", "both", "Jaccard", "both if independent"], rows)
        if rows
        else "<p>No two roles share a head.</p>"
    )
    body = (
        "<p>For each pair of roles, the heads with both over the heads with either (Jaccard), and the "
        "number of heads with both that two independent roles would share.</p>"
        + figure_html(views.overlap_figure(run), "atlas-overlap-figure")
        + table
    )
    return ReportSection("atlas-overlap", "Roles that share heads", body)


def _correlations(run: Run) -> ReportSection:
    top = views.top_correlations(run, TOP_CORRELATIONS)
    rows = [
        [
            str(r.metric_a),
            str(r.metric_b),
            f"{float(r.spearman):+.2f}",
            str(int(r.n)),
            fmt(float(r.p_value), 2),
        ]
        for r in top.itertuples(index=False)
    ]
    body = (
        "<p>Spearman's rank correlation of each analysis's key metrics with the other analyses', over "
        "the heads where both are defined, strongest first (pairs within one analysis left out).</p>"
        + (
            table_html(["metric", "metric", "Spearman", "heads", "p"], rows)
            if rows
            else "<p>No pair of key metrics from two analyses varies over enough heads.</p>"
        )
    )
    return ReportSection("atlas-correlations", "Correlations across analyses", body)


def _many(run: Run) -> ReportSection:
    many = views.many_roles(run)
    rows = [
        [
            f"L{int(r.layer)}H{int(r.head)}",
            str(int(r.kv_head)),
            f"{float(r.depth):.2f}",
            str(int(r.n_roles)),
            r.roles_text,
        ]
        for r in many.itertuples(index=False)
    ]
    body = (
        table_html(["head", "KV head", "depth", "roles", "which"], rows)
        if rows
        else "<p>No head has two roles or more.</p>"
    )
    return ReportSection("atlas-many", "Heads with the most roles", body)


def report_sections(run: Run) -> list[ReportSection]:
    """The atlas sections; a run without the atlas tables (written by other code under the name
    ``atlas``) gets the generic heads heat maps instead of an error."""
    if not views.is_atlas(run):
        return generic.report_sections(run)
    return [_summary(run), _roles(run), _grid(run), _overlap(run), _correlations(run), _many(run)]
