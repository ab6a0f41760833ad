"""Drawing needles: a seeded kind and place per needle, answers of words the haystack never uses."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from analyses.tasks.needles.haystack import _source
from analyses.tasks.needles.templates import TEMPLATES, Needle
from analyses.tasks.needles.words import ANSWER_WORDS, PLACES
from probe.errors import ConfigError


def make_needles(
    n: int,
    seed: int = 0,
    *,
    tokenizer: Any = None,
    answer_words: int = 3,
    novel_answer_tokens: bool = True,
    exclude: Sequence[str] = (),
) -> list[Needle]:
    """``n`` needles with distinct answers; kinds rotate over :data:`TEMPLATES` in a seeded order.

    With a ``tokenizer`` and ``novel_answer_tokens``, answer words are drawn only from those whose
    tokens occur nowhere in the haystack source. ``exclude``: answers not to draw.
    """
    if n < 1:
        raise ConfigError(f"ask for at least one needle, got {n}")
    drawer = _Drawer(seed, tokenizer, answer_words, novel_answer_tokens, exclude)
    return [drawer.draw(i) for i in range(n)]


class _Drawer:
    """Needle ``i`` has a fixed kind and place; its answer is drawn anew on every call."""

    def __init__(
        self, seed: int, tokenizer: Any, answer_words: int, novel: bool, exclude: Sequence[str]
    ) -> None:
        if not 1 <= answer_words <= 8:
            raise ConfigError(f"answer_words must be between 1 and 8, got {answer_words}")
        self.words = answer_words
        self.pool: tuple[str, ...] = ANSWER_WORDS
        if tokenizer is not None and novel:
            self.pool = _source(tokenizer).words
            if len(self.pool) < 2 * answer_words:
                name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
                raise ConfigError(
                    f"only {len(self.pool)} answer words have tokens that never occur in the haystack for "
                    f"{name} (a byte-level or very small vocabulary); pass novel_answer_tokens=False"
                )
        self.rng = random.Random(f"headlab-needles:{seed}")
        self.kinds = list(TEMPLATES)
        self.rng.shuffle(self.kinds)
        self.places = list(PLACES)
        self.rng.shuffle(self.places)
        self.used = set(exclude)

    def draw(self, i: int) -> Needle:
        for _ in range(10_000):
            answer = " ".join(self.rng.sample(self.pool, self.words))
            if answer not in self.used:
                self.used.add(answer)
                return self.kinds[i % len(self.kinds)].fill(self.places[i % len(self.places)], answer)
        raise ConfigError(
            f"cannot draw another distinct answer from {len(self.pool)} words; ask for fewer needles"
        )
