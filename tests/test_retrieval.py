"""Retrieval-head scoring: the score under both protocols on hand-built decodes, the gate, aggregation,
significance, masking, the held-out validation, end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses import runstore, validation
from analyses.registry import config_from_saved
from analyses.retrieval import (
    RetrievalConfig,
    aggregate_scores,
    copy_paste_hits,
    copy_significance,
    heldout_tests,
    masking_curve,
    retrieval_scores_for_test,
    run_retrieval,
    summary,
    validation_row,
)
from analyses.retrieval import heldout as heldout_module
from analyses.retrieval.decoding import room
from analyses.runstore import to_jsonable
from analyses.tasks import needles
from probe.errors import ConfigError
from probe.loading import LoadedModel

# A 14-token context: the needle is tokens [3, 11) = (60, 61, 62, 63, 64, 50, 51, 52), its answer
# [8, 11) = (50, 51, 52); token 50 also occurs at 1 and token 61 at 12, outside the needle.
CONTEXT = [9, 50, 10, 60, 61, 62, 63, 64, 50, 51, 52, 13, 61, 16]
NEEDLE = (3, 11)
ANSWER = (8, 11)


def test_hits_on_a_hand_built_decode() -> None:
    generated = [50, 51, 52, 99]  # copies the answer, then a token from nowhere
    # 2 layers × 3 heads; argmax key per step.
    argmax = np.zeros((4, 2, 3), dtype=np.int64)
    argmax[:, 0, 0] = [8, 9, 10, 10]  # perfect copy head: 3 hits (step 3's token 99 != 52)
    argmax[:, 0, 1] = [1, 9, 0, 0]  # step 0 points at the other 50 (outside the span): 1 hit
    argmax[:, 0, 2] = [9, 8, 10, 11]  # in the span but the wrong token at steps 0, 1: 1 hit
    argmax[:, 1, 0] = [0, 0, 0, 0]  # sink head: 0
    argmax[:, 1, 1] = [8, 8, 8, 8]  # stuck on the first answer token: 1 hit
    argmax[:, 1, 2] = [10, 10, 10, 10]  # stuck on the last: 1 hit (step 2)
    hits = copy_paste_hits(argmax, generated, CONTEXT, ANSWER)
    assert hits.sum(axis=0).tolist() == [[3, 1, 1], [0, 1, 1]]
    scores = retrieval_scores_for_test(argmax, generated, CONTEXT, ANSWER)
    np.testing.assert_allclose(scores, np.array([[3, 1, 1], [0, 1, 1]]) / 3.0)


def test_the_same_decode_scores_per_needle_token_or_per_answer_token() -> None:
    """The model reproduces the whole needle (the paper's task); head 0 copies every token from the
    needle, head 1 only the answer's three, head 2 the needle's 61 from its copy outside the needle."""
    generated = [60, 61, 62, 63, 64, 50, 51, 52]
    argmax = np.zeros((8, 1, 3), dtype=np.int64)
    argmax[:, 0, 0] = np.arange(3, 11)
    argmax[:, 0, 1] = [0, 0, 0, 0, 0, 8, 9, 10]
    argmax[:, 0, 2] = [3, 12, 5, 0, 0, 0, 0, 0]  # 60 and 62 from the needle, 61 from outside
    per_needle = retrieval_scores_for_test(argmax, generated, CONTEXT, NEEDLE)
    per_answer = retrieval_scores_for_test(argmax, generated, CONTEXT, ANSWER)
    np.testing.assert_allclose(per_needle, [[8 / 8, 3 / 8, 2 / 8]])
    np.testing.assert_allclose(per_answer, [[3 / 3, 3 / 3, 0.0]])
    # the answer protocol credits head 1's three copies as a whole test's worth; the needle protocol
    # as 3/8, and a single copied token as 1/8 = 0.125 against 1/3 of an answer
    one = np.zeros((8, 1, 1), dtype=np.int64)
    one[5, 0, 0] = 8
    assert retrieval_scores_for_test(one, generated, CONTEXT, NEEDLE)[0, 0] == pytest.approx(0.125)
    assert retrieval_scores_for_test(one, generated, CONTEXT, ANSWER)[0, 0] == pytest.approx(1 / 3)


def test_span_and_shape_errors() -> None:
    argmax = np.zeros((2, 1, 1), dtype=np.int64)
    with pytest.raises(ConfigError, match="span"):
        copy_paste_hits(argmax, [1, 2], CONTEXT, (8, 8))
    with pytest.raises(ConfigError, match="span"):
        copy_paste_hits(argmax, [1, 2], CONTEXT, (10, 20))
    with pytest.raises(ConfigError, match="one step per generated token"):
        copy_paste_hits(argmax, [1, 2, 3], CONTEXT, ANSWER)


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


def test_copy_significance_against_no_copying() -> None:
    per_test = np.zeros((6, 1, 4))
    per_test[:, 0, 0] = [0.5, 0.6, 0.4, 0.7, 0.5, 0.9]  # copies on every test
    per_test[:, 0, 1] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # never
    per_test[:, 0, 2] = [0.9, 0.0, 0.0, 0.0, 0.0, 0.0]  # once: a mean of 0.15 > 0.1, no evidence
    per_test[:, 0, 3] = [0.1, 0.12, 0.08, 0.1, 0.11, 0.09]  # a little, every time
    passed = np.array([True] * 5 + [False])  # the last test's scores do not count
    sig = copy_significance(per_test, passed)
    assert sig["copies_significantly"].tolist() == [[True, False, False, True]]
    assert sig["copy_p_value"][0, 2] > 0.1 and sig["copy_p_value"][0, 0] < 0.01
    few = copy_significance(per_test, np.array([True] + [False] * 5))
    assert np.isnan(few["copy_p_value"]).all() and not few["copies_significantly"].any()


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


def test_the_default_protocol_is_the_papers() -> None:
    cfg = RetrievalConfig()
    assert cfg.protocol == "needle" and cfg.scored_span == "needle" and cfg.span is None
    assert cfg.threshold == 0.1 and cfg.rouge_gate == 0.5 and cfg.validation and cfg.n_null >= 50
    answer = RetrievalConfig(protocol="answer")
    assert answer.scored_span == "answer"
    # a run saved before the protocol setting recorded span="answer" and ran the answer protocol
    old = to_jsonable(RetrievalConfig(lengths=(300,)))
    old.pop("protocol")
    old["span"] = "answer"
    loaded = config_from_saved(RetrievalConfig, old)
    assert loaded.protocol == "answer" and loaded.scored_span == "answer"
    # the earlier span="needle": the answer protocol's prompt, scored against the whole needle
    hybrid = RetrievalConfig(protocol="answer", span="needle")
    assert hybrid.scored_span == "needle"
    assert config_from_saved(RetrievalConfig, to_jsonable(cfg)) == cfg


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lengths", (32,), "lengths"),
        ("depths", (1.5,), "depths"),
        ("threshold", 0.0, "threshold"),
        ("rouge_gate", 1.0, "rouge_gate"),
        ("span", "sentence", "span"),
        ("protocol", "sentence", "protocol"),
        ("mask_fractions", (0.0,), "mask_fractions"),
        ("n_null", 10, "at least 50"),
        ("heldout_depths", (2.0,), "heldout_depths"),
        ("heldout_needles", 0, "heldout_needles"),
    ],
)
def test_config_errors(field: str, value: object, match: str) -> None:
    cfg = RetrievalConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=match):
        cfg.validate()
    if field.startswith(("n_null", "heldout")):
        RetrievalConfig(validation=False, **{field: value}).validate()  # type: ignore[arg-type]


def test_heldout_tests_share_no_needle_and_no_haystack_with_the_grid(tiny_llama: LoadedModel) -> None:
    cfg = RetrievalConfig(lengths=(300, 400), depths=(0.0, 1.0), n_needles=2, novel_answer_tokens=False)
    grid = needles.make_grid(
        tiny_llama, [300, 400], [0.0, 1.0], 2, seed=cfg.seed, novel_answer_tokens=False, protocol="needle"
    )
    held = heldout_tests(tiny_llama, cfg, exclude=[t.answer for t in grid])
    assert len(held) == cfg.heldout_needles * len(cfg.heldout_depths)
    assert all(t.n_tokens == 300 and t.protocol == "needle" for t in held)  # the shortest length
    assert {t.answer for t in held}.isdisjoint({t.answer for t in grid})
    assert {t.needle for t in held}.isdisjoint({t.needle for t in grid})
    assert {t.seed for t in held} == {cfg.seed + heldout_module.HELDOUT_SEED_OFFSET}

    def haystack(t: needles.NeedleTest) -> list[int]:
        return t.prompt_ids[t.haystack_span[0] : t.needle_span[0]] + t.prompt_ids[t.needle_span[1] :]

    starts = {tuple(haystack(t)[:40]) for t in grid}
    assert not starts & {tuple(haystack(t)[:40]) for t in held}  # other paragraph orders
    # the held-out draw is seeded: the same tests again
    assert [t.prompt_ids for t in held] == [
        t.prompt_ids for t in heldout_tests(tiny_llama, cfg, exclude=[t.answer for t in grid])
    ]


def test_validation_row_compares_the_recall_drop_with_the_null() -> None:
    found = [(1, 0), (2, 1)]
    base = np.array([1.0, 1.0, 0.75, 1.0])
    masked = np.array([0.0, 0.25, 0.0, 0.5])  # changes -1, -0.75, -0.75, -0.5: mean -0.75
    null = np.tile(base, (60, 1))
    null[::3, 0] -= 0.5  # a third of the random sets lose half a recall on one test
    inputs = validation.Inputs("held-out needle tests", 4)
    row = validation_row(found, base, masked, null, inputs=inputs)
    assert row["effect"] == pytest.approx(-0.75) and row["effect_high"] < 0
    assert row["null_mean"] == pytest.approx(-0.5 / 4 * 20 / 60)
    assert row["percentile"] == 100.0 and row["p_value"] == pytest.approx(1 / 61)
    assert row["validated"] and row["direction"] == "lower" and row["heads"] == "L1H0 L2H1"
    weak = validation_row(found, base, base - 0.125, null, inputs=inputs)  # no worse than the null
    assert not weak["validated"] and weak["percentile"] < 100
    nothing = validation_row(found, np.zeros(0), np.zeros(0), np.zeros((60, 0)), inputs=inputs)
    assert np.isnan(nothing["effect"]) and not nothing["validated"]


def test_heldout_masking_of_a_set_that_ruins_recall_is_validated(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real masked decodes of the tiny model; the recall is a stand-in that is 1 unless head L0H0 is
    masked, so the found set must beat every null set, which never holds L0H0."""
    real = heldout_module.answer

    def answer(model, cfg, test, prompt, *, masked=(), record=True):  # type: ignore[no-untyped-def]
        out = real(model, cfg, test, prompt, masked=masked, record=record)
        out.recall = 0.0 if (0, 0) in set(masked) else 1.0
        return out

    monkeypatch.setattr(heldout_module, "answer", answer)
    cfg = RetrievalConfig(
        lengths=(300,), heldout_depths=(0.5,), max_new_tokens=2, novel_answer_tokens=False, progress=False
    )
    held = heldout_module.run_heldout(tiny_llama, cfg, [(0, 0), (1, 2)], exclude=())
    assert len(held.tests) == 2 and held.tests["passed"].all()
    # 10 heads outside the two tested ones admit C(10, 2) = 45 < 50 distinct pairs: each once (exact)
    n_null = math.comb(tiny_llama.n_layers * tiny_llama.n_heads - 2, 2)
    assert n_null == 45 and len(held.masked) == 2 * (1 + n_null)
    nulls = held.masked[held.masked["set"] == "null"]
    assert not nulls["heads"].str.contains("L0H0").any() and not nulls["heads"].str.contains("L1H2").any()
    row = held.validation.iloc[0]
    assert list(held.validation.columns) == list(validation.COLUMNS)
    assert row["effect"] == -1.0 and row["n_inputs"] == 2 and row["n_null"] == n_null
    assert row["validated"] and row["p_value"] == pytest.approx(1 / (1 + n_null))


def test_end_to_end_on_a_tiny_model(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    cfg = RetrievalConfig(
        lengths=(300,),
        depths=(0.0, 1.0),
        n_needles=1,
        max_new_tokens=4,
        mask_fractions=(0.1,),
        mask_seeds=2,
        heldout_depths=(0.5,),
        novel_answer_tokens=False,
        progress=False,
    )
    result = run_retrieval(tiny_llama, cfg)
    tests, heads = result.tables["tests"], result.heads
    assert len(tests) == 2 and (tests["n_tokens"] == 300).all()
    # the needle protocol's reference is the whole needle sentence, ending with its answer
    assert all(r.endswith(a + ".") for r, a in zip(tests["reference"], tests["answer"], strict=True))
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
    # the validation table is there with its columns; with no retrieval head it has no row, and
    # every head carries the evidence columns, empty
    table = result.tables["validation"]
    assert list(table.columns) == list(validation.COLUMNS) and table.empty
    for column in ("role", "validated", "effect", "effect_low", "effect_high", "percentile", "p_value"):
        assert f"retrieval_{column}" in heads.columns
    assert not heads["retrieval_validated"].any() and (heads["retrieval_role"] == "").all()
    assert len(result.tables["heldout"]) == 2 and "nothing to validate" in summary(result)
    assert "protocol needle" in summary(result)
    saved = runstore.open_run(result.save(tmp_path))
    assert saved.heads["retrieval_score"].isna().all()
    assert list(saved.table("validation").columns) == list(validation.COLUMNS)
    assert saved.config == result.config


def test_real_model_copies_the_needle(smollm: LoadedModel) -> None:
    """SmolLM2 reproduces a needle at 256 tokens; the heads that copy it score, and the per-test score
    equals the hits counted from the recorded argmax by hand, over the needle's tokens."""
    cfg = RetrievalConfig(
        lengths=(256,), depths=(0.0,), n_needles=1, mask_fractions=(), validation=False, progress=False
    )
    result = run_retrieval(smollm, cfg)
    test = result.tables["tests"].iloc[0]
    assert test["passed"], f"generated {test['generated']!r} for {test['reference']!r}"
    assert test["reference"].endswith(test["answer"] + ".")
    assert int(test["span_end"]) - int(test["span_start"]) > 10  # the whole needle, not its answer
    heads = result.heads
    assert heads["retrieval_score"].max() > 0.5
    assert (heads["is_retrieval"] == (heads["retrieval_score"] > 0.1)).all()
    scores = result.arrays["scores"][0]
    np.testing.assert_allclose(heads["retrieval_score"].to_numpy(), scores.ravel(), rtol=1e-6)
    assert int(test["heads_hit"]) == int((scores > 0).sum()) > 0


def test_lengths_must_leave_room_to_decode(tiny_llama: LoadedModel) -> None:
    for protocol in ("answer", "needle"):
        cfg = RetrievalConfig(
            lengths=(tiny_llama.n_ctx,), depths=(0.5,), n_needles=1, protocol=protocol, progress=False
        )
        need = room(tiny_llama, cfg)
        assert need == 20 if protocol == "answer" else need > 40  # the needle's words, byte by byte
        with pytest.raises(ConfigError, match=f"use lengths up to {tiny_llama.n_ctx - need}"):
            run_retrieval(tiny_llama, cfg)
