"""The few lines the CLI prints after an ACT run."""

from __future__ import annotations

from analyses import validation
from analyses.act.heldout import null_missing
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
    lines += validation_lines(result)
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


def validation_lines(result: AnalysisResult) -> list[str]:
    """The held-out validation of each head search's kept set (the shared lines), with the keep rule
    and why a set has no null."""
    table = result.tables.get("validation")
    if table is None:
        return []
    cfg = result.config
    rule = f"  kept heads by keep={cfg.keep}" + (
        f" (Benjamini-Hochberg at {cfg.significance})" if cfg.keep == "significant" else ""
    )
    n_in_range = int(result.tables["heads"]["in_range"].sum())
    lines = [f"{rule}; validated against random sets of in-range heads outside them"]
    lines += validation.summary_lines(table)
    lines += [f"    no null for {why}" for why in null_missing(table, n_in_range)] if len(table) else []
    tasks = result.tables["tasks"]
    empty = sorted(set(map(str, tasks.loc[tasks["n_kept"] == 0, "scope"])))
    lines += [f"    {scope}: no head kept, nothing to validate" for scope in empty]
    return lines
