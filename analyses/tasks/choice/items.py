"""A zero-shot choice item and the checks every item passes (built-in or read from a file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from probe.errors import ConfigError

TaskKind = Literal["classification", "multiple_choice"]
ChoiceToken = Literal["first", "last"]
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ChoiceItem:
    """One zero-shot question: the prompt, its choices as continuations, and the right one.

    For classification the choices are label words with their leading space (``" positive"``), so
    that each is the natural next word after a prompt ending in a cue (``"Sentiment:"``). For
    multiple choice the prompt lists the options ``A. …`` and the choices are `` A``, `` B``, ….
    """

    prompt: str
    choices: tuple[str, ...]
    label: int
    task: str
    kind: TaskKind

    def __post_init__(self) -> None:
        problem = item_problem(self.prompt, self.choices, self.label, self.kind)
        if problem:
            raise ConfigError(f"bad choice item for task {self.task!r}: {problem}")

    @property
    def answer(self) -> str:
        return self.choices[self.label]

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "choices": list(self.choices),
            "label": self.label,
            "task": self.task,
            "kind": self.kind,
        }


def item_problem(prompt: object, choices: object, label: object, kind: object) -> str | None:
    """What is wrong with an item's fields (with the fix), or None."""
    if not isinstance(prompt, str) or not prompt:
        return "'prompt' must be a non-empty string"
    if not isinstance(choices, list | tuple) or len(choices) < 2:
        return "'choices' must be a list of at least two strings"
    if not all(isinstance(c, str) and c for c in choices):
        return "every choice must be a non-empty string (label words with a leading space, e.g. ' yes')"
    if len(set(choices)) != len(choices):
        return f"choices {list(choices)!r} repeat a choice; give each choice once"
    if len(choices) > len(LETTERS):
        return f"at most {len(LETTERS)} choices are supported; got {len(choices)}"
    if isinstance(label, bool) or not isinstance(label, int):
        return f"'label' must be an integer index into the choices, got {label!r}"
    if not 0 <= label < len(choices):
        return f"'label' {label} is out of range for {len(choices)} choices; use 0..{len(choices) - 1}"
    if kind not in get_args(TaskKind):
        return f"'kind' {kind!r} is unknown; use 'classification' or 'multiple_choice'"
    return None
