"""Heads given by the user, checked against a model and grouped by layer.

Every part of probe that takes ``(layer, head)`` pairs checks them here, before any hook is
added, so a bad head is refused with the valid range in the message.
"""

from __future__ import annotations

from collections.abc import Iterable

from probe.errors import ConfigError
from probe.model import LoadedModel
from probe.types import Head, HeadSelection


def check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an int, got {value!r}")
    return value


def check_head(model: LoadedModel, head: object) -> Head:
    if not (isinstance(head, tuple | list) and len(head) == 2):
        raise ConfigError(
            f"heads are given as (layer, head) pairs, got {head!r}; e.g. (0, 1) is head 1 of layer 0"
        )
    layer = check_int(head[0], "a layer index")
    index = check_int(head[1], "a head index")
    if not (0 <= layer < model.n_layers and 0 <= index < model.n_heads):
        raise ConfigError(
            f"head ({layer}, {index}) does not exist on {model.name}: layers are 0..{model.n_layers - 1} "
            f"and heads 0..{model.n_heads - 1}; pass (layer, head) pairs in those ranges"
        )
    return layer, index


def by_layer(model: LoadedModel, heads: Iterable[object]) -> dict[int, list[int]]:
    """Validated heads grouped by layer, duplicates removed, in order of first appearance."""
    out: dict[int, list[int]] = {}
    for head in heads:
        layer, index = check_head(model, head)
        if index not in out.setdefault(layer, []):
            out[layer].append(index)
    return out


def selection_by_layer(model: LoadedModel, heads: HeadSelection | None) -> dict[int, list[int]]:
    """Heads grouped by layer (duplicates dropped, order kept); ``"all"`` is every head."""
    if heads is None:
        return {}
    if isinstance(heads, str):
        if heads != "all":
            raise ConfigError(f"heads are (layer, head) pairs or 'all', got {heads!r}")
        return {layer: list(range(model.n_heads)) for layer in range(model.n_layers)}
    out: dict[int, list[int]] = {}
    for head in heads:
        if not (isinstance(head, tuple | list) and len(head) == 2):
            raise ConfigError(f"heads are given as (layer, head) pairs, got {head!r}; e.g. (0, 1)")
        layer, index = check_int(head[0], "a layer index"), check_int(head[1], "a head index")
        if not (0 <= layer < model.n_layers and 0 <= index < model.n_heads):
            raise ConfigError(
                f"head ({layer}, {index}) does not exist on {model.name}: layers are 0..{model.n_layers - 1} "
                f"and heads 0..{model.n_heads - 1}"
            )
        if index not in out.setdefault(layer, []):
            out[layer].append(index)
    return out
