"""Settings and names of the circuits analyses: the config, the path-patching stages, the head
classes and the attention signatures that define them. See docs/analyses/circuits.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from analyses.validation import check_null
from probe.errors import ConfigError

TaskName = Literal["ioi", "colored_objects"]
Stage = Literal["logits", "mover_queries", "inhibition_kv", "induction_k"]
ReceiverInput = Literal["logits", "q", "kv", "k"]
HeadClass = Literal[
    "name_mover",
    "negative_mover",
    "backup_mover",
    "s_inhibition",
    "induction",
    "duplicate_token",
    "previous_token",
]
STAGES: tuple[Stage, ...] = get_args(Stage)
CLASSES: tuple[HeadClass, ...] = get_args(HeadClass)
ROLES = ("end", "target", "dup1", "dup2", "dup1_next")
SIGNATURES: dict[str, tuple[str, tuple[str, ...]]] = {
    # name -> (query role, key roles whose attention is summed)
    "end_to_target": ("end", ("target",)),
    "end_to_dup": ("end", ("dup1", "dup2")),
    "dup2_to_dup1": ("dup2", ("dup1",)),
    "dup2_to_dup1_next": ("dup2", ("dup1_next",)),
    "dup1_next_to_dup1": ("dup1_next", ("dup1",)),
}
STAGE_RECEIVERS: dict[Stage, tuple[ReceiverInput, tuple[HeadClass, ...]]] = {
    "logits": ("logits", ()),
    "mover_queries": ("q", ("name_mover",)),
    "inhibition_kv": ("kv", ("s_inhibition",)),
    "induction_k": ("k", ("induction",)),
}
STAGE_CLASSES: dict[Stage, tuple[HeadClass, ...]] = {
    "logits": ("name_mover", "negative_mover"),
    "mover_queries": ("s_inhibition",),
    "inhibition_kv": ("induction", "duplicate_token"),
    "induction_k": ("previous_token",),
}
TASK_LABELS = {"ioi": "IOI", "colored_objects": "Colored Objects"}
Admit = Literal["significance", "share"]


@dataclass
class CircuitConfig:
    """Settings of ``headlab run ioi``, ``colored-objects`` and ``circuit-reuse`` (one config for all).

    ``n_items`` prompts per task (IOI templates and both name orders, Colored Objects balanced over
    the asked position), drawn with ``seed``. ``min_share``: the path-patching score (share of the
    clean–corrupt gap) a head needs in a stage; ``min_attention``: the mean attention its signature
    needs. ``admit``: how a head's path score admits it to a class: ``"significance"`` (the default;
    its per-prompt scores differ from zero in the class's direction at false discovery rate
    ``alpha``, a one-sided t-test with Benjamini–Hochberg over the tested heads) or ``"share"`` (the
    mean score passes ``min_share``). ``max_per_class`` caps a class (strongest first).
    Every class is then tested on ``n_heldout`` fresh prompts drawn from the other half of the
    names, places and objects (docs/validation.md) against ``n_null`` random same-size head sets;
    mean ablation there uses per-template means over the held-out prompts and ``n_reference``
    further fresh prompts, so that no mean rests on one or two prompts. ``n_random``: random circuits / head sets
    for the faithfulness, ablation and intervention controls. ``reuse_percents``: the top-p% points
    of the overlap curve (``2.0`` is the paper's). ``batch_size``: sequences per forward pass (the
    sender batching repeats the prompts to fill it). ``max_senders``: activation- and path-patch only
    the strongest heads by attribution patching (a gradient estimate of activation patching for
    every head from one backward pass; the others score NaN, "not tested"); ``None`` (the default
    and the method) tests every head. It is there for CPU runs: one stage costs two forward passes per
    sender and prompt, minutes per stage for a 270-head model on a laptop, seconds on a GPU.
    """

    n_items: int = 48
    max_senders: int | None = None
    seed: int = 0
    min_share: float = 0.02
    admit: Admit = "significance"
    alpha: float = 0.05
    n_heldout: int = 48
    n_reference: int = 96
    n_null: int = 50
    min_attention: float = 0.1
    max_per_class: int = 8
    n_random: int = 20
    reuse_percents: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0)
    batch_size: int = 128
    n_boot: int = 1000
    progress: bool = True

    def validate(self) -> None:
        if isinstance(self.n_items, bool) or not isinstance(self.n_items, int) or self.n_items < 2:
            raise ConfigError(f"n_items={self.n_items!r}: use at least 2 prompts per task")
        if not 0.0 <= self.min_share < 1.0:
            raise ConfigError(f"min_share={self.min_share}: a share of the gap in [0, 1), e.g. 0.02")
        if not 0.0 <= self.min_attention <= 1.0:
            raise ConfigError(f"min_attention={self.min_attention}: an attention weight in [0, 1], e.g. 0.1")
        if self.max_per_class < 1:
            raise ConfigError(f"max_per_class={self.max_per_class}: allow at least 1 head per class")
        if self.n_random < 1:
            raise ConfigError(f"n_random={self.n_random}: draw at least 1 random control")
        if not self.reuse_percents or any(not 0.0 < p <= 100.0 for p in self.reuse_percents):
            raise ConfigError(f"reuse_percents={self.reuse_percents}: percentages in (0, 100], e.g. 1,2,5,10")
        if self.max_senders is not None and self.max_senders < 1:
            raise ConfigError(f"max_senders={self.max_senders}: test at least 1 head, or none for all heads")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: use at least 1 sequence per forward")
        if self.admit not in get_args(Admit):
            raise ConfigError(f"admit={self.admit!r}: choose one of {', '.join(get_args(Admit))}")
        for key in ("n_heldout", "n_reference"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(f"{key}={value!r}: use at least 2 fresh prompts")
        check_null(self.n_null, self.alpha)
        if self.n_boot < 1:
            raise ConfigError(f"n_boot={self.n_boot}: use at least 1 bootstrap resample")
