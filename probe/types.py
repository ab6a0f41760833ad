"""Types every part of headlab shares; this module imports nothing from headlab."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Head = tuple[int, int]
"""A head, as ``(layer, head)``."""

HeadSelection = Iterable[Head] | Literal["all"]
"""Heads as ``(layer, head)`` pairs, or ``"all"`` for every head of the model."""
