"""Head importance by pruning: full and partial pruning of head outputs, the gradient importance,
and the agreement of the metrics. See docs/analyses/vit-heads.md (importance).

Full pruning costs one forward per (head, eval image); :func:`pruned_embeddings` packs many
(head, image) pairs into one batch, each gated by its own query mask.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np
import pandas as pd
import torch

from analyses.vit_heads.config import REGIONS, AblationMode, VitHeadsConfig
from analyses.vit_heads.data import patch_grid, rows_and_labels
from analyses.vit_heads.probes import LinearProbe, unit
from probe import vision
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.types import Head


@dataclass(frozen=True)
class PruneCondition:
    """One head removed (with ``others``, a set of heads), at every token (``query_mask`` None) or
    only at the ``[T]`` bool query mask."""

    head: Head
    name: str = "full"
    query_mask: torch.Tensor | None = field(default=None, compare=False)
    others: tuple[Head, ...] = ()

    @property
    def heads(self) -> list[Head]:
        return [self.head, *self.others]

    @property
    def start(self) -> int:
        """The first layer the condition changes: the layers before it run as in the intact model."""
        return min(h[0] for h in self.heads)


def _layer_inputs(model: LoadedModel, pixels: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
    """The residual stream entering every layer ``[L] x [N, T, d]`` of the intact model, and the
    output of layer 0 (its structure is what a skipped layer returns)."""
    names = model.extra["modules"]["layers"]
    seen: list[torch.Tensor | None] = [None] * len(names)
    template: list[Any] = [None]
    handles = []
    for i, name in enumerate(names):
        module = model.hf_model.get_submodule(name)

        def pre(_: torch.nn.Module, args: tuple[Any, ...], i: int = i) -> None:
            seen[i] = args[0].detach()

        handles.append(module.register_forward_pre_hook(pre))
    handles.append(
        model.hf_model.get_submodule(names[0]).register_forward_hook(
            lambda _m, _a, out: template.__setitem__(0, out)
        )
    )
    try:
        with torch.no_grad():
            vision.forward(model, pixels)
    finally:
        for handle in handles:
            handle.remove()
    if any(s is None or not isinstance(s, torch.Tensor) for s in seen):
        raise ConfigError(f"{model.name}: a layer ran without its hidden states as first argument")
    return [s for s in seen if s is not None], template[0]


@contextlib.contextmanager
def _skip_layers(model: LoadedModel, start: int, hidden: torch.Tensor, template: Any) -> Iterator[None]:
    """Layers below ``start`` return ``hidden`` (the intact input of layer ``start``) uncomputed."""
    names = model.extra["modules"]["layers"][:start]
    modules = [model.hf_model.get_submodule(n) for n in names]
    out = (hidden, *template[1:]) if isinstance(template, tuple) else hidden
    saved = [vars(m).get("forward") for m in modules]

    def skip(*args: Any, **kwargs: Any) -> Any:
        return out

    try:
        for m in modules:
            m.forward = skip
        yield
    finally:
        for m, old in zip(modules, saved, strict=True):
            if old is None:
                vars(m).pop("forward", None)
            else:
                m.forward = old


def pruned_embeddings(
    model: LoadedModel,
    pixels: torch.Tensor,
    conditions: Sequence[PruneCondition],
    *,
    mode: AblationMode = "zero",
    means: Mapping[int, torch.Tensor] | None = None,
    batch_size: int = 16,
    resume: bool = True,
    progress: bool = False,
    desc: str = "pruning",
) -> torch.Tensor:
    """Embeddings ``[n_conditions, n_images, d_embed]`` of ``pixels`` under each condition.

    Every (condition, image) pair is one row; ``batch_size`` rows share a forward, each condition
    gated by its own :func:`probe.vision.gate_heads` whose ``[batch, T]`` query mask selects its
    rows (and, for partial pruning, its queries), so conditions never touch each other's rows.
    ``resume``: a condition whose first pruned head sits in layer ``l`` starts from the intact
    residual stream entering layer ``l`` (one intact pass per group of ``batch_size`` images
    records it); the layers before ``l`` are not run again, which is exact, since they do not
    see the pruned head. ``mode="mean"`` needs ``means`` (:func:`probe.vision.mean_head_outputs`).
    """
    from tqdm.auto import tqdm

    if mode not in get_args(AblationMode):
        raise ConfigError(f"mode must be 'zero' or 'mean', got {mode!r}")
    if mode == "mean" and means is None:
        raise ConfigError("mode='mean' needs means; compute them with probe.vision.mean_head_outputs")
    n_images, n_tokens = int(pixels.shape[0]), model.n_ctx
    batch_size = max(1, batch_size)
    out = torch.zeros(len(conditions), n_images, int(model.extra["embedding_dim"]))
    groups = [np.arange(g, min(g + batch_size, n_images)) for g in range(0, n_images, batch_size)]
    order = sorted(range(len(conditions)), key=lambda c: (conditions[c].start, c))
    total = sum(-(-len(conditions) * len(g) // batch_size) for g in groups)
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False)
    for group in groups:
        inputs, template = _layer_inputs(model, pixels[group]) if resume else ([], None)
        pairs = [(c, i) for c in order for i in range(len(group))]
        for first in range(0, len(pairs), batch_size):
            chunk = pairs[first : first + batch_size]
            cond_idx = torch.tensor([c for c, _ in chunk])
            local = torch.tensor([i for _, i in chunk])
            # the chunk's earliest first pruned layer (its rows are sorted by it)
            start = conditions[chunk[0][0]].start if resume else 0
            with contextlib.ExitStack() as stack:
                for c in torch.unique(cond_idx).tolist():
                    cond = conditions[int(c)]
                    mask = torch.zeros(len(chunk), n_tokens, dtype=torch.bool)
                    mask[cond_idx == c] = True if cond.query_mask is None else cond.query_mask.to(torch.bool)
                    stack.enter_context(
                        vision.gate_heads(
                            model,
                            cond.heads,
                            mode=mode,
                            means=means if mode == "mean" else None,
                            query_mask=mask,
                        )
                    )
                if start > 0:
                    stack.enter_context(_skip_layers(model, start, inputs[start][local], template))
                emb = vision.embed(model, pixels[group][local], batch_size=len(chunk))
            out[cond_idx, torch.as_tensor(group)[local]] = emb
            bar.update(1)
    bar.close()
    return out


def pooled_per_image(per_task: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-image values ``[..., N]`` whose mean over images is the mean over tasks of each task's
    mean over its labelled images (``per_task[t] [..., N]``, NaN where image ``i`` has no label).

    Image ``i`` contributes ``sum_t d_t,i · N / (T · n_t)`` (``T`` tasks with a labelled image,
    ``n_t`` of them for task ``t``), so a bootstrap over images of these values is a bootstrap of
    the task-averaged metric. Images without any label contribute 0.
    """
    arrays = [np.asarray(v, dtype=np.float64) for v in per_task.values()]
    if not arrays:
        raise ValueError("pooled_per_image needs at least one task")
    n = arrays[0].shape[-1]
    used = [a for a in arrays if np.isfinite(a).any(axis=tuple(range(a.ndim - 1))).any()]
    out = np.zeros(arrays[0].shape)
    for a in used:
        labelled = np.isfinite(a).reshape(-1, n).any(axis=0)
        out += np.nan_to_num(a, nan=0.0) * (n / (len(used) * int(labelled.sum())))
    return out if used else np.full(arrays[0].shape, np.nan)


@dataclass
class Effects:
    """What pruning did to the probes and the embedding, per condition ``[C]``; the per-image
    numbers behind them (``cosine``: 1 − cosine ``[C, N]``; per task the labelled ``rows`` and,
    pruned ``[C, n_t]`` and intact ``[n_t]``, whether the probe is right and the true-class
    probability)."""

    cosine_drop: np.ndarray
    accuracy: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]
    clean_accuracy: dict[str, float]
    clean_confidence: dict[str, float]
    cosine: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    correct: dict[str, np.ndarray] = field(default_factory=dict)
    prob: dict[str, np.ndarray] = field(default_factory=dict)
    clean_correct: dict[str, np.ndarray] = field(default_factory=dict)
    clean_prob: dict[str, np.ndarray] = field(default_factory=dict)

    def per_image(self) -> dict[str, np.ndarray]:
        """``[C, N]`` per metric: ``cosine_drop`` per image, and ``accuracy_drop`` and
        ``confidence_drop`` as :func:`pooled_per_image` contributions (their mean over images is the
        task-averaged drop; all NaN without tasks)."""
        n_cond, n = self.cosine.shape
        out = {"cosine_drop": self.cosine}
        for metric, pruned, clean in (
            ("accuracy_drop", self.correct, self.clean_correct),
            ("confidence_drop", self.prob, self.clean_prob),
        ):
            per_task = {}
            for task, rows in self.rows.items():
                full = np.full((n_cond, n), np.nan)
                full[:, rows] = clean[task][None, :] - pruned[task]
                per_task[task] = full
            out[metric] = pooled_per_image(per_task) if per_task else np.full((n_cond, n), np.nan)
        return out

    def accuracy_drop(self, task: str) -> np.ndarray:
        return self.clean_accuracy[task] - self.accuracy[task]

    def confidence_drop(self, task: str) -> np.ndarray:
        return self.clean_confidence[task] - self.confidence[task]

    def mean_drops(self) -> tuple[np.ndarray, np.ndarray]:
        """(accuracy drop, confidence drop) averaged over tasks, ``[C]`` each."""
        tasks = list(self.accuracy)
        if not tasks:
            nan = np.full(self.cosine_drop.shape, np.nan)
            return nan, nan.copy()
        acc = np.mean([self.accuracy_drop(t) for t in tasks], axis=0)
        conf = np.mean([self.confidence_drop(t) for t in tasks], axis=0)
        return acc, conf

    def long(self) -> pd.DataFrame:
        """Tidy: ``condition`` (index), ``task``, ``metric``, ``value``."""
        frames = [
            pd.DataFrame(
                {
                    "condition": np.arange(len(self.cosine_drop)),
                    "task": "embedding",
                    "metric": "cosine_drop",
                    "value": self.cosine_drop,
                }
            )
        ]
        for task in self.accuracy:
            for metric, values in (
                ("accuracy", self.accuracy[task]),
                ("accuracy_drop", self.accuracy_drop(task)),
                ("confidence", self.confidence[task]),
                ("confidence_drop", self.confidence_drop(task)),
            ):
                frames.append(
                    pd.DataFrame(
                        {"condition": np.arange(len(values)), "task": task, "metric": metric, "value": values}
                    )
                )
        return pd.concat(frames, ignore_index=True)


def pruning_effects(
    probes: Mapping[str, LinearProbe],
    labels: Mapping[str, np.ndarray],
    clean: torch.Tensor | np.ndarray,
    pruned: torch.Tensor | np.ndarray,
) -> Effects:
    """Per condition: probe accuracy and true-class confidence per task, and the embedding's cosine drop.

    ``labels[task]`` is an object array over the images (None where the image has no label for the
    task); ``clean`` is ``[n_images, D]``, ``pruned`` ``[n_conditions, n_images, D]``.
    """
    clean_np = np.asarray(clean, dtype=np.float64)
    pruned_np = np.asarray(pruned, dtype=np.float64)
    if pruned_np.ndim != 3 or pruned_np.shape[1:] != clean_np.shape:
        raise ConfigError(
            f"pruned must be [conditions, {clean_np.shape[0]}, {clean_np.shape[1]}], got {pruned_np.shape}"
        )
    cos = (unit(pruned_np) * unit(clean_np)[None]).sum(-1)  # [C, N]
    effects = Effects(1.0 - cos.mean(axis=1), {}, {}, {}, {}, cosine=1.0 - cos)
    for task, probe in probes.items():
        rows, y = rows_and_labels(labels[task])
        if rows.size == 0:
            continue
        clean_correct, clean_prob = probe.scores(clean_np[rows], y)
        scores = [probe.scores(p[rows], y) for p in pruned_np]
        effects.rows[task] = rows
        effects.clean_correct[task], effects.clean_prob[task] = clean_correct, clean_prob
        effects.correct[task] = np.asarray([s[0] for s in scores]).reshape(len(pruned_np), len(rows))
        effects.prob[task] = np.asarray([s[1] for s in scores]).reshape(len(pruned_np), len(rows))
        effects.clean_accuracy[task] = float(clean_correct.mean())
        effects.clean_confidence[task] = float(clean_prob.mean())
        effects.accuracy[task] = effects.correct[task].mean(axis=1)
        effects.confidence[task] = effects.prob[task].mean(axis=1)
    return effects


def head_gradients(
    model: LoadedModel,
    pixels: torch.Tensor,
    probes: Mapping[str, LinearProbe],
    labels: Mapping[str, np.ndarray],
    *,
    per_task: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Michel et al.'s importance ``mean_images |∂ CE / ∂ gate_h|`` ``[L, H]`` per task (or ``"all"``):
    the mean over the labelled images of :func:`head_gradients_per_image`."""
    per_image = head_gradients_per_image(
        model, pixels, probes, labels, per_task=per_task, batch_size=batch_size, progress=progress
    )
    return image_means(per_image)


def image_means(per_image: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean over the labelled images (rows without NaN) of each ``[N, ...]`` array (NaN: none)."""
    out = {}
    for key, g in per_image.items():
        labelled = np.isfinite(g.reshape(len(g), -1)).all(axis=1)
        out[key] = g[labelled].mean(0) if labelled.any() else np.full(g.shape[1:], np.nan)
    return out


def head_gradients_per_image(
    model: LoadedModel,
    pixels: torch.Tensor,
    probes: Mapping[str, LinearProbe],
    labels: Mapping[str, np.ndarray],
    *,
    per_task: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """``|∂ CE / ∂ gate_h|`` per image ``[N, L, H]`` per task (or ``"all"``; NaN rows: unlabelled).

    Each image has its own gates (:func:`probe.vision.gate_variables` with ``batch``), so one
    backward pass gives every image its own gradient. ``per_task``: one backward per task over the
    images labelled for it; else one backward of the summed cross-entropy of all the image's tasks.
    """
    from tqdm.auto import tqdm

    index = {t: probes[t].label_index([v if v is not None else "" for v in labels[t]]) for t in probes}
    has = {t: np.asarray([v is not None for v in labels[t]]) & (index[t] >= 0) for t in probes}
    keys = list(probes) if per_task else ["all"]
    n = int(pixels.shape[0])
    out = {k: np.full((n, model.n_layers, model.n_heads), np.nan) for k in keys}
    starts = range(0, n, max(1, batch_size))
    for start in tqdm(starts, desc="gradients", unit="batch", disable=not progress, leave=False):
        rows = np.arange(start, min(start + batch_size, n))
        with torch.enable_grad(), vision.gate_variables(model, batch=len(rows)) as gates:
            emb = vision.forward(model, pixels[rows]).embedding
            losses: dict[str, torch.Tensor] = {}
            for task, probe in probes.items():
                mask = has[task][rows]
                if not mask.any():
                    continue
                logp = torch.log_softmax(probe.logits(emb), dim=-1)
                y = torch.as_tensor(np.where(mask, index[task][rows], 0), device=logp.device)
                ce = -logp.gather(1, y[:, None])[:, 0]
                losses[task] = ce * torch.as_tensor(mask, device=ce.device, dtype=ce.dtype)
            if not losses:
                continue
            if per_task:
                for task, loss in losses.items():
                    (grad,) = torch.autograd.grad(loss.sum(), gates, retain_graph=True)
                    mask = has[task][rows]
                    out[task][rows[mask]] = grad.detach().abs().double().cpu().numpy()[mask]
            else:
                total = torch.stack(list(losses.values())).sum(0)
                (grad,) = torch.autograd.grad(total.sum(), gates)
                mask = np.any([has[t][rows] for t in losses], axis=0)
                out["all"][rows[mask]] = grad.detach().abs().double().cpu().numpy()[mask]
    return out


def query_masks(
    model: LoadedModel, regions: Sequence[str] = REGIONS, bands: Sequence[float] = (0.0, 0.5, 1.0)
) -> list[dict[str, Any]]:
    """Partial-pruning query sets: ``{name, kind, mask [T] bool, inner, outer}`` per region and band.

    Regions: ``cls`` (the prefix tokens alone: CLS, and DeiT's distillation token; kind
    ``prefix``), ``centre`` (rows and columns from ``n // 4`` to ``n - n // 4``), ``border`` (the
    other patches), quadrants (top = rows below ``rows // 2``, bottom = from ``rows - rows // 2``: an
    odd grid's middle row and column belong to no quadrant). Bands: patches whose centre lies at
    ``[edge_i, edge_i+1) × r_max`` from the grid centre (``r_max`` the largest such distance; the
    last band includes it), in patch units. Only ``cls`` holds prefix tokens. Empty sets are left out.
    """
    rows, cols = (int(g) for g in model.extra["grid"])
    half_r, half_c = rows // 2, cols // 2
    spans: dict[str, tuple[range, range]] = {
        "centre": (range(rows // 4, rows - rows // 4), range(cols // 4, cols - cols // 4)),
        "top_left": (range(0, half_r), range(0, half_c)),
        "top_right": (range(0, half_r), range(cols - half_c, cols)),
        "bottom_left": (range(rows - half_r, rows), range(0, half_c)),
        "bottom_right": (range(rows - half_r, rows), range(cols - half_c, cols)),
    }
    out: list[dict[str, Any]] = []
    n_prefix = int(model.extra["n_prefix"])
    for name in regions:
        if name == "cls":
            mask = torch.zeros(model.n_ctx, dtype=torch.bool)
            mask[:n_prefix] = True
            out.append({"name": name, "kind": "prefix", "mask": mask, "inner": math.nan, "outer": math.nan})
            continue
        if name == "border":
            r, c = spans["centre"]
            mask = ~vision.region_mask(model, rows=r, cols=c)
            mask[:n_prefix] = False
        else:
            r, c = spans[name]
            mask = vision.region_mask(model, rows=r, cols=c)
        if mask.any():
            out.append({"name": name, "kind": "region", "mask": mask, "inner": math.nan, "outer": math.nan})
    if bands:
        centre = ((rows - 1) / 2, (cols - 1) / 2)
        r_max = math.hypot(centre[0], centre[1])
        edges = [float(b) * r_max for b in bands]
        for i, (inner, outer) in enumerate(itertools.pairwise(edges)):
            last = i == len(edges) - 2
            mask = vision.distance_band(model, centre, inner, outer + (1e-6 if last else 0.0))
            if mask.any():
                name = f"band_{inner:.1f}-{outer:.1f}"
                out.append({"name": name, "kind": "band", "mask": mask, "inner": inner, "outer": outer})
    return out


def agreement(values: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Spearman rank correlation between ``metrics`` (columns of ``values``) over the rows where all
    are finite: one row per ordered pair, ``metric_a, metric_b, spearman, n_heads`` (NaN where a
    metric is constant)."""
    sub = values[list(metrics)].astype(np.float64).replace([np.inf, -np.inf], np.nan).dropna()
    corr = sub.rank().corr(method="pearson") if len(sub) >= 2 else pd.DataFrame(np.nan, metrics, metrics)
    rows = [
        {"metric_a": a, "metric_b": b, "spearman": float(corr.loc[a, b]), "n_heads": len(sub)}
        for a in metrics
        for b in metrics
    ]
    return pd.DataFrame(rows, columns=["metric_a", "metric_b", "spearman", "n_heads"])


# ============================================================================== the run's steps


@dataclass
class EvalSet:
    """The images pruning is measured on (``rows`` of the run's images), their labels per task,
    pixels and intact embeddings."""

    rows: np.ndarray
    labels: dict[str, np.ndarray]
    pixels: torch.Tensor
    clean: torch.Tensor


def select_heads(model: LoadedModel, cfg: VitHeadsConfig, grad: np.ndarray) -> list[Head]:
    """The heads to prune: every head of ``prune_layers`` (all layers when empty), or the top
    ``prune_top_k`` of them by gradient importance ``grad [L, H]``."""
    layers = sorted({int(x) for x in cfg.prune_layers}) or list(range(model.n_layers))
    heads = [(layer, h) for layer in layers for h in range(model.n_heads)]
    if cfg.prune_top_k and cfg.prune_top_k < len(heads):
        score = np.nan_to_num(np.asarray([grad[layer, h] for layer, h in heads]), nan=-1.0)
        order = np.argsort(-score, kind="stable")[: cfg.prune_top_k]
        heads = sorted(heads[int(i)] for i in order)
    return heads


@dataclass
class FullPruning:
    """Full pruning of the selected ``heads``: the effects per head, the drops averaged over tasks
    (``[len(heads)]``), the ``[L, H]`` columns of the heads table (NaN where not pruned) and the
    per-image effects ``[len(heads), N]`` per metric (:meth:`Effects.per_image`)."""

    heads: list[Head]
    n_candidates: int
    effects: Effects
    accuracy_drop: np.ndarray
    confidence_drop: np.ndarray
    columns: dict[str, np.ndarray]
    per_image: dict[str, np.ndarray] = field(default_factory=dict)


def prune_heads(
    model: LoadedModel,
    cfg: VitHeadsConfig,
    ev: EvalSet,
    probes: Mapping[str, LinearProbe],
    means: Mapping[int, torch.Tensor] | None,
    grad_mean: np.ndarray,
) -> FullPruning:
    """Remove each selected head at every token and score the probes on the eval images."""
    L, H = model.n_layers, model.n_heads
    heads = select_heads(model, cfg, grad_mean)
    n_candidates = (len(set(cfg.prune_layers)) or L) * H
    conditions = [PruneCondition(h) for h in heads]
    pruned = pruned_embeddings(
        model,
        ev.pixels,
        conditions,
        mode=cfg.ablation,
        means=means,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        desc="pruning heads",
    )
    full = pruning_effects(probes, ev.labels, ev.clean, pruned)
    acc_drop, conf_drop = full.mean_drops()
    cols = {k: np.full((L, H), np.nan) for k in ("accuracy_drop", "confidence_drop", "cosine_drop")}
    for i, (layer, h) in enumerate(heads):
        cols["accuracy_drop"][layer, h] = acc_drop[i]
        cols["confidence_drop"][layer, h] = conf_drop[i]
        cols["cosine_drop"][layer, h] = full.cosine_drop[i]
    return FullPruning(heads, n_candidates, full, acc_drop, conf_drop, cols, full.per_image())


PARTIAL_COLUMNS = [
    "layer",
    "head",
    "condition",
    "kind",
    "inner",
    "outer",
    "n_queries",
    "query_share",
    "accuracy_drop",
    "confidence_drop",
    "cosine_drop",
    "share_of_full",
    "cosine_share_of_full",
]


def _partial_rows(
    model: LoadedModel,
    full: FullPruning,
    conditions: Sequence[PruneCondition],
    partial_heads: Sequence[Head],
    masks: Sequence[dict[str, Any]],
    part: Effects,
) -> list[dict[str, Any]]:
    """One row per partial condition, then one ``full`` row per partially pruned head."""
    grid = patch_grid(model)
    n_all = grid[0] * grid[1] + int(model.extra["n_prefix"])
    p_acc, p_conf = part.mean_drops()
    conf_drop, cosine = full.confidence_drop, full.effects.cosine_drop
    by_name = {m["name"]: m for m in masks}
    full_index = {h: i for i, h in enumerate(full.heads)}
    rows = []
    for i, cond in enumerate(conditions):
        m = by_name[cond.name]
        j = full_index[cond.head]
        rows.append(
            {
                "layer": cond.head[0],
                "head": cond.head[1],
                "condition": cond.name,
                "kind": m["kind"],
                "inner": m["inner"],
                "outer": m["outer"],
                "n_queries": int(m["mask"].sum()),
                "query_share": float(m["mask"].sum()) / model.n_ctx,
                "accuracy_drop": p_acc[i],
                "confidence_drop": p_conf[i],
                "cosine_drop": part.cosine_drop[i],
                "share_of_full": p_conf[i] / conf_drop[j] if conf_drop[j] else math.nan,
                "cosine_share_of_full": part.cosine_drop[i] / cosine[j] if cosine[j] else math.nan,
            }
        )
    for head in partial_heads:
        j = full_index[head]
        rows.append(
            {
                "layer": head[0],
                "head": head[1],
                "condition": "full",
                "kind": "full",
                "inner": math.nan,
                "outer": math.nan,
                "n_queries": n_all,
                "query_share": 1.0,
                "accuracy_drop": full.accuracy_drop[j],
                "confidence_drop": conf_drop[j],
                "cosine_drop": cosine[j],
                "share_of_full": 1.0,
                "cosine_share_of_full": 1.0,
            }
        )
    return rows


def prune_partially(
    model: LoadedModel,
    cfg: VitHeadsConfig,
    ev: EvalSet,
    probes: Mapping[str, LinearProbe],
    means: Mapping[int, torch.Tensor] | None,
    full: FullPruning,
) -> tuple[pd.DataFrame, pd.DataFrame | None, list[Head]]:
    """Remove the ``partial_heads`` heads with the largest confidence drop only at the query sets of
    :func:`query_masks`: ``(the partial table, its long form or None, the heads)``."""
    masks = query_masks(model, cfg.regions, cfg.bands)
    conf_drop = full.confidence_drop
    ranked = sorted(range(len(full.heads)), key=lambda i: (-np.nan_to_num(conf_drop[i], nan=-np.inf), i))
    partial_heads = [full.heads[i] for i in ranked[: cfg.partial_heads]] if masks else []
    conditions = [PruneCondition(h, m["name"], m["mask"]) for h in partial_heads for m in masks]
    if not conditions:
        return pd.DataFrame(columns=PARTIAL_COLUMNS), None, partial_heads
    part_emb = pruned_embeddings(
        model,
        ev.pixels,
        conditions,
        mode=cfg.ablation,
        means=means,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        desc="partial pruning",
    )
    part = pruning_effects(probes, ev.labels, ev.clean, part_emb)
    rows = _partial_rows(model, full, conditions, partial_heads, masks, part)
    meta = pd.DataFrame(
        [{"layer": c.head[0], "head": c.head[1], "condition_name": c.name} for c in conditions]
    )
    partial_long = part.long().join(meta, on="condition").drop(columns="condition")
    partial_long = partial_long.rename(columns={"condition_name": "condition"})
    partial = pd.DataFrame(rows).sort_values(["layer", "head", "kind", "condition"], ignore_index=True)
    return partial, partial_long, partial_heads


def importance_table(
    model: LoadedModel,
    full: FullPruning,
    grads: Mapping[str, np.ndarray],
    partial_long: pd.DataFrame | None,
) -> pd.DataFrame:
    """The long ``importance`` table: full pruning, the gradient importance, partial pruning."""
    L, H = model.n_layers, model.n_heads
    full_long = full.effects.long()
    meta = pd.DataFrame([{"layer": h[0], "head": h[1]} for h in full.heads])
    full_long = full_long.join(meta, on="condition").drop(columns="condition")
    full_long["condition"] = "full"
    grad_frames = [
        pd.DataFrame(
            {
                "layer": np.repeat(np.arange(L), H),
                "head": np.tile(np.arange(H), L),
                "task": task,
                "metric": "grad_importance",
                "value": g.ravel(),
                "condition": "full",
            }
        )
        for task, g in grads.items()
    ]
    frames = [full_long, *grad_frames, *([partial_long] if partial_long is not None else [])]
    return pd.concat(frames, ignore_index=True)[["layer", "head", "condition", "task", "metric", "value"]]
