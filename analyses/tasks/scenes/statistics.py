"""Presence and co-occurrence counts of a set of scenes, and the scenes and their objects as tables.

See docs/scene-llava.md ("The scenes").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from analyses.tasks.scenes.scene import Scene
from analyses.tasks.scenes.shapes import SHAPE_NAMES, check_shape
from probe.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True, eq=False)
class Cooccurrence:
    """Presence counts of a set of scenes: ``present[i]`` scenes hold ``shapes[i]``, ``joint[i, j]``
    hold both ``shapes[i]`` and ``shapes[j]`` (the diagonal is ``present``)."""

    shapes: tuple[str, ...]
    n_scenes: int
    present: np.ndarray  # int64 [C]
    joint: np.ndarray  # int64 [C, C]

    def conditional(self) -> np.ndarray:
        """``[C, C]``: row ``i``, column ``j`` is P(``shapes[j]`` present | ``shapes[i]`` present);
        NaN for a row whose class never occurs."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.joint / self.present[:, None].astype(np.float64)

    def p(self, given: str, then: str) -> float:
        """P(``then`` present | ``given`` present); NaN when ``given`` never occurs."""
        i, j = self._index(given), self._index(then)
        return float(self.joint[i, j] / self.present[i]) if self.present[i] else math.nan

    def p_absent(self, given: str, then: str) -> float:
        """P(``then`` present | ``given`` absent); NaN when ``given`` is in every scene."""
        i, j = self._index(given), self._index(then)
        n = self.n_scenes - self.present[i]
        return float((self.present[j] - self.joint[i, j]) / n) if n else math.nan

    def _index(self, shape: str) -> int:
        if shape not in self.shapes:
            raise ConfigError(f"shape {shape!r} was not counted; choose from {', '.join(self.shapes)}")
        return self.shapes.index(shape)

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per ordered pair ``given, then, n_given, n_both, p`` (``p`` as in :meth:`p`)."""
        import pandas as pd

        cond = self.conditional()
        rows = [
            {
                "given": g,
                "then": t,
                "n_given": int(self.present[i]),
                "n_both": int(self.joint[i, j]),
                "p": float(cond[i, j]),
            }
            for i, g in enumerate(self.shapes)
            for j, t in enumerate(self.shapes)
            if i != j
        ]
        return pd.DataFrame(rows, columns=["given", "then", "n_given", "n_both", "p"])


def cooccurrence(scenes: Iterable[Scene], shapes: Sequence[str] = SHAPE_NAMES) -> Cooccurrence:
    """The empirical co-occurrence of ``shapes`` over ``scenes``."""
    for s in shapes:
        check_shape(s)
    presence = np.array([sc.presence(shapes) for sc in scenes], dtype=np.int64).reshape(-1, len(shapes))
    return Cooccurrence(tuple(shapes), len(presence), presence.sum(axis=0), presence.T @ presence)


def scene_table(scenes: Sequence[Scene]) -> pd.DataFrame:
    """One row per scene: ``seed, index, n_objects, n_classes, dominant_colour, background,
    background_colour``, then ``has_<shape>`` and ``count_<shape>`` for every shape class."""
    import pandas as pd

    rows = []
    for sc in scenes:
        counts = sc.counts()
        row: dict[str, object] = {
            "seed": sc.seed,
            "index": sc.index,
            "n_objects": sc.n_objects,
            "n_classes": int((counts > 0).sum()),
            "dominant_colour": sc.dominant_colour,
            "background": sc.background.kind,
            "background_colour": sc.background.colour,
        }
        row.update({f"has_{s}": bool(c) for s, c in zip(SHAPE_NAMES, counts, strict=True)})
        row.update({f"count_{s}": int(c) for s, c in zip(SHAPE_NAMES, counts, strict=True)})
        rows.append(row)
    return pd.DataFrame(rows)


def object_table(scenes: Sequence[Scene]) -> pd.DataFrame:
    """One row per object: ``seed, index, object, shape, colour, size, x, y, bbox_x0, bbox_y0,
    bbox_x1, bbox_y1, area, position, side``."""
    import pandas as pd

    rows = [
        {
            "seed": sc.seed,
            "index": sc.index,
            "object": k,
            "shape": o.shape,
            "colour": o.colour,
            "size": o.size,
            "x": o.centre[0],
            "y": o.centre[1],
            "bbox_x0": o.bbox[0],
            "bbox_y0": o.bbox[1],
            "bbox_x1": o.bbox[2],
            "bbox_y1": o.bbox[3],
            "area": o.area,
            "position": o.position,
            "side": o.side,
        }
        for sc in scenes
        for k, o in enumerate(sc.objects)
    ]
    return pd.DataFrame(rows)
