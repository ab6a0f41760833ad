"""The few lines the CLI prints after an ACT run."""

from __future__ import annotations

import math

import pandas as pd

from analyses.base import AnalysisResult


def summary(result: AnalysisResult) -> str:
    """A few lines for the CLI: per task, held-out accuracy before -> after with intervals."""
    cfg = result.config
    tasks = result.tables["tasks"]
    heads = result.tables["heads"]
    layers = result.notes.get("layers", [None, None])
    lines = [
        f"ACT on {result.model_info['name']}: filter={cfg.filter}, beta={cfg.beta}, "
        f"threshold={cfg.threshold}, layers {layers[0]}..{layers[1] - 1 if layers[1] is not None else '?'} "
        f"({int(heads['in_range'].sum())} heads in range)"
    ]
    for row in tasks.itertuples(index=False):
        lines.append(
            f"  {row.task:<14} {row.acc_before:.3f} [{row.before_low:.3f}, {row.before_high:.3f}] -> "
            f"{row.acc_after:.3f} [{row.after_low:.3f}, {row.after_high:.3f}]  delta {row.delta:+.3f} "
            f"[{row.delta_low:+.3f}, {row.delta_high:+.3f}]  ({row.n_kept} heads kept, scope {row.scope}, "
            f"n={row.n_heldout}, chance {row.chance:.2f})"
        )
    if len(tasks):
        lines.append(
            f"  mean over tasks: {tasks['acc_before'].mean():.3f} -> {tasks['acc_after'].mean():.3f} "
            f"({tasks['delta'].mean():+.3f})"
        )
    lines += validation_lines(result.tables.get("validation"), cfg.keep, cfg.significance)
    rng = heads[heads["in_range"]]
    lines.append(
        f"  hidden sinks per input (in-range heads): mean {rng['hidden_sinks'].mean():.2f}, "
        f"max {rng['hidden_sinks'].max():.2f}"
    )
    tokens = result.tables.get("sink_tokens")
    if tokens is not None and len(tokens):
        top = ", ".join(f"{t.token!r} ({t.count})" for t in tokens.head(5).itertuples(index=False))
        lines.append(f"  most frequent hidden-sink tokens: {top}")
    return "\n".join(lines)


def _signed(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.3f}"


def validation_lines(table: pd.DataFrame | None, keep: str, significance: float) -> list[str]:
    """Per head search and measure: the held-out effect of the kept set, its interval, the null and
    the verdict (validated or not, and why not when no null could be drawn)."""
    if table is None:
        return []
    if not len(table):
        return [f"  held-out validation: no head search kept a head (keep={keep}), nothing to test"]
    n_null = int(table["n_null"].max())
    lines = [
        f"  held-out validation (keep={keep}): kept heads calibrated together vs up to {n_null} random "
        f"same-size sets of in-range heads outside them; validated = effect > 0, 95% interval above 0, "
        f"p <= {significance}"
    ]
    for row in table.itertuples(index=False):
        head = f"    {row.head_search!s:<14} {int(row.n_heads):>3} heads  {row.measure!s:<7}"
        effect = f"{_signed(row.effect)} [{_signed(row.effect_low)}, {_signed(row.effect_high)}]"
        if int(row.n_null) == 0:
            null = f"no null: {int(row.null_pool)} in-range heads outside the set, fewer than it holds"
        else:
            null = (
                f"null {_signed(row.null_mean)} ({int(row.n_null)} sets), percentile {row.percentile:.0f}, "
                f"p {row.p_value:.3f}"
            )
        verdict = "VALIDATED" if bool(row.validated) else "not validated"
        lines.append(f"{head} {effect}  {null}  {verdict}  (n={int(row.n_inputs)})")
    return lines
