"""Settings of the sinks analysis: the input sets, the head metrics and :class:`SinksConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from probe.errors import ConfigError

InputSet = Literal["natural", "random", "repeated"]
INPUT_SETS: tuple[str, ...] = ("natural", "random", "repeated")
INPUT_LABELS = {
    "natural": "natural text",
    "random": "uniformly random tokens",
    "repeated": "one random token repeated",
}
SEED_OFFSETS = {"natural": 0, "random": 1, "repeated": 2}
QUANTITIES: tuple[str, ...] = ("hidden", "key", "value")
QUANTITY_LABELS = {"hidden": "hidden state (resid_pre)", "key": "key", "value": "value"}
HEAD_METRICS: tuple[str, ...] = (
    "alpha0",
    "sink_rate",
    "hidden_sinks",
    "hidden_sink_rate",
    "hidden_alpha_max",
)
HEAD_METRIC_LABELS = {
    "alpha0": "first-token alpha_0 (mean over samples)",
    "sink_rate": "share of samples with alpha_0 > eps",
    "hidden_sinks": "hidden-sink positions per sample",
    "hidden_sink_rate": "share of samples with a hidden sink",
    "hidden_alpha_max": "largest alpha_k at k >= 1 (mean over samples)",
}


@dataclass
class SinksConfig:
    """Settings of the sink analysis (defaults: the paper's code; see docs/analyses/sinks.md).

    ``seq_len`` is T, tokens per sequence *including* BOS when the model's BOS policy prepends one.
    ``hidden_min_share``: a (sample, position k >= 1) is listed as a hidden sink when it is a sink
    (alpha_k > eps) for at least this share of all heads. ``hidden_min_queries``: positions seen by
    fewer queries (the last ones, ``T - k < hidden_min_queries``) are never hidden sinks.
    """

    seq_len: int = 64
    n_sequences: int = 100
    eps: float = 0.3
    inputs: tuple[str, ...] = INPUT_SETS
    batch_size: int = 16
    mode: Literal["eager", "recompute"] = "eager"
    query_block: int = 512
    norms: bool = True
    hidden_min_share: float = 0.05
    hidden_min_queries: int = 8
    n_examples: int = 4
    seed: int = 0

    def validate(self) -> None:
        if self.seq_len < 4:
            raise ConfigError(f"seq_len must be >= 4 (got {self.seq_len})")
        for name in ("n_sequences", "batch_size", "query_block", "hidden_min_queries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"eps must be between 0 and 1 (got {self.eps}); the paper uses 0.3")
        if not 0.0 < self.hidden_min_share <= 1.0:
            raise ConfigError(f"hidden_min_share must be in (0, 1] (got {self.hidden_min_share})")
        if self.hidden_min_queries >= self.seq_len:
            raise ConfigError(
                f"hidden_min_queries ({self.hidden_min_queries}) must be below seq_len ({self.seq_len})"
            )
        if not self.inputs:
            raise ConfigError(f"inputs is empty; choose from {', '.join(INPUT_SETS)}")
        unknown = [s for s in self.inputs if s not in INPUT_SETS]
        if unknown:
            raise ConfigError(f"unknown input set(s) {unknown}; choose from {', '.join(INPUT_SETS)}")
        if len(set(self.inputs)) != len(self.inputs):
            raise ConfigError(f"inputs lists a set twice: {list(self.inputs)}")
        if self.mode not in ("eager", "recompute"):
            raise ConfigError(f"mode must be eager or recompute (got {self.mode!r})")
        if not 0 <= self.n_examples <= self.n_sequences:
            raise ConfigError(
                f"n_examples must be between 0 and n_sequences ({self.n_sequences}), got {self.n_examples}; "
                f"use --set n_examples={min(max(self.n_examples, 0), self.n_sequences)} or raise n_sequences"
            )
