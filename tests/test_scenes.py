"""Synthetic scenes: exact labels, determinism, the co-occurrence prior, captions and their parsing."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from scipy import ndimage

from analyses.tasks import scenes
from analyses.tasks.scenes import CooccurrenceRule, SceneConfig
from probe.errors import ConfigError

_CACHE: dict[int, tuple[list[scenes.Scene], np.ndarray]] = {}


def default_scenes(seed: int) -> list[scenes.Scene]:
    """150 default scenes per seed, made (and rendered) once per session."""
    if seed not in _CACHE:
        made = scenes.make_scenes(150, seed=seed)
        _CACHE[seed] = (made, scenes.render_batch(made))
    return _CACHE[seed][0]


def rendered(seed: int) -> np.ndarray:
    default_scenes(seed)
    return _CACHE[seed][1]


# ---------------------------------------------------------------------------------------- vocabulary


def test_vocabulary_is_large_and_far_apart() -> None:
    assert len(scenes.SHAPE_NAMES) >= 12 and len(scenes.COLOURS) >= 8
    for a, b in itertools.combinations(scenes.COLOURS.values(), 2):
        assert math.dist(a, b) >= 90
    for bg in scenes.BACKGROUND_COLOURS.values():
        assert min(math.dist(bg, c) for c in scenes.COLOURS.values()) >= 73


def test_every_object_word_names_one_class() -> None:
    owner: dict[str, str] = {}
    for name, spec in scenes.SHAPES.items():
        for word in (name, *spec.synonyms):
            for form in (word, scenes.plural(word)):
                assert owner.setdefault(form, name) == name, f"{form!r} names {owner[form]} and {name}"


@pytest.mark.parametrize("name", scenes.SHAPE_NAMES)
def test_shape_area_and_anchor_are_exact(name: str) -> None:
    spec = scenes.SHAPES[name]
    x0, x1, y0, y1 = spec.extent
    w, h, n = x1 - x0, y1 - y0, 1200
    xs = x0 + (np.arange(n) + 0.5) * w / n
    ys = y0 + (np.arange(n) + 0.5) * h / n
    grid_area = spec.inside(xs[None, :], ys[:, None]).mean() * w * h
    assert grid_area == pytest.approx(spec.area, rel=2e-3)
    if spec.contains_centre:
        assert spec.inside(np.array((x0 + x1) / 2), np.array((y0 + y1) / 2))
    # The anchor is at least a tenth of the box's shorter side away from the outline (a grid that
    # runs 10 % past the box on each side, so the box edge counts as outline too).
    xs = x0 - 0.1 * w + (np.arange(600) + 0.5) * 1.2 * w / 600
    ys = y0 - 0.1 * h + (np.arange(600) + 0.5) * 1.2 * h / 600
    outside = ~np.broadcast_to(spec.inside(xs[None, :], ys[:, None]), (600, 600))
    gx, gy = np.meshgrid(xs, ys)
    ax, ay = spec.anchor
    assert np.hypot(gx[outside] - ax, gy[outside] - ay).min() >= 0.1 * min(w, h)


# ---------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_bit_identical_images() -> None:
    a = scenes.render_batch(scenes.make_scenes(12, seed=3))
    b = scenes.render_batch(scenes.make_scenes(12, seed=3))
    assert a.dtype == np.uint8 and a.shape == (12, 224, 224, 3)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != scenes.render_batch(scenes.make_scenes(12, seed=4)).tobytes()


def test_scene_depends_only_on_seed_and_index() -> None:
    long = scenes.make_scenes(10, seed=5)
    assert scenes.make_scenes(4, seed=5) == long[:4]
    assert scenes.make_scenes(3, seed=5, start=6) == long[6:9]
    assert scenes.make_scene(7, seed=5) == long[7]


def test_image_size_is_configurable() -> None:
    cfg = SceneConfig(height=96, width=160)
    image = scenes.make_scene(0, seed=0, config=cfg).render()
    assert image.shape == (96, 160, 3)


# ---------------------------------------------------------------------------------------- exact labels


@pytest.mark.parametrize("seed", [0, 1])
def test_labels_match_the_rendered_pixels(seed: int) -> None:
    palette = np.array(list(scenes.COLOURS.values()), dtype=np.int64)
    for sc, image in zip(default_scenes(seed), rendered(seed), strict=True):
        owner = scenes.instance_map(sc)
        for k, o in enumerate(sc.objects):
            mask = owner == k
            assert mask.sum() == o.area > 0
            assert (image[mask] == o.rgb).all()
            assert tuple(image[o.inside[1], o.inside[0]]) == o.rgb
            if scenes.SHAPES[o.shape].contains_centre:
                assert tuple(image[math.floor(o.centre[1]), math.floor(o.centre[0])]) == o.rgb
            ys, xs = np.nonzero(mask)
            assert o.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            x0, y0, x1, y1 = o.bbox
            assert x0 > 0 and y0 > 0 and x1 < sc.width and y1 < sc.height  # inside, off the border
            # Rasterising moves the area by less than a pixel per unit of box perimeter / 2.
            assert abs(o.area - o.nominal_area) <= sum(o.box_size) + 1
        # No background pixel comes near an object colour, so object pixels are exactly the masks.
        packed = np.unique(image[owner == -1].astype(np.int64) @ np.array([65536, 256, 1]))
        background = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1)
        nearest = ((background[:, None, :] - palette[None]) ** 2).sum(-1).min()
        assert nearest >= 30**2


def test_rasterised_areas_are_unbiased() -> None:
    objects = [o for sc in default_scenes(0) + default_scenes(1) for o in sc.objects]
    rel = np.array([(o.area - o.nominal_area) / o.nominal_area for o in objects])
    assert abs(rel.mean()) < 0.01
    assert len(objects) > 300


@pytest.mark.parametrize("seed", [0, 1])
def test_counts_match_connected_components_of_each_colour(seed: int) -> None:
    for sc, image in zip(default_scenes(seed), rendered(seed), strict=True):
        for colour in {o.colour for o in sc.objects}:
            _, n = ndimage.label((image == scenes.COLOURS[colour]).all(axis=-1), structure=np.ones((3, 3)))
            assert n == sum(o.colour == colour for o in sc.objects), (sc.index, colour)
        owner = scenes.instance_map(sc)
        for shape in sc.classes:
            ids = {k for k, o in enumerate(sc.objects) if o.shape == shape}
            assert sc.count(shape) == len(ids) == len(set(np.unique(owner)) & ids)


def test_boxes_keep_the_gap_and_never_overlap() -> None:
    for sc in default_scenes(0):
        for a, b in itertools.combinations(sc.objects, 2):
            dx = abs(a.centre[0] - b.centre[0]) - (a.box_size[0] + b.box_size[0]) / 2
            dy = abs(a.centre[1] - b.centre[1]) - (a.box_size[1] + b.box_size[1]) / 2
            assert max(dx, dy) >= SceneConfig().gap - 1e-9


def test_probe_labels() -> None:
    scs = default_scenes(0)
    table = scenes.scene_table(scs)
    assert len(table) == len(scs)
    for sc, row, image in zip(scs, table.itertuples(index=False), rendered(0), strict=True):
        assert row.n_objects == sc.n_objects == len(sc.objects)
        counts = sc.counts()
        assert [getattr(row, f"count_{s}") for s in scenes.SHAPE_NAMES] == counts.tolist()
        assert [getattr(row, f"has_{s}") for s in scenes.SHAPE_NAMES] == (counts > 0).tolist()
        # The dominant colour is the object colour with the most pixels in the image itself.
        used = {o.colour for o in sc.objects}  # no other object colour occurs (see the test above)
        pixels = {
            c: int((image == scenes.COLOURS[c]).all(-1).sum()) for c in scenes.COLOUR_NAMES if c in used
        }
        assert row.dominant_colour == max(pixels, key=lambda c: pixels[c])
        for o in sc.objects:
            assert o.side == ("left" if o.centre[0] < sc.width / 2 else "right")
            if sc.count(o.shape) == 1:
                assert sc.side_of(o.shape) == o.side
            else:
                assert sc.side_of(o.shape) is None
        assert sc.side_of(next(s for s in scenes.SHAPE_NAMES if s not in sc.classes)) is None
    objects = scenes.object_table(scs)
    assert len(objects) == sum(sc.n_objects for sc in scs)
    assert set(objects["size"]) == set(scenes.SIZES) and set(objects["position"]) <= set(scenes.POSITIONS)


def test_positions_follow_the_thirds() -> None:
    for sc in default_scenes(1):
        for o in sc.objects:
            col = min(int(3 * o.centre[0] / sc.width), 2)
            row = min(int(3 * o.centre[1] / sc.height), 2)
            assert o.position == scenes.POSITIONS[3 * row + col]


def test_defaults_cover_the_vocabulary() -> None:
    scs = default_scenes(0) + default_scenes(1)
    objects = [o for sc in scs for o in sc.objects]
    assert {o.shape for o in objects} == set(scenes.SHAPE_NAMES)
    assert {o.colour for o in objects} == set(scenes.COLOUR_NAMES)
    assert {sc.background.kind for sc in scs} == set(scenes.BACKGROUND_KINDS)
    assert max(sc.n_objects for sc in scs) > 3 and min(sc.n_objects for sc in scs) == 1
    assert any(c > 1 for sc in scs for c in sc.counts())


# ---------------------------------------------------------------------------------------- co-occurrence


SMALL = ("circle", "star", "heart", "square", "ring", "arrow")


def test_cooccurrence_rule_sets_the_conditional_probability() -> None:
    cfg = SceneConfig(shapes=SMALL, rules=(CooccurrenceRule("circle", "star", p=0.8),))
    stats = scenes.cooccurrence(scenes.make_scenes(600, seed=0, config=cfg), SMALL)
    n = int(stats.present[0])
    assert n > 150
    assert stats.p("circle", "star") == pytest.approx(0.8, abs=3.5 * math.sqrt(0.16 / n))
    # Without the rule the same pair is only as frequent as any other pair.
    free = scenes.cooccurrence(scenes.make_scenes(600, seed=0, config=SceneConfig(shapes=SMALL)), SMALL)
    assert free.p("circle", "star") < 0.55


def test_group_rule_decides_its_classes_together() -> None:
    rule = CooccurrenceRule("square", ("ring", "arrow"), p=0.3, otherwise=0.0)
    scs = scenes.make_scenes(400, seed=1, config=SceneConfig(shapes=SMALL, rules=(rule,)))
    stats = scenes.cooccurrence(scs, SMALL)
    for sc in scs:
        assert ("ring" in sc.classes) == ("arrow" in sc.classes)
        if "square" not in sc.classes:
            assert "ring" not in sc.classes
    assert stats.p_absent("square", "ring") == 0.0
    n = int(stats.present[SMALL.index("square")])
    assert stats.p("square", "ring") == pytest.approx(0.3, abs=3.5 * math.sqrt(0.21 / n))


def test_certain_rules_hold_in_every_scene() -> None:
    rules = (CooccurrenceRule("circle", "star", p=1.0), CooccurrenceRule("heart", "ring", p=0.0))
    for sc in scenes.make_scenes(200, seed=2, config=SceneConfig(shapes=SMALL, rules=rules)):
        if "circle" in sc.classes:
            assert "star" in sc.classes
        if "heart" in sc.classes:
            assert "ring" not in sc.classes


def test_cooccurrence_matrix_counts_scenes() -> None:
    scs = default_scenes(0)
    stats = scenes.cooccurrence(scs)
    presence = np.array([sc.presence() for sc in scs])
    assert stats.n_scenes == len(scs)
    assert stats.present.tolist() == presence.sum(0).tolist()
    i, j = scenes.SHAPE_NAMES.index("star"), scenes.SHAPE_NAMES.index("ring")
    assert stats.joint[i, j] == (presence[:, i] & presence[:, j]).sum()
    cond = stats.conditional()
    assert cond[i, j] == pytest.approx(stats.p("star", "ring"))
    frame = stats.to_frame()
    assert len(frame) == len(scenes.SHAPE_NAMES) * (len(scenes.SHAPE_NAMES) - 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rules": (CooccurrenceRule("circle", "unicorn", 0.5),)}, "not among this config's shapes"),
        (
            {"rules": (CooccurrenceRule("circle", "star", 0.5), CooccurrenceRule("heart", "star", 0.5))},
            "target of several",
        ),
        (
            {"rules": (CooccurrenceRule("circle", "star", 0.5), CooccurrenceRule("star", "heart", 0.5))},
            "chains are not supported",
        ),
        ({"rules": (CooccurrenceRule("circle", "star", 1.5),)}, "probability in"),
        ({"height": 32}, "from 64 to"),
        ({"min_classes": 3, "max_classes": 2}, "min_classes <= max_classes"),
        ({"max_classes": 5, "max_objects": 4}, "raise max_objects"),
        ({"shapes": ("circle", "blob")}, "unknown shape 'blob'"),
        ({"colours": ()}, "non-empty"),
    ],
)
def test_bad_config_says_how_to_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SceneConfig(**kwargs)


def test_overcrowded_images_raise_a_fixable_error() -> None:
    cfg = SceneConfig(
        height=64, width=64, sizes=("small",), max_classes=8, p_single=0.0, max_count=6, max_objects=40, gap=4
    )
    with pytest.raises(ConfigError, match="lower max_objects"):
        scenes.make_scenes(5, seed=0, config=cfg)


def test_crowded_scenes_shrink_objects_instead_of_overlapping() -> None:
    cfg = SceneConfig(sizes=("large",), min_classes=4, max_classes=4, p_single=0.0, max_count=2)
    scs = scenes.make_scenes(10, seed=0, config=cfg)
    assert all(sc.n_objects == 8 for sc in scs)
    assert any(o.size != "large" for sc in scs for o in sc.objects)


# ---------------------------------------------------------------------------------------- captions


def test_caption_names_exactly_the_objects_present() -> None:
    for sc in default_scenes(0):
        text = sc.caption()
        check = scenes.check_caption(sc, text)
        assert check.hallucinated == () and check.missed == (), text
        assert check.mentioned == sc.classes
        for m in check.mentions:
            assert m.colour in {o.colour for o in sc.objects if o.shape == m.shape}, (text, m)
            assert text[m.start : m.end] == m.text


def _object(
    shape: str, colour: str, size: scenes.Size, x: float, position: scenes.Position
) -> scenes.SceneObject:
    """An object for caption tests (captions read class, colour, size, position and x only)."""
    return scenes.SceneObject(
        shape, colour, size, (x, 100.0), (20.0, 20.0), (0, 0, 1, 1), 1, (0, 0), position, "left"
    )


def test_caption_template() -> None:
    objects = (
        _object("circle", "red", "small", 30.0, "left"),
        _object("star", "blue", "large", 120.0, "centre"),
        _object("star", "blue", "medium", 190.0, "top right"),
        _object("oval", "orange", "medium", 150.0, "bottom"),
    )
    sc = scenes.Scene(0, 0, 224, 224, objects, scenes.Background("plain", "beige"))
    assert sc.caption() == (
        "A small red circle on the left, two blue stars and an orange oval at the bottom, "
        "on a plain beige background."
    )
    gradient = scenes.Scene(0, 0, 224, 224, objects[:1], scenes.Background("gradient", "slate", "sand", 30.0))
    assert gradient.caption() == "A small red circle on the left, on a background fading from slate to sand."


def test_parsing_finds_synonyms_and_plurals_with_spans() -> None:
    text = "Two Half-Moons, a violet rhombus, three plus signs and some donuts near a crescent moon."
    found = scenes.find_objects(text)
    assert [(m.shape, m.text, m.plural) for m in found] == [
        ("crescent", "Half-Moons", True),
        ("diamond", "rhombus", False),
        ("cross", "plus signs", True),
        ("ring", "donuts", True),
        ("crescent", "crescent moon", False),
    ]
    assert all(text[m.start : m.end] == m.text for m in found)
    assert found[1].colour == "purple"
    assert scenes.mentioned_shapes("boxes, crosses, discs and annuli") == (
        "circle",
        "square",
        "cross",
        "ring",
    )


def test_parsing_ignores_object_words_inside_other_words() -> None:
    text = (
        "Start bringing the starfish across the barn; a crossbar, squared heartbeat, moonlight, "
        "barrels, circled rings-tones, plus a boxer and a dotted outline."
    )
    found = scenes.find_objects(text)
    assert [(m.shape, m.text) for m in found] == [("ring", "rings")]


def test_check_caption_splits_present_and_hallucinated() -> None:
    sc = next(s for s in default_scenes(1) if "star" in s.classes and "heart" not in s.classes)
    check = scenes.check_caption(sc, "A big star next to two red Hearts.")
    assert check.correct == ("star",) and check.hallucinated == ("heart",)
    assert [m.text for m in check.hallucinated_mentions] == ["Hearts"]
    assert check.hallucinated_mentions[0].colour == "red"
    assert set(check.missed) == set(sc.classes) - {"star"}


# ---------------------------------------------------------------------------------------- speed


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    batch = scenes.render_batch(scenes.make_scenes(100, seed=9))
    rate = len(batch) / (time.perf_counter() - start)
    assert rate > 50, f"{rate:.0f} scenes/s"
