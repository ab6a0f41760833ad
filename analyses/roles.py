"""Head roles as data: what an analysis's heads table says a head *is*, and by which rule.

Each analysis declares its roles in its registration (:class:`analyses.registry.Analysis.roles`):
the heads-table column a role reads, the rule and threshold that admit a head, and the paper the
rule comes from. The head atlas (:mod:`analyses.atlas`) applies them; nothing else decides roles.

Rules (``value`` is the threshold):

``above`` / ``at_least`` / ``below``
    the column is ``>`` / ``>=`` / ``<`` the value (NaN never qualifies);
``top_share``
    the head is among the ``k`` highest values of the model's ``n`` units (heads, or KV heads with
    ``per_kv_head``), ``k = value * n`` rounded half up, at least 1; heads tied with the last one
    admitted are admitted too;
``rank_share``
    the column is a rank (1 = first) and the head's rank is at most that ``k`` (the rounding of
    DuoAttention's own selection, :func:`analyses.duo.n_retrieval`);
``label``
    the column holds labels joined by ``+`` (``"name_mover+backup_mover"``) and one of them is the
    value (a value ending in ``*`` matches every label it begins: ``"kept:*"``);
``flag``
    the column is true (booleans, or the strings ``"true"``/``"True"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from probe.errors import ConfigError

Rule = Literal["above", "at_least", "below", "top_share", "rank_share", "label", "flag"]
RULES: tuple[str, ...] = ("above", "at_least", "below", "top_share", "rank_share", "label", "flag")
_SYMBOLS = {"above": ">", "at_least": ">=", "below": "<"}


@dataclass(frozen=True)
class Role:
    """One role an analysis's heads table can give a head.

    ``name`` is the role's id (letters, digits, ``_``), unique over all analyses; ``label`` the
    words a person reads; ``column`` the heads-table column it reads; ``rule`` and ``value`` decide
    (module docstring); ``paper`` where the rule comes from; ``per_kv_head`` counts units as KV heads
    (for analyses whose numbers are per KV head, repeated over the query heads that share it);
    ``evidence`` the heads-table column that says whether the head's role passed the analysis's
    held-out validation (``<prefix>_validated``, docs/validation.md), where the analysis runs one.
    """

    name: str
    label: str
    column: str
    rule: Rule
    value: float | str | None
    paper: str
    per_kv_head: bool = False
    evidence: str | None = None

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").isalnum() or not self.name.islower():
            raise ConfigError(f"role name {self.name!r}: use lower-case letters, digits and '_'")
        if self.rule not in RULES:
            raise ConfigError(f"role {self.name}: unknown rule {self.rule!r}; one of {', '.join(RULES)}")
        if self.rule in ("above", "at_least", "below") and not isinstance(self.value, (int, float)):
            raise ConfigError(
                f"role {self.name}: rule {self.rule} needs a number as value, got {self.value!r}"
            )
        if self.rule in ("top_share", "rank_share") and not (
            isinstance(self.value, (int, float)) and 0.0 < float(self.value) <= 1.0
        ):
            raise ConfigError(
                f"role {self.name}: rule {self.rule} needs a share in (0, 1], got {self.value!r}"
            )
        if self.rule == "label" and not (isinstance(self.value, str) and self.value):
            raise ConfigError(f"role {self.name}: rule label needs the label as value, got {self.value!r}")

    @property
    def threshold(self) -> str:
        """The rule in words: ``retrieval_score > 0.1``, ``top 25% of KV heads by duo_gate``..."""
        if self.rule in _SYMBOLS:
            return f"{self.column} {_SYMBOLS[self.rule]} {self.value:g}"
        units = "KV heads" if self.per_kv_head else "heads"
        if self.rule == "top_share":
            return f"top {float(self.value):.0%} of {units} by {self.column}"  # type: ignore[arg-type]
        if self.rule == "rank_share":
            return f"{self.column} within the first {float(self.value):.0%} of {units}"  # type: ignore[arg-type]
        if self.rule == "label":
            return f"{self.column} has label {self.value}"
        return f"{self.column} is true"

    def flags(self, heads: pd.DataFrame) -> pd.Series:
        """One boolean per row of ``heads`` (a heads table with ``layer``, ``head``, ``kv_head``)."""
        if self.column not in heads.columns:
            raise ConfigError(
                f"role {self.name} reads column {self.column!r}, which this heads table lacks "
                f"(columns: {', '.join(map(str, heads.columns))}); the run predates the role or is of another analysis"
            )
        col = heads[self.column]
        if self.rule in ("above", "at_least", "below"):
            x = pd.to_numeric(col, errors="coerce").astype(float)
            v = float(self.value)  # type: ignore[arg-type]
            out = {"above": x > v, "at_least": x >= v, "below": x < v}[self.rule]
            return out.fillna(False).astype(bool)
        if self.rule in ("top_share", "rank_share"):
            return self._share(heads, pd.to_numeric(col, errors="coerce").astype(float))
        if self.rule == "label":
            return col.fillna("").astype(str).map(self._has_label).astype(bool)
        return col.map(_truthy).astype(bool)

    def _has_label(self, labels: str) -> bool:
        want = str(self.value)
        if want.endswith("*"):
            return any(label.startswith(want[:-1]) for label in labels.split("+") if label)
        return want in labels.split("+")

    def _share(self, heads: pd.DataFrame, x: pd.Series) -> pd.Series:
        keys = ["layer", "kv_head"] if self.per_kv_head else ["layer", "head"]
        units = pd.DataFrame({k: heads[k] for k in keys}).assign(x=x.to_numpy())
        per_unit = units.groupby(keys, sort=False)["x"].first()
        n = len(per_unit)
        k = min(n, max(1, math.floor(float(self.value) * n + 0.5))) if n else 0  # type: ignore[arg-type]
        finite = per_unit.dropna()
        if not len(finite):
            return pd.Series(False, index=heads.index)
        if self.rule == "top_share":
            cut = np.sort(finite.to_numpy())[::-1][min(k, len(finite)) - 1]
            chosen = per_unit >= cut
        else:
            chosen = per_unit <= k
        chosen = chosen.fillna(False)
        lookup = dict(zip(per_unit.index, chosen.to_numpy(), strict=True))
        index = [tuple(r) if len(keys) > 1 else r for r in units[keys].itertuples(index=False, name=None)]
        return pd.Series([bool(lookup[i]) for i in index], index=heads.index)

    def describe(self) -> dict[str, Any]:
        """Plain JSON-able record of the role."""
        return {
            "role": self.name,
            "label": self.label,
            "column": self.column,
            "rule": self.rule,
            "value": self.value,
            "threshold": self.threshold,
            "paper": self.paper,
            "per_kv_head": self.per_kv_head,
            "evidence": self.evidence,
        }


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() == "true"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return False
    return bool(v)


__all__ = ["RULES", "Role", "Rule"]
