"""Mean ablation: the logit difference with every head outside a circuit replaced by its mean over
the task's corrupted prompts of the same template, and the random head sets of the controls."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from analyses.circuits.data import PromptSet
from analyses.circuits.forward import GroupCache, Runner, chunk_slices, head_masks, repeat_rows, swap_hook
from probe.hooks import attn_hook
from probe.loading import LoadedModel
from probe.types import Head


def template_means(
    runner: Runner, caches: Sequence[GroupCache], groups: Sequence[PromptSet] = ()
) -> list[dict[int, torch.Tensor]]:
    """Per cache, each layer's ``z`` averaged over the corrupted prompts of its template: ``[T, H, d]``.

    ``groups`` (the task's template groups) pools the chunks :func:`prepare` cut from one group, so
    the mean does not depend on ``batch_size``; a cache of no given group is its own template.
    """
    owner = {int(i): g for g, group in enumerate(groups) for i in group.items}
    keys = [owner.get(int(c.group.items[0]), -1 - k) for k, c in enumerate(caches)]
    sums: dict[int, dict[int, torch.Tensor]] = {}
    counts: dict[int, int] = {}
    for key, c in zip(keys, caches, strict=True):
        acc = sums.setdefault(key, {})
        for layer, z in c.corrupt_z.items():
            acc[layer] = acc[layer] + z.float().sum(0) if layer in acc else z.float().sum(0)
        counts[key] = counts.get(key, 0) + len(c.group)
    return [{layer: s / counts[key] for layer, s in sums[key].items()} for key in keys]


def mean_ablated_logit_diff(
    runner: Runner,
    caches: Sequence[GroupCache],
    means: Sequence[Mapping[int, torch.Tensor]],
    keep: Sequence[Sequence[Head]],
    *,
    batch_size: int = 128,
) -> np.ndarray:
    """Mean logit difference ``[len(keep)]`` with every head *outside* ``keep[g]`` mean-ablated."""
    model = runner.model
    totals = np.zeros(len(keep))
    count = 0
    for cache, mean in zip(caches, means, strict=True):
        n = len(cache.group)
        per = max(1, batch_size // n)
        for chunk in chunk_slices(len(keep), per):
            copies = keep[chunk]
            G = len(copies)
            kept = head_masks(model, copies)
            points = []
            for layer in range(model.n_layers):
                ablate = ~kept.get(layer, torch.zeros(G, model.n_heads, dtype=torch.bool))
                points.append(
                    (
                        attn_hook(layer, "z"),
                        swap_hook(mean[layer].unsqueeze(0).expand(n, *mean[layer].shape), ablate),
                    )
                )
            final = runner.run(
                repeat_rows(cache.group.clean, G), points, end=repeat_rows(cache.group.roles["end"], G)
            )
            assert final is not None
            ld = runner.readout(final, cache.group, G).logit_diff.reshape(G, n)
            totals[chunk] += ld.sum(1).double().numpy()
        count += n
    return totals / count


def random_head_sets(
    model: LoadedModel, size: int, n: int, seed: int, exclude: Sequence[Head] = ()
) -> list[list[Head]]:
    """``n`` seeded random sets of ``size`` distinct heads (avoiding ``exclude``)."""
    skip = set(exclude)
    pool = [
        (layer, h) for layer in range(model.n_layers) for h in range(model.n_heads) if (layer, h) not in skip
    ]
    rng = random.Random(f"circuits:{seed}:{size}")
    size = min(size, len(pool))
    return [sorted(rng.sample(pool, size)) for _ in range(n)]
