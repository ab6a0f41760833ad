"""Settings of the ACT analysis (:class:`ActConfig`) and the layer range they select."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from analyses.act.calibration import THRESHOLDS, Calibration, FirstSink, Threshold, check_first_sink
from analyses.tasks import choice
from analyses.tasks.choice import ChoiceToken
from analyses.validation import check_null
from probe.errors import ConfigError

FilterMode = Literal["task", "kind", "pooled", "none"]
FILTERS: tuple[str, ...] = get_args(FilterMode)
KeepRule = Literal["not_lower", "raise", "significant"]
KEEP_RULES: tuple[str, ...] = get_args(KeepRule)
ALL_TASKS: tuple[str, ...] = tuple(choice.TASKS)
POOLED = "pooled"
ALL_HEADS = "all"


@dataclass
class ActConfig:
    """Settings of the ACT analysis (defaults: the paper's code; see docs/analyses/act.md).

    ``tasks``: built-in tasks of :mod:`analyses.tasks.choice` (may be empty when ``jsonl`` is given);
    ``jsonl``: a file of the user's items, one task per distinct ``"task"`` key (default: the file's
    stem). ``n_calibration`` / ``n_heldout``: items per task for the head search and for the
    report. ``layer_start`` .. ``layer_end`` (exclusive; negative counts from the end, None = to
    the last layer): the layers whose heads may be calibrated. ``heads_per_pass``: heads scored by
    one forward pass in the search (each forward holds ``batch_size × heads_per_pass`` sequences).
    ``keep``: ``"significant"`` (the default) keeps the heads whose calibration raises the label's
    margin on the calibration items significantly (one-sided t-test per head, Benjamini-Hochberg over
    the heads at ``significance``); ``"not_lower"`` (the paper's rule) those whose calibration does
    not lower calibration accuracy (a head with no effect is kept), ``"raise"`` those that raise it. ``n_null``: random head sets from outside the kept ones, in range, that the
    held-out validation compares the kept set with (at least 50). ``first_sink``: ``"share"``
    (the official code's variant, behind the paper's published numbers) lets the first detected sink
    take its proportional share of the removed mass; ``"frozen"`` leaves its column untouched.
    """

    tasks: tuple[str, ...] = ALL_TASKS
    jsonl: str | None = None
    n_calibration: int = 200
    n_heldout: int = 500
    beta: float = 0.4
    threshold: Threshold = "alpha"
    alpha_threshold: float = 0.1
    ratio_a: float = 5.0
    layer_start: int = 2
    layer_end: int | None = -1
    filter: FilterMode = "task"
    keep: KeepRule = "significant"
    significance: float = 0.05
    n_null: int = 50
    first_sink: FirstSink = "share"
    heads_per_pass: int = 8
    batch_size: int = 16
    choice_token: ChoiceToken = "first"
    n_boot: int = 2000
    seed: int = 0

    def validate(self) -> None:
        check_first_sink(self.first_sink)
        if self.keep not in KEEP_RULES:
            raise ConfigError(
                f"keep must be 'significant' (the default: heads that raise the label's margin "
                f"significantly, Benjamini-Hochberg at `significance`), 'not_lower' (the paper's rule: heads "
                f"that do not lower calibration accuracy) or 'raise' (only heads that raise it) "
                f"(got {self.keep!r})"
            )
        if not (isinstance(self.significance, float) and 0.0 < self.significance < 1.0):
            raise ConfigError(
                f"significance must be a level in (0, 1), e.g. 0.05 (got {self.significance!r})"
            )
        check_null(self.n_null, self.significance)
        if isinstance(self.tasks, str):
            raise ConfigError(f"tasks must be a tuple of task names, got the string {self.tasks!r}")
        for name in self.tasks:
            if name not in choice.TASKS:
                close = difflib.get_close_matches(name, ALL_TASKS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown task {name!r}.{hint} Choose from: {', '.join(ALL_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks lists a task twice: {list(self.tasks)}; give each once")
        if not self.tasks and not self.jsonl:
            raise ConfigError(
                f"no tasks: set tasks (from {', '.join(ALL_TASKS)}) or jsonl=path/to/items.jsonl"
            )
        if self.jsonl is not None and not Path(self.jsonl).expanduser().is_file():
            raise ConfigError(f"jsonl={self.jsonl!r} does not exist; give the path of a JSONL file of items")
        for name in ("n_calibration", "n_heldout", "heads_per_pass", "batch_size", "n_boot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1 (got {value!r})")
        for name in self.tasks:
            capacity = choice.TASKS[name].capacity
            if self.n_calibration + self.n_heldout > capacity:
                raise ConfigError(
                    f"task {name!r} has at most {capacity} distinct items but n_calibration + n_heldout = "
                    f"{self.n_calibration + self.n_heldout}; lower them"
                )
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must be in [0, 1] (got {self.beta}); the paper uses 0.4")
        if self.threshold not in THRESHOLDS:
            raise ConfigError(f"threshold must be one of {', '.join(THRESHOLDS)} (got {self.threshold!r})")
        if not 0.0 < self.alpha_threshold < 1.0:
            raise ConfigError(
                f"alpha_threshold must be in (0, 1) (got {self.alpha_threshold}); the paper uses 0.1"
            )
        if not (math.isfinite(self.ratio_a) and self.ratio_a > 0.0):
            raise ConfigError(f"ratio_a must be a positive number (got {self.ratio_a}); the paper uses 5")
        if self.filter not in FILTERS:
            raise ConfigError(f"filter must be one of {', '.join(FILTERS)} (got {self.filter!r})")
        if self.choice_token not in get_args(ChoiceToken):
            raise ConfigError(f"choice_token must be 'first' or 'last' (got {self.choice_token!r})")
        if (
            isinstance(self.layer_start, bool)
            or not isinstance(self.layer_start, int)
            or self.layer_start < 0
        ):
            raise ConfigError(f"layer_start must be an integer >= 0 (got {self.layer_start!r})")
        if self.layer_end is not None and (
            isinstance(self.layer_end, bool) or not isinstance(self.layer_end, int)
        ):
            raise ConfigError(f"layer_end must be an integer or None (got {self.layer_end!r})")
        if self.layer_end is not None and self.layer_end >= 0 and self.layer_end <= self.layer_start:
            raise ConfigError(
                f"layer_end={self.layer_end} must be above layer_start={self.layer_start} (it is exclusive); "
                "use a negative layer_end to count from the last layer, or None for all layers"
            )

    def calibration(self) -> Calibration:
        return Calibration(self.beta, self.threshold, self.alpha_threshold, self.ratio_a, self.first_sink)


def resolve_layers(config: ActConfig, n_layers: int) -> range:
    """The layers in range on a model of ``n_layers`` layers; ConfigError if none."""
    end = n_layers if config.layer_end is None else config.layer_end
    if end < 0:
        end += n_layers
    end = min(end, n_layers)
    if config.layer_start >= end:
        raise ConfigError(
            f"layer range {config.layer_start}..{config.layer_end} (exclusive end) selects no layer of a "
            f"{n_layers}-layer model; choose layer_start < layer_end within 0..{n_layers} "
            "(e.g. --set layer_start=0 --set layer_end=none for every layer)"
        )
    return range(config.layer_start, end)
