"""IOI and Colored Objects circuits: activation and path patching, head classes, reuse, intervention.

Background
----------
Wang et al. (2022) explain how GPT-2 small completes *"When Mary and John went to the store, John
gave a drink to"* with *" Mary"* (indirect-object identification, IOI) by a circuit of attention-head
classes found with **path patching**: the effect of one head (the *sender*) on the task that flows
only through a chosen set of *receivers*. Merullo et al. (2024) run the same procedure on one-shot
Colored Objects prompts and find that largely the same heads do the work (circuit reuse); forcing
the IOI inhibition heads and negative movers to look at the wrong colours repairs the model's
Colored Objects answers. This module computes all of it on any language model probe loads, and
finds the heads itself: no head list is written in it.

Definitions
-----------
* **Metric.** At the final position END, ``logit_diff = logit(right) - logit(wrong)``. IOI: right =
  IO, wrong = S. Colored Objects: right = the asked object's colour, wrong = the colour of the
  object the corrupted prompt asks about (the answer the corruption would make right), so the gap
  flips sign under corruption as IOI's does. Accuracy: IOI, IO beats S (and, reported too, IO is the
  top token over the whole vocabulary); Colored Objects, the right colour beats the other scene
  colours (*among candidates*) and is the top token over the whole vocabulary.
* **Corruption.** IOI uses the ABC distribution (the three name mentions replaced by three other
  names; ``p_ABC`` in the paper); Colored Objects asks about another object of the same scene.
* **Share of the gap.** Every patching score is ``(LD_patched - LD_clean) / (LD_clean - LD_corrupt)``
  averaged over prompts (ratio of means): -1 means the patch removed the whole clean–corrupt
  difference, 0 nothing, positive values that it pushed the model further toward the right answer.
* **Activation patching** (per head): the head's output ``z`` (``blocks.L.attn.hook_z``, before the
  output projection) at every position is replaced by its value on the corrupted prompt; the rest of
  the network runs on.
* **Path patching** sender -> receivers, in two forward passes (Wang et al.'s algorithm):
  (A) run the clean prompt with the sender's ``z`` from the corrupted run and *every other head's*
  ``z`` frozen to its clean value, and record the receivers' inputs; (B) run the clean prompt again
  with only the receivers' inputs replaced by the values recorded in (A). MLPs are never frozen (as
  in the paper: the path may pass through them). Receivers are one of: the logits at END (then (A)
  alone gives the answer), the **queries** of receiver heads at END, or the **keys and values** (or
  keys only) of receiver heads at every position. With grouped-query attention, keys and values
  belong to a KV head shared by several query heads; (B) then also pins the group's other query
  heads to their clean output, so only the receiver itself sees the new keys and values.
* **Batching.** (A) and (B) treat G senders at once: the clean batch is repeated G times and copy g
  swaps in sender g only, so one forward serves G senders; the answer is identical to one forward per
  sender (``benchmarks/circuits.py`` times both, the tests compare them).
* **Mean ablation and faithfulness.** A head is mean-ablated by replacing its ``z`` at each position
  with its mean over the task's corrupted prompts of the same template (same length, same slot
  positions), as in Wang et al. Faithfulness of a circuit C: mean logit difference with every head
  outside C mean-ablated, over the full model's mean logit difference; compared with random circuits
  of the same size and with the empty circuit.

Staged discovery
----------------
Each stage path-patches every head (sender) into the receivers found by the stage before:

==================  =============================================  =======================================
stage               receivers                                      classes found (path score, signature)
==================  =============================================  =======================================
``logits``          the logits at END                              ``name_mover`` (score <= -t, END looks
                                                                   at the target), ``negative_mover``
                                                                   (score >= +t, END looks at the target)
``mover_queries``   queries of the name movers at END              ``s_inhibition`` (score <= -t, END
                                                                   looks at the repeated entity)
``inhibition_kv``   keys and values of the S-inhibition heads      ``induction`` (S2 looks at S1+1),
                                                                   ``duplicate_token`` (S2 looks at S1)
``induction_k``     keys of the induction heads                    ``previous_token`` (S1+1 looks at S1)
==================  =============================================  =======================================

``t`` is ``min_share`` (a share of the gap) and "looks at" means a mean attention of at least
``min_attention`` on those keys, more than on the competing keys (the target vs the repeated entity;
S1+1 vs S1). Signatures are read from the clean run's patterns at the named positions. When a stage
finds no head of the receiving class, its strongest path-patching heads stand in as receivers (the
``receivers`` table says so). Positions have task-neutral roles so that Colored Objects runs the same
rules: *target* = IO / the answer's colour mention in the scene; *dup1*, *dup2* = S1, S2 / the asked
object's mention in the scene and in the question; *dup1_next* = the token after dup1. The Colored
Objects mapping is our analogue, not the paper's; its classes read accordingly.

Reuse and intervention
----------------------
Per stage, the top ``p``% of heads by ``|score|`` on each task; the overlap is the share of IOI's
top heads that are also Colored Objects' top heads of the same stage (pooled over stages: Merullo
et al.'s "25 of 32" at 2%), reported as a curve over ``p``, plus the Spearman correlation of the two
tasks' per-head scores. The intervention makes the IOI ``s_inhibition`` and ``negative_mover`` heads
put all attention of the END query on the two wrong colours of the scene (equal halves), and
compares Colored Objects accuracy before and after with the same edit on random heads.

Usage
-----
::

    from analyses import circuits
    from probe import load_model

    model = load_model("smollm2-135m")
    result = circuits.run_ioi(model, circuits.CircuitConfig(n_items=64))
    result.tables["circuit"]          # heads by class with their path score and attention signature
    result.tables["faithfulness"]     # the found circuit vs random circuits of the same size

The CLI: ``headlab run ioi``, ``headlab run colored-objects``, ``headlab run circuit-reuse``.

References
----------
* Wang, Variengien, Conmy, Shlegeris & Steinhardt (2023). Interpretability in the Wild: a Circuit
  for Indirect Object Identification in GPT-2 small. ICLR.
* Merullo, Eickhoff & Pavlick (2024). Circuit Component Reuse Across Tasks in Transformer Language
  Models. ICLR.
* Goldowsky-Dill, MacLeod, Sato & Arora (2023). Localizing Model Behavior with Path Patching.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import torch

from analyses.base import AnalysisResult, heads_frame
from analyses.registry import Analysis, register
from analyses.tasks import colored_objects as co
from analyses.tasks import ioi
from probe import interventions as iv
from probe.errors import ConfigError
from probe.hooks import HookFn, attn_hook, hooks
from probe.interventions import Head, _by_layer
from probe.loading import LoadedModel

TaskName = Literal["ioi", "colored_objects"]
Stage = Literal["logits", "mover_queries", "inhibition_kv", "induction_k"]
ReceiverInput = Literal["logits", "q", "kv", "k"]
HeadClass = Literal[
    "name_mover", "negative_mover", "s_inhibition", "induction", "duplicate_token", "previous_token"
]
STAGES: tuple[Stage, ...] = get_args(Stage)
CLASSES: tuple[HeadClass, ...] = get_args(HeadClass)
ROLES = ("end", "target", "dup1", "dup2", "dup1_next")
SIGNATURES: dict[str, tuple[str, tuple[str, ...]]] = {
    # name -> (query role, key roles whose attention is summed)
    "end_to_target": ("end", ("target",)),
    "end_to_dup": ("end", ("dup1", "dup2")),
    "dup2_to_dup1": ("dup2", ("dup1",)),
    "dup2_to_dup1_next": ("dup2", ("dup1_next",)),
    "dup1_next_to_dup1": ("dup1_next", ("dup1",)),
}
STAGE_RECEIVERS: dict[Stage, tuple[ReceiverInput, tuple[HeadClass, ...]]] = {
    "logits": ("logits", ()),
    "mover_queries": ("q", ("name_mover",)),
    "inhibition_kv": ("kv", ("s_inhibition",)),
    "induction_k": ("k", ("induction",)),
}
STAGE_CLASSES: dict[Stage, tuple[HeadClass, ...]] = {
    "logits": ("name_mover", "negative_mover"),
    "mover_queries": ("s_inhibition",),
    "inhibition_kv": ("induction", "duplicate_token"),
    "induction_k": ("previous_token",),
}
TASK_LABELS = {"ioi": "IOI", "colored_objects": "Colored Objects"}


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once what it needs has been read."""


# ------------------------------------------------------------------------------------------ config


@dataclass
class CircuitConfig:
    """Settings of ``headlab run ioi``, ``colored-objects`` and ``circuit-reuse`` (one config for all).

    ``n_items`` prompts per task (IOI templates and both name orders, Colored Objects balanced over
    the asked position), drawn with ``seed``. ``min_share``: the path-patching score (share of the
    clean–corrupt gap) a head needs in a stage; ``min_attention``: the mean attention its signature
    needs. ``max_per_class`` caps a class (strongest first). ``n_random``: random circuits / head sets
    for the faithfulness, ablation and intervention controls. ``reuse_percents``: the top-p% points
    of the overlap curve (``2.0`` is the paper's). ``batch_size``: sequences per forward pass (the
    sender batching repeats the prompts to fill it). ``max_senders``: activation- and path-patch only
    the strongest heads by attribution patching (a gradient estimate of activation patching for
    every head from one backward pass; the others score NaN, "not tested"); ``None`` (the default
    and the method) tests every head. It is there for CPU runs: one stage costs two forward passes per
    sender and prompt, minutes per stage for a 270-head model on a laptop, seconds on a GPU.
    """

    n_items: int = 48
    max_senders: int | None = None
    seed: int = 0
    min_share: float = 0.02
    min_attention: float = 0.1
    max_per_class: int = 8
    n_random: int = 20
    reuse_percents: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0)
    batch_size: int = 128
    n_boot: int = 1000
    progress: bool = True

    def validate(self) -> None:
        if isinstance(self.n_items, bool) or not isinstance(self.n_items, int) or self.n_items < 2:
            raise ConfigError(f"n_items={self.n_items!r}: use at least 2 prompts per task")
        if not 0.0 <= self.min_share < 1.0:
            raise ConfigError(f"min_share={self.min_share}: a share of the gap in [0, 1), e.g. 0.02")
        if not 0.0 <= self.min_attention <= 1.0:
            raise ConfigError(f"min_attention={self.min_attention}: an attention weight in [0, 1], e.g. 0.1")
        if self.max_per_class < 1:
            raise ConfigError(f"max_per_class={self.max_per_class}: allow at least 1 head per class")
        if self.n_random < 1:
            raise ConfigError(f"n_random={self.n_random}: draw at least 1 random control")
        if not self.reuse_percents or any(not 0.0 < p <= 100.0 for p in self.reuse_percents):
            raise ConfigError(f"reuse_percents={self.reuse_percents}: percentages in (0, 100], e.g. 1,2,5,10")
        if self.max_senders is not None and self.max_senders < 1:
            raise ConfigError(f"max_senders={self.max_senders}: test at least 1 head, or none for all heads")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: use at least 1 sequence per forward")
        if self.n_boot < 1:
            raise ConfigError(f"n_boot={self.n_boot}: use at least 1 bootstrap resample")


# ------------------------------------------------------------------------------------ prompt sets


@dataclass
class PromptSet:
    """Token-aligned clean and corrupted prompts of one length: one batch shape.

    ``right``/``wrong`` are the metric's token ids ``[N]``; ``candidates`` ``[N, C]`` the ids the
    among-candidates accuracy compares (``right`` is ``candidates[n, answer_index[n]]``);
    ``roles`` maps each role of :data:`ROLES` to positions ``[N]``; ``wrong_positions`` ``[N, W]``
    are the positions of the wrong candidates in the prompt (the intervention's targets).
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    right: torch.Tensor
    wrong: torch.Tensor
    candidates: torch.Tensor
    answer_index: torch.Tensor
    roles: dict[str, torch.Tensor]
    wrong_positions: torch.Tensor
    items: np.ndarray  # indices into the task's item list

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def length(self) -> int:
        return int(self.clean.shape[1])

    def subset(self, rows: slice) -> PromptSet:
        return PromptSet(
            self.clean[rows], self.corrupt[rows], self.right[rows], self.wrong[rows], self.candidates[rows],
            self.answer_index[rows], {k: v[rows] for k, v in self.roles.items()}, self.wrong_positions[rows],
            self.items[rows],
        )  # fmt: skip


@dataclass
class TaskData:
    name: TaskName
    groups: list[PromptSet]
    texts: list[str]
    answers: list[str]

    @property
    def n_items(self) -> int:
        return sum(len(g) for g in self.groups)


def _long(values: Sequence[Any]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def ioi_task(model: LoadedModel, n: int, seed: int = 0) -> TaskData:
    """IOI prompts (both orders, all templates) with their ABC corruptions, grouped by template."""
    items = ioi.make_ioi(model, n, seed=seed)
    groups = []
    index = {id(it): i for i, it in enumerate(items)}
    for group in ioi.group_by_template(items).values():
        groups.append(
            PromptSet(
                clean=_long([it.ids for it in group]),
                corrupt=_long([it.corrupt("abc").ids for it in group]),
                right=_long([it.io_id for it in group]),
                wrong=_long([it.s_id for it in group]),
                candidates=_long([[it.io_id, it.s_id] for it in group]),
                answer_index=torch.zeros(len(group), dtype=torch.long),
                roles={
                    "end": _long([it.end_pos for it in group]),
                    "target": _long([it.io_pos for it in group]),
                    "dup1": _long([it.s1_pos for it in group]),
                    "dup2": _long([it.s2_pos for it in group]),
                    "dup1_next": _long([it.s1_pos + 1 for it in group]),
                },
                wrong_positions=_long([[it.s1_pos, it.s2_pos] for it in group]),
                items=np.array([index[id(it)] for it in group]),
            )
        )
    return TaskData("ioi", groups, [it.text for it in items], [it.answer for it in items])


def colored_objects_task(model: LoadedModel, n: int, seed: int = 0) -> TaskData:
    """Colored Objects prompts with their other-object corruptions, grouped by length."""
    items = co.make_colored_objects(model, n, seed=seed)
    index = {id(it): i for i, it in enumerate(items)}
    groups = []
    for group in co.group_by_length(items).values():
        others = [[k for k in range(len(it.candidates)) if k != it.asked] for it in group]
        groups.append(
            PromptSet(
                clean=_long([it.ids for it in group]),
                corrupt=_long([it.corrupted_ids for it in group]),
                right=_long([it.answer_id for it in group]),
                wrong=_long([it.corrupted_answer_id for it in group]),
                candidates=_long([it.candidate_ids for it in group]),
                answer_index=_long([it.asked for it in group]),
                roles={
                    "end": _long([it.end_pos for it in group]),
                    "target": _long([it.colour_positions[it.asked] for it in group]),
                    "dup1": _long([it.object_positions[it.asked] for it in group]),
                    "dup2": _long([it.question_pos for it in group]),
                    "dup1_next": _long([it.object_positions[it.asked] + 1 for it in group]),
                },
                wrong_positions=_long(
                    [[it.colour_positions[k] for k in ks] for it, ks in zip(group, others, strict=True)]
                ),
                items=np.array([index[id(it)] for it in group]),
            )
        )
    return TaskData("colored_objects", groups, [it.text for it in items], [it.answer for it in items])


TASK_BUILDERS: dict[str, Callable[[LoadedModel, int, int], TaskData]] = {
    "ioi": ioi_task,
    "colored_objects": colored_objects_task,
}


# ------------------------------------------------------------------------------------ forward core


@dataclass
class EndReadout:
    """What a forward pass leaves at END: the metric and, when asked, the full vocabulary's argmax."""

    logit_diff: torch.Tensor  # [B]
    candidate_logits: torch.Tensor  # [B, C]
    top_token: torch.Tensor | None  # [B]


class Runner:
    """Forward passes that stop at the last hook they need and read the logits only at END.

    The unembedding is applied to END's final residual alone (the bridge would otherwise unembed
    every position: most of a forward's cost for a 262k vocabulary). A test checks the result
    against the bridge's own logits.
    """

    def __init__(self, model: LoadedModel) -> None:
        if model.bridge is None:
            raise ConfigError(f"{model.name} is not a language model; circuits need one")
        self.model = model
        native: Any = model.native_model if model.native_model is not None else model.hf_model
        unembed = native.get_output_embeddings()
        if unembed is None:
            raise ConfigError(f"{model.name} has no output embedding to read logits from")
        self.unembed: torch.nn.Module = unembed
        cfg = getattr(native, "config", None)
        text = getattr(cfg, "text_config", None) or cfg
        self.softcap: float | None = getattr(text, "final_logit_softcapping", None)
        self.device = model.device

    def logits(self, final_resid: torch.Tensor) -> torch.Tensor:
        weight = next(self.unembed.parameters())
        out = self.unembed(final_resid.to(weight.dtype)).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    @torch.no_grad()
    def run(
        self,
        ids: torch.Tensor,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        *,
        end: torch.Tensor | None = None,
        stop_after: str | None = None,
    ) -> torch.Tensor | None:
        """Run ``ids`` with ``fwd_hooks``; return END's final residual ``[B, d]`` (``end`` given) or
        stop right after hook point ``stop_after`` fired and return None."""
        captured: dict[str, torch.Tensor] = {}
        points = list(fwd_hooks)
        if end is not None:
            rows = torch.arange(ids.shape[0], device=self.device)
            where = end.to(self.device)

            def read(resid: torch.Tensor, hook: Any) -> None:
                captured["end"] = resid[rows, where].detach()
                raise _Stop

            points.append(("unembed.hook_in", read))
        elif stop_after is not None:

            def stop(activation: torch.Tensor, hook: Any) -> None:
                raise _Stop

            points.append((stop_after, stop))
        bridge: Any = self.model.bridge
        with hooks(self.model, points) as hook_set, contextlib.suppress(_Stop):
            bridge(ids.to(self.device))
        hook_set.check_fired()  # every hook given must lie before the stop
        return captured.get("end")

    def readout(self, final: torch.Tensor, group: PromptSet, copies: int, *, top: bool = False) -> EndReadout:
        """Metric of ``copies`` stacked copies of ``group``'s rows from END residuals ``[copies*N, d]``."""
        logits = self.logits(final)
        dev = logits.device
        right = group.right.to(dev).repeat(copies)
        wrong = group.wrong.to(dev).repeat(copies)
        rows = torch.arange(logits.shape[0], device=dev)
        cands = group.candidates.to(dev).repeat(copies, 1)
        return EndReadout(
            logit_diff=(logits[rows, right] - logits[rows, wrong]).cpu(),
            candidate_logits=logits.gather(1, cands).cpu(),
            top_token=logits.argmax(-1).cpu() if top else None,
        )


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


@dataclass
class GroupCache:
    """Clean and corrupted per-layer ``z`` and the clean/corrupted metric of one prompt chunk."""

    group: PromptSet
    clean_z: dict[int, torch.Tensor]
    corrupt_z: dict[int, torch.Tensor]
    clean: EndReadout
    corrupt: EndReadout


def cache_group(runner: Runner, group: PromptSet, signatures: SignatureSums | None = None) -> GroupCache:
    """One clean and one corrupted forward over ``group``: every layer's ``z`` and the END metric.

    With ``signatures``, the clean pass also adds the group's attention signatures to it (no extra
    forward pass)."""
    model = runner.model
    out: list[dict[int, torch.Tensor]] = []
    reads: list[EndReadout] = []
    for ids in (group.clean, group.corrupt):
        store: dict[int, torch.Tensor] = {}

        def make(layer: int, store: dict[int, torch.Tensor] = store) -> HookFn:
            def hook(z: torch.Tensor, hook: Any) -> None:
                store[layer] = z.detach().clone()

            return hook

        points = [(attn_hook(x, "z"), make(x)) for x in range(model.n_layers)]
        if signatures is not None and ids is group.clean:
            points += signatures.hooks(group)
        final = runner.run(ids, points, end=group.roles["end"])
        assert final is not None
        out.append(store)
        reads.append(runner.readout(final, group, 1, top=True))
    return GroupCache(group, out[0], out[1], reads[0], reads[1])


def _stack(t: torch.Tensor, copies: int) -> torch.Tensor:
    return t.repeat(copies, *([1] * (t.dim() - 1)))


def _select(model: LoadedModel, copies: Sequence[Sequence[Head]]) -> dict[int, torch.Tensor]:
    """Per layer, a bool ``[G, H]``: which heads copy g acts on (only layers some copy touches)."""
    out: dict[int, torch.Tensor] = {}
    for g, heads in enumerate(copies):
        for layer, idx in _by_layer(model, heads).items():
            sel = out.setdefault(layer, torch.zeros(len(copies), model.n_heads, dtype=torch.bool))
            sel[g, idx] = True
    return out


def _swap_hook(source: torch.Tensor, sel: torch.Tensor, *, base: torch.Tensor | None = None) -> HookFn:
    """hook_z of a layer: copy g takes ``source`` ``[N, T, H, d]`` at the heads ``sel[g]`` marks; the
    other heads keep ``base`` (the frozen clean values) or, when ``base`` is None, the running z."""

    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        G, N = sel.shape[0], source.shape[0]
        mask = sel.to(z.device)[:, None, None, :, None]
        keep = z.reshape(G, N, *z.shape[1:]) if base is None else base.to(z.device, z.dtype).unsqueeze(0)
        out = torch.where(mask, source.to(z.device, z.dtype).unsqueeze(0), keep)
        return out.expand(G, *out.shape[1:]).reshape(z.shape)

    return hook


# ---------------------------------------------------------------------------------- patching


def activation_patching(
    runner: Runner, caches: Sequence[GroupCache], heads: Sequence[Head], *, batch_size: int = 128,
    progress: bool = False,
) -> np.ndarray:  # fmt: skip
    """Per head, the share of the gap removed by patching its corrupted ``z`` into the clean run.

    Returns ``[len(heads)]``. Copies of the clean batch each patch one head, so a forward pass serves
    ``batch_size // N`` heads.
    """
    sums = np.zeros(len(heads))
    gap = _gap(caches)
    bar = _progress(sum(math.ceil(len(heads) / max(1, batch_size // len(c.group))) for c in caches),
                    "activation patching", progress)  # fmt: skip
    for cache in caches:
        n = len(cache.group)
        per = max(1, batch_size // n)
        for chunk in _chunks(len(heads), per):
            copies = [[h] for h in heads[chunk]]
            sel = _select(runner.model, copies)
            points = [
                (attn_hook(layer, "z"), _swap_hook(cache.corrupt_z[layer], s)) for layer, s in sel.items()
            ]
            final = runner.run(
                _stack(cache.group.clean, len(copies)),
                points,
                end=_stack(cache.group.roles["end"], len(copies)),
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
    gap = _gap(caches)
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

        def final(resid: torch.Tensor, hook: Any, read: dict[str, torch.Tensor] = read,
                  rows: torch.Tensor = rows, end: torch.Tensor = end) -> None:  # fmt: skip
            read["end"] = resid[rows, end]
            raise _Stop

        points = [*((attn_hook(x, "z"), keep(x)) for x in range(model.n_layers)), ("unembed.hook_in", final)]
        bridge: Any = model.bridge
        with torch.enable_grad(), hooks(model, points) as hook_set, contextlib.suppress(_Stop):
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


def _gap(caches: Sequence[GroupCache]) -> float:
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
    for layer, idx in sorted(_by_layer(model, receivers.heads).items()):
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
    clean_ids = _stack(group.clean, G)
    end = _stack(group.roles["end"], G)
    sel = _select(model, [[s] for s in senders])
    # (A) every head frozen to clean, sender g of copy g swapped in from the corrupted run
    freeze = []
    for layer in range(model.n_layers):
        s = sel.get(layer, torch.zeros(G, model.n_heads, dtype=torch.bool))
        freeze.append(
            (attn_hook(layer, "z"), _swap_hook(cache.corrupt_z[layer], s, base=cache.clean_z[layer]))
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
        for layer, idx in _by_layer(model, receivers.heads).items():
            groups = {model.kv_head(h) for h in idx}
            siblings = [h for h in range(model.n_heads) if model.kv_head(h) in groups and h not in idx]
            if siblings:
                s = torch.zeros(1, model.n_heads, dtype=torch.bool)
                s[0, siblings] = True
                patch.append((attn_hook(layer, "z"), _swap_hook(cache.clean_z[layer], s.expand(G, -1))))
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
    model: LoadedModel, group: PromptSet, clean_z: Mapping[int, torch.Tensor],
    corrupt_z: Mapping[int, torch.Tensor], sender: Head, receivers: Receivers,
) -> torch.Tensor:  # fmt: skip
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
                (rl, x) for rl, rh in receivers.heads for x in range(model.n_heads)
                if model.kv_head(x) == model.kv_head(rh) and (rl, x) not in receivers.heads
            ]  # fmt: skip
            if siblings:
                stack.enter_context(iv.freeze_heads(model, siblings, clean_z))
        return logit_diff()


def path_patching(
    runner: Runner, caches: Sequence[GroupCache], senders: Sequence[Head], receivers: Receivers, *,
    batch_size: int = 128, progress: bool = False, desc: str = "path patching",
) -> np.ndarray:  # fmt: skip
    """Per sender, the share of the gap its path to ``receivers`` carries: ``[len(senders)]``.

    Senders at or above the last receiver layer cannot reach a receiver and score exactly 0 without a
    forward pass; the others are batched ``batch_size // N`` per pass.
    """
    gap = _gap(caches)
    out = np.zeros(len(senders))
    live = [
        i
        for i, (layer, _) in enumerate(senders)
        if receivers.input == "logits" or layer < receivers.last_layer
    ]
    total_items = sum(len(c.group) for c in caches)
    bar = _progress(
        sum(math.ceil(len(live) / max(1, batch_size // len(c.group))) for c in caches), desc, progress
    )
    for cache in caches:
        per = max(1, batch_size // len(cache.group))
        for chunk in _chunks(len(live), per):
            which = live[chunk]
            ld = path_patching_raw(runner, cache, [senders[i] for i in which], receivers)
            out[which] += (ld - cache.clean.logit_diff[None]).sum(1).double().numpy()
            bar.update(1)
    bar.close()
    return out / total_items / gap


# ---------------------------------------------------------------------------------- signatures


class SignatureSums:
    """Running sums of the attention signatures over clean prompts, read in ``hook_pattern``.

    Each :data:`SIGNATURES` entry is the attention from its query role to its key roles (summed),
    plus ``previous_token``: the mean of ``A[t, t-1]`` over positions ``t >= 1``. The reduction runs
    on the pattern's device; only ``[N, H]`` values leave it.
    """

    def __init__(self, n_layers: int, n_heads: int) -> None:
        names = [*SIGNATURES, "previous_token"]
        self.sums = {name: torch.zeros(n_layers, n_heads, dtype=torch.float64) for name in names}
        self.count = 0

    def hooks(self, group: PromptSet) -> list[tuple[str, HookFn]]:
        """Hooks for every layer's pattern on ``group``'s clean prompts (counts the group once)."""
        self.count += len(group)

        def make(layer: int) -> HookFn:
            def hook(pattern: torch.Tensor, hook: Any) -> None:
                p = pattern.detach()  # [N, H, T, T]
                rows = torch.arange(p.shape[0], device=p.device)
                roles = {k: v.to(p.device) for k, v in group.roles.items()}
                for name, (q_role, k_roles) in SIGNATURES.items():
                    val = torch.stack([p[rows, :, roles[q_role], roles[k]] for k in k_roles]).double().sum(0)
                    self.sums[name][layer] += val.sum(0).cpu()
                if p.shape[-1] > 1:
                    prev = p.diagonal(offset=-1, dim1=-2, dim2=-1).double()  # [N, H, T-1]
                    self.sums["previous_token"][layer] += prev.mean(-1).sum(0).cpu()

            return hook

        return [(attn_hook(x, "pattern"), make(x)) for x in range(self.sums["previous_token"].shape[0])]

    def means(self) -> dict[str, np.ndarray]:
        return {k: (v / max(self.count, 1)).numpy() for k, v in self.sums.items()}


@torch.no_grad()
def attention_signatures(
    runner: Runner, groups: Sequence[PromptSet], *, batch_size: int = 128
) -> dict[str, np.ndarray]:
    """Mean attention ``[L, H]`` of each :data:`SIGNATURES` entry (and ``previous_token``) on the
    clean prompts, in passes of its own (:func:`prepare` reads them during its clean pass instead)."""
    model = runner.model
    sums = SignatureSums(model.n_layers, model.n_heads)
    for group in [g.subset(rows) for g in groups for rows in _chunks(len(g), batch_size)]:
        runner.run(group.clean, sums.hooks(group), stop_after=attn_hook(model.n_layers - 1, "pattern"))
    return sums.means()


# ---------------------------------------------------------------------------------- discovery


def classify(
    stage: Stage, scores: np.ndarray, signatures: Mapping[str, np.ndarray], cfg: CircuitConfig
) -> dict[HeadClass, list[Head]]:
    """The heads of ``stage``'s classes: path score past ``min_share`` and the attention signature."""
    out: dict[HeadClass, list[Head]] = {}
    att = cfg.min_attention
    sig = signatures
    for cls in STAGE_CLASSES[stage]:
        sign = 1.0 if cls == "negative_mover" else -1.0
        if cls in ("name_mover", "negative_mover"):
            ok = (sig["end_to_target"] >= att) & (sig["end_to_target"] > sig["end_to_dup"])
        elif cls == "s_inhibition":
            ok = (sig["end_to_dup"] >= att) & (sig["end_to_dup"] > sig["end_to_target"])
        elif cls == "induction":
            ok = (sig["dup2_to_dup1_next"] >= att) & (sig["dup2_to_dup1_next"] > sig["dup2_to_dup1"])
        elif cls == "duplicate_token":
            ok = (sig["dup2_to_dup1"] >= att) & (sig["dup2_to_dup1"] >= sig["dup2_to_dup1_next"])
        else:  # previous_token
            ok = sig["dup1_next_to_dup1"] >= att
        passed = (sign * scores >= cfg.min_share) & ok
        order = np.argsort(-(sign * scores), axis=None)
        heads = [(int(i // scores.shape[1]), int(i % scores.shape[1])) for i in order]
        out[cls] = [h for h in heads if passed[h]][: cfg.max_per_class]
    return out


@dataclass
class Discovery:
    """Result of the staged discovery on one task."""

    task: TaskName
    scores: dict[Stage, np.ndarray]  # [L, H] per stage
    classes: dict[HeadClass, list[Head]]
    receivers: dict[Stage, tuple[list[Head], str]]  # heads and why (class found / stand-in)
    signatures: dict[str, np.ndarray]
    edges: list[dict[str, Any]] = field(default_factory=list)


def _stand_in(scores: np.ndarray, k: int = 3) -> list[Head]:
    order = np.argsort(scores, axis=None)[:k]  # most negative: strongest positive contributors
    return [(int(i // scores.shape[1]), int(i % scores.shape[1])) for i in order]


def screened_senders(model: LoadedModel, screen: np.ndarray | None, max_senders: int | None) -> list[Head]:
    """Every head, or with ``max_senders`` only the strongest by ``|screen|`` (a ``[L, H]`` grid)."""
    heads: list[Head] = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]
    if max_senders is None or screen is None or max_senders >= len(heads):
        return heads
    order = np.argsort(-np.abs(screen), axis=None, kind="stable")[:max_senders]
    return sorted((int(i // model.n_heads), int(i % model.n_heads)) for i in order)


def discover(
    runner: Runner, caches: Sequence[GroupCache], task: TaskName, cfg: CircuitConfig,
    signatures: dict[str, np.ndarray], screen: np.ndarray | None = None,
) -> Discovery:  # fmt: skip
    """Run the four stages in order, each with the receivers the one before found.

    Senders are every head, or (``cfg.max_senders``) the strongest by ``screen`` (attribution
    patching in :func:`analyse_task`); a head that was not tested scores NaN.
    """
    model = runner.model
    senders = screened_senders(model, screen, cfg.max_senders)
    tested = np.zeros((model.n_layers, model.n_heads), dtype=bool)
    for head in senders:
        tested[head] = True
    scores: dict[Stage, np.ndarray] = {}
    classes: dict[HeadClass, list[Head]] = {}
    receivers: dict[Stage, tuple[list[Head], str]] = {}
    for stage in STAGES:
        kind, sources = STAGE_RECEIVERS[stage]
        if kind == "logits":
            heads: list[Head] = []
            why = "the logits at END"
        else:
            heads = [h for cls in sources for h in classes.get(cls, [])]
            why = f"{', '.join(sources)} heads"
            if not heads:
                previous = STAGES[STAGES.index(stage) - 1]
                heads = _stand_in(scores[previous])
                why = (
                    f"no {', '.join(sources)} head found: the 3 strongest heads of stage {previous} stand in"
                )
            if all(layer == 0 for layer, _ in heads):
                scores[stage] = np.where(tested, 0.0, np.nan)
                receivers[stage] = (heads, why + " (all in layer 0: nothing can reach them)")
                classes.update(classify(stage, scores[stage], signatures, cfg))
                continue
        receivers[stage] = (heads, why)
        flat = path_patching(runner, caches, senders, Receivers(kind, tuple(heads)),
                             batch_size=cfg.batch_size, progress=cfg.progress,
                             desc=f"{task} {stage}")  # fmt: skip
        grid = np.full((model.n_layers, model.n_heads), np.nan)
        for head, value in zip(senders, flat, strict=True):
            grid[head] = value
        scores[stage] = grid
        classes.update(classify(stage, scores[stage], signatures, cfg))
    discovery = Discovery(task, scores, classes, receivers, signatures)
    discovery.edges = circuit_edges(runner, caches, discovery, cfg)
    return discovery


def circuit_edges(
    runner: Runner, caches: Sequence[GroupCache], found: Discovery, cfg: CircuitConfig
) -> list[dict[str, Any]]:
    """Path-patching score of every found head into each receiving head of the next stage, one
    receiver at a time: the edges of the circuit graph."""
    edges: list[dict[str, Any]] = []
    for stage in STAGES[1:]:
        kind, _ = STAGE_RECEIVERS[stage]
        senders = [h for cls in STAGE_CLASSES[stage] for h in found.classes.get(cls, [])]
        if not senders:
            continue
        for receiver in found.receivers[stage][0]:
            live = [s for s in senders if s[0] < receiver[0]]
            if not live:
                continue
            shares = path_patching(
                runner, caches, live, Receivers(kind, (receiver,)), batch_size=cfg.batch_size
            )
            for s, share in zip(live, shares, strict=True):
                edges.append({"task": found.task, "stage": stage, "sender_layer": s[0], "sender_head": s[1],
                              "receiver_layer": receiver[0], "receiver_head": receiver[1], "input": kind,
                              "share": float(share)})  # fmt: skip
    for cls in STAGE_CLASSES["logits"]:
        for layer, h in found.classes.get(cls, []):
            edges.append({"task": found.task, "stage": "logits", "sender_layer": layer, "sender_head": h,
                          "receiver_layer": -1, "receiver_head": -1, "input": "logits",
                          "share": float(found.scores["logits"][layer, h])})  # fmt: skip
    return edges


# ---------------------------------------------------------------------------------- ablation


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
    runner: Runner, caches: Sequence[GroupCache], means: Sequence[Mapping[int, torch.Tensor]],
    keep: Sequence[Sequence[Head]], *, batch_size: int = 128,
) -> np.ndarray:  # fmt: skip
    """Mean logit difference ``[len(keep)]`` with every head *outside* ``keep[g]`` mean-ablated."""
    model = runner.model
    totals = np.zeros(len(keep))
    count = 0
    for cache, mean in zip(caches, means, strict=True):
        n = len(cache.group)
        per = max(1, batch_size // n)
        for chunk in _chunks(len(keep), per):
            copies = keep[chunk]
            G = len(copies)
            kept = _select(model, copies)
            points = []
            for layer in range(model.n_layers):
                ablate = ~kept.get(layer, torch.zeros(G, model.n_heads, dtype=torch.bool))
                points.append(
                    (
                        attn_hook(layer, "z"),
                        _swap_hook(mean[layer].unsqueeze(0).expand(n, *mean[layer].shape), ablate),
                    )
                )
            final = runner.run(_stack(cache.group.clean, G), points, end=_stack(cache.group.roles["end"], G))
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


# ---------------------------------------------------------------------------------- intervention


def _wrong_options_edit(group: PromptSet, copies: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pattern edit: END's row puts all its attention on the wrong candidates' positions, equally."""
    end = _stack(group.roles["end"], copies)
    wrong = _stack(group.wrong_positions, copies)

    def edit(pattern: torch.Tensor) -> torch.Tensor:  # [B, T_q, T_k]
        out = pattern.clone()
        rows = torch.arange(out.shape[0], device=out.device)
        e = end.to(out.device)
        new = torch.zeros(out.shape[0], out.shape[-1], dtype=out.dtype, device=out.device)
        new.scatter_(1, wrong.to(out.device), 1.0 / wrong.shape[1])
        out[rows, e] = new
        return out

    return edit


def intervene(
    runner: Runner, groups: Sequence[PromptSet], head_sets: Sequence[Sequence[Head]], *, batch_size: int = 128,
) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """Per head set: per-item logit difference, candidate-correct and vocabulary-correct, with the
    set's END attention moved onto the wrong options (an empty set is the unedited model)."""
    model = runner.model
    results = []
    for heads in head_sets:
        ld, cand, vocab, items = [], [], [], []
        grouped = _by_layer(model, heads)
        for group in groups:
            for rows in _chunks(len(group), batch_size):
                sub = group.subset(rows)
                edit = _wrong_options_edit(sub, 1)

                def make(idx: list[int], edit: Callable[[torch.Tensor], torch.Tensor] = edit) -> HookFn:
                    def hook(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
                        out = pattern.clone()
                        for i in idx:
                            out[:, i] = edit(pattern[:, i])
                        return out

                    return hook

                points = [(attn_hook(layer, "pattern"), make(idx)) for layer, idx in grouped.items()]
                final = runner.run(sub.clean, points, end=sub.roles["end"])
                assert final is not None
                read = runner.readout(final, sub, 1, top=True)
                ld.append(read.logit_diff)
                cand.append(read.candidate_logits.argmax(-1) == sub.answer_index)
                assert read.top_token is not None
                vocab.append(read.top_token == sub.right)
                items.append(sub.items)
        results.append({
            "logit_diff": torch.cat(ld).double().numpy(), "candidate_correct": torch.cat(cand).numpy(),
            "vocab_correct": torch.cat(vocab).numpy(), "items": np.concatenate(items),
        })  # fmt: skip
    return results


# ---------------------------------------------------------------------------------- statistics


def _boot(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean and a 95% percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, values.size, (n_boot, values.size))].mean(1)
    return float(values.mean()), float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


def top_heads(scores: np.ndarray, percent: float) -> set[Head]:
    """The top ``percent``% of heads by ``|score|`` (at least one)."""
    k = max(1, round(scores.size * percent / 100.0))
    order = [i for i in np.argsort(-np.abs(scores), axis=None, kind="stable") if np.isfinite(scores.flat[i])]
    return {(int(i // scores.shape[1]), int(i % scores.shape[1])) for i in order[:k]}


def overlap_curve(
    a: Mapping[Stage, np.ndarray], b: Mapping[Stage, np.ndarray], percents: Sequence[float]
) -> pd.DataFrame:
    """Per stage and pooled over stages: how many of ``a``'s top-p% heads are ``b``'s top-p% too."""
    rows: list[dict[str, Any]] = []
    for p in percents:
        pooled_hit = pooled_n = 0
        union_a: set[tuple[str, Head]] = set()
        union_b: set[tuple[str, Head]] = set()
        for stage in STAGES:
            if stage not in a or stage not in b:
                continue
            ta, tb = top_heads(a[stage], p), top_heads(b[stage], p)
            hit = len(ta & tb)
            pooled_hit += hit
            pooled_n += len(ta)
            union_a |= {(stage, h) for h in ta}
            union_b |= {(stage, h) for h in tb}
            rows.append({"stage": stage, "percent": p, "k": len(ta), "shared": hit, "overlap": hit / len(ta),
                         "jaccard": hit / len(ta | tb)})  # fmt: skip
        rows.append({"stage": "all", "percent": p, "k": pooled_n, "shared": pooled_hit,
                     "overlap": pooled_hit / max(pooled_n, 1),
                     "jaccard": pooled_hit / max(len(union_a | union_b), 1)})  # fmt: skip
    return pd.DataFrame(rows, columns=["stage", "percent", "k", "shared", "overlap", "jaccard"])


def rank_correlations(a: Mapping[Stage, np.ndarray], b: Mapping[Stage, np.ndarray]) -> pd.DataFrame:
    from scipy.stats import spearmanr

    rows = []
    for stage in STAGES:
        if stage in a and stage in b:
            x, y = a[stage].ravel(), b[stage].ravel()
            both = np.isfinite(x) & np.isfinite(y)  # heads screened out on either task are left out
            x, y = x[both], y[both]
            if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
                rho, p = math.nan, math.nan
            else:
                res = spearmanr(x, y)
                rho, p = float(res.statistic), float(res.pvalue)
            rows.append({"stage": stage, "spearman": rho, "p_value": p, "n_heads": x.size})
    return pd.DataFrame(rows, columns=["stage", "spearman", "p_value", "n_heads"])


# ---------------------------------------------------------------------------------- one task


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


def prepare(
    runner: Runner, task: TaskName, cfg: CircuitConfig
) -> tuple[TaskData, list[GroupCache], dict[str, np.ndarray]]:
    """The task's prompts; per chunk of at most ``batch_size // 4`` prompts, its clean/corrupted
    cache; and the attention signatures, read during the same clean passes."""
    data = TASK_BUILDERS[task](runner.model, cfg.n_items, cfg.seed)
    per = max(1, cfg.batch_size // 4)
    chunks = [g.subset(rows) for g in data.groups for rows in _chunks(len(g), per)]
    bar = _progress(len(chunks), f"{task} clean/corrupted runs", cfg.progress)
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
    ld, ld_lo, ld_hi = _boot(clean, cfg.n_boot, cfg.seed)
    acc, acc_lo, acc_hi = _boot(cand.astype(float), cfg.n_boot, cfg.seed)
    vacc, vacc_lo, vacc_hi = _boot(vocab.astype(float), cfg.n_boot, cfg.seed)
    n_cand = int(caches[0].group.candidates.shape[1])
    row = {
        "task": task, "n_items": int(clean.size), "logit_diff": ld, "logit_diff_low": ld_lo,
        "logit_diff_high": ld_hi, "logit_diff_corrupt": float(corrupt.mean()),
        "gap": float(clean.mean() - corrupt.mean()), "accuracy": acc, "accuracy_low": acc_lo,
        "accuracy_high": acc_hi, "accuracy_chance": 1.0 / n_cand, "vocab_accuracy": vacc,
        "vocab_accuracy_low": vacc_lo, "vocab_accuracy_high": vacc_hi,
    }  # fmt: skip
    frame = pd.DataFrame({
        "task": pd.Series([task] * items.size, dtype=object), "item": items.astype(np.int64),
        "text": pd.Series([data.texts[i] for i in items], dtype=object),
        "answer": pd.Series([data.answers[i] for i in items], dtype=object),
        "logit_diff": clean, "logit_diff_corrupt": corrupt, "correct": cand.astype(bool),
        "vocab_correct": vocab.astype(bool),
    }).sort_values("item", kind="stable").reset_index(drop=True)  # fmt: skip
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
    circuit = sorted({h for heads in found.classes.values() for h in heads})
    means = template_means(runner, caches, data.groups)
    full = float(torch.cat([c.clean.logit_diff for c in caches]).double().mean())
    randoms = random_head_sets(model, len(circuit), cfg.n_random, cfg.seed)
    keep_sets: list[list[Head]] = [circuit, [], *randoms]
    lds = mean_ablated_logit_diff(runner, caches, means, keep_sets, batch_size=cfg.batch_size)
    labels = ["found", "empty", *["random"] * len(randoms)]
    faith = pd.DataFrame({
        "task": task, "circuit": labels, "index": [0, 0, *range(len(randoms))],
        "size": [len(k) for k in keep_sets], "logit_diff": lds, "full_logit_diff": full,
        "faithfulness": lds / full if full else np.nan,
    })  # fmt: skip
    movers = found.classes.get("name_mover", [])
    ablation_rows = []
    if movers:
        rand = random_head_sets(model, len(movers), cfg.n_random, cfg.seed + 1)
        sets = [movers, *rand]
        keep = [[h for h in all_heads if h not in set(s)] for s in sets]
        ab = mean_ablated_logit_diff(runner, caches, means, keep, batch_size=cfg.batch_size)
        for i, (s, value) in enumerate(zip(sets, ab, strict=True)):
            ablation_rows.append({"task": task, "ablated": "name_movers" if i == 0 else "random",
                                  "index": max(0, i - 1), "size": len(s), "logit_diff": float(value),
                                  "drop": full - float(value),
                                  "heads": " ".join(f"L{a}H{b}" for a, b in s)})  # fmt: skip
    ablation = pd.DataFrame(
        ablation_rows, columns=["task", "ablated", "index", "size", "logit_diff", "drop", "heads"]
    )
    return TaskAnalysis(data, caches, metrics, items, activation, found, faith, ablation, attribution)


# ---------------------------------------------------------------------------------- tables

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
    scores = pd.DataFrame(scores_rows, columns=["task", "stage", "layer", "head", "score"])
    scores["task"] = scores["task"].astype(object)
    scores["stage"] = scores["stage"].astype(object)

    circuit_rows, receiver_rows, edge_rows = [], [], []
    for a in analyses:
        found = a.discovery
        for stage in STAGES:
            for cls in STAGE_CLASSES[stage]:
                for rank, (layer, h) in enumerate(found.classes.get(cls, [])):
                    circuit_rows.append({
                        "task": a.data.name, "class": cls, "stage": stage, "layer": layer, "head": h,
                        "rank": rank, "score": float(found.scores[stage][layer, h]),
                        "activation": float(a.activation[layer, h]),
                        **{f"sig_{k}": float(v[layer, h]) for k, v in found.signatures.items()},
                    })  # fmt: skip
            heads_in, why = found.receivers[stage]
            for layer, h in heads_in:
                receiver_rows.append({"task": a.data.name, "stage": stage, "input": STAGE_RECEIVERS[stage][0],
                                      "layer": layer, "head": h, "stand_in": why.startswith("no "),
                                      "why": why})  # fmt: skip
        edge_rows += found.edges
    sig_cols = [f"sig_{k}" for k in [*SIGNATURES, "previous_token"]]
    return {
        "heads": heads,
        "scores": scores,
        "metrics": pd.DataFrame([a.metrics for a in analyses]),
        "items": pd.concat([a.items for a in analyses], ignore_index=True),
        "circuit": pd.DataFrame(circuit_rows, columns=["task", "class", "stage", "layer", "head", "rank", "score",
                                                       "activation", *sig_cols]),
        "receivers": pd.DataFrame(
            receiver_rows, columns=["task", "stage", "input", "layer", "head", "stand_in", "why"]
        ),
        "edges": pd.DataFrame(edge_rows, columns=["task", "stage", "sender_layer", "sender_head", "receiver_layer",
                                                  "receiver_head", "input", "share"]),
        "faithfulness": pd.concat([a.faithfulness for a in analyses], ignore_index=True),
        "ablation": pd.concat([a.ablation for a in analyses], ignore_index=True),
    }  # fmt: skip


def _result(
    analysis: str, model: LoadedModel, cfg: CircuitConfig, analyses: Sequence[TaskAnalysis],
    extra: Mapping[str, pd.DataFrame], timings: dict[str, float], notes: dict[str, Any],
) -> AnalysisResult:  # fmt: skip
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
        analysis=analysis, model_info=model.describe(), config=asdict(cfg), tables=tables, arrays=arrays,
        seeds={"seed": cfg.seed}, timings=timings, notes=notes,
    )  # fmt: skip


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


def intervention_heads(found: Discovery) -> tuple[list[Head], str]:
    """IOI's S-inhibition heads and negative movers; stand-ins when IOI found none."""
    heads = sorted({*found.classes.get("s_inhibition", []), *found.classes.get("negative_mover", [])})
    if heads:
        return heads, "IOI s_inhibition and negative_mover heads"
    return _stand_in(found.scores["mover_queries"]), (
        "IOI found no s_inhibition or negative_mover head: its 3 strongest mover_queries heads stand in"
    )


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
        acc = _boot(res["candidate_correct"].astype(float), cfg.n_boot, cfg.seed)
        vacc = _boot(res["vocab_correct"].astype(float), cfg.n_boot, cfg.seed)
        change = _boot(res["candidate_correct"].astype(float) - base, cfg.n_boot, cfg.seed)  # paired per item
        rows.append({"condition": label, "index": max(0, i - 2), "n_heads": len(s),
                     "heads": " ".join(f"L{a}H{b}" for a, b in s), "accuracy": acc[0], "accuracy_low": acc[1],
                     "accuracy_high": acc[2], "change": change[0], "change_low": change[1],
                     "change_high": change[2], "chance": chance, "vocab_accuracy": vacc[0],
                     "vocab_accuracy_low": vacc[1], "vocab_accuracy_high": vacc[2],
                     "logit_diff": float(res["logit_diff"].mean())})  # fmt: skip
    intervention = pd.DataFrame(rows)
    timings["reuse"] = round(time.perf_counter() - t0, 3)
    notes = {"intervention_heads": why}
    return _result("circuit-reuse", model, cfg, done,
                   {"overlap": overlap, "rank_correlation": corr, "intervention": intervention}, timings, notes)  # fmt: skip


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


ANALYSIS = register(
    Analysis(
        name="ioi",
        config_cls=CircuitConfig,
        run=run_ioi,
        summary=summary,
        help="IOI circuit: logit difference, activation and path patching, head classes, faithfulness.",
        page="dashboard.circuits.page:CircuitsPage",
        report="dashboard.circuits.report:report_sections",
        # every path-patching stage costs two forward passes per sender and prompt: on a CPU the demo
        # screens the senders (the 12 strongest by attribution patching) on 8 prompts
        demo={"n_items": 8, "max_senders": 12, "n_random": 5, "batch_size": 64},
    )
)
COLORED_OBJECTS = register(
    Analysis(
        name="colored-objects",
        config_cls=CircuitConfig,
        run=run_colored_objects,
        summary=summary,
        help="Colored Objects: the same staged path patching on one-shot colour questions.",
        aliases=("colored_objects",),
        page="dashboard.circuits.page:CircuitsPage",
        report="dashboard.circuits.report:report_sections",
        opt_outs={"demo": "a second path-patching circuit; circuit-reuse runs it with IOI when asked"},
    )
)
CIRCUIT_REUSE = register(
    Analysis(
        name="circuit-reuse",
        config_cls=CircuitConfig,
        run=run_circuit_reuse,
        summary=summary,
        help="IOI vs Colored Objects: stage overlap over top-p%, rank correlation, inhibition intervention.",
        aliases=("circuit_reuse",),
        page="dashboard.circuits.page:CircuitsPage",
        report="dashboard.circuits.report:report_sections",
        opt_outs={"demo": "runs both circuits (twice the IOI demo's time); run it on its own"},
    )
)
