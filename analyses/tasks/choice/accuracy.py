"""Accuracy with percentile-bootstrap intervals, per-item evaluation and per-task summaries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from analyses.tasks.choice.items import ChoiceItem, ChoiceToken
from analyses.tasks.choice.scoring import choice_logprobs, predictions
from probe.errors import ConfigError

if TYPE_CHECKING:
    from probe.loading import LoadedModel


@dataclass(frozen=True)
class Accuracy:
    """Fraction correct with a percentile-bootstrap interval (``level`` 0.95 by default)."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def accuracy(correct: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Accuracy:
    """Accuracy of 0/1 outcomes with a percentile bootstrap interval.

    Resampling ``n`` outcomes with replacement and counting the correct ones is exactly a draw
    from Binomial(n, p̂), so the ``n_boot`` bootstrap accuracies are drawn that way (same
    distribution as index resampling, no ``n_boot × n`` array). The interval is the
    ``(1 ± level) / 2`` percentiles of those accuracies.
    """
    values = np.asarray(correct)
    if values.ndim != 1 or values.size == 0:
        raise ConfigError(f"correct must be a non-empty 1-d array of 0/1 outcomes, got shape {values.shape}")
    if not np.isin(values, (0, 1)).all():
        raise ConfigError("correct must hold only 0/1 (or False/True) outcomes")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ConfigError(f"n_boot={n_boot}, level={level}; give n_boot >= 1 and a level in (0, 1)")
    n = int(values.size)
    value = float(values.mean())
    draws = np.random.default_rng(seed).binomial(n, value, size=n_boot) / n
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    # Percentiles of a discrete distribution can miss the estimate only by rounding: keep it inside.
    return Accuracy(value, float(min(low, value)), float(max(high, value)), n)


def evaluate(
    model: LoadedModel,
    items: Sequence[ChoiceItem],
    *,
    batch_size: int = 16,
    choice_token: ChoiceToken = "first",
    progress: bool = True,
) -> pd.DataFrame:
    """Score ``items``: one row per item with task, kind, n_choices, label, predicted, correct, margin.

    ``margin`` is the label's log-probability minus that of the best other choice (> 0 when
    correct), the graded signal behind accuracy.
    """
    logp = choice_logprobs(model, items, batch_size=batch_size, choice_token=choice_token, progress=progress)
    predicted = predictions(logp)
    labels = np.array([item.label for item in items])
    rows = np.arange(len(items))
    label_logp = logp[rows, labels]
    others = logp.copy()
    others[rows, labels] = np.nan
    best_other = np.nanmax(others, axis=1)
    return pd.DataFrame(
        {
            "task": [item.task for item in items],
            "kind": [item.kind for item in items],
            "n_choices": [len(item.choices) for item in items],
            "label": labels,
            "predicted": predicted,
            "correct": predicted == labels,
            "margin": label_logp - best_other,
        }
    )


def summarise(frame: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Accuracy per task of an :func:`evaluate` frame, with 95% bootstrap interval and chance level."""
    rows = []
    for task, group in frame.groupby("task", sort=True):
        acc = accuracy(group["correct"].to_numpy(), n_boot=n_boot, seed=seed)
        rows.append(
            {
                "task": task,
                "n": acc.n,
                "accuracy": acc.value,
                "low": acc.low,
                "high": acc.high,
                "chance": float((1.0 / group["n_choices"]).mean()),
                "mean_margin": float(group["margin"].mean()),
            }
        )
    return pd.DataFrame(rows)
