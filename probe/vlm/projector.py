"""Projector files (the projector's weights, optional LoRA deltas, metadata) and applying them.

The file format is safetensors with the metadata key ``headlab``; see docs/models.md (scene-llava).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from probe.assemblies import IMAGE_TOKEN
from probe.checksums import state_sha256 as _state_sha256
from probe.errors import ConfigError, HeadlabError
from probe.model import LoadedModel
from probe.vlm.assembly import LAYOUT, merge_lora
from probe.vlm.wrap import _require_vlm

PROJECTOR_FORMAT = "headlab-llava-projector/1"
MAX_PROJECTOR_BYTES = 10 * 1024 * 1024  # the projector file is committed to data/: keep it small
PROJECTOR_PREFIX = "projector."
LORA_PREFIX = "lora."


@dataclass
class ProjectorFile:
    """What a projector file holds: the projector's weights, optional LoRA deltas, and its metadata.

    ``meta`` records the assembly it belongs to (``vision``, ``language``, ``vision_feature_layer``,
    ``vision_feature_select_strategy``, ``projector_hidden_act``, ``image_token``) and, for LoRA,
    ``lora_rank``, ``lora_alpha`` and ``lora_targets``.
    """

    projector: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lora_scale(self) -> float:
        rank = int(self.meta.get("lora_rank") or 0)
        return float(self.meta.get("lora_alpha", rank)) / rank if rank else 0.0


def write_projector(path: str | Path, file: ProjectorFile) -> Path:
    """Write ``file`` as safetensors (float32) atomically; refuses files over :data:`MAX_PROJECTOR_BYTES`."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        PROJECTOR_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in file.projector.items()
    }
    tensors.update(
        {LORA_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in file.lora.items()}
    )
    size = sum(t.numel() * 4 for t in tensors.values())
    if size > MAX_PROJECTOR_BYTES:
        raise ConfigError(
            f"the projector file would be {size / 2**20:.1f} MiB, over the {MAX_PROJECTOR_BYTES / 2**20:.0f} MiB "
            "allowed in data/; lower lora_rank or adapt fewer projections (lora_targets)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": PROJECTOR_FORMAT, "headlab": json.dumps(file.meta)})
    tmp.replace(path)
    return path


def read_projector(path: str | Path) -> ProjectorFile:
    """Read a projector file written by :func:`write_projector` (clear errors for anything else)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise HeadlabError(f"no projector file at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118  (safe_open is no mapping)
    except Exception as err:  # safetensors raises its own error types
        raise HeadlabError(f"{path} is not a readable safetensors file ({err}); train it again") from None
    if metadata.get("format") != PROJECTOR_FORMAT:
        raise HeadlabError(
            f"{path} is not a headlab projector file (format {metadata.get('format')!r}, expected "
            f"{PROJECTOR_FORMAT!r}); write it with probe.vlm.write_projector"
        )
    return ProjectorFile(
        projector={
            k.removeprefix(PROJECTOR_PREFIX): v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)
        },
        lora={k.removeprefix(LORA_PREFIX): v for k, v in tensors.items() if k.startswith(LORA_PREFIX)},
        meta=json.loads(metadata.get("headlab", "{}")),
    )


def parts_meta(model: LoadedModel) -> dict[str, Any]:
    """What a projector file trained on ``model`` must record to fit it again (see :class:`ProjectorFile`)."""
    _require_vlm(model)
    if "parts_meta" in model.extra:
        return dict(model.extra["parts_meta"])
    return {
        "vision": f"{model.name} (image tower)",
        "language": f"{model.name} (language model)",
        "vision_feature_layer": model.extra["vision_feature_layer"],
        "vision_feature_select_strategy": model.extra["vision_feature_select_strategy"],
        "projector_hidden_act": str(getattr(model.hf_model, "config").projector_hidden_act),  # noqa: B009
        "image_token": IMAGE_TOKEN,
    }


def apply_projector(model: LoadedModel, projector: str | Path | ProjectorFile) -> LoadedModel:
    """Put a projector file's weights into ``model`` (in place) and merge its LoRA deltas; returns it.

    The file must have been trained for the same parts (its metadata is checked). The weight
    checksum is recomputed.
    """
    _require_vlm(model)
    file = projector if isinstance(projector, ProjectorFile) else read_projector(projector)
    wanted = parts_meta(model)
    got = {k: file.meta.get(k) for k in wanted}
    if got != wanted:
        raise HeadlabError(f"this projector was trained for {got}, not for {model.name} ({wanted})")
    native = model.native_model
    assert native is not None
    module = native.get_submodule(LAYOUT.projector)
    with torch.no_grad():
        for key, param in module.state_dict().items():
            if key not in file.projector or tuple(file.projector[key].shape) != tuple(param.shape):
                raise HeadlabError(f"the projector file's {key!r} does not fit {model.name}'s projector")
            param.copy_(file.projector[key].to(param.dtype))
    if file.lora:
        merge_lora(native, file.lora, file.lora_scale)
    model.weight_sha256 = state_sha256(model)
    return model


# ============================================================================== helpers for training


def projector_module(model: LoadedModel) -> torch.nn.Module:
    """The projector of the native model (its parameters are the bridged model's too)."""
    _require_vlm(model)
    assert model.native_model is not None
    return model.native_model.get_submodule(LAYOUT.projector)


def state_sha256(model: LoadedModel) -> str:
    """sha256 of the model's current weights (after training changed them in place)."""
    assert model.native_model is not None
    return _state_sha256(model.native_model)
