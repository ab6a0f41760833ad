"""Staged discovery: path-patch every head into the receivers the stage before found, and sort the
heads into classes by path score and attention signature; the edges of the circuit graph."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analyses.circuits.config import (
    STAGE_CLASSES,
    STAGE_RECEIVERS,
    STAGES,
    CircuitConfig,
    HeadClass,
    Stage,
    TaskName,
)
from analyses.circuits.forward import GroupCache, Runner
from analyses.circuits.patching import Receivers, path_patching, path_patching_items
from analyses.validation import significant
from probe.loading import LoadedModel
from probe.types import Head


def admitted(scores: np.ndarray, items: np.ndarray | None, sign: float, cfg: CircuitConfig) -> np.ndarray:
    """``[L, H]``: heads whose path score admits them in the direction ``sign`` (-1: the score lowers
    the metric, as a name mover's does). ``cfg.admit="significance"`` tests the per-prompt scores
    ``items`` ``[n_prompts, L, H]`` against zero (one-sided t-test, Benjamini–Hochberg at
    ``cfg.alpha`` over the tested heads); ``"share"`` compares the mean with ``cfg.min_share``."""
    if cfg.admit == "share" or items is None:
        return np.nan_to_num(sign * scores, nan=-np.inf) >= cfg.min_share
    flat = items.reshape(items.shape[0], -1)
    passed, _ = significant(flat, "higher" if sign > 0 else "lower", cfg.alpha)
    return passed.reshape(scores.shape)


def classify(
    stage: Stage,
    scores: np.ndarray,
    signatures: Mapping[str, np.ndarray],
    cfg: CircuitConfig,
    items: np.ndarray | None = None,
) -> dict[HeadClass, list[Head]]:
    """The heads of ``stage``'s classes: an admitted path score (:func:`admitted`) and the attention
    signature."""
    out: dict[HeadClass, list[Head]] = {}
    att = cfg.min_attention
    sig = signatures
    for cls in STAGE_CLASSES[stage]:
        sign = 1.0 if cls == "negative_mover" else -1.0
        if cls in ("name_mover", "negative_mover"):
            ok = (sig["end_to_target"] >= att) & (sig["end_to_target"] > sig["end_to_dup"])
        elif cls == "s_inhibition":
            ok = (sig["end_to_dup"] >= att) & (sig["end_to_dup"] > sig["end_to_target"])
        elif cls == "induction":
            ok = (sig["dup2_to_dup1_next"] >= att) & (sig["dup2_to_dup1_next"] > sig["dup2_to_dup1"])
        elif cls == "duplicate_token":
            ok = (sig["dup2_to_dup1"] >= att) & (sig["dup2_to_dup1"] >= sig["dup2_to_dup1_next"])
        else:  # previous_token
            ok = sig["dup1_next_to_dup1"] >= att
        passed = admitted(scores, items, sign, cfg) & ok
        order = np.argsort(-(sign * scores), axis=None)
        heads = [(int(i // scores.shape[1]), int(i % scores.shape[1])) for i in order]
        out[cls] = [h for h in heads if passed[h]][: cfg.max_per_class]
    return out


@dataclass
class Discovery:
    """Result of the staged discovery on one task."""

    task: TaskName
    scores: dict[Stage, np.ndarray]  # [L, H] per stage
    items: dict[Stage, np.ndarray]  # [n_prompts, L, H] per stage: each prompt's score (NaN: not tested)
    classes: dict[HeadClass, list[Head]]
    receivers: dict[Stage, tuple[list[Head], str]]  # heads and why (class found / stand-in)
    signatures: dict[str, np.ndarray]
    edges: list[dict[str, Any]] = field(default_factory=list)


def stand_ins(scores: np.ndarray, k: int = 3) -> list[Head]:
    order = np.argsort(scores, axis=None)[:k]  # most negative: strongest positive contributors
    return [(int(i // scores.shape[1]), int(i % scores.shape[1])) for i in order]


def screened_senders(model: LoadedModel, screen: np.ndarray | None, max_senders: int | None) -> list[Head]:
    """Every head, or with ``max_senders`` only the strongest by ``|screen|`` (a ``[L, H]`` grid)."""
    heads: list[Head] = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]
    if max_senders is None or screen is None or max_senders >= len(heads):
        return heads
    order = np.argsort(-np.abs(screen), axis=None, kind="stable")[:max_senders]
    return sorted((int(i // model.n_heads), int(i % model.n_heads)) for i in order)


def discover(
    runner: Runner,
    caches: Sequence[GroupCache],
    task: TaskName,
    cfg: CircuitConfig,
    signatures: dict[str, np.ndarray],
    screen: np.ndarray | None = None,
) -> Discovery:
    """Run the four stages in order, each with the receivers the one before found.

    Senders are every head, or (``cfg.max_senders``) the strongest by ``screen`` (attribution
    patching in :func:`analyse_task`); a head that was not tested scores NaN.
    """
    model = runner.model
    senders = screened_senders(model, screen, cfg.max_senders)
    tested = np.zeros((model.n_layers, model.n_heads), dtype=bool)
    for head in senders:
        tested[head] = True
    scores: dict[Stage, np.ndarray] = {}
    per_item: dict[Stage, np.ndarray] = {}
    n_prompts = sum(len(c.group) for c in caches)
    classes: dict[HeadClass, list[Head]] = {}
    receivers: dict[Stage, tuple[list[Head], str]] = {}
    for stage in STAGES:
        kind, sources = STAGE_RECEIVERS[stage]
        if kind == "logits":
            heads: list[Head] = []
            why = "the logits at END"
        else:
            heads = [h for cls in sources for h in classes.get(cls, [])]
            why = f"{', '.join(sources)} heads"
            if not heads:
                previous = STAGES[STAGES.index(stage) - 1]
                heads = stand_ins(scores[previous])
                why = (
                    f"no {', '.join(sources)} head found: the 3 strongest heads of stage {previous} stand in"
                )
            if all(layer == 0 for layer, _ in heads):
                scores[stage] = np.where(tested, 0.0, np.nan)
                per_item[stage] = np.broadcast_to(scores[stage], (n_prompts, *tested.shape)).copy()
                receivers[stage] = (heads, why + " (all in layer 0: nothing can reach them)")
                classes.update(classify(stage, scores[stage], signatures, cfg, per_item[stage]))
                continue
        receivers[stage] = (heads, why)
        flat = path_patching_items(
            runner,
            caches,
            senders,
            Receivers(kind, tuple(heads)),
            batch_size=cfg.batch_size,
            progress=cfg.progress,
            desc=f"{task} {stage}",
        )
        grid = np.full((n_prompts, model.n_layers, model.n_heads), np.nan)
        for head, values in zip(senders, flat, strict=True):
            grid[:, head[0], head[1]] = values
        per_item[stage] = grid
        scores[stage] = grid.mean(0)
        classes.update(classify(stage, scores[stage], signatures, cfg, grid))
    discovery = Discovery(task, scores, per_item, classes, receivers, signatures)
    discovery.edges = circuit_edges(runner, caches, discovery, cfg)
    return discovery


def circuit_edges(
    runner: Runner, caches: Sequence[GroupCache], found: Discovery, cfg: CircuitConfig
) -> list[dict[str, Any]]:
    """Path-patching score of every found head into each receiving head of the next stage, one
    receiver at a time: the edges of the circuit graph."""
    edges: list[dict[str, Any]] = []
    for stage in STAGES[1:]:
        kind, _ = STAGE_RECEIVERS[stage]
        senders = [h for cls in STAGE_CLASSES[stage] for h in found.classes.get(cls, [])]
        if not senders:
            continue
        for receiver in found.receivers[stage][0]:
            live = [s for s in senders if s[0] < receiver[0]]
            if not live:
                continue
            shares = path_patching(
                runner, caches, live, Receivers(kind, (receiver,)), batch_size=cfg.batch_size
            )
            for s, share in zip(live, shares, strict=True):
                edges.append(
                    {
                        "task": found.task,
                        "stage": stage,
                        "sender_layer": s[0],
                        "sender_head": s[1],
                        "receiver_layer": receiver[0],
                        "receiver_head": receiver[1],
                        "input": kind,
                        "share": float(share),
                    }
                )
    for cls in STAGE_CLASSES["logits"]:
        for layer, h in found.classes.get(cls, []):
            edges.append(
                {
                    "task": found.task,
                    "stage": "logits",
                    "sender_layer": layer,
                    "sender_head": h,
                    "receiver_layer": -1,
                    "receiver_head": -1,
                    "input": "logits",
                    "share": float(found.scores["logits"][layer, h]),
                }
            )
    return edges
