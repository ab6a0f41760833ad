"""Scoring choice items under head calibrations: :class:`ChoiceScorer` (batches built once, several
calibrations per forward pass), the batched head search, margins and the paired bootstrap."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analyses.act.calibration import Calibration, calibrate_heads
from analyses.tasks import choice
from analyses.tasks.choice import ChoiceItem, ChoiceToken
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.types import Head


@dataclass
class Chunk:
    input_ids: torch.Tensor  # [b, T]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor  # [b]
    row_ids: np.ndarray  # [b] indices into ChoiceScorer.rows
    read_row: np.ndarray  # per read: batch row
    read_col: np.ndarray  # per read: column of the padded sequence whose next-token logits are read
    read_item: np.ndarray
    read_choice: np.ndarray
    read_token: torch.Tensor


class ChoiceScorer:
    """Scores a fixed list of choice items again and again under different head calibrations.

    The same rule as :func:`analyses.tasks.choice.choice_logprobs` (an uncalibrated pass gives its
    numbers), with the batches built once. :meth:`logprobs` takes a list of head sets, one per
    *copy*: each batch is replicated once per copy and copy ``g`` calibrates only its heads, so
    several calibrations are scored by one forward pass.
    """

    def __init__(
        self,
        model: LoadedModel,
        items: Sequence[ChoiceItem],
        *,
        batch_size: int = 16,
        choice_token: ChoiceToken = "first",
    ) -> None:
        if model.bridge is None:
            raise ConfigError(f"{model.name} is not a language model; ACT needs one")
        if not items:
            raise ConfigError("no items to score; give at least one")
        self.model = model
        self.items = list(items)
        self.width = max(len(item.choices) for item in self.items)
        rows = [
            r for i, it in enumerate(self.items) for r in choice._plan(model.tokenizer, it, choice_token, i)
        ]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].context))
        self.rows = [rows[i] for i in order]
        params = inspect.signature(model.hf_model.forward).parameters
        self.keep_logits = "logits_to_keep" in params
        self.chunks: list[Chunk] = []
        for start in range(0, len(self.rows), batch_size):
            ids = np.arange(start, min(start + batch_size, len(self.rows)))
            chunk_rows = [self.rows[i] for i in ids]
            batch = model.batch_from_ids([r.context for r in chunk_rows])
            T = batch.input_ids.shape[1]
            reads = [
                (b, T - len(r.context) + pos, r.item, c, token)
                for b, r in enumerate(chunk_rows)
                for c, pos, token in r.reads
            ]
            cols = np.array([x[1] for x in reads])
            self.chunks.append(
                Chunk(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp_min(0),
                    lengths=batch.lengths,
                    row_ids=ids,
                    read_row=np.array([x[0] for x in reads]),
                    read_col=cols,
                    read_item=np.array([x[2] for x in reads]),
                    read_choice=np.array([x[3] for x in reads]),
                    read_token=torch.tensor([x[4] for x in reads], dtype=torch.long),
                )
            )

    @property
    def n_sequences(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def logprobs(
        self,
        copies: Sequence[Collection[Head]] = ((),),
        calibration: Calibration | None = None,
        *,
        observe: Callable[[Chunk], AbstractContextManager[Any]] | None = None,
    ) -> np.ndarray:
        """``[len(copies), n_items, max_choices]`` log-probabilities; copy ``g`` calibrates ``copies[g]``.

        NaN past an item's own choices. ``observe(chunk)`` may return a context manager entered
        around each chunk's forward (hooks that only read, e.g. sink statistics; uncalibrated runs).
        """
        cal = calibration or Calibration()
        G = len(copies)
        if G < 1:
            raise ConfigError("give at least one copy (a head set, possibly empty)")
        sets = [frozenset(c) for c in copies]
        out = np.full((G, len(self.items), self.width), np.nan)
        for i, item in enumerate(self.items):
            out[:, i, : len(item.choices)] = 0.0
        bridge: Any = self.model.bridge
        for chunk in self.chunks:
            b, T = chunk.input_ids.shape
            lengths = chunk.lengths.repeat(G)
            masks: dict[Head, torch.Tensor | None] = {}
            for head in sorted(set().union(*sets)):
                chosen = torch.tensor([head in s for s in sets], device=lengths.device)
                masks[head] = None if bool(chosen.all()) else chosen.repeat_interleave(b)
            first_col = int(chunk.read_col.min())
            kwargs: dict[str, Any] = {"logits_to_keep": T - first_col} if self.keep_logits else {}
            with ExitStack() as stack:
                edits = (
                    stack.enter_context(calibrate_heads(self.model, masks, lengths, cal)) if masks else None
                )
                if observe is not None:
                    stack.enter_context(observe(chunk))
                logits = bridge(
                    chunk.input_ids.repeat(G, 1),
                    attention_mask=chunk.attention_mask.repeat(G, 1),
                    position_ids=chunk.position_ids.repeat(G, 1),
                    **kwargs,
                )
                if edits is not None:
                    edits.check_fired()  # a calibration that never ran would pass for "no effect"
            offset = T - logits.shape[1]  # logits kept for the last columns only
            n_reads = len(chunk.read_row)
            rows = torch.as_tensor(
                (np.arange(G)[:, None] * b + chunk.read_row[None, :]).ravel(), device=logits.device
            )
            cols = torch.as_tensor(np.tile(chunk.read_col - offset, G), device=logits.device)
            logp = torch.log_softmax(logits[rows, cols].float(), dim=-1)
            picked = logp.gather(1, chunk.read_token.repeat(G).to(logp.device)[:, None])[:, 0]
            values = picked.cpu().double().numpy().reshape(G, n_reads)
            for g in range(G):
                np.add.at(out[g], (chunk.read_item, chunk.read_choice), values[g])
        return out


def search_heads(
    scorer: ChoiceScorer,
    heads: Sequence[Head],
    calibration: Calibration | None = None,
    *,
    heads_per_pass: int = 8,
    progress: bool = True,
) -> np.ndarray:
    """Log-probabilities with each head calibrated alone: ``[len(heads), n_items, max_choices]``.

    ``heads_per_pass`` heads share one forward pass (the batch replicated once per head).
    """
    if heads_per_pass < 1:
        raise ConfigError(f"heads_per_pass must be >= 1 (got {heads_per_pass})")
    from tqdm.auto import tqdm

    out = np.empty((len(heads), len(scorer.items), scorer.width))
    bar = tqdm(total=len(heads), desc="ACT head search", unit="head", disable=not progress, leave=False)
    try:
        for start in range(0, len(heads), heads_per_pass):
            group = heads[start : start + heads_per_pass]
            out[start : start + len(group)] = scorer.logprobs([(h,) for h in group], calibration)
            bar.update(len(group))
    finally:
        bar.close()
    return out


def margins(logprobs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The label's log-probability minus the best other choice's, per item (``[..., n_items]``)."""
    idx = np.broadcast_to(labels, logprobs.shape[:-1])[..., None]
    label_logp = np.take_along_axis(logprobs, idx, axis=-1)[..., 0]
    others = logprobs.copy()
    np.put_along_axis(others, idx, np.nan, axis=-1)
    return label_logp - np.nanmax(others, axis=-1)


def paired_difference(
    before: np.ndarray, after: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(mean(after - before), low, high)``: percentile bootstrap over items (pairs kept together)."""
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1 or b.size == 0:
        raise ConfigError(
            f"before and after must be equal, non-empty 1-d arrays; got {b.shape} and {a.shape}"
        )
    diff = a - b
    value = float(diff.mean())
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    step = max(1, 2_000_000 // diff.size)  # bound the index array of one step
    for start in range(0, n_boot, step):
        k = min(step, n_boot - start)
        draws[start : start + k] = diff[rng.integers(0, diff.size, size=(k, diff.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return value, float(min(low, value)), float(max(high, value))
