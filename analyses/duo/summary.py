"""The DuoAttention run in a few lines (the CLI's summary)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analyses.base import AnalysisResult
from analyses.duo.config import DuoConfig


def _interval(row: pd.Series, name: str) -> str:
    return f"{row[name]:.2f} [{row[name + '_low']:.2f}, {row[name + '_high']:.2f}]"


def _accuracy_lines(accuracy: pd.DataFrame) -> list[str]:
    pooled = accuracy[accuracy["length"] == 0]
    lines = []
    for row in pooled[pooled["selection"] != "random"].itertuples(index=False):
        r = pd.Series(row._asdict())
        where = (
            "full model"
            if r["selection"] == "full"
            else f"{r['selection']} share {r['share']:.2f} (k={r['k']})"
        )
        lines.append(
            f"  {where}: recall {_interval(r, 'recall')}, recalled {_interval(r, 'recalled')} over {r['n_tests']} tests"
        )
    rand = pooled[pooled["selection"] == "random"]
    for share, part in rand.groupby("share"):
        lines.append(
            f"  random share {float(share):.2f} (k={int(part['k'].iloc[0])}): recall {part['recall'].mean():.2f} "
            f"(seeds {part['recall'].min():.2f}-{part['recall'].max():.2f}), recalled {part['recalled'].mean():.2f} "
            f"over {len(part)} seeds"
        )
    return lines


def loaded_gates_text(notes: dict[str, Any]) -> str:
    """Where a run's loaded gates came from and how they were trained (from the gates file's record),
    with a warning where the run's window differs from the training's; "" for trained gates."""
    if not notes.get("gates_from"):
        return ""
    training = notes.get("gates_training") or {}
    text = f"gates loaded from {notes['gates_from']}"
    if training.get("steps"):
        lengths = ", ".join(str(n) for n in training.get("lengths") or [])
        text += (
            f" (trained {training['steps']} steps on lengths [{lengths}], "
            f"{training.get('seconds', 0):.0f} s on {training.get('device')}, {training.get('dtype')})"
        )
    if notes.get("window_differs"):
        text += f"; note: {notes['window_differs']}"
    return text


def summary(result: AnalysisResult) -> str:
    cfg: DuoConfig = result.config
    notes = result.notes
    gates = result.tables["gates"]
    loss = result.tables["loss"]
    if notes.get("gates_from"):
        trained = loaded_gates_text(notes)
    else:
        last = loss.tail(max(1, len(loss) // 10))
        trained = (
            f"gates trained {len(loss)} steps on lengths {list(cfg.train_lengths)} in {result.timings.get('train', 0):.0f} s"
            + (
                f"; last-10% loss {last['loss'].mean():.4g} (distill {last['distill'].mean():.4g})"
                if len(loss)
                else ""
            )
        )
    lines = [
        f"DuoAttention gates of {result.model_info['name']} (sink {cfg.sink}, recent {cfg.recent}): {trained}",
    ]
    top = gates.sort_values("rank").head(8)
    lines.append(
        "  top KV heads: " + ", ".join(f"L{r.layer}KV{r.kv_head} {r.gate:.2f}" for r in top.itertuples())
    )
    lines.append(
        f"  gates: mean {gates['gate'].mean():.2f}, {int((gates['gate'] > 0.5).sum())}/{len(gates)} above 0.5, "
        f"{int((gates['gate'] == 0).sum())} at 0"
    )
    lines += _accuracy_lines(result.tables["accuracy"])
    agreement = result.tables["agreement"]
    if len(agreement):
        rho = float(agreement["spearman"].iloc[0])
        overlaps = ", ".join(
            f"{r.share:.2f}: {r.overlap}/{r.k} (chance {r.chance:.1f})" for r in agreement.itertuples()
        )
        lines.append(
            f"  Duo vs retrieval score: Spearman {rho:.2f}"
            if not math.isnan(rho)
            else "  Duo vs retrieval score: Spearman n/a"
        )
        lines[-1] += f"; top-k overlap {overlaps}"
    elif cfg.retrieval_score:
        lines.append("  retrieval score: no score-grid test was recalled, so no score ranking")
    memory = result.tables["memory"]
    for share, part in memory.groupby("share"):
        cells = ", ".join(
            f"N={r.n_tokens}: {r.kv_ratio:.2f}"
            + (
                f" (layer by layer {r.kv_ratio_layers:.2f})"
                if not math.isclose(r.kv_ratio_layers, r.kv_ratio, abs_tol=5e-3)
                else ""
            )
            + ("" if math.isnan(r.measured_ratio) else f" (measured {r.measured_ratio:.2f})")
            for r in part.itertuples()
        )
        lines.append(f"  KV cache at share {float(share):.2f}: {cells}")
    return "\n".join(lines)
