"""ACT: sink detection and calibration on hand-built patterns, the edit on tiny models (other heads,
padding, batched head search), config errors, the run end to end (tiny and real model), the CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from analyses import act, runstore, validation
from analyses.act import (
    MEASURES,
    ActConfig,
    Calibration,
    ChoiceScorer,
    calibrate_heads,
    calibrate_pattern,
    column_importance,
    detect_sinks,
    heldout,
    keep_heads,
    margins,
    paired_difference,
    run_act,
    search_heads,
)
from analyses.base import config_from_overrides
from analyses.registry import ANALYSES
from analyses.tasks import choice
from probe.errors import ConfigError
from probe.hooks import attn_hook, hooks
from probe.loading import LoadedModel
from tests.conftest import fixed_revision

# ------------------------------------------------------------------------------ hand-built patterns

# One head, T = 5, causal. alpha = [0.66, 0.08, 0.3833, 0.075, 0.08]: with alpha > 0.1 the sinks are
# {0, 2}; 0 is the first detected sink (kept), 2 the hidden one (calibrated).
HAND = torch.tensor(
    [
        [1.00, 0.00, 0.00, 0.00, 0.00],
        [0.80, 0.20, 0.00, 0.00, 0.00],
        [0.55, 0.05, 0.40, 0.00, 0.00],
        [0.45, 0.05, 0.40, 0.10, 0.00],
        [0.50, 0.02, 0.35, 0.05, 0.08],
    ],
    dtype=torch.float64,
)


def _hand_expected(beta: float = 0.4, first_sink: str = "share") -> torch.Tensor:
    """Row by row: sink column 2 keeps beta of its weight, the rest is spread over the other keys:
    the non-sink keys 1, 3, 4 ("frozen": column 0, the first sink, untouched), or every key but 2
    ("share": the official code's ratios include column 0)."""
    out = HAND.clone()
    for i in (2, 3, 4):
        sink = HAND[i, 2].item()
        first = HAND[i, 0].item() if first_sink == "frozen" else 0.0
        others = HAND[i].sum().item() - sink - first
        gain = 1 + (1 - beta) * sink / others
        out[i] = HAND[i] * gain
        out[i, 2] = beta * sink
        if first_sink == "frozen":
            out[i, 0] = HAND[i, 0]
    return out


def test_column_importance_of_the_hand_pattern_counts_real_tokens_only() -> None:
    alpha = column_importance(HAND[None], torch.tensor([5]))[0]
    assert alpha.tolist() == pytest.approx([3.3 / 5, 0.32 / 4, 1.15 / 3, 0.15 / 2, 0.08])
    # left-padded by 3: junk in the pad rows, zeros in the pad columns of real rows
    padded = torch.full((8, 8), 0.125, dtype=torch.float64)
    padded[3:, :3] = 0.0
    padded[3:, 3:] = HAND
    alpha_pad = column_importance(padded[None], torch.tensor([5]))[0]
    assert torch.isnan(alpha_pad[:3]).all()
    assert torch.allclose(alpha_pad[3:].double(), alpha.double())


def test_calibration_of_the_hand_pattern_equals_the_hand_computation() -> None:
    first, hidden = detect_sinks(column_importance(HAND[None], torch.tensor([5])), torch.tensor([5]))
    assert first[0].tolist() == [True, False, False, False, False]
    assert hidden[0].tolist() == [False, False, True, False, False]
    out = calibrate_pattern(HAND[None], torch.tensor([5]), beta=0.4, first_sink="frozen")[0]
    expected = _hand_expected(0.4, "frozen")
    assert torch.allclose(out, expected, atol=1e-12)
    # the numbers, written out for row 3: [0.45, 0.05, 0.4, 0.1] -> sink 0.16, the 0.24 removed goes
    # to keys 1 and 3 (mass 0.15, x 2.6); the first sink's 0.45 is untouched
    assert out[3].tolist() == pytest.approx([0.45, 0.13, 0.16, 0.26, 0.0])
    assert torch.equal(out[:, 0], HAND[:, 0])
    # the official code's variant: the first sink takes its proportional share (others x 1.4)
    share = calibrate_pattern(HAND[None], torch.tensor([5]), beta=0.4, first_sink="share")[0]
    assert torch.allclose(share, _hand_expected(0.4, "share"), atol=1e-12)
    assert share[3].tolist() == pytest.approx([0.63, 0.07, 0.16, 0.14, 0.0])
    assert torch.allclose(share.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    assert torch.equal(out[:2], HAND[:2])  # rows that give the hidden sink nothing: unchanged
    assert torch.allclose(out.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    # beta = 1 is the identity, beta = 0 removes the hidden sink entirely (both variants)
    variants: tuple[act.FirstSink, ...] = ("share", "frozen")
    for variant in variants:
        one = calibrate_pattern(HAND[None], torch.tensor([5]), beta=1.0, first_sink=variant)[0]
        zero = calibrate_pattern(HAND[None], torch.tensor([5]), beta=0.0, first_sink=variant)[0]
        assert torch.allclose(one, HAND) and (zero[:, 2] == 0).all()


def test_the_default_is_the_official_share_variant() -> None:
    """The published numbers come from the official code, where the first sink takes back its share:
    that is the default everywhere (config, Calibration, calibrate_pattern); "frozen" only by name."""
    assert ActConfig().first_sink == "share" and ActConfig().calibration().first_sink == "share"
    assert Calibration().first_sink == "share"
    out = calibrate_pattern(HAND[None], torch.tensor([5]))[0]  # defaults: beta 0.4, alpha > 0.1
    g = 1 + 0.6 * 0.35 / 0.65  # row 4: the removed 0.21 spread over the 0.65 outside column 2
    expected = torch.tensor(
        [
            [1.00, 0.00, 0.00, 0.00, 0.00],
            [0.80, 0.20, 0.00, 0.00, 0.00],  # no weight on the hidden sink: unchanged
            [0.77, 0.07, 0.16, 0.00, 0.00],  # 0.24 removed, over the 0.6 outside column 2: x 1.4
            [0.63, 0.07, 0.16, 0.14, 0.00],  # the same: x 1.4, the first sink included
            [0.50 * g, 0.02 * g, 0.14, 0.05 * g, 0.08 * g],
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-6)
    # what the hidden-sink column loses, row by row, the other keys gain: the first sink its share
    lost = HAND[:, 2] - out[:, 2]
    gained = out - HAND
    assert lost.tolist() == pytest.approx([0.0, 0.0, 0.24, 0.24, 0.21], abs=1e-6)
    assert gained[:, 0].tolist() == pytest.approx([0.0, 0.0, 0.22, 0.18, 0.5 * 0.21 / 0.65], abs=1e-6)
    assert torch.allclose(gained[:, [0, 1, 3, 4]].sum(-1), lost, rtol=0, atol=1e-6)
    assert gained[:, 0].sum() > gained[:, [1, 3, 4]].sum()  # the first sink takes back most of it
    # the run's config gives the same edit; "frozen" asked for by name leaves column 0 bit-exact
    assert torch.equal(ActConfig().calibration().apply(HAND[None], torch.tensor([5]))[0], out)
    frozen = calibrate_pattern(HAND[None], torch.tensor([5]), first_sink="frozen")[0]
    assert torch.equal(frozen[:, 0], HAND[:, 0]) and not torch.equal(out[:, 0], HAND[:, 0])
    with pytest.raises(ConfigError, match="first_sink"):
        calibrate_pattern(HAND[None], torch.tensor([5]), first_sink="drop")  # type: ignore[arg-type]


def test_both_threshold_forms() -> None:
    lengths = torch.tensor([5])
    # ratio a / T: a = 1.5 gives 0.3 -> sinks {0, 2}, the same edit as alpha > 0.1
    ratio = calibrate_pattern(HAND[None], lengths, threshold="ratio", ratio_a=1.5)[0]
    assert torch.allclose(ratio, _hand_expected(), atol=1e-12)
    # a = 2.5 gives 0.5: only position 0 is a sink, and it is the first one: nothing changes
    assert torch.equal(calibrate_pattern(HAND[None], lengths, threshold="ratio", ratio_a=2.5)[0], HAND)
    # alpha > 0.5: the same
    assert torch.equal(calibrate_pattern(HAND[None], lengths, alpha_threshold=0.5)[0], HAND)
    # the ratio threshold follows each row's real length: a = 1.5 on a row of real length 10 is 0.15
    _, hidden = detect_sinks(
        torch.tensor([[0.9, 0.2, 0.1], [0.9, 0.2, 0.1]]),
        torch.tensor([3, 10]),
        threshold="ratio",
        ratio_a=1.5,
    )
    assert hidden.tolist() == [[False, False, False], [False, True, False]]
    with pytest.raises(ConfigError, match="threshold"):
        detect_sinks(torch.zeros(1, 3), torch.tensor([3]), threshold="median")  # type: ignore[arg-type]


def test_first_sink_is_never_damped_even_when_it_is_not_position_zero() -> None:
    # position 0 barely attended (but alpha_0 >= 1/T always: row 0 is [1, 0, ...]); with alpha > 0.25
    # the first detected sink is position 1 (alpha 0.61), the hidden one position 3 (alpha 0.39)
    A = torch.zeros(6, 6, dtype=torch.float64)
    A[0, 0] = 1.0
    A[1, :2] = torch.tensor([0.1, 0.9])
    A[2, :3] = torch.tensor([0.02, 0.7, 0.28])
    for i in range(3, 6):
        A[i, : i + 1] = torch.full((i + 1,), 0.04, dtype=torch.float64)
        A[i, 1], A[i, 3] = 0.5, 0.4
        A[i] /= A[i].sum()
    first, hidden = Calibration(alpha_threshold=0.25).sinks(A[None], torch.tensor([6]))
    assert first[0].nonzero().ravel().tolist() == [1]
    assert hidden[0].nonzero().ravel().tolist() == [3]
    out = calibrate_pattern(A[None], torch.tensor([6]), alpha_threshold=0.25, first_sink="frozen")[0]
    assert torch.equal(out[:, 1], A[:, 1])  # "frozen": the first sink's column is never touched
    shared = calibrate_pattern(A[None], torch.tensor([6]), alpha_threshold=0.25, first_sink="share")[0]
    assert (shared[:, 1] >= A[:, 1]).all() and (shared[3:, 1] > A[3:, 1]).all()  # "share": it only receives
    assert torch.allclose(out[3:, 3], 0.4 * A[3:, 3])
    # a row whose attention is all on hidden sinks has nothing to give to: left unchanged
    B = A.clone()
    B[5] = 0.0
    B[5, 3] = 1.0
    out_b = calibrate_pattern(B[None], torch.tensor([6]), alpha_threshold=0.25)[0]
    assert torch.equal(out_b[5], B[5]) and not torch.equal(out_b[4], B[4])


def _random_padded(lengths: list[int], heads: int = 2, seed: int = 0) -> torch.Tensor:
    """[B, heads, T, T] causal softmax patterns, left-padded, with junk in the pad rows."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    out = torch.full((len(lengths), heads, T, T), 1.0 / T)
    for b, n in enumerate(lengths):
        scores = torch.randn(heads, n, n, generator=gen) * 3
        scores[..., 0] += 3.0  # a first-token sink
        scores[..., n // 2] += 2.0  # and a hidden one
        scores = scores.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
        out[b, :, T - n :, : T - n] = 0.0
        out[b, :, T - n :, T - n :] = torch.softmax(scores, -1)
    return out


@pytest.mark.parametrize("variant", ["share", "frozen"])
def test_rows_keep_their_sum_and_zeros_stay_zero_in_a_padded_batch(variant: Any) -> None:
    lengths = [9, 4, 7]
    A = _random_padded(lengths)
    L = torch.tensor(lengths)
    out = calibrate_pattern(A, L, alpha_threshold=0.1, first_sink=variant)
    first, hidden = Calibration(alpha_threshold=0.1).sinks(A, L)
    assert hidden.any()  # the test has something to calibrate
    assert not torch.allclose(out, A)
    T = A.shape[-1]
    for b, n in enumerate(lengths):
        real = slice(T - n, T)
        assert torch.allclose(out[b, :, real].sum(-1), torch.ones(2, n), atol=1e-6)
        assert torch.equal(out[b, :, : T - n], A[b, :, : T - n])  # pad rows untouched (junk kept)
    assert (out[A == 0] == 0).all()  # causal and padding zeros stay exactly zero
    assert torch.equal(torch.isnan(column_importance(A, L)), torch.isnan(column_importance(out, L)))
    # hidden sinks are damped to beta in every real row, the first sink never
    col = hidden.unsqueeze(-2).expand_as(A)
    touched = col & (A > 0) & (out != A)
    assert torch.allclose(out[touched], 0.4 * A[touched])
    first_col = first.unsqueeze(-2).expand_as(A)
    if variant == "frozen":
        assert torch.equal(out[first_col], A[first_col])  # the first sink: never touched
    else:  # it only receives, and does receive where a row gave up weight on a hidden sink
        assert (out[first_col] >= A[first_col]).all() and (out[first_col] > A[first_col]).any()


def test_row_mask_edits_only_the_chosen_batch_rows() -> None:
    A = _random_padded([8, 8, 8], heads=1)[:, 0]
    L = torch.tensor([8, 8, 8])
    full = calibrate_pattern(A, L)
    part = calibrate_pattern(A, L, rows=torch.tensor([False, True, False]))
    assert torch.equal(part[0], A[0]) and torch.equal(part[2], A[2])
    assert torch.equal(part[1], full[1]) and not torch.equal(full[1], A[1])


def test_calibration_keeps_the_pattern_dtype() -> None:
    A = _random_padded([6], heads=1)[:, 0].to(torch.bfloat16)
    out = calibrate_pattern(A, torch.tensor([6]))
    assert out.dtype == torch.bfloat16 and out.shape == A.shape


# ------------------------------------------------------------------------------ on tiny models


def _items(n: int = 3) -> list[choice.ChoiceItem]:
    return choice.make_task("sentiment", n, seed=0) + choice.make_task("larger_number", n, seed=0)


LOW = Calibration(alpha_threshold=0.05)  # tiny random models: a lower threshold finds hidden sinks


def _patterns(
    model: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, layers: list[int]
) -> dict[int, torch.Tensor]:
    got: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def fn(pattern: torch.Tensor, hook: Any) -> None:
            got[layer] = pattern.detach().clone()

        return fn

    bridge: Any = model.bridge
    with hooks(model, [(attn_hook(layer, "pattern"), keep(layer)) for layer in layers]), torch.no_grad():
        bridge(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    return got


def test_calibrate_heads_edits_one_head_and_leaves_the_others(tiny_model: LoadedModel) -> None:
    batch = tiny_model.encode(["The film was really dull and slow.", "A tiny model reads bytes."])
    ids, mask = batch.input_ids, batch.attention_mask
    plain = _patterns(tiny_model, ids, mask, [0, 1])
    with calibrate_heads(tiny_model, [(1, 2)], batch.lengths, LOW):
        edited = _patterns(tiny_model, ids, mask, [0, 1])  # hooks added inside see the edit
    assert torch.equal(edited[0], plain[0])  # an earlier layer: untouched
    for h in (0, 1, 3):
        assert torch.equal(edited[1][:, h], plain[1][:, h])
    expected = LOW.apply(plain[1][:, 2], batch.lengths)
    assert torch.allclose(edited[1][:, 2], expected, atol=1e-6)
    assert not torch.allclose(edited[1][:, 2], plain[1][:, 2])  # it did something
    assert tiny_model.bridge is not None
    assert not any(point.has_hooks() for point in tiny_model.bridge.hook_dict.values())


def test_uncalibrated_scorer_matches_choice_logprobs(tiny_model: LoadedModel) -> None:
    items = _items()
    ours = ChoiceScorer(tiny_model, items, batch_size=4).logprobs()[0]
    ref = choice.choice_logprobs(tiny_model, items, batch_size=4, progress=False)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    mc = items[3:]  # byte tokens: " negative" and " positive" both end in "e"; " A" and " B" do not
    last = ChoiceScorer(tiny_model, mc, batch_size=4, choice_token="last").logprobs()[0]
    ref_last = choice.choice_logprobs(tiny_model, mc, batch_size=4, choice_token="last", progress=False)
    np.testing.assert_allclose(last, ref_last, atol=1e-4)


def test_an_item_alone_and_left_padded_gets_the_same_calibrated_scores(tiny_llama: LoadedModel) -> None:
    items = _items()  # sentiment prompts are longer than larger_number ones: padding in the batch
    heads = [(layer, h) for layer in range(3) for h in range(4)]
    batched = ChoiceScorer(tiny_llama, items, batch_size=len(items))
    lengths = {int(n) for n in batched.chunks[0].lengths}
    assert len(lengths) > 1  # really padded
    together = batched.logprobs([heads], LOW)[0]
    for i in (0, len(items) - 1):
        alone = ChoiceScorer(tiny_llama, items[i : i + 1], batch_size=1).logprobs([heads], LOW)[0]
        np.testing.assert_allclose(alone[0], together[i], atol=1e-4)
    plain = batched.logprobs()[0]
    assert np.abs(plain - together).max() > 1e-3  # the calibration changed the scores


def test_batched_head_search_equals_one_head_per_forward(tiny_llama: LoadedModel) -> None:
    items = _items(4)
    labels = np.array([item.label for item in items])
    scorer = ChoiceScorer(tiny_llama, items, batch_size=3)  # several chunks
    heads = [(layer, h) for layer in range(3) for h in range(4)]
    batched = search_heads(scorer, heads, LOW, heads_per_pass=5, progress=False)  # 5 + 5 + 2
    sequential = search_heads(scorer, heads, LOW, heads_per_pass=1, progress=False)
    np.testing.assert_allclose(batched, sequential, atol=1e-5)
    acc_b = (choice.predictions(batched.reshape(-1, 2)).reshape(len(heads), -1) == labels).mean(1)
    acc_s = (choice.predictions(sequential.reshape(-1, 2)).reshape(len(heads), -1) == labels).mean(1)
    assert np.array_equal(acc_b, acc_s)
    one = scorer.logprobs([[heads[7]]], LOW)[0]
    np.testing.assert_allclose(batched[7], one, atol=1e-5)
    base = scorer.logprobs()[0]
    assert max(np.abs(batched[j] - base).max() for j in range(len(heads))) > 1e-3


# ------------------------------------------------------------------------------ keep rules, validation

# Per calibration item (rows), the margin change of calibrating each head alone (columns): A rises
# clearly, B is noise around zero, C falls, D does nothing, E rises a little (one-sided p = 0.029).
DELTAS = np.array(
    [
        [1.00, 0.5, -1.0, 0.0, 0.6],
        [1.10, -0.4, -0.9, 0.0, -0.1],
        [0.90, 0.6, -1.1, 0.0, 0.5],
        [1.00, -0.5, -1.0, 0.0, 0.4],
        [1.05, 0.3, -1.2, 0.0, 0.1],
        [0.95, -0.2, -0.8, 0.0, 0.3],
        [1.02, 0.1, -1.0, 0.0, 0.2],
        [0.98, -0.3, -1.0, 0.0, -0.2],
    ]
)


def test_keep_rules_on_hand_built_deltas() -> None:
    n_items = DELTAS.shape[0]
    base_margin = np.linspace(-0.5, 2.0, n_items)
    base_correct = base_margin > 0  # 6 of 8 right
    search_margin = (base_margin[:, None] + DELTAS).T  # [n_heads, n_items]
    search_correct = search_margin > 0  # A: 8, B: 6, C: 3, D: 6, E: 7 right
    args = (base_correct, search_correct, base_margin, search_margin, 0.05)
    sig = keep_heads("significant", *args)
    np.testing.assert_allclose(sig.margin_delta, DELTAS.mean(0))
    np.testing.assert_allclose(sig.acc_delta, np.array([8, 6, 3, 6, 7]) / 8 - 6 / 8)
    assert sig.p_value[0] < 1e-8 and sig.p_value[4] == pytest.approx(0.0292, abs=1e-3)
    assert sig.p_value[3] == 1.0 and sig.p_value[2] > 0.99  # no change, and a fall: no evidence
    # Benjamini-Hochberg over 5 heads: E's 0.029 is above its rank's 2/5 * 0.05 = 0.02, so only A
    assert sig.kept.tolist() == [True, False, False, False, False]
    # over A and E alone, E's rank-2 threshold is 0.05: both pass
    pair = keep_heads(
        "significant", base_correct, search_correct[[0, 4]], base_margin, search_margin[[0, 4]], 0.05
    )
    assert pair.kept.tolist() == [True, True]
    # the accuracy rules ignore the margins: heads that do not lower (or that raise) accuracy
    assert keep_heads("not_lower", *args).kept.tolist() == [True, True, False, True, True]
    assert keep_heads("raise", *args).kept.tolist() == [True, False, False, False, True]
    np.testing.assert_allclose(keep_heads("not_lower", *args).p_value, sig.p_value)


def _scope_items(model: LoadedModel, kept: list[tuple[int, int]]) -> heldout.ScopeItems:
    items = choice.make_task("sentiment", 8, seed=3)
    scorer = ChoiceScorer(model, items, batch_size=4)
    return heldout.ScopeItems(
        scope="sentiment",
        tasks=["sentiment"],
        items=items,
        labels=np.array([item.label for item in items]),
        before=scorer.logprobs()[0],
        after=scorer.logprobs([kept], LOW)[0],
    )


def test_validation_of_a_kept_set_on_a_tiny_model(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_range = [(layer, h) for layer in (1, 2) for h in range(4)]
    kept = [(1, 0), (2, 1)]
    s = _scope_items(tiny_llama, kept)
    seen: list[list[tuple[int, int]]] = []
    real = heldout.null_effects

    def spy(model: LoadedModel, items: heldout.ScopeItems, sets: Any, *args: Any, **kwargs: Any) -> Any:
        seen.extend([list(h) for h in sets])
        return real(model, items, sets, *args, **kwargs)

    monkeypatch.setattr(heldout, "null_effects", spy)
    kwargs: dict[str, Any] = {
        "n_null": 50,
        "significance": 0.05,
        "seed": 0,
        "n_boot": 200,
        "batch_size": 4,
        "choice_token": "first",
    }
    rows = heldout.validate_scope(tiny_llama, s, kept, in_range, LOW, sets_per_pass=4, **kwargs)
    # the null: every 2-head set of the 6 in-range heads outside the kept ones (15 < 50: exact)
    assert len(seen) == math.comb(6, 2) == len({tuple(x) for x in seen})
    assert all(len(x) == 2 and not set(x) & set(kept) and set(x) <= set(in_range) for x in seen)
    table = validation.frame(rows, extra=heldout.VALIDATION_EXTRA)
    assert list(table["measure"]) == list(MEASURES) and (table["n_null"] == 15).all()
    assert (table["head_search"] == "sentiment").all() and (table["role"] == "kept").all()
    assert (table["heads"] == "L1H0 L2H1").all() and (table["n_inputs"] == 8).all()
    margin, correct = table.iloc[0], table.iloc[1]
    effect = margins(s.after, s.labels) - margins(s.before, s.labels)
    assert margin["effect"] == pytest.approx(effect.mean()) and abs(margin["effect"]) > 1e-4
    right = lambda logp: (choice.predictions(logp) == s.labels).astype(float)  # noqa: E731
    assert correct["effect"] == pytest.approx((right(s.after) - right(s.before)).mean())
    # the null mean is the mean over sets of each set's own held-out effect, set by set
    scorer = ChoiceScorer(tiny_llama, s.items, batch_size=4)
    own = [
        (margins(scorer.logprobs([x], LOW)[0], s.labels) - margins(s.before, s.labels)).mean() for x in seen
    ]
    assert margin["null_mean"] == pytest.approx(np.mean(own), abs=1e-5)
    beaten = np.mean(np.array(own) < margin["effect"]) + 0.5 * np.mean(np.array(own) == margin["effect"])
    assert margin["percentile"] == pytest.approx(100 * beaten, abs=1e-6)
    # one set per pass gives the same null
    seen.clear()
    again = heldout.validate_scope(tiny_llama, s, kept, in_range, LOW, sets_per_pass=1, **kwargs)
    assert again[0]["null_mean"] == pytest.approx(margin["null_mean"], abs=1e-5)
    # a set larger than the heads outside it: no null, reported and not validated
    big = in_range[:5]
    rows = heldout.validate_scope(
        tiny_llama, _scope_items(tiny_llama, big), big, in_range, LOW, sets_per_pass=4, **kwargs
    )
    assert [r["n_null"] for r in rows] == [0, 0] and not any(r["validated"] for r in rows)
    assert all(math.isnan(r["p_value"]) for r in rows)
    why = heldout.null_missing(validation.frame(rows, extra=heldout.VALIDATION_EXTRA), len(in_range))
    assert why == [
        "sentiment: 5 heads kept, only 3 in-range heads outside them, so no null set of that size can be drawn"
    ]
    assert heldout.validate_scope(tiny_llama, s, [], in_range, LOW, sets_per_pass=4, **kwargs) == []


def test_paired_difference_and_margins() -> None:
    assert paired_difference(np.zeros(10), np.ones(10)) == (1.0, 1.0, 1.0)
    before = np.array([1, 0, 1, 0, 1, 1, 0, 0] * 5)
    after = np.array([1, 1, 1, 0, 1, 1, 0, 1] * 5)
    d, low, high = paired_difference(before, after, n_boot=500, seed=1)
    assert d == pytest.approx(0.25) and 0.0 < low < d < high <= 0.5
    with pytest.raises(ConfigError):
        paired_difference(np.zeros(3), np.zeros(4))
    logp = np.array([[-1.0, -2.0, np.nan], [-3.0, -0.5, -1.0]])
    assert act.margins(logp, np.array([0, 2])).tolist() == pytest.approx([1.0, -0.5])


# ------------------------------------------------------------------------------ config


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    cfg = config_from_overrides(
        ActConfig, ["beta=0.5", "tasks=sentiment,topic", "filter=pooled", "layer_end=none", "threshold=ratio"]
    )
    assert cfg.beta == 0.5 and cfg.tasks == ("sentiment", "topic") and cfg.filter == "pooled"
    assert cfg.layer_end is None and cfg.threshold == "ratio"
    assert ActConfig().tasks == tuple(choice.TASKS) and ActConfig().layer_start == 2
    assert ActConfig().keep == "significant" and ActConfig().n_null == 50
    for bad, match in [
        (["beta=1.5"], "beta"),
        (["beta=-0.1"], "beta"),
        (["alpha_threshold=0"], "alpha_threshold"),
        (["ratio_a=0"], "ratio_a"),
        (["tasks=sentimnt"], "Did you mean 'sentiment'"),
        (["tasks=topic,topic"], "twice"),
        (["tasks="], "no tasks"),
        (["threshold=median"], "alpha, ratio"),
        (["filter=best"], "task, kind, pooled, none"),
        (["keep=maybe"], "significant"),
        (["significance=0"], "significance"),
        (["significance=1.5"], "significance"),
        (["n_null=10"], "at least 50"),
        (["first_sink=drop"], "frozen"),
        (["heads_per_pass=0"], "heads_per_pass"),
        (["n_calibration=0"], "n_calibration"),
        (["layer_start=-1"], "layer_start"),
        (["layer_start=4", "layer_end=3"], "layer_end"),
        (["n_heldout=100000", "tasks=sentiment,topic"], "lower them"),
        ([f"jsonl={tmp_path / 'missing.jsonl'}"], "does not exist"),
        (["colour=red"], "valid:"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config_from_overrides(ActConfig, bad)
    with pytest.raises(ConfigError, match="selects no layer"):
        act.resolve_layers(ActConfig(), 3)  # layers 2..-1 of a 3-layer model: none
    assert act.resolve_layers(ActConfig(), 30) == range(2, 29)
    assert act.resolve_layers(ActConfig(layer_start=0, layer_end=None), 3) == range(0, 3)


def test_tasks_are_split_disjointly_and_a_user_file_joins(tmp_path: Path) -> None:
    path = choice.write_jsonl(
        [
            choice.ChoiceItem(
                f"Is {i} even? Answer:", (" no", " yes"), int(i % 2 == 0), "parity", "classification"
            )
            for i in range(10)
        ],
        tmp_path / "parity.jsonl",
    )
    cfg = ActConfig(tasks=("sentiment",), jsonl=str(path), n_calibration=5, n_heldout=7)
    tasks, notes = act.load_tasks(cfg)
    assert [t.name for t in tasks] == ["sentiment", "parity"]
    sentiment, parity = tasks
    assert len(sentiment.calibration) == 5 and len(sentiment.heldout) == 7
    assert not {i.prompt for i in sentiment.calibration} & {i.prompt for i in sentiment.heldout}
    assert len(parity.calibration) + len(parity.heldout) == 10 and "parity" in notes
    again, _ = act.load_tasks(cfg)
    assert [i.prompt for i in again[0].heldout] == [i.prompt for i in sentiment.heldout]  # seeded
    clash = tmp_path / "sentiment.jsonl"
    choice.write_jsonl([choice.ChoiceItem("x", (" a", " b"), 0, "sentiment", "classification")] * 2, clash)
    with pytest.raises(ConfigError, match="rename"):
        act.load_tasks(ActConfig(tasks=("sentiment",), jsonl=str(clash), n_calibration=2, n_heldout=2))


# ------------------------------------------------------------------------------ the run

SMALL = ActConfig(
    tasks=("sentiment", "larger_number"),
    n_calibration=6,
    n_heldout=5,
    layer_start=1,
    layer_end=None,
    alpha_threshold=0.05,
    heads_per_pass=3,
    batch_size=4,
    n_boot=200,
    keep="not_lower",
)


def _check_schema(result: Any, model: LoadedModel) -> None:
    assert list(result.tables["heads"].columns) == list(act.HEADS_COLUMNS)
    assert list(result.tables["filter"].columns) == list(act.FILTER_COLUMNS)
    assert list(result.tables["tasks"].columns) == list(act.TASKS_COLUMNS)
    assert list(result.tables["items"].columns) == list(act.ITEMS_COLUMNS)
    assert list(result.tables["sink_tokens"].columns) == list(act.SINK_TOKENS_COLUMNS)
    assert list(result.tables["validation"].columns) == list(act.VALIDATION_COLUMNS)
    _check_validation(result)
    heads = result.tables["heads"]
    assert len(heads) == model.n_layers * model.n_heads
    assert heads["in_range"].dtype == bool and heads["n_tasks_kept"].dtype == np.int64
    assert heads["first_sink_pos"].dtype == np.int64
    assert (heads["kv_head"] == heads["head"] // model.group_size).all()


def _check_validation(result: Any) -> None:
    """Each scope's kept set is tested (one row per measure) against a null drawn outside it, and
    each head carries the evidence of the sets that kept it."""
    cfg, checks, heads = result.config, result.tables["validation"], result.tables["heads"]
    kept_sets = {
        str(scope): [(int(r.layer), int(r.head)) for r in part[part["kept"]].itertuples()]
        for scope, part in result.tables["filter"].groupby("scope")
    } or {"all": [(int(r.layer), int(r.head)) for r in heads[heads["in_range"]].itertuples()]}
    tested = {scope: sets for scope, sets in kept_sets.items() if sets}
    assert sorted(set(checks["head_search"])) == sorted(tested)
    n_in_range = int(heads["in_range"].sum())
    for scope, kept in tested.items():
        rows = checks[checks["head_search"] == scope]
        assert list(rows["measure"]) == list(MEASURES) and (rows["role"] == "kept").all()
        assert validation.parse_heads(rows["heads"].iloc[0]) == sorted(kept)
        pool = n_in_range - len(kept)
        want = 0 if pool < len(kept) else min(cfg.n_null, math.comb(pool, len(kept)))
        assert (rows["n_null"] == want).all()
        assert (rows["effect_low"] <= rows["effect"] + 1e-12).all()
        assert (rows["effect"] <= rows["effect_high"] + 1e-12).all()
        if want == 0:
            assert not rows["validated"].any() and rows["p_value"].isna().all()
    by_head = heads.set_index(["layer", "head"])
    for (layer, h), row in by_head.iterrows():
        roles = [f"kept:{scope}" for scope, kept in tested.items() if (layer, h) in kept]
        assert sorted(filter(None, str(row["act_role"]).split("+"))) == sorted(roles)
        if roles:
            margin = checks[checks["measure"] == "margin"].set_index("head_search")
            first = row["act_role"].split("+")[0].removeprefix("kept:")
            assert row["act_effect"] == pytest.approx(float(margin.loc[first, "effect"]))
            verdicts = margin.loc[[r.removeprefix("kept:") for r in roles], "validated"]
            assert row["act_validated"] == bool(verdicts.all())
        else:
            assert not row["act_validated"] and math.isnan(row["act_effect"])


def test_run_act_on_a_tiny_model(
    tiny_llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_act(tiny_llama, SMALL, progress=False)
    _check_schema(result, tiny_llama)
    heads, filt, tasks, items = (result.tables[k] for k in ("heads", "filter", "tasks", "items"))
    L, H = tiny_llama.n_layers, tiny_llama.n_heads
    assert heads["in_range"].tolist() == [layer >= 1 for layer in range(L) for _ in range(H)]
    out = heads[~heads["in_range"]]
    assert (out["n_tasks_kept"] == 0).all() and out["mean_delta"].isna().all()
    # the filter table: one row per (task, in-range head); kept means "does not lower accuracy"
    assert len(filt) == 2 * (L - 1) * H and set(filt["scope"]) == {"sentiment", "larger_number"}
    assert (filt["kept"] == (filt["acc_calibrated"] >= filt["acc_base"])).all()
    assert np.allclose(filt["delta"], filt["acc_calibrated"] - filt["acc_base"])
    kept_count = filt[filt["kept"]].groupby(["layer", "head"]).size()
    inr = heads[heads["in_range"]].set_index(["layer", "head"])
    assert (inr["n_tasks_kept"] == kept_count.reindex(inr.index, fill_value=0)).all()
    assert np.allclose(inr["mean_delta"], filt.groupby(["layer", "head"])["delta"].mean().reindex(inr.index))
    # tasks and items agree
    assert list(tasks["task"]) == ["sentiment", "larger_number"] and (tasks["n_heldout"] == 5).all()
    assert (tasks["scope"] == tasks["task"]).all()
    assert list(tasks["n_kept"]) == [
        int(filt[(filt["scope"] == t) & filt["kept"]].shape[0]) for t in tasks["task"]
    ]
    for row in tasks.itertuples():
        part = items[items["task"] == row.task]
        assert row.acc_before == pytest.approx(part["correct_before"].mean())
        assert row.acc_after == pytest.approx(part["correct_after"].mean())
        assert row.before_low <= row.acc_before <= row.before_high
        assert row.delta_low <= row.delta <= row.delta_high
    assert (items["correct_before"] == (items["pred_before"] == items["label"])).all()
    assert ((items["margin_after"] > 0) == items["correct_after"]).all()
    assert (
        len(items) == 10
        and items.groupby("task")["item"].apply(list).map(sorted).tolist() == [list(range(5))] * 2
    )
    # sink statistics: hidden sinks found; per-head mean equals a direct count on each item alone
    assert heads["hidden_sinks"].max() > 0 and (heads["first_sink_pos"] >= 0).all()
    tasks_list, _ = act.load_tasks(SMALL)
    cal_items = [i for t in tasks_list for i in t.calibration]
    counts = []
    for item in cal_items:
        rows = choice._plan(tiny_llama.tokenizer, item, "first", 0)
        for r in rows:
            batch = tiny_llama.batch_from_ids([r.context])
            pattern = _patterns(tiny_llama, batch.input_ids, batch.attention_mask, [2])[2]
            counts.append(LOW.sinks(pattern[:, 1], batch.lengths)[1].sum().item())
    assert heads.set_index(["layer", "head"]).loc[(2, 1), "hidden_sinks"] == pytest.approx(np.mean(counts))
    tokens = result.tables["sink_tokens"]
    assert (
        len(tokens)
        and tokens["count"].is_monotonic_decreasing
        and tokens["share_of_heads"].between(0, 1).all()
    )
    text = act.summary(result)
    assert "ACT on tiny-llama" in text and "kept heads by keep=not_lower" in text
    for scope in set(result.tables["validation"]["head_search"]):
        assert any(line.strip().startswith(f"{scope} · kept [") for line in text.splitlines())
    monkeypatch.setattr(runstore, "code_revision", fixed_revision)
    run = runstore.open_run(result.save(tmp_path))
    assert run.analysis == "act" and set(result.tables) <= set(run.table_names)
    pd.testing.assert_frame_equal(run.table("filter"), filt, check_dtype=False)


def test_pooled_and_none_filters(tiny_gpt2: LoadedModel) -> None:
    cfg = ActConfig(**{**SMALL.__dict__, "filter": "pooled", "layer_start": 2})
    pooled = run_act(tiny_gpt2, cfg, progress=False)
    _check_schema(pooled, tiny_gpt2)
    filt = pooled.tables["filter"]
    assert set(filt["scope"]) == {"pooled"} and len(filt) == tiny_gpt2.n_heads
    tasks = pooled.tables["tasks"]
    assert (tasks["scope"] == "pooled").all() and (tasks["n_kept"] == int(filt["kept"].sum())).all()
    # pooled baseline = all calibration items
    assert filt["acc_base"].nunique() == 1
    assert (filt["kept"] == (filt["delta"] >= 0)).all()
    significant = run_act(tiny_gpt2, ActConfig(**{**cfg.__dict__, "keep": "significant"}), progress=False)
    _check_schema(significant, tiny_gpt2)
    sfilt = significant.tables["filter"]
    np.testing.assert_allclose(sfilt["p_value"], filt["p_value"])  # the same search, another rule
    assert (sfilt.loc[sfilt["kept"], "p_value"] <= 0.05).all() and (
        sfilt.loc[sfilt["kept"], "margin_delta"] > 0
    ).all()
    text = act.summary(significant)
    assert "keep=significant" in text
    for scope in significant.tables["tasks"].query("n_kept == 0")["scope"]:
        assert f"{scope}: no head kept, nothing to validate" in text
    strict = run_act(tiny_gpt2, ActConfig(**{**cfg.__dict__, "keep": "raise"}), progress=False)
    sfilt = strict.tables["filter"]
    assert (sfilt["kept"] == (sfilt["delta"] > 0)).all()
    np.testing.assert_allclose(sfilt["delta"], filt["delta"])  # same search, stricter rule
    by_kind = run_act(tiny_gpt2, ActConfig(**{**cfg.__dict__, "filter": "kind"}), progress=False)
    _check_schema(by_kind, tiny_gpt2)
    ktasks = by_kind.tables["tasks"]
    assert (ktasks["scope"] == ktasks["kind"]).all()  # each task gets its kind's head set
    kfilt = by_kind.tables["filter"]
    assert (
        set(kfilt["scope"]) == set(ktasks["kind"])
        and len(kfilt) == tiny_gpt2.n_heads * ktasks["kind"].nunique()
    )
    none = run_act(tiny_gpt2, ActConfig(**{**cfg.__dict__, "filter": "none"}), progress=False)
    _check_schema(none, tiny_gpt2)
    assert len(none.tables["filter"]) == 0
    heads = none.tables["heads"]
    assert (heads["n_tasks_kept"] == heads["in_range"].astype(int)).all() and heads["mean_delta"].isna().all()
    assert (none.tables["tasks"]["scope"] == "all").all() and (none.tables["tasks"]["n_kept"] == 4).all()
    # the same items and the same baseline under every filter
    pd.testing.assert_series_equal(
        pooled.tables["items"]["margin_before"], none.tables["items"]["margin_before"]
    )


def test_registry_and_cli(tmp_path: Path) -> None:
    entry = ANALYSES["act"]
    assert entry.config_cls is ActConfig and entry.run is run_act and entry.summary is act.summary
    root = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "headlab.cli",
            "run",
            "act",
            "--model",
            "tiny-llama",
            "--root",
            str(root),
            "--set",
            "tasks=sentiment",
            "--set",
            "n_calibration=4",
            "--set",
            "n_heldout=4",
            "--set",
            "layer_start=2",
            "--set",
            "layer_end=none",
            "--set",
            "heads_per_pass=4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ACT on tiny-llama" in proc.stdout and "sentiment" in proc.stdout
    runs = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1 and (runs[0] / "heads.parquet").is_file() and (runs[0] / "filter.parquet").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "headlab.cli", "run", "act", "--model", "tiny-llama", "--set", "beta=2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "beta" in bad.stderr and bad.stderr.strip().count("\n") == 0


# ------------------------------------------------------------------------------ the real model


@pytest.mark.real
def test_smollm2_act_small(smollm: LoadedModel) -> None:
    """SmolLM2-135M, 2 classification tasks, 10 calibration / 20 held-out items each, layers 10-11.

    Measured: both tasks at 1.00 before and after (the model is at its ceiling on them, so every head
    is kept); 4-8 hidden sinks per input per head; the most frequent hidden-sink tokens are ' the',
    '.', ':' and the newline. About 25 s on two CPU cores."""
    cfg = ActConfig(
        tasks=("sentiment", "topic"),
        n_calibration=10,
        n_heldout=20,
        layer_start=10,
        layer_end=12,
        keep="not_lower",
    )
    result = run_act(smollm, cfg, progress=False)
    _check_schema(result, smollm)
    heads, tasks, filt = result.tables["heads"], result.tables["tasks"], result.tables["filter"]
    assert int(heads["in_range"].sum()) == 2 * smollm.n_heads
    assert len(filt) == 2 * 2 * smollm.n_heads
    assert list(tasks["n_kept"]) == [
        int(filt[(filt["scope"] == t) & filt["kept"]].shape[0]) for t in tasks["task"]
    ]
    # the uncalibrated held-out accuracy is choice.evaluate's on the same items
    tasks_list, _ = act.load_tasks(cfg)
    for t in tasks_list:
        ref = choice.evaluate(smollm, t.heldout, progress=False)["correct"].mean()
        assert tasks.set_index("task").loc[t.name, "acc_before"] == pytest.approx(ref)
    assert (tasks["acc_before"] > tasks["chance"] + 0.2).all()  # SmolLM2 reads these tasks well
    # hidden sinks beyond the first detected one, on every in-range head
    inr = heads[heads["in_range"]]
    assert (inr["hidden_sinks"] > 1.0).all() and (inr["first_sink_pos"] >= 0).all()
    top = set(result.tables["sink_tokens"]["token"].head(5))
    assert top & {" the", ".", ":", "\n"}
    assert math.isfinite(result.timings["total"]) and result.timings["search"] > 0
