"""Held-out validation of the retrieval heads (docs/validation.md; docs/analyses/retrieval.md).

The retrieval heads are found on the grid (discovery). The held-out tests are new needles (answers
the grid never drew, places and kinds drawn from another seed) in new haystacks (paragraph orders of
that seed). Each held-out test is answered once unmasked; each one the model recalls is answered
again with the retrieval heads attending uniformly while decoding, and with each of ``n_null`` random
head sets of the same size from outside them. The effect on a test is its ROUGE-1 recall masked minus
unmasked; the role predicts it goes lower, and further than for the random sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analyses import validation
from analyses.retrieval.config import HELDOUT_SEED_OFFSET, RetrievalConfig
from analyses.retrieval.decoding import answer, max_new, scored_span
from analyses.tasks import needles
from probe.decode import prefill
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.types import Head

ROLE = "retrieval"
MEASURE = "ROUGE-1 recall, heads masked minus unmasked"


def heldout_tests(
    model: LoadedModel, cfg: RetrievalConfig, exclude: Sequence[str] = ()
) -> list[needles.NeedleTest]:
    """The held-out tests: ``heldout_needles`` × ``heldout_depths`` at ``heldout_tokens`` tokens,
    drawn from ``seed + HELDOUT_SEED_OFFSET`` and never with an answer in ``exclude``."""
    return needles.make_grid(
        model,
        lengths=[cfg.heldout_tokens],
        depths=[float(d) for d in cfg.heldout_depths],
        n_needles=cfg.heldout_needles,
        seed=cfg.seed + HELDOUT_SEED_OFFSET,
        answer_words=cfg.answer_words,
        chat=cfg.chat,
        answer_prefix=cfg.answer_prefix,
        novel_answer_tokens=cfg.novel_answer_tokens,
        protocol=cfg.protocol,
        exclude=exclude,
    )


def found_heads(heads: pd.DataFrame) -> list[Head]:
    """The retrieval heads of a heads table (score above the threshold), in (layer, head) order."""
    part = heads[heads["is_retrieval"].astype(bool) & heads["retrieval_score"].notna()]
    return sorted((int(r.layer), int(r.head)) for r in part.itertuples(index=False))


def validation_row(
    found: Sequence[Head],
    baseline: np.ndarray,
    found_recall: np.ndarray,
    null_recall: np.ndarray,
    *,
    inputs: validation.Inputs,
    seed: int = 0,
    alpha: float = validation.ALPHA,
) -> dict[str, Any]:
    """The validation row of ``found``: per held-out test the recall change ``found_recall -
    baseline``; the null is each random set's mean change (``null_recall``: ``[sets, tests]``)."""
    base = np.asarray(baseline, dtype=np.float64)
    effects = np.asarray(found_recall, dtype=np.float64) - base
    null = np.asarray(null_recall, dtype=np.float64)
    null_effects = (null.reshape(-1, base.size) - base[None, :]).mean(axis=1) if base.size else np.zeros(0)
    return validation.test_row(
        ROLE,
        list(found),
        effects,
        null_effects,
        measure=MEASURE,
        direction="lower",
        inputs=inputs,
        seed=seed,
        alpha=alpha,
    )


@dataclass
class HeldOut:
    """What the held-out validation produced (tables of the result, and its notes)."""

    validation: pd.DataFrame  # one row per role tested (analyses.validation.COLUMNS)
    tests: pd.DataFrame  # one row per held-out test, answered unmasked
    masked: pd.DataFrame  # one row per (recalled held-out test, masked set)
    scores: np.ndarray  # [held-out tests, layers, heads]: the per-test scores, unmasked
    note: str


def needle_test_row(
    i: int, test: needles.NeedleTest, said: str, recall: float, gate: float
) -> dict[str, Any]:
    """The columns every table of needle tests shares (grid and held-out)."""
    return {
        "test": i,
        "length": test.length,
        "n_tokens": len(test.prompt_ids),
        "depth": test.depth,
        "depth_actual": test.depth_actual,
        "needle": test.needle_index,
        "needle_kind": test.kind,
        "answer": test.answer,
        "reference": test.reference,
        "generated": said,
        "rouge1_recall": recall,
        "passed": recall > gate,
    }


def _null(model: LoadedModel, cfg: RetrievalConfig, found: Sequence[Head]) -> tuple[list[list[Head]], str]:
    every = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]
    try:
        return validation.null_sets(every, len(found), cfg.n_null, cfg.seed, exclude=found), ""
    except ConfigError as err:
        return [], f"no null: {err}"


def run_heldout(
    model: LoadedModel, cfg: RetrievalConfig, found: Sequence[Head], exclude: Sequence[str]
) -> HeldOut:
    """Answer the held-out tests unmasked, then mask ``found`` and the null sets on those recalled."""
    from tqdm.auto import tqdm

    tests = heldout_tests(model, cfg, exclude)
    null, why = _null(model, cfg, found) if found else ([], "")
    sets: list[tuple[str, int, list[Head]]] = [("retrieval", -1, list(found))] if found else []
    sets += [("null", j, s) for j, s in enumerate(null)]
    rows, masked_rows = [], []
    scores = np.zeros((len(tests), model.n_layers, model.n_heads))
    bar = tqdm(total=len(tests) * (1 + len(sets)), desc="held-out", disable=not cfg.progress, leave=False)
    for i, test in enumerate(tests):
        pre = prefill(model, test.prompt_ids, max_new(cfg, test))
        plain = answer(model, cfg, test, pre)
        scores[i] = plain.scores if plain.scores is not None else 0.0
        rows.append(needle_test_row(i, test, plain.text, plain.recall, cfg.rouge_gate))
        rows[-1]["span_start"], rows[-1]["span_end"] = scored_span(cfg, test)
        bar.update(1)
        if plain.recall <= cfg.rouge_gate:  # nothing recalled: no recall to lose
            bar.update(len(sets))
            continue
        for kind, j, heads in sets:
            out = answer(model, cfg, test, pre, masked=heads, record=False)
            masked_rows.append(
                {
                    "test": i,
                    "set": kind,
                    "null_index": j,
                    "heads": validation.heads_label(heads),
                    "rouge1_recall": out.recall,
                    "change": out.recall - plain.recall,
                }
            )
            bar.update(1)
    bar.close()
    tests_frame = pd.DataFrame(rows)
    masked = pd.DataFrame(
        masked_rows, columns=["test", "set", "null_index", "heads", "rouge1_recall", "change"]
    )
    table = validation.frame([_row(cfg, found, tests_frame, masked)] if found else [])
    note = why or ("" if found else "no head scored above the threshold on the grid: nothing to validate")
    return HeldOut(table, tests_frame, masked, scores, note)


def _row(
    cfg: RetrievalConfig, found: Sequence[Head], tests: pd.DataFrame, masked: pd.DataFrame
) -> dict[str, Any]:
    recalled = tests[tests["passed"]]
    ids = recalled["test"].to_numpy(dtype=int)
    base = recalled["rouge1_recall"].to_numpy(dtype=float)
    mine = masked[masked["set"] == "retrieval"].set_index("test")["rouge1_recall"]
    nulls = masked[masked["set"] == "null"].pivot(index="null_index", columns="test", values="rouge1_recall")
    null_recall = nulls.reindex(columns=ids).to_numpy(dtype=float) if len(nulls) else np.zeros((0, ids.size))
    detail = (
        f"{len(recalled)} of {len(tests)} held-out tests recalled unmasked; {cfg.heldout_needles} needles "
        f"x depths {', '.join(f'{float(d):g}' for d in cfg.heldout_depths)} at {cfg.heldout_tokens} tokens, "
        f"needles and haystacks the grid never used (seed {cfg.seed + HELDOUT_SEED_OFFSET})"
    )
    return validation_row(
        found,
        base,
        mine.reindex(ids).to_numpy(dtype=float),
        null_recall,
        inputs=validation.Inputs("held-out needle tests", int(ids.size), detail),
        seed=cfg.seed,
        alpha=cfg.alpha,
    )
