"""The prompt sets of the two tasks: IOI and Colored Objects prompts with their token-aligned
corruptions, in batches of one length, with the position of every role."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analyses.circuits.config import TaskName
from analyses.tasks import colored_objects as co
from analyses.tasks import ioi
from analyses.tasks.ioi import Part
from probe.loading import LoadedModel


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
    key: tuple[int, ...] = ()  # what makes prompts of two sets position-aligned (template, length)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def length(self) -> int:
        return int(self.clean.shape[1])

    def subset(self, rows: slice) -> PromptSet:
        return PromptSet(
            self.clean[rows],
            self.corrupt[rows],
            self.right[rows],
            self.wrong[rows],
            self.candidates[rows],
            self.answer_index[rows],
            {k: v[rows] for k, v in self.roles.items()},
            self.wrong_positions[rows],
            self.items[rows],
            self.key,
        )


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


def ioi_task(model: LoadedModel, n: int, seed: int = 0, part: Part = "all") -> TaskData:
    """IOI prompts (both orders, all templates) with their ABC corruptions, grouped by template;
    ``part`` picks the words they draw from (:func:`analyses.tasks.ioi.word_part`)."""
    items = ioi.make_ioi(model, n, seed=seed, part=part)
    groups = []
    index = {id(it): i for i, it in enumerate(items)}
    for key, group in ioi.group_by_template(items).items():
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
                key=key,
            )
        )
    return TaskData("ioi", groups, [it.text for it in items], [it.answer for it in items])


def colored_objects_task(model: LoadedModel, n: int, seed: int = 0, part: Part = "all") -> TaskData:
    """Colored Objects prompts with their other-object corruptions, grouped by length; ``part`` picks
    the objects they draw from (:func:`analyses.tasks.colored_objects.word_part`)."""
    items = co.make_colored_objects(model, n, seed=seed, part=part)
    index = {id(it): i for i, it in enumerate(items)}
    groups = []
    for key, group in co.group_by_length(items).items():
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
                key=(key,),
            )
        )
    return TaskData("colored_objects", groups, [it.text for it in items], [it.answer for it in items])


TASK_BUILDERS: dict[str, Callable[[LoadedModel, int, int, Part], TaskData]] = {
    "ioi": ioi_task,
    "colored_objects": colored_objects_task,
}
