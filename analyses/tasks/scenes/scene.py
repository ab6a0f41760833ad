"""One scene: its objects and background, its image (:func:`render`, exact labels:
:func:`instance_map`) and its templated ground-truth caption (:func:`caption`).

See docs/scene-llava.md ("The scenes").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from analyses.tasks.scenes.shapes import (
    BACKGROUND_COLOURS,
    COLOUR_NAMES,
    COLOURS,
    NOISE_FINE,
    NOISE_GRID,
    NOISE_SMOOTH,
    SHAPE_NAMES,
    SHAPES,
    BackgroundKind,
    Position,
    Side,
    Size,
    check_shape,
)
from probe.errors import ConfigError


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
        check_shape(shape)
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
        found = [o for o in self.objects if o.shape == check_shape(shape)]
        return found[0].side if len(found) == 1 else None

    def render(self) -> np.ndarray:
        """The image, RGB ``uint8 [height, width, 3]``; the same scene always gives the same bytes."""
        return render(self)

    def caption(self) -> str:
        return caption(self)


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


NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PLACE_PHRASES: dict[Position, str] = {
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
            parts.append(f"{_with_article(f'{size}{colour} {shape}')} {PLACE_PHRASES[o.position]}")
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
