"""The vhd / vhr report: what the run's numbers say with CHAIR and POPE per setting, the heads' VHD
(the VHR layers marked), T-VHD of hallucinated vs correct object words and along one caption, and
the paired changes of each VHR setting against the baseline (the figures of the VHD page, through
:mod:`dashboard.vhd.figures`)."""

from __future__ import annotations

import html

from analyses.runstore import Run
from dashboard.core import generic
from dashboard.core.section import ReportSection, figure_html, fmt, table_html
from dashboard.core.validation import validation_sections
from dashboard.vhd import figures, views
from dashboard.vhd import sweep as sw


def _warnings(run: Run) -> str:
    """A warning box per setting whose object recall or caption length collapses ("" when none)."""
    found = views.collapses(run)
    if not found:
        return ""
    return (
        "".join(f'<p class="warning"><b>⚠ Warning:</b> {html.escape(c.message())}</p>' for c in found)
        + f"<p>The rule: {html.escape(views.collapse_rule())}.</p>"
    )


def _overview(run: Run) -> ReportSection:
    warning = ' class="warning"'
    items = "".join(
        f"<li{warning if line.startswith('Warning:') else ''}>{html.escape(line)}</li>"
        for line in views.findings(run)
    )
    wide = views.summary_wide(run)
    parts = [
        _warnings(run),
        "<p>VHD of a head (He et al., ACL 2025) is the distance between its output with the image and "
        "with the image tokens removed, at each generated token; T-VHD of a token sums each layer's "
        "top-k VHD at the step that produced it; VHR scales the heads with above-median VHD in chosen "
        f"layers. Settings: {html.escape(views.settings_line(run))}.</p>",
        f"<ul>{items}</ul>",
        "<p>CHAIR with object recall and mean caption length (words), and POPE, per setting "
        f"(value [{views.interval_level(run)} percentile bootstrap interval]):</p>",
        table_html(list(wide.columns), wide.to_numpy().tolist()),
    ]
    s = views.settings_table(run)
    if len(s):
        rows = [
            [
                str(r["name"]),
                fmt(float(r["alpha"])),
                str(r["layers"]),
                str(r.get("layers_used", "")),
                str(bool(r["outlier_removal"])),
                str(bool(r["random"])),
                fmt(float(r.get("heads_reinforced_mean", float("nan")))),
            ]
            for _, r in s.iterrows()
        ]
        parts.append(
            "<p>The VHR settings (the first is the main one):</p>"
            + table_html(
                [
                    "setting",
                    "alpha",
                    "layers",
                    "layers used",
                    "outlier removal",
                    "random heads",
                    "heads reinforced",
                ],
                rows,
            )
        )
    return ReportSection("vhd-overview", "VHD and VHR: what the run says", "".join(parts))


def _heads(run: Run) -> ReportSection:
    metrics = views.head_metrics(run)
    divs = "".join(figure_html(figures.heads_figure(run, m), f"vhd-heads-{m}") for m in metrics)
    top = views.top_heads(run, "vhd_mean") if "vhd_mean" in metrics else None
    table = ""
    if top is not None:
        cols = [c for c in top.columns if c not in ("layer", "head")]
        rows = [
            [f"L{int(r['layer'])} H{int(r['head'])}", *[fmt(float(r[c])) for c in cols]]
            for _, r in top.iterrows()
        ]
        table = "<p>The heads with the largest mean VHD</p>" + table_html(
            ["head", *[views.METRIC_NAMES[c] for c in cols]], rows
        )
    layers = views.vhr_layers(run)
    note = (
        f"The main VHR setting's layers ({html.escape(views.layer_ranges(layers))}) are outlined and marked ▸."
        if layers
        else "This run has no VHR setting."
    )
    body = (
        "<p>Rows are layers (layer 0 at the top), columns heads. " + note + "</p>"
        f'<div class="grid">{divs}</div>' + table
    )
    return ReportSection("vhd-heads", "Vision-aware heads", body)


def _caption_html(c: views.Caption) -> str:
    bad = (
        f'<b style="color:{figures.HALLUCINATED_COLOUR}">{html.escape(", ".join(c.hallucinated))}</b>'
        if c.hallucinated
        else "none"
    )
    return (
        f"<p><b>{html.escape(c.setting)}</b>: <code>{html.escape(c.text or '(empty)')}</code><br>"
        f"objects named: {html.escape(', '.join(c.mentioned) or 'none')}; hallucinated: {bad}; "
        f"missed: {html.escape(', '.join(c.missed) or 'none')}</p>"
    )


def _tvhd(run: Run) -> ReportSection:
    parts = [
        "<p>T-VHD of the object words of the baseline captions (the first token of each word), "
        "hallucinated against correct; the paper finds hallucinated words lower.</p>",
        figure_html(figures.tvhd_distribution_figure(run), "vhd-words-figure"),
        f"<p>{html.escape(views.tvhd_test_line(run))}</p>",
    ]
    scene = views.default_scene(run)
    if scene is None:
        parts.append("<p>No baseline caption has any token, so there is no caption to draw.</p>")
    else:
        why = (
            "the first with a hallucinated object word"
            if scene in views.hallucinating_scenes(run)
            else "no caption has a hallucinated object word; the first captioned scene"
        )
        caps = "".join(_caption_html(c) for c in views.scene_captions(run, scene))
        truth = views.scene_truth(run, scene)
        parts.append(
            f"<h3>T-VHD along the caption of scene {scene} ({html.escape(why)})</h3>"
            + '<div class="grid">'
            + figure_html(figures.tvhd_caption_figure(run, scene), "vhd-caption-figure")
            + figure_html(figures.image_figure(run, scene), "vhd-image-figure")
            + "</div>"
            + caps
            + (f"<p>Ground truth: {html.escape(truth)}</p>" if truth else "")
        )
    return ReportSection("vhd-tvhd", "T-VHD of hallucinated and correct words", "".join(parts))


def _benchmarks(run: Run) -> ReportSection:
    body = (
        "<p>CHAIR_S (share of captions with a hallucinated object), CHAIR_I (hallucinated / mentioned "
        "objects), beside them object recall (correctly named / present objects) and mean caption length, "
        "and POPE F1 and accuracy per setting, baseline first, with percentile bootstrap "
        "intervals; then each setting's paired change against the baseline (scenes resampled together). "
        "A lower CHAIR is no improvement when recall or length collapses with it.</p>"
        + _warnings(run)
        + figure_html(figures.benchmark_figure(run), "vhd-benchmarks-figure", wide=True)
        + figure_html(figures.deltas_figure(run), "vhd-deltas-figure", wide=True)
    )
    d = views.deltas_table(run)
    if len(d):
        rows = [
            [
                str(r.setting),
                str(r.benchmark),
                str(r.kind),
                str(r.metric),
                views.num(r.delta, "+.3f"),
                views.num(r.lo, "+.3f"),
                views.num(r.hi, "+.3f"),
            ]
            for r in d.itertuples(index=False)
        ]
        body += table_html(["setting", "benchmark", "kind", "metric", "Δ", "low", "high"], rows)
    return ReportSection("vhd-benchmarks", "CHAIR and POPE under VHR", body)


def _sweep(run: Run) -> list[ReportSection]:
    """The alpha × layers sweep as a figure of paired changes, its reading and its table."""
    s = sw.sweep_table(run)
    if s.empty:
        return []
    items = "".join(f"<li>{html.escape(line)}</li>" for line in sw.sweep_sentences(run))
    rows = [
        [
            str(r.setting),
            fmt(float(r.alpha)),
            str(r.layers_used),
            str(r.metric),
            views.num(r.baseline),
            views.num(r.value),
            f"{views.num(r.delta, '+.3f')} [{views.num(r.delta_lo, '+.3f')}, {views.num(r.delta_hi, '+.3f')}]",
        ]
        for r in s.itertuples(index=False)
    ]
    body = (
        "<p>Each alpha at the main setting's layers and each layer set at its alpha; alpha below 1 "
        "suppresses the heads VHR selects (the converse control). Changes are paired against the "
        "unmodified model on the same scenes.</p>"
        + figure_html(sw.sweep_figure(run), "vhd-sweep-figure", wide=True)
        + f"<ul>{items}</ul>"
        + table_html(
            ["setting", "alpha", "layers used", "metric", "unmodified", "value", "Δ [interval]"], rows
        )
    )
    return [ReportSection("vhd-sweep", "VHR sweep: alpha and layers", body)]


def report_sections(run: Run) -> list[ReportSection]:
    """The vhd / vhr sections; a run without the vhd tables gets the generic heads heat maps."""
    if not views.is_vhd(run):
        return generic.report_sections(run)
    return [
        _overview(run),
        _heads(run),
        _tvhd(run),
        _benchmarks(run),
        *_sweep(run),
        *validation_sections(run),
    ]
