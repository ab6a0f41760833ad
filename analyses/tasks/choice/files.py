"""User items: a JSONL file of choice items, read whole or not at all, and written back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from analyses.tasks.choice.items import LETTERS, ChoiceItem, TaskKind, item_problem
from probe.errors import ConfigError


def load_jsonl(path: str | Path, *, task: str | None = None) -> list[ChoiceItem]:
    """Items from a JSONL file: one ``{"prompt": str, "choices": [str, ...], "label": int}`` per line.

    Optional keys: ``"task"`` (default: ``task`` or the file's stem) and ``"kind"``
    (``"classification"`` or ``"multiple_choice"``; default: multiple choice when the choices are
    the letters `` A``, `` B``, … in order, else classification). Other keys are ignored; blank
    lines are skipped. Every line is checked before anything is returned, and one error lists the
    bad lines (``file:line: problem; fix``), so a file is loaded whole or not at all.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file} does not exist; give the path of a JSONL file of choice items")
    default_task = task or file.stem
    items: list[ChoiceItem] = []
    problems: list[str] = []
    with file.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            problem, item = _parse_line(line, default_task)
            if problem:
                problems.append(f"{file}:{lineno}: {problem}")
            elif item is not None:
                items.append(item)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConfigError(
            f"{len(problems)} bad line(s) in {file}; each line must be a JSON object "
            f'{{"prompt": str, "choices": [str, ...], "label": int}}:\n  {shown}{more}'
        )
    if not items:
        raise ConfigError(f"{file} has no items; write one JSON object per line")
    return items


def _parse_line(line: str, default_task: str) -> tuple[str | None, ChoiceItem | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno}); write one JSON object per line", None
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}; write one object per line", None
    missing = [key for key in ("prompt", "choices", "label") if key not in record]
    if missing:
        return f"missing key(s) {', '.join(map(repr, missing))}; add them", None
    choices = record["choices"]
    kind = record.get("kind")
    if kind is None and isinstance(choices, list):
        letters = [f" {LETTERS[i]}" for i in range(min(len(choices), len(LETTERS)))]
        kind = "multiple_choice" if choices == letters else "classification"
    item_task = record.get("task", default_task)
    if not isinstance(item_task, str) or not item_task:
        return "'task' must be a non-empty string; fix or drop it", None
    problem = item_problem(record["prompt"], choices, record["label"], kind)
    if problem:
        return problem, None
    return None, ChoiceItem(
        record["prompt"], tuple(choices), record["label"], item_task, cast(TaskKind, kind)
    )


def write_jsonl(items: Sequence[ChoiceItem], path: str | Path) -> Path:
    """Write items in the format :func:`load_jsonl` reads (round trip)."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
    return file
