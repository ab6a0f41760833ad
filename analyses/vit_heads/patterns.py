"""Attention patterns of vision-transformer heads: per-query maps, an autoencoder, clusters.

:func:`pattern_maps` makes one small map per (head, query patch) of one layer's patterns (by
default centred on the query), :func:`fit_autoencoder` trains a seeded MLP autoencoder on them,
:func:`cluster_codes` runs k-means on its codes (:func:`choose_k`: k by silhouette),
:func:`cluster_prototypes` averages each cluster's maps, :func:`head_cluster_mix` gives each
head's share of maps per cluster and :func:`group_heads` groups heads by it.
See docs/analyses/vit-heads.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from analyses.vit_heads.attention import as_patterns, check_grid, check_literal
from probe.errors import ConfigError

AutoencoderLoss = Literal["kl", "mse"]
GroupMethod = Literal["dominant", "kmeans"]

__all__ = [
    "MapAutoencoder",
    "choose_k",
    "cluster_codes",
    "cluster_prototypes",
    "fit_autoencoder",
    "group_heads",
    "head_cluster_mix",
    "pattern_maps",
]


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
    ``centred=True`` (default; docs/analyses/vit-heads.md says why): ``[2·rows − 1, 2·cols − 1]``
    maps in relative-offset coordinates, the query at the centre ``(rows − 1, cols − 1)`` and zeros
    where the grid ends; ``centred=False``: ``[rows, cols]`` grid coordinates.

    ``heads``: head indices of this layer (default all); ``queries``: patch indices (row-major,
    ``0 .. rows·cols − 1``; token = ``n_prefix + index``; default all); ``max_per_head``: at most
    this many queries per head, drawn without replacement with ``seed``. ``query_index`` is the
    patch index. A query that gives the patches zero mass in every image has no map and is left out.
    To pool layers, offset ``head_index`` by ``layer · n_heads`` and concatenate.
    """
    array = as_patterns(patterns, grid, n_prefix)
    rows, cols = check_grid(grid, n_prefix)
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
    check_literal(loss, AutoencoderLoss, "loss")
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
    check_literal(method, GroupMethod, "method")
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
