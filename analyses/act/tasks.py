"""The tasks of an ACT run: each built-in or user task's calibration and held-out items."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from analyses.act.config import ActConfig
from analyses.tasks import choice
from analyses.tasks.choice import ChoiceItem
from probe.errors import ConfigError


@dataclass
class Task:
    name: str
    kind: str
    calibration: list[ChoiceItem]
    heldout: list[ChoiceItem]


def _split_task(
    items: list[ChoiceItem], n_cal: int, n_held: int, seed: int
) -> tuple[list[ChoiceItem], list[ChoiceItem]]:
    want = n_cal + n_held
    if len(items) > want:
        keep = sorted(random.Random(f"headlab.act.subset:{seed}").sample(range(len(items)), want))
        items = [items[i] for i in keep]
    return choice.split(items, n_cal / want, seed)


def load_tasks(config: ActConfig) -> tuple[list[Task], dict[str, str]]:
    """Each task's calibration and held-out items, plus notes on user tasks with fewer items."""
    tasks: list[Task] = []
    notes: dict[str, str] = {}
    for name in config.tasks:
        items = choice.make_task(name, config.n_calibration + config.n_heldout, config.seed)
        cal, held = _split_task(items, config.n_calibration, config.n_heldout, config.seed)
        tasks.append(Task(name, choice.TASKS[name].kind, cal, held))
    if config.jsonl:
        by_task: dict[str, list[ChoiceItem]] = {}
        for item in choice.load_jsonl(Path(config.jsonl).expanduser()):
            by_task.setdefault(item.task, []).append(item)
        for name, items in by_task.items():
            if name in config.tasks:
                raise ConfigError(
                    f"the jsonl file's task {name!r} has the name of a built-in task in tasks; rename it in the "
                    "file (a 'task' key per line) or drop it from tasks"
                )
            if len(items) < 2:
                raise ConfigError(f"task {name!r} of {config.jsonl} has {len(items)} item; give at least two")
            want = config.n_calibration + config.n_heldout
            if len(items) < want:
                notes[name] = (
                    f"{len(items)} items, fewer than n_calibration + n_heldout = {want}: split in the same "
                    "proportion"
                )
            cal, held = _split_task(items, config.n_calibration, config.n_heldout, config.seed)
            kind = Counter(item.kind for item in items).most_common(1)[0][0]
            tasks.append(Task(name, kind, cal, held))
    return tasks, notes
