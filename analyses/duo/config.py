"""Settings of the DuoAttention analysis (docs/analyses/duo.md has the table and the reasons)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from analyses.tasks.needles import PROTOCOLS, Protocol
from probe.errors import ConfigError

SCORE_SEED_OFFSET = 200_003  # the retrieval-score grid's needles and haystacks: seed + this
TRAIN_SEED_OFFSET = 300_007  # the training contexts: seed + this (never the evaluation grid's)


@dataclass
class DuoConfig:
    """Settings of the DuoAttention analysis: the streaming window, the gate training, the evaluation.

    Streaming heads see the first ``sink`` and the last ``recent`` keys. Training (docs/analyses/duo.md):
    ``steps`` contexts of ``n_passkeys`` needles at depths evenly spaced over ``[depth_min,
    depth_max]``, of lengths drawn from ``train_n_lengths`` evenly spaced lengths in
    ``[train_min_length, train_max_length]`` tokens; AdamW at ``lr`` on distillation + ``lam`` ·
    mean|gate|. ``gates_from``: a gates file (:func:`analyses.duo.save_gates`) used instead of training,
    ``"shipped"`` for the gates headlab ships for the model (``data/duo/``), or ``"auto"``: the shipped
    gates where the model has them, else training with these settings (the run's notes say which).
    Evaluation: the needle grid ``lengths`` × ``depths`` × ``n_needles`` of the retrieval analysis
    (``protocol``, ``rouge_gate``, ``max_new_tokens`` as there), with the top ``shares`` of KV heads as
    retrieval heads chosen by Duo's gates, by the retrieval score (``retrieval_score``: computed on
    a separate grid ``score_lengths`` × ``score_depths`` × ``score_needles``) and at random
    (``random_seeds`` draws); ``n_boot`` bootstrap resamples for the intervals.
    """

    sink: int = 32
    recent: int = 128
    train_min_length: int = 1024
    train_max_length: int = 4096
    train_n_lengths: int = 8
    n_passkeys: int = 10
    depth_min: float = 0.05
    depth_max: float = 0.95
    passkey_words: int = 2
    steps: int = 2000
    n_contexts: int = 64
    lr: float = 0.02
    lam: float = 0.05
    seed: int = 0
    shares: tuple[float, ...] = (0.10, 0.25, 0.50)
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    n_needles: int = 2
    protocol: Protocol = "needle"
    rouge_gate: float = 0.5
    novel_answer_tokens: bool = True
    max_new_tokens: int = 0
    random_seeds: int = 3
    retrieval_score: bool = True
    score_lengths: tuple[int, ...] = (1024,)
    score_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    score_needles: int = 2
    n_boot: int = 1000
    measure_cache: bool = True
    block: int = 128
    gates_from: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def train_lengths(self) -> tuple[int, ...]:
        """The training context lengths: ``train_n_lengths`` evenly spaced in [min, max], rounded."""
        n = self.train_n_lengths
        lo, hi = self.train_min_length, self.train_max_length
        if n == 1:
            return (lo,)
        return tuple(sorted({round(lo + (hi - lo) * i / (n - 1)) for i in range(n)}))

    @property
    def window(self) -> int:
        """Keys a streaming head keeps: ``sink + recent``."""
        return self.sink + self.recent

    def _check_ints(self) -> None:
        positive = {
            "recent": self.recent,
            "train_min_length": self.train_min_length,
            "train_n_lengths": self.train_n_lengths,
            "n_passkeys": self.n_passkeys,
            "n_contexts": self.n_contexts,
            "passkey_words": self.passkey_words,
            "n_needles": self.n_needles,
            "random_seeds": self.random_seeds,
            "score_needles": self.score_needles,
            "n_boot": self.n_boot,
            "block": self.block,
            "sink": self.sink,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}; e.g. --set {name}=1")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps must be an integer >= 0 (0: gates stay at 1), got {self.steps!r}")
        if self.train_max_length < self.train_min_length:
            raise ConfigError(
                f"train_max_length ({self.train_max_length}) is below train_min_length ({self.train_min_length}); "
                "raise it or lower the minimum"
            )
        if self.train_n_lengths > 1 and self.train_max_length == self.train_min_length:
            raise ConfigError(
                "train_n_lengths > 1 needs train_max_length > train_min_length; use --set train_n_lengths=1"
            )
        if not 1 <= self.passkey_words <= 8:
            raise ConfigError(f"passkey_words must be between 1 and 8, got {self.passkey_words}")
        if self.max_new_tokens < 0:
            raise ConfigError(
                f"max_new_tokens must be >= 0 (0: the reference's tokens + 8), got {self.max_new_tokens}"
            )

    def _check_window(self) -> None:
        shortest = {"train_min_length": self.train_min_length, "lengths": min(self.lengths)}
        if self.retrieval_score:
            shortest["score_lengths"] = min(self.score_lengths)
        for name, n in shortest.items():
            if self.window >= n:
                raise ConfigError(
                    f"sink + recent = {self.window} >= the shortest {name} ({n} tokens): a streaming head would "
                    f"drop nothing; lower sink/recent or use contexts longer than {self.window} tokens"
                )

    def _check_grid(self) -> None:
        for name, values in (("lengths", self.lengths), ("score_lengths", self.score_lengths)):
            if not values or any(isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in values):
                raise ConfigError(f"{name} must be context sizes >= 64 tokens, got {list(values)}")
        for name, fracs in (("depths", self.depths), ("score_depths", self.score_depths)):
            if not fracs or any(not 0.0 <= float(d) <= 1.0 for d in fracs):
                raise ConfigError(f"{name} must be fractions in [0, 1], got {list(fracs)}")
        if not 0.0 <= self.depth_min <= self.depth_max <= 1.0:
            raise ConfigError(
                f"need 0 <= depth_min <= depth_max <= 1, got {self.depth_min} and {self.depth_max}; e.g. 0.05 and 0.95"
            )
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be 'needle' or 'answer', got {self.protocol!r}")
        if not 0.0 <= self.rouge_gate < 1.0:
            raise ConfigError(
                f"rouge_gate must be in [0, 1), got {self.rouge_gate}; the retrieval analysis uses 0.5"
            )

    def validate(self) -> None:
        """Raise :class:`~probe.errors.ConfigError` naming the first setting out of range."""
        self._check_ints()
        self._check_grid()
        self._check_window()
        if not self.shares or any(not 0.0 < float(s) < 1.0 for s in self.shares):
            raise ConfigError(
                f"shares are fractions of KV heads strictly between 0 and 1, got {list(self.shares)}"
            )
        if len(set(self.shares)) != len(self.shares):
            raise ConfigError(f"shares lists a value twice: {list(self.shares)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}; the paper uses 0.02")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"lam must be >= 0, got {self.lam}; the paper uses 0.05")
        if self.gates_from is not None and not str(self.gates_from).strip():
            raise ConfigError("gates_from is empty; give the path of a saved gates file or None")
