"""The VHR sweep: which settings of alpha and layers it runs, and the ``sweep`` table of CHAIR_S,
CHAIR_I and recall per setting, each with its paired change against the unmodified model.

See docs/analyses/vhd.md ("The sweep").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import astuple

import pandas as pd

from analyses.vhd.config import BASELINE, VhdConfig, VhrSetting, parse_layers, sweep_settings

METRICS = ("CHAIR_S", "CHAIR_I", "recall")
COLUMNS = [
    "setting",
    "alpha",
    "layers",
    "layers_used",
    "intervention",
    "metric",
    "baseline",
    "value",
    "value_lo",
    "value_hi",
    "delta",
    "delta_lo",
    "delta_hi",
]


def _key(s: VhrSetting) -> tuple[object, ...]:
    return astuple(s)[1:]  # everything but the name


def plan(cfg: VhdConfig, chosen: Sequence[VhrSetting]) -> tuple[list[VhrSetting], list[VhrSetting]]:
    """``(extra, points)``: the sweep settings not already among ``chosen`` (to run as well) and every
    sweep point under the name of the setting that runs it (a chosen one with the same parameters
    is reused)."""
    by_key = {_key(s): s for s in chosen}
    extra: list[VhrSetting] = []
    points: list[VhrSetting] = []
    for s in sweep_settings(cfg):
        same = by_key.get(_key(s))
        if same is None:
            extra.append(s)
            by_key[_key(s)] = s
            same = s
        points.append(same)
    return extra, points


def sweep_table(
    points: Sequence[VhrSetting], summary: pd.DataFrame, deltas: pd.DataFrame, n_layers: int
) -> pd.DataFrame:
    """One row per (sweep point, metric): the value with its bootstrap interval (``summary``), the
    baseline's value and the paired change against it (``deltas``)."""
    rows = []
    chair = (
        summary[(summary["benchmark"] == "CHAIR") & summary["metric"].isin(METRICS)]
        if len(summary)
        else summary
    )
    values = {(r.vhr_setting, r.metric): r for r in chair.itertuples()}
    changes = {(r.setting, r.metric): r for r in deltas[deltas["benchmark"] == "CHAIR"].itertuples()}
    for s in points:
        for metric in METRICS:
            v, b, d = (
                values.get((s.name, metric)),
                values.get((BASELINE, metric)),
                changes.get((s.name, metric)),
            )
            rows.append(
                {
                    "setting": s.name,
                    "alpha": float(s.alpha),
                    "layers": s.layers,
                    "layers_used": ",".join(map(str, parse_layers(s.layers, n_layers))),
                    "intervention": "suppress" if s.alpha < 1 else "reinforce",
                    "metric": metric,
                    "baseline": b.value if b is not None else math.nan,
                    "value": v.value if v is not None else math.nan,
                    "value_lo": v.lo if v is not None else math.nan,
                    "value_hi": v.hi if v is not None else math.nan,
                    "delta": d.delta if d is not None else math.nan,
                    "delta_lo": d.lo if d is not None else math.nan,
                    "delta_hi": d.hi if d is not None else math.nan,
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def sweep_lines(sweep: pd.DataFrame) -> list[str]:
    """The terminal's reading of the sweep: the best and worst reinforcing setting by the change in
    CHAIR_S, and whether suppressing moved CHAIR_S and recall the other way."""
    if not len(sweep):
        return []
    s = sweep[sweep["metric"] == "CHAIR_S"].drop_duplicates("setting")
    recall = sweep[sweep["metric"] == "recall"].set_index("setting")["delta"]
    up = s[s["intervention"] == "reinforce"]

    def show(r: pd.Series) -> str:
        return (
            f"{r['setting']} ΔCHAIR_S {r['delta']:+.3f} [{r['delta_lo']:+.3f}, {r['delta_hi']:+.3f}], "
            f"Δrecall {recall.get(r['setting'], math.nan):+.3f}"
        )

    lines = []
    if len(up):
        ranked = up.sort_values("delta", kind="stable")
        lines.append(f"  sweep best: {show(ranked.iloc[0])}")
        lines.append(f"  sweep worst: {show(ranked.iloc[-1])}")
    down = s[s["intervention"] == "suppress"]
    for _, r in down.iterrows():
        verdicts = []
        for metric in ("CHAIR_S", "recall"):
            m = sweep[sweep["metric"] == metric]
            ref = m.loc[m["intervention"] == "reinforce", "delta"].median()
            own = float(m.loc[m["setting"] == r["setting"], "delta"].iloc[0])
            way = "the other way" if own * ref < 0 else "the same way" if own * ref > 0 else "neither way"
            verdicts.append(f"{metric} {way} ({own:+.3f} vs median reinforcing {ref:+.3f})")
        lines.append(f"  converse {r['setting']}: " + "; ".join(verdicts))
    return lines
