"""The image features the projector reads, computed once per image with the frozen tower and cached."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from probe import cache, vlm
from probe.errors import ConfigError
from probe.model import LoadedModel
from probe.vlm_train.config import ImageSet


@contextmanager
def _tower_sdpa(model: LoadedModel) -> Iterator[torch.nn.Module]:
    """The native image tower with SDPA attention inside the block (eager again afterwards)."""
    assert model.native_model is not None
    tower = model.native_model.get_submodule(vlm.LAYOUT.vision_tower)
    configs = {id(c): c for c in [getattr(m, "config", None) for m in tower.modules()] if c is not None}
    saved = {k: getattr(c, "_attn_implementation", None) for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "sdpa"
        yield tower
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def _vision_fingerprint(model: LoadedModel) -> str:
    parts = model.extra.get("parts") or {}
    if "vision" in parts:
        return str(parts["vision"]["weight_sha256"])
    assert model.native_model is not None
    digest = hashlib.sha256()
    for name, tensor in sorted(
        model.native_model.get_submodule(vlm.LAYOUT.vision_tower).state_dict().items()
    ):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def extract_features(
    model: LoadedModel,
    images: ImageSet,
    *,
    batch_size: int = 64,
    cache_key: str | None = None,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """What the projector reads for every image, ``float16 [N, image_seq_length, d_vision]`` on the CPU.

    With ``cache_key`` (a string that names the image set exactly, e.g. its generator config and
    seed) the result is stored under ``$HEADLAB_CACHE/features`` keyed by it, the tower's weights,
    the feature layer and strategy, the preprocessing and the dtype, and read back next time.
    ``timings`` (if given) receives ``render_s`` (reading the images), ``preprocess_s`` and ``tower_s``.
    """
    vlm._require_vlm(model)
    from tqdm.auto import tqdm

    n = len(images)
    if n < 1:
        raise ConfigError("no images to extract features from")
    key_fields = {
        "images": cache_key,
        "n": n,
        "vision": _vision_fingerprint(model),
        "layer": model.extra["vision_feature_layer"],
        "strategy": model.extra["vision_feature_select_strategy"],
        "image": model.image.describe() if model.image is not None else None,
        "dtype": str(model.dtype),
    }
    digest = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    file = cache.cache_root() / "features" / f"{digest}.npy"
    if cache_key is not None and file.is_file():
        array = np.load(file)
        if timings is not None:
            timings["features_cached"] = 1.0
        return torch.from_numpy(array)
    seconds = {"render_s": 0.0, "preprocess_s": 0.0, "tower_s": 0.0}
    chunks: list[torch.Tensor] = []
    with torch.no_grad(), _tower_sdpa(model):
        for start in tqdm(range(0, n, batch_size), desc="image features", disable=not progress, unit="batch"):
            t0 = time.perf_counter()
            stack = np.stack([images[i] for i in range(start, min(n, start + batch_size))])
            t1 = time.perf_counter()
            pixels = model.preprocess(stack)
            t2 = time.perf_counter()
            feats = vlm.image_features(model, pixels)
            chunks.append(feats.to("cpu", torch.float16))
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            t3 = time.perf_counter()
            seconds["render_s"] += t1 - t0
            seconds["preprocess_s"] += t2 - t1
            seconds["tower_s"] += t3 - t2
    features = torch.cat(chunks)
    if timings is not None:
        timings.update(seconds)
    if cache_key is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.save(fh, features.numpy())
        tmp.replace(file)
        file.with_suffix(".json").write_text(json.dumps(key_fields, indent=2))
    return features
