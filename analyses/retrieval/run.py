"""Running the retrieval analysis: score the grid, the masking curve, the held-out validation."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from analyses import validation
from analyses.base import AnalysisResult, heads_frame
from analyses.retrieval.config import RetrievalConfig
from analyses.retrieval.decoding import answer, check_room
from analyses.retrieval.heldout import HeldOut, found_heads, needle_test_row, run_heldout
from analyses.retrieval.masking import masking_table
from analyses.retrieval.scoring import aggregate_scores, copy_significance
from analyses.tasks import needles
from probe.decode import check_decodable
from probe.errors import ConfigError
from probe.loading import LoadedModel


def _grid(model: LoadedModel, cfg: RetrievalConfig) -> list[needles.NeedleTest]:
    return needles.make_grid(
        model,
        lengths=[int(n) for n in cfg.lengths],
        depths=[float(d) for d in cfg.depths],
        n_needles=cfg.n_needles,
        seed=cfg.seed,
        progress=cfg.progress,
        answer_words=cfg.answer_words,
        chat=cfg.chat,
        answer_prefix=cfg.answer_prefix,
        novel_answer_tokens=cfg.novel_answer_tokens,
        protocol=cfg.protocol,
    )


def _score_grid(
    model: LoadedModel, cfg: RetrievalConfig, tests: list[needles.NeedleTest]
) -> tuple[np.ndarray, pd.DataFrame]:
    """Every test answered and scored: ``[tests, layers, heads]`` and the tests table."""
    from tqdm.auto import tqdm

    per_test = np.zeros((len(tests), model.n_layers, model.n_heads))
    rows: list[dict[str, Any]] = []
    bar = tqdm(tests, desc="retrieval tests", unit="test", disable=not cfg.progress, leave=False)
    for i, test in enumerate(bar):
        out = answer(model, cfg, test, test.prompt_ids)
        assert out.scores is not None
        per_test[i] = out.scores
        start, end = test.needle_span if cfg.scored_span == "needle" else test.answer_span
        rows.append(
            {
                **needle_test_row(i, test, out.text, out.recall, cfg.rouge_gate),
                "span_start": start,
                "span_end": end,
                "n_steps": len(out.decode.tokens),
                "stopped_on": out.decode.stopped_on,
                "prefill_s": out.decode.prefill_seconds,
                "decode_s": out.decode.decode_seconds,
                "heads_hit": int((out.scores > 0).sum()),
            }
        )
    bar.close()
    return per_test, pd.DataFrame(rows)


def _heads(
    model: LoadedModel, cfg: RetrievalConfig, per_test: np.ndarray, passed: np.ndarray
) -> pd.DataFrame:
    agg = aggregate_scores(per_test, passed, cfg.threshold)
    heads = heads_frame(model, {**agg, **copy_significance(per_test, passed, cfg.alpha)})
    heads["is_retrieval"] = heads["is_retrieval"].astype(bool)
    heads["copies_significantly"] = heads["copies_significantly"].astype(bool)
    return heads


def _long_scores(model: LoadedModel, per_test: np.ndarray) -> pd.DataFrame:
    n = per_test.shape[0]
    scores = pd.DataFrame(
        {
            "test": np.repeat(np.arange(n), model.n_layers * model.n_heads),
            "layer": np.tile(np.repeat(np.arange(model.n_layers), model.n_heads), n),
            "head": np.tile(np.arange(model.n_heads), n * model.n_layers),
            "score": per_test.ravel(),
        }
    )
    return scores[scores["score"] > 0].reset_index(drop=True)


def _with_heldout(heads: pd.DataFrame, held: HeldOut | None) -> pd.DataFrame:
    """The evidence columns (``retrieval_role`` ...) and each head's mean score on the recalled
    held-out tests (``heldout_score``: does the head copy on needles it was not found on?)."""
    table = held.validation if held is not None else validation.frame([])
    out = validation.evidence_columns(heads, table, "retrieval")
    if held is not None:
        ok = held.tests["passed"].to_numpy(dtype=bool) if len(held.tests) else np.zeros(0, dtype=bool)
        out["heldout_score"] = held.scores[ok].mean(axis=0).ravel() if ok.any() else np.full(len(out), np.nan)
    return out


def run_retrieval(model: LoadedModel, config: RetrievalConfig | None = None) -> AnalysisResult:
    """Score every head on a needle grid, the masking curve and the held-out validation
    (docs/analyses/retrieval.md)."""
    cfg = config or RetrievalConfig()
    cfg.validate()
    if model.kind != "language" or model.native_model is None:
        raise ConfigError(
            f"{model.name} is not a language model with a native transformers module; retrieval scoring "
            "needs a causal language model loaded with probe.load_model"
        )
    check_decodable(
        model,
        "retrieval heads are scored on decode steps: use a family whose decode-rows check passes in docs/support.md",
    )
    check_room(model, cfg, max(int(n) for n in [*cfg.lengths, cfg.heldout_tokens]))
    t_start = time.perf_counter()
    tests = _grid(model, cfg)
    timings = {"grid": round(time.perf_counter() - t_start, 3)}
    per_test, tests_frame = _score_grid(model, cfg, tests)
    timings["prefill"] = round(float(tests_frame["prefill_s"].sum()), 3)
    timings["decode"] = round(float(tests_frame["decode_s"].sum()), 3)
    passed = tests_frame["passed"].to_numpy(dtype=bool)
    heads = _heads(model, cfg, per_test, passed)
    tables: dict[str, pd.DataFrame] = {"tests": tests_frame, "test_scores": _long_scores(model, per_test)}
    if cfg.mask_fractions:
        t0 = time.perf_counter()
        n_mask = len(tests) if cfg.mask_tests == 0 else min(cfg.mask_tests, len(tests))
        subset = sorted(
            int(i) for i in np.random.default_rng(cfg.seed).choice(len(tests), n_mask, replace=False)
        )
        scores = heads["retrieval_score"].to_numpy(dtype=float).reshape(model.n_layers, model.n_heads)
        tables["masking"] = masking_table(model, cfg, tests, subset, scores, tests_frame)
        timings["masking"] = round(time.perf_counter() - t0, 3)
    held: HeldOut | None = None
    if cfg.validation:
        t0 = time.perf_counter()
        held = run_heldout(model, cfg, found_heads(heads), exclude=sorted({t.answer for t in tests}))
        tables.update(heldout=held.tests, heldout_masking=held.masked)
        timings["validation"] = round(time.perf_counter() - t0, 3)
    tables = {"heads": _with_heldout(heads, held), **tables}
    tables["validation"] = held.validation if held is not None else validation.frame([])
    timings["total"] = round(time.perf_counter() - t_start, 3)
    n_pass = int(passed.sum())
    share = float(np.mean(heads["is_retrieval"])) if n_pass else float("nan")
    return AnalysisResult(
        analysis="retrieval",
        model_info=model.describe(),
        config=replace(cfg),  # the typed settings (a copy), as a saved run's ``Run.config``
        tables=tables,
        arrays={"scores": per_test.astype(np.float32)},
        seeds={"grid": cfg.seed, "masking": cfg.seed, "validation": cfg.seed},
        timings=timings,
        notes=_notes(model, cfg, len(tests), n_pass, share, held),
        # With no recalled test the scores are undefined for every head (NaN by definition), which the
        # run store would otherwise take for a model that produced no number.
        nan_ok=_nan_ok(n_pass, held),
    )


def _nan_ok(n_pass: int, held: HeldOut | None) -> tuple[str, ...]:
    names = ["retrieval_effect", "retrieval_effect_low", "retrieval_effect_high"]
    names += ["retrieval_percentile", "retrieval_p_value", "heldout_score", "copy_p_value"]
    if n_pass == 0:
        names += ["retrieval_score", "activation_frequency"]
    return tuple(names)


def _notes(
    model: LoadedModel, cfg: RetrievalConfig, n_tests: int, n_pass: int, share: float, held: HeldOut | None
) -> dict[str, Any]:
    unit = "|needle|" if cfg.scored_span == "needle" else "|answer|"
    reference = "the needle sentence" if cfg.protocol == "needle" else "the answer"
    notes: dict[str, Any] = {
        "metric": f"per test: copy-paste hits (argmax key in the span and its token generated) / {unit}; "
        f"head score: mean over tests whose ROUGE-1 recall of {reference} > {cfg.rouge_gate}; "
        f"retrieval head: score > {cfg.threshold}",
        "protocol": cfg.protocol,
        "span": cfg.scored_span,
        "tests": n_tests,
        "tests_passed": n_pass,
        "share_retrieval_heads": share,
        "activation_frequency": "share of passing tests in which the head copy-pasted at least once",
        "copies_significantly": "one-sided t-test of the per-test scores over the passing tests against 0, "
        f"Benjamini-Hochberg over all heads at {cfg.alpha}",
        "masking": "heads attend uniformly (mean of visible values) at every decode step; the prefill is untouched",
        "bos": model.bos.describe(),
    }
    if held is not None:
        notes["validation"] = (
            held.note or "retrieval heads masked on held-out tests against random same-size sets"
        )
        notes["heldout_tests"] = len(held.tests)
        notes["heldout_passed"] = int(held.tests["passed"].sum()) if len(held.tests) else 0
    return notes
