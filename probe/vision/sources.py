"""The vision model sources and the ONNX converter, registered with probe.sources and probe.zoo.

Importing :mod:`probe.vision` registers them (see docs/models.md, model sources).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from probe import onnx_clip, zoo
from probe.checksums import checkpoint_sha256, state_sha256
from probe.images import CLIP_IMAGE
from probe.model import LoadedModel
from probe.sources import CATALOGUE, DIRECTORY, TINY, ModelRequest, ModelSource, register
from probe.tiny import TINY_BUILDERS
from probe.vision.arch import vision_family
from probe.vision.load import load_checkpoint, wrap_vision


def convert_onnx_clip_vision(onnx_file: Path, out: Path) -> None:
    """INT8 ONNX CLIP image tower -> a float32 ``CLIPVisionModelWithProjection`` checkpoint.

    Dequantises every weight and checks that the mapping fills the model exactly
    (:mod:`probe.onnx_clip`); also writes CLIP's ``preprocessor_config.json`` so the directory
    says how its images are prepared.
    """
    onnx_clip.convert(onnx_file, out)
    (out / "preprocessor_config.json").write_text(json.dumps(CLIP_IMAGE.to_processor_config(), indent=2))


zoo.register_converter("onnx-clip-vision", convert_onnx_clip_vision)


def load_embedded(
    spec: zoo.ModelSpec, directory: Path, marker: dict[str, Any], *, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    """Wrap a catalogue vision model from its converted (and checked) cache directory."""
    hf_model, family, image = load_checkpoint(directory, dtype)
    source = spec.weight_parts[0].locate() if len(spec.weight_parts) == 1 else None
    companions = {
        name: {"path": str(directory / name), "description": text}
        for name, text in (marker.get("companions") or {}).items()
        if (directory / name).is_file()
    }
    return wrap_vision(
        spec.name,
        family,
        "embedded",
        hf_model,
        image,
        device=device,
        dtype=dtype,
        weight_sha256=str(marker.get("source_sha256")),
        path=str(directory),
        caveat=spec.caveat,
        licence=spec.licence,
        extra={
            "onnx_file": str(source) if source is not None and source.suffix == ".onnx" else None,
            "onnx_sha256": spec.weight_sha256,
            "companions": companions,
        },
    )


def _is_tiny(request: ModelRequest) -> bool:
    builder = TINY_BUILDERS.get(request.name)
    return builder is not None and builder.kind == "vision"


def _load_tiny(request: ModelRequest) -> LoadedModel:
    builder = TINY_BUILDERS[request.name]
    model, _ = builder.build(request.seed, request.tiny_words)
    return wrap_vision(
        request.name,
        builder.family,
        "tiny",
        model,
        device=request.device,
        dtype=request.dtype,
        weight_sha256=state_sha256(model),
        path=None,
        licence="n/a (random weights)",
    )


def _in_catalogue(request: ModelRequest) -> bool:
    return request.name in zoo.CATALOGUE and zoo.CATALOGUE[request.name].kind == "vision"


def _load_catalogue(request: ModelRequest) -> LoadedModel:
    spec = zoo.CATALOGUE[request.name]
    # every file checked against the marker before it is read; so is the marker's source_sha256
    directory, marker = zoo.verified_cache(spec, fetch_if_missing=request.fetch_if_missing)
    return load_embedded(spec, directory, marker, device=request.device, dtype=request.dtype)


def _is_vision_dir(request: ModelRequest) -> bool:
    return request.path.is_dir() and vision_family(request.config) is not None


def _load_dir(request: ModelRequest) -> LoadedModel:
    path = request.path
    hf_model, family, image = load_checkpoint(path, request.dtype)
    return wrap_vision(
        path.name,
        family,
        "local",
        hf_model,
        image,
        device=request.device,
        dtype=request.dtype,
        weight_sha256=checkpoint_sha256(path),
        path=str(path),
    )


register(
    ModelSource("tiny-vision", TINY + 10, "a tiny random vision model built in memory", _is_tiny, _load_tiny)
)
register(
    ModelSource(
        "catalogue-vision",
        CATALOGUE + 10,
        "an embedded vision model of the catalogue, converted once into the cache",
        _in_catalogue,
        _load_catalogue,
    )
)
register(
    ModelSource(
        "vision-directory",
        DIRECTORY + 20,
        "a local ViT, DeiT, CLIP, SigLIP or DINOv2 checkpoint directory",
        _is_vision_dir,
        _load_dir,
    )
)
