"""ACT's edit of a head's attention pattern: column importance, sink detection, the calibration
formula and the context manager that applies it to chosen heads."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from probe.errors import ConfigError
from probe.hooks import HookSet
from probe.interventions import edit_pattern
from probe.loading import LoadedModel
from probe.types import Head

Threshold = Literal["alpha", "ratio"]
FirstSink = Literal["share", "frozen"]  # "share": the official code's, behind the published numbers
THRESHOLDS: tuple[str, ...] = get_args(Threshold)
FIRST_SINKS: tuple[str, ...] = get_args(FirstSink)


def _real_rows(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, T]`` bool: which positions of a left-padded batch are real tokens."""
    offsets = T - lengths.to(torch.long)
    return torch.arange(T, device=lengths.device)[None, :] >= offsets[:, None]


def _per_row(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values`` ``[B, X]`` viewed as ``[B, 1, …, 1, X]`` for a tensor of ``ndim`` dimensions."""
    return values.reshape(values.shape[0], *([1] * (ndim - values.dim())), *values.shape[1:])


def column_importance(pattern: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``alpha`` ``[B, …, T]`` of post-softmax patterns ``[B, …, T, T]`` (left-padded batch).

    ``alpha[b, …, j] = sum over real queries t of A[t, j] / (T - j)`` for a real key column ``j``:
    the padded column ``j`` is real position ``k = j - offset`` and ``T - j`` is the real ``T_b - k``.
    NaN at padding columns. Rows of padding queries are ignored (they hold junk).
    """
    if pattern.shape[-1] != pattern.shape[-2]:
        raise ConfigError(f"a square pattern [.., T, T] is needed, got {tuple(pattern.shape)}")
    T = pattern.shape[-1]
    lengths = lengths.to(pattern.device)
    real = _real_rows(lengths, T)  # [B, T]
    flat = pattern.reshape(pattern.shape[0], -1, T, T).float()
    colsum = torch.einsum("bhqk,bq->bhk", flat, real.float()).reshape(*pattern.shape[:-2], T)
    denom = torch.arange(T, 0, -1, device=pattern.device, dtype=torch.float32)  # T - j
    alpha = colsum / denom
    return alpha.masked_fill(~_per_row(real, alpha.dim()), float("nan"))


def sink_threshold(
    lengths: torch.Tensor, threshold: Threshold, alpha_threshold: float, ratio_a: float
) -> torch.Tensor:
    """Per batch row, the alpha above which a key is a sink: ``alpha_threshold`` or ``ratio_a / T``."""
    if threshold == "alpha":
        return torch.full(lengths.shape, float(alpha_threshold), device=lengths.device)
    if threshold == "ratio":
        return float(ratio_a) / lengths.float()
    raise ConfigError(f"threshold must be one of {', '.join(THRESHOLDS)} (got {threshold!r})")


def detect_sinks(
    alpha: torch.Tensor,
    lengths: torch.Tensor,
    *,
    threshold: Threshold = "alpha",
    alpha_threshold: float = 0.1,
    ratio_a: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, hidden)``: bool masks like ``alpha`` ``[B, …, T]``.

    ``first`` marks the lowest-position detected sink (``alpha > threshold``) of each row, ``hidden``
    the other detected sinks (the ones ACT calibrates). Padding columns (NaN) are never sinks.
    """
    limit = _per_row(
        sink_threshold(lengths.to(alpha.device), threshold, alpha_threshold, ratio_a)[:, None], alpha.dim()
    )
    sinks = alpha > limit  # NaN compares False
    rank = sinks.to(torch.int32).cumsum(-1)
    return sinks & (rank == 1), sinks & (rank > 1)


def check_first_sink(first_sink: str) -> None:
    if first_sink not in FIRST_SINKS:
        raise ConfigError(
            f"first_sink must be 'share' (the default: the first sink takes its proportional share of the "
            f"removed mass, as the official code whose numbers the paper publishes) or 'frozen' (its column "
            f"left untouched) (got {first_sink!r})"
        )


@dataclass(frozen=True)
class Calibration:
    """ACT's edit of one head's pattern: damp hidden sinks to ``beta``, give the rest to other keys
    (the first sink included with ``first_sink="share"``, the default; see :func:`calibrate_pattern`)."""

    beta: float = 0.4
    threshold: Threshold = "alpha"
    alpha_threshold: float = 0.1
    ratio_a: float = 5.0
    first_sink: FirstSink = "share"

    def sinks(self, pattern: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, hidden)`` sink masks ``[B, …, T]`` of patterns ``[B, …, T, T]``."""
        return detect_sinks(
            column_importance(pattern, lengths),
            lengths,
            threshold=self.threshold,
            alpha_threshold=self.alpha_threshold,
            ratio_a=self.ratio_a,
        )

    def apply(
        self, pattern: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The calibrated patterns (a new tensor); see :func:`calibrate_pattern`."""
        return calibrate_pattern(
            pattern,
            lengths,
            beta=self.beta,
            threshold=self.threshold,
            alpha_threshold=self.alpha_threshold,
            ratio_a=self.ratio_a,
            rows=rows,
            first_sink=self.first_sink,
        )


def calibrate_pattern(
    pattern: torch.Tensor,
    lengths: torch.Tensor,
    *,
    beta: float = 0.4,
    threshold: Threshold = "alpha",
    alpha_threshold: float = 0.1,
    ratio_a: float = 5.0,
    rows: torch.Tensor | None = None,
    first_sink: FirstSink = "share",
) -> torch.Tensor:
    """ACT-calibrate post-softmax patterns ``[B, …, T, T]`` of a left-padded batch (a new tensor).

    ``lengths`` ``[B]``: each batch row's real length. ``rows`` ``[B]`` bool: edit only these batch
    rows (the others are returned as they are). Hidden sinks are detected on each row's own pattern;
    see docs/analyses/act.md for the formula. ``first_sink``: ``"share"`` (default, the official
    code's variant behind the paper's numbers) lets the first detected sink take its proportional
    share of the removed mass; ``"frozen"`` leaves its column bit-exact. Padding query rows, rows with
    no attention on hidden sinks and rows with no attention outside them are returned unchanged.
    """
    check_first_sink(first_sink)
    if pattern.dim() < 3 or pattern.shape[-1] != pattern.shape[-2]:
        raise ConfigError(f"patterns must be [batch, .., T, T], got {tuple(pattern.shape)}")
    lengths = lengths.to(pattern.device)
    if lengths.shape != (pattern.shape[0],):
        raise ConfigError(
            f"lengths has shape {tuple(lengths.shape)} but the pattern has {pattern.shape[0]} batch rows; "
            "pass the real length of every row of the batch being run"
        )
    if rows is not None:
        rows = rows.to(pattern.device).bool()
        if rows.shape != (pattern.shape[0],):
            raise ConfigError(f"rows must be a [batch] bool mask, got {tuple(rows.shape)}")
        if not bool(rows.any()):
            return pattern.clone()
        if not bool(rows.all()):
            out = pattern.clone()
            out[rows] = calibrate_pattern(
                pattern[rows],
                lengths[rows],
                beta=beta,
                threshold=threshold,
                alpha_threshold=alpha_threshold,
                ratio_a=ratio_a,
                first_sink=first_sink,
            )
            return out
    T = pattern.shape[-1]
    A = pattern.float()
    first, hidden = detect_sinks(
        column_importance(A, lengths),
        lengths,
        threshold=threshold,
        alpha_threshold=alpha_threshold,
        ratio_a=ratio_a,
    )
    in_sink = hidden[..., None, :]  # [B, …, 1, T]: the same columns for every query row
    frozen = first[..., None, :] if first_sink == "frozen" else torch.zeros_like(in_sink)
    sink_mass = torch.where(in_sink, A, 0.0).sum(-1, keepdim=True)
    other_mass = torch.where(in_sink | frozen, 0.0, A).sum(-1, keepdim=True)
    real_query = _per_row(_real_rows(lengths, T), A.dim() - 1)[..., None]  # [B, …, T, 1]
    edit = real_query & (sink_mass > 0) & (other_mass > 0)
    gain = 1.0 + (1.0 - beta) * sink_mass / torch.where(edit, other_mass, 1.0)
    new = torch.where(in_sink, A * beta, torch.where(frozen, A, A * gain))
    return torch.where(edit & ~frozen, new.to(pattern.dtype), pattern)  # the frozen first sink: bit-exact


def calibrate_heads(
    model: LoadedModel,
    heads: Mapping[Head, torch.Tensor | None] | Iterable[Head],
    lengths: torch.Tensor,
    calibration: Calibration | None = None,
) -> AbstractContextManager[HookSet]:
    """Context manager: ACT-calibrate ``heads`` in the forward passes run inside it.

    ``lengths`` ``[B]`` are the real lengths of the (left-padded) batch that will be run, e.g.
    ``model.batch_from_ids(rows).lengths``. ``heads`` may map each head to a ``[B]`` bool mask of the
    batch rows to edit (None: every row), as the batched head search does.
    """
    cal = calibration or Calibration()
    masks: dict[Head, torch.Tensor | None] = (
        dict(heads) if isinstance(heads, Mapping) else dict.fromkeys(heads, None)
    )

    def make(rows: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda pattern: cal.apply(pattern, lengths, rows)

    return edit_pattern(model, {head: make(rows) for head, rows in masks.items()})
