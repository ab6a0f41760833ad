"""Settings of the vit-heads analysis: :class:`VitHeadsConfig`, its ``small`` preset and the names
(tasks, regions, importance metrics) the other stages share. See docs/analyses/vit-heads.md."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from analyses.tasks import images as image_set
from analyses.tasks import scenes
from analyses.validation import check_null
from probe.errors import ConfigError

AblationMode = Literal["zero", "mean"]
Preset = Literal["default", "small"]
Region = Literal["cls", "centre", "border", "top_left", "top_right", "bottom_left", "bottom_right"]

REGIONS: tuple[str, ...] = get_args(Region)
SCENE_TASKS: tuple[str, ...] = ("colour", "side", "multiple")
FACE_TASKS: tuple[str, ...] = ("face",)
IMPORTANCE_METRICS: tuple[str, ...] = ("accuracy_drop", "confidence_drop", "cosine_drop", "grad_importance")
METRIC_LABELS = {
    "accuracy_drop": "probe accuracy, intact − pruned (mean over tasks)",
    "confidence_drop": "true-class probability, intact − pruned (mean over tasks)",
    "cosine_drop": "1 − cosine(pruned embedding, intact embedding)",
    "grad_importance": "mean |∂ cross-entropy / ∂ gate_h| at gates = 1 (mean over tasks)",
}

SMALL: dict[str, Any] = {
    "n_scenes": 24,
    "n_faces": 16,
    "test_fraction": 0.5,
    "n_eval": 2,
    "partial_heads": 1,
    "validate_top": 3,
    "regions": ("cls", "centre", "border"),
    "bands": (),
    "grad_per_task": False,
    "n_attention_images": 4,
    "pattern_images": 2,
    "pattern_queries": 8,
    "ae_epochs": 10,
    "n_groups": 4,
    "batch_size": 8,
}
"""The settings ``preset="small"`` starts from (explicit settings still win)."""


@dataclass(init=False)
class VitHeadsConfig:
    """Settings of the ViT head analysis (docs/analyses/vit-heads.md has the table of defaults).

    The defaults suit a GPU (every head pruned on ~180 eval images). ``preset="small"`` starts from
    :data:`SMALL`'s values instead (a CPU run of about two minutes on clip-vit-b16); settings given
    explicitly always win, so ``VitHeadsConfig(preset="small", n_eval=8)`` (CLI: ``--set
    preset=small --set n_eval=8``) prunes on 8 images per source.

    Data: ``n_scenes`` synthetic scenes of ``scene_shapes`` in ``scene_colours`` (1–2 classes, at
    most 3 objects), ``n_faces`` LFW crops (half faces), split with ``test_fraction``; ``n_eval``
    test images per source are pruned on (0: all). ``probe_c`` is the probes' inverse L2 strength.
    The eval images of each source are split into discovery and ``held_out`` (a share) images.
    Pruning, on the discovery images: ``ablation``, ``prune_layers`` (empty: all), ``prune_top_k``
    (0: every head of those layers; else the top-k by gradient importance, a screen that can miss
    heads), intervals from ``n_boot`` bootstrap draws over images, the share of the effect held by
    the top ``top_fraction`` of heads against ``n_perm`` permutations. Validation: the
    ``validate_top`` heads of largest cosine drop (0: none), pruned together on the held-out images,
    against ``n_null`` random sets of as many other heads. ``partial_heads`` heads get the partial
    conditions ``regions`` and ``bands`` (band edges as shares, 0..1, of the largest distance of a
    patch from the grid centre). Attention: ``attention_images`` (an image subset of
    :mod:`analyses.tasks.images`, or ``"probe"`` for the probe images), ``n_attention_images``,
    ``pattern_images`` of them give pattern maps at ``pattern_queries`` query patches; the
    autoencoder has ``code_dim`` and ``ae_epochs``; ``n_clusters`` 0 picks k by silhouette;
    ``n_groups`` head groups. Sinks: ``artifact_ratio`` (× median patch norm) and ``sink_eps``.
    Display: ``n_display`` images (0: none) keep their model-input crop and every head's attention
    from the CLS query and from every ``display_stride``-th patch row and column (1: every patch).
    ``batch_size`` rows per forward (pruning packs (head, image) pairs into them).
    """

    preset: Preset = "default"
    tasks: tuple[str, ...] = ("has_circle", "has_star", "colour", "side", "multiple", "face")
    scene_shapes: tuple[str, ...] = ("circle", "square", "triangle", "star")
    scene_colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    n_scenes: int = 400
    n_faces: int = 200
    test_fraction: float = 0.3
    n_eval: int = 0
    probe_c: float = 1.0
    ablation: AblationMode = "zero"
    prune_layers: tuple[int, ...] = ()
    prune_top_k: int = 0
    partial_heads: int = 12
    regions: tuple[str, ...] = REGIONS
    bands: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1.0)
    grad_per_task: bool = True
    held_out: float = 0.5
    validate_top: int = 10
    n_null: int = 50
    n_boot: int = 1000
    top_fraction: float = 0.1
    n_perm: int = 200
    attention_images: str = "natural"
    n_attention_images: int = 10
    pattern_images: int = 4
    pattern_queries: int = 24
    code_dim: int = 8
    ae_epochs: int = 40
    n_clusters: int = 0
    n_groups: int = 6
    artifact_ratio: float = 4.0
    sink_eps: float = 0.3
    n_display: int = 2
    display_stride: int = 2
    batch_size: int = 64
    seed: int = 0
    progress: bool = True

    def __init__(self, preset: Preset = "default", **settings: Any) -> None:
        # An explicit __init__ (not a __post_init__ that compares with the defaults) so that a
        # setting given explicitly wins over the preset even when it equals the default.
        names = {f.name for f in fields(self)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {unknown} for VitHeadsConfig; valid: {', '.join(sorted(names))}"
            )
        for f in fields(self):
            setattr(self, f.name, f.default)
        self.preset = preset
        if preset == "small":
            for name, value in SMALL.items():
                setattr(self, name, value)
        for name, value in settings.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ validation
    def scene_tasks(self) -> list[str]:
        return [t for t in self.tasks if t not in FACE_TASKS]

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first setting out of range (and the fix)."""
        self._validate_data()
        self._validate_counts()
        self._validate_pruning_and_attention()

    def _validate_data(self) -> None:
        if self.preset not in get_args(Preset):
            raise ConfigError(f"preset must be 'default' or 'small', got {self.preset!r}")
        if not self.tasks:
            raise ConfigError("tasks is empty; e.g. tasks=has_circle,colour,side,multiple,face")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks lists a task twice: {list(self.tasks)}")
        bad_shapes = [s for s in self.scene_shapes if s not in scenes.SHAPE_NAMES]
        if len(self.scene_shapes) < 2 or bad_shapes or len(set(self.scene_shapes)) != len(self.scene_shapes):
            raise ConfigError(
                f"scene_shapes must be at least 2 distinct shapes of {', '.join(scenes.SHAPE_NAMES)}; "
                f"got {list(self.scene_shapes)}"
            )
        bad_colours = [c for c in self.scene_colours if c not in scenes.COLOUR_NAMES]
        if (
            len(self.scene_colours) < 2
            or bad_colours
            or len(set(self.scene_colours)) != len(self.scene_colours)
        ):
            raise ConfigError(
                f"scene_colours must be at least 2 distinct colours of {', '.join(scenes.COLOUR_NAMES)}; "
                f"got {list(self.scene_colours)}"
            )
        known = [f"has_{s}" for s in self.scene_shapes] + list(SCENE_TASKS) + list(FACE_TASKS)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ConfigError(
                f"unknown task(s) {unknown}; choose from {', '.join(known)} (has_<shape> needs the shape in "
                "scene_shapes)"
            )
        if self.scene_tasks() and self.n_scenes < 8:
            raise ConfigError(f"n_scenes must be >= 8 for the scene tasks (got {self.n_scenes})")
        if "face" in self.tasks and not (4 <= self.n_faces <= 200 and self.n_faces % 2 == 0):
            raise ConfigError(
                f"n_faces must be an even number from 4 to 200 (half faces, half non-faces of LFW); got {self.n_faces}"
            )

    def _validate_counts(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must lie in (0, 1) (got {self.test_fraction})")
        for name in (
            "n_eval",
            "prune_top_k",
            "partial_heads",
            "pattern_images",
            "n_clusters",
            "n_display",
            "seed",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.n_clusters == 1:
            raise ConfigError("n_clusters must be 0 (choose by silhouette) or >= 2 (got 1)")
        for name in (
            "n_attention_images",
            "pattern_queries",
            "code_dim",
            "ae_epochs",
            "n_groups",
            "display_stride",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0.0 < self.held_out < 1.0:
            raise ConfigError(
                f"held_out must lie in (0, 1), a share of the eval images (got {self.held_out})"
            )
        if not 0.0 < self.top_fraction < 1.0:
            raise ConfigError(f"top_fraction must lie in (0, 1), e.g. 0.1 (got {self.top_fraction})")
        if self.validate_top < 0:
            raise ConfigError(f"validate_top must be >= 0 (0: no validation; got {self.validate_top})")
        check_null(self.n_null)
        for name in ("n_boot", "n_perm"):
            if getattr(self, name) < 100:
                raise ConfigError(f"{name} must be >= 100 draws (got {getattr(self, name)})")
        if not self.probe_c > 0:
            raise ConfigError(f"probe_c must be positive (got {self.probe_c})")

    def _validate_pruning_and_attention(self) -> None:
        if self.ablation not in get_args(AblationMode):
            raise ConfigError(f"ablation must be 'zero' or 'mean' (got {self.ablation!r})")
        if any(int(layer) < 0 for layer in self.prune_layers):
            raise ConfigError(f"prune_layers must be layer indices >= 0 (got {list(self.prune_layers)})")
        bad_regions = [r for r in self.regions if r not in REGIONS]
        if bad_regions or len(set(self.regions)) != len(self.regions):
            raise ConfigError(
                f"regions must be distinct names of {', '.join(REGIONS)}; got {list(self.regions)}"
            )
        edges = [float(b) for b in self.bands]
        if edges and (
            len(edges) < 2
            or edges[0] < 0
            or edges[-1] > 1
            or any(b <= a for a, b in itertools.pairwise(edges))
        ):
            raise ConfigError(
                f"bands are increasing edges in [0, 1] (shares of the largest distance from the grid centre), "
                f"at least two, e.g. 0,0.5,1; or empty for none; got {edges}"
            )
        allowed = (*image_set.SUBSETS, "probe")
        if self.attention_images not in allowed:
            raise ConfigError(
                f"attention_images must be an image subset ({', '.join(image_set.SUBSETS)}) or 'probe'; "
                f"got {self.attention_images!r}"
            )
        if self.pattern_images > self.n_attention_images:
            raise ConfigError(
                f"pattern_images ({self.pattern_images}) cannot exceed n_attention_images ({self.n_attention_images})"
            )
        if not self.artifact_ratio > 1:
            raise ConfigError(
                f"artifact_ratio must be > 1 (× the median patch norm; got {self.artifact_ratio})"
            )
        if not 0.0 < self.sink_eps < 1.0:
            raise ConfigError(f"sink_eps must lie in (0, 1) (got {self.sink_eps}); analyses.sinks uses 0.3")
