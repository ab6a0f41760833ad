"""Vision transformers in probe: loading, preprocessing, capture and head gates with torch hooks.

TransformerLens cannot wrap a standalone ViT or CLIP image tower, so probe hooks the transformers
modules directly (:class:`ModuleHooks`). Supported families are data (:data:`ARCHITECTURES`: CLIP
image towers, ViT, DeiT); attention always runs eager so that patterns can be read. Stages, each
importing only the ones before it: ``arch`` (layouts) <- ``load`` (checkpoints, wrapping) <-
``hooks`` (module hooks, checks, query masks) <- ``forward`` (embeddings) <- ``reading`` (patterns,
head outputs, residual norms, image reducers), ``gates`` (head gates and importance), ``fidelity``
(agreement with the ONNX graph) <- ``sources`` (the vision model sources, registered on import).

See docs/models.md (vision architectures), docs/capture.md (vision models) and
docs/interventions.md (vision head gates).
"""

from __future__ import annotations

from probe.checkpoints import force_eager, read_config
from probe.checksums import checkpoint_sha256
from probe.images import (
    CLIP_IMAGE,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageInput,
    ImageSpec,
    Resample,
)
from probe.types import HeadSelection
from probe.vision.arch import ARCHITECTURES, MODEL_TYPES, VisionArch, vision_family
from probe.vision.fidelity import converted_onnx_file, onnx_agreement
from probe.vision.forward import VisionOutput, embed, forward
from probe.vision.gates import GateMode, gate_heads, gate_importance, gate_variables, mean_head_outputs
from probe.vision.hooks import ModuleHooks, distance_band, module_hooks, region_mask
from probe.vision.load import check_eager, load_checkpoint, wrap_vision
from probe.vision.reading import GridDistance, KeyAttention, VisionCapture, capture, residual_norms
from probe.vision.sources import convert_onnx_clip_vision, load_embedded

__all__ = [
    "ARCHITECTURES",
    "CLIP_IMAGE",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_TYPES",
    "GateMode",
    "GridDistance",
    "HeadSelection",
    "ImageInput",
    "ImageSpec",
    "KeyAttention",
    "ModuleHooks",
    "Resample",
    "VisionArch",
    "VisionCapture",
    "VisionOutput",
    "capture",
    "check_eager",
    "checkpoint_sha256",
    "convert_onnx_clip_vision",
    "converted_onnx_file",
    "distance_band",
    "embed",
    "force_eager",
    "forward",
    "gate_heads",
    "gate_importance",
    "gate_variables",
    "load_checkpoint",
    "load_embedded",
    "mean_head_outputs",
    "module_hooks",
    "onnx_agreement",
    "read_config",
    "region_mask",
    "residual_norms",
    "vision_family",
    "wrap_vision",
]
