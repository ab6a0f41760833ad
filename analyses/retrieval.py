"""Retrieval heads: which heads copy the needle's answer out of a long context while decoding.

Wu et al. (2024), "Retrieval Head Mechanistically Explains Long-Context Factuality". Each needle test
(:mod:`analyses.tasks.needles`) is answered by greedy decoding (:mod:`probe.decode`); a head
copy-pastes at a step when its attention argmax lies in the answer's span on the very token being
generated. A head's retrieval score is its mean per-test score (hits / |span|) over the tests whose
answer was recalled (ROUGE-1 recall above ``rouge_gate``); a retrieval head scores above
``threshold``. Optionally, the top-K heads and K random heads are masked (uniform attention while
decoding) and recall is measured again.

>>> result = run_retrieval(model, RetrievalConfig(lengths=(1024,), depths=(0.0, 0.5, 1.0)))
>>> result.heads.nlargest(5, "retrieval_score")

See docs/analyses/retrieval.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd

from analyses.base import AnalysisResult, heads_frame
from analyses.registry import Analysis, register
from analyses.tasks import needles
from probe.decode import DecodeResult, greedy_decode, prefill
from probe.errors import ConfigError
from probe.loading import LoadedModel

Span = Literal["answer", "needle"]


@dataclass
class RetrievalConfig:
    """Settings of the retrieval-head analysis (docs/analyses/retrieval.md has the table).

    ``lengths`` are context lengths in tokens (the whole prompt), ``depths`` the needle's depth in
    the haystack (0 = start, 1 = end), ``n_needles`` needles per (length, depth): the paper's grid
    is 20 lengths × 10 depths × 3 needles. ``max_new_tokens`` 0 means the answer's length + 8.
    ``mask_fractions``: K as a share of all heads for the masking experiment (empty: no masking);
    ``mask_seeds`` random head sets per K; ``mask_tests`` how many tests the masking runs on
    (0: every test). ``answer_words``, ``chat`` (None: the tokenizer's chat template when it has
    one), ``answer_prefix`` and ``novel_answer_tokens`` go to :func:`analyses.tasks.needles.make_grid`.
    """

    lengths: tuple[int, ...] = (512, 1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    n_needles: int = 2
    seed: int = 0
    threshold: float = 0.1
    rouge_gate: float = 0.5
    span: Span = "answer"
    max_new_tokens: int = 0
    mask_fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)
    mask_seeds: int = 3
    mask_tests: int = 0
    answer_words: int = 3
    chat: bool | None = None
    answer_prefix: bool = True
    novel_answer_tokens: bool = True
    progress: bool = True

    def validate(self) -> None:
        if not self.lengths or any(int(n) < 64 for n in self.lengths):
            raise ConfigError(f"lengths must be context sizes >= 64 tokens (got {list(self.lengths)})")
        if not self.depths or any(not 0.0 <= float(d) <= 1.0 for d in self.depths):
            raise ConfigError(f"depths must lie in [0, 1] (got {list(self.depths)})")
        if self.n_needles < 1:
            raise ConfigError(f"n_needles must be >= 1 (got {self.n_needles})")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1) (got {self.threshold}); the paper uses 0.1")
        if not 0.0 <= self.rouge_gate < 1.0:
            raise ConfigError(f"rouge_gate must be in [0, 1) (got {self.rouge_gate}); the paper uses 0.5")
        if self.span not in ("answer", "needle"):
            raise ConfigError(f"span must be 'answer' or 'needle' (got {self.span!r})")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens}); 0 = answer + 8")
        if any(not 0.0 < float(f) < 1.0 for f in self.mask_fractions):
            raise ConfigError(f"mask_fractions must lie in (0, 1) (got {list(self.mask_fractions)})")
        if self.answer_words < 1:
            raise ConfigError(f"answer_words must be >= 1 (got {self.answer_words})")
        if self.mask_seeds < 1 or self.mask_tests < 0:
            raise ConfigError("mask_seeds must be >= 1 and mask_tests >= 0 (0 = every test)")


# ---------------------------------------------------------------------------------- the score


def copy_paste_hits(
    argmax: np.ndarray, generated: Sequence[int], context_ids: Sequence[int], span: tuple[int, int]
) -> np.ndarray:
    """Per step and head, whether the head copy-pasted: ``[steps, layers, heads]`` bool.

    ``argmax[s, l, h]`` is the key position of head (l, h)'s attention argmax at step ``s``,
    ``generated[s]`` the token produced at that step, ``context_ids`` the prompt, ``span`` the
    half-open token span ``[start, end)`` of the needle's answer in the prompt.
    """
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= len(context_ids):
        raise ConfigError(f"span {span} is not a non-empty span of the {len(context_ids)}-token context")
    am = np.asarray(argmax)
    gen = np.asarray(generated, dtype=np.int64)
    if am.ndim != 3 or am.shape[0] != gen.shape[0]:
        raise ConfigError(
            f"argmax must be [steps, layers, heads] with one step per generated token; got {am.shape}"
        )
    ctx = np.asarray(context_ids, dtype=np.int64)
    in_span = (am >= start) & (am < end)
    token_at = ctx[np.clip(am, 0, len(ctx) - 1)]
    return in_span & (token_at == gen[:, None, None])


def retrieval_scores_for_test(
    argmax: np.ndarray, generated: Sequence[int], context_ids: Sequence[int], span: tuple[int, int]
) -> np.ndarray:
    """One test's score per head ``[layers, heads]``: copy-paste hits / |span| (the paper's 1/|span| per hit)."""
    hits = copy_paste_hits(argmax, generated, context_ids, span)
    return hits.sum(axis=0) / float(span[1] - span[0])


def aggregate_scores(
    per_test: np.ndarray, passed: np.ndarray, threshold: float = 0.1
) -> dict[str, np.ndarray]:
    """Head scores over tests: mean over the tests that passed the gate, frequency, retrieval flag.

    ``per_test``: ``[tests, layers, heads]``; ``passed``: ``[tests]`` bool. With no passing test
    the scores are NaN (nothing was recalled, so nothing can be said).
    """
    scores = np.asarray(per_test, dtype=np.float64)
    ok = np.asarray(passed, dtype=bool)
    if scores.ndim != 3 or ok.shape != (scores.shape[0],):
        raise ConfigError(
            f"per_test must be [tests, layers, heads] and passed [tests]; got {scores.shape}, {ok.shape}"
        )
    if not ok.any():
        nan = np.full(scores.shape[1:], np.nan)
        return {
            "retrieval_score": nan,
            "activation_frequency": nan.copy(),
            "is_retrieval": np.zeros_like(nan),
        }
    kept = scores[ok]
    mean = kept.mean(axis=0)
    return {
        "retrieval_score": mean,
        "activation_frequency": (kept > 0).mean(axis=0),
        "is_retrieval": (mean > threshold).astype(np.float64),
    }


# ---------------------------------------------------------------------------------- running


def _max_new(cfg: RetrievalConfig, test: needles.NeedleTest) -> int:
    return cfg.max_new_tokens or len(test.answer_ids) + 8


def _span(cfg: RetrievalConfig, test: needles.NeedleTest) -> tuple[int, int]:
    return tuple(test.answer_span) if cfg.span == "answer" else tuple(test.needle_span)  # type: ignore[return-value]


def _text(model: LoadedModel, tokens: Sequence[int]) -> str:
    return str(model.tokenizer.decode(list(tokens), skip_special_tokens=True))


def _top_heads(scores: np.ndarray, k: int) -> list[tuple[int, int]]:
    flat = np.nan_to_num(scores, nan=-1.0).ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    n_heads = scores.shape[1]
    return [(int(i // n_heads), int(i % n_heads)) for i in order]


def _random_heads(
    n_layers: int, n_heads: int, k: int, exclude: set[tuple[int, int]], seed: int
) -> list[tuple[int, int]]:
    pool = [(lay, h) for lay in range(n_layers) for h in range(n_heads) if (lay, h) not in exclude]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
    return [pool[int(i)] for i in sorted(picked)]


def run_retrieval(model: LoadedModel, config: RetrievalConfig | None = None) -> AnalysisResult:
    """Score every head on a needle grid and run the masking experiment (docs/analyses/retrieval.md)."""
    cfg = config or RetrievalConfig()
    cfg.validate()
    if model.kind != "language" or model.native_model is None:
        raise ConfigError(
            f"{model.name} is not a language model with a native transformers module; retrieval scoring "
            "needs a causal language model loaded with probe.load_model"
        )
    from tqdm.auto import tqdm

    longest = max(int(n) for n in cfg.lengths)
    room = cfg.max_new_tokens or 8 + 4 * cfg.answer_words  # enough for any answer's tokens + 8
    if longest + room > model.n_ctx:
        raise ConfigError(
            f"a {longest}-token prompt leaves no room to decode {room} tokens within {model.name}'s context of "
            f"{model.n_ctx}; use lengths up to {model.n_ctx - room}"
        )
    t_start = time.perf_counter()
    tests = needles.make_grid(
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
    )
    t_grid = time.perf_counter() - t_start
    per_test = np.zeros((len(tests), model.n_layers, model.n_heads))
    rows: list[dict[str, Any]] = []
    n_mask = len(tests) if cfg.mask_tests == 0 else min(cfg.mask_tests, len(tests))
    mask_subset = set(np.random.default_rng(cfg.seed).choice(len(tests), size=n_mask, replace=False).tolist())
    decode_s = prefill_s = 0.0
    bar = tqdm(tests, desc="retrieval tests", unit="test", disable=not cfg.progress, leave=False)
    for i, test in enumerate(bar):
        out: DecodeResult = greedy_decode(model, test.prompt_ids, _max_new(cfg, test))
        text = _text(model, out.tokens)
        recall = needles.rouge1_recall(text, test.answer)
        span = _span(cfg, test)
        per_test[i] = retrieval_scores_for_test(out.argmax, out.tokens, test.prompt_ids, span)
        prefill_s += out.prefill_seconds
        decode_s += out.decode_seconds
        rows.append(
            {
                "test": i,
                "length": test.length,
                "n_tokens": len(test.prompt_ids),
                "depth": test.depth,
                "depth_actual": test.depth_actual,
                "needle": test.needle_index,
                "needle_kind": test.kind,
                "answer": test.answer,
                "generated": text,
                "rouge1_recall": recall,
                "passed": recall > cfg.rouge_gate,
                "span_start": span[0],
                "span_end": span[1],
                "n_steps": len(out.tokens),
                "stopped_on": out.stopped_on,
                "prefill_s": out.prefill_seconds,
                "decode_s": out.decode_seconds,
                "heads_hit": int((per_test[i] > 0).sum()),
            }
        )
    bar.close()
    tests_frame = pd.DataFrame(rows)
    passed = tests_frame["passed"].to_numpy(dtype=bool)
    agg = aggregate_scores(per_test, passed, cfg.threshold)
    heads = heads_frame(model, agg)
    heads["is_retrieval"] = heads["is_retrieval"].astype(bool)
    scores_long = pd.DataFrame(
        {
            "test": np.repeat(np.arange(len(tests)), model.n_layers * model.n_heads),
            "layer": np.tile(np.repeat(np.arange(model.n_layers), model.n_heads), len(tests)),
            "head": np.tile(np.arange(model.n_heads), len(tests) * model.n_layers),
            "score": per_test.ravel(),
        }
    )
    scores_long = scores_long[scores_long["score"] > 0].reset_index(drop=True)
    tables: dict[str, pd.DataFrame] = {"heads": heads, "tests": tests_frame, "test_scores": scores_long}
    timings = {"grid": round(t_grid, 3), "prefill": round(prefill_s, 3), "decode": round(decode_s, 3)}

    if cfg.mask_fractions:
        t_mask = time.perf_counter()
        subset = sorted(int(i) for i in mask_subset)
        tables["masking"] = _masking(model, cfg, tests, subset, agg["retrieval_score"], tests_frame)
        timings["masking"] = round(time.perf_counter() - t_mask, 3)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    n_pass = int(passed.sum())
    share = float(np.nanmean(agg["retrieval_score"] > cfg.threshold)) if n_pass else float("nan")
    return AnalysisResult(
        analysis="retrieval",
        model_info=model.describe(),
        config=replace(cfg),  # the typed settings (a copy), as a saved run's ``Run.config``
        tables=tables,
        arrays={"scores": per_test.astype(np.float32)},
        seeds={"grid": cfg.seed, "masking": cfg.seed},
        timings=timings,
        notes={
            "metric": "per test: copy-paste hits (argmax key in the span and its token generated) / |span|; "
            f"head score: mean over tests with ROUGE-1 recall > {cfg.rouge_gate}; retrieval head: score > {cfg.threshold}",
            "tests": len(tests),
            "tests_passed": n_pass,
            "share_retrieval_heads": share,
            "span": cfg.span,
            "activation_frequency": "share of passing tests in which the head copy-pasted at least once",
            "masking": "heads attend uniformly (mean of visible values) at every decode step; the prefill is untouched",
            "bos": model.bos.describe(),
        },
        # With no recalled test the scores are undefined for every head (NaN by definition), which the
        # run store would otherwise take for a model that produced no number.
        nan_ok=("retrieval_score", "activation_frequency") if n_pass == 0 else (),
    )


def _masking(
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

    total = model.n_layers * model.n_heads
    conditions: list[tuple[str, int, int, float, list[tuple[int, int]]]] = []
    done: set[int] = set()
    for frac in cfg.mask_fractions:
        k = max(1, round(float(frac) * total))
        if k in done:  # two fractions can round to the same K on a small model: run it once
            continue
        done.add(k)
        top = _top_heads(scores, k)
        conditions.append(("top", k, 0, float(frac), top))
        for seed in range(cfg.mask_seeds):
            conditions.append(
                (
                    "random",
                    k,
                    seed,
                    float(frac),
                    _random_heads(model.n_layers, model.n_heads, k, set(top), cfg.seed + 1000 + seed),
                )
            )
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
        pre = prefill(model, test.prompt_ids, _max_new(cfg, test))
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
            out = greedy_decode(model, pre, _max_new(cfg, test), uniform_heads=heads, record=False, keep=True)
            recall = needles.rouge1_recall(_text(model, out.tokens), test.answer)
            rows.append(
                {
                    "test": i,
                    "kind": kind,
                    "k": k,
                    "fraction": frac,
                    "seed": seed,
                    "rouge1_recall": recall,
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


def summary(result: AnalysisResult) -> str:
    heads = result.heads
    notes = result.notes
    cfg: RetrievalConfig = result.config
    lines = [
        f"retrieval heads of {result.model_info['name']}: {notes['tests_passed']}/{notes['tests']} tests passed "
        f"the ROUGE-1 gate (> {cfg.rouge_gate}); lengths {list(cfg.lengths)}, depths {list(cfg.depths)}, "
        f"{cfg.n_needles} needles",
    ]
    if notes["tests_passed"]:
        n_ret = int(heads["is_retrieval"].sum())
        lines.append(f"  heads scoring > {cfg.threshold}: {n_ret}/{len(heads)} ({n_ret / len(heads):.1%})")
        top = heads.nlargest(8, "retrieval_score")
        lines.append(
            "  top: " + ", ".join(f"L{r.layer}H{r.head} {r.retrieval_score:.2f}" for r in top.itertuples())
        )
    if "masking" in result.tables:
        curve = masking_curve(result.tables["masking"])
        for row in curve.itertuples():
            lines.append(
                f"  mask {row.kind:<6} K={row.k:<4} recall {row.recall:.3f} (sd {row.recall_sd:.3f}) recalled {row.recalled:.0%}"
            )
    return "\n".join(lines)


ANALYSIS = register(
    Analysis(
        name="retrieval",
        config_cls=RetrievalConfig,
        run=run_retrieval,
        summary=summary,
        help="Retrieval heads on needle-in-a-haystack tests: scores, recall, top-K vs random-K masking.",
        page="dashboard.retrieval.page:RetrievalPage",
        report="dashboard.retrieval.report:report_sections",
        docs="docs/analyses/retrieval.md",
        # a small needle grid (each test is a prefill plus a short greedy decode) and the masking
        # experiment on a few tests
        demo={
            "lengths": (512, 1024),
            "depths": (0.0, 0.5, 1.0),
            "n_needles": 1,
            "mask_fractions": (0.02, 0.05),
            "mask_seeds": 2,
            "mask_tests": 3,
        },
    )
)
