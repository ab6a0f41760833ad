"""Model sources: the table :func:`probe.loading.load_model` walks to find what loads a name.

A :class:`ModelSource` says which names it takes (``matches``), how it loads them (``load``) and,
in words, what it is. Sources are tried in ascending ``order``, the first match loads; the
language sources are registered by :mod:`probe.loading`, the vision and vision-language ones by
:mod:`probe.vision` and :mod:`probe.vlm` (``probe/__init__.py`` imports all three, so the table is
complete whenever ``load_model`` can be called). See docs/models.md for the table and how to add
a source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from probe.checkpoints import read_config
from probe.model import BosMode, LoadedModel

# Bands of ``order``: a name is tried against tiny models first, then assemblies, the catalogue,
# .gguf files, checkpoint directories (most specific first) and hub ids.
TINY, ASSEMBLY, CATALOGUE, GGUF, DIRECTORY, HUB = 100, 200, 300, 400, 500, 700


@dataclass
class ModelRequest:
    """What ``load_model`` was asked for, device and dtype already resolved."""

    name: str
    device: torch.device
    dtype: torch.dtype
    bos: BosMode = "default"
    seed: int = 0
    allow_hub: bool = False
    fetch_if_missing: bool = True
    tiny_words: tuple[str, ...] = ()
    device_map: str | dict[str, str] | None = None  # parsed (probe.devicemap.parse_device_map)

    @property
    def path(self) -> Path:
        return Path(self.name).expanduser()

    @cached_property
    def config(self) -> dict[str, Any]:
        """``config.json`` of the checkpoint directory ``path``, read once (an error if it has none)."""
        return read_config(self.path)


@dataclass(frozen=True)
class ModelSource:
    """One row of the table: a kind of model name and how to load it."""

    name: str
    order: int
    description: str
    matches: Callable[[ModelRequest], bool] = field(repr=False)
    load: Callable[[ModelRequest], LoadedModel] = field(repr=False)
    device_maps: bool = False  # whether ``load`` honours ``request.device_map`` (else it is refused)


SOURCES: list[ModelSource] = []
"""The table, sorted by ``order`` (registration order among equal orders)."""


def register(source: ModelSource) -> ModelSource:
    """Add ``source`` to the table at its ``order``; a second source of the same name is refused."""
    if any(s.name == source.name for s in SOURCES):
        raise ValueError(f"a model source named {source.name!r} is registered already")
    SOURCES.append(source)
    SOURCES.sort(key=lambda s: s.order)
    return source


def find(request: ModelRequest) -> ModelSource | None:
    """The first source (by ``order``) whose ``matches`` takes ``request``, or None."""
    return next((s for s in SOURCES if s.matches(request)), None)
