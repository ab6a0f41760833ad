"""The ACT run, step by step: baseline and sink statistics on the calibration items, the head search,
the held-out evaluation before and after, and the tables."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from analyses import validation
from analyses.act.calibration import Calibration
from analyses.act.config import ALL_HEADS, POOLED, ActConfig, resolve_layers
from analyses.act.heldout import (
    MEASURES,
    VALIDATION_EXTRA,
    ScopeItems,
    head_roles,
    keep_heads,
    validate_scope,
)
from analyses.act.scoring import ChoiceScorer, margins, paired_difference, search_heads
from analyses.act.statistics import SinkStats, sink_tokens
from analyses.act.tasks import Task, load_tasks
from analyses.base import AnalysisResult, heads_frame
from analyses.sinks import token_decoder
from analyses.tasks import choice
from analyses.tasks.choice import ChoiceItem
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.types import Head

HEADS_COLUMNS = (
    "layer",
    "head",
    "kv_head",
    "in_range",
    "n_tasks_kept",
    "mean_delta",
    "hidden_sinks",
    "first_sink_pos",
    *(f"act_{name}" for name in validation.EVIDENCE),
)
FILTER_COLUMNS = (
    "scope",
    "layer",
    "head",
    "acc_base",
    "acc_calibrated",
    "delta",
    "margin_delta",
    "p_value",
    "kept",
)
VALIDATION_COLUMNS = (*VALIDATION_EXTRA, *validation.COLUMNS)
TASKS_COLUMNS = (
    "task",
    "kind",
    "chance",
    "n_calibration",
    "n_heldout",
    "scope",
    "n_kept",
    "acc_before",
    "before_low",
    "before_high",
    "acc_after",
    "after_low",
    "after_high",
    "delta",
    "delta_low",
    "delta_high",
)
ITEMS_COLUMNS = (
    "task",
    "item",
    "label",
    "pred_before",
    "pred_after",
    "correct_before",
    "correct_after",
    "margin_before",
    "margin_after",
)


KEEP_NOTES = {
    "not_lower": "a head is kept when its calibration accuracy alone >= the uncalibrated accuracy",
    "raise": "a head is kept when its calibration accuracy alone > the uncalibrated accuracy",
    "significant": "a head is kept when calibrating it alone raises the label's margin on the calibration "
    "items significantly: one-sided t-test per head, Benjamini-Hochberg over the heads at {significance}",
}


@dataclass
class _Setup:
    """What the steps of a run share: the settings, the heads in range, the tasks and their items."""

    model: LoadedModel
    cfg: ActConfig
    cal: Calibration
    layers: range
    in_range: list[Head]
    tasks: list[Task]
    task_notes: dict[str, str]
    cal_items: list[ChoiceItem]
    held_items: list[ChoiceItem]
    cal_task: np.ndarray  # per calibration item: index of its task
    held_task: np.ndarray  # per held-out item: index of its task
    cal_labels: np.ndarray
    held_labels: np.ndarray
    cal_scorer: ChoiceScorer
    held_scorer: ChoiceScorer


@dataclass
class _Search:
    """The head search: kept heads per scope, one filter row per (scope, head), calibration deltas."""

    scopes: list[tuple[str, np.ndarray]]  # (scope name, calibration item mask)
    kept: dict[str, list[Head]]
    filter_rows: list[dict[str, Any]]
    delta: np.ndarray  # [n_scopes, L, H]


def _setup(model: LoadedModel, cfg: ActConfig, timings: dict[str, float]) -> _Setup:
    """The layers in range, the tasks' items and the scorers of the calibration and held-out items."""
    layers = resolve_layers(cfg, model.n_layers)
    tasks, task_notes = load_tasks(cfg)
    cal_items = [item for t in tasks for item in t.calibration]
    held_items = [item for t in tasks for item in t.heldout]
    t0 = time.perf_counter()
    cal_scorer = ChoiceScorer(model, cal_items, batch_size=cfg.batch_size, choice_token=cfg.choice_token)
    held_scorer = ChoiceScorer(model, held_items, batch_size=cfg.batch_size, choice_token=cfg.choice_token)
    timings["tokenize"] = round(time.perf_counter() - t0, 3)
    return _Setup(
        model=model,
        cfg=cfg,
        cal=cfg.calibration(),
        layers=layers,
        in_range=[(layer, h) for layer in layers for h in range(model.n_heads)],
        tasks=tasks,
        task_notes=task_notes,
        cal_items=cal_items,
        held_items=held_items,
        cal_task=np.array([i for i, t in enumerate(tasks) for _ in t.calibration]),
        held_task=np.array([i for i, t in enumerate(tasks) for _ in t.heldout]),
        cal_labels=np.array([item.label for item in cal_items]),
        held_labels=np.array([item.label for item in held_items]),
        cal_scorer=cal_scorer,
        held_scorer=held_scorer,
    )


def _baseline(s: _Setup, timings: dict[str, float]) -> tuple[SinkStats, np.ndarray]:
    """Uncalibrated calibration pass: the sink statistics and the calibration log-probabilities."""
    t0 = time.perf_counter()
    stats = SinkStats(s.cal_scorer, s.cal, s.layers)
    base_logp = s.cal_scorer.logprobs(((),), s.cal, observe=stats.observe)[0]
    timings["baseline"] = round(time.perf_counter() - t0, 3)
    return stats, base_logp


def _scopes(s: _Setup) -> list[tuple[str, np.ndarray]]:
    """The head searches to run: (scope name, mask of the calibration items it is scored on)."""
    if s.cfg.filter == "task":
        return [(t.name, s.cal_task == i) for i, t in enumerate(s.tasks)]
    if s.cfg.filter == "kind":  # one head set per task type, as the official code's released lists
        kinds = sorted({t.kind for t in s.tasks})
        task_kind = np.array([t.kind for t in s.tasks])
        return [(k, task_kind[s.cal_task] == k) for k in kinds]
    if s.cfg.filter == "pooled":
        return [(POOLED, np.ones(len(s.cal_items), dtype=bool))]
    return []


def _search(s: _Setup, base_logp: np.ndarray, timings: dict[str, float], progress: bool) -> _Search:
    """Calibrate each head in range alone; per scope, keep the heads that pass ``cfg.keep``."""
    model, cfg = s.model, s.cfg
    scopes = _scopes(s)
    kept: dict[str, list[Head]] = {}
    filter_rows: list[dict[str, Any]] = []
    delta = np.full((len(scopes), model.n_layers, model.n_heads), np.nan)
    t0 = time.perf_counter()
    if scopes:
        search_logp = search_heads(
            s.cal_scorer, s.in_range, s.cal, heads_per_pass=cfg.heads_per_pass, progress=progress
        )
        search_correct = (
            choice.predictions(search_logp.reshape(-1, s.cal_scorer.width)).reshape(
                len(s.in_range), len(s.cal_items)
            )
            == s.cal_labels[None, :]
        )
        base_correct = choice.predictions(base_logp) == s.cal_labels
        base_margin, search_margin = margins(base_logp, s.cal_labels), margins(search_logp, s.cal_labels)
        for i, (scope, mask) in enumerate(scopes):
            acc_base = float(base_correct[mask].mean())
            verdict = keep_heads(
                cfg.keep,
                base_correct[mask],
                search_correct[:, mask],
                base_margin[mask],
                search_margin[:, mask],
                cfg.significance,
            )
            kept[scope] = [head for j, head in enumerate(s.in_range) if verdict.kept[j]]
            for j, (layer, h) in enumerate(s.in_range):
                delta[i, layer, h] = verdict.acc_delta[j]
                filter_rows.append(
                    {
                        "scope": scope,
                        "layer": layer,
                        "head": h,
                        "acc_base": acc_base,
                        "acc_calibrated": float(search_correct[j, mask].mean()),
                        "delta": verdict.acc_delta[j],
                        "margin_delta": verdict.margin_delta[j],
                        "p_value": verdict.p_value[j],
                        "kept": bool(verdict.kept[j]),
                    }
                )
    else:
        kept[ALL_HEADS] = list(s.in_range)
    timings["search"] = round(time.perf_counter() - t0, 3)
    return _Search(scopes, kept, filter_rows, delta)


def _scope_of_tasks(s: _Setup) -> list[str]:
    """Per task, the scope whose kept heads it is evaluated with."""
    default_scope = POOLED if s.cfg.filter == "pooled" else ALL_HEADS
    return [
        t.name if s.cfg.filter == "task" else t.kind if s.cfg.filter == "kind" else default_scope
        for t in s.tasks
    ]


def _evaluate(
    s: _Setup, kept: dict[str, list[Head]], timings: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out log-probabilities before, then with each head set on the items it applies to."""
    t0 = time.perf_counter()
    before = s.held_scorer.logprobs(((),), s.cal)[0]
    after = np.full_like(before, np.nan)
    scope_of_task = _scope_of_tasks(s)
    for scope, heads in kept.items():
        on = np.array([scope_of_task[i] == scope for i in s.held_task])
        if not on.any():
            continue
        if not heads:
            after[on] = before[on]
            continue
        subset = [s.held_items[i] for i in np.nonzero(on)[0]]
        scorer = ChoiceScorer(s.model, subset, batch_size=s.cfg.batch_size, choice_token=s.cfg.choice_token)
        after[on, : scorer.width] = scorer.logprobs((tuple(heads),), s.cal)[0]
    timings["evaluate"] = round(time.perf_counter() - t0, 3)
    return before, after


def _validate(
    s: _Setup,
    kept: dict[str, list[Head]],
    before: np.ndarray,
    after: np.ndarray,
    timings: dict[str, float],
    progress: bool,
) -> pd.DataFrame:
    """The ``validation`` table: each scope's kept set on its held-out items against the null."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    cfg = s.cfg
    scope_of_task = _scope_of_tasks(s)
    rows: list[dict[str, Any]] = []
    for scope, heads in tqdm(kept.items(), desc="ACT validation", disable=not progress, leave=False):
        on = np.array([scope_of_task[i] == scope for i in s.held_task])
        if not on.any():
            continue
        items = [s.held_items[i] for i in np.nonzero(on)[0]]
        width = max(len(item.choices) for item in items)
        scope_items = ScopeItems(
            scope=scope,
            tasks=[t.name for i, t in enumerate(s.tasks) if scope_of_task[i] == scope],
            items=items,
            labels=s.held_labels[on],
            before=before[on, :width],
            after=after[on, :width],
        )
        rows += validate_scope(
            s.model,
            scope_items,
            heads,
            s.in_range,
            s.cal,
            n_null=cfg.n_null,
            significance=cfg.significance,
            seed=cfg.seed,
            n_boot=cfg.n_boot,
            sets_per_pass=cfg.heads_per_pass,
            batch_size=cfg.batch_size,
            choice_token=cfg.choice_token,
        )
    timings["validate"] = round(time.perf_counter() - t0, 3)
    return validation.frame(rows, extra=VALIDATION_EXTRA)


def _task_rows(
    s: _Setup, kept: dict[str, list[Head]], correct_before: np.ndarray, correct_after: np.ndarray
) -> list[dict[str, Any]]:
    """One row per task: held-out accuracy before and after with intervals, and the paired change."""
    cfg = s.cfg
    scope_of_task = _scope_of_tasks(s)
    rows = []
    for i, t in enumerate(s.tasks):
        on = s.held_task == i
        acc_b = choice.accuracy(correct_before[on], n_boot=cfg.n_boot, seed=cfg.seed)
        acc_a = choice.accuracy(correct_after[on], n_boot=cfg.n_boot, seed=cfg.seed)
        d, d_low, d_high = paired_difference(
            correct_before[on], correct_after[on], n_boot=cfg.n_boot, seed=cfg.seed
        )
        rows.append(
            {
                "task": t.name,
                "kind": t.kind,
                "chance": float(np.mean([1.0 / len(item.choices) for item in t.heldout])),
                "n_calibration": len(t.calibration),
                "n_heldout": len(t.heldout),
                "scope": scope_of_task[i],
                "n_kept": len(kept[scope_of_task[i]]),
                "acc_before": acc_b.value,
                "before_low": acc_b.low,
                "before_high": acc_b.high,
                "acc_after": acc_a.value,
                "after_low": acc_a.low,
                "after_high": acc_a.high,
                "delta": d,
                "delta_low": d_low,
                "delta_high": d_high,
            }
        )
    return rows


def _held_out_tables(
    s: _Setup, kept: dict[str, list[Head]], before: np.ndarray, after: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``tasks`` table and the ``items`` table (one row per held-out item)."""
    held_items, held_labels = s.held_items, s.held_labels
    pred_before, pred_after = choice.predictions(before), choice.predictions(after)
    correct_before, correct_after = pred_before == held_labels, pred_after == held_labels
    task_rows = _task_rows(s, kept, correct_before, correct_after)
    item_index = np.concatenate([np.arange(len(t.heldout)) for t in s.tasks])
    items = pd.DataFrame(
        {
            "task": pd.Series([held_items[i].task for i in range(len(held_items))], dtype=object),
            "item": item_index.astype(np.int64),
            "label": held_labels.astype(np.int64),
            "pred_before": pred_before.astype(np.int64),
            "pred_after": pred_after.astype(np.int64),
            "correct_before": correct_before.astype(bool),
            "correct_after": correct_after.astype(bool),
            "margin_before": margins(before, held_labels),
            "margin_after": margins(after, held_labels),
        }
    )
    return pd.DataFrame(task_rows, columns=list(TASKS_COLUMNS)), items[list(ITEMS_COLUMNS)]


def _heads_table(s: _Setup, search: _Search, stats: SinkStats, checks: pd.DataFrame) -> pd.DataFrame:
    """One row per head: in range, head sets that kept it, mean calibration delta, hidden sinks."""
    model = s.model
    in_range_mask = np.zeros((model.n_layers, model.n_heads), dtype=bool)
    in_range_mask[list(s.layers)] = True
    n_kept = np.zeros((model.n_layers, model.n_heads), dtype=np.int64)
    for heads in search.kept.values():
        for layer, h in heads:
            n_kept[layer, h] += 1
    # in-range heads have a delta in every scope, the others none: a plain mean keeps NaN out of range
    mean_delta = search.delta.mean(axis=0) if len(search.scopes) else np.full(in_range_mask.shape, np.nan)
    first_sink = np.full((model.n_layers, model.n_heads), -1, dtype=np.int64)
    for layer in range(model.n_layers):
        for h in range(model.n_heads):
            found = stats.first_pos[:, layer, h]
            found = found[found >= 0]
            if found.size:
                first_sink[layer, h] = int(np.bincount(found).argmax())
    heads = heads_frame(model, {"mean_delta": mean_delta, "hidden_sinks": stats.hidden_count.mean(axis=0)})
    heads.insert(3, "in_range", in_range_mask.ravel())
    heads.insert(4, "n_tasks_kept", n_kept.ravel())
    heads["first_sink_pos"] = first_sink.ravel()
    heads = validation.evidence_columns(heads, head_roles(checks), "act")
    return heads[list(HEADS_COLUMNS)]


def _filter_table(search: _Search) -> pd.DataFrame:
    return pd.DataFrame(search.filter_rows, columns=list(FILTER_COLUMNS)).astype(
        {
            "scope": object,
            "layer": np.int64,
            "head": np.int64,
            "acc_base": np.float64,
            "acc_calibrated": np.float64,
            "delta": np.float64,
            "margin_delta": np.float64,
            "p_value": np.float64,
            "kept": bool,
        }
    )


def _notes(s: _Setup, search: _Search) -> dict[str, Any]:
    cfg, cal_scorer = s.cfg, s.cal_scorer
    n_forward = cal_scorer.n_sequences * (1 + (len(s.in_range) if search.scopes else 0))
    return {
        "alpha": "alpha_k = sum_{t>=k} A[t,k] / (T-k), real tokens only (left padding)",
        "sinks": (
            f"alpha_k > {cfg.alpha_threshold}" if cfg.threshold == "alpha" else f"alpha_k > {cfg.ratio_a}/T"
        )
        + "; the first (lowest-position) detected sink is never calibrated",
        "calibration": f"A[i,s] -> {cfg.beta}*A[i,s] on hidden sinks; the removed mass goes to the other "
        "keys in proportion to their attention (rows keep their sum); "
        + (
            "first_sink=share: the first sink is one of them (the official code's variant)"
            if cfg.first_sink == "share"
            else "first_sink=frozen: the first sink's column is left untouched"
        ),
        "layers": [s.layers.start, s.layers.stop],
        "n_heads_in_range": len(s.in_range),
        "keep_rule": KEEP_NOTES[cfg.keep].format(significance=cfg.significance),
        "validation": f"each scope's kept heads, calibrated together on its held-out items, against "
        f"{cfg.n_null} random sets of as many in-range heads from outside them (every distinct set when "
        f"there are fewer); effects: {'; '.join(MEASURES.values())}; validated when the effect is above "
        f"zero (95% bootstrap interval) and p <= {cfg.significance}; the heads table carries the margin "
        "row's numbers",
        "scopes": {scope: len(h) for scope, h in search.kept.items()},
        "calibration_sequences": cal_scorer.n_sequences,
        "search_forward_sequences": n_forward,
        "logits_to_keep": cal_scorer.keep_logits,
        "bos": s.model.bos.describe(),
        "user_tasks": s.task_notes,
        "first_sink_pos": "most common real position (0 = first real token) of the first detected sink; "
        "-1 if none",
    }


def run_act(model: LoadedModel, config: ActConfig | None = None, *, progress: bool = True) -> AnalysisResult:
    """Detect hidden sinks, search heads on calibration items, report held-out accuracy before/after."""
    cfg = config or ActConfig()
    cfg.validate()
    if model.bridge is None:
        raise ConfigError(f"{model.name} is not a language model; ACT needs one")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    s = _setup(model, cfg, timings)
    stats, base_logp = _baseline(s, timings)
    search = _search(s, base_logp, timings, progress)
    before, after = _evaluate(s, search.kept, timings)
    tasks, items = _held_out_tables(s, search.kept, before, after)
    checks = _validate(s, search.kept, before, after, timings, progress)
    tables = {
        "heads": _heads_table(s, search, stats, checks),
        "filter": _filter_table(search),
        "tasks": tasks,
        "items": items,
        "validation": checks,
        "sink_tokens": sink_tokens(stats, len(s.in_range), token_decoder(model.tokenizer)),
    }
    timings["total"] = round(time.perf_counter() - t_start, 3)
    return AnalysisResult(
        analysis="act",
        model_info=model.describe(),
        config=replace(cfg),
        tables=tables,
        seeds={"seed": cfg.seed, "bootstrap": cfg.seed, "null": cfg.seed},
        timings=timings,
        notes=_notes(s, search),
    )
