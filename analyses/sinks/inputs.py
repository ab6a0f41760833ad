"""The token rows of the three input sets, and a memoised one-token decoder for the tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from analyses.sinks.config import INPUT_SETS, SEED_OFFSETS
from analyses.tasks.text import natural_token_rows
from probe.errors import ConfigError


def non_special_ids(tokenizer: Any) -> list[int]:
    """Every token id of ``tokenizer`` except special ones (its special ids and every added token
    flagged special, e.g. Gemma's ``<unused…>``)."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    return [i for i in range(len(tokenizer)) if i not in special]


def random_token_rows(tokenizer: Any, n: int, n_tokens: int, seed: int) -> list[list[int]]:
    """``n`` rows of ``n_tokens`` tokens, each uniform over the non-special vocabulary."""
    allowed = torch.tensor(non_special_ids(tokenizer))
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(allowed), (n, n_tokens), generator=gen)
    return [[int(t) for t in row] for row in allowed[picks]]


def repeated_token_rows(tokenizer: Any, n: int, n_tokens: int, seed: int) -> list[list[int]]:
    """``n`` rows, each one random non-special token repeated ``n_tokens`` times."""
    allowed = torch.tensor(non_special_ids(tokenizer))
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(allowed), (n,), generator=gen)
    return [[int(allowed[i])] * n_tokens for i in picks]


def input_rows(tokenizer: Any, input_set: str, n: int, n_tokens: int, seed: int) -> list[list[int]]:
    """The raw token rows (no BOS) of ``input_set``; ``seed`` is the run's seed (offset per set)."""
    set_seed = seed + SEED_OFFSETS.get(input_set, 0)
    if input_set == "natural":
        return natural_token_rows(tokenizer, n, n_tokens, set_seed)
    if input_set == "random":
        return random_token_rows(tokenizer, n, n_tokens, set_seed)
    if input_set == "repeated":
        return repeated_token_rows(tokenizer, n, n_tokens, set_seed)
    raise ConfigError(f"unknown input set {input_set!r}; choose from {', '.join(INPUT_SETS)}")


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """``decode(token_id) -> str`` for one token at a time, memoised (tables list many repeats)."""
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = str(tokenizer.decode([token_id]))
        return cache[token_id]

    return decode
