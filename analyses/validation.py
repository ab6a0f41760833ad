"""Held-out causal validation of head roles, and significance thresholds for finding them.

An analysis that gives heads a role by a causal method (ablating, calibrating, masking, scaling
them) finds the heads on *discovery* inputs and then tests them on *held-out* inputs it never used to
find them. The test compares the effect of the intervention on the tested heads with the same
intervention on random head sets of the same size drawn from outside the tested set (the null): a
role is *validated* when its held-out effect goes the way the role predicts, its bootstrap interval
over inputs excludes zero, and fewer than ``alpha`` of the null sets do as well (a one-sided
permutation p-value). Every test is one row of the ``validation`` table (:data:`COLUMNS`), and
:func:`evidence_columns` copies each head's evidence into the ``heads`` table, so that no role is
shown without its strength. See docs/validation.md.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from probe.errors import ConfigError
from probe.types import Head

Direction = Literal["lower", "higher"]
Scope = Literal["set", "head"]

ALPHA = 0.05
MIN_NULL = 50

COLUMNS = (
    "role",
    "scope",
    "heads",
    "n_heads",
    "measure",
    "direction",
    "effect",
    "effect_low",
    "effect_high",
    "null_mean",
    "null_std",
    "null_low",
    "null_high",
    "n_null",
    "percentile",
    "p_value",
    "validated",
    "alpha",
    "inputs",
    "n_inputs",
)


@dataclass(frozen=True)
class Inputs:
    """What a test was measured on: a name, how many inputs, and how they differ from discovery."""

    name: str
    n: int
    detail: str = ""

    def describe(self) -> str:
        return f"{self.name} (n={self.n}{'; ' + self.detail if self.detail else ''})"


def check_null(n_null: int, alpha: float = ALPHA, *, key: str = "n_null") -> None:
    """A config check: enough null sets for a test at ``alpha`` (and never fewer than 50)."""
    if isinstance(n_null, bool) or not isinstance(n_null, int) or n_null < MIN_NULL:
        raise ConfigError(f"{key}={n_null!r}: draw at least {MIN_NULL} random head sets for the null")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha={alpha!r}: a significance level in (0, 1), e.g. 0.05")


def head_label(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


def heads_label(heads: Iterable[Head]) -> str:
    return " ".join(head_label(h) for h in heads)


def parse_heads(text: str) -> list[Head]:
    """The heads of a ``heads`` cell (``"L3H1 L5H0"``)."""
    out: list[Head] = []
    for token in str(text).split():
        layer, _, head = token[1:].partition("H")
        out.append((int(layer), int(head)))
    return out


def split_indices(n: int, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (discovery, held-out), each sorted and non-empty."""
    if n < 2:
        raise ConfigError(f"{n} inputs cannot be split into discovery and held-out: use at least 2")
    if not 0.0 < held_out < 1.0:
        raise ConfigError(f"held_out={held_out!r}: a share in (0, 1), e.g. 0.5")
    k = min(n - 1, max(1, round(n * held_out)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


def null_sets(
    heads: Sequence[Head], size: int, n: int, seed: int | str, exclude: Iterable[Head] = ()
) -> list[list[Head]]:
    """``n`` random sets of ``size`` distinct heads from ``heads`` minus ``exclude`` (the null).

    When the pool admits no more than ``n`` distinct sets, every one of them is returned once (an
    exact permutation null). Raises ``ConfigError`` when the pool is smaller than ``size``.
    """
    skip = set(exclude)
    pool = sorted(h for h in heads if h not in skip)
    if size < 1:
        raise ValueError("a null set needs at least one head")
    if len(pool) < size:
        raise ConfigError(
            f"only {len(pool)} heads lie outside the {len(skip)} tested ones, fewer than the set size "
            f"{size}: test fewer heads or use a model with more heads"
        )
    if math.comb(len(pool), size) <= n:
        return [list(c) for c in itertools.combinations(pool, size)]
    rng = random.Random(f"null:{seed}:{size}")
    return [sorted(rng.sample(pool, size)) for _ in range(n)]


def bootstrap_interval(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean and a 95% percentile-bootstrap interval over the rows of ``values`` (NaN when empty)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, values.size, (n_boot, values.size))].mean(1)
    return float(values.mean()), float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


def test_row(
    role: str,
    heads: Sequence[Head],
    per_input: np.ndarray,
    null: np.ndarray,
    *,
    measure: str,
    direction: Direction,
    inputs: Inputs,
    scope: Scope = "set",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = ALPHA,
    **extra: Any,
) -> dict[str, Any]:
    """One row of the validation table.

    ``per_input``: the effect of intervening on ``heads`` for each held-out input (its mean is the
    effect); ``null``: the mean effect of each random set. ``direction`` is the way the role predicts
    the effect goes. The percentile is the share of null sets the effect beats in that direction
    (ties count half); ``p_value = (1 + #null at least as strong) / (1 + n_null)``.
    """
    effect, low, high = bootstrap_interval(per_input, n_boot, seed)
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    sign = 1.0 if direction == "higher" else -1.0
    if null.size and math.isfinite(effect):
        s_null, s_eff = sign * null, sign * effect
        percentile = 100.0 * (float(np.mean(s_null < s_eff)) + 0.5 * float(np.mean(s_null == s_eff)))
        p_value = (1.0 + float(np.sum(s_null >= s_eff))) / (1.0 + null.size)
    else:
        percentile, p_value = math.nan, math.nan
    beyond_zero = (low > 0.0) if direction == "higher" else (high < 0.0)
    validated = bool(null.size and p_value <= alpha and beyond_zero)
    row = {
        "role": role,
        "scope": scope,
        "heads": heads_label(heads),
        "n_heads": len(heads),
        "measure": measure,
        "direction": direction,
        "effect": effect,
        "effect_low": low,
        "effect_high": high,
        "null_mean": float(null.mean()) if null.size else math.nan,
        "null_std": float(null.std(ddof=0)) if null.size else math.nan,
        "null_low": float(np.quantile(null, 0.05)) if null.size else math.nan,
        "null_high": float(np.quantile(null, 0.95)) if null.size else math.nan,
        "n_null": int(null.size),
        "percentile": percentile,
        "p_value": p_value,
        "validated": validated,
        "alpha": float(alpha),
        "inputs": inputs.describe(),
        "n_inputs": int(inputs.n),
    }
    row.update(extra)
    return row


def frame(rows: Sequence[Mapping[str, Any]], extra: Sequence[str] = ()) -> pd.DataFrame:
    """The validation table: :data:`COLUMNS` after any ``extra`` leading columns (``task`` …)."""
    columns = [*extra, *COLUMNS]
    out = pd.DataFrame(list(rows), columns=columns)
    for name in ("role", "scope", "heads", "measure", "direction", "inputs", *extra):
        if name in out:
            out[name] = out[name].astype(object)
    out["validated"] = out["validated"].astype(bool)
    return out


EVIDENCE = (
    "role",
    "validated",
    "effect",
    "effect_low",
    "effect_high",
    "percentile",
    "p_value",
    "validated_on",
)


def evidence_columns(heads: pd.DataFrame, validation: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Add ``{prefix}_role``, ``_validated``, ``_effect`` (with ``_low``/``_high``), ``_percentile``,
    ``_p_value`` and ``_validated_on`` to a ``heads`` table (one row per layer and head).

    A head takes the numbers of its own test (scope ``head``) where there is one, else of the set it
    was tested in. A head in several roles lists them joined by ``+`` and carries the first one's
    numbers; it counts as validated only when every role it holds is. Heads without a role get
    ``""``, ``False`` and NaN.
    """
    out = heads.copy()
    index = {(int(r), int(h)): i for i, (r, h) in enumerate(zip(out["layer"], out["head"], strict=True))}
    n = len(out)
    role = [""] * n
    valid = [True] * n
    nums = {k: np.full(n, np.nan) for k in ("effect", "effect_low", "effect_high", "percentile", "p_value")}
    where = [""] * n
    own: dict[tuple[int, str], bool] = {}
    ordered = sorted(validation.itertuples(index=False), key=lambda r: r.scope != "head")
    for row in ordered:
        for head in parse_heads(row.heads):
            i = index.get(head)
            if i is None or own.get((i, row.role)):
                continue
            own[(i, row.role)] = True
            if row.role not in role[i].split("+"):
                first = not role[i]
                role[i] = row.role if first else f"{role[i]}+{row.role}"
                if first:
                    for k in nums:
                        nums[k][i] = float(getattr(row, k))
                    where[i] = str(row.inputs)
            valid[i] = valid[i] and bool(row.validated)
    out[f"{prefix}_role"] = pd.Series(role, dtype=object, index=out.index)
    out[f"{prefix}_validated"] = [bool(v and r) for v, r in zip(valid, role, strict=True)]
    for k, values in nums.items():
        out[f"{prefix}_{k}"] = values
    out[f"{prefix}_validated_on"] = pd.Series(where, dtype=object, index=out.index)
    return out


def significant(
    per_input: np.ndarray, direction: Direction, alpha: float = ALPHA, *, correction: str = "bh"
) -> tuple[np.ndarray, np.ndarray]:
    """Which columns of ``per_input`` (``[n_inputs, n_candidates]``) have a mean significantly beyond
    zero in ``direction``: a one-sided one-sample t-test per candidate, Benjamini–Hochberg over the
    candidates (``correction="bh"``), Bonferroni (``"bonferroni"``) or none (``"none"``).

    Returns ``(passed, p_values)``. A NaN column (not tested) never passes. This is the threshold
    that admits heads into a role during discovery: significance against "no effect", not a fixed
    share of a gap.
    """
    from scipy import stats

    x = np.asarray(per_input, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError("per_input must be [n_inputs, n_candidates]")
    finite = np.all(np.isfinite(x), axis=0)
    p = np.ones(x.shape[1])
    if x.shape[0] >= 2 and finite.any():
        alt = "greater" if direction == "higher" else "less"
        sub = x[:, finite]
        mean = sub.mean(0)
        spread = np.ptp(sub, axis=0) > 1e-12 * np.maximum(1.0, np.abs(mean))
        # a constant column: certain when its mean lies the predicted way, else no evidence
        pv = np.where((mean > 0) if direction == "higher" else (mean < 0), 0.0, 1.0)
        if spread.any():
            res = stats.ttest_1samp(sub[:, spread], 0.0, axis=0, alternative=alt)
            pv[spread] = np.asarray(res.pvalue, dtype=np.float64)
        p[finite] = np.nan_to_num(pv, nan=1.0)
    m = int(finite.sum())
    if correction == "none" or m == 0:
        passed = p <= alpha
    elif correction == "bonferroni":
        passed = p <= alpha / m
    elif correction == "bh":
        order = np.argsort(np.where(finite, p, np.inf), kind="stable")[:m]
        ranked = p[order]
        below = ranked <= alpha * np.arange(1, m + 1) / m
        k = int(np.max(np.nonzero(below)[0]) + 1) if below.any() else 0
        passed = np.zeros(x.shape[1], dtype=bool)
        passed[order[:k]] = True
    else:
        raise ValueError(f"correction={correction!r}: choose bh, bonferroni or none")
    return passed & finite, p


# ------------------------------------------------------------------------------- terminal lines


def number(value: object, spec: str = ".3g") -> str:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if math.isnan(number) else format(number, spec)


def label(row: pd.Series, context: Sequence[str]) -> str:
    where = " ".join(str(row[c]) for c in context if c in row and str(row[c]))
    heads = str(row["heads"])
    if int(row["n_heads"]) > 4:
        heads = " ".join(heads.split()[:4]) + f" … ({int(row['n_heads'])} heads)"
    return f"{where + ' · ' if where else ''}{row['role']} [{heads}]"


def context_columns(table: pd.DataFrame) -> list[str]:
    """The leading columns an analysis put before the standard ones (``task``, ``scope`` …)."""
    return [str(c) for c in table.columns[: list(table.columns).index("role")]] if "role" in table else []


def verdict(row: pd.Series) -> str:
    return "validated" if bool(row["validated"]) else "NOT validated"


def summary_lines(table: pd.DataFrame, *, indent: str = "  ") -> list[str]:
    """One terminal line per test: effect with interval, the null, percentile, p and the verdict."""
    if table is None or not len(table):
        return []
    context = context_columns(table)
    most = int(table["n_null"].max())
    against = f"{most} random same-size sets" if most else "no null: too few heads outside the tested ones"
    lines = [f"{indent}held-out validation (effect [95% CI] vs {against}):"]
    for _, row in table.iterrows():
        lines.append(
            f"{indent}  {label(row, context)}: {row['measure']} {number(row['effect'])} "
            f"[{number(row['effect_low'])}, {number(row['effect_high'])}] vs null {number(row['null_mean'])} ± "
            f"{number(row['null_std'])}; percentile {number(row['percentile'], '.0f')}, p = {number(row['p_value'], '.2g')}: "
            f"{verdict(row)}"
        )
    return lines
