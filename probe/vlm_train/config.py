"""What training takes and gives: the examples, the settings (:class:`TrainConfig`) and the result.

See docs/scene-llava.md for the settings that matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from probe.errors import ConfigError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
IGNORE = -100


class ImageSet(Protocol):
    """Images by index: ``images[i]`` is a uint8 RGB array ``[H, W, 3]`` (a list of arrays will do)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True)
class TrainExample:
    """One training pair: the user's ``prompt`` about image ``image`` and the answer ``target``."""

    image: int
    prompt: str
    target: str


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the data is the caller's). The defaults suit a GPU; tests use a few steps.

    ``lr`` is the projector's peak learning rate (LLaVA-1.5's stage 1: 1e-3), reached after
    ``warmup_steps`` and decayed on a cosine to ``min_lr_ratio · lr``. ``lora_rank = 0`` trains the
    projector only. ``time_limit_s > 0`` stops early (and still saves) when a wall-clock budget runs
    out. ``eval_every`` steps (and at the end) the loss on the held-out examples is measured.
    ``loss_weighting``: ``"token"`` averages the cross-entropy over every answer token of the batch
    (LLaVA's recipe), so a one-token answer ("Yes") weighs 1/30 of a caption and the yes/no questions
    are barely learned; ``"example"`` (default) averages each answer's tokens first and then the
    examples, so every example weighs the same.
    """

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_lr: float = 2e-4
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    feature_batch_size: int = 64
    feature_cache: bool = True
    time_limit_s: float = 0.0
    loss_weighting: str = "example"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "log_every": self.log_every,
            "feature_batch_size": self.feature_batch_size,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, value in {
            "warmup_steps": self.warmup_steps,
            "lora_rank": self.lora_rank,
            "eval_every": self.eval_every,
            "seed": self.seed,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        rates: dict[str, float] = {"lr": self.lr, "lora_lr": self.lora_lr, "lora_alpha": self.lora_alpha}
        for name, rate in rates.items():
            if not rate > 0:
                raise ConfigError(f"{name} must be positive, got {rate!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.time_limit_s < 0:
            raise ConfigError("weight_decay, grad_clip and time_limit_s must be non-negative (0: off)")
        if self.loss_weighting not in ("example", "token"):
            raise ConfigError(f"loss_weighting must be 'example' or 'token', got {self.loss_weighting!r}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or (self.lora_rank and not self.lora_targets):
            raise ConfigError(
                f"lora_targets must be a non-empty subset of {', '.join(LORA_TARGETS)}, got {self.lora_targets!r}"
            )

    def learning_rate(self, step: int, peak: float) -> float:
        """Linear warm-up to ``peak``, then a cosine to ``min_lr_ratio · peak`` at the last step."""
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return peak * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    """What training produced: weights (float32, CPU), the loss curves, timings and sizes."""

    config: TrainConfig
    projector: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor]
    curve: list[
        dict[str, float]
    ]  # every log_every steps: step, loss (mean since the last point), lr, seconds
    eval_curve: list[dict[str, float]]  # step, eval_loss
    steps_done: int
    stopped_early: bool
    timings: dict[str, float]
    sizes: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last tenth of the logged points (at least one)."""
        tail = self.curve[-max(1, len(self.curve) // 10) :]
        return float(np.mean([p["loss"] for p in tail])) if tail else math.nan

    @property
    def first_loss(self) -> float:
        return float(self.curve[0]["loss"]) if self.curve else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "stopped_early": self.stopped_early,
            "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "final_eval_loss": self.eval_curve[-1]["eval_loss"] if self.eval_curve else None,
            "timings": self.timings,
            "sizes": self.sizes,
        }
