"""The retrieval score: copy-paste hits per decoding step, per test, and over the tests that passed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from analyses import validation
from probe.errors import ConfigError


def copy_paste_hits(
    argmax: np.ndarray, generated: Sequence[int], context_ids: Sequence[int], span: tuple[int, int]
) -> np.ndarray:
    """Per step and head, whether the head copy-pasted: ``[steps, layers, heads]`` bool.

    ``argmax[s, l, h]`` is the key position of head (l, h)'s attention argmax at step ``s``,
    ``generated[s]`` the token produced at that step, ``context_ids`` the prompt, ``span`` the
    half-open token span ``[start, end)`` scored (the needle, or its answer) in the prompt.
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


def copy_significance(
    per_test: np.ndarray, passed: np.ndarray, alpha: float = validation.ALPHA
) -> dict[str, np.ndarray]:
    """Which heads copy significantly more than never: per head a one-sided t-test of its per-test
    scores over the passing tests against 0, Benjamini–Hochberg over all heads
    (:func:`analyses.validation.significant`).

    Returns ``copy_p_value`` (NaN with fewer than two passing tests, when nothing can be tested) and
    ``copies_significantly``, each ``[layers, heads]``.
    """
    scores = np.asarray(per_test, dtype=np.float64)
    ok = np.asarray(passed, dtype=bool)
    shape = scores.shape[1:]
    if int(ok.sum()) < 2:
        return {"copy_p_value": np.full(shape, np.nan), "copies_significantly": np.zeros(shape, dtype=bool)}
    flat = scores[ok].reshape(int(ok.sum()), -1)
    passed_test, p = validation.significant(flat, "higher", alpha)
    return {"copy_p_value": p.reshape(shape), "copies_significantly": passed_test.reshape(shape)}
