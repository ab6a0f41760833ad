"""The sinks run: capture alpha (and norms) on each input set, then build the tables step by step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from analyses.base import AnalysisResult, heads_frame
from analyses.sinks.config import HEAD_METRIC_LABELS, INPUT_LABELS, SEED_OFFSETS, SinksConfig
from analyses.sinks.inputs import input_rows, token_decoder
from analyses.sinks.reducers import SinkReducer, TokenNorms, key_hooks
from analyses.sinks.tables import (
    Measured,
    examples_frame,
    head_columns,
    hidden_sinks_frame,
    hidden_tokens_frame,
    norm_tables,
    positions_frame,
    set_arrays,
    summary_row,
)
from probe.capture import capture
from probe.errors import CaptureError
from probe.hooks import hooks
from probe.loading import LoadedModel
from probe.reducers import PatternReducer


@dataclass
class _SetResult:
    alpha: torch.Tensor  # [n, L, H, T]
    ids: list[list[int]]  # full rows, BOS included
    norms: torch.Tensor | None  # [n, L, 1 + 2 n_kv, 2]
    seconds: float


def measure_sinks(
    model: LoadedModel,
    rows: Sequence[Sequence[int]],
    *,
    eps: float = 0.3,
    mode: Literal["eager", "recompute"] = "eager",
    batch_size: int = 16,
    query_block: int = 512,
    norms: bool = True,
    progress: bool = False,
    desc: str = "sinks",
) -> tuple[SinkReducer, TokenNorms | None]:
    """Capture ``alpha`` (a :class:`SinkReducer`) and, with ``norms``, the :class:`TokenNorms` of
    token ``rows`` (raw ids; the BOS policy is applied by the capture), in one forward: in eager mode
    the norms come from the bridge's hooks, in recompute mode from the native layers' inputs and the
    keys and values their attention receives (no pattern is formed)."""
    sink = SinkReducer(eps)
    token_norms = TokenNorms(model.n_layers, model.n_kv_heads) if norms else None
    batch_size = max(1, min(batch_size, len(rows)))
    reducers: list[PatternReducer] = [sink] + ([token_norms] if token_norms is not None else [])

    def run() -> None:
        capture(
            model,
            rows,
            reducers,
            mode=mode,
            batch_size=batch_size,
            query_block=query_block,
            progress=progress,
            desc=desc,
        )

    if token_norms is not None and mode == "eager":
        with hooks(model, token_norms.hook_points(model)) as hook_set:
            run()
            hook_set.check_fired()
    else:
        run()
    if token_norms is not None:
        silent = torch.isnan(token_norms.result()[..., 0]).any(dim=(0, 2)).nonzero().flatten().tolist()
        if silent:
            raise CaptureError(
                f"layers {silent[:5]} handed no hidden state, key or value to the token norms, so their norms "
                "would be missing; run with --set mode=eager (the bridge's hooks), or --set norms=false"
            )
    return sink, token_norms


def _capture_set(
    model: LoadedModel, rows: list[list[int]], cfg: SinksConfig, input_set: str, progress: bool
) -> _SetResult:
    t0 = time.perf_counter()
    sink, norms = measure_sinks(
        model,
        rows,
        eps=cfg.eps,
        mode=cfg.mode,
        batch_size=cfg.batch_size,
        query_block=cfg.query_block,
        norms=cfg.norms,
        progress=progress,
        desc=f"sinks: {input_set}",
    )
    prefix = [model.bos.token_id] if model.bos.prepend and model.bos.token_id is not None else []
    return _SetResult(
        alpha=sink.alpha(),
        ids=[prefix + list(r) for r in rows],
        norms=norms.result() if norms is not None else None,
        seconds=time.perf_counter() - t0,
    )


@dataclass
class _Tables:
    """The tables, arrays, timings and seeds of a run, gathered one input set at a time."""

    head_cols: dict[str, np.ndarray] = field(default_factory=dict)
    summary_rows: list[dict[str, Any]] = field(default_factory=list)
    positions: list[pd.DataFrame] = field(default_factory=list)
    hidden: list[pd.DataFrame] = field(default_factory=list)
    tokens: list[pd.DataFrame] = field(default_factory=list)
    examples: list[pd.DataFrame] = field(default_factory=list)
    norms: list[pd.DataFrame] = field(default_factory=list)
    norms_kv: list[pd.DataFrame] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)

    def add_set(
        self,
        model: LoadedModel,
        cfg: SinksConfig,
        res: _SetResult,
        m: Measured,
        bos: int,
        decode: Callable[[int], str],
    ) -> None:
        """Add the heads columns, table parts and arrays of one measured input set."""
        self.head_cols.update(head_columns(m))
        self.positions.append(positions_frame(m))
        self.arrays.update(set_arrays(m))
        self.hidden.append(hidden_sinks_frame(m, cfg.hidden_min_share, decode))
        self.tokens.append(hidden_tokens_frame(m, cfg.hidden_min_share, decode))
        if cfg.n_examples:
            self.examples.append(examples_frame(m, cfg.n_examples, decode))
            self.arrays[f"example_alpha_{m.input_set}"] = m.alpha[: cfg.n_examples].numpy().astype(np.float32)
        if res.norms is not None:
            kv_frame, layer_frame = norm_tables(m.input_set, res.norms, model.n_kv_heads)
            self.norms_kv.append(kv_frame)
            self.norms.append(layer_frame)
        self.summary_rows.append(summary_row(m, cfg, bos, self.hidden[-1], decode))

    def tables(self, model: LoadedModel) -> dict[str, pd.DataFrame]:
        tables: dict[str, pd.DataFrame] = {
            "heads": heads_frame(model, self.head_cols),
            "summary": pd.DataFrame(self.summary_rows),
            "positions": pd.concat(self.positions, ignore_index=True),
            "hidden_sinks": pd.concat(self.hidden, ignore_index=True),
            "hidden_tokens": pd.concat(self.tokens, ignore_index=True),
        }
        if self.examples:
            tables["examples"] = pd.concat(self.examples, ignore_index=True)
        if self.norms:
            tables["norms"] = pd.concat(self.norms, ignore_index=True)
            tables["norms_kv"] = pd.concat(self.norms_kv, ignore_index=True)
        return tables


def _measure_set(
    model: LoadedModel, cfg: SinksConfig, input_set: str, n_text: int, out: _Tables, progress: bool
) -> _SetResult:
    """The token rows of ``input_set`` and their capture (timings and seed recorded in ``out``)."""
    t0 = time.perf_counter()
    rows = input_rows(model.tokenizer, input_set, cfg.n_sequences, n_text, cfg.seed)
    out.seeds[input_set] = cfg.seed + SEED_OFFSETS[input_set]
    out.timings[f"data_{input_set}"] = round(time.perf_counter() - t0, 3)
    res = _capture_set(model, rows, cfg, input_set, progress)
    out.timings[f"capture_{input_set}"] = round(res.seconds, 3)
    return res


def _notes(model: LoadedModel, cfg: SinksConfig) -> dict[str, Any]:
    key_hook = "n/a"
    if cfg.norms and cfg.mode == "recompute":
        key_hook = "the key the attention receives (after any q/k norm and RoPE)"
    elif cfg.norms and model.bridge is not None:
        key_hook = ", ".join(dict.fromkeys(key_hooks(model)))
    return {
        "metric": "Sink_k^eps = mean over samples of the share of (layer, head) with alpha_k > eps "
        "(thresholded per sample); sink_1 is k = 0, the first real token",
        "seq_len_counts_bos": True,
        "bos": model.bos.describe(),
        "hidden_sink": f"position k >= 1 with alpha_k > eps for a head; listed when a sink for >= "
        f"{cfg.hidden_min_share:.0%} of heads and seen by >= {cfg.hidden_min_queries} queries",
        "key_hook": key_hook,
        "inputs": {s: INPUT_LABELS[s] for s in cfg.inputs},
        "head_metrics": HEAD_METRIC_LABELS,
    }


def run_sinks(
    model: LoadedModel, config: SinksConfig | None = None, *, progress: bool = True
) -> AnalysisResult:
    """Measure first-token and hidden attention sinks on ``model`` (see docs/analyses/sinks.md)."""
    cfg = config or SinksConfig()
    cfg.validate()
    bos = int(model.bos.prepend and model.bos.token_id is not None)
    model.check_context(cfg.seq_len)
    t_start = time.perf_counter()
    decode = token_decoder(model.tokenizer)
    out = _Tables()
    for input_set in cfg.inputs:
        res = _measure_set(model, cfg, input_set, cfg.seq_len - bos, out, progress)
        out.add_set(model, cfg, res, Measured.of(input_set, res.alpha, res.ids, cfg), bos, decode)
    tables = out.tables(model)
    out.timings["total"] = round(time.perf_counter() - t_start, 3)
    return AnalysisResult(
        analysis="sinks",
        model_info=model.describe(),
        config=replace(cfg),
        tables=tables,
        arrays=out.arrays,
        seeds=out.seeds,
        timings=out.timings,
        notes=_notes(model, cfg),
    )
