"""How close the dequantised CLIP tower is to the ONNX graph it was converted from.

See docs/models.md (clip-vit-b16).
"""

from __future__ import annotations

from pathlib import Path

import torch

from probe import cache, onnx_clip
from probe.errors import ConfigError, HeadlabError
from probe.images import ImageInput
from probe.model import LoadedModel
from probe.vision.forward import embed
from probe.vision.hooks import _pixels, _require_vision


def converted_onnx_file(model: LoadedModel) -> Path:
    """The ONNX graph ``model`` was converted from, re-checked against the sha256 recorded at conversion."""
    source = model.extra.get("onnx_file")
    if not source:
        raise ConfigError(
            f"{model.name} was not converted from an ONNX graph; pass onnx_file= (a CLIP image tower "
            "exported to ONNX with an image_embeds output)"
        )
    onnx_file = Path(source)
    expected = model.extra.get("onnx_sha256")
    if expected and cache.sha256_file(onnx_file) != expected:
        raise HeadlabError(
            f"{onnx_file} has changed since {model.name} was converted; reconvert with: "
            f"headlab fetch {model.name} --force"
        )
    return onnx_file


def onnx_agreement(
    model: LoadedModel,
    images: ImageInput,
    *,
    onnx_file: str | Path | None = None,
    reference: str = "int8",
) -> torch.Tensor:
    """Cosine per image ``[N]`` between ``model``'s embedding and the ONNX graph's (INT8 or float).

    Both get the same preprocessed pixel values. ``onnx_file`` defaults to the graph the model was
    converted from (clip-vit-b16: the package's ``clip_encoder.int8.onnx``, re-checked against the
    sha256 recorded at conversion).

    ``reference="int8"`` (default) compares with the package's own runtime. Expect about 0.94–0.99:
    that runtime also quantises every activation to 8 bits, the converted model only has
    dequantised weights. ``reference="float"`` compares with the same graph with the activation
    quantisation taken out (:func:`probe.onnx_clip.float_activation_graph`: same weights, float32
    activations), which checks the conversion alone; expect 1 - cosine below 1e-10.
    """
    _require_vision(model)
    if onnx_file is None:
        onnx_file = converted_onnx_file(model)
    pixels = _pixels(model, images)
    theirs = torch.from_numpy(onnx_clip.run_onnx(Path(onnx_file), pixels, reference=reference))
    ours = embed(model, pixels)
    if ours.shape != theirs.shape:
        raise HeadlabError(
            f"embedding shapes differ: {model.name} gives {tuple(ours.shape)}, the ONNX graph {tuple(theirs.shape)}"
        )
    return torch.nn.functional.cosine_similarity(ours.double(), theirs.double(), dim=-1).float()
