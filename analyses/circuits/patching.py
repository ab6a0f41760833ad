"""Activation, attribution and path patching: per head, the share of the clean–corrupt gap that
patching its output (or only its path into chosen receivers) removes."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch

from analyses.circuits.config import ReceiverInput
from analyses.circuits.data import PromptSet
from analyses.circuits.forward import (
    GroupCache,
    Runner,
    StopForward,
    chunk_slices,
    head_masks,
    progress_bar,
    repeat_rows,
    swap_hook,
)
from probe import interventions as iv
from probe.errors import ConfigError
from probe.heads import by_layer
from probe.hooks import HookFn, attn_hook, hooks
from probe.loading import LoadedModel
from probe.types import Head


def activation_patching(
    runner: Runner,
    caches: Sequence[GroupCache],
    heads: Sequence[Head],
    *,
    batch_size: int = 128,
    progress: bool = False,
) -> np.ndarray:
    """Per head, the share of the gap removed by patching its corrupted ``z`` into the clean run.

    Returns ``[len(heads)]``. Copies of the clean batch each patch one head, so a forward pass serves
    ``batch_size // N`` heads.
    """
    sums = np.zeros(len(heads))
    gap = clean_corrupt_gap(caches)
    bar = progress_bar(
        sum(math.ceil(len(heads) / max(1, batch_size // len(c.group))) for c in caches),
        "activation patching",
        progress,
    )
    for cache in caches:
        n = len(cache.group)
        per = max(1, batch_size // n)
        for chunk in chunk_slices(len(heads), per):
            copies = [[h] for h in heads[chunk]]
            sel = head_masks(runner.model, copies)
            points = [
                (attn_hook(layer, "z"), swap_hook(cache.corrupt_z[layer], s)) for layer, s in sel.items()
            ]
            final = runner.run(
                repeat_rows(cache.group.clean, len(copies)),
                points,
                end=repeat_rows(cache.group.roles["end"], len(copies)),
            )
            assert final is not None
            ld = runner.readout(final, cache.group, len(copies)).logit_diff.reshape(len(copies), n)
            sums[chunk] += (ld - cache.clean.logit_diff[None]).sum(1).double().numpy()
            bar.update(1)
    bar.close()
    return sums / max(1, sum(len(c.group) for c in caches)) / gap


def attribution_patching(runner: Runner, caches: Sequence[GroupCache]) -> np.ndarray:
    """First-order estimate of :func:`activation_patching` for every head at once: ``[L, H]``.

    ``sum over positions and d_head of (z_corrupt - z_clean) * dLD/dz`` at the clean run, the
    linearisation of the patch (attribution patching), as a share of the gap. One forward and one
    backward pass per prompt chunk instead of one forward per head; it is the screen that picks the
    senders when ``max_senders`` is set, and exact activation patching then runs on those only.
    """
    model = runner.model
    total = np.zeros((model.n_layers, model.n_heads))
    gap = clean_corrupt_gap(caches)
    for cache in caches:
        group = cache.group
        kept: dict[int, torch.Tensor] = {}
        read: dict[str, torch.Tensor] = {}

        def keep(layer: int, kept: dict[int, torch.Tensor] = kept) -> HookFn:
            def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
                # Keep the graph: later heads read this z, so its gradient must flow through them.
                if not z.requires_grad:
                    z = z.detach().requires_grad_(True)
                kept[layer] = z
                return z

            return hook

        rows = torch.arange(len(group), device=runner.device)
        end = group.roles["end"].to(runner.device)

        def final(
            resid: torch.Tensor,
            hook: Any,
            read: dict[str, torch.Tensor] = read,
            rows: torch.Tensor = rows,
            end: torch.Tensor = end,
        ) -> None:
            read["end"] = resid[rows, end]
            raise StopForward

        points = [*((attn_hook(x, "z"), keep(x)) for x in range(model.n_layers)), ("unembed.hook_in", final)]
        bridge: Any = model.bridge
        with torch.enable_grad(), hooks(model, points) as hook_set, contextlib.suppress(StopForward):
            bridge(group.clean.to(runner.device))
        hook_set.check_fired()
        with torch.enable_grad():
            logits = runner.logits(read["end"])
            r = torch.arange(len(group), device=logits.device)
            ld = logits[r, group.right.to(logits.device)] - logits[r, group.wrong.to(logits.device)]
            grads = torch.autograd.grad(ld.sum(), [kept[x] for x in range(model.n_layers)])
        for layer, grad in enumerate(grads):
            delta = (cache.corrupt_z[layer] - cache.clean_z[layer]).to(grad.dtype)
            total[layer] += (delta * grad).sum(dim=(0, 1, 3)).double().cpu().numpy()
    return total / max(1, sum(len(c.group) for c in caches)) / gap


def clean_corrupt_gap(caches: Sequence[GroupCache]) -> float:
    clean = torch.cat([c.clean.logit_diff for c in caches]).double().mean().item()
    corrupt = torch.cat([c.corrupt.logit_diff for c in caches]).double().mean().item()
    gap = clean - corrupt
    if abs(gap) < 1e-6:
        raise ConfigError(
            f"the clean and corrupted prompts give the same mean logit difference ({clean:.3g}); "
            "patching scores are shares of that gap, so they are undefined here (a model that does "
            "not do the task): use a larger model or more prompts"
        )
    return gap


@dataclass(frozen=True)
class Receivers:
    """Where a path ends: ``input`` of ``heads`` ("q" at END, "kv"/"k" at every position) or the logits."""

    input: ReceiverInput
    heads: tuple[Head, ...] = ()

    def __post_init__(self) -> None:
        if self.input not in get_args(ReceiverInput):
            raise ConfigError(f"receiver input {self.input!r}: choose one of {get_args(ReceiverInput)}")
        if self.input != "logits" and not self.heads:
            raise ConfigError(
                f"receivers of kind {self.input!r} need at least one head; pass heads=((layer, head), ...) "
                "or use Receivers('logits') for the path into the logits"
            )

    @property
    def last_layer(self) -> int:
        return max((layer for layer, _ in self.heads), default=10**9)


def _receiver_points(model: LoadedModel, receivers: Receivers) -> list[tuple[int, str, list[int]]]:
    """(layer, hook point, indices at that hook point) of the receivers' inputs."""
    out: list[tuple[int, str, list[int]]] = []
    for layer, idx in sorted(by_layer(model, receivers.heads).items()):
        if receivers.input == "q":
            out.append((layer, attn_hook(layer, "q"), sorted(idx)))
        else:
            kv = sorted({model.kv_head(h) for h in idx})
            out.append((layer, attn_hook(layer, "k"), kv))
            if receivers.input == "kv":
                out.append((layer, attn_hook(layer, "v"), kv))
    return out


def path_patching_raw(
    runner: Runner, cache: GroupCache, senders: Sequence[Head], receivers: Receivers
) -> torch.Tensor:
    """Logit difference ``[len(senders), N]`` after patching sender -> receivers, all senders batched."""
    model = runner.model
    group, n, G = cache.group, len(cache.group), len(senders)
    clean_ids = repeat_rows(group.clean, G)
    end = repeat_rows(group.roles["end"], G)
    sel = head_masks(model, [[s] for s in senders])
    # (A) every head frozen to clean, sender g of copy g swapped in from the corrupted run
    freeze = []
    for layer in range(model.n_layers):
        s = sel.get(layer, torch.zeros(G, model.n_heads, dtype=torch.bool))
        freeze.append(
            (attn_hook(layer, "z"), swap_hook(cache.corrupt_z[layer], s, base=cache.clean_z[layer]))
        )
    if receivers.input == "logits":
        final = runner.run(clean_ids, freeze, end=end)
        assert final is not None
        return runner.readout(final, group, G).logit_diff.reshape(G, n)
    points = _receiver_points(model, receivers)
    recorded: dict[str, torch.Tensor] = {}

    def record(name: str) -> HookFn:
        def hook(activation: torch.Tensor, hook: Any) -> None:
            recorded[name] = activation.detach().clone()

        return hook

    last = max(layer for layer, _, _ in points)
    runner.run(
        clean_ids,
        [*freeze[: last + 1], *((name, record(name)) for _, name, _ in points)],
        stop_after=attn_hook(last, "z"),
    )
    # (B) clean run, only the receivers' inputs replaced by what (A) recorded
    patch: list[tuple[str, HookFn]] = []
    for _, name, idx in points:
        patch.append((name, _input_patch(recorded[name], idx, end if receivers.input == "q" else None)))
    if receivers.input != "q":
        for layer, idx in by_layer(model, receivers.heads).items():
            groups = {model.kv_head(h) for h in idx}
            siblings = [h for h in range(model.n_heads) if model.kv_head(h) in groups and h not in idx]
            if siblings:
                s = torch.zeros(1, model.n_heads, dtype=torch.bool)
                s[0, siblings] = True
                patch.append((attn_hook(layer, "z"), swap_hook(cache.clean_z[layer], s.expand(G, -1))))
    final = runner.run(clean_ids, patch, end=end)
    assert final is not None
    return runner.readout(final, group, G).logit_diff.reshape(G, n)


def _input_patch(recorded: torch.Tensor, idx: list[int], end: torch.Tensor | None) -> HookFn:
    """Write ``recorded`` ``[B, T, heads, d]`` at head slots ``idx`` (at END rows only if ``end``)."""

    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        out = activation.clone()
        src = recorded.to(activation.device, activation.dtype)
        if end is None:
            out[:, :, idx] = src[:, :, idx]
        else:
            rows = torch.arange(out.shape[0], device=out.device)
            where = end.to(out.device)
            for i in idx:
                out[rows, where, i] = src[rows, where, i]
        return out

    return hook


@torch.no_grad()
def path_patching_reference(
    model: LoadedModel,
    group: PromptSet,
    clean_z: Mapping[int, torch.Tensor],
    corrupt_z: Mapping[int, torch.Tensor],
    sender: Head,
    receivers: Receivers,
) -> torch.Tensor:
    """Logit difference ``[N]`` after patching one sender -> ``receivers``, written plainly.

    The same two passes as :func:`path_patching_raw`, one sender at a time, with the public
    interventions of :mod:`probe.interventions` and the bridge's own full logits (no early stop, no
    END-only unembedding, no batching of senders). It is the definition the batched code is tested
    and timed against (``tests/test_circuits.py``, ``benchmarks/circuits.py``), not the way to run
    an analysis.
    """
    layer, head = sender
    every: list[Head] = [(x, h) for x in range(model.n_layers) for h in range(model.n_heads)]
    ids = group.clean.to(model.device)

    def logit_diff() -> torch.Tensor:
        bridge: Any = model.bridge
        logits = bridge(ids)
        rows = torch.arange(len(group), device=logits.device)
        at_end = logits[rows, group.roles["end"].to(logits.device)].float()
        return (
            at_end[rows, group.right.to(at_end.device)] - at_end[rows, group.wrong.to(at_end.device)]
        ).cpu()

    def step_a() -> contextlib.AbstractContextManager[Any]:
        # every head frozen to its clean z, then the sender's z swapped for its corrupted value
        return iv.compose(
            iv.freeze_heads(model, every, clean_z),
            iv.patch_activation(model, attn_hook(layer, "z"), corrupt_z[layer], heads=[head]),
        )

    if receivers.input == "logits":
        with step_a():
            return logit_diff()
    points: dict[str, list[int]] = {}
    for _, name, slots in _receiver_points(model, receivers):
        points[name] = slots
    with step_a():
        recorded = iv.cache_activations(model, ids, list(points))
    end = torch.zeros(group.clean.shape, dtype=torch.bool)
    end[torch.arange(len(group)), group.roles["end"]] = True
    with contextlib.ExitStack() as stack:
        for name, slots in points.items():
            positions = end if receivers.input == "q" else None
            stack.enter_context(
                iv.patch_activation(model, name, recorded[name], heads=slots, positions=positions)
            )
        if receivers.input != "q":  # GQA: the receivers' KV-group siblings keep their clean output
            siblings = [
                (rl, x)
                for rl, rh in receivers.heads
                for x in range(model.n_heads)
                if model.kv_head(x) == model.kv_head(rh) and (rl, x) not in receivers.heads
            ]
            if siblings:
                stack.enter_context(iv.freeze_heads(model, siblings, clean_z))
        return logit_diff()


def path_patching_items(
    runner: Runner,
    caches: Sequence[GroupCache],
    senders: Sequence[Head],
    receivers: Receivers,
    *,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "path patching",
) -> np.ndarray:
    """Per sender and prompt, the change its path to ``receivers`` makes, as a share of the gap:
    ``[len(senders), n_prompts]`` (prompts in cache order).

    Senders at or above the last receiver layer cannot reach a receiver and score exactly 0 without a
    forward pass; the others are batched ``batch_size // N`` per pass.
    """
    gap = clean_corrupt_gap(caches)
    out = np.zeros((len(senders), sum(len(c.group) for c in caches)))
    live = [
        i
        for i, (layer, _) in enumerate(senders)
        if receivers.input == "logits" or layer < receivers.last_layer
    ]
    bar = progress_bar(
        sum(math.ceil(len(live) / max(1, batch_size // len(c.group))) for c in caches), desc, progress
    )
    offset = 0
    for cache in caches:
        n = len(cache.group)
        per = max(1, batch_size // n)
        for chunk in chunk_slices(len(live), per):
            which = live[chunk]
            ld = path_patching_raw(runner, cache, [senders[i] for i in which], receivers)
            out[which, offset : offset + n] = (ld - cache.clean.logit_diff[None]).double().numpy()
            bar.update(1)
        offset += n
    bar.close()
    return out / gap


def path_patching(
    runner: Runner,
    caches: Sequence[GroupCache],
    senders: Sequence[Head],
    receivers: Receivers,
    *,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "path patching",
) -> np.ndarray:
    """Per sender, the share of the gap its path to ``receivers`` carries (the mean over prompts of
    :func:`path_patching_items`): ``[len(senders)]``."""
    items = path_patching_items(
        runner, caches, senders, receivers, batch_size=batch_size, progress=progress, desc=desc
    )
    return items.mean(1)
