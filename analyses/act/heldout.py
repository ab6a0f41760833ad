"""ACT's keep rules and the held-out validation of the heads they keep.

The head search scores every head in range alone on the calibration items; :func:`keep_heads` turns
those scores into the kept set of a scope by one of the rules of ``ActConfig.keep``. The kept set is
then tested on the held-out items it was not found on (:func:`validate_scope`): its per-item effect
when calibrated together (the change in the label's margin, and in correctness) against the same
effect of ``n_null`` random sets of as many heads, drawn from the in-range heads *outside* the kept
set (:func:`analyses.validation.null_sets`). Each test is a row of the ``validation`` table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analyses import validation
from analyses.act.calibration import Calibration
from analyses.act.scoring import ChoiceScorer, margins
from analyses.tasks import choice
from analyses.tasks.choice import ChoiceItem, ChoiceToken
from probe.loading import LoadedModel
from probe.types import Head

# the leading column of the validation table: the head search the set came from (a task, a task
# kind, "pooled" or "all"); every row's role is "kept"
VALIDATION_EXTRA = ("head_search",)
ROLE = "kept"
# the per-item effects, in the order of their rows: the first is the one the heads table carries
MEASURES = {
    "margin": "held-out change in the label's log-probability margin (after - before)",
    "correct": "held-out change in correctness (after - before: -1, 0 or +1 per item)",
}


@dataclass(frozen=True)
class Keep:
    """One scope's verdict on every searched head."""

    kept: np.ndarray  # [n_heads] bool
    acc_delta: np.ndarray  # [n_heads] calibration accuracy change
    margin_delta: np.ndarray  # [n_heads] mean per-item margin change
    p_value: np.ndarray  # [n_heads] one-sided p of a margin rise (uncorrected)


def keep_heads(
    rule: str,
    base_correct: np.ndarray,
    search_correct: np.ndarray,
    base_margin: np.ndarray,
    search_margin: np.ndarray,
    significance: float,
) -> Keep:
    """Which heads a scope keeps: ``base_*`` ``[n_items]`` uncalibrated, ``search_*``
    ``[n_heads, n_items]`` with each head calibrated alone, on the scope's calibration items.

    ``"not_lower"``: accuracy with the head >= without; ``"raise"``: >; ``"significant"``: the
    per-item margin change has a mean significantly above zero (one-sided t-test per head,
    Benjamini-Hochberg over the heads at ``significance``).
    """
    acc_delta = search_correct.mean(axis=1) - base_correct.mean()
    per_item = (search_margin - base_margin[None, :]).T  # [n_items, n_heads]
    passed, p_value = validation.significant(per_item, "higher", significance)
    if rule == "significant":
        kept = passed
    elif rule == "raise":
        kept = acc_delta > 0
    else:
        kept = acc_delta >= 0
    return Keep(np.asarray(kept, dtype=bool), acc_delta, per_item.mean(axis=0), p_value)


@dataclass
class ScopeItems:
    """The held-out items one kept set is applied to, with their log-probabilities before and after."""

    scope: str
    tasks: list[str]
    items: list[ChoiceItem]
    labels: np.ndarray
    before: np.ndarray  # [n, width] log-probabilities, uncalibrated
    after: np.ndarray  # [n, width] with the kept set calibrated


def _effects(logp: np.ndarray, s: ScopeItems) -> dict[str, np.ndarray]:
    """Per measure, the per-item effect ``[..., n]`` of log-probabilities ``logp`` against before."""
    width = s.before.shape[-1]
    logp = logp[..., :width]
    correct_before = choice.predictions(s.before) == s.labels
    correct = choice.predictions(logp.reshape(-1, width)).reshape(logp.shape[:-1]) == s.labels
    return {
        "margin": margins(logp, s.labels) - margins(s.before, s.labels),
        "correct": correct.astype(np.float64) - correct_before.astype(np.float64),
    }


def null_effects(
    model: LoadedModel,
    s: ScopeItems,
    sets: Sequence[Sequence[Head]],
    calibration: Calibration,
    *,
    sets_per_pass: int,
    batch_size: int,
    choice_token: ChoiceToken,
) -> dict[str, np.ndarray]:
    """Per measure, the mean held-out effect of calibrating each of ``sets`` (``[len(sets)]``).

    ``sets_per_pass`` head sets share one forward pass (the batch replicated once per set).
    """
    out = {name: np.full(len(sets), np.nan) for name in MEASURES}
    if not sets:
        return out
    scorer = ChoiceScorer(model, s.items, batch_size=batch_size, choice_token=choice_token)
    for start in range(0, len(sets), sets_per_pass):
        group = [tuple(h) for h in sets[start : start + sets_per_pass]]
        effects = _effects(scorer.logprobs(group, calibration), s)
        for name, values in effects.items():
            out[name][start : start + len(group)] = values.mean(axis=-1)
    return out


def validate_scope(
    model: LoadedModel,
    s: ScopeItems,
    kept: Sequence[Head],
    in_range: Sequence[Head],
    calibration: Calibration,
    *,
    n_null: int,
    significance: float,
    seed: int,
    n_boot: int,
    sets_per_pass: int,
    batch_size: int,
    choice_token: ChoiceToken,
) -> list[dict[str, Any]]:
    """The validation rows of one scope's kept set (one per measure; none for an empty set).

    When fewer in-range heads lie outside the set than it holds, no null set can be drawn: the rows
    have no null (``n_null`` 0) and are not validated (:func:`null_missing` tells them apart).
    """
    if not kept:
        return []
    pool = len(in_range) - len(set(kept))
    sets = (
        validation.null_sets(in_range, len(kept), n_null, seed=f"act:{s.scope}:{seed}", exclude=kept)
        if pool >= len(kept)
        else []
    )
    null = null_effects(
        model,
        s,
        sets,
        calibration,
        sets_per_pass=sets_per_pass,
        batch_size=batch_size,
        choice_token=choice_token,
    )
    inputs = validation.Inputs(
        "held-out items of " + ", ".join(s.tasks), len(s.items), "not used by the head search"
    )
    own = _effects(s.after, s)
    return [
        validation.test_row(
            ROLE,
            sorted(kept),
            own[name],
            null[name],
            measure=name,
            direction="higher",
            inputs=inputs,
            scope="set",
            n_boot=n_boot,
            seed=seed,
            alpha=significance,
            head_search=s.scope,
        )
        for name in MEASURES
    ]


def head_roles(table: pd.DataFrame) -> pd.DataFrame:
    """The validation table with each role named after its head search (``kept:sentiment``), so that
    a head kept by several searches carries each one's verdict in the heads table."""
    out = table.copy()
    out["role"] = [f"{role}:{scope}" for role, scope in zip(out["role"], out["head_search"], strict=True)]
    return out


def null_missing(table: pd.DataFrame, n_in_range: int) -> list[str]:
    """Per head search with no null: why (fewer in-range heads outside the set than it holds)."""
    rows = table[table["n_null"] == 0].drop_duplicates("head_search")
    return [
        f"{r.head_search}: {int(r.n_heads)} heads kept, only {n_in_range - int(r.n_heads)} in-range heads "
        "outside them, so no null set of that size can be drawn"
        for r in rows.itertuples(index=False)
    ]
