"""Types every part of headlab shares; this module imports nothing from headlab."""

from __future__ import annotations

Head = tuple[int, int]
"""A head, as ``(layer, head)``."""
