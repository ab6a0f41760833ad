"""The tasks of the vit-heads analysis: frozen linear probes on the image embedding.

See docs/analyses/vit-heads.md (tasks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.vit_heads.config import VitHeadsConfig
from analyses.vit_heads.data import ProbeSet, rows_and_labels
from probe.errors import ConfigError


@dataclass
class LinearProbe:
    """A frozen linear probe on image embeddings, in torch so that gradients flow through it.

    Features are the unit-normalised embedding standardised with the train split's ``mean`` and
    ``scale``; ``logits = features @ weight.T + bias`` over ``classes`` (a binary scikit-learn model
    becomes two classes with logits ``0`` and ``z``: the same probabilities).
    """

    task: str
    classes: tuple[str, ...]
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]

    @classmethod
    def fit(
        cls,
        task: str,
        embeddings: np.ndarray | torch.Tensor,
        labels: Sequence[str],
        *,
        c: float = 1.0,
        seed: int = 0,
    ) -> LinearProbe:
        """Fit scikit-learn's ``LogisticRegression`` (L2, ``C=c``, lbfgs) on ``embeddings [n, D]``."""
        from sklearn.linear_model import LogisticRegression

        x = unit(np.asarray(embeddings, dtype=np.float64))
        y = np.asarray([str(v) for v in labels])
        classes = tuple(sorted(set(y.tolist())))
        if len(classes) < 2:
            raise ConfigError(f"task {task!r}: the train split has a single class {classes}; use more images")
        mean = x.mean(axis=0)
        scale = np.maximum(x.std(axis=0), 1e-6)
        model = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit((x - mean) / scale, y)
        coef, intercept = np.asarray(model.coef_), np.asarray(model.intercept_)
        if len(classes) == 2:  # sklearn keeps one row for the second class
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros_like(intercept), intercept])
        assert tuple(str(k) for k in model.classes_) == classes
        return cls(task, classes, mean, scale, coef, intercept)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[n, C]`` logits; differentiable in ``embeddings [n, D]``."""
        emb = embeddings.double()
        x = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        mean = torch.as_tensor(self.mean, device=emb.device)
        scale = torch.as_tensor(self.scale, device=emb.device)
        w = torch.as_tensor(self.weight, device=emb.device)
        b = torch.as_tensor(self.bias, device=emb.device)
        return ((x - mean) / scale) @ w.T + b

    def proba(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[n, C]`` class probabilities."""
        with torch.no_grad():
            return torch.softmax(self.logits(torch.as_tensor(np.asarray(embeddings))), dim=-1).numpy()

    def label_index(self, labels: Sequence[Any]) -> np.ndarray:
        """Class index of each label; -1 for a label the probe never saw (always counted wrong)."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.asarray([lookup.get(str(v), -1) for v in labels], dtype=np.int64)

    def scores(
        self, embeddings: np.ndarray | torch.Tensor, labels: Sequence[Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per image: (correct 0/1, probability of the true class); an unseen label is wrong, 0."""
        p = self.proba(embeddings)
        y = self.label_index(labels)
        known = y >= 0
        correct = np.zeros(len(y))
        correct[known] = p[known].argmax(axis=1) == y[known]
        conf = np.zeros(len(y))
        conf[known] = p[known, y[known]]
        return correct, conf

    def score(self, embeddings: np.ndarray | torch.Tensor, labels: Sequence[Any]) -> tuple[float, float]:
        """(accuracy, mean probability of the true class) on ``embeddings`` with ``labels``."""
        correct, conf = self.scores(embeddings, labels)
        return float(correct.mean()), float(conf.mean())


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit norm."""
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12))


def fit_probes(
    cfg: VitHeadsConfig, data: ProbeSet, emb: np.ndarray
) -> tuple[dict[str, LinearProbe], pd.DataFrame]:
    """One probe per task on the train split's embeddings ``emb [n, D]``, scored on the test split:
    ``(probes, the probes table)``; a task whose train split has a single class is skipped."""
    probes: dict[str, LinearProbe] = {}
    probe_rows: list[dict[str, Any]] = []
    train_rows = data.rows("train")
    test_rows = data.rows("test")
    for task in cfg.tasks:
        tr, ytr = rows_and_labels(data.labels[task][train_rows])
        te, yte = rows_and_labels(data.labels[task][test_rows])
        row: dict[str, Any] = {
            "task": task,
            "source": "faces" if task == "face" else "scenes",
            "n_train": len(tr),
            "n_test": len(te),
        }
        counts = pd.Series(yte).value_counts() if yte else pd.Series(dtype=float)
        row["chance"] = float(counts.iloc[0] / len(yte)) if yte else math.nan
        try:
            probe = LinearProbe.fit(task, emb[train_rows[tr]], ytr, c=cfg.probe_c, seed=cfg.seed)
        except ConfigError as err:
            probe_rows.append(
                {
                    **row,
                    "classes": "",
                    "train_accuracy": math.nan,
                    "test_accuracy": math.nan,
                    "test_confidence": math.nan,
                    "status": f"skipped: {err}",
                }
            )
            continue
        probes[task] = probe
        train_acc, _ = probe.score(emb[train_rows[tr]], ytr)
        test_acc, test_conf = probe.score(emb[test_rows[te]], yte) if len(te) else (math.nan, math.nan)
        probe_rows.append(
            {
                **row,
                "classes": " ".join(probe.classes),
                "train_accuracy": train_acc,
                "test_accuracy": test_acc,
                "test_confidence": test_conf,
                "status": "ok",
            }
        )
    probes_frame = pd.DataFrame(probe_rows)
    if not probes:
        raise ConfigError(
            "no probe could be trained (each task's train split has a single class); raise n_scenes / n_faces"
        )
    return probes, probes_frame
