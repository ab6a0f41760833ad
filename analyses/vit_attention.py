"""Attention strength and attention patterns of vision-transformer heads: the computations.

Background
----------
Li et al. (TVCG 2023) describe each ViT head in three ways: how important it is
(pruning; :mod:`analyses.vit_heads` with the gates of :mod:`probe.vision`), how strongly a patch
attends to the patches around it (*attention strength*), and which *attention patterns* it has
learned. This module holds the last two as plain array functions over captured patterns
``[N, H, T, T]`` of one layer (``T = n_prefix + rows × cols``; ``grid`` and ``n_prefix`` are
``model.extra["grid"]`` and ``model.extra["n_prefix"]``). Prefix tokens (CLS, DeiT's distillation
token) are never queries and never keys here: every statistic is about patch → patch attention.

Attention strength
    :func:`offset_maps` aligns every patch query's attention on the query: cell ``(dr, dc)`` of a
    ``[2·rows − 1, 2·cols − 1]`` map is the mean attention weight that a patch query gives to the
    patch ``dr`` rows below and ``dc`` columns right of it. The mean runs over the (image, query)
    pairs that *have* a patch at that offset (``N · (rows − |dr|) · (cols − |dc|)`` of them), so a
    corner query, which has no neighbour on two sides, does not pull the map down (no edge bias).
    By default the weights are the raw post-softmax weights (what the head really spends; the mass
    it gives to CLS is missing from the map, so a CLS-dumping head looks weak everywhere);
    ``renormalise=True`` first divides each query row by its patch mass (the head's spatial shape
    alone). The accumulation is a numba kernel (one thread, or threads over heads and image
    blocks for large inputs); :func:`offset_maps_numpy` is the numpy reference it is tested against.

    :func:`distance_profile` collapses an offset map to strength against Euclidean distance
    ``√(dr² + dc²)`` in patch units. ``bins="integer"`` (default) puts offsets in rings of the
    nearest integer distance (ring 1 holds the 4 direct neighbours *and* the 4 diagonals at 1.41;
    ring 2 the offsets from 1.5 to 2.5: 2, √5), ``bins="exact"`` keeps every distinct distance.
    A ring's strength is the mean attention per (query, key) pair at that distance: its offsets
    are weighted by how many pairs the grid has at each (``(rows − |dr|)(cols − |dc|)``), so rare
    corner offsets do not weigh as much as common near ones.

    :func:`mean_attention_distance` is Dosovitskiy et al.'s mean attention distance in patch units
    (× patch size for pixels, as :class:`probe.vision.GridDistance` reports it): for each patch
    query, ``Σ_k A[q,k]·‖p_q − p_k‖ / Σ_k A[q,k]`` over patch keys — the **CLS (prefix) mass is
    excluded by renormalising the row over patch keys**, so a head that puts 90 % on CLS and 10 %
    on its neighbours has distance 1, not 0.1 — then averaged over patch queries and images with
    equal weight (a query that gives patches exactly zero mass has no distance and is skipped).
    :func:`patch_attention_share` gives the mass that was renormalised away. :func:`layer_trend`
    summarises any ``[L, H]`` per-head value by layer (mean, spread, quartiles) and its slope
    across layers (the paper's "trend of attention strength across layers").

Attention patterns
    :func:`pattern_maps` makes one small image per (head, query patch): the query's attention over
    the patch grid, renormalised over patches per image and then averaged over the images. By
    default the maps are **centred on the query** (``centred=True``: relative-offset coordinates,
    ``[2·rows − 1, 2·cols − 1]`` with the query at the centre and zeros where the grid ends): the
    paper asks which patterns a head has learned ("attend to the left neighbour", "attend to the
    same row"), and such a rule is one shape in relative coordinates but ``rows × cols`` different
    images in grid coordinates, which an autoencoder would tell apart by query position.
    ``centred=False`` keeps grid coordinates ``[rows, cols]`` (position-bound patterns: "every query
    looks at the top-left corner" is one shape there).

    :func:`fit_autoencoder` trains a small MLP autoencoder (seeded, deterministic on the CPU) on the
    maps: the encoder sees each map scaled to peak 1 (shape, not sharpness), the decoder returns a
    distribution over cells and the loss is the KL divergence from the map (normalised to sum 1)
    to the reconstruction (``loss="mse"`` compares peak-scaled maps instead). :func:`cluster_codes`
    runs k-means on the latent codes (:func:`choose_k` picks k by silhouette);
    :func:`cluster_prototypes` averages the maps of each cluster for a gallery;
    :func:`head_cluster_mix` gives each head's share of maps per cluster, and :func:`group_heads`
    groups heads by their dominant cluster or by k-means on the mixes.

Faithfulness: only the paper's abstract could be read when this module was written. It fixes the
three questions (importance; spatial distribution of attention strength and its trend across
layers; autoencoder over attention patterns, summarised per head) but not the details. The
offset alignment, the ring binning and pair weighting, the per-image renormalisation, the centred
maps, the MLP/KL autoencoder and k-means with silhouette are this module's choices — a best
effort, to be checked against the paper's text.

Usage
-----
::

    import probe
    from probe import vision
    from analyses import vit_attention as va
    from analyses.tasks.scenes import make_scenes, render_batch

    model = probe.load_model("clip-vit-b16")
    grid, n_prefix = tuple(model.extra["grid"]), model.extra["n_prefix"]
    cap = vision.capture(model, render_batch(make_scenes(32)), patterns="all")
    layers = [cap.patterns[layer].numpy() for layer in range(model.n_layers)]   # [N, H, T, T] each

    strength = va.offset_maps(layers[0], grid, n_prefix)         # [H, 27, 27]
    distances, profile = va.distance_profile(strength)           # [D], [H, D]
    mad = np.stack([va.mean_attention_distance(p, grid, n_prefix) for p in layers])   # [L, H]
    va.layer_trend(mad).frame()                                  # one row per layer, slope in attrs

    maps, heads, queries = va.pattern_maps(layers[5], grid, n_prefix, max_per_head=64)
    codes, losses, autoencoder = va.fit_autoencoder(maps, code_dim=8)
    labels, centroids = va.cluster_codes(codes)                  # k chosen by silhouette
    gallery = va.cluster_prototypes(maps, labels, len(centroids))
    mix = va.head_cluster_mix(labels, heads, model.n_heads, len(centroids))   # [H, k]
    groups = va.group_heads(mix)                                 # dominant cluster per head

References
----------
* Li, Wang, Dai, Wang, Yeh, Zheng, Zhang & Ma (2023). How Does Attention Work in Vision
  Transformers? A Visual Analytics Attempt. IEEE TVCG 29(6), 2888–2900. doi:10.1109/TVCG.2023.3261935
* Dosovitskiy et al. (2021). An Image is Worth 16x16 Words: Transformers for Image Recognition at
  Scale. ICLR. (Mean attention distance.)
* Rousseeuw (1987). Silhouettes: a graphical aid to the interpretation and validation of cluster
  analysis. J. Comput. Appl. Math. 20, 53–65.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numba
import numpy as np
import pandas as pd
import torch

from probe.errors import ConfigError

DistanceBins = Literal["integer", "exact"]
RingWeighting = Literal["pairs", "offsets"]
AutoencoderLoss = Literal["kl", "mse"]
GroupMethod = Literal["dominant", "kmeans"]

__all__ = [
    "PARALLEL_MIN_BYTES",
    "LayerTrend",
    "MapAutoencoder",
    "choose_k",
    "cluster_codes",
    "cluster_prototypes",
    "distance_profile",
    "fit_autoencoder",
    "group_heads",
    "head_cluster_mix",
    "layer_trend",
    "mean_attention_distance",
    "offset_counts",
    "offset_maps",
    "offset_maps_numpy",
    "patch_attention_share",
    "pattern_maps",
]


# ============================================================================== validation


def _check_literal(value: object, allowed: Any, what: str) -> None:
    options = get_args(allowed)
    if value not in options:
        raise ConfigError(f"{what} must be one of {', '.join(map(repr, options))}, got {value!r}")


def _check_grid(grid: Sequence[int], n_prefix: int) -> tuple[int, int]:
    try:
        rows, cols = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ConfigError(
            f"grid must be (rows, cols) of the patch grid, got {grid!r}; pass model.extra['grid']"
        ) from None
    if rows < 1 or cols < 1:
        raise ConfigError(f"grid must have at least one row and column, got {grid!r}")
    if int(n_prefix) < 0:
        raise ConfigError(f"n_prefix must be >= 0, got {n_prefix}; pass model.extra['n_prefix']")
    return rows, cols


def _as_patterns(patterns: np.ndarray | torch.Tensor, grid: Sequence[int], n_prefix: int) -> np.ndarray:
    """Check shape ``[N, H, T, T]`` against the grid; return a C-contiguous float32 array."""
    rows, cols = _check_grid(grid, n_prefix)
    if isinstance(patterns, torch.Tensor):
        patterns = patterns.detach().float().cpu().numpy()
    array = np.asarray(patterns)
    expected = int(n_prefix) + rows * cols
    if array.ndim != 4 or array.shape[2] != array.shape[3]:
        raise ConfigError(
            f"patterns must be one layer's attention [N, heads, T, T], got shape {array.shape}; "
            "take capture(...).patterns[layer] (add a leading axis for a single image)"
        )
    if array.shape[2] != expected:
        raise ConfigError(
            f"patterns have T={array.shape[2]} tokens but a {rows}×{cols} grid with {n_prefix} prefix "
            f"token(s) has {expected}; pass model.extra['grid'] and model.extra['n_prefix'] of the model "
            "that made the patterns"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ConfigError(f"patterns hold no image or no head (shape {array.shape})")
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_offset_map(offset_map: np.ndarray) -> tuple[int, int]:
    shape = np.shape(offset_map)
    if len(shape) < 2 or shape[-1] % 2 == 0 or shape[-2] % 2 == 0:
        raise ConfigError(
            f"an offset map is [..., 2·rows − 1, 2·cols − 1] (odd sides), got shape {shape}; "
            "make it with offset_maps"
        )
    return (shape[-2] + 1) // 2, (shape[-1] + 1) // 2


# ============================================================================== attention strength


def offset_counts(grid: Sequence[int]) -> np.ndarray:
    """``[2·rows − 1, 2·cols − 1]`` number of (query patch, key patch) pairs at each offset
    ``(dr, dc)`` (centre = offset 0): ``(rows − |dr|)·(cols − |dc|)``."""
    rows, cols = _check_grid(grid, 0)
    dr = rows - np.abs(np.arange(-(rows - 1), rows))
    dc = cols - np.abs(np.arange(-(cols - 1), cols))
    return np.outer(dr, dc).astype(np.float64)


# Cached on disk (next to the module, in __pycache__) so that a later process skips the compile;
# reassociation lets the float64 sums vectorise (their order does not matter at this precision).
_FASTMATH = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _accumulate(
    patterns: np.ndarray, head: int, first: int, last: int, n_prefix: int, rows: int, cols: int,
    renormalise: bool, out: np.ndarray,
) -> None:  # pragma: no cover  (compiled; tested against offset_maps_numpy)  # fmt: skip
    """Add head ``head``'s attention of images ``first:last`` to ``out [2·rows − 1, 2·cols − 1]``.

    It first sums the images' patch block ``[P, P]`` in float64 (one long contiguous loop per query
    row: this pass reads every weight once and is the whole cost), then shifts each query's row
    into the offset map (``P²`` adds, however many images there are).
    """
    n_patches = rows * cols
    summed = np.zeros((n_patches, n_patches))
    for image in range(first, last):
        for q in range(n_patches):
            row = patterns[image, head, n_prefix + q, n_prefix:]
            acc = summed[q]
            if renormalise:
                mass = 0.0
                for k in range(n_patches):
                    mass += row[k]
                scale = 1.0 / mass if mass > 0.0 else 0.0
                for k in range(n_patches):
                    acc[k] += row[k] * scale
            else:
                for k in range(n_patches):
                    acc[k] += row[k]
    for qr in range(rows):
        for qc in range(cols):
            acc = summed[qr * cols + qc]
            top, left = rows - 1 - qr, cols - 1 - qc
            for kr in range(rows):
                for kc in range(cols):
                    out[top + kr, left + kc] += acc[kr * cols + kc]


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _offset_sums_serial(
    patterns: np.ndarray, n_prefix: int, rows: int, cols: int, renormalise: bool
) -> np.ndarray:  # pragma: no cover  (compiled)
    """Sum of attention (float64) per head and offset over all images and patch queries."""
    n_images, n_heads = patterns.shape[0], patterns.shape[1]
    sums = np.zeros((n_heads, 2 * rows - 1, 2 * cols - 1))
    for head in range(n_heads):
        _accumulate(patterns, head, 0, n_images, n_prefix, rows, cols, renormalise, sums[head])
    return sums


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
def _offset_sums_parallel(
    patterns: np.ndarray, n_prefix: int, rows: int, cols: int, renormalise: bool, n_splits: int
) -> np.ndarray:  # pragma: no cover  (compiled)
    """:func:`_offset_sums_serial` over numba threads. Task ``t`` is (head ``t // n_splits``,
    block ``t % n_splits`` of the images) with its own accumulator, so no two threads write the
    same memory; the blocks are summed at the end."""
    n_images, n_heads = patterns.shape[0], patterns.shape[1]
    partial = np.zeros((n_heads * n_splits, 2 * rows - 1, 2 * cols - 1))
    for task in numba.prange(n_heads * n_splits):
        head, block = task // n_splits, task % n_splits
        first, last = block * n_images // n_splits, (block + 1) * n_images // n_splits
        _accumulate(patterns, head, first, last, n_prefix, rows, cols, renormalise, partial[task])
    sums = np.zeros((n_heads, 2 * rows - 1, 2 * cols - 1))
    for head in range(n_heads):
        for block in range(n_splits):
            sums[head] += partial[head * n_splits + block]
    return sums


PARALLEL_MIN_BYTES = 64 * 2**20
"""``parallel=None`` runs the threaded kernel from this many bytes of patterns on (and 4+ threads)."""


def offset_maps(
    patterns: np.ndarray | torch.Tensor,
    grid: tuple[int, int],
    n_prefix: int,
    *,
    renormalise: bool = False,
    parallel: bool | None = None,
) -> np.ndarray:
    """``[H, 2·rows − 1, 2·cols − 1]`` (float64) mean attention from a patch query to the patch at
    each offset ``(dr, dc)`` (index ``[h, rows − 1 + dr, cols − 1 + dc]``; the centre is the query
    itself), averaged over the images and the queries that have a patch there.

    ``patterns`` is one layer ``[N, H, T, T]``. Prefix tokens are neither queries nor keys.
    ``renormalise=False`` (default) uses the raw weights (attention strength as spent, CLS mass
    missing); ``True`` divides each query row by its patch mass first (spatial shape only; a row
    with no patch mass adds zeros). numba kernel; equal to :func:`offset_maps_numpy`.

    ``parallel``: ``True`` splits (head, image block) tasks over numba's threads, ``False`` runs
    one thread, ``None`` (default) goes parallel only for at least :data:`PARALLEL_MIN_BYTES` of
    patterns and 4 numba threads. One thread already reads a few GB/s (the work is one pass over
    memory); threads pay on many idle cores. On a busy machine, numba's ``omp`` threading layer
    next to torch's OpenMP threads stalled about 0.3 s per call (``benchmarks/vit.py``); set
    ``NUMBA_THREADING_LAYER=workqueue`` (or ``tbb``) before numba starts if you force threads there.
    """
    array = _as_patterns(patterns, grid, n_prefix)
    rows, cols = _check_grid(grid, n_prefix)
    n_images, n_heads = array.shape[:2]
    threads = numba.get_num_threads()
    if parallel is None:
        parallel = threads >= 4 and array.nbytes >= PARALLEL_MIN_BYTES
    if parallel:
        # Enough tasks for every thread even when there are fewer heads than threads.
        n_splits = max(1, min(n_images, math.ceil(2 * threads / n_heads)))
        sums = _offset_sums_parallel(array, int(n_prefix), rows, cols, bool(renormalise), n_splits)
    else:
        sums = _offset_sums_serial(array, int(n_prefix), rows, cols, bool(renormalise))
    return np.asarray(sums / (n_images * offset_counts((rows, cols))))


def offset_maps_numpy(
    patterns: np.ndarray | torch.Tensor,
    grid: tuple[int, int],
    n_prefix: int,
    *,
    renormalise: bool = False,
) -> np.ndarray:
    """The numpy reference of :func:`offset_maps` (same result; slower, and with
    ``renormalise=True`` it makes a copy of the patch block)."""
    array = _as_patterns(patterns, grid, n_prefix)
    rows, cols = _check_grid(grid, n_prefix)
    n_images, n_heads = array.shape[:2]
    patch = array[:, :, n_prefix:, n_prefix:]
    if renormalise:
        mass = patch.sum(axis=-1, keepdims=True, dtype=np.float64)
        patch = np.divide(patch, mass, out=np.zeros(patch.shape), where=mass > 0)
    # Sum over images first: [H, qr, qc, kr, kc]; then shift each query's key grid into place.
    summed = patch.sum(axis=0, dtype=np.float64).reshape(n_heads, rows, cols, rows, cols)
    sums = np.zeros((n_heads, 2 * rows - 1, 2 * cols - 1))
    for qr in range(rows):
        for qc in range(cols):
            top, left = rows - 1 - qr, cols - 1 - qc
            sums[:, top : top + rows, left : left + cols] += summed[:, qr, qc]
    return sums / (n_images * offset_counts((rows, cols)))


def distance_profile(
    offset_map: np.ndarray,
    *,
    bins: DistanceBins = "integer",
    weighting: RingWeighting = "pairs",
) -> tuple[np.ndarray, np.ndarray]:
    """Strength against distance: ``(distances [D], strength [..., D])`` from an offset map
    ``[..., 2·rows − 1, 2·cols − 1]`` (any leading axes, e.g. ``[H, …]`` or ``[L, H, …]``).

    Distance is Euclidean in patch units. ``bins="integer"``: rings of the nearest integer
    distance (``d − 0.5 ≤ √(dr² + dc²) < d + 0.5``; ``distances`` are 0, 1, 2, …; empty rings are
    left out); ``"exact"``: one bin per distinct distance (0, 1, √2, 2, √5, …). A bin's strength
    is the mean attention per (query, key) pair in it: ``weighting="pairs"`` (default) weights
    each offset by the number of pairs the grid has at it, which is the mean over all pairs;
    ``"offsets"`` weights every offset equally.
    """
    _check_literal(bins, DistanceBins, "bins")
    _check_literal(weighting, RingWeighting, "weighting")
    rows, cols = _check_offset_map(offset_map)
    values = np.asarray(offset_map, dtype=np.float64)
    dr, dc = np.meshgrid(np.arange(-(rows - 1), rows), np.arange(-(cols - 1), cols), indexing="ij")
    exact = np.sqrt(dr**2 + dc**2).ravel()
    if bins == "integer":
        key = np.floor(exact + 0.5)  # round half up: 0.5 → ring 1, as the ring bounds say
    else:
        key = np.round(dr.ravel() ** 2 + dc.ravel() ** 2).astype(np.float64)  # exact: squared, integral
    distances_key, ring = np.unique(key, return_inverse=True)
    weight = offset_counts((rows, cols)).ravel() if weighting == "pairs" else np.ones(exact.size)
    membership = np.zeros((exact.size, distances_key.size))
    membership[np.arange(exact.size), ring] = weight  # [offsets, bins], each offset's weight
    flat = values.reshape(*values.shape[:-2], exact.size)
    totals = flat @ membership
    norm = membership.sum(axis=0)
    distances = distances_key if bins == "integer" else np.sqrt(distances_key)
    return distances, totals / norm


def _patch_distances(rows: int, cols: int) -> np.ndarray:
    """``[P, P]`` Euclidean distance between patch positions, in patch units."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    rc = np.stack([r.ravel(), c.ravel()], axis=1).astype(np.float64)
    return np.sqrt(((rc[:, None, :] - rc[None, :, :]) ** 2).sum(-1))


def mean_attention_distance(
    patterns: np.ndarray | torch.Tensor,
    grid: tuple[int, int],
    n_prefix: int,
    *,
    chunk: int = 16,
) -> np.ndarray:
    """``[H]`` mean attention distance in patch units (× patch size for pixels).

    Per patch query: ``Σ_k A[q,k]·‖p_q − p_k‖ / Σ_k A[q,k]`` over patch keys only — prefix (CLS)
    mass is excluded by renormalising the row over patches, so the number says *where among the
    patches* the head looks, not how much it looks at patches (:func:`patch_attention_share` says
    that). Averaged over patch queries and images, each with equal weight; queries whose row gives
    the patches exactly zero mass are skipped (NaN for a head with none). ``chunk`` images are
    processed at a time to bound memory.
    """
    array = _as_patterns(patterns, grid, n_prefix)
    rows, cols = _check_grid(grid, n_prefix)
    distance = _patch_distances(rows, cols).astype(np.float32)
    n_heads = array.shape[1]
    total = np.zeros(n_heads)
    count = np.zeros(n_heads)
    for start in range(0, array.shape[0], max(1, chunk)):
        patch = array[start : start + chunk, :, n_prefix:, n_prefix:]
        weighted = np.einsum("nhqk,qk->nhq", patch, distance).astype(np.float64)
        mass = patch.sum(axis=-1, dtype=np.float64)
        valid = mass > 0
        per_query = np.divide(weighted, mass, out=np.zeros_like(weighted), where=valid)
        total += per_query.sum(axis=(0, 2))
        count += valid.sum(axis=(0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def patch_attention_share(
    patterns: np.ndarray | torch.Tensor, grid: tuple[int, int], n_prefix: int
) -> np.ndarray:
    """``[H]`` mean share of a patch query's attention that goes to patch keys (1 − prefix mass),
    averaged over patch queries and images: what :func:`mean_attention_distance` renormalises."""
    array = _as_patterns(patterns, grid, n_prefix)
    patch = array[:, :, n_prefix:, n_prefix:]
    return np.asarray(patch.sum(axis=-1, dtype=np.float64).mean(axis=(0, 2)))


@dataclass(frozen=True)
class LayerTrend:
    """A per-head value summarised by layer (arrays ``[L]``) and its linear trend across layers.

    ``mean``/``std`` (population, over the layer's finite heads), ``median``, ``q25``/``q75``,
    ``min``/``max``, ``n`` (finite heads in the layer). ``slope``/``intercept``: least-squares line
    of value on layer index through every finite (layer, head) point (units of the value per layer);
    ``r``: their Pearson correlation (NaN when undefined).
    """

    layer: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    median: np.ndarray
    q25: np.ndarray
    q75: np.ndarray
    min: np.ndarray
    max: np.ndarray
    n: np.ndarray
    slope: float
    intercept: float
    r: float

    def frame(self) -> pd.DataFrame:
        """One row per layer; the trend (slope, intercept, r) in ``frame.attrs``."""
        columns = ("layer", "mean", "std", "median", "q25", "q75", "min", "max", "n")
        frame = pd.DataFrame({name: getattr(self, name) for name in columns})
        frame.attrs.update(slope=self.slope, intercept=self.intercept, r=self.r)
        return frame


def layer_trend(values: np.ndarray) -> LayerTrend:
    """Summarise ``values [L, H]`` (e.g. mean attention distance per head) by layer; NaNs skipped."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 1:
        raise ConfigError(
            f"values must be [layers, heads], got shape {array.shape}; stack one [H] array per layer"
        )
    n_layers = array.shape[0]
    finite = np.isfinite(array)
    n = finite.sum(axis=1)
    masked = np.where(finite, array, np.nan)

    def per_layer(fn: Any, *args: Any) -> np.ndarray:
        out = np.full(n_layers, np.nan)
        for layer in range(n_layers):
            if n[layer]:
                out[layer] = fn(masked[layer][finite[layer]], *args)
        return out

    layer_idx, _ = np.nonzero(finite)
    points = array[finite]
    slope = intercept = r = math.nan
    if np.unique(layer_idx).size >= 2:
        slope, intercept = (float(v) for v in np.polyfit(layer_idx.astype(np.float64), points, 1))
        if points.std() > 0:
            r = float(np.corrcoef(layer_idx, points)[0, 1])
    return LayerTrend(
        layer=np.arange(n_layers),
        mean=per_layer(np.mean),
        std=per_layer(np.std),
        median=per_layer(np.median),
        q25=per_layer(np.quantile, 0.25),
        q75=per_layer(np.quantile, 0.75),
        min=per_layer(np.min),
        max=per_layer(np.max),
        n=n,
        slope=slope,
        intercept=intercept,
        r=r,
    )


# ============================================================================== attention patterns


def _select(what: str, given: Iterable[int] | None, size: int) -> np.ndarray:
    if given is None:
        return np.arange(size)
    chosen = np.asarray(list(given), dtype=np.int64)
    if chosen.ndim != 1 or chosen.size == 0:
        raise ConfigError(f"{what} must be a non-empty list of indices (or None for all)")
    bad = chosen[(chosen < 0) | (chosen >= size)]
    if bad.size:
        raise ConfigError(f"{what} {bad.tolist()} out of range; valid indices are 0..{size - 1}")
    if np.unique(chosen).size != chosen.size:
        raise ConfigError(f"{what} lists an index twice: {chosen.tolist()}")
    return chosen


def pattern_maps(
    patterns: np.ndarray | torch.Tensor,
    grid: tuple[int, int],
    n_prefix: int,
    *,
    heads: Iterable[int] | None = None,
    queries: Iterable[int] | None = None,
    max_per_head: int | None = None,
    seed: int = 0,
    centred: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attention maps per (head, query patch): ``(maps [M, …] float32, head_index [M], query_index [M])``.

    A map is the query's attention over the patch keys, renormalised to sum 1 per image and then
    averaged over the images (pass one image, ``patterns[i : i + 1]``, for single-image maps).
    ``centred=True`` (default; see the module docstring for why): ``[2·rows − 1, 2·cols − 1]``
    maps in relative-offset coordinates, the query at the centre ``(rows − 1, cols − 1)`` and zeros
    where the grid ends; ``centred=False``: ``[rows, cols]`` grid coordinates.

    ``heads``: head indices of this layer (default all); ``queries``: patch indices (row-major,
    ``0 .. rows·cols − 1``; token = ``n_prefix + index``; default all); ``max_per_head``: at most
    this many queries per head, drawn without replacement with ``seed``. ``query_index`` is the
    patch index. A query that gives the patches zero mass in every image has no map and is left out.
    To pool layers, offset ``head_index`` by ``layer · n_heads`` and concatenate.
    """
    array = _as_patterns(patterns, grid, n_prefix)
    rows, cols = _check_grid(grid, n_prefix)
    n_patches = rows * cols
    chosen_heads = _select("heads", heads, array.shape[1])
    chosen_queries = _select("queries", queries, n_patches)
    if max_per_head is not None and max_per_head < 1:
        raise ConfigError(f"max_per_head must be >= 1 or None (all queries), got {max_per_head}")
    rng = np.random.default_rng(seed)
    maps: list[np.ndarray] = []
    head_index: list[np.ndarray] = []
    query_index: list[np.ndarray] = []
    for head in chosen_heads:
        qs = chosen_queries
        if max_per_head is not None and qs.size > max_per_head:
            qs = np.sort(rng.choice(qs, size=max_per_head, replace=False))
        block = array[:, head][:, n_prefix + qs, n_prefix:].astype(np.float64)  # [N, Q, P]
        mass = block.sum(axis=-1, keepdims=True)
        valid = mass > 0
        normed = np.divide(block, mass, out=np.zeros_like(block), where=valid)
        n_valid = valid.sum(axis=0)[:, 0]  # [Q]
        keep = n_valid > 0
        mean = normed.sum(axis=0)[keep] / n_valid[keep, None]  # [Q', P]
        maps.append(mean.reshape(-1, rows, cols))
        head_index.append(np.full(int(keep.sum()), head, dtype=np.int64))
        query_index.append(qs[keep])
    grid_maps = np.concatenate(maps) if maps else np.zeros((0, rows, cols))
    queries_out = np.concatenate(query_index)
    if centred:
        canvas = np.zeros((grid_maps.shape[0], 2 * rows - 1, 2 * cols - 1))
        for i, q in enumerate(queries_out):
            top, left = rows - 1 - q // cols, cols - 1 - q % cols
            canvas[i, top : top + rows, left : left + cols] = grid_maps[i]
        grid_maps = canvas
    return grid_maps.astype(np.float32), np.concatenate(head_index), queries_out


class MapAutoencoder(torch.nn.Module):
    """MLP autoencoder of small maps: cells → hidden → ``code_dim`` → hidden (mirrored) → cells.

    :meth:`encode` takes maps scaled to peak 1; :meth:`forward` returns the decoder's logits over
    cells (log-softmax for ``loss="kl"``, a sigmoid for ``"mse"``: see :meth:`reconstruct`).
    """

    def __init__(
        self, shape: tuple[int, int], code_dim: int, hidden: Sequence[int], loss: AutoencoderLoss
    ) -> None:
        super().__init__()
        self.shape = shape
        self.loss = loss
        cells = shape[0] * shape[1]
        widths = [cells, *hidden]
        layers: list[torch.nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
        self.encoder = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], code_dim))
        back = [code_dim, *reversed(hidden)]
        layers = []
        for a, b in itertools.pairwise(back):
            layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
        self.decoder = torch.nn.Sequential(*layers, torch.nn.Linear(back[-1], cells))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, rows, cols]`` peak-scaled maps → ``[B, code_dim]``."""
        return self.encoder(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructed maps ``[B, rows, cols]`` (sum 1 for ``"kl"``, peak-scaled for ``"mse"``)."""
        logits = self.forward(x)
        out = torch.softmax(logits, dim=-1) if self.loss == "kl" else torch.sigmoid(logits)
        return out.reshape(-1, *self.shape)


def _prepare_maps(maps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(peak-scaled input, sum-1 target, peak-scaled target) as float32 tensors."""
    array = np.asarray(maps, dtype=np.float32)
    if array.ndim != 3 or array.shape[0] < 1:
        raise ConfigError(
            f"maps must be [M, rows, cols] with M >= 1, got shape {array.shape}; see pattern_maps"
        )
    if not np.isfinite(array).all() or (array < 0).any():
        raise ConfigError("maps must be finite and non-negative (attention weights); see pattern_maps")
    x = torch.from_numpy(array.copy())
    peak = x.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    total = x.flatten(1).sum(dim=1).clamp_min(1e-12)[:, None, None]
    return x / peak, (x / total).flatten(1), (x / peak).flatten(1)


def fit_autoencoder(
    maps: np.ndarray,
    code_dim: int = 8,
    epochs: int = 30,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    *,
    lr: float = 3e-3,
    hidden: Sequence[int] = (256, 64),
    loss: AutoencoderLoss = "kl",
    threads: int | None = 1,
) -> tuple[np.ndarray, list[float], MapAutoencoder]:
    """Train a :class:`MapAutoencoder` on ``maps [M, rows, cols]``: ``(codes [M, code_dim],
    losses per epoch, model)`` (model in eval mode, on the CPU).

    ``loss="kl"`` (default): KL divergence from each map (normalised to sum 1) to the decoded
    distribution, in nats per map — scale-free, so sharp and diffuse maps count alike.
    ``"mse"``: mean squared error of peak-scaled maps. Adam with ``lr``, shuffled mini-batches.
    Deterministic per ``seed`` on the CPU: its own generators (the global RNG is left as it was)
    and ``threads`` torch threads while it trains (restored afterwards; ``None`` keeps torch's
    setting). One thread is the default because matrices this small gain little from more, and
    because the result then does not depend on how many cores the machine has. Cost at the
    defaults: about 6 s of CPU for 10k 14×14 maps, 12 s for 10k centred 27×27 ones.
    """
    _check_literal(loss, AutoencoderLoss, "loss")
    for name, value in (("code_dim", code_dim), ("epochs", epochs), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not lr > 0:
        raise ConfigError(f"lr must be positive, got {lr}")
    inputs, dist_target, peak_target = _prepare_maps(maps)
    target = dist_target if loss == "kl" else peak_target
    shape = (int(inputs.shape[1]), int(inputs.shape[2]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MapAutoencoder(shape, int(code_dim), tuple(int(h) for h in hidden), loss)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    losses: list[float] = []

    from tqdm.auto import tqdm

    bar = tqdm(range(int(epochs)), desc="autoencoder", unit="epoch", disable=not progress, leave=False)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        _train(model, optimiser, inputs, target, loss, bar, order_rng, int(batch_size), losses)
        model.eval()
        with torch.no_grad():
            codes = torch.cat([model.encode(inputs[s : s + 4096]) for s in range(0, n, 4096)])
    finally:
        torch.set_num_threads(previous_threads)
    return codes.numpy(), losses, model


def _train(
    model: MapAutoencoder,
    optimiser: torch.optim.Optimizer,
    inputs: torch.Tensor,
    target: torch.Tensor,
    loss: AutoencoderLoss,
    bar: Any,
    order_rng: torch.Generator,
    batch_size: int,
    losses: list[float],
) -> None:
    n = inputs.shape[0]
    model.train()
    for _ in bar:
        order = torch.randperm(n, generator=order_rng)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            logits = model(inputs[idx])
            if loss == "kl":
                batch_loss = torch.nn.functional.kl_div(
                    torch.log_softmax(logits, dim=-1), target[idx], reduction="sum"
                ) / len(idx)
            else:
                batch_loss = torch.nn.functional.mse_loss(torch.sigmoid(logits), target[idx])
            optimiser.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimiser.step()
            total += batch_loss.detach().item() * len(idx)
        losses.append(total / n)
        bar.set_postfix(loss=f"{losses[-1]:.4g}")


# ============================================================================== clustering


def _as_codes(codes: np.ndarray) -> np.ndarray:
    array = np.asarray(codes, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ConfigError(f"codes must be [M, code_dim] with M >= 2, got shape {array.shape}")
    return array


def _kmeans(points: np.ndarray, k: int, seed: int) -> Any:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    # One thread: for a few thousand short codes OpenMP's start-up and waiting cost more than the
    # work, and on a busy machine (threads descheduled mid-loop) multi-threaded k-means ran 50× slower.
    with threadpool_limits(limits=1):
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points)


def choose_k(
    codes: np.ndarray, ks: Iterable[int] = range(2, 11), seed: int = 0, *, sample_size: int = 2000
) -> tuple[int, dict[int, float]]:
    """Pick the number of clusters by silhouette: ``(best k, {k: silhouette})``.

    k-means is fitted for every ``k`` (those with ``2 ≤ k < M``); the silhouette is computed on at
    most ``sample_size`` codes (drawn with ``seed``) to keep it O(sample²). Ties go to the smaller k.
    """
    from sklearn.metrics import silhouette_score

    points = _as_codes(codes)
    candidates = sorted({int(k) for k in ks if 2 <= int(k) < points.shape[0]})
    if not candidates:
        raise ConfigError(f"no usable k in {list(ks)!r} for {points.shape[0]} codes; give ks with 2 <= k < M")
    scores: dict[int, float] = {}
    for k in candidates:
        labels = _kmeans(points, k, seed).labels_
        if np.unique(labels).size < 2:
            scores[k] = -1.0
            continue
        sample = min(sample_size, points.shape[0])
        scores[k] = float(silhouette_score(points, labels, sample_size=sample, random_state=seed))
    best = max(candidates, key=lambda k: (scores[k], -k))
    return best, scores


def cluster_codes(
    codes: np.ndarray, k: int | None = None, seed: int = 0, *, ks: Iterable[int] = range(2, 11)
) -> tuple[np.ndarray, np.ndarray]:
    """k-means on latent codes: ``(labels [M], centroids [k, code_dim])``.

    ``k=None`` picks k from ``ks`` by silhouette (:func:`choose_k`). Seeded (``n_init=10``).
    """
    points = _as_codes(codes)
    if k is None:
        k, _ = choose_k(points, ks, seed)
    if not 1 <= int(k) <= points.shape[0]:
        raise ConfigError(f"k must be between 1 and the number of codes ({points.shape[0]}), got {k}")
    fitted = _kmeans(points, int(k), seed)
    return fitted.labels_.astype(np.int64), np.asarray(fitted.cluster_centers_)


def _check_labels(labels: np.ndarray, k: int, size: int | None = None) -> np.ndarray:
    array = np.asarray(labels, dtype=np.int64)
    if array.ndim != 1 or (size is not None and array.size != size):
        raise ConfigError(f"labels must be [M] with one label per map ({size}), got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= k):
        raise ConfigError(f"labels must lie in 0..{k - 1} for k={k}; pass the k used by cluster_codes")
    return array


def cluster_prototypes(maps: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``[k, rows, cols]`` mean map of each cluster (a gallery of the patterns); NaN for an empty one."""
    array = np.asarray(maps, dtype=np.float64)
    if array.ndim != 3:
        raise ConfigError(f"maps must be [M, rows, cols], got shape {array.shape}; see pattern_maps")
    lab = _check_labels(labels, k, array.shape[0])
    out = np.full((k, *array.shape[1:]), np.nan)
    for cluster in range(k):
        members = lab == cluster
        if members.any():
            out[cluster] = array[members].mean(axis=0)
    return out.astype(np.float32)


def head_cluster_mix(labels: np.ndarray, head_index: np.ndarray, n_heads: int, k: int) -> np.ndarray:
    """``[n_heads, k]`` each head's share of its maps in each cluster (rows sum to 1; NaN for a
    head with no map). ``head_index`` may be pooled over layers (``layer · H + head``)."""
    lab = _check_labels(labels, k)
    heads = np.asarray(head_index, dtype=np.int64)
    if heads.shape != lab.shape:
        raise ConfigError(f"head_index {heads.shape} and labels {lab.shape} must have the same length")
    if heads.size and (heads.min() < 0 or heads.max() >= n_heads):
        raise ConfigError(f"head_index must lie in 0..{n_heads - 1}; n_heads counts every head pooled")
    counts = np.zeros((n_heads, k))
    np.add.at(counts, (heads, lab), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)


def group_heads(
    mix: np.ndarray, *, method: GroupMethod = "dominant", n_groups: int | None = None, seed: int = 0
) -> np.ndarray:
    """``[H]`` group of each head from its cluster mix ``[H, k]`` (-1 for a head with no maps).

    ``"dominant"`` (default): the cluster holding most of the head's maps (look at ``mix.max(1)``
    for how dominant). ``"kmeans"``: k-means with ``n_groups`` groups on the mix rows, which keeps
    heads with the same *blend* of patterns together.
    """
    _check_literal(method, GroupMethod, "method")
    array = np.asarray(mix, dtype=np.float64)
    if array.ndim != 2:
        raise ConfigError(f"mix must be [heads, k], got shape {array.shape}; see head_cluster_mix")
    has_maps = np.isfinite(array).all(axis=1)
    groups = np.full(array.shape[0], -1, dtype=np.int64)
    if method == "dominant":
        groups[has_maps] = array[has_maps].argmax(axis=1)
        return groups
    if n_groups is None or not 1 <= n_groups <= int(has_maps.sum()):
        raise ConfigError(
            f"method='kmeans' needs n_groups between 1 and the number of heads with maps "
            f"({int(has_maps.sum())}), got {n_groups}"
        )
    groups[has_maps] = _kmeans(array[has_maps], int(n_groups), seed).labels_
    return groups
