"""The CLI summary of a vit-heads result: probes, the most important heads, the metrics' agreement,
partial pruning, the attention-distance trend, the pattern clusters and the vision sinks."""

from __future__ import annotations

from typing import Any

import pandas as pd

from analyses import validation as va
from analyses.base import AnalysisResult
from analyses.vit_heads.config import IMPORTANCE_METRICS


def _interval(r: Any, metric: str) -> str:
    return f"{getattr(r, metric):.3g} [{getattr(r, metric + '_low'):.3g}, {getattr(r, metric + '_high'):.3g}]"


def _importance_lines(result: AnalysisResult) -> list[str]:
    heads = result.heads
    notes = result.notes
    lines = []
    pruned = heads[heads["pruned"]]
    stats = notes.get("statistics", {})
    if len(pruned) and stats:
        counts = ", ".join(
            f"{m} {stats[m]['interval_excludes_zero']}" for m in IMPORTANCE_METRICS if m in stats
        )
        lines.append(
            f"  intervals: 95% bootstrap over {stats['discovery_images']} discovery images; heads whose "
            f"interval excludes 0 (of {len(pruned)}): {counts}; accuracy drop exactly 0 for "
            f"{stats['accuracy_drop']['exactly_zero']}"
        )
        for metric in ("cosine_drop", "confidence_drop"):
            top = pruned.nlargest(3, metric)
            lines.append(
                f"  top by {metric}: "
                + ", ".join(f"L{r.layer}H{r.head} {_interval(r, metric)}" for r in top.itertuples())
            )
    top_grad = heads.nlargest(3, "grad_importance")
    lines.append(
        "  top by gradient: "
        + ", ".join(f"L{r.layer}H{r.head} {r.grad_importance:.3g}" for r in top_grad.itertuples())
    )
    ranking = result.tables.get("ranking")
    if ranking is not None and len(ranking):
        for r in ranking.itertuples():
            lines.append(
                f"  {r.metric} vs the exact {r.reference} over {r.n_heads} heads: Spearman {r.spearman:.2f}, "
                f"finds {r.top_found} of the top {r.top_heads}; ranks {r.reference_best} (the largest) #{r.best_rank}"
            )
    lines += _concentration_lines(result.tables.get("concentration"))
    lines += _validation_lines(result.tables.get("validation"))
    return lines


def _concentration_lines(table: pd.DataFrame | None) -> list[str]:
    if table is None or not len(table):
        return []
    lines = []
    for r in table.itertuples():
        lines.append(
            f"  top {r.top_heads} of {r.n_heads} heads hold {r.share:.0%} [{r.share_low:.0%}, {r.share_high:.0%}] "
            f"of the {r.metric} vs {r.null_mean:.0%} [{r.null_low:.0%}, {r.null_high:.0%}] with heads "
            f"shuffled per image (p = {r.p_value:.2g})"
        )
    return lines


def _validation_lines(table: pd.DataFrame | None) -> list[str]:
    if table is None or not len(table):
        return ["  held-out validation: none (validate_top=0)"]
    first = table.iloc[0]
    return [f"  tested heads {first['heads']} on {first['inputs']}", *va.summary_lines(table)]


def _partial_lines(partial: pd.DataFrame) -> list[str]:
    lines: list[str] = []
    if not len(partial):
        return lines
    full = partial[partial["kind"] == "full"].nlargest(3, "confidence_drop")
    part = partial[partial["kind"] != "full"].merge(full[["layer", "head"]], on=["layer", "head"])
    if len(full) < partial.loc[partial["kind"] == "full"].shape[0]:
        lines.append(f"  partial pruning (top {len(full)} of the partially pruned heads):")
    for (layer, head), group in part.groupby(["layer", "head"]):
        lines.append(
            f"  partial L{layer}H{head}: "
            + ", ".join(
                f"{r.condition} {r.share_of_full:.2f} ({r.cosine_share_of_full:.2f})"
                for r in group.itertuples()
            )
            + " of the full confidence (cosine) drop"
        )
    return lines


def _attention_lines(result: AnalysisResult) -> list[str]:
    heads = result.heads
    notes = result.notes
    trend = notes["trend"]["mean_attention_distance"]
    mad = heads.groupby("layer")["mean_attention_distance"].mean()
    lines = [
        f"  mean attention distance (patches): layer 0 {mad.iloc[0]:.2f} -> layer {mad.index[-1]} {mad.iloc[-1]:.2f} "
        f"(slope {trend['slope']:+.3f}/layer, r {trend['r']:.2f})"
    ]
    info = result.tables["cluster_info"]
    if len(info):
        lines.append(
            f"  {len(info)} pattern clusters over {notes['patterns']['maps']} maps: "
            + ", ".join(
                f"#{int(r.cluster)} {r.map_share:.0%} (dist {r.prototype_distance:.1f}, self {r.prototype_self:.2f})"
                for r in info.itertuples()
            )
        )
    return lines


def _sink_lines(result: AnalysisResult) -> list[str]:
    heads = result.heads
    notes = result.notes
    lines = []
    norms = result.tables["norms"]
    art = norms[(norms["token"] == "artifacts") & (norms["n_tokens"] > 0)]
    if len(art):
        best = art.loc[art["ratio"].idxmax()]
        lines.append(
            f"  artifact tokens in layers {int(art['layer'].min())}-{int(art['layer'].max())}: up to "
            f"{art['n_tokens'].max():.1f} per image, norm {best['ratio']:.1f}× the other patches (layer {int(best['layer'])})"
        )
        col = f"alpha_artifacts_{notes['input_set']}"
        top = heads.nlargest(3, col)
        lines.append(
            "  heads attending most to them: "
            + ", ".join(f"L{r.layer}H{r.head} {getattr(r, col):.2f}" for r in top.itertuples())
        )
    else:
        lines.append("  no artifact tokens above the norm threshold")
    input_set = notes["input_set"]
    n_sink = int((heads[f"sink_rate_{input_set}"] > 0.5).sum())
    lines.append(
        f"  mean attention to CLS: {heads[f'alpha0_{input_set}'].mean():.3f}; heads with alpha0 > "
        f"{result.config.sink_eps} on most images: {n_sink}/{len(heads)}"
    )
    return lines


def summary(result: AnalysisResult) -> str:
    """A few lines for the CLI: probes, the most important heads, agreement, strength trend, clusters, sinks."""
    cfg = result.config
    heads = result.heads
    notes = result.notes
    probes = result.tables["probes"]
    lines = [
        f"vit-heads of {result.model_info['name']}: {cfg.ablation} ablation, {notes['pruned_heads']}/{len(heads)} "
        f"heads pruned on {notes['eval_images']} discovery images ({notes.get('held_out_images', 0)} held out)"
    ]
    acc = ", ".join(
        f"{r.task} {r.test_accuracy:.2f} (chance {r.chance:.2f})"
        for r in probes.itertuples()
        if r.status == "ok"
    )
    lines.append(f"  probe test accuracy: {acc}")
    lines += _importance_lines(result)
    lines += _partial_lines(result.tables["partial"])
    lines += _attention_lines(result)
    lines += _sink_lines(result)
    return "\n".join(lines)
