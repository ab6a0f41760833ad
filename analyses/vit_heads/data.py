"""The images of the vit-heads analysis: the probe set (synthetic scenes and LFW crops with their
labels and a seeded train/test split), the eval rows, and the attention images added to them.
See docs/analyses/vit-heads.md (the image sets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analyses.tasks import images as image_set
from analyses.tasks import scenes
from analyses.vit_heads.config import VitHeadsConfig
from probe.errors import ConfigError
from probe.loading import LoadedModel


def patch_grid(model: LoadedModel) -> tuple[int, int]:
    """(rows, cols) of the model's patch grid."""
    rows, cols = model.extra["grid"]
    return int(rows), int(cols)


def rows_and_labels(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The rows that have a label (not None) and those labels as strings."""
    rows = np.asarray([i for i, v in enumerate(labels) if v is not None], dtype=np.int64)
    return rows, [str(labels[i]) for i in rows]


@dataclass
class ProbeSet:
    """The probe images: names, source (``scenes``/``faces``), split, uint8 pixels, labels per task."""

    names: list[str]
    source: np.ndarray
    split: np.ndarray
    pixels: list[np.ndarray]
    labels: dict[str, np.ndarray]

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def _scene_label(task: str, scene: scenes.Scene) -> str:
    if task.startswith("has_"):
        return "present" if scene.count(task[4:]) else "absent"
    if task == "colour":
        return scene.dominant_colour
    if task == "side":
        return max(scene.objects, key=lambda o: o.area).side
    if task == "multiple":
        return "several" if scene.n_objects > 1 else "one"
    raise ConfigError(f"unknown scene task {task!r}")


def build_probe_set(cfg: VitHeadsConfig) -> ProbeSet:
    """Scenes and LFW crops with their labels and a seeded train/test split (stratified for faces)."""
    rng = np.random.default_rng(cfg.seed)
    names: list[str] = []
    source: list[str] = []
    split: list[str] = []
    pixels: list[np.ndarray] = []
    scene_tasks = cfg.scene_tasks()
    labels: dict[str, list[Any]] = {t: [] for t in cfg.tasks}
    if scene_tasks:
        scene_cfg = scenes.SceneConfig(
            shapes=tuple(cfg.scene_shapes),
            colours=tuple(cfg.scene_colours),
            min_classes=1,
            max_classes=2,
            p_single=0.7,
            max_count=2,
            max_objects=3,
        )
        batch = scenes.make_scenes(cfg.n_scenes, seed=cfg.seed, config=scene_cfg)
        n_test = max(1, round(cfg.test_fraction * len(batch)))
        test = set(rng.permutation(len(batch))[:n_test].tolist())
        for i, scene in enumerate(batch):
            names.append(f"scene_{i:04d}")
            source.append("scenes")
            split.append("test" if i in test else "train")
            pixels.append(scene.render())
            for t in cfg.tasks:
                labels[t].append(_scene_label(t, scene) if t in scene_tasks else None)
    if "face" in cfg.tasks:
        half = cfg.n_faces // 2
        faces = sorted(rng.choice(image_set.LFW_FACES, size=half, replace=False).tolist())
        others = sorted(rng.choice(image_set.LFW_NON_FACES, size=half, replace=False).tolist())
        n_test = max(1, round(cfg.test_fraction * half))
        for kind, picked in (("face", faces), ("non_face", others)):
            test = set(rng.permutation(len(picked))[:n_test].tolist())
            for j, index in enumerate(picked):
                record = image_set.load_image(f"lfw_{kind}_{index:03d}")
                names.append(record.name)
                source.append("faces")
                split.append("test" if j in test else "train")
                pixels.append(record.pixels)
                for t in cfg.tasks:
                    labels[t].append(("face" if record.has_face else "non_face") if t == "face" else None)
    as_obj = {t: np.asarray(v, dtype=object) for t, v in labels.items()}
    return ProbeSet(names, np.asarray(source), np.asarray(split), pixels, as_obj)


def eval_rows(data: ProbeSet, n_eval: int) -> np.ndarray:
    test = data.rows("test")
    if n_eval == 0:
        return test
    keep = []
    for src in ("scenes", "faces"):
        rows = test[data.source[test] == src]
        if src == "faces" and len(rows) > n_eval:  # keep faces and non-faces balanced
            names = np.asarray(data.names)[rows]
            face = rows[np.char.startswith(names.astype(str), "lfw_face_")]
            other = rows[~np.char.startswith(names.astype(str), "lfw_face_")]
            rows = np.concatenate([face[: (n_eval + 1) // 2], other[: n_eval // 2]])
        keep.append(rows[:n_eval])
    return np.sort(np.concatenate(keep))


@dataclass
class ImageSet:
    """Every image of a run: the probe set, then the attention images (unless they are probe
    images), preprocessed for the model, with the seeded query patches of the pattern maps."""

    data: ProbeSet
    extra_names: list[str]
    att_rows: np.ndarray
    pixels: torch.Tensor
    queries: np.ndarray

    @property
    def all_names(self) -> list[str]:
        return self.data.names + self.extra_names

    @property
    def train_rows(self) -> np.ndarray:
        return self.data.rows("train")

    @property
    def row_sources(self) -> list[str]:
        """Source of each row: ``scenes``/``faces`` for the probe set, ``attention`` after it."""
        return [*self.data.source.tolist(), *(["attention"] * len(self.extra_names))]


def prepare_images(model: LoadedModel, cfg: VitHeadsConfig) -> ImageSet:
    """Build the probe set, add ``n_attention_images`` of ``attention_images`` (or take them from
    the probe set for ``"probe"``), preprocess everything and draw the pattern queries."""
    data = build_probe_set(cfg)
    if cfg.attention_images == "probe":
        extra_names: list[str] = []
        extra_pixels: list[np.ndarray] = []
        att_rows = np.arange(min(cfg.n_attention_images, len(data.names)))
    else:
        records = image_set.load_images(cfg.attention_images)[: cfg.n_attention_images]
        extra_names = [r.name for r in records]
        extra_pixels = [r.pixels for r in records]
        att_rows = len(data.names) + np.arange(len(records))
    pixels = model.preprocess(data.pixels + extra_pixels)
    grid = patch_grid(model)
    n_patches = grid[0] * grid[1]
    rng = np.random.default_rng(cfg.seed + 1)
    queries = np.sort(rng.choice(n_patches, size=min(cfg.pattern_queries, n_patches), replace=False))
    return ImageSet(data, extra_names, att_rows, pixels, queries)
