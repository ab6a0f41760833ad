"""The scenes' vocabulary and geometry: sizes, positions, object and background colours, and the 14
shape classes (caption nouns with synonyms, an exact point-in-shape test, area and anchor).

See docs/scene-llava.md ("The scenes").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from probe.errors import ConfigError

Size = Literal["small", "medium", "large"]
BackgroundKind = Literal["plain", "gradient", "noise"]
Side = Literal["left", "right"]
Position = Literal[
    "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"
]

SIZES: tuple[Size, ...] = get_args(Size)
BACKGROUND_KINDS: tuple[BackgroundKind, ...] = get_args(BackgroundKind)
POSITIONS: tuple[Position, ...] = get_args(Position)

# The longer side of an object's box as a fraction of the image's shorter side, before a ±10 % jitter.
SIZE_FRACTIONS: dict[Size, float] = {"small": 0.12, "medium": 0.2, "large": 0.3}
SIZE_JITTER = 0.1
MIN_IMAGE_SIDE = 64  # below this a small object is under 8 px and its shape is unreadable
MAX_IMAGE_SIDE = 4096

# Object colours: every pair is at least 90 apart (Euclidean RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 15),
    "yellow": (245, 225, 35),
    "green": (35, 160, 55),
    "cyan": (35, 205, 225),
    "blue": (40, 70, 215),
    "purple": (135, 45, 175),
    "pink": (245, 125, 195),
    "brown": (125, 70, 25),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
# Background colours: each at least 73 from every object colour, so that with the noise texture's
# largest deviation (NOISE_SMOOTH + NOISE_FINE per channel, 35 in RGB) a margin of 30 is left.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "beige": (214, 200, 165),
    "light gray": (180, 182, 186),
    "slate": (95, 110, 128),
    "olive": (120, 128, 80),
    "dark gray": (72, 72, 76),
    "sand": (196, 170, 120),
    "teal": (60, 120, 120),
    "lavender": (170, 160, 200),
}
NOISE_SMOOTH = 15  # amplitude of the blotchy part of the noise texture, per channel
NOISE_FINE = 5  # amplitude of the per-pixel part
NOISE_GRID = 6  # the blotchy part is a bilinear upsampling of a (NOISE_GRID+1)² grid

# Extra words a caption may use for an object colour (parsing only).
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "purple": ("violet",),
    "pink": ("magenta",),
    "cyan": ("turquoise", "aqua"),
}


# ---------------------------------------------------------------------------------------- shapes


Predicate = Callable[[np.ndarray, np.ndarray], np.ndarray]
FEW_EDGES = 12


def _polygon_predicate(vertices: Sequence[tuple[float, float]]) -> Predicate:
    """Even-odd point-in-polygon test, vectorised over broadcastable ``x`` and ``y`` arrays.

    Polygons of up to :data:`FEW_EDGES` edges loop over their edges. For larger ones, for each ``y``
    the crossings of the horizontal line with the edges are found and sorted once; a
    point is inside when an odd number of them lie to its right. This costs ``O(|y| · edges)`` plus
    ``O(points · max crossings)``, not ``O(points · edges)``.
    """
    pts = np.asarray(vertices, dtype=np.float64)
    xa, ya = pts[:, 0], pts[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    keep = ya != yb  # horizontal edges never cross a horizontal line
    xa, ya, xb, yb = xa[keep], ya[keep], xb[keep], yb[keep]
    slope = (xb - xa) / (yb - ya)

    def inside_few(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=bool)
        for k in range(len(xa)):
            crosses = (ya[k] > y) != (yb[k] > y)
            result ^= crosses & (x < xa[k] + (y - ya[k]) * slope[k])
        return result

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        yy = np.asarray(y, dtype=np.float64)[..., None]
        crosses = (ya > yy) != (yb > yy)
        x_cross = np.where(crosses, xa + (yy - ya) * slope, np.inf)
        x_cross.sort(axis=-1)
        most = int(crosses.sum(axis=-1).max(initial=0))
        if most == 0:
            return np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=bool)
        right = (np.asarray(x, dtype=np.float64)[..., None] < x_cross[..., :most]).sum(axis=-1)
        return np.broadcast_to(right % 2 == 1, np.broadcast_shapes(np.shape(x), np.shape(y)))

    return inside_few if len(xa) <= FEW_EDGES else inside


def _shoelace(vertices: Sequence[tuple[float, float]]) -> float:
    pts = np.asarray(vertices, dtype=float)
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


@dataclass(frozen=True)
class ShapeClass:
    """One object class: its caption noun, synonyms and geometry.

    The shape lives in its own *natural* coordinates (x right, y down) inside the box ``extent``
    ``(x0, x1, y0, y1)``, which it touches on all four sides; ``inside(x, y)`` tests points there and
    ``area`` is its exact area in those units. ``anchor`` is a natural point well inside the shape
    (at least a tenth of the box's shorter side from its outline), mapped to the object's ``inside``
    pixel.
    ``contains_centre`` says whether the box centre is part of the shape (not for ring, crescent).
    """

    name: str
    synonyms: tuple[str, ...]
    inside: Predicate = field(repr=False)
    extent: tuple[float, float, float, float]
    area: float
    anchor: tuple[float, float]
    contains_centre: bool = True
    plurals: tuple[str, ...] = ()  # irregular plurals, in addition to the regular one

    @property
    def aspect(self) -> float:
        """Box width over box height."""
        x0, x1, y0, y1 = self.extent
        return (x1 - x0) / (y1 - y0)

    @property
    def fill(self) -> float:
        """The share of its box the shape covers."""
        x0, x1, y0, y1 = self.extent
        return self.area / ((x1 - x0) * (y1 - y0))


def _polygon_shape(
    name: str,
    synonyms: tuple[str, ...],
    vertices: Sequence[tuple[float, float]],
    anchor: tuple[float, float],
    plurals: tuple[str, ...] = (),
) -> ShapeClass:
    xs, ys = [v[0] for v in vertices], [v[1] for v in vertices]
    return ShapeClass(
        name,
        synonyms,
        _polygon_predicate(vertices),
        (min(xs), max(xs), min(ys), max(ys)),
        _shoelace(vertices),
        anchor,
        plurals=plurals,
    )


def _regular(n: int, start_deg: float) -> list[tuple[float, float]]:
    return [
        (math.cos(math.radians(start_deg + 360 * k / n)), math.sin(math.radians(start_deg + 360 * k / n)))
        for k in range(n)
    ]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = math.radians(-90 + 180 * k / points)
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart(n: int = 96) -> list[tuple[float, float]]:
    """The classic parametric heart (y down), scaled to a height of about 2."""
    out = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        out.append((x / 15, y / 15))
    return out


def _disc_strip(r: float, a: float, b: float) -> float:
    """Area of the disc of radius ``r`` centred at 0 between the vertical lines ``x = a`` and ``x = b``."""

    def primitive(u: float) -> float:  # an antiderivative of 2·sqrt(r² - u²)
        u = min(max(u, -r), r)
        return u * math.sqrt(r * r - u * u) + r * r * math.asin(u / r)

    return primitive(b) - primitive(a) if b > a else 0.0


RING_INNER = 0.55  # inner radius of the ring (outer radius 1)
# The crescent is the unit disc minus the disc of radius _CRESCENT_R centred at (_CRESCENT_D, 0), with
# its horns cut at x = _CRESCENT_CUT: uncut, their tips taper to lone pixels. Left of the cut the
# second disc lies inside the unit disc (the circles meet at x = 0.61), so the area is a difference.
_CRESCENT_D, _CRESCENT_R, _CRESCENT_CUT = 0.5, 0.8, 0.2
_CRESCENT_AREA = _disc_strip(1.0, -1.0, _CRESCENT_CUT) - _disc_strip(
    _CRESCENT_R, -_CRESCENT_R, _CRESCENT_CUT - _CRESCENT_D
)
_OVAL, _BAR = 1.6, (1.4, 0.5)  # half-width of the oval (half-height 1); half-sides of the bar


def _shapes() -> tuple[ShapeClass, ...]:
    def disc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return x * x + y * y <= 1.0

    def oval(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x / _OVAL) ** 2 + y * y <= 1.0

    def square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (np.abs(x) <= 1.0) & (np.abs(y) <= 1.0)

    def bar(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (np.abs(x) <= _BAR[0]) & (np.abs(y) <= _BAR[1])

    def cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= 1 / 3) & (ay <= 1.0)) | ((ay <= 1 / 3) & (ax <= 1.0))

    def ring(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r2 = x * x + y * y
        return (r2 <= 1.0) & (r2 >= RING_INNER**2)

    def crescent(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        cut = (x * x + y * y <= 1.0) & ((x - _CRESCENT_D) ** 2 + y * y > _CRESCENT_R**2)
        return cut & (x <= _CRESCENT_CUT)

    half_h = math.sqrt(3) / 2
    return (
        ShapeClass("circle", ("disc", "disk", "dot"), disc, (-1, 1, -1, 1), math.pi, (0, 0)),
        ShapeClass("oval", ("ellipse", "egg"), oval, (-_OVAL, _OVAL, -1, 1), math.pi * _OVAL, (0, 0)),
        ShapeClass("square", ("box",), square, (-1, 1, -1, 1), 4.0, (0, 0)),
        ShapeClass(
            "bar",
            ("rectangle", "stripe"),
            bar,
            (-_BAR[0], _BAR[0], -_BAR[1], _BAR[1]),
            4 * _BAR[0] * _BAR[1],
            (0, 0),
        ),
        _polygon_shape("triangle", ("pyramid",), [(0, -half_h), (1, half_h), (-1, half_h)], (0, 0.25)),
        _polygon_shape(
            "diamond",
            ("rhombus", "lozenge"),
            [(0, -1), (0.8, 0), (0, 1), (-0.8, 0)],
            (0, 0),
            plurals=("rhombi",),
        ),
        _polygon_shape("pentagon", (), _regular(5, -90), (0, 0)),
        _polygon_shape("hexagon", (), _regular(6, 0), (0, 0)),
        _polygon_shape("star", ("pentagram",), _star(5, 0.5), (0, 0)),
        _polygon_shape("heart", (), _heart(), (0, 0.2)),
        ShapeClass("cross", ("plus sign",), cross, (-1, 1, -1, 1), 4 - 16 / 9, (0, 0)),
        ShapeClass(
            "ring",
            ("annulus", "donut", "doughnut", "hoop"),
            ring,
            (-1, 1, -1, 1),
            math.pi * (1 - RING_INNER**2),
            (0, -(1 + RING_INNER) / 2),
            contains_centre=False,
            plurals=("annuli",),
        ),
        ShapeClass(
            "crescent",
            ("moon", "half moon", "crescent moon"),
            crescent,
            (-1, _CRESCENT_CUT, -1, 1),
            _CRESCENT_AREA,
            (-0.65, 0),
            contains_centre=False,
        ),
        _polygon_shape(
            "arrow",
            ("pointer",),
            [(-1, -0.3), (0.15, -0.3), (0.15, -0.75), (1, 0), (0.15, 0.75), (0.15, 0.3), (-1, 0.3)],
            (-0.4, 0),
        ),
    )


SHAPES: dict[str, ShapeClass] = {s.name: s for s in _shapes()}
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


def check_shape(shape: str) -> str:
    """``shape`` when it names a shape class (a :class:`ConfigError` otherwise)."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; choose from {', '.join(SHAPE_NAMES)}")
    return shape
