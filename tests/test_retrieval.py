"""Retrieval-head scoring: the score on hand-built decodes, the gate, aggregation, masking, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses import runstore
from analyses.retrieval import (
    RetrievalConfig,
    aggregate_scores,
    copy_paste_hits,
    masking_curve,
    retrieval_scores_for_test,
    run_retrieval,
)
from probe.errors import ConfigError
from probe.loading import LoadedModel

# A 12-token context whose answer span is [5, 8) = tokens (50, 51, 52); token 50 also occurs at 1.
CONTEXT = [9, 50, 10, 11, 12, 50, 51, 52, 13, 14, 15, 16]
SPAN = (5, 8)


def test_hits_on_a_hand_built_decode() -> None:
    generated = [50, 51, 52, 99]  # copies the answer, then a token from nowhere
    # 2 layers × 3 heads; argmax key per step.
    argmax = np.zeros((4, 2, 3), dtype=np.int64)
    argmax[:, 0, 0] = [5, 6, 7, 7]  # perfect copy head: 3 hits (step 3's token 99 != 52)
    argmax[:, 0, 1] = [1, 6, 0, 0]  # step 0 points at the other 50 (outside the span): 1 hit
    argmax[:, 0, 2] = [6, 5, 7, 11]  # in the span but the wrong token at steps 0, 1: 1 hit
    argmax[:, 1, 0] = [0, 0, 0, 0]  # sink head: 0
    argmax[:, 1, 1] = [5, 5, 5, 5]  # stuck on the first answer token: 1 hit
    argmax[:, 1, 2] = [7, 7, 7, 7]  # stuck on the last: 1 hit (step 2)
    hits = copy_paste_hits(argmax, generated, CONTEXT, SPAN)
    assert hits.sum(axis=0).tolist() == [[3, 1, 1], [0, 1, 1]]
    scores = retrieval_scores_for_test(argmax, generated, CONTEXT, SPAN)
    np.testing.assert_allclose(scores, np.array([[3, 1, 1], [0, 1, 1]]) / 3.0)


def test_span_and_shape_errors() -> None:
    argmax = np.zeros((2, 1, 1), dtype=np.int64)
    with pytest.raises(ConfigError, match="span"):
        copy_paste_hits(argmax, [1, 2], CONTEXT, (8, 8))
    with pytest.raises(ConfigError, match="span"):
        copy_paste_hits(argmax, [1, 2], CONTEXT, (10, 20))
    with pytest.raises(ConfigError, match="one step per generated token"):
        copy_paste_hits(argmax, [1, 2, 3], CONTEXT, SPAN)


def test_aggregate_uses_only_tests_that_passed_the_gate() -> None:
    per_test = np.zeros((3, 1, 2))
    per_test[0] = [[1.0, 0.0]]
    per_test[1] = [[0.5, 0.3]]
    per_test[2] = [[0.0, 0.9]]  # this test failed the gate: must not count
    passed = np.array([True, True, False])
    agg = aggregate_scores(per_test, passed, threshold=0.1)
    np.testing.assert_allclose(agg["retrieval_score"], [[0.75, 0.15]])
    np.testing.assert_allclose(agg["activation_frequency"], [[1.0, 0.5]])
    assert agg["is_retrieval"].tolist() == [[1.0, 1.0]]
    agg = aggregate_scores(per_test, passed, threshold=0.2)
    assert agg["is_retrieval"].tolist() == [[1.0, 0.0]]
    none = aggregate_scores(per_test, np.zeros(3, dtype=bool))
    assert np.isnan(none["retrieval_score"]).all()


def test_masking_curve_pools_seeds() -> None:
    frame = pd.DataFrame(
        {
            "test": [0, 1, 0, 1, 0, 1, 0, 1],
            "kind": ["top", "top", "random", "random", "random", "random", "none", "none"],
            "k": [5, 5, 5, 5, 5, 5, 0, 0],
            "fraction": [0.1] * 6 + [0.0, 0.0],
            "seed": [0, 0, 0, 0, 1, 1, 0, 0],
            "rouge1_recall": [0.0, 0.5, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0],
        }
    )
    frame["recalled"] = frame["rouge1_recall"] > 0.5
    curve = masking_curve(frame).set_index(["kind", "k"])
    assert curve.loc[("top", 5), "recall"] == pytest.approx(0.25)
    assert curve.loc[("random", 5), "recall"] == pytest.approx(0.875)  # seeds 1.0 and 0.75
    assert curve.loc[("random", 5), "n_seeds"] == 2
    assert curve.loc[("random", 5), "recalled"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lengths", (32,), "lengths"),
        ("depths", (1.5,), "depths"),
        ("threshold", 0.0, "threshold"),
        ("rouge_gate", 1.0, "rouge_gate"),
        ("span", "sentence", "span"),
        ("mask_fractions", (0.0,), "mask_fractions"),
    ],
)
def test_config_errors(field: str, value: object, match: str) -> None:
    cfg = RetrievalConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_end_to_end_on_a_tiny_model(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    cfg = RetrievalConfig(
        lengths=(300,),
        depths=(0.0, 1.0),
        n_needles=1,
        mask_fractions=(0.1,),
        mask_seeds=2,
        novel_answer_tokens=False,
        progress=False,
    )
    result = run_retrieval(tiny_llama, cfg)
    tests, heads = result.tables["tests"], result.heads
    assert len(tests) == 2 and (tests["n_tokens"] == 300).all()
    assert len(heads) == tiny_llama.n_layers * tiny_llama.n_heads
    assert result.arrays["scores"].shape == (2, tiny_llama.n_layers, tiny_llama.n_heads)
    # A random tiny model recalls nothing: no test passes, so no head has a score.
    assert not tests["passed"].any() and heads["retrieval_score"].isna().all()
    masking = result.tables["masking"]
    k = max(1, round(0.1 * tiny_llama.n_layers * tiny_llama.n_heads))
    assert set(masking["kind"]) == {"none", "top", "random"}
    assert (masking.loc[masking["kind"] != "none", "k"] == k).all()
    assert len(masking) == 2 * (1 + 1 + 2)  # per test: none, top, 2 random seeds
    random_sets = masking.loc[masking["kind"] == "random", "heads"].unique()
    assert len(random_sets) == 2  # two seeds, two different head sets
    # Undefined scores are declared, so the run store saves the run rather than taking it for a model
    # that produced no number.
    assert result.nan_ok == ("retrieval_score", "activation_frequency")
    saved = runstore.open_run(result.save(tmp_path))
    assert saved.heads["retrieval_score"].isna().all()


def test_real_model_copies_the_needle(smollm: LoadedModel) -> None:
    """SmolLM2 recalls a needle at 256 tokens; the heads that copy it score, and the per-test score
    equals the hits counted from the recorded argmax by hand."""
    cfg = RetrievalConfig(lengths=(256,), depths=(0.0,), n_needles=1, mask_fractions=(), progress=False)
    result = run_retrieval(smollm, cfg)
    test = result.tables["tests"].iloc[0]
    assert test["passed"], f"generated {test['generated']!r} for {test['answer']!r}"
    heads = result.heads
    assert heads["retrieval_score"].max() > 0.5
    assert (heads["is_retrieval"] == (heads["retrieval_score"] > 0.1)).all()
    scores = result.arrays["scores"][0]
    np.testing.assert_allclose(heads["retrieval_score"].to_numpy(), scores.ravel(), rtol=1e-6)
    assert int(test["heads_hit"]) == int((scores > 0).sum()) > 0


def test_lengths_must_leave_room_to_decode(tiny_llama: LoadedModel) -> None:
    cfg = RetrievalConfig(
        lengths=(tiny_llama.n_ctx,), depths=(0.5,), n_needles=1, mask_fractions=(), progress=False
    )
    with pytest.raises(ConfigError, match=f"use lengths up to {tiny_llama.n_ctx - 20}"):
        run_retrieval(tiny_llama, cfg)
