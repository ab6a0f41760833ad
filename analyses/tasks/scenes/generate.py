"""Drawing scenes: the classes present (a free draw, then the co-occurrence rules), their counts,
colours and sizes, and a layout without overlap; scene ``i`` of a seed depends only on ``(seed, i)``.

See docs/scene-llava.md ("The scenes").
"""

from __future__ import annotations

import math

import numpy as np

from analyses.tasks.scenes.config import SceneConfig
from analyses.tasks.scenes.scene import Background, Scene, SceneObject, object_mask
from analyses.tasks.scenes.shapes import (
    BACKGROUND_COLOURS,
    POSITIONS,
    SHAPE_NAMES,
    SHAPES,
    SIZE_FRACTIONS,
    SIZE_JITTER,
    SIZES,
    Position,
    Size,
)
from probe.errors import ConfigError

_SALT = 0x5CE7E5  # keeps this generator's random streams apart from other seeded generators


def _box_size(shape: str, size: Size, jitter: float, side: int) -> tuple[float, float]:
    longer = SIZE_FRACTIONS[size] * side * jitter
    aspect = SHAPES[shape].aspect
    return (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)


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
    """The classes present: a free draw, then the co-occurrence rules (see docs/scene-llava.md)."""
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
    raise ConfigError(
        "co-occurrence rules removed every class from 1000 scenes in a row; raise the rules' "
        "'otherwise' probabilities or min_classes"
    )


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
