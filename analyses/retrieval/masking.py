"""The masking curve: NIAH recall with the top-K heads against K random heads attending uniformly
while decoding, on tests of the grid (the held-out test of the retrieval heads is in
:mod:`analyses.retrieval.heldout`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from analyses.retrieval.config import RetrievalConfig
from analyses.retrieval.decoding import answer, max_new
from analyses.tasks import needles
from probe.decode import prefill
from probe.loading import LoadedModel
from probe.types import Head


def top_heads(scores: np.ndarray, k: int) -> list[Head]:
    """The ``k`` heads of highest score (NaN last, ties in (layer, head) order)."""
    flat = np.nan_to_num(scores, nan=-1.0).ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    n_heads = scores.shape[1]
    return [(int(i // n_heads), int(i % n_heads)) for i in order]


def random_heads(n_layers: int, n_heads: int, k: int, exclude: set[Head], seed: int) -> list[Head]:
    pool = [(lay, h) for lay in range(n_layers) for h in range(n_heads) if (lay, h) not in exclude]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
    return [pool[int(i)] for i in sorted(picked)]


def _conditions(
    model: LoadedModel, cfg: RetrievalConfig, scores: np.ndarray
) -> list[tuple[str, int, int, float, list[Head]]]:
    total = model.n_layers * model.n_heads
    conditions: list[tuple[str, int, int, float, list[Head]]] = []
    done: set[int] = set()
    for frac in cfg.mask_fractions:
        k = max(1, round(float(frac) * total))
        if k in done:  # two fractions can round to the same K on a small model: run it once
            continue
        done.add(k)
        top = top_heads(scores, k)
        conditions.append(("top", k, 0, float(frac), top))
        for seed in range(cfg.mask_seeds):
            rand = random_heads(model.n_layers, model.n_heads, k, set(top), cfg.seed + 1000 + seed)
            conditions.append(("random", k, seed, float(frac), rand))
    return conditions


def masking_table(
    model: LoadedModel,
    cfg: RetrievalConfig,
    tests: Sequence[needles.NeedleTest],
    subset: Sequence[int],
    scores: np.ndarray,
    tests_frame: pd.DataFrame,
) -> pd.DataFrame:
    """NIAH recall with the top-K heads vs K random heads attending uniformly during decoding.

    The top K come from the finished scores, so each test's prompt is prefilled again here (once,
    then shared by all of its conditions): one KV cache alive at a time, whatever the grid size.
    """
    from tqdm.auto import tqdm

    conditions = _conditions(model, cfg, scores)
    rows: list[dict[str, Any]] = []
    base = tests_frame.set_index("test")
    bar = tqdm(
        total=len(conditions) * len(subset),
        desc="masking",
        unit="decode",
        disable=not cfg.progress,
        leave=False,
    )
    for i in subset:
        test = tests[i]
        pre = prefill(model, test.prompt_ids, max_new(cfg, test))
        rows.append(
            {
                "test": i,
                "kind": "none",
                "k": 0,
                "fraction": 0.0,
                "seed": 0,
                "rouge1_recall": float(base.loc[i, "rouge1_recall"]),
                "heads": "",
            }
        )
        for kind, k, seed, frac, heads in conditions:
            out = answer(model, cfg, test, pre, masked=heads, record=False)
            rows.append(
                {
                    "test": i,
                    "kind": kind,
                    "k": k,
                    "fraction": frac,
                    "seed": seed,
                    "rouge1_recall": out.recall,
                    "heads": " ".join(f"L{a}H{b}" for a, b in heads),
                }
            )
            bar.update(1)
    bar.close()
    frame = pd.DataFrame(rows)
    frame["recalled"] = frame["rouge1_recall"] > cfg.rouge_gate
    return frame


def masking_curve(masking: pd.DataFrame) -> pd.DataFrame:
    """Mean recall and share recalled per (kind, K), random seeds pooled, with the spread over seeds."""
    per_seed = masking.groupby(["kind", "k", "fraction", "seed"], as_index=False).agg(
        recall=("rouge1_recall", "mean"), recalled=("recalled", "mean")
    )
    out = per_seed.groupby(["kind", "k", "fraction"], as_index=False).agg(
        recall=("recall", "mean"),
        recall_sd=("recall", "std"),
        recalled=("recalled", "mean"),
        n_seeds=("seed", "nunique"),
    )
    return out.fillna({"recall_sd": 0.0}).sort_values(["kind", "k"]).reset_index(drop=True)
