"""ViT heads: importance by pruning, attention strength and patterns, and vision sinks.

Background
----------
Li et al., "How Does Attention Work in Vision Transformers? A Visual Analytics Attempt" (TVCG 2023)
ask three questions of every head of a vision transformer: how important is
it, how strongly does a patch attend to the patches around it, and which attention patterns has it
learned. This module answers them on a loaded vision model (``clip-vit-b16``, ``tiny-vit``,
``tiny-clip-vision`` or any ViT/DeiT/CLIP checkpoint that :mod:`probe.vision` hooks), and adds the
high-norm "artifact" tokens of large ViTs (Darcet et al.) as the vision counterpart of the attention
sinks of :mod:`analyses.sinks`.

**Tasks.** The image tower has no classifier of its own (CLIP) or one for labels we have no images
of (tiny-vit), so every task is a *linear probe* on the image embedding (:func:`probe.vision.embed`:
CLIP's projected embedding, else the final-norm CLS token): scikit-learn's ``LogisticRegression`` on
the unit-normalised, standardised embedding, trained on a seeded train split and scored on the test
split. Tasks (``VitHeadsConfig.tasks``): ``has_<shape>`` (a shape class is present),
``colour`` (the dominant object colour), ``side`` (the side, left or right, of the largest object),
``multiple`` (more than one object) on the synthetic scenes of :mod:`analyses.tasks.scenes`, whose
labels are exact, and ``face`` (face / non-face) on the LFW crops of :mod:`analyses.tasks.images`.
The probes are frozen; the model is what gets pruned.

**Importance** (on the *eval* images: the test split, at most ``n_eval`` per source). For each head,
its output ``z_h`` is removed (``ablation="zero"``, the default: pruning proper, and the limit
gate → 0 whose first-order estimate is the gradient importance below) or replaced by its mean over
the train images at each token position (``"mean"``, :func:`probe.vision.mean_head_outputs`'
definition) with :func:`probe.vision.gate_heads`, and per task:

* ``accuracy_drop`` = probe accuracy of the intact model − accuracy of the pruned model;
* ``confidence_drop`` = mean probability of the true class, intact − pruned;
* ``cosine_drop`` = 1 − mean cosine between the pruned and the intact embedding (task-free);
* ``grad_importance`` = mean over images of ``|∂ CE / ∂ gate_h|`` at gates = 1 (Michel et al.;
  :func:`probe.vision.gate_variables`): the first-order estimate of the loss change, one backward
  pass per task (``grad_per_task``) or one for the summed loss.

Head metrics in ``heads`` are means over tasks. *Partial pruning* removes a head only at some query
tokens (the other queries keep it): the CLS query alone (``cls``: how much of the head's effect
goes through the token the embedding is read from), the patches of a region of the grid
(``centre`` = the middle half of rows and columns, ``border`` = the rest, the four quadrants; CLS
keeps the head) or of a band of distances from the grid centre (``bands``, edges as shares of the
largest centre distance). It runs
for the ``partial_heads`` heads with the largest full-pruning confidence drop; ``share_of_full`` is
the partial confidence drop over the full one (unstable when the full drop is near zero) and
``cosine_share_of_full`` the same for the cosine drop. *Agreement* is the Spearman rank correlation
of the metrics over the heads that were pruned.

Cost and batching: full pruning costs one forward per (head, eval image). Many (head, image) pairs
share one forward: each pair is a row of the batch, and one :func:`probe.vision.gate_heads` per head
acts only on its rows through a ``[batch, T]`` query mask (nested gates compose, as each edits only
its own head's slice). ``prune_layers`` and ``prune_top_k`` (the top heads by the cheap gradient
importance) bound the work; ``preset="small"`` (measured below) fits a CPU.

**Attention strength** (on ``n_attention_images`` images of ``attention_images``: by default the
natural photographs of :mod:`analyses.tasks.images`), through :mod:`analyses.vit_attention`:
per-head offset maps (mean attention from a patch query to the patch at each relative offset),
strength against distance (rings of integer patch distance), mean attention distance (patch units;
CLS mass renormalised away) and its trend across layers, plus ``self_strength`` (attention to the
query's own patch) and ``neighbour_strength`` (ring 1).

**Patterns**: maps of (image, head, query patch) — the query's attention over the patches, centred on
the query — for ``pattern_images`` images and ``pattern_queries`` seeded query patches; an MLP
autoencoder over all maps of all layers, k-means on its codes (k by silhouette unless
``n_clusters``), each head's cluster mix, its dominant cluster and a k-means grouping of heads by
mix (``n_groups``).

**Vision sinks**: residual-stream norms of every token entering every layer (``resid_pre``, as
:mod:`analyses.sinks` measures its ``hidden`` norms); a patch token whose norm exceeds
``artifact_ratio`` × the median patch norm of its image and layer is an *artifact* token. Per head,
``alpha0`` (mean attention from all queries to CLS, the first token: :mod:`analyses.sinks`' column
importance for a query set that sees every key), ``sink_rate`` (share of images with
``alpha0 > sink_eps``) and ``alpha_artifacts`` (mean attention from all queries to that layer's
artifact tokens, summed over them).

**Display patterns** (for the dashboard's attention overlay): ``n_display`` images (default 2:
round robin over the natural attention images, the scenes and the faces, so one photograph and one
scene) get one extra eager forward. The run keeps the image the model received (its resize and crop,
:func:`input_crops`) and, for every layer and head, the full post-softmax attention row (all ``T``
keys, CLS included, so a row sums to 1) of the CLS query and of the query patches on every
``display_stride``-th row and column (aligned to include the centre patch; 1 keeps every patch).
Read them back with :func:`display_images` and :func:`display_pattern` / :func:`display_attention`
(``[rows, cols]`` over the key patches); :func:`has_display` is False for older runs.

Tables
------
* ``heads`` (one row per (layer, head)): ``pruned``, ``accuracy_drop``, ``confidence_drop``,
  ``cosine_drop``, ``grad_importance`` (NaN drops for heads not pruned), per task
  ``confidence_drop_<task>`` and ``grad_importance_<task>`` (``_all`` without ``grad_per_task``),
  ``mean_attention_distance``, ``patch_share``, ``self_strength``, ``neighbour_strength``,
  ``cluster`` (dominant pattern cluster), ``cluster_share``, ``group``, and ``alpha0_<set>``,
  ``sink_rate_<set>``, ``alpha_artifacts_<set>`` (``<set>`` = ``attention_images``, e.g. ``natural``,
  as :mod:`analyses.sinks` names its columns after its input sets).
* ``importance`` (long): ``layer, head, condition`` (``full`` or a partial condition), ``task``
  (``embedding`` for the cosine drop), ``metric``, ``value``.
* ``partial``: ``layer, head, condition, kind`` (full/prefix/region/band), ``inner, outer`` (band
  radii in patches), ``n_queries, query_share`` (of all ``T`` tokens), ``accuracy_drop,
  confidence_drop, cosine_drop, share_of_full, cosine_share_of_full``.
* ``agreement``: ``metric_a, metric_b, spearman, n_heads`` (also the array ``agreement`` [4, 4]).
* ``probes``: ``task, source, n_train, n_test, chance`` (majority share of the test split),
  ``classes, train_accuracy, test_accuracy, test_confidence, status, eval_accuracy,
  eval_confidence, n_eval``.
* ``distance``: ``layer, head, distance, strength``; ``attention_trend``: ``metric, layer, mean, std,
  median, q25, q75, min, max, n`` per layer (slopes across layers in ``notes["trend"]``).
* ``clusters``: ``layer, head, cluster, share`` (each head's cluster mix); ``cluster_info``:
  ``cluster, n_maps, map_share, n_heads_dominant, prototype_self, prototype_distance``.
* ``sinks``: ``input_set, layer, head, alpha0, alpha0_sem, sink_rate, alpha_prefix,
  alpha_artifacts, alpha_artifacts_per_token, uniform_artifacts`` (the share a uniform query would
  give them), ``images_with_artifacts``; ``norms`` (as :mod:`analyses.sinks`' ``norms``):
  ``input_set, layer, quantity`` (``hidden``), ``token`` (``cls``/``artifacts``), ``sink_norm,
  other_norm`` (mean norm of the other patches), ``ratio, n_tokens, median_norm``; ``artifacts``
  (one row per artifact token): ``input_set, image, layer, token, row, col, norm, median_norm, ratio``.
* ``images``: every image with its source, split, ``eval``/``attention`` flags and labels.
* ``display`` (one row per display image; absent with ``n_display=0`` and in older runs): ``image``
  (index into the display arrays), ``name``, ``source`` (``natural``/…, ``scenes``, ``faces``),
  ``images_row`` (its row of ``images``), ``grid_rows, grid_cols, n_prefix, patch_size`` (pixels of
  the crop), ``stride`` (``display_stride``).

Arrays: ``offset_maps`` ``[L, H, 2·rows − 1, 2·cols − 1]``, ``cluster_centroids`` ``[k, code_dim]``,
``cluster_prototypes`` ``[k, 2·rows − 1, 2·cols − 1]``, ``cluster_mix`` ``[L·H, k]``, ``agreement``;
``display_images`` ``uint8 [n_display, S, S, 3]`` (the model-input crops), ``display_attention``
``float16 [n_display, L, H, Q, T]`` (query ``q``'s attention over all ``T`` keys, prefix first) and
``display_queries`` ``int64 [Q, 3]`` (token, row, col of each stored query: the prefix tokens with
row = col = −1, then the sub-grid patches row-major). For clip-vit-b16 with the default
``display_stride=2`` (Q = 1 + 7·7) that is 2 × 12 × 12 × 50 × 197 × 2 bytes ≈ 5.7 MB of patterns
plus 0.3 MB of crops; ``display_stride=1`` would be 4 times larger (22 MB).

Faithfulness
------------
Only the paper's abstract could be read (the search corpora hold no body text); it fixes the three
questions (multiple pruning-based importance metrics; the spatial distribution of attention strength
and its trend across layers; an autoencoder summarising attention patterns) but not the details.
Best effort, this module's choices: linear probes as the tasks (the abstract does not name the
tasks; a CLIP image tower has no classifier of its own); accuracy and true-class confidence drops
measured on the probes; the cosine drop and the gradient importance as extra metrics; zero or
per-token mean ablation of ``z_h``; partial pruning by *query* region or query ring around the grid
centre. A partial pruning by *key offset* (remove only the attention a query pays to keys at
distance ``d`` from it) needs an edit of the attention pattern, which :mod:`probe.vision` does not
offer (it gates head outputs per query); the observational counterpart is the ``distance`` table.
The strength and pattern definitions are :mod:`analyses.vit_attention`'s (see its docstring).
Numbers on ``clip-vit-b16`` are those of its dequantised INT8 weights.

Cost, measured: ``preset="small"`` on clip-vit-b16 on this repository's CPU (2 cores shared with
other jobs, load ≈ 6) took 183 s wall, 100 s of CPU time (capture 62 s, gradients 23 s, pruning
55 s, partial 37 s; the display forward, added later, 3.5 s); the defaults on one H200 (ViT-B/16 architecture, every head on 180 eval
images, 12 heads × 9 partial conditions, 13 824 pattern maps) take about 96 s, of which 29 s are
the autoencoder and k-means on the CPU.

Usage
-----
::

    import probe
    from analyses.vit_heads import VitHeadsConfig, run_vit_heads, summary

    model = probe.load_model("clip-vit-b16")
    result = run_vit_heads(model, VitHeadsConfig(preset="small"))   # GPU: VitHeadsConfig()
    print(summary(result))
    result.heads.nlargest(5, "confidence_drop")
    result.tables["agreement"]          # Spearman between importance metrics

CLI: ``headlab run vit-heads --model clip-vit-b16 --set preset=small``.

References
----------
* Li, Wang, Dai, Wang, Yeh, Zheng, Zhang & Ma (2023). How Does Attention Work in Vision
  Transformers? A Visual Analytics Attempt. IEEE TVCG 29(6), 2888–2900.
* Michel, Levy & Neubig (2019). Are Sixteen Heads Really Better than One? NeurIPS.
* Darcet, Oquab, Mairal & Bojanowski (2024). Vision Transformers Need Registers. ICLR.
* Gu et al. (2025). When Attention Sink Emerges in Language Models: An Empirical View. ICLR.
* Dosovitskiy et al. (2021). An Image is Worth 16x16 Words. ICLR. (Mean attention distance.)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import torch

from analyses import vit_attention as va
from analyses.base import AnalysisResult, heads_frame
from analyses.registry import Analysis, register
from analyses.runstore import Run
from analyses.tasks import images as image_set
from analyses.tasks import scenes
from probe import vision
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.types import Head

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
    "n_eval": 4,
    "prune_top_k": 6,
    "partial_heads": 1,
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
    """Settings of the ViT head analysis (see the module docstring).

    The defaults suit a GPU (every head pruned on ~180 eval images). ``preset="small"`` starts from
    :data:`SMALL`'s values instead (a CPU run of about two minutes on clip-vit-b16); settings given
    explicitly always win, so ``VitHeadsConfig(preset="small", n_eval=8)`` (CLI: ``--set
    preset=small --set n_eval=8``) prunes on 8 images per source.

    Data: ``n_scenes`` synthetic scenes of ``scene_shapes`` in ``scene_colours`` (1–2 classes, at
    most 3 objects), ``n_faces`` LFW crops (half faces), split with ``test_fraction``; ``n_eval``
    test images per source are pruned on (0: all). ``probe_c`` is the probes' inverse L2 strength.
    Pruning: ``ablation``, ``prune_layers`` (empty: all), ``prune_top_k`` (0: every head of those
    layers; else the top-k by gradient importance), ``partial_heads`` heads get the partial
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
        if not self.probe_c > 0:
            raise ConfigError(f"probe_c must be positive (got {self.probe_c})")
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


# ============================================================================== probes


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

        x = _unit(np.asarray(embeddings, dtype=np.float64))
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

    def score(self, embeddings: np.ndarray | torch.Tensor, labels: Sequence[Any]) -> tuple[float, float]:
        """(accuracy, mean probability of the true class) on ``embeddings`` with ``labels``."""
        p = self.proba(embeddings)
        y = self.label_index(labels)
        known = y >= 0
        correct = np.zeros(len(y), dtype=bool)
        correct[known] = p[known].argmax(axis=1) == y[known]
        conf = np.zeros(len(y))
        conf[known] = p[known, y[known]]
        return float(correct.mean()), float(conf.mean())


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12))


def _rows_and_labels(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    rows = np.asarray([i for i, v in enumerate(labels) if v is not None], dtype=np.int64)
    return rows, [str(labels[i]) for i in rows]


# ============================================================================== pruning


@dataclass(frozen=True)
class PruneCondition:
    """One head removed, at every token (``query_mask`` None) or only at the ``[T]`` bool query mask."""

    head: Head
    name: str = "full"
    query_mask: torch.Tensor | None = field(default=None, compare=False)


def pruned_embeddings(
    model: LoadedModel,
    pixels: torch.Tensor,
    conditions: Sequence[PruneCondition],
    *,
    mode: AblationMode = "zero",
    means: Mapping[int, torch.Tensor] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "pruning",
) -> torch.Tensor:
    """Embeddings ``[n_conditions, n_images, d_embed]`` of ``pixels`` under each condition.

    Every (condition, image) pair is one row; ``batch_size`` rows share a forward, each condition
    gated by its own :func:`probe.vision.gate_heads` whose ``[batch, T]`` query mask selects its
    rows (and, for partial pruning, its queries), so conditions never touch each other's rows.
    ``mode="mean"`` needs ``means`` (:func:`probe.vision.mean_head_outputs`).
    """
    from tqdm.auto import tqdm

    if mode not in get_args(AblationMode):
        raise ConfigError(f"mode must be 'zero' or 'mean', got {mode!r}")
    if mode == "mean" and means is None:
        raise ConfigError("mode='mean' needs means; compute them with probe.vision.mean_head_outputs")
    n_images, n_tokens = int(pixels.shape[0]), model.n_ctx
    out = torch.zeros(len(conditions), n_images, int(model.extra["embedding_dim"]))
    pairs = [(c, i) for c in range(len(conditions)) for i in range(n_images)]
    starts = range(0, len(pairs), max(1, batch_size))
    bar = tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False)
    for start in bar:
        chunk = pairs[start : start + batch_size]
        cond_idx = torch.tensor([c for c, _ in chunk])
        img_idx = torch.tensor([i for _, i in chunk])
        with contextlib.ExitStack() as stack:
            for c in torch.unique(cond_idx).tolist():
                cond = conditions[int(c)]
                mask = torch.zeros(len(chunk), n_tokens, dtype=torch.bool)
                mask[cond_idx == c] = True if cond.query_mask is None else cond.query_mask.to(torch.bool)
                stack.enter_context(
                    vision.gate_heads(
                        model,
                        [cond.head],
                        mode=mode,
                        means=means if mode == "mean" else None,
                        query_mask=mask,
                    )
                )
            emb = vision.embed(model, pixels[img_idx], batch_size=len(chunk))
        out[cond_idx, img_idx] = emb
    bar.close()
    return out


@dataclass
class Effects:
    """What pruning did to the probes and the embedding, per condition ``[C]``."""

    cosine_drop: np.ndarray
    accuracy: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]
    clean_accuracy: dict[str, float]
    clean_confidence: dict[str, float]

    def accuracy_drop(self, task: str) -> np.ndarray:
        return self.clean_accuracy[task] - self.accuracy[task]

    def confidence_drop(self, task: str) -> np.ndarray:
        return self.clean_confidence[task] - self.confidence[task]

    def mean_drops(self) -> tuple[np.ndarray, np.ndarray]:
        """(accuracy drop, confidence drop) averaged over tasks, ``[C]`` each."""
        tasks = list(self.accuracy)
        if not tasks:
            nan = np.full(self.cosine_drop.shape, np.nan)
            return nan, nan.copy()
        acc = np.mean([self.accuracy_drop(t) for t in tasks], axis=0)
        conf = np.mean([self.confidence_drop(t) for t in tasks], axis=0)
        return acc, conf

    def long(self) -> pd.DataFrame:
        """Tidy: ``condition`` (index), ``task``, ``metric``, ``value``."""
        frames = [pd.DataFrame({"condition": np.arange(len(self.cosine_drop)), "task": "embedding",
                                "metric": "cosine_drop", "value": self.cosine_drop})]  # fmt: skip
        for task in self.accuracy:
            for metric, values in (
                ("accuracy", self.accuracy[task]),
                ("accuracy_drop", self.accuracy_drop(task)),
                ("confidence", self.confidence[task]),
                ("confidence_drop", self.confidence_drop(task)),
            ):
                frames.append(pd.DataFrame({"condition": np.arange(len(values)), "task": task,
                                            "metric": metric, "value": values}))  # fmt: skip
        return pd.concat(frames, ignore_index=True)


def pruning_effects(
    probes: Mapping[str, LinearProbe],
    labels: Mapping[str, np.ndarray],
    clean: torch.Tensor | np.ndarray,
    pruned: torch.Tensor | np.ndarray,
) -> Effects:
    """Per condition: probe accuracy and true-class confidence per task, and the embedding's cosine drop.

    ``labels[task]`` is an object array over the images (None where the image has no label for the
    task); ``clean`` is ``[n_images, D]``, ``pruned`` ``[n_conditions, n_images, D]``.
    """
    clean_np = np.asarray(clean, dtype=np.float64)
    pruned_np = np.asarray(pruned, dtype=np.float64)
    if pruned_np.ndim != 3 or pruned_np.shape[1:] != clean_np.shape:
        raise ConfigError(
            f"pruned must be [conditions, {clean_np.shape[0]}, {clean_np.shape[1]}], got {pruned_np.shape}"
        )
    cos = (_unit(pruned_np) * _unit(clean_np)[None]).sum(-1)  # [C, N]
    effects = Effects(1.0 - cos.mean(axis=1), {}, {}, {}, {})
    for task, probe in probes.items():
        rows, y = _rows_and_labels(labels[task])
        if rows.size == 0:
            continue
        effects.clean_accuracy[task], effects.clean_confidence[task] = probe.score(clean_np[rows], y)
        scores = [probe.score(p[rows], y) for p in pruned_np]
        effects.accuracy[task] = np.asarray([s[0] for s in scores])
        effects.confidence[task] = np.asarray([s[1] for s in scores])
    return effects


def head_gradients(
    model: LoadedModel,
    pixels: torch.Tensor,
    probes: Mapping[str, LinearProbe],
    labels: Mapping[str, np.ndarray],
    *,
    per_task: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Michel et al.'s importance ``mean_images |∂ CE / ∂ gate_h|`` ``[L, H]`` per task (or ``"all"``).

    Each image has its own gates (:func:`probe.vision.gate_variables` with ``batch``), so one
    backward pass gives every image its own gradient. ``per_task``: one backward per task over the
    images labelled for it; else one backward of the summed cross-entropy of all the image's tasks.
    """
    from tqdm.auto import tqdm

    index = {t: probes[t].label_index([v if v is not None else "" for v in labels[t]]) for t in probes}
    has = {t: np.asarray([v is not None for v in labels[t]]) & (index[t] >= 0) for t in probes}
    keys = list(probes) if per_task else ["all"]
    sums = {k: torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64) for k in keys}
    counts = dict.fromkeys(keys, 0)
    starts = range(0, int(pixels.shape[0]), max(1, batch_size))
    for start in tqdm(starts, desc="gradients", unit="batch", disable=not progress, leave=False):
        rows = np.arange(start, min(start + batch_size, int(pixels.shape[0])))
        with torch.enable_grad(), vision.gate_variables(model, batch=len(rows)) as gates:
            emb = vision.forward(model, pixels[rows]).embedding
            losses: dict[str, torch.Tensor] = {}
            for task, probe in probes.items():
                mask = has[task][rows]
                if not mask.any():
                    continue
                logp = torch.log_softmax(probe.logits(emb), dim=-1)
                y = torch.as_tensor(np.where(mask, index[task][rows], 0), device=logp.device)
                ce = -logp.gather(1, y[:, None])[:, 0]
                losses[task] = ce * torch.as_tensor(mask, device=ce.device, dtype=ce.dtype)
            if not losses:
                continue
            if per_task:
                for task, loss in losses.items():
                    (grad,) = torch.autograd.grad(loss.sum(), gates, retain_graph=True)
                    mask = has[task][rows]
                    sums[task] += grad.detach().abs().double().cpu()[torch.as_tensor(mask)].sum(0)
                    counts[task] += int(mask.sum())
            else:
                total = torch.stack(list(losses.values())).sum(0)
                (grad,) = torch.autograd.grad(total.sum(), gates)
                mask = np.any([has[t][rows] for t in losses], axis=0)
                sums["all"] += grad.detach().abs().double().cpu()[torch.as_tensor(mask)].sum(0)
                counts["all"] += int(mask.sum())
    return {k: (sums[k] / counts[k]).numpy() if counts[k] else np.full((model.n_layers, model.n_heads), np.nan)
            for k in keys}  # fmt: skip


def query_masks(
    model: LoadedModel, regions: Sequence[str] = REGIONS, bands: Sequence[float] = (0.0, 0.5, 1.0)
) -> list[dict[str, Any]]:
    """Partial-pruning query sets: ``{name, kind, mask [T] bool, inner, outer}`` per region and band.

    Regions: ``cls`` (the prefix tokens alone: CLS, and DeiT's distillation token; kind
    ``prefix``), ``centre`` (rows and columns from ``n // 4`` to ``n - n // 4``), ``border`` (the
    other patches), quadrants (top = rows below ``rows // 2``, bottom = from ``rows - rows // 2``: an
    odd grid's middle row and column belong to no quadrant). Bands: patches whose centre lies at
    ``[edge_i, edge_i+1) × r_max`` from the grid centre (``r_max`` the largest such distance; the
    last band includes it), in patch units. Only ``cls`` holds prefix tokens. Empty sets are left out.
    """
    rows, cols = (int(g) for g in model.extra["grid"])
    half_r, half_c = rows // 2, cols // 2
    spans: dict[str, tuple[range, range]] = {
        "centre": (range(rows // 4, rows - rows // 4), range(cols // 4, cols - cols // 4)),
        "top_left": (range(0, half_r), range(0, half_c)),
        "top_right": (range(0, half_r), range(cols - half_c, cols)),
        "bottom_left": (range(rows - half_r, rows), range(0, half_c)),
        "bottom_right": (range(rows - half_r, rows), range(cols - half_c, cols)),
    }
    out: list[dict[str, Any]] = []
    n_prefix = int(model.extra["n_prefix"])
    for name in regions:
        if name == "cls":
            mask = torch.zeros(model.n_ctx, dtype=torch.bool)
            mask[:n_prefix] = True
            out.append({"name": name, "kind": "prefix", "mask": mask, "inner": math.nan, "outer": math.nan})
            continue
        if name == "border":
            r, c = spans["centre"]
            mask = ~vision.region_mask(model, rows=r, cols=c)
            mask[:n_prefix] = False
        else:
            r, c = spans[name]
            mask = vision.region_mask(model, rows=r, cols=c)
        if mask.any():
            out.append({"name": name, "kind": "region", "mask": mask, "inner": math.nan, "outer": math.nan})
    if bands:
        centre = ((rows - 1) / 2, (cols - 1) / 2)
        r_max = math.hypot(centre[0], centre[1])
        edges = [float(b) * r_max for b in bands]
        for i, (inner, outer) in enumerate(itertools.pairwise(edges)):
            last = i == len(edges) - 2
            mask = vision.distance_band(model, centre, inner, outer + (1e-6 if last else 0.0))
            if mask.any():
                name = f"band_{inner:.1f}-{outer:.1f}"
                out.append({"name": name, "kind": "band", "mask": mask, "inner": inner, "outer": outer})
    return out


def agreement(values: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Spearman rank correlation between ``metrics`` (columns of ``values``) over the rows where all
    are finite: one row per ordered pair, ``metric_a, metric_b, spearman, n_heads`` (NaN where a
    metric is constant)."""
    sub = values[list(metrics)].astype(np.float64).replace([np.inf, -np.inf], np.nan).dropna()
    corr = sub.rank().corr(method="pearson") if len(sub) >= 2 else pd.DataFrame(np.nan, metrics, metrics)
    rows = [
        {"metric_a": a, "metric_b": b, "spearman": float(corr.loc[a, b]), "n_heads": len(sub)}
        for a in metrics
        for b in metrics
    ]
    return pd.DataFrame(rows, columns=["metric_a", "metric_b", "spearman", "n_heads"])


# ============================================================================== data


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
            shapes=tuple(cfg.scene_shapes), colours=tuple(cfg.scene_colours), min_classes=1, max_classes=2,
            p_single=0.7, max_count=2, max_objects=3,
        )  # fmt: skip
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


def _eval_rows(data: ProbeSet, n_eval: int) -> np.ndarray:
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


# ============================================================================== the capture pass


@dataclass
class _Capture:
    embeddings: torch.Tensor  # [N, D] for every image of the pass
    means: dict[int, torch.Tensor] | None
    offset: np.ndarray  # [L, H, 2r-1, 2c-1] mean over attention images
    mad: np.ndarray  # [L, H]
    patch_share: np.ndarray  # [L, H]
    alpha0: np.ndarray  # [n_att, L, H]
    alpha_prefix: np.ndarray  # [n_att, L, H]
    alpha_artifacts: np.ndarray  # [n_att, L, H], NaN where the layer has no artifact token
    norms: np.ndarray  # [n_att, L + 1, T]
    maps: np.ndarray  # [M, 2r-1, 2c-1]
    map_head: np.ndarray  # [M] layer·H + head
    map_query: np.ndarray  # [M]
    map_image: np.ndarray  # [M]


def artifact_mask(norms: np.ndarray, n_prefix: int, ratio: float) -> np.ndarray:
    """``[..., T]`` bool: patch tokens whose norm exceeds ``ratio`` × the median patch norm (prefix never)."""
    patch = norms[..., n_prefix:]
    median = np.median(patch, axis=-1, keepdims=True)
    out = np.zeros(norms.shape, dtype=bool)
    out[..., n_prefix:] = patch > ratio * median
    return out


def _capture_pass(
    model: LoadedModel,
    pixels: torch.Tensor,
    att_rows: np.ndarray,
    train_rows: np.ndarray,
    cfg: VitHeadsConfig,
    queries: np.ndarray,
) -> _Capture:
    """One pass over every image: embeddings; for the attention images the attention statistics,
    residual norms and pattern maps; for the train images the mean head outputs (mean ablation).

    Patterns are reduced batch by batch (never all images' ``[L, H, T, T]`` at once)."""
    from tqdm.auto import tqdm

    n_images = int(pixels.shape[0])
    L, H = model.n_layers, model.n_heads
    grid = _grid(model)
    n_prefix = int(model.extra["n_prefix"])
    gr, gc = grid
    att = np.zeros(n_images, dtype=bool)
    att[att_rows] = True
    train = np.zeros(n_images, dtype=bool)
    train[train_rows] = True
    want_means = cfg.ablation == "mean"
    # Attention images first (smaller batches: all patterns of a batch are held at once).
    att_batch = max(1, min(cfg.batch_size, 8))
    order = np.concatenate([np.flatnonzero(att), np.flatnonzero(~att)])
    chunks: list[np.ndarray] = []
    att_part, rest = order[: att.sum()], order[att.sum() :]
    chunks += [att_part[i : i + att_batch] for i in range(0, len(att_part), att_batch)]
    chunks += [rest[i : i + cfg.batch_size] for i in range(0, len(rest), cfg.batch_size)]

    embeddings = torch.zeros(n_images, int(model.extra["embedding_dim"]))
    sums = {layer: torch.zeros(model.n_ctx, H, model.d_head, dtype=torch.float64) for layer in range(L)}
    n_train = 0
    offset = np.zeros((L, H, 2 * gr - 1, 2 * gc - 1))
    mad = np.zeros((L, H))
    share = np.zeros((L, H))
    n_att = int(att.sum())
    att_pos = {int(r): i for i, r in enumerate(att_rows)}
    alpha0 = np.full((n_att, L, H), np.nan)
    alpha_prefix = np.full((n_att, L, H), np.nan)
    alpha_art = np.full((n_att, L, H), np.nan)
    norms_out = np.zeros((n_att, L + 1, model.n_ctx))
    maps: list[np.ndarray] = []
    map_head: list[np.ndarray] = []
    map_query: list[np.ndarray] = []
    map_image: list[np.ndarray] = []
    bar = tqdm(chunks, desc="capture", unit="batch", disable=not cfg.progress, leave=False)
    for chunk in bar:
        is_att = att[chunk]
        is_train = train[chunk]
        cap = vision.capture(
            model, pixels[chunk], patterns="all" if is_att.any() else None,
            head_outputs="all" if want_means and is_train.any() else None,
            residual=bool(is_att.any()), batch_size=len(chunk),
        )  # fmt: skip
        embeddings[chunk] = cap.embedding
        if want_means and is_train.any():
            for layer in range(L):
                sums[layer] += cap.head_outputs[layer][torch.as_tensor(is_train)].double().sum(0)
            n_train += int(is_train.sum())
        if not is_att.any():
            continue
        sel = np.flatnonzero(is_att)
        positions = [att_pos[int(chunk[i])] for i in sel]
        assert cap.resid_norms is not None
        norms = cap.resid_norms[sel].numpy().astype(np.float64)  # [b, L+1, T]
        norms_out[positions] = norms
        art = artifact_mask(norms, n_prefix, cfg.artifact_ratio)  # [b, L+1, T]
        for layer in range(L):
            p = cap.patterns[layer][sel].numpy()  # [b, H, T, T]
            b = p.shape[0]
            offset[layer] += va.offset_maps(p, grid, n_prefix) * b
            mad[layer] += va.mean_attention_distance(p, grid, n_prefix) * b
            share[layer] += va.patch_attention_share(p, grid, n_prefix) * b
            received = p.mean(axis=2, dtype=np.float64)  # [b, H, T]: mean attention from all queries
            alpha0[positions, layer] = received[:, :, 0]
            alpha_prefix[positions, layer] = received[:, :, :n_prefix].sum(-1)
            mask = art[:, layer]  # resid_pre of this layer
            on_art = (received * mask[:, None, :]).sum(-1)
            alpha_art[positions, layer] = np.where(np.any(mask, axis=-1)[:, None], on_art, np.nan)
            for j, pos in enumerate(positions):
                if pos >= cfg.pattern_images:
                    continue
                m, h, q = va.pattern_maps(p[j : j + 1], grid, n_prefix, queries=queries)
                maps.append(m)
                map_head.append(layer * H + h)
                map_query.append(q)
                map_image.append(np.full(len(h), pos, dtype=np.int64))
    bar.close()
    means = None
    if want_means:
        if n_train == 0:
            raise ConfigError(
                "mean ablation needs train images for the mean head outputs; use ablation='zero'"
            )
        means = {layer: (s / n_train).to(model.dtype) for layer, s in sums.items()}
    cells = (2 * gr - 1, 2 * gc - 1)
    return _Capture(
        embeddings=embeddings, means=means, offset=offset / max(n_att, 1), mad=mad / max(n_att, 1),
        patch_share=share / max(n_att, 1), alpha0=alpha0, alpha_prefix=alpha_prefix, alpha_artifacts=alpha_art,
        norms=norms_out,
        maps=np.concatenate(maps) if maps else np.zeros((0, *cells), dtype=np.float32),
        map_head=np.concatenate(map_head) if map_head else np.zeros(0, dtype=np.int64),
        map_query=np.concatenate(map_query) if map_query else np.zeros(0, dtype=np.int64),
        map_image=np.concatenate(map_image) if map_image else np.zeros(0, dtype=np.int64),
    )  # fmt: skip


# ============================================================================== display patterns

DISPLAY_ARRAYS: tuple[str, ...] = ("display_images", "display_attention", "display_queries")
DISPLAY_HINT = "this run has no stored display patterns; re-run headlab run vit-heads"
"""What a reader says of a run saved before display patterns were stored (or with ``n_display=0``)."""


def display_query_grid(grid: tuple[int, int], stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the stored query patches: every ``stride``-th of each, aligned so that
    the centre patch ``(rows // 2, cols // 2)`` is one of them."""
    if stride < 1:
        raise ConfigError(f"display_stride must be >= 1 (got {stride})")
    rows, cols = grid
    return np.arange((rows // 2) % stride, rows, stride), np.arange((cols // 2) % stride, cols, stride)


def input_crops(model: LoadedModel, pixels: torch.Tensor) -> np.ndarray:
    """The images the model received, ``uint8 [n, S, S, 3]``: ``pixels`` (``model.preprocess``'s output,
    after the model's own resize, crop and normalisation) un-normalised and rounded. Exact for pixels
    made by ``model.preprocess``, which scales uint8 values by 1/255 before normalising."""
    spec = model.image
    if spec is None:
        raise ConfigError(
            f"{model.name} is not a vision model; input_crops needs its ImageSpec (model.image)"
        )
    mean = torch.as_tensor(spec.mean, dtype=torch.float64)[:, None, None]
    std = torch.as_tensor(spec.std, dtype=torch.float64)[:, None, None]
    scaled = (pixels.detach().double().cpu() * std + mean) * 255.0
    return scaled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def capture_display(
    model: LoadedModel, pixels: torch.Tensor, stride: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One eager forward over ``pixels [n, 3, S, S]``: ``(crops, attention, queries)``.

    ``crops``: :func:`input_crops`; ``attention``: ``float16 [n, L, H, Q, T]``, the post-softmax row
    of each stored query over all ``T`` keys (prefix tokens first, so a row sums to 1);
    ``queries``: ``int64 [Q, 3]`` (token, row, col) of each stored query: the prefix tokens (row and
    col ``-1``), then the patches of :func:`display_query_grid` in row-major order.
    """
    grid = _grid(model)
    n_prefix = int(model.extra["n_prefix"])
    rows, cols = display_query_grid(grid, stride)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    patch_tokens = n_prefix + rr.ravel() * grid[1] + cc.ravel()
    queries = np.concatenate([
        np.stack([np.arange(n_prefix), np.full(n_prefix, -1), np.full(n_prefix, -1)], axis=1),
        np.stack([patch_tokens, rr.ravel(), cc.ravel()], axis=1),
    ]).astype(np.int64)  # fmt: skip
    n = int(pixels.shape[0])
    attention = np.zeros((n, model.n_layers, model.n_heads, len(queries), model.n_ctx), dtype=np.float16)
    if n:
        cap = vision.capture(model, pixels, patterns="all", batch_size=n)
        index = torch.as_tensor(queries[:, 0])
        for layer in range(model.n_layers):
            attention[:, layer] = cap.patterns[layer][:, :, index].numpy().astype(np.float16)
    return input_crops(model, pixels), attention, queries


def _display_rows(labels: Sequence[str], att_rows: np.ndarray, n_display: int) -> list[int]:
    """Rows of the display images: round robin over the natural attention images (label
    ``"attention"``), the scenes and the faces, so that two are one photograph and one scene."""
    pools = [[int(r) for r in att_rows if labels[int(r)] == "attention"]]
    pools += [[i for i, x in enumerate(labels) if x == kind] for kind in ("scenes", "faces")]
    out: list[int] = []
    for group in itertools.zip_longest(*pools):
        for row in group:
            if row is not None and row not in out and len(out) < n_display:
                out.append(row)
    return out


@dataclass(frozen=True)
class DisplayImage:
    """A display image of a run: its index in the display arrays, name, source and ``uint8 [S, S, 3]``
    model-input crop."""

    index: int
    name: str
    source: str
    pixels: np.ndarray


@dataclass(frozen=True)
class DisplayPattern:
    """One head's attention from one stored query of a display image.

    ``query`` is the query patch (row, col), or None for the CLS query; ``snapped`` says it is the
    stored query nearest to the asked one. ``patches [rows, cols]`` is the attention to each key
    patch, ``prefix [n_prefix]`` to the prefix tokens (CLS first); together they sum to 1.
    """

    image: int
    layer: int
    head: int
    query: tuple[int, int] | None
    token: int
    patches: np.ndarray
    prefix: np.ndarray
    snapped: bool = False

    @property
    def cls(self) -> float:
        """Attention to CLS."""
        return float(self.prefix[0])


DisplaySource = AnalysisResult | Run


def _table_of(source: DisplaySource, name: str) -> pd.DataFrame:
    if isinstance(source, AnalysisResult):
        return source.tables[name].copy()
    return source.table(name)


def _array_of(source: DisplaySource, name: str) -> np.ndarray:
    if isinstance(source, AnalysisResult):
        return np.asarray(source.arrays[name])
    return source.array(name)


def has_display(source: DisplaySource) -> bool:
    """Whether the run (or unsaved result) stores display images and patterns."""
    if isinstance(source, AnalysisResult):
        tables, arrays = set(source.tables), set(source.arrays)
    else:
        tables, arrays = set(source.table_names), set(source.array_names)
    return "display" in tables and set(DISPLAY_ARRAYS) <= arrays


def _require_display(source: DisplaySource) -> pd.DataFrame:
    if not has_display(source):
        raise ConfigError(DISPLAY_HINT)
    return _table_of(source, "display")


def display_images(source: DisplaySource) -> list[DisplayImage]:
    """The run's display images (ConfigError with :data:`DISPLAY_HINT` when it has none)."""
    table = _require_display(source)
    crops = _array_of(source, "display_images")
    return [
        DisplayImage(int(r.image), str(r.name), str(r.source), crops[int(r.image)])
        for r in table.itertuples(index=False)
    ]


def display_geometry(source: DisplaySource) -> dict[str, Any]:
    """``grid`` (rows, cols), ``n_prefix``, ``patch_size`` (pixels of the crop), ``stride`` and
    ``queries`` (the stored query patches, (row, col) each) of the display patterns."""
    return _geometry(_require_display(source), _array_of(source, "display_queries"))


def _geometry(table: pd.DataFrame, queries: np.ndarray) -> dict[str, Any]:
    first = table.iloc[0]
    return {
        "grid": (int(first["grid_rows"]), int(first["grid_cols"])),
        "n_prefix": int(first["n_prefix"]),
        "patch_size": int(first["patch_size"]),
        "stride": int(first["stride"]),
        "queries": [(int(r), int(c)) for _, r, c in queries if r >= 0],
    }


def display_pattern(
    source: DisplaySource,
    image: int,
    layer: int,
    head: int,
    query: tuple[int, int] | Literal["cls"] | None = None,
    *,
    snap: bool = False,
) -> DisplayPattern:
    """Head ``(layer, head)``'s attention on display image ``image`` from query patch ``query``
    ((row, col); ``"cls"``: the CLS query; None: the centre patch). A patch that was not stored (see
    ``display_stride``) is an error, or with ``snap`` the nearest stored patch is used."""
    table = _require_display(source)
    queries = _array_of(source, "display_queries")
    geometry = _geometry(table, queries)
    rows, cols = geometry["grid"]
    n_prefix = geometry["n_prefix"]
    if int(image) not in set(table["image"].astype(int)):
        raise ConfigError(f"no display image {image}; the run has {', '.join(map(str, table['image']))}")
    attention = _array_of(source, "display_attention")
    n_layers, n_heads = attention.shape[1:3]
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ConfigError(f"no head ({layer}, {head}): the run has {n_layers} layers × {n_heads} heads")
    snapped = False
    if isinstance(query, str):
        if query != "cls":
            raise ConfigError(f"query is a patch (row, col), 'cls' or None, got {query!r}")
        index, where = 0, None
    else:
        wanted = (rows // 2, cols // 2) if query is None else (int(query[0]), int(query[1]))
        stored = geometry["queries"]
        if wanted in stored:
            where = wanted
        elif snap:
            where = min(stored, key=lambda rc: ((rc[0] - wanted[0]) ** 2 + (rc[1] - wanted[1]) ** 2, rc))
            snapped = True
        else:
            raise ConfigError(
                f"query patch {wanted} is not stored (stride {geometry['stride']}: rows "
                f"{sorted({r for r, _ in stored})}, cols {sorted({c for _, c in stored})}); pass snap=True "
                "for the nearest, or re-run with display_stride=1"
            )
        index = n_prefix + stored.index(where)
    row = attention[int(image), layer, head, index].astype(np.float32)
    return DisplayPattern(
        image=int(image), layer=int(layer), head=int(head), query=where, token=int(queries[index, 0]),
        patches=row[n_prefix:].reshape(rows, cols), prefix=row[:n_prefix], snapped=snapped,
    )  # fmt: skip


def display_attention(
    source: DisplaySource,
    image: int,
    layer: int,
    head: int,
    query: tuple[int, int] | Literal["cls"] | None = None,
) -> np.ndarray:
    """``float32 [rows, cols]``: the attention of :func:`display_pattern` to each key patch."""
    return display_pattern(source, image, layer, head, query).patches


# ============================================================================== the run


def _grid(model: LoadedModel) -> tuple[int, int]:
    rows, cols = model.extra["grid"]
    return int(rows), int(cols)


def _require_vision_model(model: LoadedModel) -> None:
    if model.kind != "vision" or model.bridge is not None or "grid" not in model.extra:
        raise ConfigError(
            f"{model.name} is a {model.kind} model; vit-heads analyses the heads of a vision transformer: "
            "load one with probe.load_model('clip-vit-b16') (or tiny-vit, tiny-clip-vision, a ViT/DeiT/CLIP "
            "checkpoint directory); on the CLI: headlab run vit-heads --model clip-vit-b16"
        )


def _head_list(model: LoadedModel, cfg: VitHeadsConfig, grad: np.ndarray) -> list[Head]:
    layers = sorted({int(x) for x in cfg.prune_layers}) or list(range(model.n_layers))
    heads = [(layer, h) for layer in layers for h in range(model.n_heads)]
    if cfg.prune_top_k and cfg.prune_top_k < len(heads):
        score = np.nan_to_num(np.asarray([grad[layer, h] for layer, h in heads]), nan=-1.0)
        order = np.argsort(-score, kind="stable")[: cfg.prune_top_k]
        heads = sorted(heads[int(i)] for i in order)
    return heads


def run_vit_heads(model: LoadedModel, config: VitHeadsConfig | None = None) -> AnalysisResult:
    """Head importance (full and partial pruning, gradients), attention strength and patterns, and
    vision sinks of a vision transformer (see the module docstring)."""
    cfg = config or VitHeadsConfig()
    cfg.validate()
    _require_vision_model(model)
    bad_layers = [int(x) for x in cfg.prune_layers if int(x) >= model.n_layers]
    if bad_layers:
        raise ConfigError(
            f"prune_layers {bad_layers} do not exist on {model.name} (layers 0..{model.n_layers - 1})"
        )
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    L, H = model.n_layers, model.n_heads
    grid = _grid(model)
    n_prefix = int(model.extra["n_prefix"])
    n_patches = grid[0] * grid[1]

    # ---------------------------------------------------------------- data
    t0 = time.perf_counter()
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
    all_names = data.names + extra_names
    pixels = model.preprocess(data.pixels + extra_pixels)
    train_rows = data.rows("train")
    rng = np.random.default_rng(cfg.seed + 1)
    queries = np.sort(rng.choice(n_patches, size=min(cfg.pattern_queries, n_patches), replace=False))
    timings["data"] = round(time.perf_counter() - t0, 3)

    # ---------------------------------------------------------------- one pass: embeddings, attention, norms
    t0 = time.perf_counter()
    cap = _capture_pass(model, pixels, att_rows, train_rows, cfg, queries)
    timings["capture"] = round(time.perf_counter() - t0, 3)

    # ---------------------------------------------------------------- display images: crops and patterns
    t0 = time.perf_counter()
    row_sources = [*data.source.tolist(), *(["attention"] * len(extra_names))]
    display_rows = _display_rows(row_sources, att_rows, cfg.n_display)
    display_arrays: dict[str, np.ndarray] = {}
    display_frame: pd.DataFrame | None = None
    if display_rows:
        crops, display_att, display_queries = capture_display(model, pixels[display_rows], cfg.display_stride)
        display_arrays = {
            "display_images": crops, "display_attention": display_att, "display_queries": display_queries,
        }  # fmt: skip
        display_frame = pd.DataFrame({
            "image": np.arange(len(display_rows)), "name": [all_names[r] for r in display_rows],
            "source": [cfg.attention_images if row_sources[r] == "attention" else row_sources[r]
                       for r in display_rows],
            "images_row": display_rows, "grid_rows": grid[0], "grid_cols": grid[1], "n_prefix": n_prefix,
            "patch_size": crops.shape[1] // grid[0], "stride": cfg.display_stride,
        })  # fmt: skip
    timings["display"] = round(time.perf_counter() - t0, 3)

    # ---------------------------------------------------------------- probes
    t0 = time.perf_counter()
    emb = cap.embeddings.numpy()
    probes: dict[str, LinearProbe] = {}
    probe_rows: list[dict[str, Any]] = []
    test_rows = data.rows("test")
    for task in cfg.tasks:
        tr, ytr = _rows_and_labels(data.labels[task][train_rows])
        te, yte = _rows_and_labels(data.labels[task][test_rows])
        row: dict[str, Any] = {"task": task, "source": "faces" if task == "face" else "scenes",
                               "n_train": len(tr), "n_test": len(te)}  # fmt: skip
        counts = pd.Series(yte).value_counts() if yte else pd.Series(dtype=float)
        row["chance"] = float(counts.iloc[0] / len(yte)) if yte else math.nan
        try:
            probe = LinearProbe.fit(task, emb[train_rows[tr]], ytr, c=cfg.probe_c, seed=cfg.seed)
        except ConfigError as err:
            probe_rows.append({**row, "classes": "", "train_accuracy": math.nan, "test_accuracy": math.nan,
                               "test_confidence": math.nan, "status": f"skipped: {err}"})  # fmt: skip
            continue
        probes[task] = probe
        train_acc, _ = probe.score(emb[train_rows[tr]], ytr)
        test_acc, test_conf = probe.score(emb[test_rows[te]], yte) if len(te) else (math.nan, math.nan)
        probe_rows.append({**row, "classes": " ".join(probe.classes), "train_accuracy": train_acc,
                           "test_accuracy": test_acc, "test_confidence": test_conf, "status": "ok"})  # fmt: skip
    probes_frame = pd.DataFrame(probe_rows)
    if not probes:
        raise ConfigError(
            "no probe could be trained (each task's train split has a single class); raise n_scenes / n_faces"
        )
    eval_rows = _eval_rows(data, cfg.n_eval)
    eval_labels = {t: data.labels[t][eval_rows] for t in probes}
    eval_pixels = pixels[eval_rows]
    clean = cap.embeddings[eval_rows]
    timings["probes"] = round(time.perf_counter() - t0, 3)

    # ---------------------------------------------------------------- gradient importance
    t0 = time.perf_counter()
    grads = head_gradients(
        model, eval_pixels, probes, eval_labels, per_task=cfg.grad_per_task,
        batch_size=max(1, min(cfg.batch_size, 16)), progress=cfg.progress,
    )  # fmt: skip
    grad_mean = np.nanmean(np.stack(list(grads.values())), axis=0)
    timings["gradients"] = round(time.perf_counter() - t0, 3)

    # ---------------------------------------------------------------- full pruning
    t0 = time.perf_counter()
    heads = _head_list(model, cfg, grad_mean)
    n_candidates = (len(set(cfg.prune_layers)) or L) * H
    conditions = [PruneCondition(h) for h in heads]
    pruned = pruned_embeddings(
        model, eval_pixels, conditions, mode=cfg.ablation, means=cap.means, batch_size=cfg.batch_size,
        progress=cfg.progress, desc="pruning heads",
    )  # fmt: skip
    full = pruning_effects(probes, eval_labels, clean, pruned)
    acc_drop, conf_drop = full.mean_drops()
    cols = {k: np.full((L, H), np.nan) for k in ("accuracy_drop", "confidence_drop", "cosine_drop")}
    for i, (layer, h) in enumerate(heads):
        cols["accuracy_drop"][layer, h] = acc_drop[i]
        cols["confidence_drop"][layer, h] = conf_drop[i]
        cols["cosine_drop"][layer, h] = full.cosine_drop[i]
    timings["pruning"] = round(time.perf_counter() - t0, 3)

    # ---------------------------------------------------------------- partial pruning
    t0 = time.perf_counter()
    masks = query_masks(model, cfg.regions, cfg.bands)
    ranked = sorted(range(len(heads)), key=lambda i: (-np.nan_to_num(conf_drop[i], nan=-np.inf), i))
    partial_heads = [heads[i] for i in ranked[: cfg.partial_heads]] if masks else []
    partial_conditions = [PruneCondition(h, m["name"], m["mask"]) for h in partial_heads for m in masks]
    partial_frames: list[pd.DataFrame] = []
    partial_long: pd.DataFrame | None = None
    if partial_conditions:
        part_emb = pruned_embeddings(
            model, eval_pixels, partial_conditions, mode=cfg.ablation, means=cap.means,
            batch_size=cfg.batch_size, progress=cfg.progress, desc="partial pruning",
        )  # fmt: skip
        part = pruning_effects(probes, eval_labels, clean, part_emb)
        p_acc, p_conf = part.mean_drops()
        by_name = {m["name"]: m for m in masks}
        full_index = {h: i for i, h in enumerate(heads)}
        rows = []
        for i, cond in enumerate(partial_conditions):
            m = by_name[cond.name]
            j = full_index[cond.head]
            rows.append({
                "layer": cond.head[0], "head": cond.head[1], "condition": cond.name, "kind": m["kind"],
                "inner": m["inner"], "outer": m["outer"], "n_queries": int(m["mask"].sum()),
                "query_share": float(m["mask"].sum()) / model.n_ctx, "accuracy_drop": p_acc[i],
                "confidence_drop": p_conf[i], "cosine_drop": part.cosine_drop[i],
                "share_of_full": p_conf[i] / conf_drop[j] if conf_drop[j] else math.nan,
                "cosine_share_of_full": part.cosine_drop[i] / full.cosine_drop[j] if full.cosine_drop[j] else math.nan,
            })  # fmt: skip
        for head in partial_heads:
            j = full_index[head]
            rows.append({
                "layer": head[0], "head": head[1], "condition": "full", "kind": "full", "inner": math.nan,
                "outer": math.nan, "n_queries": n_patches + n_prefix, "query_share": 1.0,
                "accuracy_drop": acc_drop[j], "confidence_drop": conf_drop[j], "cosine_drop": full.cosine_drop[j],
                "share_of_full": 1.0, "cosine_share_of_full": 1.0,
            })  # fmt: skip
        partial_frames.append(pd.DataFrame(rows))
        partial_long = part.long()
        meta = pd.DataFrame(
            [{"layer": c.head[0], "head": c.head[1], "condition_name": c.name} for c in partial_conditions]
        )
        partial_long = partial_long.join(meta, on="condition").drop(columns="condition")
        partial_long = partial_long.rename(columns={"condition_name": "condition"})
    partial = (
        pd.concat(partial_frames, ignore_index=True).sort_values(["layer", "head", "kind", "condition"], ignore_index=True)
        if partial_frames
        else pd.DataFrame(columns=["layer", "head", "condition", "kind", "inner", "outer", "n_queries",
                                   "query_share", "accuracy_drop", "confidence_drop", "cosine_drop", "share_of_full",
                                   "cosine_share_of_full"])
    )  # fmt: skip
    timings["partial"] = round(time.perf_counter() - t0, 3)

    # ---------------------------------------------------------------- importance (long)
    full_long = full.long()
    meta = pd.DataFrame([{"layer": h[0], "head": h[1]} for h in heads])
    full_long = full_long.join(meta, on="condition").drop(columns="condition")
    full_long["condition"] = "full"
    grad_frames = [
        pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L), "task": task,
                      "metric": "grad_importance", "value": g.ravel(), "condition": "full"})
        for task, g in grads.items()
    ]  # fmt: skip
    importance = pd.concat([full_long, *grad_frames, *([partial_long] if partial_long is not None else [])],
                           ignore_index=True)[["layer", "head", "condition", "task", "metric", "value"]]  # fmt: skip

    # ---------------------------------------------------------------- attention strength
    t0 = time.perf_counter()
    distances, strength = va.distance_profile(cap.offset)  # [D], [L, H, D]
    distance = pd.DataFrame({
        "layer": np.repeat(np.arange(L), H * len(distances)),
        "head": np.tile(np.repeat(np.arange(H), len(distances)), L),
        "distance": np.tile(distances, L * H), "strength": strength.ravel(),
    })  # fmt: skip
    self_strength = cap.offset[:, :, grid[0] - 1, grid[1] - 1]
    ring1 = np.flatnonzero(distances == 1)
    neighbour = strength[:, :, int(ring1[0])] if ring1.size else np.full((L, H), np.nan)
    trend_frames = []
    trend_notes: dict[str, dict[str, float]] = {}
    for metric, values in (("mean_attention_distance", cap.mad), ("patch_share", cap.patch_share),
                           ("self_strength", self_strength), ("neighbour_strength", neighbour)):  # fmt: skip
        trend = va.layer_trend(values)
        frame = trend.frame()
        frame.insert(0, "metric", metric)
        trend_frames.append(frame)
        trend_notes[metric] = {"slope": trend.slope, "intercept": trend.intercept, "r": trend.r}
    attention_trend = pd.concat(trend_frames, ignore_index=True)
    timings["strength"] = round(time.perf_counter() - t0, 3)

    # ---------------------------------------------------------------- patterns
    t0 = time.perf_counter()
    arrays: dict[str, np.ndarray] = {"offset_maps": cap.offset.astype(np.float32), **display_arrays}
    cluster_col = np.full((L, H), np.nan)
    cluster_share = np.full((L, H), np.nan)
    group_col = np.full((L, H), np.nan)
    clusters = pd.DataFrame(columns=["layer", "head", "cluster", "share"])
    cluster_info = pd.DataFrame(columns=["cluster", "n_maps", "map_share", "n_heads_dominant", "prototype_self",
                                         "prototype_distance"])  # fmt: skip
    notes_patterns: dict[str, Any] = {"maps": len(cap.maps)}
    if len(cap.maps) >= 3:
        codes, losses, _ = va.fit_autoencoder(
            cap.maps, code_dim=cfg.code_dim, epochs=cfg.ae_epochs, seed=cfg.seed, progress=cfg.progress
        )
        labels, centroids = va.cluster_codes(codes, k=cfg.n_clusters or None, seed=cfg.seed)
        k = len(centroids)
        mix = va.head_cluster_mix(labels, cap.map_head, L * H, k)  # [L·H, k]
        dominant = va.group_heads(mix)
        rows_with_maps = mix[np.isfinite(mix).all(axis=1)]
        # k-means cannot make more groups than there are distinct mixes (a random model's heads share one).
        distinct = int(np.unique(np.round(rows_with_maps, 6), axis=0).shape[0])
        groups = va.group_heads(
            mix, method="kmeans", n_groups=max(1, min(cfg.n_groups, distinct)), seed=cfg.seed
        )
        prototypes = va.cluster_prototypes(cap.maps, labels, k)
        cluster_col = np.where(dominant >= 0, dominant, np.nan).reshape(L, H).astype(np.float64)
        cluster_share = np.nanmax(np.where(np.isfinite(mix), mix, -1.0), axis=1).reshape(L, H)
        cluster_share[~np.isfinite(cluster_col)] = np.nan
        group_col = np.where(groups >= 0, groups, np.nan).reshape(L, H).astype(np.float64)
        clusters = pd.DataFrame({
            "layer": np.repeat(np.arange(L), H * k), "head": np.tile(np.repeat(np.arange(H), k), L),
            "cluster": np.tile(np.arange(k), L * H), "share": mix.ravel(),
        })  # fmt: skip
        gr, gc = grid
        dr, dc = np.meshgrid(np.arange(-(gr - 1), gr), np.arange(-(gc - 1), gc), indexing="ij")
        dist_cells = np.sqrt(dr**2 + dc**2)
        info = []
        for c in range(k):
            proto = prototypes[c].astype(np.float64)
            total = float(np.nansum(proto))
            info.append({
                "cluster": c, "n_maps": int((labels == c).sum()), "map_share": float((labels == c).mean()),
                "n_heads_dominant": int((dominant == c).sum()),
                "prototype_self": float(proto[gr - 1, gc - 1] / total) if total > 0 else math.nan,
                "prototype_distance": float((proto * dist_cells).sum() / total) if total > 0 else math.nan,
            })  # fmt: skip
        cluster_info = pd.DataFrame(info)
        arrays.update(
            cluster_centroids=np.asarray(centroids, dtype=np.float32),
            cluster_prototypes=prototypes.astype(np.float32),
            cluster_mix=np.asarray(mix, dtype=np.float32),
        )
        notes_patterns.update(k=k, autoencoder_loss_first=losses[0], autoencoder_loss_last=losses[-1],
                              queries=queries.tolist(), images=int(cfg.pattern_images))  # fmt: skip
    timings["patterns"] = round(time.perf_counter() - t0, 3)

    # ---------------------------------------------------------------- vision sinks
    input_set = cfg.attention_images
    att_names = [all_names[int(r)] for r in att_rows]
    sinks, norms, artifacts = _sink_tables(model, cap, att_names, input_set, cfg)
    with np.errstate(invalid="ignore"):
        alpha0_head = np.nanmean(cap.alpha0, axis=0)
        sink_rate = np.nanmean((cap.alpha0 > cfg.sink_eps).astype(np.float64), axis=0)
    alpha_art_head = _nanmean0(cap.alpha_artifacts)

    # ---------------------------------------------------------------- heads + agreement
    pruned_mask = np.zeros((L, H))
    for layer, h in heads:
        pruned_mask[layer, h] = 1.0
    head_table = heads_frame(model, {
        "pruned": pruned_mask, **cols, "grad_importance": grad_mean,
        "mean_attention_distance": cap.mad, "patch_share": cap.patch_share, "self_strength": self_strength,
        "neighbour_strength": neighbour, "cluster": cluster_col, "cluster_share": cluster_share, "group": group_col,
        f"alpha0_{input_set}": alpha0_head, f"sink_rate_{input_set}": sink_rate,
        f"alpha_artifacts_{input_set}": alpha_art_head,
    })  # fmt: skip
    head_table["pruned"] = head_table["pruned"].astype(bool)
    for name in ("cluster", "group"):
        head_table[name] = head_table[name].astype("Int64")
    for task, g in grads.items():
        head_table[f"grad_importance_{task}"] = g.ravel()
    for task in full.accuracy:
        conf = np.full((L, H), np.nan)
        for i, (layer, h) in enumerate(heads):
            conf[layer, h] = full.confidence_drop(task)[i]
        head_table[f"confidence_drop_{task}"] = conf.ravel()
    agree = agreement(head_table[head_table["pruned"]], IMPORTANCE_METRICS)
    arrays["agreement"] = (
        agree.pivot(index="metric_a", columns="metric_b", values="spearman")
        .loc[list(IMPORTANCE_METRICS), list(IMPORTANCE_METRICS)].to_numpy(dtype=np.float32)
    )  # fmt: skip

    timings["total"] = round(time.perf_counter() - t_start, 3)
    clean_scores = pd.DataFrame([
        {"task": t, "eval_accuracy": full.clean_accuracy[t], "eval_confidence": full.clean_confidence[t],
         "n_eval": len(_rows_and_labels(eval_labels[t])[0])}
        for t in full.clean_accuracy
    ])  # fmt: skip
    probes_frame = (
        probes_frame.merge(clean_scores, on="task", how="left") if len(clean_scores) else probes_frame
    )
    images_frame = pd.DataFrame({
        "name": all_names, "source": [*data.source.tolist(), *(["attention"] * len(extra_names))],
        "split": [*data.split.tolist(), *(["attention"] * len(extra_names))],
        "eval": np.isin(np.arange(len(all_names)), eval_rows),
        "attention": np.isin(np.arange(len(all_names)), att_rows),
        **{f"label_{t}": [*data.labels[t].tolist(), *([None] * len(extra_names))] for t in cfg.tasks},
    })  # fmt: skip
    return AnalysisResult(
        analysis="vit-heads",
        model_info=model.describe(),
        config=cfg,
        tables={
            "heads": head_table,
            "importance": importance,
            "partial": partial,
            "agreement": agree,
            "probes": probes_frame,
            "distance": distance,
            "attention_trend": attention_trend,
            "clusters": clusters,
            "cluster_info": cluster_info,
            "sinks": sinks,
            "norms": norms,
            "artifacts": artifacts,
            "images": images_frame,
            **({"display": display_frame} if display_frame is not None else {}),
        },
        arrays=arrays,
        seeds={"data": cfg.seed, "queries": cfg.seed + 1, "autoencoder": cfg.seed, "kmeans": cfg.seed},
        timings=timings,
        notes={
            "metrics": METRIC_LABELS,
            "ablation": cfg.ablation,
            "pruned_heads": len(heads),
            "head_selection": (
                f"the top {len(heads)} heads by gradient importance (agreement is over this selected subset)"
                if len(heads) < n_candidates
                else "every head of the pruned layers"
            ),
            "eval_images": len(eval_rows),
            "partial_heads": [list(h) for h in partial_heads],
            "partial": "head removed only at the listed patch queries (CLS keeps it); regions of the grid "
            "or rings around the grid centre; share_of_full = partial / full confidence drop; "
            "cosine_share_of_full = partial / full cosine drop",
            "distance": "strength = mean attention per (patch query, patch key) pair at that integer "
            "distance (patch units); CLS mass not included",
            "trend": trend_notes,
            "patterns": notes_patterns,
            "sinks": f"artifact token: patch whose resid_pre norm > {cfg.artifact_ratio} × the median patch norm "
            f"of its image and layer; alpha0 = mean attention from all queries to CLS; sink_rate: share of "
            f"images with alpha0 > {cfg.sink_eps}",
            "faithfulness": "best effort: only the paper's abstract was available; see the module docstring",
            "input_set": input_set,
            "display": (
                f"{len(display_rows)} display images: model-input crops (display_images, uint8) and every "
                f"head's attention (display_attention, float16 [image, layer, head, query, key]) from the "
                f"CLS query and from a query patch every {cfg.display_stride} rows and columns (display_queries: token, "
                "row, col); read with analyses.vit_heads.display_pattern"
                if display_rows
                else "no display images (n_display=0)"
            ),
        },
    )


def _nanmean0(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=0)
    count = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _sink_tables(
    model: LoadedModel, cap: _Capture, names: Sequence[str], input_set: str, cfg: VitHeadsConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(``sinks`` per (layer, head), ``norms`` per (layer, token kind), ``artifacts`` per token)."""
    L, H = model.n_layers, model.n_heads
    n_prefix = int(model.extra["n_prefix"])
    gc = int(model.extra["grid"][1])
    n_img = cap.alpha0.shape[0]
    art = artifact_mask(cap.norms, n_prefix, cfg.artifact_ratio)  # [n, L+1, T]
    n_art = art[:, :L].sum(-1)  # [n, L]
    sem = np.nanstd(cap.alpha0, axis=0, ddof=1) / math.sqrt(n_img) if n_img > 1 else np.zeros((L, H))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_token = cap.alpha_artifacts / np.where(n_art > 0, n_art, np.nan)[:, :, None]
    sinks = pd.DataFrame({
        "input_set": input_set,
        "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
        "alpha0": np.nanmean(cap.alpha0, axis=0).ravel(), "alpha0_sem": np.asarray(sem).ravel(),
        "sink_rate": (cap.alpha0 > cfg.sink_eps).mean(axis=0).ravel(),
        "alpha_prefix": np.nanmean(cap.alpha_prefix, axis=0).ravel(),
        "alpha_artifacts": _nanmean0(cap.alpha_artifacts).ravel(),
        "alpha_artifacts_per_token": _nanmean0(per_token).ravel(),
        "uniform_artifacts": np.repeat(n_art.mean(axis=0) / model.n_ctx, H),
        "images_with_artifacts": np.repeat((n_art > 0).sum(axis=0), H),
    })  # fmt: skip
    norm_rows = []
    listing = []
    for layer in range(L):
        norms = cap.norms[:, layer]  # resid_pre of this layer [n, T]
        mask = art[:, layer]
        patch_mask = np.zeros_like(mask)
        patch_mask[:, n_prefix:] = True
        other = patch_mask & ~mask
        other_norm = float(norms[other].mean()) if other.any() else math.nan
        median = np.median(norms[:, n_prefix:], axis=-1)
        norm_rows.append({"input_set": input_set, "layer": layer, "quantity": "hidden", "token": "cls",
                          "sink_norm": float(norms[:, 0].mean()), "other_norm": other_norm,
                          "n_tokens": 1.0, "median_norm": float(median.mean())})  # fmt: skip
        norm_rows.append({"input_set": input_set, "layer": layer, "quantity": "hidden", "token": "artifacts",
                          "sink_norm": float(norms[mask].mean()) if mask.any() else math.nan,
                          "other_norm": other_norm, "n_tokens": float(mask.sum(-1).mean()),
                          "median_norm": float(median.mean())})  # fmt: skip
        for i, token in zip(*np.nonzero(mask), strict=True):
            patch = int(token) - n_prefix
            listing.append({"input_set": input_set, "image": names[int(i)], "layer": layer, "token": int(token),
                            "row": patch // gc, "col": patch % gc, "norm": float(norms[i, token]),
                            "median_norm": float(median[i]), "ratio": float(norms[i, token] / median[i])})  # fmt: skip
    norms_frame = pd.DataFrame(norm_rows)
    norms_frame["ratio"] = norms_frame["sink_norm"] / norms_frame["other_norm"]
    artifacts = pd.DataFrame(
        listing,
        columns=["input_set", "image", "layer", "token", "row", "col", "norm", "median_norm", "ratio"],
    )
    return sinks, norms_frame, artifacts


# ============================================================================== reporting


def summary(result: AnalysisResult) -> str:
    """A few lines for the CLI: probes, the most important heads, agreement, strength trend, clusters, sinks."""
    cfg = result.config
    heads = result.heads
    notes = result.notes
    probes = result.tables["probes"]
    lines = [
        f"vit-heads of {result.model_info['name']}: {cfg.ablation} ablation, {notes['pruned_heads']}/{len(heads)} "
        f"heads pruned on {notes['eval_images']} eval images"
    ]
    acc = ", ".join(
        f"{r.task} {r.test_accuracy:.2f} (chance {r.chance:.2f})"
        for r in probes.itertuples()
        if r.status == "ok"
    )
    lines.append(f"  probe test accuracy: {acc}")
    pruned = heads[heads["pruned"]]
    if len(pruned):
        top = pruned.nlargest(5, "confidence_drop")
        lines.append(
            "  top heads by confidence drop: "
            + ", ".join(
                f"L{r.layer}H{r.head} {r.confidence_drop:+.3f} (acc {r.accuracy_drop:+.2f})"
                for r in top.itertuples()
            )
        )
    top_grad = heads.nlargest(3, "grad_importance")
    lines.append(
        "  top by gradient: "
        + ", ".join(f"L{r.layer}H{r.head} {r.grad_importance:.3g}" for r in top_grad.itertuples())
    )
    agree = result.tables["agreement"]
    pairs = agree[(agree["metric_a"] == "confidence_drop") & (agree["metric_b"] != "confidence_drop")]
    if len(pairs):
        lines.append(
            f"  Spearman with confidence_drop (n={int(pairs['n_heads'].iloc[0])}): "
            + ", ".join(f"{r.metric_b} {r.spearman:.2f}" for r in pairs.itertuples())
        )
    partial = result.tables["partial"]
    if len(partial):
        full = partial[partial["kind"] == "full"].nlargest(3, "confidence_drop")
        part = partial[partial["kind"] != "full"].merge(full[["layer", "head"]], on=["layer", "head"])
        if len(full) < partial.loc[partial["kind"] == "full"].shape[0]:
            lines.append(f"  partial pruning (top {len(full)} of the partially pruned heads):")
        for (layer, head), group in part.groupby(["layer", "head"]):
            lines.append(
                f"  partial L{layer}H{head}: "
                + ", ".join(
                    f"{r.condition} {r.share_of_full:.2f} ({r.cosine_share_of_full:.2f})"
                    for r in group.itertuples()
                )
                + " of the full confidence (cosine) drop"
            )
    trend = notes["trend"]["mean_attention_distance"]
    mad = heads.groupby("layer")["mean_attention_distance"].mean()
    lines.append(
        f"  mean attention distance (patches): layer 0 {mad.iloc[0]:.2f} -> layer {mad.index[-1]} {mad.iloc[-1]:.2f} "
        f"(slope {trend['slope']:+.3f}/layer, r {trend['r']:.2f})"
    )
    info = result.tables["cluster_info"]
    if len(info):
        lines.append(
            f"  {len(info)} pattern clusters over {notes['patterns']['maps']} maps: "
            + ", ".join(
                f"#{int(r.cluster)} {r.map_share:.0%} (dist {r.prototype_distance:.1f}, self {r.prototype_self:.2f})"
                for r in info.itertuples()
            )
        )
    norms = result.tables["norms"]
    art = norms[(norms["token"] == "artifacts") & (norms["n_tokens"] > 0)]
    if len(art):
        best = art.loc[art["ratio"].idxmax()]
        lines.append(
            f"  artifact tokens in layers {int(art['layer'].min())}-{int(art['layer'].max())}: up to "
            f"{art['n_tokens'].max():.1f} per image, norm {best['ratio']:.1f}× the other patches (layer {int(best['layer'])})"
        )
        col = f"alpha_artifacts_{notes['input_set']}"
        top = heads.nlargest(3, col)
        lines.append(
            "  heads attending most to them: "
            + ", ".join(f"L{r.layer}H{r.head} {getattr(r, col):.2f}" for r in top.itertuples())
        )
    else:
        lines.append("  no artifact tokens above the norm threshold")
    input_set = notes["input_set"]
    n_sink = int((heads[f"sink_rate_{input_set}"] > 0.5).sum())
    lines.append(
        f"  mean attention to CLS: {heads[f'alpha0_{input_set}'].mean():.3f}; heads with alpha0 > "
        f"{cfg.sink_eps} on most images: {n_sink}/{len(heads)}"
    )
    return "\n".join(lines)


__all__ = [
    "DISPLAY_ARRAYS",
    "DISPLAY_HINT",
    "IMPORTANCE_METRICS",
    "REGIONS",
    "SMALL",
    "DisplayImage",
    "DisplayPattern",
    "Effects",
    "LinearProbe",
    "ProbeSet",
    "PruneCondition",
    "VitHeadsConfig",
    "agreement",
    "artifact_mask",
    "build_probe_set",
    "capture_display",
    "display_attention",
    "display_geometry",
    "display_images",
    "display_pattern",
    "display_query_grid",
    "has_display",
    "head_gradients",
    "input_crops",
    "pruned_embeddings",
    "pruning_effects",
    "query_masks",
    "run_vit_heads",
    "summary",
]


ANALYSIS = register(
    Analysis(
        name="vit-heads",
        config_cls=VitHeadsConfig,
        run=run_vit_heads,
        summary=summary,
        help=(
            "ViT heads (vision models; default clip-vit-b16): pruning importance, attention strength, "
            "patterns, artifact tokens."
        ),
        default_model="clip-vit-b16",
        aliases=("vit_heads",),
        page="dashboard.vit_heads.page:VitPage",
        report="dashboard.vit_heads.report:report_sections",
        # the small preset (few images, the strongest heads by gradient pruned)
        demo={"preset": "small"},
    )
)
