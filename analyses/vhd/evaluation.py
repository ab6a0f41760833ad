"""The tables of a VHD / VHR run: teacher-forced VHD of the baseline captions, T-VHD token by token,
the heads, CHAIR and POPE summaries per setting and the paired changes against the baseline.

See docs/analyses/vhd.md ("Outputs").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.base import heads_frame
from analyses.tasks import scene_captions as scc
from analyses.tasks import scenes as sc
from analyses.vhd.captions import Answers
from analyses.vhd.config import BASELINE, VhdConfig, parse_layers
from analyses.vhd.divergence import TOKEN_COLUMNS, step_vhd, t_vhd, token_table
from analyses.vhd.forward import make_rows, spans
from analyses.vhd.reinforcement import Selection
from probe.loading import LoadedModel


def vhd_pass(
    model: LoadedModel, cfg: VhdConfig, images: np.ndarray, answers: list[Answers], bar: Any
) -> tuple[np.ndarray, np.ndarray, float]:
    """Teacher-forced VHD of the baseline captions; also how often the forced argmax reproduces them."""
    n = len(images)
    longest = max((len(t) for a in answers for t in a.tokens), default=0)
    vhd = np.full((n, max(1, longest), model.n_layers, model.n_heads), np.nan, dtype=np.float32)
    norm = np.full_like(vhd, np.nan)
    agree, total = 0, 0
    for (start, stop), batch in zip(spans(len(images), cfg.batch_size), answers, strict=True):
        steps = max((len(t) for t in batch.tokens), default=0)
        if steps == 0:
            bar.update(stop - start)
            continue
        pixels = model.preprocess(images[start:stop])
        rows = make_rows(model, [cfg.prompt] * (stop - start), pixels, batch.tokens)
        v, nt, logits = step_vhd(model, rows, steps)
        forced = logits.argmax(-1)
        for r, tokens in enumerate(batch.tokens):
            k = len(tokens)
            vhd[start + r, :k] = v[r, :k].numpy()
            norm[start + r, :k] = nt[r, :k].numpy()
            agree += int((forced[r, :k] == torch.tensor(tokens)).sum())
            total += k
        bar.update(stop - start)
    return vhd, norm, agree / max(1, total)


def paired_deltas(captions: pd.DataFrame, pope: pd.DataFrame, n_scenes: int, cfg: VhdConfig) -> pd.DataFrame:
    """Change of each setting against the baseline, scenes resampled together (paired bootstrap)."""
    rng = np.random.default_rng([0xDE17, cfg.seed, n_scenes])
    idx = rng.integers(0, n_scenes, size=(cfg.n_boot, n_scenes))
    base = captions[captions["setting"] == BASELINE].sort_values("scene")
    rows = []

    everyone = np.arange(n_scenes)[None]  # the point estimate: one "resample" holding every scene

    def chair(frame: pd.DataFrame, pick: np.ndarray) -> dict[str, np.ndarray]:
        s, h, m, c, p = (
            frame[k].to_numpy(float)[pick]
            for k in ("chair_s", "n_hallucinated", "n_mentioned", "n_correct", "n_present")
        )
        return {
            "CHAIR_S": s.mean(1),
            "CHAIR_I": scc._ratio(h.sum(1), m.sum(1)),
            "recall": scc._ratio(c.sum(1), p.sum(1)),
        }

    def pope_counts(frame: pd.DataFrame) -> np.ndarray:
        """[n_scenes, 4]: tp, fp, tn, fn per scene."""
        out = np.zeros((n_scenes, 4))
        said_yes = frame["yes"].to_numpy(bool)
        label = frame["label"].to_numpy(bool)
        scene = frame["scene"].to_numpy(int)
        for j, hit in enumerate([said_yes & label, said_yes & ~label, ~said_yes & ~label, ~said_yes & label]):
            np.add.at(out[:, j], scene, hit.astype(float))
        return out

    def pope_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
        return scc._pope_metrics(*(counts[..., j] for j in range(4)))

    base_chair, base_boot = chair(base, everyone), chair(base, idx)
    for setting in captions["setting"].unique():
        if setting == BASELINE:
            continue
        other = captions[captions["setting"] == setting].sort_values("scene")
        point, boot = chair(other, everyone), chair(other, idx)
        for metric in point:
            diff = boot[metric] - base_boot[metric]
            lo, hi = scc._interval(diff, cfg.alpha_ci)
            rows.append(
                {
                    "setting": setting,
                    "benchmark": "CHAIR",
                    "kind": "captions",
                    "metric": metric,
                    "delta": float(point[metric][0] - base_chair[metric][0]),
                    "lo": lo,
                    "hi": hi,
                }
            )
    if len(pope):
        for kind in pope["kind"].unique():
            b_counts = pope_counts(pope[(pope["setting"] == BASELINE) & (pope["kind"] == kind)])
            b_point, b_boot = pope_metrics(b_counts.sum(0)), pope_metrics(b_counts[idx].sum(1))
            for setting in pope["setting"].unique():
                if setting == BASELINE:
                    continue
                counts = pope_counts(pope[(pope["setting"] == setting) & (pope["kind"] == kind)])
                point, boot = pope_metrics(counts.sum(0)), pope_metrics(counts[idx].sum(1))
                for metric in point:
                    lo, hi = scc._interval(boot[metric] - b_boot[metric], cfg.alpha_ci)
                    rows.append(
                        {
                            "setting": setting,
                            "benchmark": "POPE",
                            "kind": str(kind),
                            "metric": metric,
                            "delta": float(point[metric] - b_point[metric]),
                            "lo": lo,
                            "hi": hi,
                        }
                    )
    return pd.DataFrame(rows, columns=["setting", "benchmark", "kind", "metric", "delta", "lo", "hi"])


def token_tables(
    model: LoadedModel, scenes: Sequence[sc.Scene], answers: list[Answers], vhd: np.ndarray, top_k: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``tokens``: the baseline captions token by token with T-VHD; ``words``: their object words."""
    tv = t_vhd(vhd, top_k)
    token_frames = [
        token_table(model, scenes[i], t, tv[i], i)
        for i, t in enumerate(t for a in answers for t in a.tokens)
        if t
    ]
    tokens = (
        pd.concat(token_frames, ignore_index=True) if token_frames else pd.DataFrame(columns=TOKEN_COLUMNS)
    )
    # (filtering an empty object-typed frame would drop its columns)
    words = tokens[tokens["object"]].reset_index(drop=True) if len(tokens) else tokens
    return tokens, words


def summary_table(captions: pd.DataFrame, pope: pd.DataFrame, cfg: VhdConfig) -> pd.DataFrame:
    """CHAIR and POPE per VHR setting (``vhr_setting``) with percentile bootstrap intervals."""
    summaries = []
    for name, frame in captions.groupby("setting", sort=False):
        part = scc.chair_summary(
            frame.drop(columns="setting"), n_boot=cfg.n_boot, seed=cfg.seed, alpha=cfg.alpha_ci
        )
        part.insert(0, "vhr_setting", name)
        summaries.append(part)
    if len(pope):
        for name, frame in pope.groupby("setting", sort=False):
            part = scc.pope_summary(
                frame.drop(columns="setting"), n_boot=cfg.n_boot, seed=cfg.seed, alpha=cfg.alpha_ci
            )
            part.insert(0, "vhr_setting", name)
            summaries.append(part)
    return pd.concat(summaries, ignore_index=True)


def heads_table(
    model: LoadedModel, cfg: VhdConfig, vhd: np.ndarray, norm: np.ndarray, selection_main: list[Selection]
) -> pd.DataFrame:
    """Per head: mean and first-step VHD, first-step text-only norm, and how often the main VHR
    setting selected the head or set it aside (when it ran)."""
    with warnings.catch_warnings():  # heads never seen (no tokens): NaN, not "Mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        columns = {
            "vhd_mean": np.nanmean(vhd, axis=(0, 1)),
            "vhd_first": np.nanmean(vhd[:, 0], axis=0),
            "text_norm_first": np.nanmean(norm[:, 0], axis=0),
        }
    if selection_main:
        columns["selected_share"] = torch.cat([s.selected for s in selection_main]).float().mean(0).numpy()
        columns["outlier_share"] = torch.cat([s.outlier for s in selection_main]).float().mean(0).numpy()
        main_layers = parse_layers(cfg.settings[0].layers, model.n_layers)
        columns["in_vhr_layers"] = np.isin(np.arange(model.n_layers), main_layers)[:, None].repeat(
            model.n_heads, 1
        )
    return heads_frame(model, columns)


def scene_table(scenes: Sequence[sc.Scene]) -> pd.DataFrame:
    """The evaluated scenes: stream seed and index, classes and ground-truth caption."""
    return pd.DataFrame(
        [
            {
                "scene": i,
                "seed": s.seed,
                "index": s.index,
                "classes": ",".join(s.classes),
                "caption_truth": s.caption(),
            }
            for i, s in enumerate(scenes)
        ]
    )
