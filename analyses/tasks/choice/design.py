"""Tasks as product spaces: seeded sampling of distinct, label-balanced items from a task's design."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from analyses.tasks.choice.items import LETTERS, ChoiceItem, TaskKind
from probe.errors import ConfigError


def pick(pool: Sequence[int], digits: Sequence[int]) -> list[int]:
    """Take ``pool[d]`` for each digit, removing each pick: an ordered draw without replacement."""
    rest = list(pool)
    return [rest.pop(d) for d in digits]


def _digits(index: int, radices: Sequence[int]) -> tuple[int, ...]:
    """Mixed-radix digits of ``index`` (first radix most significant)."""
    out = []
    for radix in reversed(radices):
        index, digit = divmod(index, radix)
        out.append(digit)
    return tuple(reversed(out))


def unrank_combination(rank: int, n: int, k: int) -> list[int]:
    """The ``rank``-th ``k``-subset of ``range(n)`` in lexicographic order."""
    out: list[int] = []
    x = 0
    for remaining in range(k, 0, -1):
        while True:
            count = math.comb(n - x - 1, remaining - 1)  # subsets whose next element is x
            if rank < count:
                out.append(x)
                x += 1
                break
            rank -= count
            x += 1
    return out


Render = Callable[[int, tuple[int, ...]], tuple[str, tuple[str, ...]]]


@dataclass(frozen=True)
class Design:
    """A task as a product space: for each label, ``prod(radices)`` distinct items.

    ``render(label, digits)`` turns one point of the space into (prompt, choices); it must be
    injective, so sampling distinct indices gives distinct prompts.
    """

    task: str
    kind: TaskKind
    n_labels: int
    radices: tuple[int, ...]
    render: Render

    @property
    def capacity(self) -> int:
        """The most distinct items with balanced labels."""
        return self.n_labels * math.prod(self.radices)

    def sample(self, n: int, seed: int) -> list[ChoiceItem]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r} items of task {self.task!r} asked for; give an integer n >= 1")
        if n > self.capacity:
            raise ConfigError(
                f"task {self.task!r} can yield at most {self.capacity} distinct items with balanced labels, "
                f"but n={n} were asked for; ask for n <= {self.capacity} or add a user file (load_jsonl)"
            )
        # A string seed is hashed with SHA-512 by `random`: stable across processes and Python runs.
        rng = random.Random(f"headlab.choice:{self.task}:{seed}")
        labels = [i % self.n_labels for i in range(n)]
        rng.shuffle(labels)
        per_label = math.prod(self.radices)
        counts = Counter(labels)
        # range() is sampled without being built, so spaces of millions of items cost nothing.
        pools = {lab: rng.sample(range(per_label), counts[lab]) for lab in range(self.n_labels)}
        items = []
        for lab in labels:
            prompt, choices = self.render(lab, _digits(pools[lab].pop(), self.radices))
            items.append(ChoiceItem(prompt, choices, lab, self.task, self.kind))
        return items


def common_length(groups: Sequence[Sequence[object]], what: str) -> int:
    """The one length every word list of a task shares (each label draws from a space of one size)."""
    lengths = {len(g) for g in groups}
    if len(lengths) != 1:
        raise ValueError(f"the {what} lists differ in length {sorted(lengths)}; give each the same number")
    return lengths.pop()


def lettered_options(question: str, options: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    lines = [question, *(f"{LETTERS[i]}. {text}" for i, text in enumerate(options)), "Answer:"]
    return "\n".join(lines), tuple(f" {LETTERS[i]}" for i in range(len(options)))
