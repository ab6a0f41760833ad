"""Training a LLaVA's projector (optionally with LoRA deltas on its language model) on image-text pairs.

LLaVA's first stage: the image tower and the language model stay frozen (unless ``lora_rank > 0``)
and the loss is the language model's cross-entropy on the answer tokens of (image, prompt, answer)
triples. The tower's features are computed once per image and cached on disk
(:func:`extract_features`), so each step runs only projector -> language model -> loss.
:func:`train` runs the steps; :func:`save` writes the projector file, its record and the loss
figure. The scene data and the recipe live in :mod:`analyses.tasks.scene_captions`; the command is
``headlab train scene-llava``. Stages, each importing only the ones before it: ``config`` <-
``features``, ``tokens``, ``parts`` <- ``loop`` <- ``outputs``.

See docs/scene-llava.md (training the projector) and docs/models.md (projector files).
"""

from __future__ import annotations

from probe.vlm_train.config import IGNORE, LORA_TARGETS, ImageSet, TrainConfig, TrainExample, TrainResult
from probe.vlm_train.features import extract_features
from probe.vlm_train.loop import train
from probe.vlm_train.outputs import save
from probe.vlm_train.parts import _Parts
from probe.vlm_train.tokens import _batch, _tokenize

__all__ = [
    "IGNORE",
    "LORA_TARGETS",
    "ImageSet",
    "TrainConfig",
    "TrainExample",
    "TrainResult",
    "_Parts",
    "_batch",
    "_tokenize",
    "extract_features",
    "save",
    "train",
]
