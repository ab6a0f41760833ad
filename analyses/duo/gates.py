"""What is done with trained gates: binarising them by share, the KV-cache ratio, agreement with the
retrieval score, and saving/loading them with the model and settings that trained them."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.manifest import to_jsonable
from probe import duo_cache
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.tempdirs import write_text_atomic

GATES_FORMAT = "headlab-duo-gates"
GATES_VERSION = 1
SHIPPED = "shipped"
"""``gates_from="shipped"``: the gates headlab ships for the model (:func:`shipped_path`)."""
AUTO = "auto"
"""``gates_from="auto"``: the shipped gates where the model has them, else train (the run says which)."""
DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "duo"


def shipped_path(model_name: str) -> Path:
    """Where the shipped gates of ``model_name`` live: ``data/duo/<model>.gates.json``."""
    return DATA_DIR / f"{model_name}.gates.json"


def has_shipped(model_name: str) -> bool:
    """Whether headlab ships trained gates for ``model_name``."""
    return shipped_path(model_name).is_file()


def resolve_gates_file(gates_from: str | Path, model_name: str) -> Path:
    """The file ``gates_from`` names: a path, or ``"shipped"`` for the model's shipped gates (refused,
    with the command that trains them, where none are shipped)."""
    if str(gates_from) != SHIPPED:
        return Path(gates_from).expanduser()
    path = shipped_path(model_name)
    if not path.is_file():
        have = sorted(p.name.removesuffix(".gates.json") for p in DATA_DIR.glob("*.gates.json"))
        raise ConfigError(
            f"no shipped DuoAttention gates for {model_name} (shipped for: {', '.join(have) or 'none'}); "
            f"train them: headlab train duo-gates --model {model_name}"
        )
    return path


def n_retrieval(share: float, n: int) -> int:
    """KV heads kept whole at ``share`` of ``n``: ``share · n`` rounded half up, at least 1, at most n."""
    if not 0.0 < float(share) < 1.0:
        raise ConfigError(f"share must be strictly between 0 and 1, got {share}")
    return min(n, max(1, math.floor(float(share) * n + 0.5)))


def ranking(values: np.ndarray) -> np.ndarray:
    """Flat indices of ``values`` from the highest to the lowest; NaN last; ties in flat (layer, kv_head)
    order, the earlier layer (then the lower KV head) first."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    key = np.where(np.isnan(flat), -np.inf, flat)
    return np.argsort(-key, kind="stable")


def top_mask(values: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of ``values``' shape with the ``k`` highest entries set (ties as :func:`ranking`)."""
    values = np.asarray(values)
    mask = np.zeros(values.size, dtype=bool)
    mask[ranking(values)[:k]] = True
    return mask.reshape(values.shape)


def binarise(gates: np.ndarray, share: float) -> np.ndarray:
    """Retrieval heads at ``share``: the top :func:`n_retrieval` KV heads by gate value (never a 0.5
    threshold), as a float mask ``[n_layers, n_kv_heads]`` of 1 (retrieval) and 0 (streaming)."""
    g = np.asarray(gates, dtype=np.float64)
    if g.ndim != 2:
        raise ConfigError(f"gates must be [n_layers, n_kv_heads], got shape {g.shape}")
    return top_mask(g, n_retrieval(share, g.size)).astype(np.float32)


def kv_ratio(share: float, length: int, sink: int, recent: int) -> float:
    """KV-cache size relative to the full cache at context ``length``: ``r + (1 - r) · min(1, (S + R) / N)``
    (:func:`probe.duo_cache.kv_ratio`)."""
    if length < 1:
        raise ConfigError(f"length must be a positive number of tokens, got {length}")
    return duo_cache.kv_ratio(float(share), sink, recent, int(length))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally shaped arrays over entries finite in both (NaN with
    fewer than 3 such entries or a constant one)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    return float(spearmanr(x[ok], y[ok]).statistic)


def agreement_table(gates: np.ndarray, scores: np.ndarray, shares: Sequence[float]) -> pd.DataFrame:
    """Per share: the top-k KV heads by gate against the top-k by retrieval score.

    Columns: share, k, overlap (heads in both), overlap_share (overlap / k), chance (k² / n, the
    expected overlap of two random k-sets), jaccard, spearman (over all KV heads, the same on every row).
    """
    g, s = np.asarray(gates, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if g.shape != s.shape:
        raise ConfigError(f"gates {g.shape} and scores {s.shape} must have one shape [n_layers, n_kv_heads]")
    rho, n = spearman(g, s), g.size
    rows = []
    for share in shares:
        k = n_retrieval(share, n)
        both = int((top_mask(g, k) & top_mask(s, k)).sum())
        rows.append(
            {
                "share": float(share),
                "k": k,
                "overlap": both,
                "overlap_share": both / k,
                "chance": k * k / n,
                "jaccard": both / (2 * k - both),
                "spearman": rho,
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ files


def save_gates(
    path: str | Path,
    gates: np.ndarray,
    model: LoadedModel | Mapping[str, Any],
    config: Any,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``gates`` ``[n_layers, n_kv_heads]`` as JSON, with the model's name and weight hash and the
    settings that trained them. Returns the path."""
    info = model.describe() if isinstance(model, LoadedModel) else dict(model)
    g = np.asarray(gates, dtype=np.float64)
    payload = {
        "format": GATES_FORMAT,
        "version": GATES_VERSION,
        "model": info.get("name"),
        "weight_sha256": info.get("weight_sha256"),
        "shape": list(g.shape),
        "gates": [[round(float(v), 7) for v in row] for row in g],
        "config": to_jsonable(config),
        **(dict(extra) if extra else {}),
    }
    return write_text_atomic(Path(path), json.dumps(payload, indent=1) + "\n")


def loss_from_record(record: Mapping[str, Any]) -> pd.DataFrame:
    """The per-step loss table of a gates file written by ``headlab train duo-gates`` (its ``loss``
    record: step, length, distill, reg); empty for a file without one. ``gate_mean`` was not recorded."""
    columns = ["step", "length", "distill", "reg", "loss", "gate_mean"]
    rec = record.get("loss")
    if not isinstance(rec, Mapping) or not rec.get("step"):
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame({k: rec[k] for k in ("step", "length", "distill", "reg")})
    frame["loss"] = frame["distill"] + frame["reg"]
    frame["gate_mean"] = np.nan
    return frame[columns]


def load_gates(path: str | Path, model: LoadedModel) -> tuple[np.ndarray, dict[str, Any]]:
    """Gates ``[n_layers, n_kv_heads]`` from a file of :func:`save_gates` and the file's record; a file
    for another model (name, weights or shape) is refused."""
    src = resolve_gates_file(path, model.name)
    try:
        payload = json.loads(src.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"gates_from={str(src)!r}: no such file; give a file written by save_gates"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"gates_from={str(src)!r} is not a JSON gates file written by save_gates") from None
    if not isinstance(payload, dict) or payload.get("format") != GATES_FORMAT:
        raise ConfigError(f"{src} is not a headlab DuoAttention gates file (format {GATES_FORMAT!r})")
    want = [model.n_layers, model.n_kv_heads]
    if payload.get("model") != model.name:
        raise ConfigError(
            f"{src} holds gates trained on {payload.get('model')!r}, not {model.name!r}; train gates for it"
        )
    sha = payload.get("weight_sha256")
    if sha and model.weight_sha256 and sha != model.weight_sha256:
        raise ConfigError(
            f"{src} was trained on other weights of {model.name} (sha256 {sha[:12]}); train gates again"
        )
    g = np.asarray(payload.get("gates"), dtype=np.float64)
    if list(g.shape) != want or payload.get("shape") != want:
        raise ConfigError(
            f"{src} holds gates of shape {list(g.shape)}; {model.name} needs [n_layers, n_kv_heads] = {want}"
        )
    if not np.isfinite(g).all() or g.min() < 0 or g.max() > 1:
        raise ConfigError(f"{src} holds gates outside [0, 1]; it is not a trained gates file")
    return g, payload
