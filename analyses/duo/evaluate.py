"""Evaluating retrieval-head selections on the needle grid: Duo's gates against the retrieval score
of Wu et al. and random KV heads, each at the same share, with the full model as the reference.

Every condition decodes each test greedily under :func:`probe.streaming.duo_attention` with binary
gates (1: a retrieval head, full attention; 0: a streaming head), prefill and decode alike, so the
full model (every gate 1) runs through the same code as the others. The KV cache is a
``transformers.DynamicCache`` built without the model's config, which keeps every key (also on
Gemma 3's sliding-window layers, whose window the attention mask still applies).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses import validation
from analyses.duo.config import SCORE_SEED_OFFSET, DuoConfig
from analyses.duo.gates import n_retrieval, top_mask
from analyses.retrieval.config import RetrievalConfig
from analyses.retrieval.decoding import answer, max_new, text
from analyses.retrieval.scoring import aggregate_scores
from analyses.tasks import needles
from probe.decode import stop_token_ids
from probe.loading import LoadedModel
from probe.streaming import duo_attention


def retrieval_config(cfg: DuoConfig) -> RetrievalConfig:
    """The retrieval analysis's settings for this run's needle grids (decoding length and the gate)."""
    return RetrievalConfig(
        lengths=tuple(cfg.lengths),
        depths=tuple(cfg.depths),
        n_needles=cfg.n_needles,
        seed=cfg.seed,
        protocol=cfg.protocol,
        rouge_gate=cfg.rouge_gate,
        max_new_tokens=cfg.max_new_tokens,
        novel_answer_tokens=cfg.novel_answer_tokens,
        mask_fractions=(),
        validation=False,
        progress=cfg.progress,
    )


def grid(model: LoadedModel, rcfg: RetrievalConfig, exclude: Sequence[str] = ()) -> list[needles.NeedleTest]:
    """The needle grid of ``rcfg`` as the retrieval analysis builds it."""
    return needles.make_grid(
        model,
        lengths=[int(n) for n in rcfg.lengths],
        depths=[float(d) for d in rcfg.depths],
        n_needles=rcfg.n_needles,
        seed=rcfg.seed,
        progress=rcfg.progress,
        answer_words=rcfg.answer_words,
        chat=rcfg.chat,
        answer_prefix=rcfg.answer_prefix,
        novel_answer_tokens=rcfg.novel_answer_tokens,
        protocol=rcfg.protocol,
        exclude=exclude,
    )


# ------------------------------------------------------------------------------ decoding


def _cache_kw(native: torch.nn.Module) -> str:
    params = inspect.signature(native.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_out(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class Decoded:
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float


@torch.inference_mode()
def duo_decode(
    model: LoadedModel, gates: np.ndarray, prompt_ids: Sequence[int], max_new_tokens: int, cfg: DuoConfig
) -> Decoded:
    """Greedy decoding of ``prompt_ids`` with every KV head gated by ``gates`` ``[n_layers, n_kv]``."""
    from transformers import DynamicCache

    ids = [int(t) for t in prompt_ids]
    model.check_context(len(ids) + max_new_tokens)
    g = torch.as_tensor(np.asarray(gates), dtype=torch.float32, device=model.device)
    stops = stop_token_ids(model.tokenizer)
    tokens: list[int] = []
    with duo_attention(model, g, sink=cfg.sink, recent=cfg.recent, block=cfg.block) as native:
        kw = _cache_kw(native)
        t0 = time.perf_counter()
        out = native(
            input_ids=torch.tensor([ids], device=model.device),
            use_cache=True,
            logits_to_keep=1,
            **{kw: DynamicCache()},
        )
        t1 = time.perf_counter()
        for step in range(max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            if nxt in stops or step == max_new_tokens - 1:
                break
            position = len(ids) + step
            out = native(
                input_ids=torch.tensor([[nxt]], device=model.device),
                position_ids=torch.tensor([[position]], device=model.device),
                use_cache=True,
                **{kw: _cache_out(out)},
            )
        t2 = time.perf_counter()
    return Decoded(tokens, t1 - t0, t2 - t1)


# ------------------------------------------------------------------------------ selections


@dataclass(frozen=True)
class Selection:
    """One condition: which KV heads keep full attention (``mask`` ``[n_layers, n_kv]``, True = retrieval)."""

    selection: str  # full | duo | retrieval_score | random
    share: float
    seed: int
    mask: np.ndarray


def selections(gates: np.ndarray, kv_scores: np.ndarray | None, cfg: DuoConfig) -> list[Selection]:
    """The full model, then per share: Duo's top gates, the top retrieval scores (when given and not
    all NaN) and ``random_seeds`` random sets of the same size over all KV heads."""
    shape = gates.shape
    out = [Selection("full", 1.0, 0, np.ones(shape, dtype=bool))]
    n = gates.size
    for share in cfg.shares:
        k = n_retrieval(share, n)
        out.append(Selection("duo", float(share), 0, top_mask(gates, k)))
        if kv_scores is not None and np.isfinite(kv_scores).any():
            out.append(Selection("retrieval_score", float(share), 0, top_mask(kv_scores, k)))
        for seed in range(cfg.random_seeds):
            rng = np.random.default_rng([cfg.seed, seed, k])
            mask = np.zeros(n, dtype=bool)
            mask[rng.choice(n, size=k, replace=False)] = True
            out.append(Selection("random", float(share), seed, mask.reshape(shape)))
    return out


def kv_head_scores(head_scores: np.ndarray, group: int) -> np.ndarray:
    """Per KV head: the largest retrieval score of its ``group`` query heads ``[n_layers, n_kv]``
    (NaN only where every query head's is NaN)."""
    s = np.asarray(head_scores, dtype=np.float64)
    layers, heads = s.shape
    grouped = s.reshape(layers, heads // group, group)
    out = np.full(grouped.shape[:2], np.nan)
    ok = np.isfinite(grouped).any(axis=2)
    out[ok] = np.nanmax(np.where(np.isfinite(grouped), grouped, -np.inf), axis=2)[ok]
    return out


@dataclass
class Scored:
    """The retrieval score of every query head on the score grid and the grid's tests table."""

    head_scores: np.ndarray  # [n_layers, n_heads], NaN when no test was recalled
    tests: pd.DataFrame


def score_heads(model: LoadedModel, cfg: DuoConfig, exclude: Sequence[str]) -> Scored:
    """Wu et al.'s retrieval score on a grid of its own (``score_*`` settings, seed + offset), by the
    retrieval analysis's decoding and aggregation."""
    rcfg = replace(
        retrieval_config(cfg),
        lengths=tuple(cfg.score_lengths),
        depths=tuple(cfg.score_depths),
        n_needles=cfg.score_needles,
        seed=cfg.seed + SCORE_SEED_OFFSET,
    )
    tests = grid(model, rcfg, exclude=exclude)
    per_test = np.zeros((len(tests), model.n_layers, model.n_heads))
    rows = []
    for i, test in enumerate(tests):
        out = answer(model, rcfg, test, test.prompt_ids)
        assert out.scores is not None
        per_test[i] = out.scores
        rows.append(
            {
                "test": i,
                "length": test.length,
                "depth": test.depth,
                "recall": out.recall,
                "generated": out.text,
            }
        )
    frame = pd.DataFrame(rows)
    passed = (
        (frame["recall"] > cfg.rouge_gate).to_numpy(dtype=bool) if len(frame) else np.zeros(0, dtype=bool)
    )
    frame["passed"] = passed
    return Scored(aggregate_scores(per_test, passed)["retrieval_score"], frame)


# ------------------------------------------------------------------------------ the grid


def decode_grid(
    model: LoadedModel, cfg: DuoConfig, tests: Sequence[needles.NeedleTest], conditions: Sequence[Selection]
) -> pd.DataFrame:
    """One row per (test, condition): the generated text, its ROUGE-1 recall of the reference, timings."""
    from tqdm.auto import tqdm

    rcfg = retrieval_config(cfg)
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(tests) * len(conditions),
        desc="duo niah",
        unit="decode",
        disable=not cfg.progress,
        leave=False,
    )
    for i, test in enumerate(tests):
        for cond in conditions:
            out = duo_decode(model, cond.mask.astype(np.float32), test.prompt_ids, max_new(rcfg, test), cfg)
            said = text(model, out.tokens)
            recall = needles.rouge1_recall(said, test.reference)
            rows.append(
                {
                    "test": i,
                    "length": test.length,
                    "depth": test.depth,
                    "needle_index": test.needle_index,
                    "selection": cond.selection,
                    "share": cond.share,
                    "seed": cond.seed,
                    "k": int(cond.mask.sum()),
                    "recall": recall,
                    "recalled": recall > cfg.rouge_gate,
                    "generated": said,
                    "prefill_s": out.prefill_seconds,
                    "decode_s": out.decode_seconds,
                }
            )
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


def accuracy_table(decodes: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Mean recall and recalled share per (selection, share, seed, length), with 95% bootstrap
    intervals over the tests; ``length`` 0 pools every length."""
    rows = []
    keys = ["selection", "share", "seed"]
    for (selection, share, cond_seed), part in decodes.groupby(keys, sort=False):
        by_length = [(int(n), p) for n, p in part.groupby("length")]
        for length, sub in [*by_length, (0, part)]:
            recall = validation.bootstrap_interval(sub["recall"].to_numpy(dtype=float), n_boot, seed)
            recalled = validation.bootstrap_interval(sub["recalled"].to_numpy(dtype=float), n_boot, seed)
            rows.append(
                {
                    "selection": selection,
                    "share": float(share),
                    "seed": int(cond_seed),
                    "k": int(sub["k"].iloc[0]),
                    "length": length,
                    "n_tests": len(sub),
                    "recall": recall[0],
                    "recall_low": recall[1],
                    "recall_high": recall[2],
                    "recalled": recalled[0],
                    "recalled_low": recalled[1],
                    "recalled_high": recalled[2],
                }
            )
    return pd.DataFrame(rows)
