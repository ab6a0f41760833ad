"""ViT attention strength and patterns: hand-built heads with known answers, numba against numpy,
the autoencoder and the clustering on two families of maps, and one run on tiny-vit's patterns."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

from analyses.vit_heads import attention as va
from analyses.vit_heads import patterns as vp
from probe.errors import ConfigError

Rule = Callable[[int, int], tuple[int, int] | None]
"""A head as a rule: query patch (row, col) -> the key patch it attends to, or None (-> CLS)."""


def rule_patterns(
    grid: tuple[int, int],
    rules: Sequence[Rule],
    *,
    n_prefix: int = 1,
    n_images: int = 2,
    noise: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """``[n_images, len(rules), T, T]``: each patch query puts ``1 − noise`` on its rule's key (or on
    the first prefix token) and ``noise`` spread at random over the patches; prefix queries are
    uniform."""
    rows, cols = grid
    T = n_prefix + rows * cols
    rng = np.random.default_rng(seed)
    out = np.zeros((n_images, len(rules), T, T), dtype=np.float64)
    out[:, :, :n_prefix, :] = 1.0 / T
    for h, rule in enumerate(rules):
        for r in range(rows):
            for c in range(cols):
                q = n_prefix + r * cols + c
                target = rule(r, c)
                key = 0 if target is None else n_prefix + target[0] * cols + target[1]
                out[:, h, q, key] += 1.0 - noise
                if noise:
                    out[:, h, q, n_prefix:] += noise * rng.dirichlet(np.ones(rows * cols), size=n_images)
    return out.astype(np.float32)


def look(dr: int, dc: int, grid: tuple[int, int]) -> Rule:
    """Attend to the patch at offset (dr, dc), or to CLS where the grid ends."""

    def rule(r: int, c: int) -> tuple[int, int] | None:
        kr, kc = r + dr, c + dc
        return (kr, kc) if 0 <= kr < grid[0] and 0 <= kc < grid[1] else None

    return rule


def random_patterns(shape: tuple[int, int, int, int], seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).standard_normal(shape) * 2.0
    weights = np.exp(logits)
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------ attention strength


@pytest.mark.parametrize("fn", [va.offset_maps, va.offset_maps_numpy], ids=["numba", "numpy"])
def test_right_looking_head_puts_all_its_mass_at_offset_0_plus_1(fn: Callable[..., np.ndarray]) -> None:
    grid = (4, 5)
    patterns = rule_patterns(grid, [look(0, 1, grid)])
    maps = fn(patterns, grid, 1)
    assert maps.shape == (1, 7, 9)
    expected = np.zeros((7, 9))
    expected[3, 5] = 1.0  # centre (3, 4) + (0, +1)
    # Exactly 1, not (cols - 1) / cols: the last column, which has no right neighbour, is not counted.
    np.testing.assert_allclose(maps[0], expected, atol=1e-7)
    np.testing.assert_allclose(fn(patterns, grid, 1, renormalise=True)[0], expected, atol=1e-7)


@pytest.mark.parametrize("fn", [va.offset_maps, va.offset_maps_numpy], ids=["numba", "numpy"])
def test_uniform_head_gives_a_flat_map(fn: Callable[..., np.ndarray]) -> None:
    grid, n_prefix = (3, 4), 2
    T = n_prefix + 12
    patterns = np.full((2, 3, T, T), 1.0 / T, dtype=np.float32)
    np.testing.assert_allclose(fn(patterns, grid, n_prefix), 1.0 / T, rtol=1e-6)
    np.testing.assert_allclose(fn(patterns, grid, n_prefix, renormalise=True), 1.0 / 12, rtol=1e-6)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("renormalise", [False, True])
@pytest.mark.parametrize(("grid", "n_prefix"), [((3, 5), 0), ((4, 4), 1), ((5, 3), 2), ((14, 14), 1)])
def test_numba_kernel_equals_numpy_reference_on_random_patterns(
    grid: tuple[int, int], n_prefix: int, renormalise: bool, parallel: bool
) -> None:
    T = n_prefix + grid[0] * grid[1]
    patterns = random_patterns((3, 5, T, T), seed=T)
    fast = va.offset_maps(patterns, grid, n_prefix, renormalise=renormalise, parallel=parallel)
    slow = va.offset_maps_numpy(patterns, grid, n_prefix, renormalise=renormalise)
    assert fast.shape == (5, 2 * grid[0] - 1, 2 * grid[1] - 1)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)
    assert np.abs(fast - slow).max() < 1e-12  # both accumulate in float64


def test_prefix_tokens_are_ignored() -> None:
    grid, n_prefix = (4, 4), 2
    patterns = random_patterns((2, 3, 18, 18), seed=1)
    changed = patterns.copy()
    changed[:, :, :n_prefix, :] = random_patterns((2, 3, n_prefix, 18), seed=2)  # other prefix queries
    changed[:, :, n_prefix:, 0] += changed[:, :, n_prefix:, 1]  # prefix mass moved between prefix keys
    changed[:, :, n_prefix:, 1] = 0.0
    for fn in (va.offset_maps, va.offset_maps_numpy):
        np.testing.assert_allclose(fn(changed, grid, n_prefix), fn(patterns, grid, n_prefix), atol=1e-7)
    # Rescaling the patch part of every row (the rest goes to CLS) changes nothing that renormalises.
    scaled = patterns.copy()
    scaled[:, :, n_prefix:, n_prefix:] *= 0.25
    scaled[:, :, n_prefix:, :n_prefix] = 0.0
    scaled[:, :, n_prefix:, 0] = 1.0 - scaled[:, :, n_prefix:, n_prefix:].sum(-1)
    np.testing.assert_allclose(
        va.offset_maps(scaled, grid, n_prefix, renormalise=True),
        va.offset_maps(patterns, grid, n_prefix, renormalise=True),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        va.mean_attention_distance(scaled, grid, n_prefix),
        va.mean_attention_distance(patterns, grid, n_prefix),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        vp.pattern_maps(scaled, grid, n_prefix)[0], vp.pattern_maps(patterns, grid, n_prefix)[0], atol=1e-6
    )
    np.testing.assert_allclose(
        va.patch_attention_share(scaled, grid, n_prefix),
        0.25 * va.patch_attention_share(patterns, grid, n_prefix),
        rtol=1e-5,
    )


def test_distance_profile_puts_a_neighbour_head_in_ring_one_and_keeps_a_uniform_head_flat() -> None:
    grid = (5, 5)
    patterns = rule_patterns(grid, [look(0, 1, grid)])
    T = 26
    uniform = np.full((1, 1, T, T), 1.0 / T, dtype=np.float32)
    maps = np.concatenate([va.offset_maps(patterns, grid, 1), va.offset_maps(uniform, grid, 1)])

    distances, strength = va.distance_profile(maps)
    np.testing.assert_array_equal(distances, np.arange(7))  # max distance √32 = 5.66 -> ring 6
    counts = va.offset_counts(grid)
    ring1 = [(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)]  # √2 rounds to 1
    total = sum(counts[4 + dr, 4 + dc] for dr, dc in ring1)
    expected = np.zeros(7)
    expected[1] = counts[4, 5] / total  # the mean over every (query, key) pair in ring 1
    np.testing.assert_allclose(strength[0], expected, atol=1e-9)
    np.testing.assert_allclose(strength[1], 1.0 / T, rtol=1e-6)

    exact, exact_strength = va.distance_profile(maps, bins="exact", weighting="offsets")
    np.testing.assert_allclose(exact[:4], [0.0, 1.0, math.sqrt(2), 2.0])
    np.testing.assert_allclose(exact_strength[0, 1], 0.25)  # 4 equal offsets at distance 1, one hit
    assert exact_strength[0, [0, *range(2, len(exact))]].max() == 0.0
    np.testing.assert_allclose(exact_strength[1], 1.0 / T, rtol=1e-6)
    # Leading axes are kept: [L, H, …] -> [L, H, D]
    assert va.distance_profile(np.stack([maps, maps]))[1].shape == (2, 2, 7)


def test_mean_attention_distance_is_zero_for_a_self_head_and_the_offset_length_for_an_offset_head() -> None:
    grid = (6, 6)
    half_cls = rule_patterns(grid, [look(0, 1, grid)])
    half_cls[:, :, 1:, 0] += 1.0  # every query also puts as much on CLS as on its neighbour
    half_cls[:, :, 1:] /= 2.0
    patterns = np.concatenate([rule_patterns(grid, [look(0, 0, grid), look(1, 2, grid)]), half_cls], axis=1)
    mad = va.mean_attention_distance(patterns, grid, 1)
    # CLS mass is renormalised away: queries without the offset patch (all on CLS) are skipped, and
    # the half-on-CLS head still has distance 1.
    np.testing.assert_allclose(mad, [0.0, math.sqrt(5), 1.0], atol=1e-6)
    np.testing.assert_allclose(va.patch_attention_share(half_cls, grid, 1), 0.5 * 30 / 36, atol=1e-6)
    cls_only = np.zeros((1, 1, 37, 37), dtype=np.float32)
    cls_only[..., 0] = 1.0
    assert np.isnan(va.mean_attention_distance(cls_only, grid, 1)[0])


def test_layer_trend_gives_per_layer_spread_and_the_slope_across_layers() -> None:
    values = np.array([[1.0, 3.0, np.nan], [3.0, 5.0, 4.0], [5.0, 7.0, 6.0]])
    trend = va.layer_trend(values)
    np.testing.assert_allclose(trend.mean, [2.0, 4.0, 6.0])
    np.testing.assert_allclose(trend.std, [1.0, math.sqrt(2 / 3), math.sqrt(2 / 3)])
    np.testing.assert_array_equal(trend.n, [2, 3, 3])
    np.testing.assert_allclose(trend.slope, 2.0)
    frame = trend.frame()
    assert list(frame["layer"]) == [0, 1, 2] and frame.attrs["slope"] == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="layers, heads"):
        va.layer_trend(np.zeros(4))


# ------------------------------------------------------------------------------ attention patterns


def test_pattern_maps_in_grid_and_centred_coordinates() -> None:
    grid = (3, 4)
    patterns = rule_patterns(grid, [look(0, 1, grid), look(1, 0, grid)])
    maps, heads, queries = vp.pattern_maps(patterns, grid, 1, centred=False)
    # The last column of head 0 and the last row of head 1 put everything on CLS: no map.
    assert maps.shape == (9 + 8, 3, 4) and maps.dtype == np.float32
    assert heads.tolist() == [0] * 9 + [1] * 8
    for m, h, q in zip(maps, heads, queries, strict=True):
        r, c = divmod(int(q), 4)
        expected = np.zeros((3, 4))
        expected[(r, c + 1) if h == 0 else (r + 1, c)] = 1.0
        np.testing.assert_allclose(m, expected)
    centred, _, _ = vp.pattern_maps(patterns, grid, 1)
    assert centred.shape == (17, 5, 7)
    assert (centred[heads == 0, 2, 4] == 1.0).all() and (centred[heads == 1, 3, 3] == 1.0).all()

    picked, picked_heads, picked_queries = vp.pattern_maps(
        random_patterns((2, 3, 13, 13), 0), grid, 1, heads=[2, 0], max_per_head=5, seed=3
    )
    assert picked.shape == (10, 5, 7) and picked_heads.tolist() == [2] * 5 + [0] * 5
    np.testing.assert_allclose(picked.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    again = vp.pattern_maps(random_patterns((2, 3, 13, 13), 0), grid, 1, heads=[2, 0], max_per_head=5, seed=3)
    np.testing.assert_array_equal(again[2], picked_queries)
    with pytest.raises(ConfigError, match="out of range"):
        vp.pattern_maps(patterns, grid, 1, queries=[12])


GRID = (8, 8)
INTERIOR = [r * 8 + c for r in range(7) for c in range(7)]  # queries that have a right and a lower neighbour


def families(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maps of 5 heads: 0, 1 look right; 2, 3 look down; 4 looks right from the top 3 rows of
    queries and down from the others. Returns (maps, head_index, query_index, family of each map)."""
    right, down = look(0, 1, GRID), look(1, 0, GRID)

    def split(r: int, c: int) -> tuple[int, int] | None:
        return right(r, c) if r < 3 else down(r, c)

    patterns = rule_patterns(GRID, [right, right, down, down, split], noise=0.3, n_images=2, seed=seed)
    maps, heads, queries = vp.pattern_maps(patterns, GRID, 1, queries=INTERIOR)
    is_down = (heads >= 2) & ~((heads == 4) & (queries // 8 < 3))
    return maps, heads, queries, is_down.astype(np.int64)


def test_autoencoder_loss_decreases_and_is_deterministic_per_seed() -> None:
    maps = families()[0]
    before = torch.get_rng_state()
    codes, losses, model = vp.fit_autoencoder(maps, 4, epochs=15, batch_size=32, seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    assert codes.shape == (len(maps), 4) and len(losses) == 15
    assert losses[-1] < 0.5 * losses[0]
    again, losses_again, _ = vp.fit_autoencoder(maps, 4, epochs=15, batch_size=32, seed=0, progress=False)
    np.testing.assert_array_equal(again, codes)
    assert losses_again == losses
    other, _, _ = vp.fit_autoencoder(maps, 4, epochs=15, batch_size=32, seed=1, progress=False)
    assert not np.array_equal(other, codes)
    with torch.no_grad():
        rebuilt = model.reconstruct(torch.from_numpy(maps[:3] / maps[:3].max(axis=(1, 2), keepdims=True)))
    np.testing.assert_allclose(rebuilt.sum(dim=(1, 2)).numpy(), 1.0, rtol=1e-5)


def test_clustering_recovers_two_families_and_the_heads_mixes() -> None:
    maps, heads, _, family = families()
    codes, _, _ = vp.fit_autoencoder(maps, 4, epochs=25, batch_size=32, seed=0, progress=False)
    best, scores = vp.choose_k(codes, range(2, 6), seed=0)
    assert best == 2, scores
    labels, centroids = vp.cluster_codes(codes, seed=0, ks=range(2, 6))
    assert centroids.shape == (2, 4)
    # Name the clusters by their prototype's peak: offset (0, +1) is "right", (+1, 0) "down".
    prototypes = vp.cluster_prototypes(maps, labels, 2)
    centre = np.array([7, 7])
    peaks = [np.unravel_index(np.argmax(p), p.shape) - centre for p in prototypes]
    assert sorted(tuple(int(x) for x in p) for p in peaks) == [(0, 1), (1, 0)]
    down_cluster = next(i for i, p in enumerate(peaks) if tuple(p) == (1, 0))
    np.testing.assert_array_equal(labels == down_cluster, family == 1)

    mix = vp.head_cluster_mix(labels, heads, 6, 2)  # head 5 has no maps
    down_share = mix[:, down_cluster]
    np.testing.assert_allclose(down_share[:5], [0.0, 0.0, 1.0, 1.0, 4 / 7])
    assert np.isnan(mix[5]).all()
    groups = vp.group_heads(mix)
    assert groups.tolist() == [1 - down_cluster] * 2 + [down_cluster] * 3 + [-1]
    by_mix = vp.group_heads(mix, method="kmeans", n_groups=3)
    assert by_mix[0] == by_mix[1] != by_mix[2] == by_mix[3] != by_mix[4] and by_mix[5] == -1


def test_errors_say_how_to_fix() -> None:
    patterns = np.zeros((1, 2, 17, 17), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"model.extra\['grid'\]"):
        va.offset_maps(patterns, (5, 5), 1)
    with pytest.raises(ConfigError, match=r"\[N, heads, T, T\]"):
        va.mean_attention_distance(patterns[0], (4, 4), 1)
    with pytest.raises(ConfigError, match="bins must be one of"):
        va.distance_profile(np.zeros((2, 7, 7)), bins="rings")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_groups"):
        vp.group_heads(np.eye(3), method="kmeans")
    with pytest.raises(ConfigError, match="non-negative"):
        vp.fit_autoencoder(-np.ones((4, 3, 3), dtype=np.float32), progress=False)


# ------------------------------------------------------------------------------ a real capture


def test_smoke_on_tiny_vit_patterns() -> None:
    import probe
    from analyses.tasks.scenes import make_scenes, render_batch
    from probe import vision

    model = probe.load_model("tiny-vit", device="cpu")
    grid, n_prefix = tuple(model.extra["grid"]), int(model.extra["n_prefix"])
    cap = vision.capture(model, render_batch(make_scenes(6, seed=0)), patterns="all")
    layers = [cap.patterns[layer].numpy() for layer in range(model.n_layers)]
    assert layers[0].shape == (6, model.n_heads, 17, 17)

    maps = np.stack([va.offset_maps(p, grid, n_prefix) for p in layers])
    assert maps.shape == (model.n_layers, model.n_heads, 7, 7) and (maps >= 0).all()
    np.testing.assert_allclose(maps[1], va.offset_maps_numpy(cap.patterns[1], grid, n_prefix), atol=1e-6)
    distances, strength = va.distance_profile(maps)
    assert strength.shape == (model.n_layers, model.n_heads, len(distances))
    mad = np.stack([va.mean_attention_distance(p, grid, n_prefix) for p in layers])
    assert ((mad >= 0) & (mad <= math.hypot(3, 3))).all()
    assert va.layer_trend(mad).frame().shape[0] == model.n_layers

    pooled = [vp.pattern_maps(p, grid, n_prefix) for p in layers]
    all_maps = np.concatenate([m for m, _, _ in pooled])
    head_index = np.concatenate([h + layer * model.n_heads for layer, (_, h, _) in enumerate(pooled)])
    codes, _, _ = vp.fit_autoencoder(all_maps, 4, epochs=5, batch_size=64, progress=False)
    labels, _ = vp.cluster_codes(codes, 3)
    mix = vp.head_cluster_mix(labels, head_index, model.n_layers * model.n_heads, 3)
    np.testing.assert_allclose(mix.sum(axis=1), 1.0)
    assert vp.group_heads(mix).shape == (model.n_layers * model.n_heads,)
