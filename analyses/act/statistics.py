"""Hidden sinks of every head on the uncalibrated calibration inputs, read in the pattern hooks."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.act.calibration import Calibration
from analyses.act.scoring import ChoiceScorer, Chunk
from probe.errors import ConfigError
from probe.hooks import HookFn, attn_hook, hooks

SINK_TOKENS_COLUMNS = ("token", "count", "share_of_heads")


class SinkStats:
    """Hidden sinks of every head on uncalibrated sequences (read in the pattern hooks)."""

    def __init__(self, scorer: ChoiceScorer, calibration: Calibration, in_range: Collection[int]) -> None:
        model = scorer.model
        n = scorer.n_sequences
        self.scorer = scorer
        self.cal = calibration
        self.in_range = set(in_range)
        self.n_layers = model.n_layers
        self.hidden_count = np.zeros((n, model.n_layers, model.n_heads), dtype=np.int64)
        self.first_pos = np.full((n, model.n_layers, model.n_heads), -1, dtype=np.int64)
        # per sequence: in-range heads with a hidden sink at each real position, and the tokens
        self.position_heads: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
        self.tokens: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
        self._chunk: Chunk | None = None
        self._per_position: torch.Tensor | None = None

    @contextmanager
    def observe(self, chunk: Chunk) -> Iterator[None]:
        """Hooks on every layer's pattern while ``chunk`` runs (uncalibrated, one copy)."""
        self._chunk = chunk
        self._per_position = torch.zeros(
            chunk.input_ids.shape, dtype=torch.long, device=chunk.input_ids.device
        )
        points = [(attn_hook(layer, "pattern"), self._hook(layer)) for layer in range(self.n_layers)]
        with hooks(self.scorer.model, points) as hook_set:
            yield
            hook_set.check_fired()
        self._finish()

    def _hook(self, layer: int) -> HookFn:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            chunk = self._chunk
            assert chunk is not None and self._per_position is not None
            b, T = chunk.input_ids.shape
            if pattern.shape[0] != b:
                raise ConfigError("sink statistics are gathered on uncalibrated, unreplicated passes only")
            first, hidden = self.cal.sinks(pattern, chunk.lengths)  # [b, H, T]
            offsets = (T - chunk.lengths).to(first.device)
            has = first.any(-1)
            pos = first.to(torch.int32).argmax(-1) - offsets[:, None]
            ids = chunk.row_ids
            self.hidden_count[ids, layer] = hidden.sum(-1).cpu().numpy()
            self.first_pos[ids, layer] = torch.where(has, pos, -1).cpu().numpy()
            if layer in self.in_range:
                self._per_position += hidden.sum(1)
            return None

        return hook

    def _finish(self) -> None:
        chunk, per_position = self._chunk, self._per_position
        assert chunk is not None and per_position is not None
        T = chunk.input_ids.shape[1]
        counts = per_position.cpu().numpy()
        ids = chunk.input_ids.cpu().numpy()
        for b, row in enumerate(chunk.row_ids):
            off = T - int(chunk.lengths[b])
            self.position_heads[row] = counts[b, off:]
            self.tokens[row] = ids[b, off:]
        self._chunk = self._per_position = None


def sink_tokens(stats: SinkStats, n_in_range: int, decode: Callable[[int], str]) -> pd.DataFrame:
    tokens: list[str] = []
    shares: list[float] = []
    for counts, ids in zip(stats.position_heads, stats.tokens, strict=True):
        where = np.nonzero(counts)[0]
        tokens += [decode(int(ids[p])) for p in where]
        shares += (counts[where] / n_in_range).tolist()
    frame = pd.DataFrame(
        {"token": pd.Series(tokens, dtype=object), "share": np.asarray(shares, dtype=np.float64)}
    )
    grouped = frame.groupby("token", sort=False).agg(
        count=("share", "size"), share_of_heads=("share", "mean")
    )
    grouped = grouped.reset_index()
    grouped["count"] = grouped["count"].astype(np.int64)
    grouped["share_of_heads"] = grouped["share_of_heads"].astype(np.float64)
    return grouped.sort_values(["count", "share_of_heads"], ascending=[False, False], ignore_index=True)[
        list(SINK_TOKENS_COLUMNS)
    ]
