"""Checksums that identify a model's weights: of a module's state, and of a checkpoint's weight files.

A loaded model records one of them as ``weight_sha256`` (see docs/models.md for which source
records which). Imports nothing from probe but :mod:`probe.cache` (its file hash) and
:mod:`probe.devicemap` (a model's offloaded weights).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from probe import cache, devicemap


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the module's state dict: each name, then the tensor as float32 bytes, by name."""
    digest = hashlib.sha256()
    for name, tensor in devicemap.state_items(model):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def checkpoint_sha256(directory: Path, *, name_files_if_no_weights: bool = False) -> str:
    """sha256 over the weight files of a checkpoint directory (``*.safetensors``, ``*.bin``): each
    file's name, then its sha256, by name. With ``name_files_if_no_weights`` a directory without
    weight files hashes the sorted list of its file names instead."""
    digest = hashlib.sha256()
    weights = sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin")])
    for file in weights:
        digest.update(file.name.encode())
        digest.update(cache.sha256_file(file).encode())
    if name_files_if_no_weights and not weights:
        digest.update(json.dumps(sorted(p.name for p in directory.iterdir())).encode())
    return digest.hexdigest()
