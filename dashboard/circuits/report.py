"""The circuits report, for ``ioi``, ``colored-objects`` and ``circuit-reuse`` runs: task performance,
the heads found per class with the circuit graph, the patching maps of every stage, faithfulness
against random circuits, and for reuse runs the overlap curve and the intervention. The same figures
as the dashboard's circuits page, as static plotly, each with sentences reading the run's numbers."""

from __future__ import annotations

import html

from analyses.runstore import Run
from dashboard.circuits import figures, graph, views
from dashboard.core import generic
from dashboard.core.section import ReportSection, figure_html, fmt, table_html
from dashboard.core.validation import validation_sections


def _paragraphs(lines: list[str]) -> str:
    return "".join(f"<p>{html.escape(line)}</p>" for line in lines)


def _summary(run: Run) -> ReportSection:
    intro = (
        "<p>Indirect-object identification (Wang et al. 2022) and one-shot Colored Objects (Merullo et "
        "al. 2024). The metric is the logit difference at the last position END (IOI: logit(IO) − "
        "logit(S); Colored Objects: the asked object's colour minus the colour the corrupted question "
        "asks for). Every patching score is a share of the clean–corrupt gap of that metric: −1 means "
        "the patch removed the whole gap, 0 nothing, a positive value that it pushed the model further "
        "toward the right answer. Settings: "
        f"{html.escape(views.settings_line(run))}.</p>"
    )
    metrics = views.metrics_table(run)
    rows = [
        [
            views.task_label(str(r["task"])),
            str(int(r["n_items"])),
            f"{views.num(r['logit_diff'])} [{views.num(r['logit_diff_low'])}, {views.num(r['logit_diff_high'])}]",
            views.num(r["logit_diff_corrupt"]),
            f"{views.num(r['accuracy'], '.1%')} [{views.num(r['accuracy_low'], '.1%')}, "
            f"{views.num(r['accuracy_high'], '.1%')}]",
            views.num(r["accuracy_chance"], ".1%"),
            views.num(r["vocab_accuracy"], ".1%"),
        ]
        for r in metrics.to_dict("records")
    ]
    table = table_html(
        [
            "task",
            "prompts",
            "logit difference (95%)",
            "corrupted",
            "accuracy among candidates (95%)",
            "chance",
            "top-1 over the vocabulary",
        ],
        rows,
    )
    body = (
        intro
        + _paragraphs(views.metric_lines(run))
        + table
        + figure_html(figures.metrics_figure(run), "circuits-metrics-figure", wide=True)
    )
    return ReportSection("circuits-summary", "Circuits: task performance", body)


def _heads(run: Run) -> ReportSection:
    parts = [
        "<p>A head joins a class when its path-patching score in the stage that looks for the class "
        "passes min_share (negative for every class but the negative name movers) and its mean "
        "attention on the class's signature passes min_attention. In the graphs, heads sit at (layer, "
        "head) and edges are the path-patching shares from each found head into the receivers of the "
        "next stage (width: |share|; blue: the path carries the answer, red: against it); the logits "
        "are the sink at the right.</p>",
        _paragraphs(views.circuit_lines(run)),
    ]
    for i, task in enumerate(views.tasks(run)):
        rows = views.class_rows(run, task)
        parts.append(f"<h3>{html.escape(views.task_label(task))}</h3>")
        if rows.empty:
            parts.append("<p>No head passed both tests of any class.</p>")
        else:
            parts.append(
                table_html(
                    list(views.CLASS_COLUMNS.values()),
                    rows[list(views.CLASS_COLUMNS)].itertuples(index=False),
                )
            )
        receivers = views.receiver_notes(run, task)
        if receivers:
            parts.append(
                "<details><summary>receivers of each stage</summary><ul>"
                + "".join(f"<li>{html.escape(line)}</li>" for line in receivers)
                + "</ul></details>"
            )
        parts.append(figure_html(graph.circuit_graph(run, task), f"circuits-graph-{i}", wide=True))
    return ReportSection("circuits-heads", "Heads by class and the circuit graph", "".join(parts))


def _patching(run: Run) -> ReportSection:
    note = (
        " Grey cells were not tested: the run activation- and path-patched only the strongest heads by "
        "attribution patching (max_senders)."
        if views.screened(run)
        else ""
    )
    parts = [
        "<p>Rows: layers (layer 0 at the top); columns: heads; the tasks side by side on one colour "
        "scale centred at 0. Ringed: the heads of the classes the stage found (activation and attribution "
        f"patching: every circuit head), in their class colour.{note}</p>",
    ]
    for axis in views.axes(run):
        parts.append(
            f"<h3>{html.escape(views.AXIS_LABELS[axis])}</h3><p>{html.escape(views.AXIS_NOTES[axis])}.</p>"
        )
        parts.append(figure_html(figures.patching_heatmaps(run, axis), f"circuits-heatmap-{axis}", wide=True))
    return ReportSection("circuits-patching", "Activation and path patching", "".join(parts))


def _faithfulness(run: Run) -> ReportSection:
    body = (
        "<p>Faithfulness of a circuit: the mean logit difference with every head outside it mean-ablated "
        "(its mean z over the task's corrupted prompts of the same template), over the full model's. "
        "Random circuits of the same size and the empty circuit are the controls.</p>"
        + _paragraphs(views.faithfulness_lines(run))
        + figure_html(figures.faithfulness_figure(run), "circuits-faithfulness-figure", wide=True)
    )
    return ReportSection("circuits-faithfulness", "Faithfulness", body)


def _reuse(run: Run) -> ReportSection:
    overlap = views.overlap_table(run)
    at2 = overlap[(overlap["percent"] - views.PAPER_PERCENT).abs() < 1e-9]
    rows = [
        [
            "activation patching"
            if r["source"] == "activation_patching"
            else views.AXIS_LABELS.get(r["stage"], "all stages (pooled)"),
            str(int(r["k"])),
            str(int(r["shared"])),
            views.num(r["overlap"], ".0%"),
            views.num(r["jaccard"]),
        ]
        for r in at2.to_dict("records")
    ]
    parts = [
        "<p>Per stage, the top p% of heads by |score| on each task; the overlap is the share of IOI's top "
        "heads that are Colored Objects' top heads of the same stage, pooled over the stages for "
        '"all" (Merullo et al.\'s 25 of 32 at 2% on GPT2-Medium). Two independent rankings would share '
        "about p%.</p>",
        _paragraphs(views.reuse_lines(run)),
        figure_html(figures.overlap_figure(run), "circuits-overlap-figure", wide=True),
    ]
    if rows:
        parts.append("<h3>At the top 2%</h3>")
        parts.append(table_html(["stage", "top heads (k)", "shared", "overlap", "Jaccard"], rows))
    if "rank_correlation" in run.table_names:
        corr = views.rank_correlation_table(run)
        parts.append("<h3>Rank correlation of the two tasks' per-head scores</h3>")
        parts.append(
            table_html(
                ["stage", "Spearman", "p value", "heads"],
                [
                    [
                        views.AXIS_LABELS.get(str(r["stage"]), str(r["stage"])),
                        views.num(r["spearman"]),
                        fmt(float(r["p_value"])),
                        str(int(r["n_heads"])),
                    ]
                    for r in corr.to_dict("records")
                ],
            )
        )
    return ReportSection("circuits-reuse", "Circuit reuse: overlap of the top heads", "".join(parts))


def _intervention(run: Run) -> ReportSection:
    iv = views.intervention_table(run)
    rows = [
        [
            r["condition"],
            str(int(r["n_heads"])),
            r["heads"] or "none",
            f"{views.num(r['accuracy'], '.1%')} [{views.num(r['accuracy_low'], '.1%')}, "
            f"{views.num(r['accuracy_high'], '.1%')}]",
            views.num(r["vocab_accuracy"], ".1%"),
            views.num(r["logit_diff"]),
        ]
        for r in iv.to_dict("records")
    ]
    body = (
        "<p>The END query of the edited heads puts all its attention on the two wrong colours of the "
        "scene (equal halves); the rest of the model runs on. The IOI S-inhibition and negative name "
        "mover heads are edited, and for control as many random heads.</p>"
        + _paragraphs(views.intervention_lines(run))
        + '<div class="grid">'
        + figure_html(figures.intervention_figure(run, "accuracy"), "circuits-intervention-figure")
        + figure_html(
            figures.intervention_figure(run, "vocab_accuracy"), "circuits-intervention-vocab-figure"
        )
        + "</div><details><summary>every condition</summary>"
        + table_html(
            [
                "condition",
                "heads edited",
                "which",
                "accuracy (95%)",
                "top-1 over the vocabulary",
                "logit difference",
            ],
            rows,
        )
        + "</details>"
    )
    return ReportSection("circuits-intervention", "Intervention on Colored Objects", body)


def report_sections(run: Run) -> list[ReportSection]:
    """The circuit sections; a run without the circuit tables (written by other code under one of the
    three names) gets the generic heads heat maps instead of an error."""
    if not views.is_circuits(run):
        return generic.report_sections(run)
    sections = [_summary(run), _heads(run), _patching(run), _faithfulness(run), *validation_sections(run)]
    if views.is_reuse(run):
        sections += [_reuse(run), _intervention(run)]
    return sections
