"""Object words in any text: :func:`find_objects` (names, synonyms and plurals of the shape classes,
with the colour named before them) and :func:`check_caption` (present against hallucinated classes,
as CHAIR counts them).

See docs/scene-llava.md ("The scenes").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from analyses.tasks.scenes.scene import Scene, plural
from analyses.tasks.scenes.shapes import (
    COLOUR_NAMES,
    COLOUR_SYNONYMS,
    SHAPE_NAMES,
    SHAPES,
    ShapeClass,
    check_shape,
)


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
        check_shape(s)
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
