"""Held-out validation of the circuit's head classes, and the backup name movers.

Every class found on the discovery prompts is tested on fresh prompts: the other half of the names,
places and objects (:func:`analyses.tasks.ioi.word_part`), another seed. Each test compares the
effect of mean-ablating the class's heads with the same ablation of random same-size head sets
drawn from outside the tested heads (docs/validation.md). What is measured, per class:

* name movers, negative movers, induction, duplicate-token and previous-token heads: the change of
  the logit difference when the heads are mean-ablated (movers and their feeders lower it, negative
  movers raise it); the whole set and each head alone;
* S-inhibition heads: what their ablation does to the name movers' attention at END to the
  answer's name minus the attention to the repeated one (it should fall);
* backup name movers: heads whose direct effect on the logit difference grows when the name movers
  are ablated (the compensation), found on the discovery prompts by significance and tested on the
  held-out ones against random heads' compensation under the same ablation;
* the whole circuit: the logit difference with only its heads kept (all others mean-ablated).

Means for ablation are per template, over the held-out prompts and ``n_reference`` further fresh
prompts of the same words, so that no mean rests on a couple of prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses import validation as v
from analyses.circuits.config import SIGNATURES, CircuitConfig, HeadClass, TaskName
from analyses.circuits.data import TASK_BUILDERS, PromptSet, TaskData
from analyses.circuits.forward import (
    GroupCache,
    Runner,
    cache_group,
    chunk_slices,
    head_masks,
    repeat_rows,
    swap_hook,
)
from probe.devicemap import materialised
from probe.hooks import HookFn, attn_hook
from probe.types import Head

LOGIT_CLASSES: dict[str, v.Direction] = {
    "name_mover": "lower",
    "movers_and_backups": "lower",
    "negative_mover": "higher",
    "induction": "lower",
    "duplicate_token": "lower",
    "previous_token": "lower",
}
LD_MEASURE = "logit-diff change, mean-ablated"
ATTENTION_MEASURE = "movers' END attention (answer − repeated name) change, mean-ablated"
BACKUP_MEASURE = "direct-effect gain when the name movers are ablated"
CIRCUIT_MEASURE = "logit diff with only these heads kept"
JOINT_ROLES = ("circuit", "movers_and_backups")  # tests of several classes together: no head role


@dataclass
class HeldOut:
    """Fresh prompts of one task: their caches, the ablation means and a description."""

    data: TaskData
    caches: list[GroupCache]
    means: list[dict[int, torch.Tensor]]
    inputs: v.Inputs

    @property
    def clean(self) -> np.ndarray:
        return torch.cat([c.clean.logit_diff for c in self.caches]).double().numpy()


def _chunks(data: TaskData, batch_size: int) -> list[PromptSet]:
    per = max(1, batch_size // 4)
    return [g.subset(rows) for g in data.groups for rows in chunk_slices(len(g), per)]


def pooled_means(
    caches: Sequence[GroupCache], extra: Sequence[GroupCache] = ()
) -> list[dict[int, torch.Tensor]]:
    """Per cache of ``caches``, each layer's corrupted ``z`` ``[T, H, d]`` averaged over every
    prompt (of ``caches`` and ``extra``) with the same key (template and length)."""
    sums: dict[tuple[int, ...], dict[int, torch.Tensor]] = {}
    counts: dict[tuple[int, ...], int] = {}
    wanted = {x.group.key for x in caches}
    for c in [*caches, *extra]:
        key = c.group.key
        if key not in wanted:
            continue
        acc = sums.setdefault(key, {})
        for layer, z in c.corrupt_z.items():
            acc[layer] = acc[layer] + z.float().sum(0) if layer in acc else z.float().sum(0)
        counts[key] = counts.get(key, 0) + len(c.group)
    return [{layer: s / counts[c.group.key] for layer, s in sums[c.group.key].items()} for c in caches]


def build(runner: Runner, task: TaskName, cfg: CircuitConfig) -> HeldOut:
    """The held-out prompts (``cfg.n_heldout``) and the reference prompts for the means."""
    model = runner.model
    data = TASK_BUILDERS[task](model, cfg.n_heldout, cfg.seed, "held_out")
    reference = TASK_BUILDERS[task](model, cfg.n_reference, cfg.seed + 7919, "held_out")
    caches = [cache_group(runner, chunk) for chunk in _chunks(data, cfg.batch_size)]
    ref = [cache_group(runner, chunk) for chunk in _chunks(reference, cfg.batch_size)]
    words = "names, places and objects" if task == "ioi" else "objects"
    inputs = v.Inputs(
        f"held-out {task} prompts",
        data.n_items,
        f"seed {cfg.seed}, the other half of the {words}; means over {cfg.n_reference} more",
    )
    return HeldOut(data, caches, pooled_means(caches, ref), inputs)


@dataclass
class Readings:
    """Per head set and prompt: the logit difference, the watched heads' attention score and the
    direct effect of every head (``[S, n]``, ``[S, n]``, ``[S, n, L, H]``)."""

    logit_diff: np.ndarray
    attention: np.ndarray | None
    direct: np.ndarray | None


def _watch_hook(heads: list[int], group: PromptSet, copies: int, out: list[torch.Tensor]) -> HookFn:
    q_role, target = SIGNATURES["end_to_target"][0], SIGNATURES["end_to_target"][1]
    dup = SIGNATURES["end_to_dup"][1]

    def hook(pattern: torch.Tensor, hook: Any) -> None:
        p = pattern.detach()[:, heads]  # [B, h, T, T]
        rows = torch.arange(p.shape[0], device=p.device)
        roles = {k: repeat_rows(r, copies).to(p.device) for k, r in group.roles.items()}
        q = roles[q_role]
        to_target = torch.stack([p[rows, :, q, roles[k]] for k in target]).sum(0)
        score = to_target - torch.stack([p[rows, :, q, roles[k]] for k in dup]).sum(0)
        out.append(score.double().sum(-1).cpu())  # [B]: summed over the watched heads of this layer

    return hook


def run_sets(
    runner: Runner,
    caches: Sequence[GroupCache],
    means: Sequence[dict[int, torch.Tensor]],
    sets: Sequence[Sequence[Head]],
    *,
    keep: bool = False,
    watch: Sequence[Head] = (),
    direct: bool = False,
    batch_size: int = 128,
) -> Readings:
    """Mean-ablate each set in turn (``keep``: every head *outside* it) on every prompt.

    ``watch``: also read those heads' END attention to the answer's name minus the repeated name
    (summed over them); ``direct``: also each head's direct effect on the logit difference.
    """
    model = runner.model
    n_total = sum(len(c.group) for c in caches)
    ld = np.zeros((len(sets), n_total))
    att = np.zeros((len(sets), n_total)) if watch else None
    dla = np.zeros((len(sets), n_total, model.n_layers, model.n_heads)) if direct else None
    offset = 0
    for cache, mean in zip(caches, means, strict=True):
        n = len(cache.group)
        for chunk in chunk_slices(len(sets), max(1, batch_size // n)):
            copies = sets[chunk]
            G = len(copies)
            masks = head_masks(model, copies)
            reads: dict[str, Any] = {"z": {}, "att": []}
            points = _points(model.n_layers, n, G, mean, masks, keep, cache.group, watch, direct, reads)
            end = repeat_rows(cache.group.roles["end"], G)
            final = runner.run(repeat_rows(cache.group.clean, G), points, end=end)
            assert final is not None
            cols = slice(offset, offset + n)
            ld[chunk, cols] = runner.readout(final, cache.group, G).logit_diff.reshape(G, n).double().numpy()
            if att is not None:
                att[chunk, cols] = torch.stack(reads["att"]).sum(0).reshape(G, n).numpy()
            if dla is not None:
                heads_dla = direct_effects(runner, reads, cache.group, G)
                dla[chunk, cols] = heads_dla.reshape(G, n, model.n_layers, model.n_heads)
        offset += n
    return Readings(ld, att, dla)


def _points(
    n_layers: int,
    n: int,
    G: int,
    mean: dict[int, torch.Tensor],
    masks: dict[int, torch.Tensor],
    keep: bool,
    group: PromptSet,
    watch: Sequence[Head],
    direct: bool,
    reads: dict[str, Any],
) -> list[tuple[str, HookFn]]:
    points: list[tuple[str, HookFn]] = []
    end = repeat_rows(group.roles["end"], G)
    for layer in range(n_layers):
        sel = masks.get(layer)
        if keep:
            sel = ~sel if sel is not None else torch.ones(G, mean[layer].shape[1], dtype=torch.bool)
        swap = (
            swap_hook(mean[layer].unsqueeze(0).expand(n, *mean[layer].shape), sel)
            if sel is not None
            else None
        )
        if swap is None and not direct:
            continue
        points.append((attn_hook(layer, "z"), _z_hook(layer, swap, end if direct else None, reads)))
    for layer in sorted({x for x, _ in watch}):
        idx = [h for x, h in watch if x == layer]
        points.append((attn_hook(layer, "pattern"), _watch_hook(idx, group, G, reads["att"])))
    if direct:

        def resid(x: torch.Tensor, hook: Any) -> None:
            rows = torch.arange(x.shape[0], device=x.device)
            reads["resid"] = x[rows, end.to(x.device)].detach()

        points.append(("ln_final.hook_in", resid))
    return points


def _z_hook(layer: int, swap: HookFn | None, end: torch.Tensor | None, reads: dict[str, Any]) -> HookFn:
    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        swapped = swap(z, hook) if swap is not None else z
        out = z if swapped is None else swapped
        if end is not None:
            rows = torch.arange(out.shape[0], device=out.device)
            reads["z"][layer] = out[rows, end.to(out.device)].detach()  # [B, H, d_head]
        return out

    return hook


def direct_effects(runner: Runner, reads: dict[str, Any], group: PromptSet, copies: int) -> np.ndarray:
    """``[B, L, H]``: each head's direct effect on the logit difference at END, its output
    ``z W_O`` times the gradient of the logit difference at the final norm's input (the norm
    linearised at the run's own residual)."""
    model = runner.model
    bridge: Any = model.bridge
    resid = reads["resid"]
    weight = next(bridge.ln_final.parameters(), resid)
    x = resid.detach().to(weight.dtype).requires_grad_(True)
    rows = torch.arange(x.shape[0], device=x.device)
    right = repeat_rows(group.right, copies).to(x.device)
    wrong = repeat_rows(group.wrong, copies).to(x.device)
    with torch.enable_grad():
        logits = runner.logits(bridge.ln_final(x))
        (grad,) = torch.autograd.grad((logits[rows, right] - logits[rows, wrong]).sum(), x)
    out = torch.zeros(x.shape[0], model.n_layers, model.n_heads, dtype=torch.float64)
    for layer in range(model.n_layers):
        attn = bridge.blocks[layer].attn
        with materialised(attn):  # an offloaded layer's weights exist only inside its forward
            w_o = attn.W_O.detach().clone()  # [H, d_head, d_model], on the layer's device
        z = reads["z"][layer].to(w_o.device, w_o.dtype)
        contrib = torch.einsum("bhd,hdm->bhm", z, w_o)
        out[:, layer] = torch.einsum("bhm,bm->bh", contrib.double(), grad.to(contrib.device).double()).cpu()
    return out.numpy()


def find_backups(
    runner: Runner,
    caches: Sequence[GroupCache],
    means: Sequence[dict[int, torch.Tensor]],
    movers: Sequence[Head],
    cfg: CircuitConfig,
) -> tuple[list[Head], np.ndarray]:
    """Backup name movers on the discovery prompts: heads (not movers) whose direct effect grows
    significantly when the movers are ablated (one-sided t-test, Benjamini–Hochberg), strongest
    first. Returns them and the mean compensation ``[L, H]``."""
    model = runner.model
    shape = (model.n_layers, model.n_heads)
    if not movers:
        return [], np.full(shape, np.nan)
    r = run_sets(runner, caches, means, [[], list(movers)], direct=True, batch_size=cfg.batch_size)
    assert r.direct is not None
    comp = r.direct[1] - r.direct[0]  # [n, L, H]
    flat = comp.reshape(comp.shape[0], -1).copy()
    for layer, h in movers:
        flat[:, layer * model.n_heads + h] = np.nan
    passed, _ = v.significant(flat, "higher", cfg.alpha)
    mean = comp.mean(0)
    order = [
        int(i) for i in np.argsort(-np.nan_to_num(flat.mean(0), nan=-np.inf), kind="stable") if passed[i]
    ]
    return [(i // model.n_heads, i % model.n_heads) for i in order][: cfg.max_per_class], mean


Test = tuple[str, list[Head], np.ndarray, np.ndarray, str, v.Direction, str]


def _ablation_tests(
    runner: Runner, held: HeldOut, classes: dict[HeadClass, list[Head]], every: list[Head], cfg: CircuitConfig
) -> list[Test]:
    """The logit-difference tests of :data:`LOGIT_CLASSES`: set, each head, the nulls, in one pass."""
    found: list[tuple[str, list[Head]]] = [
        (cls, heads) for cls, heads in classes.items() if cls in LOGIT_CLASSES and heads
    ]
    if classes.get("name_mover") and classes.get("backup_mover"):
        # can the movers be told apart from their backups? ablate both together
        joint = sorted({*classes["name_mover"], *classes["backup_mover"]})
        found.append(("movers_and_backups", joint))
    circuit = sorted({h for _, heads in classes.items() for h in heads})
    singles = v.null_sets(every, 1, cfg.n_null, f"{cfg.seed}:singles", exclude=circuit) if found else []
    plan: list[tuple[str, list[Head], list[list[Head]], str]] = []
    for cls, heads in found:
        plan.append(
            (cls, heads, v.null_sets(every, len(heads), cfg.n_null, f"{cfg.seed}:{cls}", heads), "set")
        )
        if len(heads) > 1 and cls != "movers_and_backups":
            plan += [(cls, [h], singles, "head") for h in heads]
    sets: list[list[Head]] = []
    index: dict[tuple[Head, ...], int] = {}
    for _, heads, null, _ in plan:
        for one in (heads, *null):
            if tuple(one) not in index:
                index[tuple(one)] = len(sets)
                sets.append(list(one))
    if not sets:
        return []
    r = run_sets(runner, held.caches, held.means, sets, batch_size=cfg.batch_size)
    change = r.logit_diff - held.clean[None]
    out: list[Test] = []
    for cls, heads, null, scope in plan:
        effect = change[index[tuple(heads)]]
        nulls = np.array([change[index[tuple(s)]].mean() for s in null])
        out.append((str(cls), heads, effect, nulls, LD_MEASURE, LOGIT_CLASSES[cls], scope))
    return out


def _inhibition_test(
    runner: Runner, held: HeldOut, classes: dict[HeadClass, list[Head]], every: list[Head], cfg: CircuitConfig
) -> list[Test]:
    inhibition, movers = classes.get("s_inhibition", []), classes.get("name_mover", [])
    if not inhibition or not movers:
        return []
    null = v.null_sets(every, len(inhibition), cfg.n_null, f"{cfg.seed}:s_inhibition", inhibition)
    sets = [[], inhibition, *null]
    r = run_sets(runner, held.caches, held.means, sets, watch=movers, batch_size=cfg.batch_size)
    assert r.attention is not None
    change = (r.attention[1:] - r.attention[0][None]) / len(movers)
    return [("s_inhibition", inhibition, change[0], change[1:].mean(1), ATTENTION_MEASURE, "lower", "set")]


def _backup_tests(
    runner: Runner, held: HeldOut, classes: dict[HeadClass, list[Head]], every: list[Head], cfg: CircuitConfig
) -> list[Test]:
    backups, movers = classes.get("backup_mover", []), classes.get("name_mover", [])
    if not backups or not movers:
        return []
    r = run_sets(runner, held.caches, held.means, [[], movers], direct=True, batch_size=cfg.batch_size)
    assert r.direct is not None
    comp = r.direct[1] - r.direct[0]  # [n, L, H]

    def total(heads: Sequence[Head]) -> np.ndarray:
        return np.sum([comp[:, a, b] for a, b in heads], axis=0)

    outside = [*backups, *movers]
    null = v.null_sets(every, len(backups), cfg.n_null, f"{cfg.seed}:backup", outside)
    singles = v.null_sets(every, 1, cfg.n_null, f"{cfg.seed}:backup1", outside)
    tests: list[Test] = [
        (
            "backup_mover",
            backups,
            total(backups),
            np.array([total(s).mean() for s in null]),
            BACKUP_MEASURE,
            "higher",
            "set",
        )
    ]
    if len(backups) > 1:
        single_null = np.array([total(s).mean() for s in singles])
        tests += [
            ("backup_mover", [h], total([h]), single_null, BACKUP_MEASURE, "higher", "head") for h in backups
        ]
    return tests


def _circuit_test(
    runner: Runner, held: HeldOut, classes: dict[HeadClass, list[Head]], every: list[Head], cfg: CircuitConfig
) -> list[Test]:
    circuit = sorted({h for heads in classes.values() for h in heads})
    if not circuit or len(every) - len(circuit) < len(circuit):
        return []
    null = v.null_sets(every, len(circuit), cfg.n_null, f"{cfg.seed}:circuit", circuit)
    r = run_sets(runner, held.caches, held.means, [circuit, *null], keep=True, batch_size=cfg.batch_size)
    return [("circuit", circuit, r.logit_diff[0], r.logit_diff[1:].mean(1), CIRCUIT_MEASURE, "higher", "set")]


TESTS: tuple[Callable[..., list[Test]], ...] = (
    _ablation_tests,
    _inhibition_test,
    _backup_tests,
    _circuit_test,
)


def validate(
    runner: Runner, task: TaskName, held: HeldOut, classes: dict[HeadClass, list[Head]], cfg: CircuitConfig
) -> pd.DataFrame:
    """The validation table of one task: one row per class (set) and per head of a larger class."""
    model = runner.model
    every: list[Head] = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]
    rows = []
    for make in TESTS:
        for role, heads, effect, null, measure, direction, scope in make(runner, held, classes, every, cfg):
            rows.append(
                v.test_row(
                    role,
                    heads,
                    effect,
                    null,
                    measure=measure,
                    direction=direction,
                    inputs=held.inputs,
                    scope=scope,  # type: ignore[arg-type]
                    n_boot=cfg.n_boot,
                    seed=cfg.seed,
                    alpha=cfg.alpha,
                    task=task,
                )
            )
    return v.frame(rows, extra=("task",))
