"""Reducers on hand-built attention patterns with answers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from probe.reducers import (
    BatchInfo,
    ColumnImportance,
    DiagonalScore,
    KeepPatterns,
    MeanDistance,
    PatternReducer,
    RowEntropy,
)


def uniform_causal(T: int) -> torch.Tensor:
    """A[t, k] = 1/(t+1) for k <= t."""
    return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).float()[:, None]


def first_token(T: int) -> torch.Tensor:
    A = torch.zeros(T, T)
    A[:, 0] = 1.0
    return A


def previous_token(T: int) -> torch.Tensor:
    A = torch.zeros(T, T)
    A[0, 0] = 1.0
    for t in range(1, T):
        A[t, t - 1] = 1.0
    return A


def run_reducer(
    reducer: PatternReducer, heads: list[torch.Tensor], *, pad: int = 0, block: int | None = None
) -> torch.Tensor:
    """Feed one sample whose heads have patterns ``heads`` (each [T, T]), left-padded by ``pad``."""
    T = heads[0].shape[0]
    full = torch.zeros(1, len(heads), T + pad, T + pad)
    for h, A in enumerate(heads):
        full[0, h, pad:, pad:] = A
        full[0, h, :pad, :pad] = uniform_causal(pad) if pad else full[0, h, :pad, :pad]  # junk pad rows
    info = BatchInfo(
        lengths=torch.tensor([T]), pad_offsets=torch.tensor([pad]), T=T + pad, n_layers=1, n_heads=len(heads)
    )
    reducer.begin_batch(info)
    step = block or T + pad
    for q0 in range(0, T + pad, step):
        reducer.update(0, full[:, :, q0 : q0 + step], q0)
    reducer.end_batch()
    return reducer.result()[0, 0]  # [heads] or [heads, T]


def test_alpha_on_a_uniform_causal_pattern_is_the_harmonic_tail() -> None:
    T = 4
    alpha = run_reducer(ColumnImportance(), [uniform_causal(T)])[0]
    expected = [sum(1 / (t + 1) for t in range(k, T)) / (T - k) for k in range(T)]
    assert torch.allclose(alpha, torch.tensor(expected), atol=1e-6)
    assert alpha[0].item() == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


def test_alpha_of_a_sink_head_is_one_at_the_sink_and_zero_elsewhere() -> None:
    alpha = run_reducer(ColumnImportance(), [first_token(6)])[0]
    assert alpha[0].item() == 1.0 and torch.all(alpha[1:] == 0)


def test_entropy_distance_and_previous_token_of_uniform_rows() -> None:
    A = uniform_causal(4)
    assert run_reducer(RowEntropy(), [A])[0].item() == pytest.approx(
        (math.log(2) + math.log(3) + math.log(4)) / 3
    )
    assert run_reducer(MeanDistance(), [A])[0].item() == pytest.approx((0.5 + 1.0 + 1.5) / 3)
    assert run_reducer(DiagonalScore(1), [A])[0].item() == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)


def test_scores_of_a_previous_token_head_and_a_sink_head() -> None:
    prev, sink = previous_token(8), first_token(8)
    assert run_reducer(DiagonalScore(1), [prev, sink]).tolist() == pytest.approx([1.0, 1 / 7])
    assert run_reducer(RowEntropy(), [prev, sink]).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert run_reducer(MeanDistance(), [prev, sink]).tolist() == pytest.approx(
        [1.0, 4.0]
    )  # mean of t for t=1..7


def test_induction_and_duplicate_offsets_on_a_repeated_block() -> None:
    n, T = 3, 6  # block r (positions 0..2) repeated at 3..5
    ind = torch.zeros(T, T)
    dup = torch.zeros(T, T)
    for t in range(T):
        ind[t, 0] = dup[t, 0] = 1.0
    for t in range(n, T):
        ind[t] = 0
        ind[t, t - n + 1] = 1.0  # the token after the earlier occurrence
        dup[t] = 0
        dup[t, t - n] = 1.0  # the earlier occurrence itself
    induction = DiagonalScore(n - 1, query_from=n, query_to=2 * n)
    duplicate = DiagonalScore(n, query_from=n, query_to=2 * n)
    assert run_reducer(induction, [ind, dup]).tolist() == pytest.approx([1.0, 0.0])
    assert run_reducer(duplicate, [ind, dup]).tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize(
    "reducer_cls", [ColumnImportance, RowEntropy, MeanDistance, lambda: DiagonalScore(1)]
)
def test_left_padding_and_query_blocks_do_not_change_results(reducer_cls) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    T = 7
    scores = torch.randn(3, T, T).masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    heads = list(torch.softmax(scores, -1))
    base = run_reducer(reducer_cls(), heads)
    padded = run_reducer(reducer_cls(), heads, pad=3)
    blocked = run_reducer(reducer_cls(), heads, pad=2, block=2)
    assert torch.allclose(base, padded[..., : base.shape[-1]], atol=1e-6, equal_nan=True)
    assert torch.allclose(base, blocked[..., : base.shape[-1]], atol=1e-6, equal_nan=True)


def test_keep_patterns_stores_real_positions_only() -> None:
    A = previous_token(5)
    kept = run_reducer(KeepPatterns(n_samples=1), [A], pad=2, block=3)
    assert kept.shape == (1, 7, 7)  # the batch's padded width; real positions first, zeros after
    assert torch.equal(kept[0, :5, :5], A)
    assert kept[0, 5:].abs().sum() == 0 and kept[0, :, 5:].abs().sum() == 0
