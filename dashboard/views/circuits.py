"""Circuit views: what the circuits page, its report sections and the notebook show, read from an
``ioi``, ``colored-objects`` or ``circuit-reuse`` run.

Background
----------
:mod:`analyses.circuits` finds the IOI circuit (Wang et al. 2022) by staged path patching and runs
the same procedure on one-shot Colored Objects (Merullo et al. 2024). Every score is a *share of the
clean–corrupt gap*: ``(LD_patched - LD_clean) / (LD_clean - LD_corrupt)`` of the logit difference
LD at END, so -1 means that patching removed the whole difference between clean and corrupted
prompts, 0 nothing, and a positive value that the patch pushed the model further toward the right
answer. A head that carries the answer therefore scores *negative* (blue in every figure here), a
head that works against it (a negative name mover) positive (red). The tables drawn:

* ``metrics``: per task, the logit difference (95% bootstrap interval), on the corrupted prompts too,
  and the accuracy among the candidates (with chance) and over the whole vocabulary;
* ``scores``: (task, stage, layer, head, score) for activation patching and each path-patching
  stage (NaN: not tested, when ``max_senders`` screened the head out);
* ``circuit``: the heads of each class (path score past ``min_share`` and the attention signature),
  with the ``sig_*`` attentions; ``receivers``: what each stage patched into (the class found, or
  stand-ins when none was); ``edges``: the path-patching share of every found head into each
  receiving head of the next stage (receiver ``-1``: the logits);
* ``faithfulness``: the found circuit, the empty circuit and random circuits of the same size, every
  head outside them mean-ablated; ``ablation``: the name movers mean-ablated vs random heads;
* ``circuit-reuse`` runs also: ``overlap`` (per stage and pooled, the share of IOI's top-p% heads
  that are Colored Objects' top-p% heads too), ``rank_correlation`` (Spearman of the two tasks'
  per-head scores) and ``intervention`` (Colored Objects accuracy with the IOI inhibition heads made
  to attend to the wrong colours, before, and with random heads edited instead).

Every function takes a saved :class:`~analyses.runstore.Run` or the
:class:`~analyses.base.AnalysisResult` an analysis returns (so a notebook can draw a result before
saving it) and returns a figure, a small table or plain text; the page and the report only arrange
them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.circuits import CLASSES, SIGNATURES, STAGES, TASK_LABELS
from dashboard.core import common, figures

Source = common.Source
IvMetric = Literal["accuracy", "vocab_accuracy", "logit_diff"]
IV_METRICS: tuple[IvMetric, ...] = ("accuracy", "vocab_accuracy", "logit_diff")
IV_METRIC_LABELS: dict[IvMetric, str] = {
    "accuracy": "accuracy among the scene's colours",
    "vocab_accuracy": "top-1 over the vocabulary",
    "logit_diff": "logit difference",
}
ANALYSES = ("ioi", "colored-objects", "circuit-reuse")
TASKS = ("ioi", "colored_objects")
AXES: tuple[str, ...] = ("activation", "attribution", *STAGES)
WHOLE_MODEL_AXES = ("activation", "attribution")  # maps of every head, not of one stage's classes
REQUIRED_TABLES = frozenset({"heads", "scores", "metrics", "circuit", "edges", "faithfulness"})
REUSE_TABLES = frozenset({"overlap", "intervention"})
PAPER_PERCENT = 2.0

AXIS_LABELS = {
    "activation": "activation patching",
    "attribution": "attribution patching (estimate)",
    "logits": "path → logits",
    "mover_queries": "path → name movers' queries",
    "inhibition_kv": "path → S-inhibition keys & values",
    "induction_k": "path → induction keys",
}
AXIS_NOTES = {
    "activation": "each head's output replaced by its value on the corrupted prompt",
    "attribution": "a first-order (gradient) estimate of activation patching for every head, from one "
    "backward pass; with max_senders it picks the heads that are patched exactly",
    "logits": "the head's direct path to the logits at END (finds name movers, negative movers)",
    "mover_queries": "the head's path into the name movers' queries at END (finds S-inhibition heads)",
    "inhibition_kv": "the head's path into the S-inhibition heads' keys and values (finds induction and "
    "duplicate-token heads)",
    "induction_k": "the head's path into the induction heads' keys (finds previous-token heads)",
}
CLASS_LABELS = {
    "name_mover": "name mover",
    "negative_mover": "negative name mover",
    "s_inhibition": "S-inhibition",
    "induction": "induction",
    "duplicate_token": "duplicate token",
    "previous_token": "previous token",
}
CLASS_COLOURS = {
    "name_mover": "#1b9e77",
    "negative_mover": "#d95f02",
    "s_inhibition": "#7570b3",
    "induction": "#e7298a",
    "duplicate_token": "#66a61e",
    "previous_token": "#e6ab02",
}
CLASS_SIGNATURE = {
    "name_mover": "end_to_target",
    "negative_mover": "end_to_target",
    "s_inhibition": "end_to_dup",
    "induction": "dup2_to_dup1_next",
    "duplicate_token": "dup2_to_dup1",
    "previous_token": "dup1_next_to_dup1",
}
ROLE_NAMES = {
    "ioi": {"end": "END", "target": "IO", "dup1": "S1", "dup2": "S2", "dup1_next": "S1+1"},
    "colored_objects": {
        "end": "END",
        "target": "the answer's colour",
        "dup1": "the asked object (scene)",
        "dup2": "the asked object (question)",
        "dup1_next": "the token after it",
    },
}
METRIC_NOTES = {
    "ioi": "logit(IO) − logit(S) at END",
    "colored_objects": "logit(asked object's colour) − logit(the colour the corrupted question asks for)",
}
STAND_IN = "stand-in receiver"
SUPPORT_COLOUR = "#2166ac"  # negative share: the path carries the answer
OPPOSE_COLOUR = "#b2182b"  # positive share: the path works against it
STAND_IN_COLOUR = "#9e9e9e"
LOGITS_COLOUR = "#1d2330"
FOUND_COLOUR = "#31688e"
RANDOM_COLOUR = "#9fb4c7"
EMPTY_COLOUR = "#5b6475"
CHANCE_COLOUR = "#e4572e"
STAGE_COLOURS = {
    "logits": "#1b9e77",
    "mover_queries": "#7570b3",
    "inhibition_kv": "#e7298a",
    "induction_k": "#e6ab02",
    "all": "#1d2330",
    "activation": "#5b6475",
}
HEAT_SCALE = "RdBu_r"  # blue: negative (carries the answer), red: positive
LD_COLOUR = "#3b528b"
ACCURACY_COLOUR = "#21918c"


def _legend_below() -> dict[str, Any]:
    """A horizontal legend at the bottom of the figure, under the x axis title (margin b >= 90)."""
    return {"orientation": "h", "yref": "container", "y": 0.01, "yanchor": "bottom", "x": 0.0}


# ---------------------------------------------------------------------------------------- access


def table(source: Source, name: str) -> pd.DataFrame:
    """Table ``name`` of a saved run or of an unsaved result (a copy either way)."""
    return common.table(source, name, kind="circuits")


table_names = common.table_names
config = common.config


def analysis(source: Source) -> str:
    return str(source.analysis)


model_name = common.model_name
notes = common.notes


def is_circuits(source: Source) -> bool:
    """Whether the source has the tables this module draws."""
    return common.has_tables(source, REQUIRED_TABLES)


def is_reuse(source: Source) -> bool:
    """Whether the source also has the reuse tables (a ``circuit-reuse`` run)."""
    return common.has_tables(source, REUSE_TABLES)


def _tasks_in(values: Sequence[object]) -> list[str]:
    present = [str(v) for v in values]
    return [t for t in TASKS if t in present] + sorted(set(present) - set(TASKS))


def tasks(source: Source) -> list[str]:
    """The run's tasks, IOI first."""
    return _tasks_in(list(table(source, "metrics")["task"]))


def task_label(task: str) -> str:
    return TASK_LABELS.get(task, task)


def _check_task(source: Source, task: str | None) -> str:
    names = tasks(source)
    if task is None:
        return names[0]
    if task not in names:
        raise KeyError(f"this run has no task {task!r}; it has {', '.join(names)}")
    return task


def shape(source: Source) -> tuple[int, int]:
    """(layers, heads) of the model, from the heads table."""
    heads = table(source, "heads")
    return int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1


def head_label(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"


def signature_label(task: str, name: str) -> str:
    """What an attention signature measures, in the task's own roles (``S2 → S1+1``)."""
    if name == "previous_token":
        return "t → t−1"
    roles = ROLE_NAMES.get(task, ROLE_NAMES["ioi"])
    query, keys = SIGNATURES[name]
    return f"{roles[query]} → {' + '.join(roles[k] for k in keys)}"


def counted(n: int, noun: str = "head") -> str:
    """``1 head``, ``3 heads``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def num(value: object, spec: str = ".2f") -> str:
    """``value`` formatted, or "n/a" when it is missing or not finite."""
    return common.num(value, spec)


def settings_line(source: Source) -> str:
    """One line naming the run's settings (plain text)."""
    cfg = config(source)
    parts = []
    if "n_items" in cfg:
        parts.append(f"{cfg['n_items']} prompts per task")
    if "min_share" in cfg:
        parts.append(f"a class needs a path score of at least {cfg['min_share']:g} of the gap")
    if "min_attention" in cfg:
        parts.append(f"and a signature attention of at least {cfg['min_attention']:g}")
    if "max_per_class" in cfg:
        parts.append(f"at most {cfg['max_per_class']} heads per class")
    if cfg.get("max_senders") is None:
        parts.append("every head path-patched")
    else:
        parts.append(
            f"only the {cfg['max_senders']} strongest heads by attribution patching activation- and path-patched"
        )
    if "n_random" in cfg:
        parts.append(f"{cfg['n_random']} random controls")
    if "seed" in cfg:
        parts.append(f"seed {cfg['seed']}")
    return ", ".join(parts)


def axes(source: Source) -> list[str]:
    """The score axes the run has (attribution patching only in runs that computed it)."""
    heads = table(source, "heads")
    has_attribution = any(str(c).endswith("_attribution") for c in heads.columns)
    return [a for a in AXES if a != "attribution" or has_attribution]


def screened(source: Source) -> bool:
    """Whether some heads were not path-patched (NaN scores)."""
    scores = table(source, "scores")
    return bool(scores["score"].isna().any())


# ---------------------------------------------------------------------------------------- tables


def metrics_table(source: Source) -> pd.DataFrame:
    metrics = table(source, "metrics")
    metrics["task"] = metrics["task"].astype(str)
    return metrics.set_index("task").loc[tasks(source)].reset_index()


def score_grid(source: Source, task: str, axis: str) -> np.ndarray:
    """``[L, H]`` scores of ``task`` on ``axis`` (activation or a stage); NaN where not tested."""
    if axis not in AXES:
        raise KeyError(f"no score axis {axis!r}; choose one of {', '.join(AXES)}")
    n_layers, n_heads = shape(source)
    grid = np.full((n_layers, n_heads), np.nan)
    if axis == "attribution":  # a column of the heads table only
        heads = table(source, "heads")
        column = f"{'ioi' if task == 'ioi' else 'co'}_attribution"
        if column not in heads.columns:
            raise KeyError(f"this run has no attribution patching scores (no {column} column)")
        grid[heads["layer"].to_numpy(dtype=int), heads["head"].to_numpy(dtype=int)] = heads[column].to_numpy(
            float
        )
        return grid
    scores = table(source, "scores")
    part = scores[(scores["task"].astype(str) == task) & (scores["stage"].astype(str) == axis)]
    grid[part["layer"].to_numpy(dtype=int), part["head"].to_numpy(dtype=int)] = part["score"].to_numpy(float)
    return grid


def circuit_rows(source: Source, task: str) -> pd.DataFrame:
    """The ``circuit`` rows of ``task`` in class order (then rank), with a ``label`` column."""
    circuit = table(source, "circuit")
    part = circuit[circuit["task"].astype(str) == task].copy()
    part["class"] = part["class"].astype(str)
    part["order"] = [CLASSES.index(c) if c in CLASSES else len(CLASSES) for c in part["class"]]
    part = part.sort_values(["order", "rank"], kind="stable").drop(columns="order").reset_index(drop=True)
    part["label"] = [head_label(r.layer, r.head) for r in part.itertuples(index=False)]
    return part


def head_classes(source: Source, task: str) -> dict[tuple[int, int], list[str]]:
    """Every circuit head of ``task`` and its classes (class order)."""
    out: dict[tuple[int, int], list[str]] = {}
    for r in circuit_rows(source, task).to_dict("records"):
        out.setdefault((int(r["layer"]), int(r["head"])), []).append(str(r["class"]))
    return out


CLASS_COLUMNS = {
    "class": "class",
    "head": "head",
    "stage": "found in stage",
    "score": "path score",
    "activation": "activation patching",
    "signature": "signature",
    "attention": "attention",
}


def class_rows(source: Source, task: str) -> pd.DataFrame:
    """One display row per (class, head): the path score of the stage that found it, its activation
    patching score and the attention signature the class needs (formatted strings)."""
    rows = []
    for r in circuit_rows(source, task).to_dict("records"):
        cls = str(r["class"])
        sig = CLASS_SIGNATURE.get(cls, "")
        rows.append(
            {
                "class": CLASS_LABELS.get(cls, cls),
                "head": r["label"],
                "stage": AXIS_LABELS.get(str(r["stage"]), str(r["stage"])),
                "score": num(r["score"], "+.3f"),
                "activation": num(r["activation"], "+.3f"),
                "signature": signature_label(task, sig) if sig else "",
                "attention": num(r.get(f"sig_{sig}"), ".2f") if sig else "",
            }
        )
    return pd.DataFrame(rows, columns=list(CLASS_COLUMNS))


def receiver_notes(source: Source, task: str) -> list[str]:
    """One line per stage saying what it patched into (and when stand-ins took a class's place)."""
    receivers = table(source, "receivers")
    part = receivers[receivers["task"].astype(str) == task]
    lines = []
    for stage in STAGES:
        mine = part[part["stage"].astype(str) == stage]
        if mine.empty:
            continue
        heads = " ".join(head_label(r.layer, r.head) for r in mine.itertuples(index=False))
        lines.append(f"{AXIS_LABELS[stage]}: {heads} ({mine['why'].iloc[0]})")
    return lines


def stand_ins(source: Source, task: str) -> list[tuple[int, int]]:
    """Receivers of ``task`` that are no circuit head (stand-ins for a class not found)."""
    receivers = table(source, "receivers")
    part = receivers[receivers["task"].astype(str) == task]
    members = head_classes(source, task)
    found = sorted({(int(r.layer), int(r.head)) for r in part.itertuples(index=False)})
    return [h for h in found if h not in members]


def overlap_table(source: Source) -> pd.DataFrame:
    overlap = table(source, "overlap")
    for column in ("source", "stage"):
        overlap[column] = overlap[column].astype(str)
    return overlap


def overlap_at(source: Source, percent: float = PAPER_PERCENT, stage: str = "all") -> pd.Series | None:
    """The overlap row at ``percent`` (path patching, ``stage``; ``"activation"``: activation patching)."""
    overlap = overlap_table(source)
    kind = "activation_patching" if stage == "activation" else "path_patching"
    row = overlap[
        (overlap["source"] == kind) & (overlap["stage"] == stage) & np.isclose(overlap["percent"], percent)
    ]
    return row.iloc[0] if len(row) else None


def intervention_table(source: Source) -> pd.DataFrame:
    iv = table(source, "intervention")
    iv["condition"] = iv["condition"].astype(str)
    return iv


def chance(source: Source, task: str = "colored_objects") -> float:
    metrics = metrics_table(source).set_index("task")
    return float(metrics.loc[task, "accuracy_chance"]) if task in metrics.index else math.nan


# ---------------------------------------------------------------------------------------- metrics


def metrics_figure(source: Source) -> go.Figure:
    """Per task: the logit difference on clean prompts (95% interval) and on the corrupted ones; the
    accuracy among the candidates (with chance) and top-1 over the vocabulary."""
    m = metrics_table(source)
    names = [task_label(t) for t in m["task"]]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=["logit difference at END", "accuracy"],
        horizontal_spacing=0.14,
    )
    ld = m["logit_diff"].to_numpy(float)
    notes_ = [METRIC_NOTES.get(t, "logit difference") for t in m["task"]]
    fig.add_trace(
        go.Bar(
            x=names,
            y=ld,
            name="clean prompts",
            marker_color=LD_COLOUR,
            error_y=figures.error_bars(ld, m["logit_diff_low"], m["logit_diff_high"]),
            customdata=np.column_stack([m["logit_diff_low"], m["logit_diff_high"], m["n_items"], notes_]),
            hovertemplate="%{x}, clean prompts: %{customdata[3]}<br>mean %{y:.2f} "
            "[%{customdata[0]:.2f}, %{customdata[1]:.2f}] (95% bootstrap interval) over "
            "%{customdata[2]} prompts<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=names,
            y=m["logit_diff_corrupt"].to_numpy(float),
            mode="markers",
            name="corrupted prompts",
            marker={"symbol": "diamond", "size": 12, "color": CHANCE_COLOUR},
            customdata=np.column_stack([m["gap"].to_numpy(float)]),
            hovertemplate="%{x}, corrupted prompts: mean logit difference %{y:.2f}<br>clean − corrupted "
            "gap %{customdata[0]:.2f}: every patching score is a share of it<extra></extra>",
        ),
        row=1,
        col=1,
    )
    for column, label, colour in (
        ("accuracy", "among the candidates", ACCURACY_COLOUR),
        ("vocab_accuracy", "top-1 over the vocabulary", RANDOM_COLOUR),
    ):
        values = m[column].to_numpy(float)
        what = (
            "the right answer beats the other candidates (IOI: IO beats S; Colored Objects: the "
            "right colour beats the scene's other colours)"
            if column == "accuracy"
            else "the right answer is the top token over the whole vocabulary"
        )
        fig.add_trace(
            go.Bar(
                x=names,
                y=values,
                name=label,
                marker_color=colour,
                error_y=figures.error_bars(values, m[f"{column}_low"], m[f"{column}_high"]),
                customdata=np.column_stack([m[f"{column}_low"], m[f"{column}_high"], m["n_items"]]),
                hovertemplate=f"%{{x}}, {label}: %{{y:.1%}} "
                "[%{customdata[0]:.1%}, %{customdata[1]:.1%}] (95% interval) of %{customdata[2]} "
                f"prompts<br>share of prompts where {what}<extra></extra>",
            ),
            row=1,
            col=2,
        )
    fig.add_trace(
        go.Scatter(
            x=names,
            y=m["accuracy_chance"].to_numpy(float),
            mode="markers",
            name="chance (among the candidates)",
            marker={"symbol": "line-ew", "size": 40, "line": {"color": CHANCE_COLOUR, "width": 2.5}},
            hovertemplate="%{x}: chance among the candidates %{y:.1%} (1 / number of candidates)"
            "<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(title_text="logit difference", row=1, col=1, zeroline=True)
    fig.update_yaxes(title_text="accuracy", tickformat=".0%", range=[0, 1.05], row=1, col=2)
    fig.update_layout(
        title=figures.titled("Task performance", "bars: clean prompts with 95% intervals"),
        barmode="group",
        height=470,
        margin={"l": 60, "r": 20, "t": 110, "b": 100},
        legend=_legend_below(),
    )
    return fig


# ---------------------------------------------------------------------------------------- heat maps


def _score_hover(
    task: str, axis: str, grid: np.ndarray, classes: dict[tuple[int, int], list[str]]
) -> list[list[str]]:
    what = AXIS_NOTES[axis]
    rows = []
    for layer in range(grid.shape[0]):
        row = []
        for h in range(grid.shape[1]):
            v = grid[layer, h]
            head = f"{task_label(task)} · {head_label(layer, h)}"
            if not np.isfinite(v):
                text = (
                    f"{head}<br>not tested: the run patched only the strongest heads by attribution "
                    "patching (max_senders)"
                )
            else:
                effect = (
                    "carries the answer" if v < 0 else "works against the answer" if v > 0 else "no effect"
                )
                text = (
                    f"{head}<br>{AXIS_LABELS[axis]}: {v:+.3f} of the clean–corrupt gap ({effect})"
                    f"<br>{what}<br>−1: the patch removes the whole gap"
                )
            member = classes.get((layer, h))
            if member:
                text += "<br>circuit: " + ", ".join(CLASS_LABELS.get(c, c) for c in member)
            row.append(text)
        rows.append(row)
    return rows


def _ringed(source: Source, task: str, axis: str) -> dict[str, list[tuple[int, int]]]:
    """Class -> heads to ring on ``axis``'s map: the classes that stage found (activation: all)."""
    rows = circuit_rows(source, task)
    if axis not in WHOLE_MODEL_AXES:
        rows = rows[rows["stage"].astype(str) == axis]
    out: dict[str, list[tuple[int, int]]] = {}
    seen: set[tuple[int, int]] = set()
    for r in rows.to_dict("records"):
        head = (int(r["layer"]), int(r["head"]))
        if axis in WHOLE_MODEL_AXES and head in seen:  # ring a head once, in its first class's colour
            continue
        seen.add(head)
        out.setdefault(str(r["class"]), []).append(head)
    return out


def patching_heatmaps(source: Source, axis: str = "activation") -> go.Figure:
    """Layer × head maps of one score axis (activation patching or a path-patching stage), one per
    task side by side on one shared colour scale centred at 0; the heads of the classes that the
    stage found ringed in their class colour (activation: every circuit head)."""
    if axis not in AXES:
        raise KeyError(f"no score axis {axis!r}; choose one of {', '.join(AXES)}")
    names = tasks(source)
    n_layers, n_heads = shape(source)
    grids = [score_grid(source, t, axis) for t in names]
    finite = np.concatenate([g[np.isfinite(g)] for g in grids]) if grids else np.array([])
    zmax = float(np.abs(finite).max()) if finite.size else 1.0
    zmax = zmax if zmax > 0 else 1.0
    fig = make_subplots(
        rows=1,
        cols=len(names),
        subplot_titles=[task_label(t) for t in names],
        shared_yaxes=True,
        horizontal_spacing=0.06,
    )
    xs = [str(h) for h in range(n_heads)]
    ys = [str(layer) for layer in range(n_layers)]
    legend_done: set[str] = set()
    for col, (task, grid) in enumerate(zip(names, grids, strict=True), start=1):
        classes = head_classes(source, task)
        fig.add_trace(
            go.Heatmap(
                z=grid,
                x=xs,
                y=ys,
                name=f"{task_label(task)}: {AXIS_LABELS[axis]}",
                coloraxis="coloraxis",
                text=_score_hover(task, axis, grid, classes),
                hovertemplate="%{text}<extra></extra>",
                hoverongaps=True,
            ),
            row=1,
            col=col,
        )
        for cls, marks in _ringed(source, task, axis).items():
            ring = figures.head_rings(
                marks,
                CLASS_LABELS.get(cls, cls),
                CLASS_LABELS.get(cls, cls),
                color=CLASS_COLOURS.get(cls, "#000"),
            )
            ring.legendgroup = cls
            ring.showlegend = cls not in legend_done
            legend_done.add(cls)
            fig.add_trace(ring, row=1, col=col)
    fig.update_xaxes(type="category", title_text="head")
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_yaxes(title_text="layer", col=1)
    untested = int(sum(int((~np.isfinite(g)).sum()) for g in grids))
    subtitle = "share of the clean–corrupt gap; blue: carries the answer, red: works against it"
    if untested:
        subtitle += f"; grey: not tested ({untested} cells)"
    fig.update_layout(
        title=figures.titled(f"{AXIS_LABELS[axis]}", subtitle),
        coloraxis={
            "colorscale": HEAT_SCALE,
            "cmin": -zmax,
            "cmax": zmax,
            "cmid": 0.0,
            "colorbar": {"title": {"text": "share of gap"}},
        },
        height=figures.heatmap_height(n_layers) + 60,
        margin={"l": 60, "r": 20, "t": 115, "b": 100},
        plot_bgcolor="#e6e6e6",
        legend=_legend_below(),
    )
    return fig


# ---------------------------------------------------------------------------------------- graph


def _node_hover(source: Source, task: str, head: tuple[int, int], classes: Sequence[str]) -> str:
    rows = circuit_rows(source, task)
    mine = rows[(rows["layer"] == head[0]) & (rows["head"] == head[1])]
    parts = [f"{head_label(*head)}: " + " + ".join(CLASS_LABELS.get(c, c) for c in classes)]
    for r in mine.to_dict("records"):
        cls = str(r["class"])
        sig = CLASS_SIGNATURE.get(cls)
        line = f"{CLASS_LABELS.get(cls, cls)}: {AXIS_LABELS.get(str(r['stage']), r['stage'])} {num(r['score'], '+.3f')}"
        if sig:
            line += f", attention {signature_label(task, sig)} {num(r.get(f'sig_{sig}'), '.2f')}"
        parts.append(line)
    if len(mine):
        parts.append(f"activation patching {num(mine['activation'].iloc[0], '+.3f')} of the gap")
    return "<br>".join(parts)


def _node_label(fig: go.Figure, x: float, y: float, text: str, radius: float, colour: str = "#222") -> None:
    """``text`` just above the node at (x, y) of ``radius`` pixels, on a white ground."""
    fig.add_annotation(
        x=x,
        y=y,
        text=text,
        showarrow=False,
        yshift=radius + 8,
        font={"size": 10, "color": colour},
        bgcolor="rgba(255,255,255,0.9)",
        borderpad=1,
        name="node label",
    )


def circuit_graph(source: Source, task: str | None = None) -> go.Figure:
    """The circuit of ``task`` as a graph: every circuit head at (layer, head), coloured by class,
    and the path-patching edges of the ``edges`` table from each found head into the receivers of the
    next stage (the logits a sink node at the right), width by |share|, blue when the path carries
    the answer (negative share), red when it works against it."""
    task = _check_task(source, task)
    n_layers, n_heads = shape(source)
    classes = head_classes(source, task)
    edges = table(source, "edges")
    edges = edges[edges["task"].astype(str) == task]
    if not classes and edges.empty:
        return figures.message_figure(
            f"{task_label(task)}: no head passed both tests of any class (path score and attention "
            "signature), so there is no circuit to draw",
            height=360,
        )
    sink = (float(n_layers), (n_heads - 1) / 2.0)

    def where(layer: int, head: int) -> tuple[float, float]:
        return sink if layer < 0 else (float(layer), float(head))

    fig = go.Figure()
    shares = edges["share"].to_numpy(float)
    finite = np.abs(shares[np.isfinite(shares)])
    biggest = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    shown_sign: set[bool] = set()
    mids_x, mids_y, mids_text, mids_colour = [], [], [], []
    for r in edges.to_dict("records"):
        share = float(r["share"])
        if not math.isfinite(share):
            continue
        x0, y0 = where(int(r["sender_layer"]), int(r["sender_head"]))
        x1, y1 = where(int(r["receiver_layer"]), int(r["receiver_head"]))
        supports = share <= 0
        colour = SUPPORT_COLOUR if supports else OPPOSE_COLOUR
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                line={"color": colour, "width": 0.8 + 7.0 * abs(share) / biggest},
                opacity=0.65,
                name="edge: carries the answer" if supports else "edge: works against the answer",
                legendgroup="support" if supports else "oppose",
                showlegend=supports not in shown_sign,
                hoverinfo="skip",
            )
        )
        shown_sign.add(supports)
        sender = head_label(r["sender_layer"], r["sender_head"])
        receiver = (
            "the logits"
            if int(r["receiver_layer"]) < 0
            else head_label(r["receiver_layer"], r["receiver_head"])
        )
        into = {"logits": "logits at END", "q": "query at END", "kv": "keys and values", "k": "keys"}.get(
            str(r["input"]), str(r["input"])
        )
        mids_x.append((x0 + x1) / 2)
        mids_y.append((y0 + y1) / 2)
        mids_colour.append(colour)
        mids_text.append(
            f"{sender} → {receiver} ({into}, stage {AXIS_LABELS.get(str(r['stage']), r['stage'])})<br>"
            f"share {share:+.3f}: patching this path alone changes the logit difference by "
            f"{100 * share:+.1f}% of the clean–corrupt gap"
        )
    if mids_x:
        fig.add_trace(
            go.Scatter(
                x=mids_x,
                y=mids_y,
                mode="markers",
                name="edge shares",
                marker={"size": 7, "color": mids_colour, "symbol": "diamond"},
                text=mids_text,
                hovertemplate="%{text}<extra></extra>",
                showlegend=False,
            )
        )
    primary: dict[str, list[tuple[int, int]]] = {}
    members: dict[str, int] = {}
    for head, member in classes.items():
        primary.setdefault(member[0], []).append(head)
        for cls in member:
            members[cls] = members.get(cls, 0) + 1
    for cls in [c for c in CLASSES if c in members] + sorted(set(members) - set(CLASSES)):
        heads = sorted(primary.get(cls, []))  # a node is filled in its first class's colour
        fig.add_trace(
            go.Scatter(
                x=[float(lay) for lay, _ in heads] if heads else [None],
                y=[float(h) for _, h in heads] if heads else [None],
                mode="markers",
                name=f"{CLASS_LABELS.get(cls, cls)} ({members[cls]})",
                legendgroup=cls,
                marker={
                    "size": 18,
                    "color": CLASS_COLOURS.get(cls, "#444"),
                    "line": {"color": "#fff", "width": 1},
                },
                text=[head_label(*h) for h in heads],
                hovertext=[_node_hover(source, task, h, classes[h]) for h in heads],
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )
    rings: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for head, member in classes.items():
        for level, cls in enumerate(member[1:], start=1):
            rings.setdefault((cls, level), []).append(head)
    for (cls, level), heads in sorted(rings.items(), key=lambda item: item[0][1]):
        fig.add_trace(  # a head of several classes: one ring per further class around its node
            go.Scatter(
                x=[float(lay) for lay, _ in heads],
                y=[float(h) for _, h in heads],
                mode="markers",
                name=f"also {CLASS_LABELS.get(cls, cls)}",
                legendgroup=cls,
                showlegend=False,
                marker={
                    "size": 18 + 8 * level,
                    "symbol": "circle-open",
                    "color": CLASS_COLOURS.get(cls, "#444"),
                    "line": {"width": 2.5},
                },
                hoverinfo="skip",
            )
        )
    extra = stand_ins(source, task)
    ends = {(int(r["receiver_layer"]), int(r["receiver_head"])) for r in edges.to_dict("records")}
    extra = sorted(set(extra) | {h for h in ends if h[0] >= 0 and h not in classes})
    if extra:
        fig.add_trace(
            go.Scatter(
                x=[float(lay) for lay, _ in extra],
                y=[float(h) for _, h in extra],
                mode="markers",
                name=STAND_IN,
                marker={
                    "size": 14,
                    "color": STAND_IN_COLOUR,
                    "symbol": "circle-open",
                    "line": {"width": 2.5},
                },
                text=[head_label(*h) for h in extra],
                hovertemplate="%{text}: receiver of a stage whose class was not found (one of the "
                "previous stage's strongest heads stands in)<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[sink[0]],
            y=[sink[1]],
            mode="markers",
            name="logits at END",
            marker={"size": 24, "color": LOGITS_COLOUR, "symbol": "square"},
            text=["logits"],
            hovertemplate="the logits at END: edges into it are the name movers' and negative movers' "
            "direct path scores<extra></extra>",
        )
    )
    # Labels are annotations, drawn over every trace on a white ground: no edge crosses them.
    for lay, h in sorted(classes):
        rings_around = len(classes[(lay, h)]) - 1  # the outermost ring's radius: 9 + 4 per ring
        _node_label(fig, float(lay), float(h), head_label(lay, h), 9 + 4 * rings_around)
    for lay, h in extra:
        _node_label(fig, float(lay), float(h), head_label(lay, h), 7, STAND_IN_COLOUR)
    _node_label(fig, sink[0], sink[1], "logits", 12)
    n_heads_in = len(classes)
    fig.update_layout(
        title=figures.titled(
            f"{task_label(task)} circuit",
            f"{counted(n_heads_in)} by class; edges: path patching into the next stage's receivers "
            "(width: |share of the gap|), left to right",
        ),
        xaxis={
            "title": {"text": "layer"},
            "tickvals": [*range(n_layers), n_layers],
            "ticktext": [*(str(i) for i in range(n_layers)), "logits"],
            "range": [-0.7, n_layers + 0.7],
            "zeroline": False,
            "showgrid": True,
        },
        yaxis={
            "title": {"text": "head"},
            "tickvals": list(range(n_heads)),
            "autorange": "reversed",
            "zeroline": False,
        },
        height=int(min(940, max(420, 180 + 38 * n_heads))),
        margin={"l": 60, "r": 20, "t": 80, "b": 100},
        plot_bgcolor="#ffffff",
        legend=_legend_below(),
    )
    return fig


# ---------------------------------------------------------------------------------------- faithfulness


def faithfulness_table(source: Source) -> pd.DataFrame:
    faith = table(source, "faithfulness")
    faith["task"] = faith["task"].astype(str)
    faith["circuit"] = faith["circuit"].astype(str)
    return faith


def faithfulness_summary(source: Source, task: str) -> dict[str, Any]:
    """The found circuit's faithfulness, the empty circuit's, and the random circuits' mean, sd and
    how many reach the found one."""
    faith = faithfulness_table(source)
    mine = faith[faith["task"] == task]
    found = mine[mine["circuit"] == "found"]
    empty = mine[mine["circuit"] == "empty"]
    rand = mine[mine["circuit"] == "random"]["faithfulness"].to_numpy(float)
    f = float(found["faithfulness"].iloc[0]) if len(found) else math.nan
    finite = rand[np.isfinite(rand)]
    return {
        "size": int(found["size"].iloc[0]) if len(found) else 0,
        "found": f,
        "found_logit_diff": float(found["logit_diff"].iloc[0]) if len(found) else math.nan,
        "full_logit_diff": float(mine["full_logit_diff"].iloc[0]) if len(mine) else math.nan,
        "empty": float(empty["faithfulness"].iloc[0]) if len(empty) else math.nan,
        "random_mean": float(finite.mean()) if finite.size else math.nan,
        "random_sd": float(finite.std(ddof=0)) if finite.size else math.nan,
        "n_random": int(rand.size),
        "random_at_least": int((finite >= f).sum()) if math.isfinite(f) else 0,
    }


def faithfulness_figure(source: Source) -> go.Figure:
    """Per task: the found circuit's faithfulness (mean logit difference with every other head
    mean-ablated, over the full model's) against random circuits of the same size and the empty one."""
    faith = faithfulness_table(source)
    names = tasks(source)
    fig = go.Figure()
    rand = faith[faith["circuit"] == "random"]
    if len(rand):
        fig.add_trace(
            go.Box(
                x=[task_label(t) for t in rand["task"]],
                y=rand["faithfulness"].to_numpy(float),
                name="random circuits (same size)",
                boxpoints="all",
                jitter=0.5,
                pointpos=0,
                marker={"color": RANDOM_COLOUR, "size": 7},
                line={"color": RANDOM_COLOUR},
                fillcolor="rgba(159,180,199,0.2)",
                customdata=np.column_stack([rand["size"], rand["logit_diff"], rand["full_logit_diff"]]),
                hoveron="points",
                hovertemplate="%{x}, a random circuit of %{customdata[0]} heads: faithfulness %{y:.2f}"
                "<br>logit difference %{customdata[1]:.2f} with every other head mean-ablated, full "
                "model %{customdata[2]:.2f}<extra></extra>",
            )
        )
    for kind, label, symbol, colour, size in (
        ("empty", "empty circuit (every head ablated)", "x", EMPTY_COLOUR, 12),
        ("found", "found circuit", "diamond", FOUND_COLOUR, 16),
    ):
        part = faith[faith["circuit"] == kind]
        if part.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=[task_label(t) for t in part["task"]],
                y=part["faithfulness"].to_numpy(float),
                mode="markers",
                name=label,
                marker={
                    "symbol": symbol,
                    "size": size,
                    "color": colour,
                    "line": {"width": 1, "color": "#fff"},
                },
                customdata=np.column_stack([part["size"], part["logit_diff"], part["full_logit_diff"]]),
                hovertemplate=f"%{{x}}, {label}, %{{customdata[0]}} heads: faithfulness %{{y:.2f}}"
                "<br>= logit difference %{customdata[1]:.2f} with every head outside it mean-ablated / "
                "full model %{customdata[2]:.2f}<extra></extra>",
            )
        )
    fig.add_hline(
        y=1.0,
        line_dash="dot",
        line_color="#5b6475",
        annotation_text="full model",
        annotation_position="top left",
    )
    fig.add_hline(y=0.0, line_color="#d9dde5")
    sizes = ", ".join(f"{task_label(t)} {counted(faithfulness_summary(source, t)['size'])}" for t in names)
    fig.update_layout(
        title=figures.titled("Faithfulness of the circuit", f"{sizes}; mean ablation outside the circuit"),
        yaxis={"title": {"text": "faithfulness (share of full logit diff.)"}},
        height=440,
        margin={"l": 60, "r": 20, "t": 80, "b": 100},
        legend=_legend_below(),
    )
    return fig


# ---------------------------------------------------------------------------------------- reuse


def overlap_figure(source: Source) -> go.Figure:
    """The overlap curve: per path-patching stage and pooled over stages ("all"), the share of IOI's
    top-p% heads that are Colored Objects' top-p% heads of the same stage, against p; activation
    patching dashed, the chance level dotted and the paper's 2% point marked."""
    if not is_reuse(source):
        return figures.message_figure("the overlap needs a circuit-reuse run (both tasks)", height=360)
    overlap = overlap_table(source)
    fig = go.Figure()
    percents = sorted({float(p) for p in overlap["percent"]})
    order = [(s, "path_patching") for s in (*STAGES, "all")] + [("activation", "activation_patching")]
    for stage, kind in order:
        part = overlap[(overlap["source"] == kind) & (overlap["stage"] == stage)].sort_values("percent")
        if part.empty:
            continue
        label = "all stages (pooled)" if stage == "all" else AXIS_LABELS.get(stage, stage)
        fig.add_trace(
            go.Scatter(
                x=part["percent"].to_numpy(float),
                y=part["overlap"].to_numpy(float),
                mode="lines+markers",
                name=label,
                line={
                    "color": STAGE_COLOURS.get(stage, "#444"),
                    "width": 3.5 if stage == "all" else 1.8,
                    "dash": "dash" if stage == "activation" else "solid",
                },
                customdata=np.column_stack([part["shared"], part["k"], part["jaccard"]]),
                hovertemplate=f"{label}, top %{{x:g}}%: %{{customdata[0]}} of IOI's %{{customdata[1]}} top "
                "heads are Colored Objects' top heads too<br>overlap %{y:.0%}, Jaccard %{customdata[2]:.2f}"
                "<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=percents,
            y=[p / 100.0 for p in percents],
            mode="lines",
            name="chance (independent rankings)",
            line={"color": CHANCE_COLOUR, "dash": "dot", "width": 1.5},
            hovertemplate="top %{x:g}%: two independent rankings share about %{y:.0%} of their top heads"
            "<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[PAPER_PERCENT, PAPER_PERCENT],
            y=[0.0, 1.0],
            mode="lines",
            name="2% (Merullo et al.)",
            line={"color": "#5b6475", "dash": "dashdot", "width": 1},
            hovertemplate="top 2%: Merullo et al. find 78% (25 of 32) on GPT2-Medium<extra></extra>",
        )
    )
    at2 = overlap_at(source)
    if at2 is not None:
        fig.add_trace(
            go.Scatter(
                x=[PAPER_PERCENT],
                y=[float(at2["overlap"])],
                mode="markers+text",
                name="all stages at 2%",
                marker={"symbol": "star", "size": 18, "color": STAGE_COLOURS["all"]},
                text=[f"{int(at2['shared'])} of {int(at2['k'])} ({float(at2['overlap']):.0%})"],
                textposition="middle right",
                hovertemplate="top 2%% pooled over stages: %{text} of IOI's top stage heads are "
                "Colored Objects' too<extra></extra>",
                showlegend=False,
            )
        )
    fig.update_layout(
        title=figures.titled(
            "Circuit reuse: overlap of the top heads",
            "IOI's top-p% heads per stage that are Colored Objects' too",
        ),
        xaxis={
            "title": {"text": "top p% of heads by |score|"},
            "type": "log",
            "tickvals": percents,
            "ticktext": [f"{p:g}%" for p in percents],
        },
        yaxis={
            "title": {"text": "overlap (share of IOI's top heads)"},
            "tickformat": ".0%",
            "range": [0, 1.05],
        },
        height=420,
        margin={"l": 60, "r": 20, "t": 80, "b": 50},
    )
    return fig


def rank_correlation_table(source: Source) -> pd.DataFrame:
    corr = table(source, "rank_correlation")
    corr["stage"] = corr["stage"].astype(str)
    order = {s: i for i, s in enumerate(AXES)}
    corr["order"] = [order.get(s, len(order)) for s in corr["stage"]]
    return corr.sort_values("order", kind="stable").drop(columns="order").reset_index(drop=True)


def intervention_figure(source: Source, metric: IvMetric = "accuracy") -> go.Figure:
    """Colored Objects before the edit, with the IOI inhibition heads' END attention moved onto the
    wrong colours, and with as many random heads edited (their distribution): bars with 95% intervals
    and, for accuracy among the scene's colours, chance."""
    if not is_reuse(source):
        return figures.message_figure("the intervention needs a circuit-reuse run (both tasks)", height=360)
    if metric not in IV_METRICS:
        raise KeyError(f"no intervention metric {metric!r}; choose one of {', '.join(IV_METRICS)}")
    iv = intervention_table(source)
    label = IV_METRIC_LABELS[metric]
    pct = metric != "logit_diff"
    spec = ".1%" if pct else ".2f"
    before = iv[iv["condition"] == "before"]
    target = iv[iv["condition"] == "ioi_heads"]
    rand = iv[iv["condition"] == "random"]
    n_heads = int(target["n_heads"].iloc[0]) if len(target) else 0
    x_before, x_target = "no edit", f"IOI heads ({n_heads})"
    x_random = f"random heads ({n_heads} each)"
    why = str(notes(source).get("intervention_heads", "IOI s_inhibition and negative_mover heads"))
    fig = go.Figure()
    for part, x, name, colour, chosen in (
        (before, x_before, "before: no edit", RANDOM_COLOUR, ""),
        (target, x_target, "IOI inhibition heads edited", FOUND_COLOUR, f" ({why})"),
    ):
        if part.empty:
            continue
        values = part[metric].to_numpy(float)
        has_ci = f"{metric}_low" in part.columns
        interval = f" [%{{customdata[0]:{spec}}}, %{{customdata[1]:{spec}}}] (95% interval)" if has_ci else ""
        fig.add_trace(
            go.Bar(
                x=[x],
                y=values,
                name=name,
                marker_color=colour,
                error_y=figures.error_bars(values, part[f"{metric}_low"], part[f"{metric}_high"])
                if has_ci
                else None,
                customdata=np.column_stack(
                    [
                        part[f"{metric}_low"] if has_ci else values,
                        part[f"{metric}_high"] if has_ci else values,
                        part["heads"].astype(str).replace("", "none"),
                    ]
                ),
                hovertemplate=f"{name}: {label} %{{y:{spec}}}{interval}<br>edited heads: %{{customdata[2]}}"
                f"{html.escape(chosen)}<extra></extra>",
            )
        )
    if len(rand):
        fig.add_trace(
            go.Box(
                x=[x_random] * len(rand),
                y=rand[metric].to_numpy(float),
                name=f"random heads edited ({len(rand)} sets)",
                boxpoints="all",
                jitter=0.5,
                pointpos=0,
                marker={"color": EMPTY_COLOUR, "size": 7},
                line={"color": EMPTY_COLOUR},
                hoveron="points",
                customdata=np.column_stack([rand["heads"].astype(str)]),
                hovertemplate=f"a random set: {label} %{{y:{spec}}}<br>edited heads: %{{customdata[0]}}"
                "<extra></extra>",
            )
        )
    xs = [x_before, x_target, x_random]
    if metric == "accuracy":
        c = chance(source)
        if math.isfinite(c):
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=[c] * 3,
                    mode="lines",
                    name="chance (1 / colours in the scene)",
                    line={"color": CHANCE_COLOUR, "dash": "dash", "width": 2},
                    hovertemplate=f"chance {c:.1%}: one of the scene's colours at random<extra></extra>",
                )
            )
    fig.update_layout(
        title=figures.titled(
            "Intervention on Colored Objects",
            "the edited heads' END attention put on the scene's wrong colours",
        ),
        xaxis={"type": "category", "categoryorder": "array", "categoryarray": xs},
        yaxis={"title": {"text": label}, **({"tickformat": ".0%", "range": [0, 1.05]} if pct else {})},
        height=420,
        margin={"l": 60, "r": 20, "t": 80, "b": 100},
        legend=_legend_below(),
    )
    return fig


# ---------------------------------------------------------------------------------------- reading


def _pct(value: object) -> str:
    return num(value, ".0%")


def metric_lines(source: Source) -> list[str]:
    lines = []
    for r in metrics_table(source).to_dict("records"):
        task = str(r["task"])
        lines.append(
            f"{task_label(task)}: logit difference {num(r['logit_diff'])} [{num(r['logit_diff_low'])}, "
            f"{num(r['logit_diff_high'])}] over {int(r['n_items'])} prompts ({METRIC_NOTES.get(task, '')}), "
            f"{num(r['logit_diff_corrupt'])} on the corrupted ones; the right answer wins among the "
            f"candidates on {_pct(r['accuracy'])} [{_pct(r['accuracy_low'])}, {_pct(r['accuracy_high'])}] "
            f"(chance {_pct(r['accuracy_chance'])}) and is the top token over the vocabulary on "
            f"{_pct(r['vocab_accuracy'])}."
        )
    return lines


def circuit_lines(source: Source) -> list[str]:
    lines = []
    for task in tasks(source):
        rows = circuit_rows(source, task)
        n = len(head_classes(source, task))
        if rows.empty:
            lines.append(
                f"{task_label(task)}: no head passed both tests (path score and attention signature) of "
                "any class."
            )
            continue
        parts = []
        for cls in CLASSES:
            mine = rows[rows["class"] == cls]
            if len(mine):
                heads = ", ".join(f"{r.label} ({num(r.score, '+.2f')})" for r in mine.itertuples(index=False))
                parts.append(f"{CLASS_LABELS[cls]}: {heads}")
        missing = [CLASS_LABELS[c] for c in CLASSES if c not in set(rows["class"])]
        line = f"{task_label(task)} circuit, {counted(n)}; " + "; ".join(parts) + "."
        if missing:
            line += f" No {', no '.join(missing)} head passed both tests."
        stand = stand_ins(source, task)
        if stand:
            line += f" Stand-in receivers (a class was not found): {' '.join(head_label(*h) for h in stand)}."
        lines.append(line)
    return lines


def faithfulness_lines(source: Source) -> list[str]:
    lines = []
    for task in tasks(source):
        f = faithfulness_summary(source, task)
        line = (
            f"{task_label(task)}: with every head outside the {f['size']}-head circuit mean-ablated the "
            f"model keeps {num(f['found'])} of its logit difference ({num(f['found_logit_diff'])} of "
            f"{num(f['full_logit_diff'])}); {f['n_random']} random circuits of the same size keep "
            f"{num(f['random_mean'])} ± {num(f['random_sd'])}, {f['random_at_least']} of them at least as "
            f"much; the empty circuit keeps {num(f['empty'])}."
        )
        lines.append(line)
    if "ablation" in table_names(source):
        ab = table(source, "ablation")
        for task in tasks(source):
            mine = ab[ab["task"].astype(str) == task]
            movers = mine[mine["ablated"].astype(str) == "name_movers"]
            rand = mine[mine["ablated"].astype(str) == "random"]["drop"].to_numpy(float)
            if len(movers):
                r = movers.iloc[0]
                lines.append(
                    f"{task_label(task)}: mean-ablating the {counted(int(r['size']), 'name mover')} ({r['heads']}) lowers "
                    f"the logit difference by {num(r['drop'])}; as many random heads by "
                    f"{num(rand.mean() if rand.size else math.nan)} on average."
                )
    return lines


def reuse_lines(source: Source) -> list[str]:
    if not is_reuse(source):
        return []
    lines = []
    at2 = overlap_at(source)
    if at2 is not None:
        per_stage = []
        for stage in STAGES:
            row = overlap_at(source, stage=stage)
            if row is not None:
                per_stage.append(f"{AXIS_LABELS[stage]} {int(row['shared'])}/{int(row['k'])}")
        act = overlap_at(source, stage="activation")
        act_text = (
            f"; by activation patching {int(act['shared'])} of {int(act['k'])} ({_pct(act['overlap'])})"
            if act is not None
            else ""
        )
        lines.append(
            f"Overlap at the top 2%: {int(at2['shared'])} of IOI's {int(at2['k'])} top stage heads "
            f"({_pct(at2['overlap'])}) are Colored Objects' top heads of the same stage too (chance about "
            f"2%; Merullo et al. on GPT2-Medium: 78%, 25 of 32). Per stage: {', '.join(per_stage)}{act_text}."
        )
    else:
        lines.append("The run's overlap curve has no 2% point (reuse_percents did not include 2).")
    if "rank_correlation" in table_names(source):
        corr = rank_correlation_table(source)
        parts = [
            f"{AXIS_LABELS.get(r.stage, r.stage)} {num(r.spearman)}" for r in corr.itertuples(index=False)
        ]
        lines.append(f"Spearman correlation of the two tasks' per-head scores: {', '.join(parts)}.")
    return lines


def intervention_lines(source: Source) -> list[str]:
    if not is_reuse(source):
        return []
    iv = intervention_table(source)
    before = iv[iv["condition"] == "before"]
    target = iv[iv["condition"] == "ioi_heads"]
    rand = iv[iv["condition"] == "random"]
    if before.empty or target.empty:
        return ["The intervention table lacks the before or the IOI-heads condition."]
    b, t = before.iloc[0], target.iloc[0]
    ra = rand["accuracy"].to_numpy(float)
    rv = rand["vocab_accuracy"].to_numpy(float)
    why = notes(source).get("intervention_heads", "IOI s_inhibition and negative_mover heads")
    return [
        f"Colored Objects accuracy among the scene's colours: {_pct(b['accuracy'])} "
        f"[{_pct(b['accuracy_low'])}, {_pct(b['accuracy_high'])}] before; {_pct(t['accuracy'])} "
        f"[{_pct(t['accuracy_low'])}, {_pct(t['accuracy_high'])}] with the END attention of "
        f"{counted(int(t['n_heads']))} ({t['heads']}; {why}) put on the wrong colours; "
        f"{len(ra)} random sets of as many heads: {_pct(ra.mean() if ra.size else math.nan)} ± "
        f"{_pct(ra.std(ddof=0) if ra.size else math.nan)} (chance {_pct(chance(source))}). Top-1 over the "
        f"vocabulary: {_pct(b['vocab_accuracy'])} → {_pct(t['vocab_accuracy'])} (random "
        f"{_pct(rv.mean() if rv.size else math.nan)}). Merullo et al. on GPT2-Medium: 49.6% → 93.7%."
    ]


def findings(source: Source) -> dict[str, list[str]]:
    """Plain-text sentences reading the run's numbers, by topic."""
    out = {
        "metrics": metric_lines(source),
        "circuit": circuit_lines(source),
        "faithfulness": faithfulness_lines(source),
    }
    if is_reuse(source):
        out["reuse"] = reuse_lines(source)
        out["intervention"] = intervention_lines(source)
    return out
