"""The analyses the CLI, the demo and the dashboard know: config class, run function, summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from analyses import act, census, circuits, retrieval, sinks, vision_heads, vit_heads
from analyses.base import AnalysisResult
from probe.loading import LoadedModel


@dataclass(frozen=True)
class AnalysisEntry:
    name: str
    config_cls: type[Any]
    run: Callable[[LoadedModel, Any], AnalysisResult]
    summary: Callable[[AnalysisResult], str]


def _census_summary(result: AnalysisResult) -> str:
    heads = result.heads
    lines = [f"census of {result.model_info['name']}: {len(heads)} heads"]
    for metric in census.METRICS:
        top = heads.nlargest(3, metric)
        best = ", ".join(f"L{r.layer}H{r.head} {getattr(r, metric):.2f}" for r in top.itertuples())
        lines.append(f"  {metric:<16} mean {heads[metric].mean():.3f}; top: {best}")
    return "\n".join(lines)


ANALYSES: dict[str, AnalysisEntry] = {
    "census": AnalysisEntry("census", census.CensusConfig, census.run_census, _census_summary),
    "sinks": AnalysisEntry("sinks", sinks.SinksConfig, sinks.run_sinks, sinks.summary),
    "act": AnalysisEntry("act", act.ActConfig, act.run_act, act.summary),
    "retrieval": AnalysisEntry(
        "retrieval", retrieval.RetrievalConfig, retrieval.run_retrieval, retrieval.summary
    ),
    "ioi": AnalysisEntry("ioi", circuits.CircuitConfig, circuits.run_ioi, circuits.summary),
    "colored-objects": AnalysisEntry(
        "colored-objects", circuits.CircuitConfig, circuits.run_colored_objects, circuits.summary
    ),
    "circuit-reuse": AnalysisEntry(
        "circuit-reuse", circuits.CircuitConfig, circuits.run_circuit_reuse, circuits.summary
    ),
    "vit-heads": AnalysisEntry(
        "vit-heads", vit_heads.VitHeadsConfig, vit_heads.run_vit_heads, vit_heads.summary
    ),
    "vhd": AnalysisEntry("vhd", vision_heads.VhdConfig, vision_heads.run_vhd, vision_heads.summary),
    "vhr": AnalysisEntry("vhr", vision_heads.VhdConfig, vision_heads.run_vhr, vision_heads.summary),
}
