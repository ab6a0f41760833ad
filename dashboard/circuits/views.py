"""Circuit views: what the circuits page, its report sections and the notebook read from an ``ioi``,
``colored-objects`` or ``circuit-reuse`` run: the tables in display order, labels, the settings line
and sentences reading the run's numbers. Every function takes a saved run or the result an analysis
returns. Scores are shares of the clean–corrupt gap, so a head that carries the answer scores
negative. See docs/analyses/circuits.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from analyses.circuits import CLASSES, SIGNATURES, STAGES, TASK_LABELS, CircuitConfig
from dashboard.core import common

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
    "backup_mover": "backup name mover",
    "s_inhibition": "S-inhibition",
    "induction": "induction",
    "duplicate_token": "duplicate token",
    "previous_token": "previous token",
}
CLASS_SIGNATURE = {
    "name_mover": "end_to_target",
    "negative_mover": "end_to_target",
    "backup_mover": "end_to_target",
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

# ---------------------------------------------------------------------------------------- access


def is_circuits(source: Source) -> bool:
    """Whether the source has the tables this module draws."""
    return REQUIRED_TABLES.issubset(source.table_names)


def is_reuse(source: Source) -> bool:
    """Whether the source also has the reuse tables (a ``circuit-reuse`` run)."""
    return REUSE_TABLES.issubset(source.table_names)


def _tasks_in(values: Sequence[object]) -> list[str]:
    present = [str(v) for v in values]
    return [t for t in TASKS if t in present] + sorted(set(present) - set(TASKS))


def tasks(source: Source) -> list[str]:
    """The run's tasks, IOI first."""
    return _tasks_in(list(source.table("metrics")["task"]))


def task_label(task: str) -> str:
    return TASK_LABELS.get(task, task)


def check_task(source: Source, task: str | None) -> str:
    names = tasks(source)
    if task is None:
        return names[0]
    if task not in names:
        raise KeyError(f"this run has no task {task!r}; it has {', '.join(names)}")
    return task


def shape(source: Source) -> tuple[int, int]:
    """(layers, heads) of the model, from the heads table."""
    heads = source.table("heads")
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
    cfg: CircuitConfig = source.config
    if cfg.max_senders is None:
        senders = "every head path-patched"
    else:
        senders = (
            f"only the {cfg.max_senders} strongest heads by attribution patching activation- and path-patched"
        )
    parts = [
        f"{cfg.n_items} prompts per task",
        f"a class needs a path score of at least {cfg.min_share:g} of the gap",
        f"and a signature attention of at least {cfg.min_attention:g}",
        f"at most {cfg.max_per_class} heads per class",
        senders,
        f"{cfg.n_random} random controls",
        f"seed {cfg.seed}",
    ]
    return ", ".join(parts)


def axes(source: Source) -> list[str]:
    """The score axes the run has (attribution patching only in runs that computed it)."""
    heads = source.table("heads")
    has_attribution = any(str(c).endswith("_attribution") for c in heads.columns)
    return [a for a in AXES if a != "attribution" or has_attribution]


def screened(source: Source) -> bool:
    """Whether some heads were not path-patched (NaN scores)."""
    scores = source.table("scores")
    return bool(scores["score"].isna().any())


# ---------------------------------------------------------------------------------------- tables


def metrics_table(source: Source) -> pd.DataFrame:
    metrics = source.table("metrics")
    metrics["task"] = metrics["task"].astype(str)
    return metrics.set_index("task").loc[tasks(source)].reset_index()


def score_grid(source: Source, task: str, axis: str) -> np.ndarray:
    """``[L, H]`` scores of ``task`` on ``axis`` (activation or a stage); NaN where not tested."""
    if axis not in AXES:
        raise KeyError(f"no score axis {axis!r}; choose one of {', '.join(AXES)}")
    n_layers, n_heads = shape(source)
    grid = np.full((n_layers, n_heads), np.nan)
    if axis == "attribution":  # a column of the heads table only
        heads = source.table("heads")
        column = f"{'ioi' if task == 'ioi' else 'co'}_attribution"
        if column not in heads.columns:
            raise KeyError(f"this run has no attribution patching scores (no {column} column)")
        grid[heads["layer"].to_numpy(dtype=int), heads["head"].to_numpy(dtype=int)] = heads[column].to_numpy(
            float
        )
        return grid
    scores = source.table("scores")
    part = scores[(scores["task"].astype(str) == task) & (scores["stage"].astype(str) == axis)]
    grid[part["layer"].to_numpy(dtype=int), part["head"].to_numpy(dtype=int)] = part["score"].to_numpy(float)
    return grid


def circuit_rows(source: Source, task: str) -> pd.DataFrame:
    """The ``circuit`` rows of ``task`` in class order (then rank), with a ``label`` column."""
    circuit = source.table("circuit")
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
    receivers = source.table("receivers")
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
    receivers = source.table("receivers")
    part = receivers[receivers["task"].astype(str) == task]
    members = head_classes(source, task)
    found = sorted({(int(r.layer), int(r.head)) for r in part.itertuples(index=False)})
    return [h for h in found if h not in members]


def overlap_table(source: Source) -> pd.DataFrame:
    overlap = source.table("overlap")
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
    iv = source.table("intervention")
    iv["condition"] = iv["condition"].astype(str)
    return iv


def chance(source: Source, task: str = "colored_objects") -> float:
    metrics = metrics_table(source).set_index("task")
    return float(metrics.loc[task, "accuracy_chance"]) if task in metrics.index else math.nan


# ---------------------------------------------------------------------------------------- faithfulness


def faithfulness_table(source: Source) -> pd.DataFrame:
    faith = source.table("faithfulness")
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


def rank_correlation_table(source: Source) -> pd.DataFrame:
    corr = source.table("rank_correlation")
    corr["stage"] = corr["stage"].astype(str)
    order = {s: i for i, s in enumerate(AXES)}
    corr["order"] = [order.get(s, len(order)) for s in corr["stage"]]
    return corr.sort_values("order", kind="stable").drop(columns="order").reset_index(drop=True)


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
    if "ablation" in source.table_names:
        ab = source.table("ablation")
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
    if "rank_correlation" in source.table_names:
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
    why = source.notes.get("intervention_heads", "IOI s_inhibition and negative_mover heads")
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
