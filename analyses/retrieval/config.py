"""The retrieval analysis's settings (docs/analyses/retrieval.md has the table)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from analyses.tasks.needles import PROTOCOLS, Protocol
from analyses.validation import ALPHA, MIN_NULL, check_null
from probe.errors import ConfigError

Span = Literal["answer", "needle"]

HELDOUT_SEED_OFFSET = 100_003  # the held-out needles and haystacks are drawn from seed + this


@dataclass
class RetrievalConfig:
    """Settings of the retrieval-head analysis.

    ``protocol``: ``"needle"`` (the paper's task: the model reproduces the whole needle sentence, hits
    are divided by the needle's length, the gate compares with the needle) or ``"answer"`` (the
    model completes the needle's lead-in with the answer's few words, which are the scored span and
    the gate's reference). ``span``: None scores the protocol's own span; runs saved before
    ``protocol`` existed carry ``span`` and ran the answer protocol (``span="answer"`` implies it).
    ``lengths`` are prompt sizes in tokens, ``depths`` the needle's depth (0 = start, 1 = end),
    ``n_needles`` needles per (length, depth). ``max_new_tokens`` 0: the reference's tokens + 8.
    ``mask_fractions``, ``mask_seeds``, ``mask_tests``: the top-K against random-K masking curve on
    the grid's tests (empty fractions: none). ``validation``: held-out validation of the retrieval
    heads on ``heldout_needles`` × ``heldout_depths`` tests of ``heldout_length`` tokens (0: the
    shortest length) with needles and haystacks the grid never used, against ``n_null`` random head
    sets; ``alpha`` is its level and the level of the per-head test against "no copying".
    """

    lengths: tuple[int, ...] = (512, 1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    n_needles: int = 2
    seed: int = 0
    protocol: Protocol = "needle"
    threshold: float = 0.1
    rouge_gate: float = 0.5
    span: Span | None = None
    max_new_tokens: int = 0
    mask_fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)
    mask_seeds: int = 3
    mask_tests: int = 0
    validation: bool = True
    heldout_needles: int = 2
    heldout_length: int = 0
    heldout_depths: tuple[float, ...] = (0.25, 0.75)
    n_null: int = MIN_NULL
    alpha: float = ALPHA
    answer_words: int = 3
    chat: bool | None = None
    answer_prefix: bool = True
    novel_answer_tokens: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        # scoring the answer's tokens is the answer protocol (and what a run saved before the
        # protocol setting existed, which records span="answer", ran)
        if self.span == "answer":
            self.protocol = "answer"

    @property
    def scored_span(self) -> Span:
        """The span hits are counted in and divided by: ``span``, else the protocol's own."""
        return self.span or ("needle" if self.protocol == "needle" else "answer")

    @property
    def heldout_tokens(self) -> int:
        return int(self.heldout_length) or min(int(n) for n in self.lengths)

    def _check_validation(self) -> None:
        if self.validation:
            check_null(self.n_null, self.alpha)
            if self.heldout_needles < 1 or not self.heldout_depths:
                raise ConfigError(
                    "the held-out set needs heldout_needles >= 1 and at least one heldout depth"
                )
            if any(not 0.0 <= float(d) <= 1.0 for d in self.heldout_depths):
                raise ConfigError(f"heldout_depths must lie in [0, 1] (got {list(self.heldout_depths)})")
            if self.heldout_length and self.heldout_length < 64:
                raise ConfigError(f"heldout_length must be 0 or >= 64 tokens (got {self.heldout_length})")

    def validate(self) -> None:
        """Raise :class:`~probe.errors.ConfigError` naming the first setting out of range."""
        if not self.lengths or any(int(n) < 64 for n in self.lengths):
            raise ConfigError(f"lengths must be context sizes >= 64 tokens (got {list(self.lengths)})")
        if not self.depths or any(not 0.0 <= float(d) <= 1.0 for d in self.depths):
            raise ConfigError(f"depths must lie in [0, 1] (got {list(self.depths)})")
        if self.n_needles < 1:
            raise ConfigError(f"n_needles must be >= 1 (got {self.n_needles})")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be 'needle' or 'answer' (got {self.protocol!r})")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1) (got {self.threshold}); the paper uses 0.1")
        if not 0.0 <= self.rouge_gate < 1.0:
            raise ConfigError(f"rouge_gate must be in [0, 1) (got {self.rouge_gate}); the paper uses 0.5")
        if self.span not in (None, "answer", "needle"):
            raise ConfigError(f"span must be None, 'answer' or 'needle' (got {self.span!r})")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens}); 0 = reference + 8")
        if any(not 0.0 < float(f) < 1.0 for f in self.mask_fractions):
            raise ConfigError(f"mask_fractions must lie in (0, 1) (got {list(self.mask_fractions)})")
        if self.answer_words < 1:
            raise ConfigError(f"answer_words must be >= 1 (got {self.answer_words})")
        if self.mask_seeds < 1 or self.mask_tests < 0:
            raise ConfigError("mask_seeds must be >= 1 and mask_tests >= 0 (0 = every test)")
        self._check_validation()
