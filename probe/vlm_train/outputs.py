"""Writing a training's outputs: the projector file and its JSON record (the loss curves are in it;
``dashboard.training`` draws them)."""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from probe import cache, vlm
from probe.errors import ConfigError
from probe.model import LoadedModel
from probe.vlm_train.config import TrainResult
from probe.vlm_train.loop import _lora_meta


def _versions() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def save(
    result: TrainResult, path: str | Path, model: LoadedModel, *, meta: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write the projector file and its JSON record; returns their paths.

    ``path`` (``.safetensors``) holds the weights (< 10 MB, checked); ``<stem>.json`` the training
    config, seed, steps, losses and the curve, timings, sizes, versions and the caller's ``meta``
    (data statistics, command, evaluation), and the loss curves that ``dashboard.training`` draws.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"the projector file must end in .safetensors, got {path.name}")
    record = {
        "model": model.name,
        "parts": vlm.parts_meta(model),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "train_config": asdict(result.config),
        "seed": result.config.seed,
        **result.summary(),
        "versions": _versions(),
        **dict(meta or {}),
        "loss_curve": result.curve,
        "eval_loss_curve": result.eval_curve,
    }
    file_meta = {
        **vlm.parts_meta(model),
        **_lora_meta(result.config),
        "training": {k: record[k] for k in ("model", "seed", "steps_done", "final_loss", "final_eval_loss")},
    }
    weights = vlm.write_projector(path, vlm.ProjectorFile(result.projector, result.lora, file_meta))
    record["projector_sha256"] = cache.sha256_file(weights)
    record["projector_bytes"] = weights.stat().st_size
    paths = {"weights": weights, "record": path.with_suffix(".json")}
    paths["record"].write_text(json.dumps(record, indent=2, default=str))
    return paths
