"""Forward passes of the circuits analyses: a runner that unembeds END only and stops at the last
hook it needs, the clean/corrupted cache of a prompt chunk, the attention signatures read during
the clean pass, and the hooks that swap head outputs in several copies of a batch at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analyses.circuits.config import SIGNATURES
from analyses.circuits.data import PromptSet
from probe.errors import ConfigError
from probe.heads import by_layer
from probe.hooks import HookFn, attn_hook, hooks
from probe.loading import LoadedModel
from probe.types import Head


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once what it needs has been read."""


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
                raise StopForward

            points.append(("unembed.hook_in", read))
        elif stop_after is not None:

            def stop(activation: torch.Tensor, hook: Any) -> None:
                raise StopForward

            points.append((stop_after, stop))
        bridge: Any = self.model.bridge
        with hooks(self.model, points) as hook_set, contextlib.suppress(StopForward):
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


def chunk_slices(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


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


@torch.no_grad()
def attention_signatures(
    runner: Runner, groups: Sequence[PromptSet], *, batch_size: int = 128
) -> dict[str, np.ndarray]:
    """Mean attention ``[L, H]`` of each :data:`SIGNATURES` entry (and ``previous_token``) on the
    clean prompts, in passes of its own (:func:`prepare` reads them during its clean pass instead)."""
    model = runner.model
    sums = SignatureSums(model.n_layers, model.n_heads)
    for group in [g.subset(rows) for g in groups for rows in chunk_slices(len(g), batch_size)]:
        runner.run(group.clean, sums.hooks(group), stop_after=attn_hook(model.n_layers - 1, "pattern"))
    return sums.means()


def repeat_rows(t: torch.Tensor, copies: int) -> torch.Tensor:
    return t.repeat(copies, *([1] * (t.dim() - 1)))


def head_masks(model: LoadedModel, copies: Sequence[Sequence[Head]]) -> dict[int, torch.Tensor]:
    """Per layer, a bool ``[G, H]``: which heads copy g acts on (only layers some copy touches)."""
    out: dict[int, torch.Tensor] = {}
    for g, heads in enumerate(copies):
        for layer, idx in by_layer(model, heads).items():
            sel = out.setdefault(layer, torch.zeros(len(copies), model.n_heads, dtype=torch.bool))
            sel[g, idx] = True
    return out


def swap_hook(source: torch.Tensor, sel: torch.Tensor, *, base: torch.Tensor | None = None) -> HookFn:
    """hook_z of a layer: copy g takes ``source`` ``[N, T, H, d]`` at the heads ``sel[g]`` marks; the
    other heads keep ``base`` (the frozen clean values) or, when ``base`` is None, the running z."""

    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        G, N = sel.shape[0], source.shape[0]
        mask = sel.to(z.device)[:, None, None, :, None]
        keep = z.reshape(G, N, *z.shape[1:]) if base is None else base.to(z.device, z.dtype).unsqueeze(0)
        out = torch.where(mask, source.to(z.device, z.dtype).unsqueeze(0), keep)
        return out.expand(G, *out.shape[1:]).reshape(z.shape)

    return hook
