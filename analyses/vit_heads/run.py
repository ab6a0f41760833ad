"""Run the vit-heads analysis: the stages in order (images, capture pass, display patterns, probes,
gradients, full and partial pruning, attention strength, patterns, vision sinks), each a named step,
and the result's tables, arrays and notes. See docs/analyses/vit-heads.md."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analyses.base import AnalysisResult, heads_frame
from analyses.validation import evidence_columns, split_indices
from analyses.validation import frame as validation_frame
from analyses.vit_heads import attention as va
from analyses.vit_heads import patterns as vp
from analyses.vit_heads.artifacts import head_sink_columns, sink_tables
from analyses.vit_heads.capture import Capture, capture_pass
from analyses.vit_heads.config import IMPORTANCE_METRICS, METRIC_LABELS, VitHeadsConfig
from analyses.vit_heads.data import ImageSet, eval_rows, patch_grid, prepare_images, rows_and_labels
from analyses.vit_heads.display import display_step
from analyses.vit_heads.evidence import importance_stats, validate_top
from analyses.vit_heads.importance import (
    EvalSet,
    FullPruning,
    agreement,
    head_gradients_per_image,
    image_means,
    importance_table,
    pooled_per_image,
    prune_heads,
    prune_partially,
)
from analyses.vit_heads.probes import LinearProbe, fit_probes
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.types import Head


def require_vision_model(model: LoadedModel, cfg: VitHeadsConfig) -> None:
    """Raise :class:`ConfigError` unless vit-heads can analyse ``model`` with ``cfg``."""
    if model.kind != "vision" or model.bridge is not None or "grid" not in model.extra:
        raise ConfigError(
            f"{model.name} is a {model.kind} model; vit-heads analyses the heads of a vision transformer: "
            "--model clip-vit-b16, tiny-vit or a ViT/DeiT/CLIP/DINOv2 checkpoint directory"
        )
    if model.image is None or model.image.prefix_names[:1] != ("cls",):
        # the sink columns read the attention token 0 receives, and the norm table names it CLS
        raise ConfigError(
            f"{model.name} ({model.family}) has no CLS token, so vit-heads' sink columns would describe a "
            "patch; use probe.vision.capture and gate_importance, or a ViT/DeiT/CLIP/DINOv2 model"
        )
    bad_layers = [int(x) for x in cfg.prune_layers if int(x) >= model.n_layers]
    if bad_layers:
        raise ConfigError(
            f"prune_layers {bad_layers} do not exist on {model.name} (layers 0..{model.n_layers - 1})"
        )


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the block under ``timings[name]`` (seconds, 3 decimals)."""
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)


def _eval_sets(
    images: ImageSet, probes: Mapping[str, LinearProbe], cap: Capture, cfg: VitHeadsConfig
) -> tuple[EvalSet, EvalSet | None]:
    """The test images pruning is measured on (at most ``n_eval`` per source), split per source
    into discovery and ``held_out`` images (no held-out images without validation)."""
    data = images.data
    rows = eval_rows(data, cfg.n_eval)
    discovery: list[int] = []
    held: list[int] = []
    for src in ("scenes", "faces"):
        mine = rows[data.source[rows] == src]
        if cfg.validate_top and len(mine) >= 2:
            d, h = split_indices(len(mine), cfg.held_out, cfg.seed)
            discovery += mine[d].tolist()
            held += mine[h].tolist()
        else:
            discovery += mine.tolist()
    if cfg.validate_top and not held:
        raise ConfigError(
            "validation needs at least 2 eval images of a source (discovery and held-out); raise n_eval, "
            "n_scenes or n_faces, or set validate_top=0"
        )

    def subset(picked: list[int]) -> EvalSet:
        r = np.sort(np.asarray(picked, dtype=np.int64))
        return EvalSet(r, {t: data.labels[t][r] for t in probes}, images.pixels[r], cap.embeddings[r])

    return subset(discovery), (subset(held) if held else None)


# ============================================================================== attention strength


@dataclass
class _Strength:
    distance: pd.DataFrame
    attention_trend: pd.DataFrame
    self_strength: np.ndarray  # [L, H]
    neighbour: np.ndarray  # [L, H]
    trend_notes: dict[str, dict[str, float]]


def _strength(model: LoadedModel, cap: Capture) -> _Strength:
    """Strength against distance per head, self and neighbour strength, and their trends by layer."""
    L, H = model.n_layers, model.n_heads
    grid = patch_grid(model)
    distances, strength = va.distance_profile(cap.offset)  # [D], [L, H, D]
    distance = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(L), H * len(distances)),
            "head": np.tile(np.repeat(np.arange(H), len(distances)), L),
            "distance": np.tile(distances, L * H),
            "strength": strength.ravel(),
        }
    )
    self_strength = cap.offset[:, :, grid[0] - 1, grid[1] - 1]
    ring1 = np.flatnonzero(distances == 1)
    neighbour = strength[:, :, int(ring1[0])] if ring1.size else np.full((L, H), np.nan)
    trend_frames = []
    trend_notes: dict[str, dict[str, float]] = {}
    for metric, values in (
        ("mean_attention_distance", cap.mad),
        ("patch_share", cap.patch_share),
        ("self_strength", self_strength),
        ("neighbour_strength", neighbour),
    ):
        trend = va.layer_trend(values)
        frame = trend.frame()
        frame.insert(0, "metric", metric)
        trend_frames.append(frame)
        trend_notes[metric] = {"slope": trend.slope, "intercept": trend.intercept, "r": trend.r}
    attention_trend = pd.concat(trend_frames, ignore_index=True)
    return _Strength(distance, attention_trend, self_strength, neighbour, trend_notes)


# ============================================================================== patterns


@dataclass
class _Patterns:
    cluster_col: np.ndarray  # [L, H] dominant cluster (NaN: no maps)
    cluster_share: np.ndarray  # [L, H]
    group_col: np.ndarray  # [L, H]
    clusters: pd.DataFrame
    cluster_info: pd.DataFrame
    notes: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _cluster_info(
    model: LoadedModel, prototypes: np.ndarray, labels: np.ndarray, dominant: np.ndarray
) -> pd.DataFrame:
    """One row per cluster: its maps, the heads it dominates, its prototype's self share and distance."""
    gr, gc = patch_grid(model)
    dr, dc = np.meshgrid(np.arange(-(gr - 1), gr), np.arange(-(gc - 1), gc), indexing="ij")
    dist_cells = np.sqrt(dr**2 + dc**2)
    info = []
    for c in range(len(prototypes)):
        proto = prototypes[c].astype(np.float64)
        total = float(np.nansum(proto))
        info.append(
            {
                "cluster": c,
                "n_maps": int((labels == c).sum()),
                "map_share": float((labels == c).mean()),
                "n_heads_dominant": int((dominant == c).sum()),
                "prototype_self": float(proto[gr - 1, gc - 1] / total) if total > 0 else math.nan,
                "prototype_distance": float((proto * dist_cells).sum() / total) if total > 0 else math.nan,
            }
        )
    return pd.DataFrame(info)


def _patterns(model: LoadedModel, cap: Capture, cfg: VitHeadsConfig, queries: np.ndarray) -> _Patterns:
    """Autoencode the pattern maps, cluster the codes and group the heads by their cluster mix."""
    L, H = model.n_layers, model.n_heads
    result = _Patterns(
        cluster_col=np.full((L, H), np.nan),
        cluster_share=np.full((L, H), np.nan),
        group_col=np.full((L, H), np.nan),
        clusters=pd.DataFrame(columns=["layer", "head", "cluster", "share"]),
        cluster_info=pd.DataFrame(
            columns=[
                "cluster",
                "n_maps",
                "map_share",
                "n_heads_dominant",
                "prototype_self",
                "prototype_distance",
            ]
        ),
        notes={"maps": len(cap.maps)},
    )
    if len(cap.maps) < 3:
        return result
    codes, losses, _ = vp.fit_autoencoder(
        cap.maps, code_dim=cfg.code_dim, epochs=cfg.ae_epochs, seed=cfg.seed, progress=cfg.progress
    )
    labels, centroids = vp.cluster_codes(codes, k=cfg.n_clusters or None, seed=cfg.seed)
    k = len(centroids)
    mix = vp.head_cluster_mix(labels, cap.map_head, L * H, k)  # [L·H, k]
    dominant = vp.group_heads(mix)
    rows_with_maps = mix[np.isfinite(mix).all(axis=1)]
    # k-means cannot make more groups than there are distinct mixes (a random model's heads share one).
    distinct = int(np.unique(np.round(rows_with_maps, 6), axis=0).shape[0])
    groups = vp.group_heads(mix, method="kmeans", n_groups=max(1, min(cfg.n_groups, distinct)), seed=cfg.seed)
    prototypes = vp.cluster_prototypes(cap.maps, labels, k)
    result.cluster_col = np.where(dominant >= 0, dominant, np.nan).reshape(L, H).astype(np.float64)
    result.cluster_share = np.nanmax(np.where(np.isfinite(mix), mix, -1.0), axis=1).reshape(L, H)
    result.cluster_share[~np.isfinite(result.cluster_col)] = np.nan
    result.group_col = np.where(groups >= 0, groups, np.nan).reshape(L, H).astype(np.float64)
    result.clusters = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(L), H * k),
            "head": np.tile(np.repeat(np.arange(H), k), L),
            "cluster": np.tile(np.arange(k), L * H),
            "share": mix.ravel(),
        }
    )
    result.cluster_info = _cluster_info(model, prototypes, labels, dominant)
    result.arrays = {
        "cluster_centroids": np.asarray(centroids, dtype=np.float32),
        "cluster_prototypes": prototypes.astype(np.float32),
        "cluster_mix": np.asarray(mix, dtype=np.float32),
    }
    result.notes.update(
        k=k,
        autoencoder_loss_first=losses[0],
        autoencoder_loss_last=losses[-1],
        queries=queries.tolist(),
        images=int(cfg.pattern_images),
    )
    return result


# ============================================================================== validation


def _validation(
    model: LoadedModel,
    cfg: VitHeadsConfig,
    full: FullPruning,
    held: EvalSet | None,
    probes: Mapping[str, LinearProbe],
    means: Mapping[int, Any] | None,
) -> pd.DataFrame:
    """The ``validate_top`` pruned heads of largest cosine drop on the discovery images, tested
    together on the held-out images against random sets of the other candidate heads."""
    if held is None or not cfg.validate_top:
        return validation_frame([])
    order = np.argsort(-np.nan_to_num(full.effects.cosine_drop, nan=-np.inf), kind="stable")
    tested = sorted(full.heads[int(i)] for i in order[: cfg.validate_top])
    layers = sorted({int(x) for x in cfg.prune_layers}) or list(range(model.n_layers))
    candidates = [(layer, h) for layer in layers for h in range(model.n_heads)]
    return validate_top(model, cfg, held, probes, means, tested, candidates)


# ============================================================================== tables and notes


def _heads_table(
    model: LoadedModel,
    cfg: VitHeadsConfig,
    cap: Capture,
    full: FullPruning,
    grads: Mapping[str, np.ndarray],
    grad_mean: np.ndarray,
    strength: _Strength,
    patterns: _Patterns,
) -> pd.DataFrame:
    """One row per (layer, head): every per-head number of the run."""
    L, H = model.n_layers, model.n_heads
    input_set = cfg.attention_images
    alpha0_head, sink_rate, alpha_art_head = head_sink_columns(cap, cfg)
    pruned_mask = np.zeros((L, H))
    for layer, h in full.heads:
        pruned_mask[layer, h] = 1.0
    head_table = heads_frame(
        model,
        {
            "pruned": pruned_mask,
            **full.columns,
            "grad_importance": grad_mean,
            "mean_attention_distance": cap.mad,
            "patch_share": cap.patch_share,
            "self_strength": strength.self_strength,
            "neighbour_strength": strength.neighbour,
            "cluster": patterns.cluster_col,
            "cluster_share": patterns.cluster_share,
            "group": patterns.group_col,
            f"alpha0_{input_set}": alpha0_head,
            f"sink_rate_{input_set}": sink_rate,
            f"alpha_artifacts_{input_set}": alpha_art_head,
        },
    )
    head_table["pruned"] = head_table["pruned"].astype(bool)
    for name in ("cluster", "group"):
        head_table[name] = head_table[name].astype("Int64")
    for task, g in grads.items():
        head_table[f"grad_importance_{task}"] = g.ravel()
    for task in full.effects.accuracy:
        conf = np.full((L, H), np.nan)
        for i, (layer, h) in enumerate(full.heads):
            conf[layer, h] = full.effects.confidence_drop(task)[i]
        head_table[f"confidence_drop_{task}"] = conf.ravel()
    return head_table


def _agreement_array(agree: pd.DataFrame) -> np.ndarray:
    """The ``agreement`` table as a ``[4, 4]`` matrix in the order of :data:`IMPORTANCE_METRICS`."""
    metrics = list(IMPORTANCE_METRICS)
    matrix = agree.pivot(index="metric_a", columns="metric_b", values="spearman").loc[metrics, metrics]
    return matrix.to_numpy(dtype=np.float32)


def _probes_with_eval(probes_frame: pd.DataFrame, full: FullPruning, ev: EvalSet) -> pd.DataFrame:
    """The probes table with each probe's accuracy and confidence on the eval images."""
    effects = full.effects
    clean_scores = pd.DataFrame(
        [
            {
                "task": t,
                "eval_accuracy": effects.clean_accuracy[t],
                "eval_confidence": effects.clean_confidence[t],
                "n_eval": len(rows_and_labels(ev.labels[t])[0]),
            }
            for t in effects.clean_accuracy
        ]
    )
    return probes_frame.merge(clean_scores, on="task", how="left") if len(clean_scores) else probes_frame


def _images_frame(images: ImageSet, ev: EvalSet, held: EvalSet | None, cfg: VitHeadsConfig) -> pd.DataFrame:
    """Every image with its source, split, ``eval`` (discovery) / ``held_out`` / ``attention``
    flags and labels."""
    data, n_extra = images.data, len(images.extra_names)
    all_names = images.all_names
    return pd.DataFrame(
        {
            "name": all_names,
            "source": images.row_sources,
            "split": [*data.split.tolist(), *(["attention"] * n_extra)],
            "eval": np.isin(np.arange(len(all_names)), ev.rows),
            "held_out": np.isin(np.arange(len(all_names)), held.rows if held is not None else []),
            "attention": np.isin(np.arange(len(all_names)), images.att_rows),
            **{f"label_{t}": [*data.labels[t].tolist(), *([None] * n_extra)] for t in cfg.tasks},
        }
    )


def _notes(
    cfg: VitHeadsConfig,
    full: FullPruning,
    ev: EvalSet,
    partial_heads: list[Head],
    strength: _Strength,
    patterns: _Patterns,
    display_rows: list[int],
) -> dict[str, Any]:
    n_pruned = len(full.heads)
    return {
        "metrics": METRIC_LABELS,
        "ablation": cfg.ablation,
        "pruned_heads": n_pruned,
        "head_selection": (
            f"the top {n_pruned} heads by gradient importance (agreement is over this selected subset)"
            if n_pruned < full.n_candidates
            else "every head of the pruned layers"
        ),
        "eval_images": len(ev.rows),
        "partial_heads": [list(h) for h in partial_heads],
        "partial": "head removed only at the listed patch queries (CLS keeps it); regions of the grid "
        "or rings around the grid centre; share_of_full = partial / full confidence drop; "
        "cosine_share_of_full = partial / full cosine drop",
        "distance": "strength = mean attention per (patch query, patch key) pair at that integer "
        "distance (patch units); CLS mass not included",
        "trend": strength.trend_notes,
        "patterns": patterns.notes,
        "sinks": f"artifact token: patch whose resid_pre norm > {cfg.artifact_ratio} × the median patch norm "
        f"of its image and layer; alpha0 = mean attention from all queries to CLS; sink_rate: share of "
        f"images with alpha0 > {cfg.sink_eps}",
        "faithfulness": "best effort: only the paper's abstract was available; see docs/analyses/vit-heads.md",
        "input_set": cfg.attention_images,
        "display": (
            f"{len(display_rows)} display images: model-input crops (display_images, uint8) and every "
            f"head's attention (display_attention, float16 [image, layer, head, query, key]) from the "
            f"CLS query and from a query patch every {cfg.display_stride} rows and columns (display_queries: token, "
            "row, col); read with analyses.vit_heads.display_pattern"
            if display_rows
            else "no display images (n_display=0)"
        ),
    }


# ============================================================================== the run


def run_vit_heads(model: LoadedModel, config: VitHeadsConfig | None = None) -> AnalysisResult:
    """Head importance (full and partial pruning, gradients), attention strength and patterns, and
    vision sinks of a vision transformer (docs/analyses/vit-heads.md)."""
    cfg = config or VitHeadsConfig()
    cfg.validate()
    require_vision_model(model, cfg)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with _timed(timings, "data"):
        images = prepare_images(model, cfg)
    with _timed(timings, "capture"):
        cap = capture_pass(model, images.pixels, images.att_rows, images.train_rows, cfg, images.queries)
    with _timed(timings, "display"):
        display_arrays, display_frame, display_rows = display_step(model, images, cfg)
    with _timed(timings, "probes"):
        probes, probes_frame = fit_probes(cfg, images.data, cap.embeddings.numpy())
        ev, held = _eval_sets(images, probes, cap, cfg)
    with _timed(timings, "gradients"):
        grads_per_image = head_gradients_per_image(
            model,
            ev.pixels,
            probes,
            ev.labels,
            per_task=cfg.grad_per_task,
            batch_size=max(1, min(cfg.batch_size, 16)),
            progress=cfg.progress,
        )
        grads = image_means(grads_per_image)
        grad_mean = np.nanmean(np.stack(list(grads.values())), axis=0)
        n_ev = len(ev.rows)
        grad_per_image = pooled_per_image({k: g.reshape(n_ev, -1).T for k, g in grads_per_image.items()})
    with _timed(timings, "pruning"):
        full = prune_heads(model, cfg, ev, probes, cap.means, grad_mean)
    with _timed(timings, "statistics"):
        stats = importance_stats(model, cfg, full, grad_per_image)
    with _timed(timings, "validation"):
        validation = _validation(model, cfg, full, held, probes, cap.means)
    with _timed(timings, "partial"):
        partial, partial_long, partial_heads = prune_partially(model, cfg, ev, probes, cap.means, full)
    importance = importance_table(model, full, grads, partial_long)
    with _timed(timings, "strength"):
        strength = _strength(model, cap)
    with _timed(timings, "patterns"):
        patterns = _patterns(model, cap, cfg, images.queries)
    att_names = [images.all_names[int(r)] for r in images.att_rows]
    sinks, norms, artifacts = sink_tables(model, cap, att_names, cfg.attention_images, cfg)
    head_table = _heads_table(model, cfg, cap, full, grads, grad_mean, strength, patterns)
    for name, values in stats.columns.items():
        head_table[name] = values.ravel()
    head_table = evidence_columns(head_table, validation, "vit")
    agree = agreement(head_table[head_table["pruned"]], IMPORTANCE_METRICS)
    arrays = {
        "offset_maps": cap.offset.astype(np.float32),
        **display_arrays,
        **patterns.arrays,
        "agreement": _agreement_array(agree),
        "importance_per_image": stats.per_image.astype(np.float32),
    }
    timings["total"] = round(time.perf_counter() - t_start, 3)
    return AnalysisResult(
        analysis="vit-heads",
        model_info=model.describe(),
        config=cfg,
        tables={
            "heads": head_table,
            "importance": importance,
            "partial": partial,
            "agreement": agree,
            "concentration": stats.concentration,
            "ranking": stats.ranking,
            "validation": validation,
            "probes": _probes_with_eval(probes_frame, full, ev),
            "distance": strength.distance,
            "attention_trend": strength.attention_trend,
            "clusters": patterns.clusters,
            "cluster_info": patterns.cluster_info,
            "sinks": sinks,
            "norms": norms,
            "artifacts": artifacts,
            "images": _images_frame(images, ev, held, cfg),
            **({"display": display_frame} if display_frame is not None else {}),
        },
        arrays=arrays,
        seeds={"data": cfg.seed, "queries": cfg.seed + 1, "autoencoder": cfg.seed, "kmeans": cfg.seed},
        timings=timings,
        notes={
            **_notes(cfg, full, ev, partial_heads, strength, patterns, display_rows),
            "held_out_images": 0 if held is None else len(held.rows),
            "statistics": stats.notes,
        },
    )
