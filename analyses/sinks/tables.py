"""The tables of one input set, built from its captured alpha (and norms): the steps of
:func:`analyses.sinks.run.run_sinks`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.sinks.config import SinksConfig
from analyses.sinks.reducers import sink_indicator, sink_percent, sink_percent_of_mean_alpha, sink_share


def sem(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    n = values.shape[dim]
    if n < 2:
        return torch.zeros_like(values.select(dim, 0))
    return values.std(dim=dim, unbiased=True) / math.sqrt(n)


def eligible(T: int, min_queries: int) -> slice:
    """Positions that can be hidden sinks: 1 <= k <= T - min_queries (seen by >= min_queries queries)."""
    return slice(1, max(1, T - min_queries + 1))


@dataclass
class Measured:
    """One input set's alpha and what its tables are read from."""

    input_set: str
    alpha: torch.Tensor  # [n, L, H, T]
    ind: torch.Tensor  # alpha_k > eps per sample, layer, head and position
    share: torch.Tensor  # [n, T]: share of all heads with alpha_k > eps
    elig: slice  # the positions that can be hidden sinks
    ids: np.ndarray  # [n, T] token ids, BOS included

    @classmethod
    def of(cls, input_set: str, alpha: torch.Tensor, ids: list[list[int]], cfg: SinksConfig) -> Measured:
        T = alpha.shape[-1]
        return cls(
            input_set=input_set,
            alpha=alpha,
            ind=sink_indicator(alpha, cfg.eps),
            share=sink_share(alpha, cfg.eps),
            elig=eligible(T, cfg.hidden_min_queries),
            ids=np.array(ids),
        )


def head_columns(m: Measured) -> dict[str, np.ndarray]:
    """The heads-table columns of one input set (first-token alpha, sink rate, hidden sinks)."""
    s = m.input_set
    alpha0 = m.alpha[..., 0]
    hidden_ind = m.ind[..., m.elig]
    hidden_alpha = m.alpha[..., m.elig]
    cols = {
        f"alpha0_{s}": alpha0.mean(0).numpy(),
        f"alpha0_{s}_sem": sem(alpha0).numpy(),
        f"sink_rate_{s}": m.ind[..., 0].float().mean(0).numpy(),
        f"hidden_sinks_{s}": hidden_ind.float().sum(-1).mean(0).numpy(),
        f"hidden_sink_rate_{s}": hidden_ind.any(-1).float().mean(0).numpy(),
    }
    if hidden_alpha.shape[-1]:
        cols[f"hidden_alpha_max_{s}"] = hidden_alpha.amax(-1).mean(0).numpy()
    else:
        cols[f"hidden_alpha_max_{s}"] = np.full(alpha0.shape[1:], np.nan)
    return cols


def positions_frame(m: Measured) -> pd.DataFrame:
    """The per-position sink map: Sink_k in % (± sem), mean alpha_k, queries seeing k, eligibility."""
    T = m.alpha.shape[-1]
    pct = 100.0 * m.share
    return pd.DataFrame(
        {
            "input_set": m.input_set,
            "position": np.arange(T),
            "sink_pct": torch.nanmean(pct, 0).numpy(),
            "sink_pct_sem": sem(pct).numpy(),
            "alpha_mean": torch.nanmean(m.alpha, dim=(0, 1, 2)).numpy(),
            "n_queries": T - np.arange(T),
            "hidden_eligible": (np.arange(T) >= m.elig.start) & (np.arange(T) < m.elig.stop),
        }
    )


def set_arrays(m: Measured) -> dict[str, np.ndarray]:
    """The per-head maps at every position: mean alpha and the share of samples with alpha_k > eps."""
    return {
        f"alpha_{m.input_set}": m.alpha.mean(0).numpy().astype(np.float32),
        f"sink_rate_{m.input_set}": m.ind.float().mean(0).numpy().astype(np.float32),
    }


def hidden_sinks_frame(m: Measured, min_share: float, decode: Callable[[int], str]) -> pd.DataFrame:
    """Every (sample, eligible position) that is a sink for at least ``min_share`` of all heads."""
    n_heads = m.ind.sum(dim=(1, 2)).numpy()
    el_share = m.share.numpy()[:, m.elig]
    el_ids = m.ids[:, m.elig]
    positions = np.arange(m.alpha.shape[-1])[m.elig]
    samples_idx, pos_idx = np.nonzero(el_share >= min_share)
    return pd.DataFrame(
        {
            "input_set": m.input_set,
            "sample": samples_idx.astype(np.int64),
            "position": positions[pos_idx].astype(np.int64),
            "token_id": el_ids[samples_idx, pos_idx].astype(np.int64),
            "token": [decode(int(t)) for t in el_ids[samples_idx, pos_idx]],
            "sink_pct": 100.0 * el_share[samples_idx, pos_idx],
            "n_heads": n_heads[:, m.elig][samples_idx, pos_idx].astype(np.int64),
        }
    )


def hidden_tokens_frame(m: Measured, min_share: float, decode: Callable[[int], str]) -> pd.DataFrame:
    """:func:`hidden_tokens` at the eligible positions of ``m``."""
    return hidden_tokens(m.input_set, m.ids[:, m.elig], m.share.numpy()[:, m.elig], min_share, decode)


def examples_frame(m: Measured, k: int, decode: Callable[[int], str]) -> pd.DataFrame:
    """The first ``k`` sequences' tokens with the share of heads sinking on each, mean and max alpha."""
    T = m.alpha.shape[-1]
    ids = m.ids[:k].ravel()
    return pd.DataFrame(
        {
            "input_set": m.input_set,
            "example": np.repeat(np.arange(k), T),
            "position": np.tile(np.arange(T), k),
            "token_id": ids.astype(np.int64),
            "token": [decode(int(t)) for t in ids],
            "sink_pct": 100.0 * m.share.numpy()[:k].ravel(),
            "alpha_mean": m.alpha[:k].mean(dim=(1, 2)).numpy().ravel(),
            "alpha_max": m.alpha[:k].amax(dim=(1, 2)).numpy().ravel(),
        }
    )


def summary_row(
    m: Measured, cfg: SinksConfig, bos: int, listed: pd.DataFrame, decode: Callable[[int], str]
) -> dict[str, Any]:
    """The input set's row of the ``summary`` table (``listed``: its :func:`hidden_sinks_frame`)."""
    n, _L, _H, T = m.alpha.shape
    pct = 100.0 * m.share
    positions = np.arange(T)[m.elig]
    hidden_heads = 100.0 * float(m.ind[..., m.elig].any(-1).float().mean())
    pos_map = torch.nanmean(pct, 0).numpy()
    top = int(positions[np.argmax(pos_map[m.elig])]) if len(positions) else -1
    return {
        "input_set": m.input_set,
        "n_sequences": n,
        "seq_len": T,
        "eps": cfg.eps,
        "bos_prepended": bool(bos),
        "first_token": decode(int(m.ids[0, 0])) if bos else "(varies)",
        "sink_1": sink_percent(m.alpha, cfg.eps, 0),
        "sink_1_sem": float(sem(pct[:, 0:1]).item()),
        "sink_1_of_mean_alpha": sink_percent_of_mean_alpha(m.alpha, cfg.eps, 0),
        "alpha0_mean": float(m.alpha[..., 0].mean()),
        "hidden_heads_pct": hidden_heads,
        "hidden_positions_listed": len(listed),
        "top_hidden_position": top,
        "top_hidden_position_pct": float(pos_map[top]) if top >= 0 else float("nan"),
        "top_hidden_token": (str(listed["token"].value_counts().index[0]) if len(listed) else ""),
    }


def hidden_tokens(
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


def norm_tables(input_set: str, norms: torch.Tensor, n_kv: int) -> tuple[pd.DataFrame, pd.DataFrame]:
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
