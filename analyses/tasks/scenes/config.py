"""What scenes look like and hold: :class:`SceneConfig` and the co-occurrence rules.

See docs/scene-llava.md ("The scenes").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from analyses.tasks.scenes.shapes import (
    BACKGROUND_KINDS,
    COLOUR_NAMES,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    SHAPE_NAMES,
    SIZES,
    BackgroundKind,
    Size,
)
from probe.errors import ConfigError


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
        ints = {
            "min_classes": self.min_classes,
            "max_classes": self.max_classes,
            "max_count": self.max_count,
            "max_objects": self.max_objects,
            "gap": self.gap,
        }
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
        raise ConfigError(
            f"co-occurrence rule {rule.given} -> {rule.then}: give one or more distinct "
            "classes other than the given one"
        )
    for name, value in (("p", rule.p), ("otherwise", rule.otherwise)):
        if value is not None and not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
            raise ConfigError(
                f"co-occurrence rule {rule.given} -> {rule.then}: {name} must be a "
                f"probability in [0, 1], got {value!r}"
            )
