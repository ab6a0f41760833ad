"""The built-in tasks by name (:data:`TASKS`), and the seeded calibration / held-out split."""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from analyses.tasks.choice.classification import (
    OBJECT_COLOUR_DESIGN,
    SENTIMENT_DESIGN,
    TOPIC_DESIGN,
    make_object_colour,
    make_sentiment,
    make_topic,
)
from analyses.tasks.choice.design import Design
from analyses.tasks.choice.items import ChoiceItem, TaskKind
from analyses.tasks.choice.multiple_choice import (
    CAPITAL_DESIGN,
    LARGER_NUMBER_DESIGN,
    ODD_ONE_OUT_DESIGN,
    make_capital,
    make_larger_number,
    make_odd_one_out,
)
from probe.errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: ``generator(n, seed)`` yields up to ``capacity`` distinct items."""

    name: str
    kind: TaskKind
    description: str
    generator: Callable[[int, int], list[ChoiceItem]]
    capacity: int  # most distinct items with balanced labels
    n_choices: int

    @property
    def chance(self) -> float:
        """Accuracy of guessing (labels are balanced)."""
        return 1.0 / self.n_choices


def _spec(design: Design, generator: Callable[[int, int], list[ChoiceItem]]) -> TaskSpec:
    doc = (generator.__doc__ or "").strip().splitlines()[0]
    return TaskSpec(design.task, design.kind, doc, generator, design.capacity, design.n_labels)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _spec(SENTIMENT_DESIGN, make_sentiment),
        _spec(TOPIC_DESIGN, make_topic),
        _spec(LARGER_NUMBER_DESIGN, make_larger_number),
        _spec(CAPITAL_DESIGN, make_capital),
        _spec(OBJECT_COLOUR_DESIGN, make_object_colour),
        _spec(ODD_ONE_OUT_DESIGN, make_odd_one_out),
    )
}


def make_task(name: str, n: int, seed: int) -> list[ChoiceItem]:
    """``n`` items of the built-in task ``name`` (see :data:`TASKS`)."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown task {name!r}.{hint} Choose one of: {', '.join(TASKS)}")
    return TASKS[name].generator(n, seed)


def split(
    items: Sequence[ChoiceItem], calibration: float, seed: int
) -> tuple[list[ChoiceItem], list[ChoiceItem]]:
    """A seeded split into (calibration items, held-out items), disjoint and together complete.

    Stratified by task: about ``calibration`` of each task's items go to the calibration part, so a
    mixture keeps its proportions in both (ACT filters heads on one part and reports the other).
    Items keep their original order within each part.
    """
    if not 0.0 < calibration < 1.0:
        raise ConfigError(f"calibration={calibration!r}; give the fraction for calibration, in (0, 1)")
    if len(items) < 2:
        raise ConfigError(f"cannot split {len(items)} item(s); give at least two")
    rng = random.Random(f"headlab.choice.split:{seed}")
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    chosen: set[int] = set()
    for task in sorted(by_task):
        indices = by_task[task]
        rng.shuffle(indices)
        chosen.update(indices[: round(calibration * len(indices))])
    if not chosen or len(chosen) == len(items):
        raise ConfigError(
            f"calibration={calibration} of {len(items)} items leaves one part empty; "
            "use more items or a fraction further from 0 and 1"
        )
    calib = [item for i, item in enumerate(items) if i in chosen]
    held = [item for i, item in enumerate(items) if i not in chosen]
    return calib, held
