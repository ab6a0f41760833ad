"""Synthetic scenes of coloured shapes with exact labels, a controlled co-occurrence prior and
templated captions: the images of the ViT heads analysis and of the scene-llava testbed.

By stage: :mod:`~analyses.tasks.scenes.shapes` (vocabulary and geometry),
:mod:`~analyses.tasks.scenes.config` (:class:`SceneConfig`, co-occurrence rules),
:mod:`~analyses.tasks.scenes.scene` (a scene, its image and caption),
:mod:`~analyses.tasks.scenes.generate` (:func:`make_scenes`), :mod:`~analyses.tasks.scenes.mentions`
(object words in text) and :mod:`~analyses.tasks.scenes.statistics` (co-occurrence, tables)::

    from analyses.tasks import scenes

    cfg = scenes.SceneConfig(rules=(scenes.CooccurrenceRule("circle", "star", p=0.8),))
    batch = scenes.make_scenes(500, seed=0, config=cfg)
    images = scenes.render_batch(batch)                     # [500, 224, 224, 3] uint8
    scenes.cooccurrence(batch).p("circle", "star")          # about 0.8

See docs/scene-llava.md ("The scenes").
"""

from __future__ import annotations

from analyses.tasks.scenes.config import CooccurrenceRule, SceneConfig
from analyses.tasks.scenes.generate import LAYOUT_TRIES, PLACEMENT_CANDIDATES, make_scene, make_scenes
from analyses.tasks.scenes.mentions import (
    CaptionCheck,
    Mention,
    check_caption,
    find_objects,
    mentioned_shapes,
)
from analyses.tasks.scenes.scene import (
    NUMBER_WORDS,
    PLACE_PHRASES,
    Background,
    Scene,
    SceneObject,
    caption,
    instance_map,
    object_mask,
    plural,
    render,
    render_background,
    render_batch,
)
from analyses.tasks.scenes.shapes import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOUR_NAMES,
    COLOUR_SYNONYMS,
    COLOURS,
    FEW_EDGES,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    NOISE_FINE,
    NOISE_GRID,
    NOISE_SMOOTH,
    POSITIONS,
    RING_INNER,
    SHAPE_NAMES,
    SHAPES,
    SIZE_FRACTIONS,
    SIZE_JITTER,
    SIZES,
    BackgroundKind,
    Position,
    Predicate,
    ShapeClass,
    Side,
    Size,
    check_shape,
)
from analyses.tasks.scenes.statistics import Cooccurrence, cooccurrence, object_table, scene_table

__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_KINDS",
    "COLOURS",
    "COLOUR_NAMES",
    "COLOUR_SYNONYMS",
    "FEW_EDGES",
    "LAYOUT_TRIES",
    "MAX_IMAGE_SIDE",
    "MIN_IMAGE_SIDE",
    "NOISE_FINE",
    "NOISE_GRID",
    "NOISE_SMOOTH",
    "NUMBER_WORDS",
    "PLACEMENT_CANDIDATES",
    "PLACE_PHRASES",
    "POSITIONS",
    "RING_INNER",
    "SHAPES",
    "SHAPE_NAMES",
    "SIZES",
    "SIZE_FRACTIONS",
    "SIZE_JITTER",
    "Background",
    "BackgroundKind",
    "CaptionCheck",
    "Cooccurrence",
    "CooccurrenceRule",
    "Mention",
    "Position",
    "Predicate",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "ShapeClass",
    "Side",
    "Size",
    "caption",
    "check_caption",
    "check_shape",
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
