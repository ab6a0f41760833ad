"""The three runs (ioi, colored-objects, circuit-reuse): each task analysed end to end, the tables
of the result, and the summary for the terminal."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.base import AnalysisResult, heads_frame
from analyses.circuits import heldout
from analyses.circuits.classes import Discovery, discover, screened_senders
from analyses.circuits.config import (
    CLASSES,
    SIGNATURES,
    STAGE_CLASSES,
    STAGE_RECEIVERS,
    STAGES,
    TASK_LABELS,
    CircuitConfig,
    HeadClass,
    TaskName,
)
from analyses.circuits.data import TASK_BUILDERS, TaskData
from analyses.circuits.faithfulness import mean_ablated_logit_diff, random_head_sets, template_means
from analyses.circuits.forward import (
    GroupCache,
    Runner,
    SignatureSums,
    cache_group,
    chunk_slices,
    progress_bar,
)
from analyses.circuits.patching import activation_patching, attribution_patching
from analyses.circuits.reuse import intervene, intervention_heads, overlap_curve, rank_correlations
from analyses.validation import evidence_columns, summary_lines
from probe.loading import LoadedModel
from probe.types import Head


def bootstrap_mean(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean and a 95% percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, values.size, (n_boot, values.size))].mean(1)
    return float(values.mean()), float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


@dataclass
class TaskAnalysis:
    """Everything measured on one task."""

    data: TaskData
    caches: list[GroupCache]
    metrics: dict[str, Any]
    items: pd.DataFrame
    activation: np.ndarray  # [L, H]
    discovery: Discovery
    faithfulness: pd.DataFrame
    ablation: pd.DataFrame
    attribution: np.ndarray  # [L, H], first-order estimate of activation patching
    compensation: np.ndarray  # [L, H], direct-effect gain when the name movers are ablated
    validation: pd.DataFrame  # held-out tests of every class (analyses.circuits.heldout)


def prepare(
    runner: Runner, task: TaskName, cfg: CircuitConfig
) -> tuple[TaskData, list[GroupCache], dict[str, np.ndarray]]:
    """The task's prompts; per chunk of at most ``batch_size // 4`` prompts, its clean/corrupted
    cache; and the attention signatures, read during the same clean passes."""
    data = TASK_BUILDERS[task](runner.model, cfg.n_items, cfg.seed, "discovery")
    per = max(1, cfg.batch_size // 4)
    chunks = [g.subset(rows) for g in data.groups for rows in chunk_slices(len(g), per)]
    bar = progress_bar(len(chunks), f"{task} clean/corrupted runs", cfg.progress)
    signatures = SignatureSums(runner.model.n_layers, runner.model.n_heads)
    caches = []
    for chunk in chunks:
        caches.append(cache_group(runner, chunk, signatures))
        bar.update(1)
    bar.close()
    return data, caches, signatures.means()


def _metrics(
    task: TaskName, data: TaskData, caches: Sequence[GroupCache], cfg: CircuitConfig
) -> tuple[dict[str, Any], pd.DataFrame]:
    clean = torch.cat([c.clean.logit_diff for c in caches]).double().numpy()
    corrupt = torch.cat([c.corrupt.logit_diff for c in caches]).double().numpy()
    cand = torch.cat([c.clean.candidate_logits.argmax(-1) == c.group.answer_index for c in caches]).numpy()
    tops = [c.clean.top_token for c in caches]
    vocab = torch.cat(
        [t == c.group.right for t, c in zip(tops, caches, strict=True) if t is not None]
    ).numpy()
    items = np.concatenate([c.group.items for c in caches])
    ld, ld_lo, ld_hi = bootstrap_mean(clean, cfg.n_boot, cfg.seed)
    acc, acc_lo, acc_hi = bootstrap_mean(cand.astype(float), cfg.n_boot, cfg.seed)
    vacc, vacc_lo, vacc_hi = bootstrap_mean(vocab.astype(float), cfg.n_boot, cfg.seed)
    n_cand = int(caches[0].group.candidates.shape[1])
    row = {
        "task": task,
        "n_items": int(clean.size),
        "logit_diff": ld,
        "logit_diff_low": ld_lo,
        "logit_diff_high": ld_hi,
        "logit_diff_corrupt": float(corrupt.mean()),
        "gap": float(clean.mean() - corrupt.mean()),
        "accuracy": acc,
        "accuracy_low": acc_lo,
        "accuracy_high": acc_hi,
        "accuracy_chance": 1.0 / n_cand,
        "vocab_accuracy": vacc,
        "vocab_accuracy_low": vacc_lo,
        "vocab_accuracy_high": vacc_hi,
    }
    frame = (
        pd.DataFrame(
            {
                "task": pd.Series([task] * items.size, dtype=object),
                "item": items.astype(np.int64),
                "text": pd.Series([data.texts[i] for i in items], dtype=object),
                "answer": pd.Series([data.answers[i] for i in items], dtype=object),
                "logit_diff": clean,
                "logit_diff_corrupt": corrupt,
                "correct": cand.astype(bool),
                "vocab_correct": vocab.astype(bool),
            }
        )
        .sort_values("item", kind="stable")
        .reset_index(drop=True)
    )
    return row, frame


def analyse_task(runner: Runner, task: TaskName, cfg: CircuitConfig) -> TaskAnalysis:
    """Metrics, activation patching, staged discovery, faithfulness and the name-mover ablation."""
    model = runner.model
    data, caches, signatures = prepare(runner, task, cfg)
    metrics, items = _metrics(task, data, caches, cfg)
    all_heads: list[Head] = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]
    attribution = attribution_patching(runner, caches)
    screened = screened_senders(model, attribution, cfg.max_senders)
    exact = activation_patching(runner, caches, screened, batch_size=cfg.batch_size, progress=cfg.progress)
    activation = np.full((model.n_layers, model.n_heads), np.nan)
    for head, value in zip(screened, exact, strict=True):
        activation[head] = value
    found = discover(runner, caches, task, cfg, signatures, attribution)
    means = template_means(runner, caches, data.groups)
    movers = found.classes.get("name_mover", [])
    found.classes["backup_mover"], compensation = heldout.find_backups(runner, caches, means, movers, cfg)
    circuit = sorted({h for heads in found.classes.values() for h in heads})
    full = float(torch.cat([c.clean.logit_diff for c in caches]).double().mean())
    randoms = random_head_sets(model, len(circuit), cfg.n_random, cfg.seed, exclude=circuit)
    keep_sets: list[list[Head]] = [circuit, [], *randoms]
    lds = mean_ablated_logit_diff(runner, caches, means, keep_sets, batch_size=cfg.batch_size)
    labels = ["found", "empty", *["random"] * len(randoms)]
    faith = pd.DataFrame(
        {
            "task": task,
            "circuit": labels,
            "index": [0, 0, *range(len(randoms))],
            "size": [len(k) for k in keep_sets],
            "logit_diff": lds,
            "full_logit_diff": full,
            "faithfulness": lds / full if full else np.nan,
        }
    )
    ablation_rows = []
    if movers:
        rand = random_head_sets(model, len(movers), cfg.n_random, cfg.seed + 1, exclude=movers)
        sets = [movers, *rand]
        keep = [[h for h in all_heads if h not in set(s)] for s in sets]
        ab = mean_ablated_logit_diff(runner, caches, means, keep, batch_size=cfg.batch_size)
        for i, (s, value) in enumerate(zip(sets, ab, strict=True)):
            ablation_rows.append(
                {
                    "task": task,
                    "ablated": "name_movers" if i == 0 else "random",
                    "index": max(0, i - 1),
                    "size": len(s),
                    "logit_diff": float(value),
                    "drop": full - float(value),
                    "heads": " ".join(f"L{a}H{b}" for a, b in s),
                }
            )
    ablation = pd.DataFrame(
        ablation_rows, columns=["task", "ablated", "index", "size", "logit_diff", "drop", "heads"]
    )
    held = heldout.build(runner, task, cfg)
    validation = heldout.validate(runner, task, held, found.classes, cfg)
    return TaskAnalysis(
        data,
        caches,
        metrics,
        items,
        activation,
        found,
        faith,
        ablation,
        attribution,
        compensation,
        validation,
    )


SCORE_COLUMNS = ("activation", *STAGES)
HEADS_METRICS = (*SCORE_COLUMNS, *SIGNATURES, "previous_token")


def _prefix(task: TaskName) -> str:
    return "ioi" if task == "ioi" else "co"


def task_tables(model: LoadedModel, analyses: Sequence[TaskAnalysis]) -> dict[str, pd.DataFrame]:
    """The tables of one or two task analyses (every table has a ``task`` column but ``heads``)."""
    columns: dict[str, np.ndarray] = {}
    classes: dict[str, list[str]] = {}
    scores_rows = []
    for a in analyses:
        task, found = a.data.name, a.discovery
        px = _prefix(task)
        columns[f"{px}_activation"] = a.activation
        columns[f"{px}_compensation"] = a.compensation
        columns[f"{px}_attribution"] = a.attribution
        for stage in STAGES:
            columns[f"{px}_{stage}"] = found.scores[stage]
        for name in [*SIGNATURES, "previous_token"]:
            columns[f"{px}_{name}"] = found.signatures[name]
        labels = np.full((model.n_layers, model.n_heads), "", dtype=object)
        for cls in CLASSES:
            for head in found.classes.get(cls, []):
                labels[head] = cls if not labels[head] else f"{labels[head]}+{cls}"
        classes[f"{px}_class"] = list(labels.ravel())
        for axis, grid in [
            ("attribution", a.attribution),
            ("activation", a.activation),
            *found.scores.items(),
        ]:
            for (layer, h), v in np.ndenumerate(grid):
                scores_rows.append((task, axis, layer, h, float(v)))
    heads = heads_frame(model, columns)
    for name, labels_of in classes.items():
        heads[name] = pd.Series(labels_of, dtype=object)
    for a in analyses:
        tested = a.validation[~a.validation["role"].isin(heldout.JOINT_ROLES)]
        heads = evidence_columns(heads, tested, _prefix(a.data.name))
    scores = pd.DataFrame(scores_rows, columns=["task", "stage", "layer", "head", "score"])
    scores["task"] = scores["task"].astype(object)
    scores["stage"] = scores["stage"].astype(object)

    circuit_rows, receiver_rows, edge_rows = [], [], []
    for a in analyses:
        found = a.discovery
        for stage in STAGES:
            backup: tuple[HeadClass, ...] = ("backup_mover",) if stage == "logits" else ()
            for cls in (*STAGE_CLASSES[stage], *backup):
                for rank, (layer, h) in enumerate(found.classes.get(cls, [])):
                    circuit_rows.append(
                        {
                            "task": a.data.name,
                            "class": cls,
                            "stage": stage,
                            "layer": layer,
                            "head": h,
                            "rank": rank,
                            "score": float(found.scores[stage][layer, h]),
                            "activation": float(a.activation[layer, h]),
                            **{f"sig_{k}": float(v[layer, h]) for k, v in found.signatures.items()},
                        }
                    )
            heads_in, why = found.receivers[stage]
            for layer, h in heads_in:
                receiver_rows.append(
                    {
                        "task": a.data.name,
                        "stage": stage,
                        "input": STAGE_RECEIVERS[stage][0],
                        "layer": layer,
                        "head": h,
                        "stand_in": why.startswith("no "),
                        "why": why,
                    }
                )
        edge_rows += found.edges
    sig_cols = [f"sig_{k}" for k in [*SIGNATURES, "previous_token"]]
    return {
        "heads": heads,
        "scores": scores,
        "metrics": pd.DataFrame([a.metrics for a in analyses]),
        "items": pd.concat([a.items for a in analyses], ignore_index=True),
        "circuit": pd.DataFrame(
            circuit_rows,
            columns=["task", "class", "stage", "layer", "head", "rank", "score", "activation", *sig_cols],
        ),
        "receivers": pd.DataFrame(
            receiver_rows, columns=["task", "stage", "input", "layer", "head", "stand_in", "why"]
        ),
        "edges": pd.DataFrame(
            edge_rows,
            columns=[
                "task",
                "stage",
                "sender_layer",
                "sender_head",
                "receiver_layer",
                "receiver_head",
                "input",
                "share",
            ],
        ),
        "faithfulness": pd.concat([a.faithfulness for a in analyses], ignore_index=True),
        "ablation": pd.concat([a.ablation for a in analyses], ignore_index=True),
        "validation": pd.concat([a.validation for a in analyses], ignore_index=True),
    }


def _result(
    analysis: str,
    model: LoadedModel,
    cfg: CircuitConfig,
    analyses: Sequence[TaskAnalysis],
    extra: Mapping[str, pd.DataFrame],
    timings: dict[str, float],
    notes: dict[str, Any],
) -> AnalysisResult:
    tables = task_tables(model, analyses)
    tables.update(extra)
    arrays = {
        f"scores_{a.data.name}": np.stack([a.activation, *(a.discovery.scores[s] for s in STAGES)])
        for a in analyses
    }
    for a in analyses:
        notes[f"{a.data.name}_classes"] = {
            cls: [f"L{x}H{y}" for x, y in heads] for cls, heads in a.discovery.classes.items()
        }
    notes["score_axes"] = list(SCORE_COLUMNS)
    return AnalysisResult(
        analysis=analysis,
        model_info=model.describe(),
        config=replace(cfg),
        tables=tables,
        arrays=arrays,
        seeds={"seed": cfg.seed},
        timings=timings,
        notes=notes,
    )


def run_ioi(model: LoadedModel, config: CircuitConfig | None = None) -> AnalysisResult:
    """``headlab run ioi``: metrics, patching, the staged circuit and its faithfulness on IOI."""
    return _run_single(model, config, "ioi")


def run_colored_objects(model: LoadedModel, config: CircuitConfig | None = None) -> AnalysisResult:
    """``headlab run colored-objects``: the same on one-shot Colored Objects."""
    return _run_single(model, config, "colored_objects")


def _run_single(model: LoadedModel, config: CircuitConfig | None, task: TaskName) -> AnalysisResult:
    cfg = config or CircuitConfig()
    cfg.validate()
    runner = Runner(model)
    t0 = time.perf_counter()
    analysis = analyse_task(runner, task, cfg)
    timings: dict[str, float] = {task: round(time.perf_counter() - t0, 3)}
    name = "ioi" if task == "ioi" else "colored-objects"
    return _result(name, model, cfg, [analysis], {}, timings, {})


def run_circuit_reuse(model: LoadedModel, config: CircuitConfig | None = None) -> AnalysisResult:
    """``headlab run circuit-reuse``: both tasks, their stage overlap, and the inhibition intervention."""
    cfg = config or CircuitConfig()
    cfg.validate()
    runner = Runner(model)
    timings: dict[str, float] = {}
    done = []
    tasks: tuple[TaskName, ...] = ("ioi", "colored_objects")
    for task in tasks:
        t0 = time.perf_counter()
        done.append(analyse_task(runner, task, cfg))
        timings[task] = round(time.perf_counter() - t0, 3)
    ioi_a, co_a = done
    t0 = time.perf_counter()
    overlap = overlap_curve(ioi_a.discovery.scores, co_a.discovery.scores, cfg.reuse_percents)
    overlap.insert(0, "source", "path_patching")
    act = overlap_curve({"logits": ioi_a.activation}, {"logits": co_a.activation}, cfg.reuse_percents)
    act = act[act["stage"] == "logits"].assign(stage="activation")
    act.insert(0, "source", "activation_patching")
    overlap = pd.concat([overlap, act], ignore_index=True)
    corr = rank_correlations(ioi_a.discovery.scores, co_a.discovery.scores)
    act_corr = rank_correlations({"logits": ioi_a.activation}, {"logits": co_a.activation}).assign(
        stage="activation"
    )
    corr = pd.concat([corr, act_corr], ignore_index=True)

    heads, why = intervention_heads(ioi_a.discovery)
    randoms = random_head_sets(model, len(heads), cfg.n_random, cfg.seed + 2, exclude=heads)
    sets: list[list[Head]] = [[], heads, *randoms]
    outcome = intervene(runner, co_a.data.groups, sets, batch_size=cfg.batch_size)
    rows = []
    chance = float(co_a.metrics["accuracy_chance"])
    base = outcome[0]["candidate_correct"].astype(float)
    for i, (s, res) in enumerate(zip(sets, outcome, strict=True)):
        label = "before" if i == 0 else "ioi_heads" if i == 1 else "random"
        acc = bootstrap_mean(res["candidate_correct"].astype(float), cfg.n_boot, cfg.seed)
        vacc = bootstrap_mean(res["vocab_correct"].astype(float), cfg.n_boot, cfg.seed)
        change = bootstrap_mean(
            res["candidate_correct"].astype(float) - base, cfg.n_boot, cfg.seed
        )  # paired per item
        rows.append(
            {
                "condition": label,
                "index": max(0, i - 2),
                "n_heads": len(s),
                "heads": " ".join(f"L{a}H{b}" for a, b in s),
                "accuracy": acc[0],
                "accuracy_low": acc[1],
                "accuracy_high": acc[2],
                "change": change[0],
                "change_low": change[1],
                "change_high": change[2],
                "chance": chance,
                "vocab_accuracy": vacc[0],
                "vocab_accuracy_low": vacc[1],
                "vocab_accuracy_high": vacc[2],
                "logit_diff": float(res["logit_diff"].mean()),
            }
        )
    intervention = pd.DataFrame(rows)
    timings["reuse"] = round(time.perf_counter() - t0, 3)
    notes = {"intervention_heads": why}
    return _result(
        "circuit-reuse",
        model,
        cfg,
        done,
        {"overlap": overlap, "rank_correlation": corr, "intervention": intervention},
        timings,
        notes,
    )


def summary(result: AnalysisResult) -> str:
    """A few lines for the terminal."""
    t = result.tables
    lines = [f"{result.analysis} on {result.model_info['name']}"]
    for row in t["metrics"].itertuples():
        lines.append(
            f"  {TASK_LABELS[row.task]}: logit diff {row.logit_diff:.2f} [{row.logit_diff_low:.2f}, "
            f"{row.logit_diff_high:.2f}] (corrupted {row.logit_diff_corrupt:.2f}); accuracy {row.accuracy:.3f} "
            f"(chance {row.accuracy_chance:.2f}), top-1 over the vocabulary {row.vocab_accuracy:.3f}"
        )
    for task, group in t["circuit"].groupby("task", sort=False):
        by_class = group.groupby("class", sort=False)
        text = "; ".join(
            f"{cls} " + " ".join(f"L{r.layer}H{r.head}" for r in g.itertuples()) for cls, g in by_class
        )
        lines.append(f"  {TASK_LABELS[str(task)]} circuit: {text or 'no head passed both tests'}")
    for task, group in t["faithfulness"].groupby("task", sort=False):
        found = group[group["circuit"] == "found"].iloc[0]
        rand = group[group["circuit"] == "random"]["faithfulness"]
        lines.append(
            f"  faithfulness ({TASK_LABELS[str(task)]}, {int(found['size'])} heads, mean ablation): "
            f"{found['faithfulness']:.2f} vs random {rand.mean():.2f} ± {rand.std(ddof=0):.2f}"
        )
    for _, part in t["ablation"].groupby("task", sort=False):
        movers = part[part["ablated"] == "name_movers"]
        rand = part[part["ablated"] == "random"]["drop"]
        if len(movers) and len(rand):
            drop = float(movers["drop"].iloc[0])
            pct = 100.0 * float((rand < drop).mean())
            lines.append(
                f"  name-mover ablation on the discovery prompts: drop {drop:.2f} vs random {rand.mean():.2f} "
                f"± {rand.std(ddof=0):.2f} ({pct:.0f}th percentile of {len(rand)} sets)"
            )
    if "validation" in t:
        lines += summary_lines(t["validation"])
    if "overlap" in t:
        o = t["overlap"]
        at2 = o[(o["source"] == "path_patching") & (o["stage"] == "all") & (np.isclose(o["percent"], 2.0))]
        if len(at2):
            r = at2.iloc[0]
            lines.append(
                f"  reuse: {int(r['shared'])} of {int(r['k'])} top-2% stage heads shared ({r['overlap']:.0%})"
            )
        iv = t["intervention"]
        before = iv[iv["condition"] == "before"].iloc[0]
        target = iv[iv["condition"] == "ioi_heads"].iloc[0]
        rand = iv[iv["condition"] == "random"]["accuracy"]
        lines.append(
            f"  intervention on Colored Objects: accuracy {before['accuracy']:.3f} -> {target['accuracy']:.3f} "
            f"with {int(target['n_heads'])} IOI heads; random heads {rand.mean():.3f} ± {rand.std(ddof=0):.3f}"
        )
    return "\n".join(lines)
