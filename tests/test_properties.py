"""Properties of the core attention metrics on random valid attention patterns (hypothesis).

The patterns are causal and row-stochastic (a softmax of random scores, some keys cut to exact zeros,
some columns made heavy so that sinks appear), alone or left-padded in a batch whose padding query
rows hold junk. Every statistic is computed by the library's own functions: the reducers of
:mod:`probe.reducers` fed attention rows in query blocks (eager capture) or moments
(:func:`probe.moments.pattern_moments` from a pattern, eager capture;
:func:`probe.moments.attention_moments` from queries and keys, recompute capture), the sink metrics of
:mod:`analyses.sinks`, and the column importance, sink detection and calibration of
:mod:`analyses.act`.

Runs are deterministic (``derandomize``, no example database) and small enough for one core.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analyses import act
from analyses.sinks import SinkReducer, sink_indicator, sink_percent, sink_share
from probe.moments import AttentionMoments, attention_moments, pattern_moments
from probe.reducers import (
    BatchInfo,
    ColumnImportance,
    DiagonalScore,
    MeanDistance,
    PatternReducer,
    RowEntropy,
    entropy_upper_bound,
)

# This module's profile: the same examples on every run (derandomized, no example database), no
# per-example deadline (the first example pays torch's warm-up), few enough examples for one core.
settings.register_profile(
    "headlab-properties",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROPERTY = settings.get_profile("headlab-properties")

MAX_T = 8
MAX_HEADS = 3
TOL = 1e-5
DIAGONALS = (1, 2, 3)

# The census reducers (probe.reducers; induction and duplicate-token as the census builds them for a
# block of 3 tokens repeated from real position 0) and the sink reducer (analyses.sinks).
REDUCERS: dict[str, Callable[[], PatternReducer]] = {
    "alpha": ColumnImportance,
    "sink": lambda: SinkReducer(eps=0.3),
    "entropy": RowEntropy,
    "mean_distance": MeanDistance,
    "prev_token": lambda: DiagonalScore(1, name="prev_token"),
    "induction": lambda: DiagonalScore(2, query_from=3, query_to=6, name="induction"),
    "duplicate_token": lambda: DiagonalScore(3, query_from=3, query_to=6, name="duplicate_token"),
}

# ------------------------------------------------------------------------------------- strategies


@st.composite
def causal_pattern(draw: st.DrawFn, heads: int, T: int) -> torch.Tensor:
    """``[heads, T, T]`` float64: causal rows summing to one, heavy columns (sinks), and keys whose
    score is drawn below -3.5 cut to exact zeros (a row always keeps its own key)."""
    scores = torch.from_numpy(draw(arrays(np.float64, (heads, T, T), elements=st.floats(-4.0, 4.0))))
    heavy = torch.from_numpy(
        draw(arrays(np.float64, (heads, 1, T), elements=st.sampled_from((0.0, 3.0, 6.0))))
    )
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool)) & (scores > -3.5)
    allowed |= torch.eye(T, dtype=torch.bool)
    return torch.softmax((scores + heavy).masked_fill(~allowed, float("-inf")), dim=-1)


@dataclass
class Padded:
    """Prompts alone (``[heads, n, n]`` each) and the same prompts left-padded in one batch."""

    prompts: list[torch.Tensor]
    batch: torch.Tensor  # [B, heads, T, T] float64; padding rows hold junk, padding keys zeros
    lengths: torch.Tensor  # [B]

    @property
    def offsets(self) -> torch.Tensor:
        return self.batch.shape[-1] - self.lengths


@st.composite
def padded_batch(draw: st.DrawFn, max_batch: int = 3) -> Padded:
    heads = draw(st.integers(1, MAX_HEADS))
    lengths = draw(st.lists(st.integers(1, MAX_T), min_size=1, max_size=max_batch))
    prompts = [draw(causal_pattern(heads, n)) for n in lengths]
    T = max(lengths)
    junk = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))  # any non-negative values will do
    batch = torch.rand((len(lengths), heads, T, T), generator=junk, dtype=torch.float64)
    for b, (n, A) in enumerate(zip(lengths, prompts, strict=True)):
        batch[b, :, T - n :] = 0.0  # real query rows never see a padding key
        batch[b, :, T - n :, T - n :] = A
    return Padded(prompts, batch, torch.tensor(lengths))


@dataclass
class QK:
    query: torch.Tensor  # [b, H, T, d] float32
    key: torch.Tensor  # [b, H_kv, T, d] float32
    lengths: torch.Tensor
    window: int | None
    block: int

    @property
    def offsets(self) -> torch.Tensor:
        return self.query.shape[2] - self.lengths


@st.composite
def queries_and_keys(draw: st.DrawFn) -> QK:
    """Post-RoPE queries and keys of a left-padded batch (junk at padding), GQA, maybe a sliding window."""
    lengths = draw(st.lists(st.integers(1, MAX_T), min_size=1, max_size=2))
    T = max(lengths)
    kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    d = draw(st.sampled_from((2, 4, 8)))
    values = st.floats(-2.0, 2.0, width=32, allow_subnormal=False)
    query = torch.from_numpy(
        draw(arrays(np.float32, (len(lengths), kv_heads * group, T, d), elements=values))
    )
    key = torch.from_numpy(draw(arrays(np.float32, (len(lengths), kv_heads, T, d), elements=values)))
    window = draw(st.none() | st.integers(1, T))
    return QK(query, key, torch.tensor(lengths), window, draw(st.integers(1, T)))


def explicit_pattern(qk: QK) -> torch.Tensor:
    """What eager attention computes: ``softmax(q kᵀ / sqrt(d) + mask)`` in float64 (``[b, H, T, T]``),
    causal, padding keys and (if any) the sliding window masked; padding query rows all zero."""
    _, H, T, d = qk.query.shape
    k = qk.key.double().repeat_interleave(H // qk.key.shape[1], dim=1)
    scores = qk.query.double() @ k.transpose(-1, -2) / math.sqrt(d)
    idx = torch.arange(T)
    allowed = idx[None, :] <= idx[:, None]
    if qk.window is not None:
        allowed &= idx[None, :] > idx[:, None] - qk.window
    real = idx[None, :] >= qk.offsets[:, None]  # [b, T]
    allowed = allowed[None] & real[:, None, :] & real[:, :, None]  # [b, q, k]
    pattern = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    return pattern.nan_to_num(0.0)  # padding queries see no key: zero rows


# --------------------------------------------------------------------------------------- helpers


def reduce(
    make: Callable[[], PatternReducer],
    pattern: torch.Tensor,
    lengths: torch.Tensor,
    *,
    block: int | None = None,
    moments: AttentionMoments | None = None,
) -> torch.Tensor:
    """One layer through a reducer as a capture drives it: rows in query blocks, or moments.
    Returns ``result()`` without the layer dimension: ``[B, H]`` or ``[B, H, T]``."""
    _, H, T, _ = pattern.shape
    reducer = make()
    reducer.begin_batch(BatchInfo(lengths=lengths, pad_offsets=T - lengths, T=T, n_layers=1, n_heads=H))
    if moments is not None:
        reducer.update_moments(0, moments)
    else:
        rows, step = pattern.float(), block or T
        for q0 in range(0, T, step):
            reducer.update(0, rows[:, :, q0 : q0 + step], q0)
    reducer.end_batch()
    return reducer.result()[:, 0]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True)


# -------------------------------------------------------------------------------- the properties


@PROPERTY
@given(padded_batch())
def test_alpha_is_a_mean_attention_and_holds_every_real_row_once(p: Padded) -> None:
    """``alpha_k`` is in [0, 1], ``alpha_0 >= 1/n``, ``sum_k alpha_k (n - k) = n`` (every real row sums
    to one), NaN exactly at padding; ACT's column importance and the census reducer agree."""
    alpha = act.column_importance(p.batch, p.lengths)  # [B, H, T] in padded columns
    reduced = reduce(ColumnImportance, p.batch, p.lengths)  # [B, H, T] in real positions, NaN after
    T = p.batch.shape[-1]
    for b, n in enumerate(p.lengths.tolist()):
        off = T - n
        assert torch.isnan(alpha[b, :, :off]).all() and not torch.isnan(alpha[b, :, off:]).any()
        real = alpha[b, :, off:]
        assert (real >= 0).all() and (real <= 1 + TOL).all()
        assert (real[:, 0] >= 1 / n - TOL).all()  # row 0 sees only position 0
        held = (real.double() * torch.arange(n, 0, -1)).sum(-1)
        assert close(held, torch.full_like(held, n))
        assert close(reduced[b, :, :n], real) and torch.isnan(reduced[b, :, n:]).all()


@PROPERTY
@given(padded_batch(), st.integers(1, MAX_T))
def test_left_padding_changes_no_statistic(p: Padded, block: int) -> None:
    """A prompt alone and the same prompt left-padded in a batch (junk in the padding rows) give the
    same per-head statistics, however the reducers are fed: every row at once, rows in query blocks,
    or moments read from the pattern."""
    moments = pattern_moments(p.batch.float(), pad_offsets=p.offsets, diag_offsets=DIAGONALS)
    for name, make in REDUCERS.items():
        together = reduce(make, p.batch, p.lengths)
        assert close(reduce(make, p.batch, p.lengths, block=block), together), name
        assert close(reduce(make, p.batch, p.lengths, moments=moments), together), name
        for b, A in enumerate(p.prompts):
            n = A.shape[-1]
            alone = reduce(make, A[None], p.lengths[b : b + 1])
            assert close(together[b : b + 1, ..., :n] if alone.dim() == 3 else together[b : b + 1], alone), (
                name
            )


@PROPERTY
@given(padded_batch(), st.floats(0.05, 0.6), st.sampled_from(act.FIRST_SINKS))
def test_left_padding_changes_no_sink_and_no_act_edit(p: Padded, eps: float, first_sink: Any) -> None:
    """Sink shares (``analyses.sinks``), ACT's sinks and ACT's calibrated pattern of a prompt are the
    same alone and left-padded in a batch; padding rows keep their junk, padding keys stay zero."""
    T = p.batch.shape[-1]
    alpha = reduce(lambda: SinkReducer(eps), p.batch, p.lengths)[:, None]  # [B, L=1, H, T]
    share = sink_share(alpha, eps)
    first, hidden = act.detect_sinks(
        act.column_importance(p.batch, p.lengths), p.lengths, alpha_threshold=eps
    )
    out = act.calibrate_pattern(p.batch, p.lengths, alpha_threshold=eps, first_sink=first_sink)
    for b, A in enumerate(p.prompts):
        n, off = A.shape[-1], T - A.shape[-1]
        one = p.lengths[b : b + 1]
        alone = reduce(lambda: SinkReducer(eps), A[None], one)[:, None]
        assert close(sink_share(alone, eps), share[b : b + 1, :n])
        assert torch.equal(out[b, :, :off], p.batch[b, :, :off]) and (out[b, :, off:, :off] == 0).all()
        assert close(
            act.calibrate_pattern(A[None], one, alpha_threshold=eps, first_sink=first_sink)[0],
            out[b, :, off:, off:],
            tol=1e-6,
        )
        if ((alone - eps).abs() > TOL).all():  # no alpha on the threshold, where rounding may decide
            assert torch.equal(sink_indicator(alone, eps), sink_indicator(alpha[b : b + 1, ..., :n], eps))
            f1, h1 = act.detect_sinks(act.column_importance(A[None], one), one, alpha_threshold=eps)
            assert torch.equal(f1[0], first[b, :, off:]) and torch.equal(h1[0], hidden[b, :, off:])


@PROPERTY
@given(queries_and_keys())
def test_recompute_from_queries_and_keys_equals_the_explicit_softmax(qk: QK) -> None:
    """Eager == recompute: the moments recomputed block by block from post-RoPE q/k equal those read
    from the explicit ``softmax(q kᵀ / sqrt(d) + mask)``, and every reducer gives the same numbers fed
    the explicit rows or the recomputed moments (to 1e-5; GQA, padding, sliding windows)."""
    pattern = explicit_pattern(qk)
    eager = pattern_moments(pattern.float(), pad_offsets=qk.offsets, diag_offsets=DIAGONALS)
    recomputed = attention_moments(
        qk.query,
        qk.key,
        pad_offsets=qk.offsets,
        sliding_window=qk.window,
        diag_offsets=DIAGONALS,
        block=qk.block,
    )
    for field in ("entropy", "mean_key", "colsum"):
        assert close(getattr(recomputed, field), getattr(eager, field)), field
    for o in DIAGONALS:
        assert close(recomputed.diag(o), eager.diag(o)), o
    held = recomputed.colsum.sum(-1)  # each real query row sums to one: the columns hold n rows
    assert close(held, qk.lengths[:, None].expand_as(held).float())
    for name, make in REDUCERS.items():
        rows = reduce(make, pattern, qk.lengths, block=qk.block)
        assert close(reduce(make, pattern, qk.lengths, moments=recomputed), rows), name


@PROPERTY
@given(queries_and_keys())
def test_recompute_is_left_padding_invariant(qk: QK) -> None:
    """The moments of a prompt's q/k alone equal its moments left-padded in a batch (junk q/k at the
    padding); padding queries get zeros and padding keys no column mass."""

    def moments(query: torch.Tensor, key: torch.Tensor, offsets: torch.Tensor | None) -> AttentionMoments:
        return attention_moments(
            query, key, pad_offsets=offsets, sliding_window=qk.window, diag_offsets=DIAGONALS, block=qk.block
        )

    together = moments(qk.query, qk.key, qk.offsets)
    T = qk.query.shape[2]
    for b, n in enumerate(qk.lengths.tolist()):
        off = T - n
        alone = moments(qk.query[b : b + 1, :, off:], qk.key[b : b + 1, :, off:], None)
        assert close(together.entropy[b : b + 1, :, off:], alone.entropy)
        assert close(together.mean_key[b : b + 1, :, off:] - off, alone.mean_key)  # absolute positions
        assert close(together.colsum[b : b + 1, :, off:], alone.colsum)
        for o in DIAGONALS:
            assert close(together.diag(o)[b : b + 1, :, off:], alone.diag(o))
        pads = [together.entropy, together.mean_key, together.colsum, *together.diagonals.values()]
        assert all((t[b, :, :off] == 0).all() for t in pads)


@PROPERTY
@given(padded_batch())
def test_entropy_distance_and_diagonal_scores_stay_in_range(p: Padded) -> None:
    """Per real query ``t``: entropy in [0, log(t + 1)], distance ``t - mean key`` in [0, t], diagonal
    weights in [0, 1]; per head: entropy in [0, log n], mean distance in [0, n - 1], scores in [0, 1]
    (NaN only where no query counts)."""
    m = pattern_moments(p.batch.float(), pad_offsets=p.offsets, diag_offsets=DIAGONALS)
    T = p.batch.shape[-1]
    stats = {name: reduce(make, p.batch, p.lengths) for name, make in REDUCERS.items()}
    for b, n in enumerate(p.lengths.tolist()):
        off = T - n
        pos = torch.arange(n, dtype=torch.float32)  # real positions
        ent = m.entropy[b, :, off:]
        assert (ent >= -TOL).all() and (ent <= torch.log(pos + 1) + TOL).all()
        dist = pos - (m.mean_key[b, :, off:] - off)
        assert (dist >= -TOL).all() and (dist <= pos + TOL).all()
        for o in DIAGONALS:
            assert (m.diag(o)[b] >= 0).all() and (m.diag(o)[b] <= 1 + TOL).all()
        entropy, distance = stats["entropy"][b], stats["mean_distance"][b]
        if n == 1:  # only the first token's row, a point mass: left out
            assert torch.isnan(entropy).all() and torch.isnan(distance).all()
        else:
            assert (entropy >= -TOL).all() and (entropy <= entropy_upper_bound(n) + TOL).all()
            assert (distance >= -TOL).all() and (distance <= n - 1 + TOL).all()
        for name in ("prev_token", "induction", "duplicate_token"):
            score = stats[name][b]
            assert ((score >= -TOL) & (score <= 1 + TOL) | torch.isnan(score)).all(), name
        assert not torch.isnan(stats["prev_token"][b]).any() or n == 1


ACT_SETTINGS = st.fixed_dictionaries(
    {
        "beta": st.floats(0.0, 1.0),
        "threshold": st.sampled_from(act.THRESHOLDS),
        "alpha_threshold": st.floats(0.02, 0.9),
        "ratio_a": st.floats(0.5, 6.0),
        "first_sink": st.sampled_from(act.FIRST_SINKS),
    }
)


@PROPERTY
@given(padded_batch(), ACT_SETTINGS)
def test_act_keeps_every_real_row_stochastic(p: Padded, cfg: dict[str, Any]) -> None:
    """ACT's calibration (both ``first_sink`` variants, both threshold forms, any ``beta``): real rows
    still sum to one with entries in [0, 1], every zero stays exactly zero, padding rows are untouched,
    the dtype is kept."""
    out = act.calibrate_pattern(p.batch, p.lengths, **cfg)
    assert out.dtype == p.batch.dtype and out.shape == p.batch.shape
    T = p.batch.shape[-1]
    for b, n in enumerate(p.lengths.tolist()):
        real = out[b, :, T - n :]
        assert close(real.sum(-1), torch.ones(real.shape[:-1], dtype=real.dtype))
        assert (real >= 0).all() and (real <= 1 + TOL).all()
        assert torch.equal(out[b, :, : T - n], p.batch[b, :, : T - n])
    assert (out[p.batch == 0] == 0).all()


@PROPERTY
@given(padded_batch(), ACT_SETTINGS)
def test_act_moves_the_hidden_sinks_mass_to_the_other_keys_in_proportion(
    p: Padded, cfg: dict[str, Any]
) -> None:
    """In every real row that attends to a hidden sink and to some receiving key: the hidden sinks keep
    ``beta`` of their weight, the receivers (every other key with ``"share"``; the keys that are no sink
    with ``"frozen"``, whose first sink stays bit-exact) gain exactly what they lost, all by the same
    factor. Any other row is returned unchanged; ``beta = 1`` changes nothing."""
    out = act.calibrate_pattern(p.batch, p.lengths, **cfg)
    calibration = act.Calibration(**cfg)
    first, hidden = calibration.sinks(p.batch, p.lengths)
    beta, share = cfg["beta"], cfg["first_sink"] == "share"
    T = p.batch.shape[-1]
    for b, n in enumerate(p.lengths.tolist()):
        for h in range(p.batch.shape[1]):
            receivers = ~hidden[b, h] & (torch.ones_like(first[b, h]) if share else ~first[b, h])
            for i in range(T - n, T):
                row, new = p.batch[b, h, i], out[b, h, i]
                sink_mass, other_mass = row[hidden[b, h]].sum(), row[receivers].sum()
                if not (sink_mass > 0 and other_mass > 0):
                    assert torch.equal(new, row)
                    continue
                assert close(new[hidden[b, h]], beta * row[hidden[b, h]], tol=1e-6)
                assert close((new - row)[receivers].sum(), (1 - beta) * sink_mass, tol=1e-6)
                seen = receivers & (row > 1e-6)
                ratio = new[seen] / row[seen]
                assert close(ratio, ratio[:1].expand_as(ratio))
                if not share:
                    assert torch.equal(new[first[b, h]], row[first[b, h]])
    unchanged = act.calibrate_pattern(p.batch, p.lengths, **{**cfg, "beta": 1.0})
    assert close(unchanged, p.batch, tol=1e-6)


@PROPERTY
@given(
    padded_batch(),
    st.sampled_from(act.THRESHOLDS),
    st.floats(0.02, 0.9),
    st.floats(0.5, 6.0),
    st.floats(0.0, 0.5),
)
def test_sink_detection_splits_the_keys_above_the_threshold(
    p: Padded, threshold: Any, alpha_threshold: float, ratio_a: float, raise_by: float
) -> None:
    """The keys with ``alpha_k`` above the threshold (``alpha_threshold``, or ``ratio_a / n``) are
    split into the first (lowest position, at most one per head) and the hidden ones; padding is never
    a sink; raising the threshold never adds one."""
    alpha = act.column_importance(p.batch, p.lengths)  # [B, H, T]
    first, hidden = act.detect_sinks(
        alpha, p.lengths, threshold=threshold, alpha_threshold=alpha_threshold, ratio_a=ratio_a
    )
    limit = (
        ratio_a / p.lengths.double()
        if threshold == "ratio"
        else torch.full((len(p.prompts),), alpha_threshold)
    )
    above = alpha > limit[:, None, None]
    assert not (first & hidden).any() and torch.equal(first | hidden, above)
    assert (first.sum(-1) <= 1).all() and torch.equal(first.any(-1), above.any(-1))
    pos = torch.arange(alpha.shape[-1])
    first_pos = torch.where(first, pos, alpha.shape[-1]).min(-1).values
    assert (~hidden | (pos > first_pos[..., None])).all()  # every hidden sink comes after the first
    assert not (above & torch.isnan(alpha)).any()
    f2, h2 = act.detect_sinks(
        alpha,
        p.lengths,
        threshold=threshold,
        alpha_threshold=min(alpha_threshold + raise_by, 0.99),
        ratio_a=ratio_a * (1 + raise_by),
    )
    assert not ((f2 | h2) & ~above).any()


@PROPERTY
@given(padded_batch(), st.floats(0.05, 0.9), st.floats(0.0, 0.3))
def test_sink_share_is_a_share_of_heads(p: Padded, eps: float, raise_by: float) -> None:
    """``Sink_k^eps`` per sample is a share of the heads (a multiple of 1/H in [0, 1]), NaN exactly
    beyond the sample's length; ``sink_percent`` is its mean in %; a higher eps never raises it."""
    heads = p.batch.shape[1]
    alpha = reduce(lambda: SinkReducer(eps), p.batch, p.lengths)[:, None]  # [B, L=1, H, T]
    share = sink_share(alpha, eps)
    for b, n in enumerate(p.lengths.tolist()):
        real = share[b, :n]
        assert not torch.isnan(real).any() and torch.isnan(share[b, n:]).all()
        assert (real >= 0).all() and (real <= 1).all()
        assert close(real * heads, (real * heads).round())
    for k in range(alpha.shape[-1]):
        percent = sink_percent(alpha, eps, k)
        assert 0.0 <= percent <= 100.0 and math.isclose(percent, 100 * float(torch.nanmean(share[:, k])))
    higher = sink_share(alpha, min(eps + raise_by, 0.99))
    assert ((higher <= share) | torch.isnan(share)).all()
