"""Circuit reuse: the overlap of the two tasks' top heads per stage, the rank correlation of their
scores, and the intervention that puts the IOI inhibition heads' END attention on the wrong colours
of a Colored Objects scene."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.circuits.classes import Discovery, stand_ins
from analyses.circuits.config import STAGES, Stage
from analyses.circuits.data import PromptSet
from analyses.circuits.forward import Runner, chunk_slices, repeat_rows
from probe.heads import by_layer
from probe.hooks import HookFn, attn_hook
from probe.types import Head


def intervention_heads(found: Discovery) -> tuple[list[Head], str]:
    """IOI's S-inhibition heads and negative movers; stand-ins when IOI found none."""
    heads = sorted({*found.classes.get("s_inhibition", []), *found.classes.get("negative_mover", [])})
    if heads:
        return heads, "IOI s_inhibition and negative_mover heads"
    return stand_ins(found.scores["mover_queries"]), (
        "IOI found no s_inhibition or negative_mover head: its 3 strongest mover_queries heads stand in"
    )


def wrong_options_edit(group: PromptSet, copies: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pattern edit: END's row puts all its attention on the wrong candidates' positions, equally."""
    end = repeat_rows(group.roles["end"], copies)
    wrong = repeat_rows(group.wrong_positions, copies)

    def edit(pattern: torch.Tensor) -> torch.Tensor:  # [B, T_q, T_k]
        out = pattern.clone()
        rows = torch.arange(out.shape[0], device=out.device)
        e = end.to(out.device)
        new = torch.zeros(out.shape[0], out.shape[-1], dtype=out.dtype, device=out.device)
        new.scatter_(1, wrong.to(out.device), 1.0 / wrong.shape[1])
        out[rows, e] = new
        return out

    return edit


def intervene(
    runner: Runner,
    groups: Sequence[PromptSet],
    head_sets: Sequence[Sequence[Head]],
    *,
    batch_size: int = 128,
) -> list[dict[str, np.ndarray]]:
    """Per head set: per-item logit difference, candidate-correct and vocabulary-correct, with the
    set's END attention moved onto the wrong options (an empty set is the unedited model)."""
    model = runner.model
    results = []
    for heads in head_sets:
        ld, cand, vocab, items = [], [], [], []
        grouped = by_layer(model, heads)
        for group in groups:
            for rows in chunk_slices(len(group), batch_size):
                sub = group.subset(rows)
                edit = wrong_options_edit(sub, 1)

                def make(idx: list[int], edit: Callable[[torch.Tensor], torch.Tensor] = edit) -> HookFn:
                    def hook(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
                        out = pattern.clone()
                        for i in idx:
                            out[:, i] = edit(pattern[:, i])
                        return out

                    return hook

                points = [(attn_hook(layer, "pattern"), make(idx)) for layer, idx in grouped.items()]
                final = runner.run(sub.clean, points, end=sub.roles["end"])
                assert final is not None
                read = runner.readout(final, sub, 1, top=True)
                ld.append(read.logit_diff)
                cand.append(read.candidate_logits.argmax(-1) == sub.answer_index)
                assert read.top_token is not None
                vocab.append(read.top_token == sub.right)
                items.append(sub.items)
        results.append(
            {
                "logit_diff": torch.cat(ld).double().numpy(),
                "candidate_correct": torch.cat(cand).numpy(),
                "vocab_correct": torch.cat(vocab).numpy(),
                "items": np.concatenate(items),
            }
        )
    return results


def top_heads(scores: np.ndarray, percent: float) -> set[Head]:
    """The top ``percent``% of heads by ``|score|`` (at least one)."""
    k = max(1, round(scores.size * percent / 100.0))
    order = [i for i in np.argsort(-np.abs(scores), axis=None, kind="stable") if np.isfinite(scores.flat[i])]
    return {(int(i // scores.shape[1]), int(i % scores.shape[1])) for i in order[:k]}


def overlap_curve(
    a: Mapping[Stage, np.ndarray], b: Mapping[Stage, np.ndarray], percents: Sequence[float]
) -> pd.DataFrame:
    """Per stage and pooled over stages: how many of ``a``'s top-p% heads are ``b``'s top-p% too."""
    rows: list[dict[str, Any]] = []
    for p in percents:
        pooled_hit = pooled_n = 0
        union_a: set[tuple[str, Head]] = set()
        union_b: set[tuple[str, Head]] = set()
        for stage in STAGES:
            if stage not in a or stage not in b:
                continue
            ta, tb = top_heads(a[stage], p), top_heads(b[stage], p)
            hit = len(ta & tb)
            pooled_hit += hit
            pooled_n += len(ta)
            union_a |= {(stage, h) for h in ta}
            union_b |= {(stage, h) for h in tb}
            rows.append(
                {
                    "stage": stage,
                    "percent": p,
                    "k": len(ta),
                    "shared": hit,
                    "overlap": hit / len(ta),
                    "jaccard": hit / len(ta | tb),
                }
            )
        rows.append(
            {
                "stage": "all",
                "percent": p,
                "k": pooled_n,
                "shared": pooled_hit,
                "overlap": pooled_hit / max(pooled_n, 1),
                "jaccard": pooled_hit / max(len(union_a | union_b), 1),
            }
        )
    return pd.DataFrame(rows, columns=["stage", "percent", "k", "shared", "overlap", "jaccard"])


def rank_correlations(a: Mapping[Stage, np.ndarray], b: Mapping[Stage, np.ndarray]) -> pd.DataFrame:
    from scipy.stats import spearmanr

    rows = []
    for stage in STAGES:
        if stage in a and stage in b:
            x, y = a[stage].ravel(), b[stage].ravel()
            both = np.isfinite(x) & np.isfinite(y)  # heads screened out on either task are left out
            x, y = x[both], y[both]
            if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
                rho, p = math.nan, math.nan
            else:
                res = spearmanr(x, y)
                rho, p = float(res.statistic), float(res.pvalue)
            rows.append({"stage": stage, "spearman": rho, "p_value": p, "n_heads": x.size})
    return pd.DataFrame(rows, columns=["stage", "spearman", "p_value", "n_heads"])
