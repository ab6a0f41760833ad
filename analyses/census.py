"""Head census: what every attention head does, in six numbers.

One pass of in-hook reducers over natural text (entropy, first-token mass ``alpha_0``,
previous-token score, mean attention distance) and over a random block repeated twice (induction
and duplicate-token scores); every score is averaged per sample, then over samples, and a few
samples keep their full patterns for display.

>>> result = run_census(model, CensusConfig(n_natural=16))
>>> result.heads.sort_values("induction").tail()

See docs/analyses/census.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
import torch

from analyses.base import AnalysisResult, heads_frame
from analyses.registry import Analysis, register
from analyses.roles import Role
from analyses.tasks.text import natural_token_rows
from probe.capture import capture
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.reducers import ColumnImportance, DiagonalScore, KeepPatterns, MeanDistance, RowEntropy

EXAMPLE_TOKENS = 256  # the example patterns kept for display: their first positions (BOS included)

METRICS = ("entropy", "alpha_0", "prev_token", "mean_distance", "induction", "duplicate_token")
METRIC_LABELS = {
    "entropy": "attention entropy (nats)",
    "alpha_0": "first-token mass alpha_0",
    "prev_token": "previous-token score",
    "mean_distance": "mean attention distance (tokens)",
    "induction": "induction score",
    "duplicate_token": "duplicate-token score",
}


@dataclass
class CensusConfig:
    n_natural: int = 32
    seq_len: int = 128
    n_repeated: int = 16
    repeat_len: int = 32
    batch_size: int = 8
    mode: Literal["eager", "recompute"] = "eager"
    query_block: int = 512
    n_examples: int = 2
    seed: int = 0

    def validate(self) -> None:
        for name in ("n_natural", "n_repeated", "batch_size", "query_block"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.seq_len < 4:
            raise ConfigError(f"seq_len must be >= 4 (got {self.seq_len})")
        if self.repeat_len < 2:
            raise ConfigError(f"repeat_len must be >= 2 (got {self.repeat_len})")
        if not 0 <= self.n_examples <= self.n_natural:
            raise ConfigError(
                f"n_examples must be between 0 and n_natural ({self.n_natural}), got {self.n_examples}; "
                f"use --set n_examples={min(max(self.n_examples, 0), self.n_natural)} or raise n_natural"
            )


def repeated_random_rows(model: LoadedModel, n: int, repeat_len: int, seed: int) -> list[list[int]]:
    """``n`` sequences ``r + r`` with ``r`` uniform over the non-special vocabulary (no BOS)."""
    vocab = len(model.tokenizer)
    special = set(model.tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        block = allowed[torch.randint(len(allowed), (repeat_len,), generator=gen)].tolist()
        rows.append(block + block)
    return rows


def run_census(
    model: LoadedModel, config: CensusConfig | None = None, *, progress: bool = True
) -> AnalysisResult:
    cfg = config or CensusConfig()
    cfg.validate()
    bos = int(model.bos.prepend)
    model.check_context(max(cfg.seq_len, 2 * cfg.repeat_len) + bos)
    t0 = time.perf_counter()
    natural = natural_token_rows(model.tokenizer, cfg.n_natural, cfg.seq_len, cfg.seed)
    repeated = repeated_random_rows(model, cfg.n_repeated, cfg.repeat_len, cfg.seed)
    t_data = time.perf_counter() - t0

    entropy, distance, prev, alpha = (
        RowEntropy(),
        MeanDistance(),
        DiagonalScore(1, name="prev_token"),
        ColumnImportance(),
    )
    reducers_nat = [entropy, distance, prev, alpha]
    n_kept_rep = min(cfg.n_examples, cfg.n_repeated)
    stats_nat = capture(
        model,
        natural,
        reducers_nat,
        mode=cfg.mode,
        batch_size=cfg.batch_size,
        query_block=cfg.query_block,
        progress=progress,
        desc="census: natural text",
    )
    first, n = bos, cfg.repeat_len  # real position where the first copy starts, block length
    induction = DiagonalScore(n - 1, query_from=first + n, query_to=first + 2 * n, name="induction")
    duplicate = DiagonalScore(n, query_from=first + n, query_to=first + 2 * n, name="duplicate_token")
    stats_rep = capture(
        model,
        repeated,
        [induction, duplicate],
        mode=cfg.mode,
        batch_size=cfg.batch_size,
        query_block=cfg.query_block,
        progress=progress,
        desc="census: repeated tokens",
    )

    per_sample = {
        "entropy": entropy.result(),
        "alpha_0": alpha.result()[..., 0],
        "prev_token": prev.result(),
        "mean_distance": distance.result(),
        "induction": induction.result(),
        "duplicate_token": duplicate.result(),
    }
    means = {k: torch.nanmean(v, dim=0).numpy() for k, v in per_sample.items()}
    sems = {
        f"{k}_sem": (v.std(dim=0, unbiased=True) / np.sqrt(v.shape[0])).nan_to_num(0.0).numpy()
        for k, v in per_sample.items()
    }
    heads = heads_frame(model, {**means, **sems})
    long_rows = []
    for metric, values in per_sample.items():
        arr = values.numpy()
        s, L, H = np.meshgrid(
            np.arange(arr.shape[0]), np.arange(arr.shape[1]), np.arange(arr.shape[2]), indexing="ij"
        )
        long_rows.append(
            pd.DataFrame(
                {
                    "input_set": "repeated" if metric in ("induction", "duplicate_token") else "natural",
                    "sample": s.ravel(),
                    "layer": L.ravel(),
                    "head": H.ravel(),
                    "metric": metric,
                    "value": arr.ravel(),
                }
            )
        )
    per_sample_frame = pd.concat(long_rows, ignore_index=True)

    arrays: dict[str, np.ndarray] = {}
    tables: dict[str, pd.DataFrame] = {"heads": heads, "per_sample": per_sample_frame}
    for key, rows, n in (("example", natural, cfg.n_examples), ("repeated", repeated, n_kept_rep)):
        if n:
            shown = [list(r[: EXAMPLE_TOKENS - bos]) for r in rows[:n]]
            arrays[f"{key}_patterns"] = _example_patterns(model, shown).numpy().astype(np.float16)
            tables["examples" if key == "example" else "repeated_examples"] = _example_tokens(model, shown)
    alpha_mean = torch.nanmean(alpha.result(), dim=0)  # [L, H, T]
    arrays["alpha_natural"] = alpha_mean.numpy().astype(np.float32)
    return AnalysisResult(
        analysis="census",
        model_info=model.describe(),
        config=replace(cfg),
        tables=tables,
        arrays=arrays,
        seeds={"natural": cfg.seed, "repeated": cfg.seed},
        timings={
            "data": round(t_data, 3),
            "capture_natural": round(stats_nat.seconds, 3),
            "capture_repeated": round(stats_rep.seconds, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
        notes={"metrics": METRIC_LABELS, "bos_prepended": bool(bos)},
    )


def _example_patterns(model: LoadedModel, rows: list[list[int]]) -> torch.Tensor:
    """The full patterns ``[n, L, H, T, T]`` of a few short rows, from an eager capture of their own.

    The statistics' captures then keep only reducers that work from moments (the fast path at long
    context), and no ``T × T`` pattern of a long row is ever kept: a causal model's pattern over the
    first positions of a row does not depend on the tokens after them.
    """
    keep = KeepPatterns(n_samples=len(rows), max_tokens=EXAMPLE_TOKENS)
    capture(model, rows, [keep], mode="eager", batch_size=len(rows), progress=False)
    return keep.result()


def _example_tokens(model: LoadedModel, rows: list[list[int]]) -> pd.DataFrame:
    out = []
    prefix = [model.bos.token_id] if model.bos.prepend and model.bos.token_id is not None else []
    for i, row in enumerate(rows):
        ids = prefix + list(row)
        for pos, tid in enumerate(ids):
            out.append(
                {"example": i, "position": pos, "token_id": int(tid), "token": model.tokenizer.decode([tid])}
            )
    return pd.DataFrame(out)


def summary(result: AnalysisResult) -> str:
    """A few lines for the CLI: each metric's mean over heads and its three strongest heads."""
    heads = result.heads
    lines = [f"census of {result.model_info['name']}: {len(heads)} heads"]
    for metric in METRICS:
        top = heads.nlargest(3, metric)
        best = ", ".join(f"L{r.layer}H{r.head} {getattr(r, metric):.2f}" for r in top.itertuples())
        lines.append(f"  {metric:<16} mean {heads[metric].mean():.3f}; top: {best}")
    return "\n".join(lines)


ANALYSIS = register(
    Analysis(
        name="census",
        config_cls=CensusConfig,
        run=run_census,
        summary=summary,
        help="Head census: entropy, first-token mass, previous-token, induction, duplicate-token, distance.",
        page="dashboard.census.page:CensusPage",
        report="dashboard.census.report:report_sections",
        docs="docs/analyses/census.md",
        atlas_metrics=("entropy", "alpha_0", "prev_token", "induction", "duplicate_token", "mean_distance"),
        roles=(
            Role(
                "previous_token",
                "previous-token head",
                "prev_token",
                "above",
                0.4,
                "Wang et al. 2023, Interpretability in the wild (IOI)",
            ),
            Role(
                "induction",
                "induction head",
                "induction",
                "above",
                0.4,
                "Olsson et al. 2022, In-context learning and induction heads",
            ),
            Role(
                "duplicate_token",
                "duplicate-token head",
                "duplicate_token",
                "above",
                0.4,
                "Wang et al. 2023, Interpretability in the wild (IOI)",
            ),
        ),
        demo={},
    )
)
