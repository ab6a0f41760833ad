"""Scoring: the log-probability of each choice after its prompt, read through the model's bridge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import torch

from analyses.tasks.choice.items import ChoiceItem, ChoiceToken
from probe.errors import ConfigError

if TYPE_CHECKING:
    from probe.loading import LoadedModel


@dataclass(frozen=True)
class _Row:
    """One sequence to run and the log-probabilities to read from it."""

    item: int
    context: list[int]  # prompt tokens, then some choice tokens; no BOS
    reads: list[tuple[int, int, int]]  # (choice, context position whose next-token distribution, token)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def choice_token_ids(tokenizer: Any, prompt: str, choice: str) -> list[int]:
    """The tokens ``choice`` adds after ``prompt`` (tail of the joint tokenization; see docs/analyses/act.md)."""
    prompt_ids = _encode(tokenizer, prompt)
    joint = _encode(tokenizer, prompt + choice)
    if len(joint) > len(prompt_ids) and joint[: len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids) :]
    return _encode(tokenizer, choice)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def _plan(tokenizer: Any, item: ChoiceItem, choice_token: ChoiceToken, index: int) -> list[_Row]:
    prompt_ids = _encode(tokenizer, item.prompt)
    end = len(prompt_ids) - 1  # the final prompt position
    tokens = [choice_token_ids(tokenizer, item.prompt, c) for c in item.choices]
    if any(not t for t in tokens):
        raise ConfigError(f"item {index}: a choice of {item.choices!r} has no tokens; give non-empty choices")
    if choice_token == "last":
        targets = [t[-1] for t in tokens]
        if len(set(targets)) != len(targets):
            raise ConfigError(
                f"item {index} ({item.task}): choices {item.choices!r} end in the same token, so "
                "choice_token='last' cannot tell them apart; use choice_token='first'"
            )
        return [_Row(index, prompt_ids, [(c, end, t) for c, t in enumerate(targets)])]
    # 'first': each choice up to and including the first token that no other choice shares there.
    rows: dict[tuple[int, ...], _Row] = {}
    for c, own in enumerate(tokens):
        depth = 1 + max(_common_prefix(own, other) for k, other in enumerate(tokens) if k != c)
        if depth > len(own):
            raise ConfigError(
                f"item {index} ({item.task}): choice {item.choices[c]!r} is a token prefix of another of "
                f"{item.choices!r}, so the choices cannot be told apart by their probabilities; "
                "use choices where none is the beginning of another"
            )
        head = tuple(own[: depth - 1])
        row = rows.setdefault(head, _Row(index, prompt_ids + list(head), []))
        row.reads.extend((c, end + t, own[t]) for t in range(depth))
    return list(rows.values())


@torch.no_grad()
def choice_logprobs(
    model: LoadedModel,
    items: Sequence[ChoiceItem],
    *,
    batch_size: int = 16,
    choice_token: ChoiceToken = "first",
    progress: bool = True,
) -> np.ndarray:
    """Log-probability of each item's choices after its prompt: ``[n_items, max_choices]``.

    With one-token choices (all built-in tasks on SmolLM2 and Gemma 3) this is the log-softmax at
    the final prompt position read at each choice's token, one forward pass per item. Entries past
    an item's own number of choices are NaN. See docs/analyses/act.md for several-token choices and
    ``choice_token``. Runs through ``model.bridge`` (hooks and interventions active around the call
    apply), ``batch_size`` sequences at a time, left-padded with the model's BOS policy, grouped by
    length to pad little; an item's numbers do not depend on its batch.
    """
    if model.bridge is None:
        raise ConfigError(f"{model.name} is not a language model; choice tasks need one")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}; give an integer >= 1")
    if choice_token not in get_args(ChoiceToken):
        raise ConfigError(f"choice_token={choice_token!r}; choose 'first' or 'last'")
    if not items:
        raise ConfigError("no items to score; give at least one")
    rows = [row for i, item in enumerate(items) for row in _plan(model.tokenizer, item, choice_token, i)]
    width = max(len(item.choices) for item in items)
    out = np.full((len(items), width), np.nan, dtype=np.float64)
    for i, item in enumerate(items):
        out[i, : len(item.choices)] = 0.0  # summed over the read tokens below
    rows.sort(key=lambda r: len(r.context))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), desc="choice scoring", unit="seq", disable=not progress, leave=False)
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = model.batch_from_ids([r.context for r in chunk])
            position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
            logits = model.bridge(
                batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
            )
            T = logits.shape[1]
            # Left padding: context position p of a row of length L sits in column T - L + p.
            where = [(b, T - len(r.context) + pos) for b, r in enumerate(chunk) for _, pos, _ in r.reads]
            picked = logits[[b for b, _ in where], [col for _, col in where]]
            logp = torch.log_softmax(picked.float(), dim=-1).cpu()
            k = 0
            for r in chunk:
                for c, _, token in r.reads:
                    out[r.item, c] += float(logp[k, token])
                    k += 1
            bar.update(len(chunk))
    finally:
        bar.close()
    return out


def predictions(logprobs: np.ndarray) -> np.ndarray:
    """Index of the best-scored choice per item (NaN entries, i.e. missing choices, never win)."""
    return np.where(np.isnan(logprobs), -np.inf, logprobs).argmax(axis=1)
