"""Attention sinks: how many heads dump their attention on the first token, and on which others.

Background
----------
Gu et al., "When Attention Sink Emerges in Language Models: An Empirical View" (ICLR 2025; code:
sail-sg/Attention-Sink) measure sinks with the column importance (the shared
primitive, :class:`probe.reducers.ColumnImportance`)::

    alpha_k = (sum_{t >= k} A[t, k]) / (T - k)                (k = 0 is the first real token)
    Sink_k^eps = mean over samples of [ share of all (layer, head) with alpha_k > eps ]     in %

The threshold is applied **per sample** (one indicator per sample, layer, head), then averaged over
samples: the official ``compute_attention_sink`` takes the mean of ``importance > eps`` over samples,
layers and heads at once. Thresholding the sample-averaged ``alpha_k`` is a different number
(:func:`sink_percent_of_mean_alpha`, kept only to show the difference; never reported as Sink).
The papers count positions from 1, so their ``Sink_1`` is our ``k = 0``; the tables call it
``sink_1``.

Defaults follow the paper's code: ``eps = 0.3``, ``T = 64`` tokens, 100 sequences. **T counts the
BOS token** when the BOS policy prepends one (the official code tokenizes with the tokenizer's
default and then cuts to 64 tokens): with BOS, a sequence is BOS + 63 tokens. The BOS policy is the
model's (``model.bos``, the tokenizer's default unless loaded with ``bos="always"|"never"``) and is
recorded in ``model_info['bos']`` and in the ``summary`` table. Three input sets:

* ``natural``: windows of standard-library documentation prose (:mod:`analyses.tasks.text`);
* ``random``: tokens drawn uniformly from the vocabulary without special tokens (every added token
  flagged special is left out, e.g. Gemma's ``<unused…>``), independently per position;
* ``repeated``: one such random token repeated to fill the sequence (a different token per
  sequence). With a BOS policy that prepends BOS, the sequence is BOS + the repeated token: the
  first token then differs from the others, unlike the all-identical inputs of the paper's
  Propositions 1–4 (RoPE/NoPE/ALiBi models lose the first-token sink when *all* tokens are equal).

What is measured, per input set:

* ``summary``: ``sink_1`` (Sink of the first real token, in %) with its standard error over samples.
* ``positions``: the per-position sink map, ``Sink_k^eps`` for every position ``k`` (the official
  ``metric1`` vector), plus the mean ``alpha_k``.
* hidden sinks (the sinks beyond the first token, Yu et al., ICML 2024): a position ``k >= 1`` is a
  sink *for a head* when its ``alpha_k > eps`` as well (the same threshold as the first token).
  Late positions are seen by few queries (``alpha_{T-1}`` is a single weight, the last token's
  attention to itself), so only positions seen by at least ``hidden_min_queries`` queries count
  as hidden sinks. ``hidden_sinks`` lists every (sample, position) that is a sink for at least
  ``hidden_min_share`` of all heads, with its token; ``hidden_tokens`` groups them by token string
  (how often a token is such a sink where it occurs, and for what share of heads on average).
* ``heads`` (one row per head): ``alpha0_<set>`` (mean first-token alpha, ``_sem`` its standard
  error), ``sink_rate_<set>`` (share of samples where the head's first-token alpha > eps),
  ``hidden_sinks_<set>`` (mean number of hidden-sink positions per sample),
  ``hidden_sink_rate_<set>`` (share of samples with at least one), ``hidden_alpha_max_<set>``
  (mean over samples of the head's largest alpha at an eligible position ``k >= 1``).
* ``norms`` / ``norms_kv``: L2 norms of the first real token's hidden state (the residual stream
  entering each layer, ``hook_resid_pre``, as the official ``output_hidden_states``), key and value
  (per KV head; keys as the attention uses them, after any q/k norm and RoPE — ``hook_rot_k`` where
  the model has it; RoPE is a rotation and does not change the norm) against the mean norm of the
  other real tokens. Each is averaged over samples; ``ratio = sink_norm / other_norm``. ``norms``
  averages keys and values over KV heads (as the official code averages over heads).
* ``examples`` (+ arrays ``example_alpha_<set>``, ``[n_examples, L, H, T]``): a few sequences'
  tokens and alpha per position, for display.
* arrays ``alpha_<set>`` (mean alpha, ``[L, H, T]``) and ``sink_rate_<set>`` (share of samples with
  alpha_k > eps, ``[L, H, T]``): the per-head maps at every position.

Capture: ``mode="eager"`` reads the bridge's patterns; the norms come from hooks on the same
forward. ``mode="recompute"`` keeps the model's SDPA kernel for the alpha capture; the norms then
need one more (bridge) forward, since only the bridge has the hook points.

Usage
-----
>>> from analyses.sinks import SinksConfig, run_sinks
>>> result = run_sinks(model, SinksConfig(n_sequences=20))
>>> result.tables["summary"][["input_set", "sink_1"]]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from analyses.base import AnalysisResult, heads_frame
from analyses.registry import Analysis, register
from analyses.tasks.text import natural_token_rows
from probe.capture import capture
from probe.errors import CaptureError, ConfigError
from probe.hooks import HookFn, attn_hook, hooks
from probe.loading import LoadedModel
from probe.reducers import BatchInfo, ColumnImportance, PatternReducer

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
    """Settings of the sink analysis (defaults: the paper's code; see the module docstring).

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


# ------------------------------------------------------------------------------------ the metric


def sink_indicator(alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """``alpha > eps`` per sample, layer, head and position (False where alpha is NaN: no token)."""
    return alpha > eps


def sink_share(alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """``[n, T]`` (float64): per sample and position, the share of all (layer, head) with
    ``alpha_k > eps``.

    ``alpha`` is ``[n, L, H, T]`` (:class:`ColumnImportance`); NaN beyond a sample's length.
    """
    share = sink_indicator(alpha, eps).double().mean(dim=(1, 2))  # float64: exact shares of counts
    missing = torch.isnan(alpha).all(dim=1).all(dim=1)
    return share.masked_fill(missing, float("nan"))


def sink_percent(alpha: torch.Tensor, eps: float, k: int = 0) -> float:
    """``Sink_k^eps`` in %: thresholded per sample, averaged over samples (the paper's metric)."""
    return 100.0 * float(torch.nanmean(sink_share(alpha, eps)[:, k]))


def sink_percent_of_mean_alpha(alpha: torch.Tensor, eps: float, k: int = 0) -> float:
    """Share (in %) of heads whose *sample-averaged* ``alpha_k`` exceeds ``eps``.

    NOT the paper's Sink (which thresholds every sample first); kept to show that the two differ.
    """
    mean = torch.nanmean(alpha[..., k], dim=0)  # [L, H]
    return 100.0 * float((mean > eps).float().mean())


class SinkReducer(ColumnImportance):
    """:class:`ColumnImportance` (``alpha_k`` per sample, layer, head, real position) with the sink
    threshold ``eps``: :meth:`indicator`, :meth:`share` and :meth:`percent` give the per-sample
    indicator, the per-sample share of heads and ``Sink_k^eps`` in %."""

    name = "sink"

    def __init__(self, eps: float = 0.3) -> None:
        super().__init__()
        if not 0.0 < eps < 1.0:
            raise ConfigError(f"eps must be between 0 and 1 (got {eps})")
        self.eps = eps

    def alpha(self) -> torch.Tensor:
        """``[n_samples, L, H, T_max]`` column importance (NaN beyond each sample's length)."""
        return self.result()

    def indicator(self) -> torch.Tensor:
        return sink_indicator(self.result(), self.eps)

    def share(self) -> torch.Tensor:
        return sink_share(self.result(), self.eps)

    def percent(self, k: int = 0) -> float:
        return sink_percent(self.result(), self.eps, k)


# ------------------------------------------------------------------------------------ the norms


class TokenNorms(PatternReducer):
    """L2 norms of the first real token's hidden state, keys and values against the other tokens.

    Not a pattern statistic: it reads ``blocks.{l}.hook_resid_pre``, the key hook (``hook_rot_k``
    where the bridge has it: after q/k norm and RoPE, the key the attention uses; else ``hook_k``)
    and ``hook_v`` through :meth:`hook_points`, and takes the batch layout (padding) from the
    :class:`BatchInfo` that the capture hands every reducer. Its pattern updates do nothing.

    Result: ``[n_samples, L, 1 + 2·n_kv, 2]``: column 0 the hidden state, then the keys of each KV
    head, then the values of each; last dimension (norm of the first real token, mean norm of the
    other real tokens; NaN for a one-token sample).
    """

    name = "token_norms"
    supports_moments = True
    stacked_moments = True  # its moment updates do nothing: one call per batch is enough

    def __init__(self, n_layers: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.n_kv = n_kv_heads
        self.width = 1 + 2 * n_kv_heads

    def columns(self, quantity: str) -> slice:
        if quantity == "hidden":
            return slice(0, 1)
        if quantity == "key":
            return slice(1, 1 + self.n_kv)
        if quantity == "value":
            return slice(1 + self.n_kv, 1 + 2 * self.n_kv)
        raise KeyError(f"unknown quantity {quantity!r}; choose from {', '.join(QUANTITIES)}")

    def _start(self, info: BatchInfo) -> None:
        self.values = torch.full(
            (info.batch_size, self.n_layers, self.width, 2), float("nan"), device=info.lengths.device
        )

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        return None

    def update_moments(self, layer: int | slice, moments: Any) -> None:
        return None

    def _finish(self, info: BatchInfo) -> torch.Tensor:
        return self.values

    def state_bytes(self, batch: int, T: int, n_layers: int, n_heads: int) -> int:
        return 4 * batch * n_layers * self.width * 2

    def record(self, layer: int, quantity: str, activation: torch.Tensor) -> None:
        """Reduce one hook's activation ``[b, T, d]`` or ``[b, T, n_kv, d]`` to the two norms."""
        info = self.info
        if info is None:
            raise CaptureError("TokenNorms saw an activation outside a batch; run it through capture")
        norms = activation.float().norm(dim=-1)
        if norms.dim() == 2:
            norms = norms[..., None]  # [b, T, 1]
        cols = self.columns(quantity)
        if norms.shape[-1] != cols.stop - cols.start:
            raise CaptureError(
                f"{quantity} activation of layer {layer} has {norms.shape[-1]} heads, expected "
                f"{cols.stop - cols.start}"
            )
        pos = info.key_positions()  # [b, T]
        first = (pos == 0).to(norms.dtype)
        other = (pos >= 1).to(norms.dtype)
        n_other = other.sum(-1, keepdim=True)  # [b, 1]
        sink_norm = torch.einsum("btn,bt->bn", norms, first)
        other_norm = torch.einsum("btn,bt->bn", norms, other) / n_other.clamp_min(1)
        other_norm = other_norm.masked_fill(n_other == 0, float("nan"))
        self.values[:, layer, cols, 0] = sink_norm
        self.values[:, layer, cols, 1] = other_norm

    def hook_points(self, model: LoadedModel) -> list[tuple[str, HookFn]]:
        """(bridge hook name, function) for every layer's hidden state, key and value."""
        if model.bridge is None:
            raise CaptureError(f"{model.name} has no TransformerBridge: its norms cannot be hooked")
        names = model.bridge.hook_dict
        out: list[tuple[str, HookFn]] = []
        for layer in range(self.n_layers):
            rot = attn_hook(layer, "rot_k")
            key = rot if rot in names else attn_hook(layer, "k")
            for quantity, name in (
                ("hidden", f"blocks.{layer}.hook_resid_pre"),
                ("key", key),
                ("value", attn_hook(layer, "v")),
            ):
                out.append((name, self._hook(layer, quantity)))
        return out

    def _hook(self, layer: int, quantity: str) -> HookFn:
        def hook(activation: torch.Tensor, hook: Any) -> None:
            self.record(layer, quantity, activation)

        return hook


# ------------------------------------------------------------------------------------ inputs


def non_special_ids(tokenizer: Any) -> list[int]:
    """Every token id of ``tokenizer`` except special ones (its special ids and every added token
    flagged special, e.g. Gemma's ``<unused…>``)."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    return [i for i in range(len(tokenizer)) if i not in special]


def random_token_rows(tokenizer: Any, n: int, n_tokens: int, seed: int) -> list[list[int]]:
    """``n`` rows of ``n_tokens`` tokens, each uniform over the non-special vocabulary."""
    allowed = torch.tensor(non_special_ids(tokenizer))
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(allowed), (n, n_tokens), generator=gen)
    return [[int(t) for t in row] for row in allowed[picks]]


def repeated_token_rows(tokenizer: Any, n: int, n_tokens: int, seed: int) -> list[list[int]]:
    """``n`` rows, each one random non-special token repeated ``n_tokens`` times."""
    allowed = torch.tensor(non_special_ids(tokenizer))
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(allowed), (n,), generator=gen)
    return [[int(allowed[i])] * n_tokens for i in picks]


def input_rows(tokenizer: Any, input_set: str, n: int, n_tokens: int, seed: int) -> list[list[int]]:
    """The raw token rows (no BOS) of ``input_set``; ``seed`` is the run's seed (offset per set)."""
    set_seed = seed + SEED_OFFSETS.get(input_set, 0)
    if input_set == "natural":
        return natural_token_rows(tokenizer, n, n_tokens, set_seed)
    if input_set == "random":
        return random_token_rows(tokenizer, n, n_tokens, set_seed)
    if input_set == "repeated":
        return repeated_token_rows(tokenizer, n, n_tokens, set_seed)
    raise ConfigError(f"unknown input set {input_set!r}; choose from {', '.join(INPUT_SETS)}")


# ------------------------------------------------------------------------------------ the run


@dataclass
class _SetResult:
    alpha: torch.Tensor  # [n, L, H, T]
    ids: list[list[int]]  # full rows, BOS included
    norms: torch.Tensor | None  # [n, L, 1 + 2 n_kv, 2]
    seconds: float


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """``decode(token_id) -> str`` for one token at a time, memoised (tables list many repeats)."""
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = str(tokenizer.decode([token_id]))
        return cache[token_id]

    return decode


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
    token ``rows`` (raw ids; the BOS policy is applied by the capture). In eager mode the norms
    come from the same forward; in recompute mode from one more bridge forward."""
    sink = SinkReducer(eps)
    token_norms = TokenNorms(model.n_layers, model.n_kv_heads) if norms else None
    batch_size = max(1, min(batch_size, len(rows)))
    alpha_reducers: list[PatternReducer] = [sink]
    if token_norms is not None and mode == "eager":
        alpha_reducers.append(token_norms)  # same forward: its hooks fire during the capture
    if token_norms is not None:
        with hooks(model, token_norms.hook_points(model)) as hook_set:
            capture(
                model, rows, alpha_reducers, mode=mode, batch_size=batch_size, query_block=query_block,
                progress=progress, desc=desc,
            )  # fmt: skip
            if mode == "recompute":  # the native model has no hook points: one more bridge forward
                capture(
                    model, rows, [token_norms], mode="eager", batch_size=batch_size,
                    query_block=query_block, progress=progress, desc=f"{desc} (norms)",
                )  # fmt: skip
            hook_set.check_fired()
    else:
        capture(
            model, rows, alpha_reducers, mode=mode, batch_size=batch_size, query_block=query_block,
            progress=progress, desc=desc,
        )  # fmt: skip
    return sink, token_norms


def _capture_set(
    model: LoadedModel, rows: list[list[int]], cfg: SinksConfig, input_set: str, progress: bool
) -> _SetResult:
    t0 = time.perf_counter()
    sink, norms = measure_sinks(
        model, rows, eps=cfg.eps, mode=cfg.mode, batch_size=cfg.batch_size, query_block=cfg.query_block,
        norms=cfg.norms, progress=progress, desc=f"sinks: {input_set}",
    )  # fmt: skip
    prefix = [model.bos.token_id] if model.bos.prepend and model.bos.token_id is not None else []
    return _SetResult(
        alpha=sink.alpha(),
        ids=[prefix + list(r) for r in rows],
        norms=norms.result() if norms is not None else None,
        seconds=time.perf_counter() - t0,
    )


def _sem(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    n = values.shape[dim]
    if n < 2:
        return torch.zeros_like(values.select(dim, 0))
    return values.std(dim=dim, unbiased=True) / math.sqrt(n)


def _eligible(T: int, min_queries: int) -> slice:
    """Positions that can be hidden sinks: 1 <= k <= T - min_queries (seen by >= min_queries queries)."""
    return slice(1, max(1, T - min_queries + 1))


def run_sinks(
    model: LoadedModel, config: SinksConfig | None = None, *, progress: bool = True
) -> AnalysisResult:
    """Measure first-token and hidden attention sinks on ``model`` (see the module docstring)."""
    cfg = config or SinksConfig()
    cfg.validate()
    bos = int(model.bos.prepend and model.bos.token_id is not None)
    model.check_context(cfg.seq_len)
    n_text = cfg.seq_len - bos
    t_start = time.perf_counter()
    decode = token_decoder(model.tokenizer)

    head_cols: dict[str, np.ndarray] = {}
    summary_rows: list[dict[str, Any]] = []
    position_frames: list[pd.DataFrame] = []
    hidden_frames: list[pd.DataFrame] = []
    token_frames: list[pd.DataFrame] = []
    example_frames: list[pd.DataFrame] = []
    norm_frames: list[pd.DataFrame] = []
    norm_kv_frames: list[pd.DataFrame] = []
    arrays: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    seeds: dict[str, int] = {}

    for input_set in cfg.inputs:
        t0 = time.perf_counter()
        rows = input_rows(model.tokenizer, input_set, cfg.n_sequences, n_text, cfg.seed)
        seeds[input_set] = cfg.seed + SEED_OFFSETS[input_set]
        timings[f"data_{input_set}"] = round(time.perf_counter() - t0, 3)
        res = _capture_set(model, rows, cfg, input_set, progress)
        timings[f"capture_{input_set}"] = round(res.seconds, 3)

        alpha = res.alpha  # [n, L, H, T]
        n, _L, _H, T = alpha.shape
        ind = sink_indicator(alpha, cfg.eps)  # [n, L, H, T]
        share = sink_share(alpha, cfg.eps)  # [n, T]
        elig = _eligible(T, cfg.hidden_min_queries)

        # --- per head
        alpha0 = alpha[..., 0]
        head_cols[f"alpha0_{input_set}"] = alpha0.mean(0).numpy()
        head_cols[f"alpha0_{input_set}_sem"] = _sem(alpha0).numpy()
        head_cols[f"sink_rate_{input_set}"] = ind[..., 0].float().mean(0).numpy()
        hidden_ind = ind[..., elig]
        head_cols[f"hidden_sinks_{input_set}"] = hidden_ind.float().sum(-1).mean(0).numpy()
        head_cols[f"hidden_sink_rate_{input_set}"] = hidden_ind.any(-1).float().mean(0).numpy()
        hidden_alpha = alpha[..., elig]
        if hidden_alpha.shape[-1]:
            head_cols[f"hidden_alpha_max_{input_set}"] = hidden_alpha.amax(-1).mean(0).numpy()
        else:
            head_cols[f"hidden_alpha_max_{input_set}"] = np.full(alpha0.shape[1:], np.nan)

        # --- per position (the sink map)
        pct = 100.0 * share
        position_frames.append(
            pd.DataFrame(
                {
                    "input_set": input_set,
                    "position": np.arange(T),
                    "sink_pct": torch.nanmean(pct, 0).numpy(),
                    "sink_pct_sem": _sem(pct).numpy(),
                    "alpha_mean": torch.nanmean(alpha, dim=(0, 1, 2)).numpy(),
                    "n_queries": T - np.arange(T),
                    "hidden_eligible": (np.arange(T) >= elig.start) & (np.arange(T) < elig.stop),
                }
            )
        )
        arrays[f"alpha_{input_set}"] = alpha.mean(0).numpy().astype(np.float32)
        arrays[f"sink_rate_{input_set}"] = ind.float().mean(0).numpy().astype(np.float32)

        # --- hidden sinks: (sample, position) listings and tokens
        ids = np.array(res.ids)  # [n, T]
        share_np = share.numpy()
        n_heads_np = ind.sum(dim=(1, 2)).numpy()
        el_share = share_np[:, elig]
        el_ids = ids[:, elig]
        positions = np.arange(T)[elig]
        samples_idx, pos_idx = np.nonzero(el_share >= cfg.hidden_min_share)
        hidden_frames.append(
            pd.DataFrame(
                {
                    "input_set": input_set,
                    "sample": samples_idx.astype(np.int64),
                    "position": positions[pos_idx].astype(np.int64),
                    "token_id": el_ids[samples_idx, pos_idx].astype(np.int64),
                    "token": [decode(int(t)) for t in el_ids[samples_idx, pos_idx]],
                    "sink_pct": 100.0 * el_share[samples_idx, pos_idx],
                    "n_heads": n_heads_np[:, elig][samples_idx, pos_idx].astype(np.int64),
                }
            )
        )
        token_frames.append(_hidden_tokens(input_set, el_ids, el_share, cfg.hidden_min_share, decode))

        # --- examples
        if cfg.n_examples:
            k = cfg.n_examples
            example_frames.append(
                pd.DataFrame(
                    {
                        "input_set": input_set,
                        "example": np.repeat(np.arange(k), T),
                        "position": np.tile(np.arange(T), k),
                        "token_id": ids[:k].ravel().astype(np.int64),
                        "token": [decode(int(t)) for t in ids[:k].ravel()],
                        "sink_pct": 100.0 * share_np[:k].ravel(),
                        "alpha_mean": alpha[:k].mean(dim=(1, 2)).numpy().ravel(),
                        "alpha_max": alpha[:k].amax(dim=(1, 2)).numpy().ravel(),
                    }
                )
            )
            arrays[f"example_alpha_{input_set}"] = alpha[:k].numpy().astype(np.float32)

        # --- norms
        if res.norms is not None:
            kv_frame, layer_frame = _norm_tables(input_set, res.norms, model.n_kv_heads)
            norm_kv_frames.append(kv_frame)
            norm_frames.append(layer_frame)

        hidden_heads = 100.0 * float(hidden_ind.any(-1).float().mean())
        pos_map = torch.nanmean(pct, 0).numpy()
        top = int(positions[np.argmax(pos_map[elig])]) if len(positions) else -1
        listed = hidden_frames[-1]
        summary_rows.append(
            {
                "input_set": input_set,
                "n_sequences": n,
                "seq_len": T,
                "eps": cfg.eps,
                "bos_prepended": bool(bos),
                "first_token": decode(int(ids[0, 0])) if bos else "(varies)",
                "sink_1": sink_percent(alpha, cfg.eps, 0),
                "sink_1_sem": float(_sem(pct[:, 0:1]).item()),
                "sink_1_of_mean_alpha": sink_percent_of_mean_alpha(alpha, cfg.eps, 0),
                "alpha0_mean": float(alpha0.mean()),
                "hidden_heads_pct": hidden_heads,
                "hidden_positions_listed": len(listed),
                "top_hidden_position": top,
                "top_hidden_position_pct": float(pos_map[top]) if top >= 0 else float("nan"),
                "top_hidden_token": (str(listed["token"].value_counts().index[0]) if len(listed) else ""),
            }
        )

    heads = heads_frame(model, head_cols)
    tables: dict[str, pd.DataFrame] = {
        "heads": heads,
        "summary": pd.DataFrame(summary_rows),
        "positions": pd.concat(position_frames, ignore_index=True),
        "hidden_sinks": pd.concat(hidden_frames, ignore_index=True),
        "hidden_tokens": pd.concat(token_frames, ignore_index=True),
    }
    if example_frames:
        tables["examples"] = pd.concat(example_frames, ignore_index=True)
    if norm_frames:
        tables["norms"] = pd.concat(norm_frames, ignore_index=True)
        tables["norms_kv"] = pd.concat(norm_kv_frames, ignore_index=True)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    key_hook = "n/a"
    if cfg.norms and model.bridge is not None:
        key_hook = "hook_rot_k" if attn_hook(0, "rot_k") in model.bridge.hook_dict else "hook_k"
    return AnalysisResult(
        analysis="sinks",
        model_info=model.describe(),
        config=asdict(cfg),
        tables=tables,
        arrays=arrays,
        seeds=seeds,
        timings=timings,
        notes={
            "metric": "Sink_k^eps = mean over samples of the share of (layer, head) with alpha_k > eps "
            "(thresholded per sample); sink_1 is k = 0, the first real token",
            "seq_len_counts_bos": True,
            "bos": model.bos.describe(),
            "hidden_sink": f"position k >= 1 with alpha_k > eps for a head; listed when a sink for >= "
            f"{cfg.hidden_min_share:.0%} of heads and seen by >= {cfg.hidden_min_queries} queries",
            "key_hook": key_hook,
            "inputs": {s: INPUT_LABELS[s] for s in cfg.inputs},
            "head_metrics": HEAD_METRIC_LABELS,
        },
    )


def _hidden_tokens(
    input_set: str,
    ids: np.ndarray,
    share: np.ndarray,
    min_share: float,
    decode: Callable[[int], str],
) -> pd.DataFrame:
    """Per token string at eligible positions: occurrences, how often a hidden sink, mean share."""
    frame = pd.DataFrame(
        {"token": [decode(int(t)) for t in ids.ravel()], "share": share.ravel().astype(np.float64)}
    )
    frame["is_sink"] = frame["share"] >= min_share
    grouped = frame.groupby("token", sort=False).agg(
        occurrences=("share", "size"),
        sink_occurrences=("is_sink", "sum"),
        mean_sink_pct=("share", "mean"),
        max_sink_pct=("share", "max"),
    )
    grouped = grouped.reset_index()
    grouped["mean_sink_pct"] *= 100.0
    grouped["max_sink_pct"] *= 100.0
    grouped["sink_occurrences"] = grouped["sink_occurrences"].astype(np.int64)
    grouped["occurrences"] = grouped["occurrences"].astype(np.int64)
    grouped["sink_rate"] = grouped["sink_occurrences"] / grouped["occurrences"]
    grouped.insert(0, "input_set", input_set)
    return grouped.sort_values(
        ["sink_occurrences", "mean_sink_pct"], ascending=[False, False], ignore_index=True
    )


def _norm_tables(input_set: str, norms: torch.Tensor, n_kv: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``norms`` ``[n, L, 1 + 2 n_kv, 2]`` -> (per KV head rows, per layer rows)."""
    mean = torch.nanmean(norms, dim=0).numpy()  # [L, C, 2]
    L = mean.shape[0]
    kv_rows = []
    layer_rows = []
    for layer in range(L):
        for quantity, start, width in (("hidden", 0, 1), ("key", 1, n_kv), ("value", 1 + n_kv, n_kv)):
            block = mean[layer, start : start + width]  # [width, 2]
            for j in range(width):
                kv_rows.append(
                    {
                        "input_set": input_set,
                        "layer": layer,
                        "quantity": quantity,
                        "kv_head": -1 if quantity == "hidden" else j,
                        "sink_norm": float(block[j, 0]),
                        "other_norm": float(block[j, 1]),
                    }
                )
            sink_norm, other_norm = float(block[:, 0].mean()), float(block[:, 1].mean())
            layer_rows.append(
                {
                    "input_set": input_set,
                    "layer": layer,
                    "quantity": quantity,
                    "sink_norm": sink_norm,
                    "other_norm": other_norm,
                }
            )
    kv, per_layer = pd.DataFrame(kv_rows), pd.DataFrame(layer_rows)
    for frame in (kv, per_layer):
        frame["ratio"] = frame["sink_norm"] / frame["other_norm"]
    return kv, per_layer


# ------------------------------------------------------------------------------------ reporting


def summary(result: AnalysisResult) -> str:
    """A few lines for the CLI: Sink_1 per input set, where the hidden sinks are, the norm ratios."""
    table = result.tables["summary"]
    bos = result.model_info.get("bos", {})
    lines = [
        f"sinks of {result.model_info['name']}: T={int(table['seq_len'].iloc[0])} "
        f"(BOS {'prepended: ' + str(bos.get('token')) if bos.get('prepend') else 'not prepended'}), "
        f"eps={table['eps'].iloc[0]}, {int(table['n_sequences'].iloc[0])} sequences per set"
    ]
    for row in table.itertuples(index=False):
        lines.append(
            f"  {row.input_set:<9} Sink_1 = {row.sink_1:6.2f}% ± {row.sink_1_sem:.2f}; "
            f"heads with a hidden sink {row.hidden_heads_pct:5.1f}%; top hidden position "
            f"{row.top_hidden_position} ({row.top_hidden_position_pct:.1f}% of heads)"
            + (f"; most listed hidden-sink token {row.top_hidden_token!r}" if row.top_hidden_token else "")
        )
    norms = result.tables.get("norms")
    if norms is not None and len(norms):
        nat = norms[norms["input_set"] == norms["input_set"].iloc[0]]
        for quantity in QUANTITIES:
            q = nat[nat["quantity"] == quantity]
            lines.append(
                f"  {quantity:<6} norm, first token / others ({nat['input_set'].iloc[0]}): "
                f"max ratio {q['ratio'].max():.2f} (layer {int(q.loc[q['ratio'].idxmax(), 'layer'])}), "
                f"min {q['ratio'].min():.2f}"
            )
    return "\n".join(lines)


ANALYSIS = register(
    Analysis(
        name="sinks",
        config_cls=SinksConfig,
        run=run_sinks,
        summary=summary,
        help="Attention sinks: Sink_1 on natural, random and repeated tokens; hidden sinks; norms.",
        page="dashboard.sinks.page:SinksPage",
        report="dashboard.sinks.report:report_sections",
        demo={},
    )
)
