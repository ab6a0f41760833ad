"""Attention strength of vision-transformer heads: plain array functions over one layer's patterns.

Every function takes captured patterns ``[N, H, T, T]`` (``T = n_prefix + rows × cols``; ``grid``
and ``n_prefix`` are ``model.extra["grid"]`` and ``model.extra["n_prefix"]``) and is about patch →
patch attention: prefix tokens (CLS, DeiT's distillation token) are never queries or keys here.
:func:`offset_maps` (a numba kernel, tested against :func:`offset_maps_numpy`) gives the mean
attention at each (row, column) offset from the query, :func:`distance_profile` strength against
distance, :func:`mean_attention_distance` and :func:`patch_attention_share` one number per head,
:func:`layer_trend` a per-head value by layer. See docs/analyses/vit-heads.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numba
import numpy as np
import pandas as pd
import torch

from probe.errors import ConfigError

DistanceBins = Literal["integer", "exact"]
RingWeighting = Literal["pairs", "offsets"]

__all__ = [
    "PARALLEL_MIN_BYTES",
    "LayerTrend",
    "distance_profile",
    "layer_trend",
    "mean_attention_distance",
    "offset_counts",
    "offset_maps",
    "offset_maps_numpy",
    "patch_attention_share",
]


# ============================================================================== validation


def check_literal(value: object, allowed: Any, what: str) -> None:
    options = get_args(allowed)
    if value not in options:
        raise ConfigError(f"{what} must be one of {', '.join(map(repr, options))}, got {value!r}")


def check_grid(grid: Sequence[int], n_prefix: int) -> tuple[int, int]:
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


def as_patterns(patterns: np.ndarray | torch.Tensor, grid: Sequence[int], n_prefix: int) -> np.ndarray:
    """Check shape ``[N, H, T, T]`` against the grid; return a C-contiguous float32 array."""
    rows, cols = check_grid(grid, n_prefix)
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
    rows, cols = check_grid(grid, 0)
    dr = rows - np.abs(np.arange(-(rows - 1), rows))
    dc = cols - np.abs(np.arange(-(cols - 1), cols))
    return np.outer(dr, dc).astype(np.float64)


# Cached on disk (next to the module, in __pycache__) so that a later process skips the compile;
# reassociation lets the float64 sums vectorise (their order does not matter at this precision).
_FASTMATH = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _accumulate(
    patterns: np.ndarray,
    head: int,
    first: int,
    last: int,
    n_prefix: int,
    rows: int,
    cols: int,
    renormalise: bool,
    out: np.ndarray,
) -> None:  # pragma: no cover  (compiled; tested against offset_maps_numpy)
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
    array = as_patterns(patterns, grid, n_prefix)
    rows, cols = check_grid(grid, n_prefix)
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
    array = as_patterns(patterns, grid, n_prefix)
    rows, cols = check_grid(grid, n_prefix)
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
    check_literal(bins, DistanceBins, "bins")
    check_literal(weighting, RingWeighting, "weighting")
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
    array = as_patterns(patterns, grid, n_prefix)
    rows, cols = check_grid(grid, n_prefix)
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
    array = as_patterns(patterns, grid, n_prefix)
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
