"""Running the DuoAttention analysis: train (or load) the gates, score the heads, decode the grid."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.base import AnalysisResult, heads_frame
from analyses.duo.config import DuoConfig
from analyses.duo.evaluate import (
    Scored,
    accuracy_table,
    decode_grid,
    grid,
    kv_head_scores,
    retrieval_config,
    score_heads,
    selections,
)
from analyses.duo.gates import (
    AUTO,
    SHIPPED,
    agreement_table,
    has_shipped,
    kv_ratio,
    load_gates,
    loss_from_record,
    n_retrieval,
    ranking,
    resolve_gates_file,
    top_mask,
)
from analyses.duo.train import Trained, train_gates
from analyses.retrieval.decoding import check_room
from analyses.tasks import needles
from probe.duo_cache import duo_generate, kv_tokens
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.streaming import check_causal_model

AGREEMENT_COLUMNS = ["share", "k", "overlap", "overlap_share", "chance", "jaccard", "spearman"]


def _check(model: LoadedModel, cfg: DuoConfig) -> None:
    if model.kind != "language" or model.native_model is None:
        raise ConfigError(
            f"{model.name} is not a language model with a native transformers module; DuoAttention needs a "
            "causal language model loaded with probe.load_model"
        )
    # what duo_attention refuses (ALiBi computed inside the layer), refused before the training's
    # full-model targets run that model's own attention, which duo_attention cannot stand in for
    check_causal_model(model, "duo_attention")
    if cfg.gates_from is None and cfg.train_max_length > model.n_ctx:
        raise ConfigError(
            f"train_max_length={cfg.train_max_length} is beyond {model.name}'s context of {model.n_ctx} tokens; "
            f"use --set train_max_length={model.n_ctx}"
        )
    lengths = [*cfg.lengths, *(cfg.score_lengths if cfg.retrieval_score else ())]
    check_room(model, retrieval_config(cfg), max(int(n) for n in lengths))


def _rank(values: np.ndarray) -> np.ndarray:
    """1 for the highest of ``values`` (ties and NaN as :func:`analyses.duo.gates.ranking`)."""
    rank = np.empty(values.size, dtype=np.int64)
    rank[ranking(values)] = np.arange(1, values.size + 1)
    return rank.reshape(values.shape)


def gates_table(model: LoadedModel, gates: np.ndarray, kv_scores: np.ndarray | None) -> pd.DataFrame:
    """One row per KV head: its gate and rank (1 = kept first), its layer's type, its retrieval score."""
    layers, kv = np.meshgrid(np.arange(model.n_layers), np.arange(model.n_kv_heads), indexing="ij")
    types = model.layer_types or ["full_attention"] * model.n_layers
    scores = kv_scores if kv_scores is not None else np.full(gates.shape, np.nan)
    return pd.DataFrame(
        {
            "layer": layers.ravel(),
            "kv_head": kv.ravel(),
            "layer_type": [types[i] for i in layers.ravel()],
            "gate": gates.ravel(),
            "rank": _rank(gates).ravel(),
            "retrieval_score": scores.ravel(),
            "retrieval_rank": _rank(scores).ravel()
            if kv_scores is not None
            else np.zeros(gates.size, dtype=np.int64),
        }
    )


def _heads(
    model: LoadedModel, gates: np.ndarray, scored: Scored | None, kv_scores: np.ndarray | None
) -> pd.DataFrame:
    def per_head(kv_values: np.ndarray) -> np.ndarray:
        return np.repeat(kv_values, model.group_size, axis=1)

    nan = np.full((model.n_layers, model.n_heads), np.nan)
    return heads_frame(
        model,
        {
            "duo_gate": per_head(gates),
            "duo_rank": per_head(_rank(gates).astype(np.float64)),
            "retrieval_score": scored.head_scores if scored is not None else nan,
            "kv_retrieval_score": per_head(kv_scores) if kv_scores is not None else nan,
        },
    )


def _measure(model: LoadedModel, cfg: DuoConfig, mask: np.ndarray, test: needles.NeedleTest) -> float:
    """The KV cache kept / the full cache after prefilling ``test`` with :func:`probe.duo_cache.duo_generate`,
    its streaming heads keeping only sinks + recent keys."""
    out = duo_generate(
        model,
        test.prompt_ids,
        torch.as_tensor(mask, dtype=torch.bool),
        sink=cfg.sink,
        recent=cfg.recent,
        max_new_tokens=1,
    )
    return float(out.cache_ratio)


def memory_table(
    model: LoadedModel,
    cfg: DuoConfig,
    gates: np.ndarray,
    tests: Sequence[needles.NeedleTest],
    measure: bool = True,
) -> pd.DataFrame:
    """Per share and evaluated length N: the KV-cache ratio of the formula at the share actually kept
    (k / n KV heads) and at N = the test's prompt tokens, and the ratio measured on one test."""
    rows = []
    first: dict[int, needles.NeedleTest] = {}
    for test in tests:
        first.setdefault(test.length, test)
    for share in cfg.shares:
        k = n_retrieval(share, gates.size)
        for length in sorted(first):
            test = first[length]
            mask = top_mask(gates, k)
            measured = _measure(model, cfg, mask, test) if measure else math.nan
            kept, full = kv_tokens(model, torch.as_tensor(mask), cfg.sink, cfg.recent, test.n_tokens)
            rows.append(
                {
                    "share": float(share),
                    "k": k,
                    "share_kept": k / gates.size,
                    "length": length,
                    "n_tokens": test.n_tokens,
                    "kv_ratio": kv_ratio(k / gates.size, test.n_tokens, cfg.sink, cfg.recent),
                    # layer by layer: a sliding-window layer's full cache is its window, not N
                    "kv_ratio_layers": kept / full,
                    "measured_ratio": measured,
                }
            )
    return pd.DataFrame(rows)


def _gates(
    model: LoadedModel, cfg: DuoConfig
) -> tuple[np.ndarray, pd.DataFrame, dict[str, Any], dict[str, float]]:
    """Trained or loaded gates, the loss table, notes on where they came from, timings."""
    source = cfg.gates_from
    if source == AUTO:
        source = SHIPPED if has_shipped(model.name) else None
    if source is not None:
        path = resolve_gates_file(source, model.name)
        gates, record = load_gates(path, model)
        trained_with = record.get("config") or {}
        note: dict[str, Any] = {
            "gates_from": str(path),
            "gates_trained_with": trained_with,
            "gates_training": record.get("trained"),
        }
        window = (trained_with.get("sink"), trained_with.get("recent"))
        if window != (None, None) and window != (cfg.sink, cfg.recent):
            note["window_differs"] = (
                f"the gates were trained with sink={window[0]}, recent={window[1]}; this run's streaming "
                f"heads use sink={cfg.sink}, recent={cfg.recent}"
            )
        return gates, loss_from_record(record), note, {"train": 0.0}
    t0 = time.perf_counter()
    trained: Trained = train_gates(model, cfg)
    timings = {f"train_{k}": v for k, v in trained.seconds.items()}
    timings["train"] = round(time.perf_counter() - t0, 3)
    return trained.gates, trained.loss, {"gates_from": None}, timings


def run_duo(model: LoadedModel, config: DuoConfig | None = None) -> AnalysisResult:
    """Train DuoAttention's gates and test the retrieval heads they pick (docs/analyses/duo.md)."""
    cfg = config or DuoConfig()
    cfg.validate()
    _check(model, cfg)
    t_start = time.perf_counter()
    gates, loss, gate_notes, timings = _gates(model, cfg)
    t0 = time.perf_counter()
    tests = grid(model, retrieval_config(cfg))
    timings["grid"] = round(time.perf_counter() - t0, 3)
    scored: Scored | None = None
    kv_scores: np.ndarray | None = None
    if cfg.retrieval_score:
        t0 = time.perf_counter()
        scored = score_heads(model, cfg, exclude=sorted({t.answer for t in tests}))
        kv_scores = kv_head_scores(scored.head_scores, model.group_size)
        timings["retrieval_score"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    decodes = decode_grid(model, cfg, tests, selections(gates, kv_scores, cfg))
    timings["evaluate"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    memory = memory_table(model, cfg, gates, tests, measure=cfg.measure_cache)
    timings["memory"] = round(time.perf_counter() - t0, 3)
    agreement = (
        agreement_table(gates, kv_scores, cfg.shares)
        if kv_scores is not None and np.isfinite(kv_scores).any()
        else pd.DataFrame(columns=AGREEMENT_COLUMNS)
    )
    tables = {
        "heads": _heads(model, gates, scored, kv_scores),
        "gates": gates_table(model, gates, kv_scores),
        "loss": loss,
        "accuracy": accuracy_table(decodes, cfg.n_boot, cfg.seed),
        "decodes": decodes,
        "memory": memory,
        "agreement": agreement,
    }
    if scored is not None:
        tables["score_tests"] = scored.tests
    timings["total"] = round(time.perf_counter() - t_start, 3)
    return AnalysisResult(
        analysis="duo",
        model_info=model.describe(),
        config=replace(cfg),
        tables=tables,
        arrays={"gates": gates.astype(np.float32)},
        seeds={"train": cfg.seed, "grid": cfg.seed, "random": cfg.seed},
        timings=timings,
        notes=_notes(model, cfg, gate_notes, scored, memory),
        nan_ok=("retrieval_score", "kv_retrieval_score"),
    )


def _notes(
    model: LoadedModel,
    cfg: DuoConfig,
    gate_notes: dict[str, Any],
    scored: Scored | None,
    memory: pd.DataFrame,
) -> dict[str, Any]:
    measured = bool(len(memory)) and bool(memory["measured_ratio"].notna().any())
    notes: dict[str, Any] = {
        **gate_notes,
        "window": f"streaming heads see sink={cfg.sink} + recent={cfg.recent} keys",
        "train_lengths": list(cfg.train_lengths),
        "loss": "MSE of the final hidden states (after the final norm) on the positions predicting the answers "
        f"+ {cfg.lam} * mean|gate|",
        "binarise": "top round(share * n) KV heads by gate (ties: earlier layer, then lower KV head)",
        "kv_retrieval_score": "the largest retrieval score (Wu et al.) of the KV head's query heads",
        "random": "KV heads drawn uniformly from all KV heads, one draw per (seed, k)",
        "memory": "kv_ratio = r + (1 - r) * min(1, (sink + recent) / N), r = k / n; kv_ratio_layers: the "
        "same counted layer by layer, a sliding-window layer capped at its window; measured_ratio: "
        + (
            "cache bytes kept / full cache bytes after probe.duo_cache's prefill"
            if measured
            else "not measured"
        ),
        "n_kv_heads_total": model.n_layers * model.n_kv_heads,
    }
    if model.sliding_window:
        notes["sliding_layers"] = (
            f"{model.name}'s sliding-window layers (window {model.sliding_window}) are gated like the others; "
            "their full branch is the layer's window, and the formula counts their cache as full"
        )
    if scored is not None:
        notes["score_tests"] = len(scored.tests)
        notes["score_tests_passed"] = int(scored.tests["passed"].sum()) if len(scored.tests) else 0
    return notes
