"""Synthetic scenes of coloured shapes with exact labels, a controlled co-occurrence prior and captions.

Background
----------
Studying what a vision model's heads encode (presence, count, colour, position of objects) and why a
vision-language model names objects that are not there (object hallucination) both need images whose
contents are known exactly and whose object statistics are under control. Real photographs give
neither, so this module draws scenes of flat-coloured shapes on seeded backgrounds.

What one scene is
-----------------
A :class:`Scene` is a description; :meth:`Scene.render` draws it as an RGB ``uint8`` image
``[height, width, 3]`` (default 224×224). It holds:

* **Objects** (:class:`SceneObject`), each of one of 14 shape classes (:data:`SHAPES`: circle, oval,
  square, bar, triangle, diamond, pentagon, hexagon, star, heart, cross, ring, crescent, arrow; nouns
  usable in a caption, with their synonyms and plurals for parsing), one of 11 colours
  (:data:`COLOURS`, at least 90 apart in RGB), a size class (small / medium / large: the longer side
  of its box is 12 % / 20 % / 30 % of the image's shorter side, ±10 %), its box centre
  ``(x, y)`` in pixels, its rendered pixel count ``area``, its tight pixel bounding box ``bbox``
  ``(x0, y0, x1, y1)`` (half-open), a pixel ``inside`` that is certainly part of it, a coarse
  ``position`` word (thirds: ``"top left"``, ``"top"``, …, ``"centre"``, …) and a ``side``
  (``"left"`` when its centre is left of the image's middle, else ``"right"``).
* A **background** (:class:`Background`): a plain colour, a linear gradient between two colours, or
  a mottled noise texture around one colour; its colours (:data:`BACKGROUND_COLOURS`) stay at least
  30 RGB units from every object colour even where noise is added, so object pixels never blend in.

Pixel ``(x, y)`` is ``image[y, x]`` and covers ``[x, x+1) × [y, y+1)``; an object owns the pixels
whose centres fall inside its shape (no anti-aliasing, so every owned pixel has exactly the object's
colour). Objects are placed with their boxes at least ``gap`` pixels apart and inside the image, so
no two objects share a pixel and the labels are exact: :func:`instance_map` gives each pixel's
object index (``-1`` for background), and each object's ``area`` and ``bbox`` are those of its
rendered pixels.

Contents and the co-occurrence prior
------------------------------------
A scene's classes come from a *free draw* of ``k`` distinct classes (``k`` uniform in
``[min_classes, max_classes]``), then each :class:`CooccurrenceRule` ``(given, then, p,
otherwise)`` in turn: when ``given`` came out of the free draw, all classes of ``then`` are present
together with probability ``p`` and absent together otherwise (one coin per rule, overriding the free
draw); when ``given`` is absent and ``otherwise`` is set, they are present with probability
``otherwise``. A rule's ``given`` may not be another rule's target and no class may be the target of
two rules, so ``P(then | given) = p`` exactly. A scene left with no class at all is drawn again
(this touches only scenes in which no rule's given class is present). Each present class then has one instance with
probability ``p_single`` and otherwise 2 to ``max_count``; totals above ``max_objects`` are cut
back (never below one per class, so presence is unchanged). Each instance gets an independent colour
and size. Objects are placed biggest first at uniformly random free positions; when a crowded scene
does not fit, the biggest object is made one size smaller (its ``size`` label says so) until it does.
:func:`cooccurrence` measures the empirical matrix of a generated set.

Labels
------
:meth:`Scene.presence`, :meth:`Scene.counts`, ``n_objects``, ``dominant_colour`` (the object colour
with the most pixels), :meth:`Scene.side_of` (the side of a class's single instance); as tables,
:func:`scene_table` (one row per scene) and :func:`object_table` (one row per object).

Captions
--------
:func:`caption` writes a templated ground-truth caption (``"A small red circle on the left, two blue
stars and an orange oval at the top, on a plain beige background."``). :func:`find_objects` finds
object words in any text (synonyms and plurals, whole words only, case-insensitive, the longest
phrase first: ``"crescent moon"`` is one mention), each with its character span and the colour word
right before it; :func:`check_caption` splits a caption's mentions into present and hallucinated
classes (for CHAIR). Negation is not understood (``"no star"`` mentions a star).

Determinism and speed
---------------------
Scene ``i`` of ``make_scenes(n, seed)`` depends only on ``(seed, i)`` and the config: the same seed
gives bit-identical images on the same numpy version, and asking for more scenes does not change the
first ones. Drawing is vectorised per object over its box only: on one CPU core, 224×224 scenes are
laid out at about 2,700 per second and rendered at about 1,000 per second (4,000 on plain
backgrounds, 1,000 on noise), about 750 per second for both.

Usage
-----
::

    from analyses.tasks import scenes

    cfg = scenes.SceneConfig(rules=(scenes.CooccurrenceRule("circle", "star", p=0.8),))
    batch = scenes.make_scenes(500, seed=0, config=cfg)
    images = scenes.render_batch(batch)                     # [500, 224, 224, 3] uint8
    scenes.cooccurrence(batch).p("circle", "star")          # ≈ 0.8
    batch[0].caption()                                      # "A red circle on the left, ..."
    scenes.check_caption(batch[0], "a circle and a heart").hallucinated   # ("heart",) if no heart

References
----------
* Rohrbach, Hendricks, Burns, Darrell & Saenko (2018). Object Hallucination in Image Captioning.
  EMNLP. (CHAIR: the share of mentioned objects that are not in the image; co-occurrence statistics
  of the training captions as a cause.)
* Johnson et al. (2017). CLEVR: A Diagnostic Dataset for Compositional Language and Elementary
  Visual Reasoning. (Synthetic scenes with exact attribute and position labels.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from probe.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

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
_SALT = 0x5CE7E5  # keeps this generator's random streams apart from other seeded generators

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


# ---------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CooccurrenceRule:
    """When ``given`` is present, the class(es) ``then`` are present together with probability ``p``.

    ``then`` is one class or a group of classes decided by one coin (all present or all absent).
    ``otherwise``: the probability that they are present when ``given`` is absent; ``None`` leaves
    them to the free draw there.
    """

    given: str
    then: str | tuple[str, ...]
    p: float
    otherwise: float | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.then,) if isinstance(self.then, str) else tuple(self.then)


@dataclass(frozen=True)
class SceneConfig:
    """What scenes look like and hold. The defaults give 1–3 classes, 1–8 objects, 224×224 pixels.

    ``shapes``, ``colours``, ``sizes`` and ``backgrounds`` restrict the vocabularies (all by default).
    ``min_classes``/``max_classes`` bound the free draw of distinct classes (rules may add or remove
    some); each present class has one instance with probability ``p_single``, else 2 to
    ``max_count``; ``max_objects`` caps the total. ``gap`` is the least distance in pixels between
    two objects' boxes and between a box and the image border.
    """

    height: int = 224
    width: int = 224
    shapes: tuple[str, ...] = SHAPE_NAMES
    colours: tuple[str, ...] = COLOUR_NAMES
    sizes: tuple[Size, ...] = SIZES
    backgrounds: tuple[BackgroundKind, ...] = BACKGROUND_KINDS
    min_classes: int = 1
    max_classes: int = 3
    p_single: float = 0.7
    max_count: int = 3
    max_objects: int = 8
    gap: int = 2
    rules: tuple[CooccurrenceRule, ...] = ()

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE
            ):
                raise ConfigError(
                    f"scene {name} must be an integer from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels, got "
                    f"{value!r}; smaller images make small shapes unreadable (resize rendered scenes instead)"
                )
        _check_vocabulary("shape", self.shapes, SHAPE_NAMES)
        _check_vocabulary("colour", self.colours, COLOUR_NAMES)
        _check_vocabulary("size", self.sizes, SIZES)
        _check_vocabulary("background", self.backgrounds, BACKGROUND_KINDS)
        ints = {"min_classes": self.min_classes, "max_classes": self.max_classes, "max_count": self.max_count,
                "max_objects": self.max_objects, "gap": self.gap}  # fmt: skip
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "gap" else 1):
                raise ConfigError(f"{name} must be a positive integer (gap may be 0), got {value!r}")
        if not self.min_classes <= self.max_classes <= len(self.shapes):
            raise ConfigError(
                f"need 1 <= min_classes <= max_classes <= number of shapes ({len(self.shapes)}), got "
                f"min_classes={self.min_classes}, max_classes={self.max_classes}; lower max_classes or allow more shapes"
            )
        if not 0.0 <= self.p_single <= 1.0:
            raise ConfigError(f"p_single must be a probability in [0, 1], got {self.p_single!r}")
        targets: list[str] = []
        for rule in self.rules:
            _check_rule(rule, self.shapes)
            targets += rule.targets
        dup = sorted({t for t in targets if targets.count(t) > 1})
        if dup:
            raise ConfigError(
                f"{', '.join(dup)} is the target of several co-occurrence rules; give each class at most "
                "one rule that decides it (use a group: CooccurrenceRule(given, (a, b), p))"
            )
        chained = sorted({r.given for r in self.rules} & set(targets))
        if chained:
            raise ConfigError(
                f"{', '.join(chained)} is both a rule's given class and another rule's target; chains are "
                "not supported (P(then | given) would no longer be the rule's p): drop one of the rules"
            )
        most = min(len(self.shapes), self.max_classes + len(set(targets)))
        if most > self.max_objects:
            raise ConfigError(
                f"a scene may hold {most} distinct classes (max_classes + rule targets) but max_objects is "
                f"{self.max_objects}; raise max_objects to at least {most} or lower max_classes"
            )


def _check_vocabulary(what: str, chosen: Sequence[str], known: Sequence[str]) -> None:
    if isinstance(chosen, str) or not chosen:
        raise ConfigError(f"{what}s must be a non-empty tuple of names from {', '.join(known)}")
    bad = [c for c in chosen if c not in known]
    if bad:
        raise ConfigError(f"unknown {what} {bad[0]!r}; choose from {', '.join(known)}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"{what}s {tuple(chosen)} repeat a name; give each once")


def _check_rule(rule: CooccurrenceRule, shapes: Sequence[str]) -> None:
    if not isinstance(rule, CooccurrenceRule):
        raise ConfigError(f"rules must be CooccurrenceRule objects, got {type(rule).__name__}")
    for name in (rule.given, *rule.targets):
        if name not in shapes:
            raise ConfigError(
                f"co-occurrence rule {rule.given} -> {rule.then} names {name!r}, which is not among this "
                f"config's shapes ({', '.join(shapes)}); add it to shapes or fix the name"
            )
    if not rule.targets or rule.given in rule.targets or len(set(rule.targets)) != len(rule.targets):
        raise ConfigError(f"co-occurrence rule {rule.given} -> {rule.then}: give one or more distinct "
                          "classes other than the given one")  # fmt: skip
    for name, value in (("p", rule.p), ("otherwise", rule.otherwise)):
        if value is not None and not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
            raise ConfigError(f"co-occurrence rule {rule.given} -> {rule.then}: {name} must be a "
                              f"probability in [0, 1], got {value!r}")  # fmt: skip


# ---------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene. Coordinates are pixels, ``x`` to the right and ``y`` down.

    ``centre`` and ``box_size`` (width, height) are the nominal box the shape fills; ``bbox`` is the
    tight half-open box ``(x0, y0, x1, y1)`` of its rendered pixels, ``area`` their number, and
    ``inside`` ``(x, y)`` one of them (``image[inside[1], inside[0]]`` is the object's colour).
    """

    shape: str
    colour: str
    size: Size
    centre: tuple[float, float]
    box_size: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    inside: tuple[int, int]
    position: Position
    side: Side

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def nominal_area(self) -> float:
        """The shape's exact area in pixels; ``area`` is its rasterisation (within a pixel of the edge)."""
        return SHAPES[self.shape].fill * self.box_size[0] * self.box_size[1]


@dataclass(frozen=True)
class Background:
    """A scene's background: ``kind`` plain / gradient / noise, its colour(s) and its own seed.

    A gradient runs from ``colour`` to ``colour_to`` along ``angle`` degrees (0: left to right,
    90: top to bottom); the noise texture is drawn from ``noise_seed``.
    """

    kind: BackgroundKind
    colour: str
    colour_to: str | None = None
    angle: float = 0.0
    noise_seed: int = 0


@dataclass(frozen=True)
class Scene:
    """One scene: its objects (ordered by class, as in :data:`SHAPE_NAMES`, then left to right), its
    background and image size, and the ``(seed, index)`` it was drawn from."""

    seed: int
    index: int
    height: int
    width: int
    objects: tuple[SceneObject, ...]
    background: Background

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes present, in :data:`SHAPE_NAMES` order."""
        present = {o.shape for o in self.objects}
        return tuple(s for s in SHAPE_NAMES if s in present)

    def count(self, shape: str) -> int:
        _check_shape(shape)
        return sum(o.shape == shape for o in self.objects)

    def counts(self, shapes: Sequence[str] = SHAPE_NAMES) -> np.ndarray:
        """Instances per class, ``int64 [len(shapes)]``."""
        return np.array([self.count(s) for s in shapes], dtype=np.int64)

    def presence(self, shapes: Sequence[str] = SHAPE_NAMES) -> np.ndarray:
        """Whether each class is present, ``bool [len(shapes)]``."""
        return self.counts(shapes) > 0

    @property
    def colour_areas(self) -> dict[str, int]:
        """Object pixels per colour, in :data:`COLOUR_NAMES` order (colours absent from the scene omitted)."""
        areas = {c: 0 for c in COLOUR_NAMES}
        for o in self.objects:
            areas[o.colour] += o.area
        return {c: a for c, a in areas.items() if a}

    @property
    def dominant_colour(self) -> str:
        """The object colour covering the most pixels (ties: the first in :data:`COLOUR_NAMES`)."""
        areas = self.colour_areas
        return max(areas, key=lambda c: areas[c])

    def side_of(self, shape: str) -> Side | None:
        """The side of the class's only instance; ``None`` when it is absent or has several instances."""
        found = [o for o in self.objects if o.shape == _check_shape(shape)]
        return found[0].side if len(found) == 1 else None

    def render(self) -> np.ndarray:
        """The image, RGB ``uint8 [height, width, 3]``; the same scene always gives the same bytes."""
        return render(self)

    def caption(self) -> str:
        return caption(self)


def _check_shape(shape: str) -> str:
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; choose from {', '.join(SHAPE_NAMES)}")
    return shape


def _box_size(shape: str, size: Size, jitter: float, side: int) -> tuple[float, float]:
    longer = SIZE_FRACTIONS[size] * side * jitter
    aspect = SHAPES[shape].aspect
    return (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)


def object_mask(
    shape: str, centre: tuple[float, float], box_size: tuple[float, float], height: int, width: int
) -> tuple[int, int, np.ndarray]:
    """``(x0, y0, mask)``: the object's pixels as a boolean window whose top-left pixel is ``(x0, y0)``.

    A pixel belongs to the object when its centre ``(x + 0.5, y + 0.5)`` lies inside the shape.
    """
    spec = SHAPES[shape]
    (cx, cy), (w, h) = centre, box_size
    left, top = cx - w / 2, cy - h / 2
    x0, x1 = max(0, math.floor(left)), min(width, math.ceil(left + w))
    y0, y1 = max(0, math.floor(top)), min(height, math.ceil(top + h))
    ex0, ex1, ey0, ey1 = spec.extent
    nx = ex0 + (np.arange(x0, x1) + 0.5 - left) * ((ex1 - ex0) / w)
    ny = ey0 + (np.arange(y0, y1) + 0.5 - top) * ((ey1 - ey0) / h)
    inside = spec.inside(nx[None, :], ny[:, None])  # every shape lies within its extent
    return x0, y0, np.broadcast_to(inside, (y1 - y0, x1 - x0))


def _coarse_position(cx: float, cy: float, height: int, width: int) -> Position:
    col = 0 if cx < width / 3 else (2 if cx >= 2 * width / 3 else 1)
    row = 0 if cy < height / 3 else (2 if cy >= 2 * height / 3 else 1)
    return POSITIONS[3 * row + col]


def _make_object(
    shape: str,
    colour: str,
    size: Size,
    centre: tuple[float, float],
    box: tuple[float, float],
    height: int,
    width: int,
) -> SceneObject:
    x0, y0, mask = object_mask(shape, centre, box, height, width)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    spec = SHAPES[shape]
    ex0, ex1, ey0, ey1 = spec.extent
    ax = centre[0] - box[0] / 2 + (spec.anchor[0] - ex0) / (ex1 - ex0) * box[0]
    ay = centre[1] - box[1] / 2 + (spec.anchor[1] - ey0) / (ey1 - ey0) * box[1]
    ix, iy = math.floor(ax), math.floor(ay)
    if not mask[iy - y0, ix - x0]:  # cannot happen for the shapes' anchors; keep labels exact anyway
        ys, xs = np.nonzero(mask)
        k = int(np.argmin((xs + x0 + 0.5 - ax) ** 2 + (ys + y0 + 0.5 - ay) ** 2))
        ix, iy = int(xs[k] + x0), int(ys[k] + y0)
    return SceneObject(
        shape=shape,
        colour=colour,
        size=size,
        centre=centre,
        box_size=box,
        bbox=(x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1),
        area=int(mask.sum()),
        inside=(ix, iy),
        position=_coarse_position(centre[0], centre[1], height, width),
        side="left" if centre[0] < width / 2 else "right",
    )


def _draw_classes(config: SceneConfig, rng: np.random.Generator) -> list[str]:
    """The classes present: a free draw, then the co-occurrence rules (see the module docstring)."""
    shapes = config.shapes
    for _ in range(1000):
        k = int(rng.integers(config.min_classes, config.max_classes + 1))
        free = {shapes[i] for i in rng.choice(len(shapes), size=k, replace=False)}
        present = set(free)
        for rule in config.rules:
            coin = float(rng.random())  # one draw per rule in every branch: streams stay aligned
            if rule.given in free:
                decide: bool | None = coin < rule.p
            else:
                decide = None if rule.otherwise is None else coin < rule.otherwise
            if decide is True:
                present.update(rule.targets)
            elif decide is False:
                present.difference_update(rule.targets)
        if present:
            return [s for s in shapes if s in present]
    raise ConfigError("co-occurrence rules removed every class from 1000 scenes in a row; raise the rules' "
                      "'otherwise' probabilities or min_classes")  # fmt: skip


def _draw_counts(config: SceneConfig, classes: list[str], rng: np.random.Generator) -> list[int]:
    counts = []
    for _ in classes:
        single = float(rng.random()) < config.p_single or config.max_count == 1
        counts.append(1 if single else int(rng.integers(2, config.max_count + 1)))
    while sum(counts) > config.max_objects:  # cut the largest back; never below one per class
        counts[int(np.argmax(counts))] -= 1
    return counts


PLACEMENT_CANDIDATES = 64  # positions tried at once for one object
LAYOUT_TRIES = 6  # whole layouts tried before the largest object is made one size smaller


def _place(
    boxes: list[tuple[float, float]], config: SceneConfig, rng: np.random.Generator
) -> list[tuple[float, float]] | None:
    """Centres for boxes (width, height) so that boxes keep ``gap`` from each other and the border."""
    gap, placed, centres = config.gap, np.zeros((0, 4)), []
    for w, h in boxes:
        lo_x, hi_x = w / 2 + gap, config.width - w / 2 - gap
        lo_y, hi_y = h / 2 + gap, config.height - h / 2 - gap
        if lo_x > hi_x or lo_y > hi_y:
            return None
        cand = rng.random((PLACEMENT_CANDIDATES, 2))
        cx, cy = lo_x + cand[:, 0] * (hi_x - lo_x), lo_y + cand[:, 1] * (hi_y - lo_y)
        if len(placed):
            apart_x = np.abs(cx[:, None] - placed[None, :, 0]) >= (w + placed[None, :, 2]) / 2 + gap
            apart_y = np.abs(cy[:, None] - placed[None, :, 1]) >= (h + placed[None, :, 3]) / 2 + gap
            ok = np.flatnonzero((apart_x | apart_y).all(axis=1))
        else:
            ok = np.array([0])
        if not len(ok):
            return None
        i = int(ok[0])
        centres.append((float(cx[i]), float(cy[i])))
        placed = np.vstack([placed, [cx[i], cy[i], w, h]])
    return centres


def _layout(
    config: SceneConfig, shapes: list[str], sizes: list[Size], jitters: np.ndarray, rng: np.random.Generator
) -> tuple[list[Size], list[tuple[float, float]], list[tuple[float, float]]]:
    """Sizes, box sizes and centres, biggest boxes placed first; shrinks objects if they do not fit."""
    side = min(config.height, config.width)
    sizes = list(sizes)
    while True:
        boxes = [_box_size(s, z, float(j), side) for s, z, j in zip(shapes, sizes, jitters, strict=True)]
        order = sorted(range(len(boxes)), key=lambda i: -boxes[i][0] * boxes[i][1])
        for _ in range(LAYOUT_TRIES):
            centres = _place([boxes[i] for i in order], config, rng)
            if centres is not None:
                out = [(0.0, 0.0)] * len(boxes)
                for i, c in zip(order, centres, strict=True):
                    out[i] = c
                return sizes, boxes, out
        shrinkable = [i for i in order if SIZES.index(sizes[i]) > 0]
        if not shrinkable:
            raise ConfigError(
                f"could not place {len(shapes)} objects without overlap in a {config.height}x{config.width} "
                "image; lower max_objects or max_count, or use larger images"
            )
        i = shrinkable[0]
        sizes[i] = SIZES[SIZES.index(sizes[i]) - 1]


def make_scene(index: int, seed: int = 0, config: SceneConfig | None = None) -> Scene:
    """Scene ``index`` of the stream of ``seed``: depends only on ``(seed, index)`` and ``config``."""
    config = config or SceneConfig()
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    rng = np.random.default_rng([_SALT, int(seed), int(index)])
    classes = _draw_classes(config, rng)
    counts = _draw_counts(config, classes, rng)
    shapes = [s for s, n in zip(classes, counts, strict=True) for _ in range(n)]
    colours = [config.colours[i] for i in rng.integers(len(config.colours), size=len(shapes))]
    sizes: list[Size] = [config.sizes[i] for i in rng.integers(len(config.sizes), size=len(shapes))]
    jitters = 1 + SIZE_JITTER * (2 * rng.random(len(shapes)) - 1)
    sizes, boxes, centres = _layout(config, shapes, sizes, jitters, rng)
    objects = [
        _make_object(s, c, z, ctr, box, config.height, config.width)
        for s, c, z, ctr, box in zip(shapes, colours, sizes, centres, boxes, strict=True)
    ]
    objects.sort(key=lambda o: (SHAPE_NAMES.index(o.shape), o.centre[0], o.centre[1]))

    kind = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
    names = list(BACKGROUND_COLOURS)
    first, second = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    angle, noise_seed = float(rng.random() * 360.0), int(rng.integers(2**63))
    background = Background(
        kind=kind,
        colour=first,
        colour_to=second if kind == "gradient" else None,
        angle=angle if kind == "gradient" else 0.0,
        noise_seed=noise_seed if kind == "noise" else 0,
    )
    return Scene(int(seed), int(index), config.height, config.width, tuple(objects), background)


def make_scenes(n: int, seed: int = 0, config: SceneConfig | None = None, *, start: int = 0) -> list[Scene]:
    """Scenes ``start`` to ``start + n - 1`` of the stream of ``seed`` (see :func:`make_scene`)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}; ask for at least one scene")
    config = config or SceneConfig()
    return [make_scene(start + i, seed, config) for i in range(n)]


# ---------------------------------------------------------------------------------------- rendering


def render_background(background: Background, height: int, width: int) -> np.ndarray:
    """The background alone, RGB ``uint8 [height, width, 3]``."""
    base = np.asarray(BACKGROUND_COLOURS[background.colour], dtype=np.float32)
    if background.kind == "plain":
        return np.tile(np.tile(base.astype(np.uint8), width), height).reshape(height, width, 3)
    if background.kind == "gradient":
        assert background.colour_to is not None
        end = np.asarray(BACKGROUND_COLOURS[background.colour_to], dtype=np.float32)
        a = math.radians(background.angle)
        span = abs(math.cos(a)) * width / 2 + abs(math.sin(a)) * height / 2
        # t = (x·cos a + y·sin a) / (2·span) + 1/2 runs from 0 at the corner the gradient starts from
        # to 1 at the opposite one; the colour is linear in t, so it is a row term plus a column term.
        delta = end - base
        x = (np.arange(width, dtype=np.float32) + 0.5 - width / 2) * np.float32(math.cos(a) / (2 * span))
        y = (np.arange(height, dtype=np.float32) + 0.5 - height / 2) * np.float32(math.sin(a) / (2 * span))
        cols = x[:, None] * delta
        rows = y[:, None] * delta + (base + delta / 2 + 0.5)  # + 0.5, then truncation: rounding
        return (rows[:, None, :] + cols[None, :, :]).astype(np.uint8)
    rng = np.random.default_rng(background.noise_seed)
    grid = rng.uniform(-1.0, 1.0, (NOISE_GRID + 1, NOISE_GRID + 1)).astype(np.float32)
    # Bilinear upsampling is separable: rows @ grid @ cols.T with two interpolation matrices.
    smooth = _interpolation(height) @ grid @ _interpolation(width).T
    shade = np.rint(NOISE_SMOOTH * smooth).astype(np.int16)[:, :, None] + base.astype(np.int16)
    fine = rng.integers(-NOISE_FINE, NOISE_FINE + 1, (height, width, 3), dtype=np.int16)
    return np.clip(shade + fine, 0, 255).astype(np.uint8)


@cache
def _interpolation(n: int) -> np.ndarray:
    """``[n, NOISE_GRID + 1]`` linear-interpolation weights from the noise grid to ``n`` pixel centres."""
    g = (np.arange(n, dtype=np.float64) + 0.5) * (NOISE_GRID / n)
    i = np.minimum(g.astype(int), NOISE_GRID - 1)
    f = g - i
    out = np.zeros((n, NOISE_GRID + 1), dtype=np.float32)
    out[np.arange(n), i] = 1 - f
    out[np.arange(n), i + 1] = f
    out.setflags(write=False)
    return out


def render(scene: Scene) -> np.ndarray:
    """The scene's image, RGB ``uint8 [height, width, 3]``: the background, then each object flat."""
    image = render_background(scene.background, scene.height, scene.width)
    for o in scene.objects:
        x0, y0, mask = object_mask(o.shape, o.centre, o.box_size, scene.height, scene.width)
        window = image[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        window[mask] = o.rgb
    return image


def instance_map(scene: Scene) -> np.ndarray:
    """Each pixel's object index in ``scene.objects`` (``-1``: background), ``int16 [height, width]``."""
    out = np.full((scene.height, scene.width), -1, dtype=np.int16)
    for k, o in enumerate(scene.objects):
        x0, y0, mask = object_mask(o.shape, o.centre, o.box_size, scene.height, scene.width)
        out[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = k
    return out


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """Images of scenes of one size, stacked: ``uint8 [n, height, width, 3]``."""
    if not scenes:
        raise ConfigError("no scenes to render; pass at least one scene")
    sizes = {(s.height, s.width) for s in scenes}
    if len(sizes) > 1:
        raise ConfigError(f"scenes of several sizes {sorted(sizes)}; render each size separately")
    out = np.empty((len(scenes), scenes[0].height, scenes[0].width, 3), dtype=np.uint8)
    for i, s in enumerate(scenes):
        out[i] = render(s)
    return out


# ---------------------------------------------------------------------------------------- statistics


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
        _check_shape(s)
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


# ---------------------------------------------------------------------------------------- captions

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PLACE_PHRASES: dict[Position, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}


def plural(word: str) -> str:
    """The regular English plural of a (last) word: ``box`` -> ``boxes``, ``star`` -> ``stars``."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene: Scene) -> str:
    """A templated ground-truth caption: objects grouped by colour and class, left to right, then the
    background. A single object gets its size (unless medium) and position; a group its number."""
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for o in sorted(scene.objects, key=lambda o: (o.centre[0], o.centre[1])):
        groups.setdefault((o.colour, o.shape), []).append(o)
    parts = []
    for (colour, shape), objs in groups.items():
        if len(objs) == 1:
            o = objs[0]
            size = "" if o.size == "medium" else o.size + " "
            parts.append(f"{_with_article(f'{size}{colour} {shape}')} {_PLACE_PHRASES[o.position]}")
        else:
            number = NUMBER_WORDS[len(objs)] if len(objs) < len(NUMBER_WORDS) else str(len(objs))
            parts.append(f"{number} {colour} {plural(shape)}")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = scene.background
    if bg.kind == "plain":
        where = f"on a plain {bg.colour} background"
    elif bg.kind == "gradient":
        where = f"on a background fading from {bg.colour} to {bg.colour_to}"
    else:
        where = f"on a mottled {bg.colour} background"
    return f"{text[0].upper()}{text[1:]}, {where}."


@dataclass(frozen=True)
class Mention:
    """An object word found in a text: its class, character span ``text[start:end]``, whether it was
    plural, and the object colour named right before it (``None`` if none)."""

    shape: str
    start: int
    end: int
    text: str
    plural: bool
    colour: str | None


def _forms(spec: ShapeClass) -> list[tuple[str, bool]]:
    out = []
    for word in (spec.name, *spec.synonyms):
        out += [(word, False), (plural(word), True)]
    out += [(p, True) for p in spec.plurals]
    return out


@cache
def _object_pattern(shapes: tuple[str, ...]) -> tuple[re.Pattern[str], dict[str, tuple[str, bool]]]:
    lookup: dict[str, tuple[str, bool]] = {}
    for name in shapes:
        for form, is_plural in _forms(SHAPES[name]):
            lookup[form] = (name, is_plural)
    # Longest first, so that "crescent moon" wins over "crescent" and "moon"; words may be joined by
    # spaces or hyphens ("half-moon", "plus  sign").
    alternatives = [r"[\s\-]+".join(map(re.escape, f.split())) for f in sorted(lookup, key=len, reverse=True)]
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE), lookup


@cache
def _colour_lookup() -> tuple[re.Pattern[str], dict[str, str]]:
    words = {c: c for c in COLOUR_NAMES}
    for colour, synonyms in COLOUR_SYNONYMS.items():
        words.update({s: colour for s in synonyms})
    alternatives = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    return re.compile(r"\b(" + alternatives + r")[\s\-]+$", re.IGNORECASE), words


def find_objects(text: str, shapes: Sequence[str] = SHAPE_NAMES) -> tuple[Mention, ...]:
    """Object words of ``shapes`` (names, synonyms, plurals) in ``text``, in order of appearance.

    Whole words only and case-insensitive: ``"start"``, ``"bring"`` and ``"across"`` mention nothing.
    """
    for s in shapes:
        _check_shape(s)
    pattern, lookup = _object_pattern(tuple(shapes))
    colour_pattern, colour_words = _colour_lookup()
    mentions = []
    for m in pattern.finditer(text):
        shape, is_plural = lookup[" ".join(re.split(r"[\s\-]+", m.group(0).lower()))]
        before = colour_pattern.search(text[max(0, m.start() - 24) : m.start()])
        colour = colour_words[before.group(1).lower()] if before else None
        mentions.append(Mention(shape, m.start(), m.end(), m.group(0), is_plural, colour))
    return tuple(mentions)


def mentioned_shapes(text: str, shapes: Sequence[str] = SHAPE_NAMES) -> tuple[str, ...]:
    """The classes mentioned in ``text``, each once, in :data:`SHAPE_NAMES` order."""
    found = {m.shape for m in find_objects(text, shapes)}
    return tuple(s for s in SHAPE_NAMES if s in found)


@dataclass(frozen=True)
class CaptionCheck:
    """A caption's object words against a scene: ``mentioned`` classes split into ``correct`` (present)
    and ``hallucinated`` (absent); ``missed`` are present but not mentioned. ``mentions`` keeps every
    match with its span; ``hallucinated_mentions`` are those of absent classes."""

    mentions: tuple[Mention, ...]
    mentioned: tuple[str, ...]
    correct: tuple[str, ...]
    hallucinated: tuple[str, ...]
    missed: tuple[str, ...]

    @property
    def hallucinated_mentions(self) -> tuple[Mention, ...]:
        return tuple(m for m in self.mentions if m.shape in self.hallucinated)


def check_caption(scene: Scene, text: str, shapes: Sequence[str] = SHAPE_NAMES) -> CaptionCheck:
    """Which object words of ``text`` name classes present in ``scene`` and which are hallucinated."""
    mentions = find_objects(text, shapes)
    mentioned = {m.shape for m in mentions}
    present = set(scene.classes)
    order = [s for s in SHAPE_NAMES if s in shapes]
    return CaptionCheck(
        mentions=mentions,
        mentioned=tuple(s for s in order if s in mentioned),
        correct=tuple(s for s in order if s in mentioned & present),
        hallucinated=tuple(s for s in order if s in mentioned - present),
        missed=tuple(s for s in order if s in present - mentioned),
    )


__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_KINDS",
    "COLOURS",
    "COLOUR_NAMES",
    "POSITIONS",
    "SHAPES",
    "SHAPE_NAMES",
    "SIZES",
    "SIZE_FRACTIONS",
    "Background",
    "CaptionCheck",
    "Cooccurrence",
    "CooccurrenceRule",
    "Mention",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "ShapeClass",
    "caption",
    "check_caption",
    "cooccurrence",
    "find_objects",
    "instance_map",
    "make_scene",
    "make_scenes",
    "mentioned_shapes",
    "object_mask",
    "object_table",
    "plural",
    "render",
    "render_background",
    "render_batch",
    "scene_table",
]
