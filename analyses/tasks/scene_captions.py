"""Scene captions: the training data of ``scene-llava``, exact object-hallucination benchmarks
(CHAIR and POPE) on the synthetic scenes, and the recipe behind ``headlab train scene-llava``.

The data plants a language prior on purpose: a few class pairs appear together with probability
``p_pair`` in training, and the ``conflict`` split holds the scenes where a pair's first class is
present and its partner absent. Everything that scores text (:func:`chair_table`,
:func:`chair_summary`, :func:`pope_questions`, :func:`parse_yes_no`, :func:`pope_table`,
:func:`pope_summary`) is a pure function of (scene, text) pairs; :func:`evaluate` runs a model and
:func:`train_scene_llava` trains its projector.

See docs/scene-llava.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import pandas as pd

from analyses.tasks import scenes as sc
from probe.errors import ConfigError

if TYPE_CHECKING:
    from probe.loading import LoadedModel
    from probe.vlm_train import TrainConfig, TrainExample

Split = Literal["train", "iid", "conflict"]
PopeKind = Literal["random", "popular", "adversarial"]
CaptionStyle = Literal["reference", "list", "sentences", "count"]
POPE_KINDS: tuple[PopeKind, ...] = get_args(PopeKind)
CAPTION_STYLES: tuple[CaptionStyle, ...] = get_args(CaptionStyle)

CAPTION_PROMPT = "Describe the image."
"""The prompt of the CHAIR benchmark (also one of the training prompts)."""
CAPTION_PROMPTS = (
    CAPTION_PROMPT,
    "What is in this image?",
    "Write a short caption for the image.",
    "List the objects you see in the picture.",
)
POPE_TEMPLATE = "Is there {noun} in the image?"
"""POPE's question (Li et al. 2023), with the article the noun needs."""
_SALT = 0x5CA9  # keeps the caption generator's random streams apart from the scene generator's


# ============================================================================== config and scenes


@dataclass(frozen=True)
class SceneCaptionConfig:
    """The data of ``scene-llava``: scene counts and seeds, the planted co-occurrence pairs, captions.

    ``pairs`` are ``"given:then"`` class pairs; in training scenes ``then`` is present with
    probability ``p_pair`` when ``given`` is (one :class:`scenes.CooccurrenceRule` each; a class may
    be in one pair only). ``examples_per_scene`` examples are made per training scene, each a yes/no
    question with probability ``p_question`` and otherwise a caption; a caption names a class by one
    of its synonyms with probability ``p_synonym``.
    """

    n_train: int = 20000
    n_eval: int = 500
    seed: int = 0
    eval_seed: int = 1
    conflict_seed: int = 2
    image_size: int = 224
    pairs: tuple[str, ...] = ("circle:star", "square:triangle", "heart:crescent", "hexagon:ring")
    p_pair: float = 0.85
    max_classes: int = 3
    max_count: int = 3
    max_objects: int = 8
    examples_per_scene: int = 2
    p_question: float = 0.3
    p_synonym: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("n_train", "n_eval", "examples_per_scene"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "n_eval" else 1)
            ):
                raise ConfigError(f"{name} must be a positive integer (n_eval may be 0), got {value!r}")
        for name in ("p_pair", "p_question", "p_synonym"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
        self.rules()  # checks the pairs
        self.scene_config("train")  # checks sizes and counts

    def rules(self, p: float | None = None) -> tuple[sc.CooccurrenceRule, ...]:
        out = []
        for pair in self.pairs:
            given, sep, then = pair.partition(":")
            if not sep or given not in sc.SHAPES or then not in sc.SHAPES or given == then:
                raise ConfigError(
                    f"pair {pair!r} must be 'given:then' with two different shapes from {', '.join(sc.SHAPE_NAMES)}"
                )
            out.append(sc.CooccurrenceRule(given, then, self.p_pair if p is None else p))
        named = [c for r in out for c in (r.given, r.then)]
        if len(set(named)) != len(named):
            raise ConfigError(f"pairs {self.pairs} share a class; give each class to one pair only")
        return tuple(out)

    def scene_config(self, split: Split) -> sc.SceneConfig:
        """``train`` and ``iid``: the pairs hold with ``p_pair``; ``conflict``: a pair's partner is always
        removed when its first class is drawn (P = 0)."""
        return sc.SceneConfig(
            height=self.image_size,
            width=self.image_size,
            max_classes=self.max_classes,
            max_count=self.max_count,
            max_objects=self.max_objects,
            rules=self.rules(0.0 if split == "conflict" else None),
        )

    def fingerprint(self, split: Split, n: int) -> str:
        """A string naming a split's scenes exactly (the feature cache key)."""
        seed = {"train": self.seed, "iid": self.eval_seed, "conflict": self.conflict_seed}[split]
        fields = {"split": split, "n": n, "seed": seed, "scenes": repr(self.scene_config(split))}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def train_scenes(config: SceneCaptionConfig) -> list[sc.Scene]:
    """The ``n_train`` training scenes (stream ``seed``)."""
    return sc.make_scenes(config.n_train, seed=config.seed, config=config.scene_config("train"))


def eval_scenes(config: SceneCaptionConfig, split: Split = "iid", n: int | None = None) -> list[sc.Scene]:
    """Held-out scenes: ``iid`` (the training distribution, stream ``eval_seed``) or ``conflict`` (stream
    ``conflict_seed``; only scenes where some pair's first class is present and its partner absent)."""
    n = config.n_eval if n is None else n
    if n < 1:
        raise ConfigError(f"ask for at least one evaluation scene, got n={n}")
    if split == "iid":
        return sc.make_scenes(n, seed=config.eval_seed, config=config.scene_config("iid"))
    if split != "conflict":
        raise ConfigError(f"split must be 'iid' or 'conflict', got {split!r}")
    scene_config = config.scene_config("conflict")
    givens = {r.given for r in config.rules()}
    out: list[sc.Scene] = []
    index = 0
    while len(out) < n:
        scene = sc.make_scene(index, seed=config.conflict_seed, config=scene_config)
        index += 1
        if givens & set(scene.classes):
            out.append(scene)
        if index > 1000 * n:
            raise ConfigError("could not find conflict scenes; the pairs' first classes never appear")
    return out


class RenderedScenes:
    """Scenes as an image set for :mod:`probe.vlm_train`: ``images[i]`` renders scene ``i`` on demand."""

    def __init__(self, scenes: Sequence[sc.Scene]) -> None:
        self.scenes = list(scenes)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.scenes[index].render()


def training_statistics(config: SceneCaptionConfig, n: int | None = None) -> sc.Cooccurrence:
    """Presence and co-occurrence counts of the first ``n`` (default all) training scenes: what POPE's
    popular and adversarial negatives are ranked by."""
    n = config.n_train if n is None else min(n, config.n_train)
    return sc.cooccurrence(sc.make_scenes(n, seed=config.seed, config=config.scene_config("train")))


# ============================================================================== captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(shape: str, plural: bool, rng: np.random.Generator, p_synonym: float) -> str:
    spec = sc.SHAPES[shape]
    word = spec.name
    if spec.synonyms and rng.random() < p_synonym:
        word = spec.synonyms[int(rng.integers(len(spec.synonyms)))]
    return sc.plural(word) if plural else word


def _background(scene: sc.Scene) -> str:
    bg = scene.background
    if bg.kind == "plain":
        return f"a plain {bg.colour} background"
    if bg.kind == "gradient":
        return f"a background fading from {bg.colour} to {bg.colour_to}"
    return f"a mottled {bg.colour} background"


def _groups(scene: sc.Scene, rng: np.random.Generator, shuffle: bool) -> list[list[sc.SceneObject]]:
    groups: dict[tuple[str, str], list[sc.SceneObject]] = {}
    for o in sorted(scene.objects, key=lambda o: (o.centre[0], o.centre[1])):
        groups.setdefault((o.colour, o.shape), []).append(o)
    out = list(groups.values())
    if shuffle:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def _phrase(objs: list[sc.SceneObject], rng: np.random.Generator, p_synonym: float, sizes: bool) -> str:
    """``a small red circle in the top left`` / ``two blue stars on the right`` (side only when shared)."""
    if len(objs) == 1:
        o = objs[0]
        size = f"{o.size} " if sizes and o.size != "medium" else ""
        where = sc.PLACE_PHRASES[o.position]
        return f"{_article(f'{size}{o.colour} {_noun(o.shape, False, rng, p_synonym)}')} {where}"
    number = sc.NUMBER_WORDS[len(objs)] if len(objs) < len(sc.NUMBER_WORDS) else str(len(objs))
    sides = {o.side for o in objs}
    where = f" on the {next(iter(sides))}" if len(sides) == 1 else ""
    return f"{number} {objs[0].colour} {_noun(objs[0].shape, True, rng, p_synonym)}{where}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def training_caption(
    scene: sc.Scene, rng: np.random.Generator, style: CaptionStyle | None = None, p_synonym: float = 0.0
) -> str:
    """A ground-truth caption in one of :data:`CAPTION_STYLES` (drawn from ``rng`` when None).

    ``reference`` is :func:`scenes.caption` verbatim; ``list`` (an opening, the objects in left-to-right
    or shuffled order, the background half the time), ``sentences`` (one sentence per group) and
    ``count`` (the number of objects first). Every present class is named, no absent one.
    """
    if style is None:
        style = CAPTION_STYLES[int(rng.integers(len(CAPTION_STYLES)))]
    if style == "reference":
        return sc.caption(scene)
    sizes = bool(rng.random() < 0.5)
    groups = _groups(scene, rng, shuffle=bool(rng.random() < 0.5))
    phrases = [_phrase(g, rng, p_synonym, sizes) for g in groups]
    with_background = bool(rng.random() < 0.5)
    if style == "list":
        opening = ("The image shows", "This picture shows", "I can see", "In the image:")[
            int(rng.integers(4))
        ]
        text = f"{opening} {_join(phrases)}."
        return text + (
            f" The background is {_background(scene).removeprefix('a ')}." if with_background else ""
        )
    if style == "sentences":
        lines = []
        for g, phrase in zip(groups, phrases, strict=True):
            lines.append(f"There {'is' if len(g) == 1 else 'are'} {phrase}.")
        if with_background:
            lines.append(f"It is on {_background(scene)}.")
        return " ".join(lines)
    if style == "count":
        n = scene.n_objects
        number = sc.NUMBER_WORDS[n] if n < len(sc.NUMBER_WORDS) else str(n)
        text = f"{_capital(number)} object{'s' if n != 1 else ''}: {_join(phrases)}."
        return text + (f" They are on {_background(scene)}." if with_background else "")
    raise ConfigError(f"unknown caption style {style!r}; choose from {', '.join(CAPTION_STYLES)}")


def pope_question(shape: str) -> str:
    """POPE's question about one class: ``Is there a star in the image?``."""
    return POPE_TEMPLATE.format(noun=_article(sc.SHAPES[shape].name))


def training_examples(scenes: Sequence[sc.Scene], config: SceneCaptionConfig) -> list[TrainExample]:
    """``examples_per_scene`` (image, prompt, answer) triples per scene; image ``i`` is ``scenes[i]``.

    Deterministic in (``config.seed``, scene index). Yes/no questions ask about a present class or a
    uniformly drawn absent one, half and half, and are answered ``Yes`` / ``No``.
    """
    from probe.vlm_train import TrainExample

    out = []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([_SALT, config.seed, scene.seed, scene.index])
        present = list(scene.classes)
        absent = [s for s in sc.SHAPE_NAMES if s not in present]
        for _ in range(config.examples_per_scene):
            if rng.random() < config.p_question and present and absent:
                ask_present = bool(rng.random() < 0.5)
                pool = present if ask_present else absent
                shape = pool[int(rng.integers(len(pool)))]
                out.append(TrainExample(i, pope_question(shape), "Yes" if ask_present else "No"))
            else:
                prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
                out.append(TrainExample(i, prompt, training_caption(scene, rng, p_synonym=config.p_synonym)))
    return out


def data_statistics(
    scenes: Sequence[sc.Scene], examples: Sequence[TrainExample], config: SceneCaptionConfig
) -> dict[str, Any]:
    """What the training set holds: class frequencies, the planted pairs' measured conditionals, example
    kinds, the share of "Yes" answers, caption lengths."""
    stats = sc.cooccurrence(scenes)
    questions = [e for e in examples if e.prompt.startswith("Is there")]
    captions = [e for e in examples if not e.prompt.startswith("Is there")]
    return {
        "n_scenes": len(scenes),
        "n_examples": len(examples),
        "n_captions": len(captions),
        "n_questions": len(questions),
        "yes_share": float(np.mean([e.target == "Yes" for e in questions])) if questions else None,
        "mean_objects": float(np.mean([s.n_objects for s in scenes])),
        "caption_words_mean": float(np.mean([len(e.target.split()) for e in captions])) if captions else None,
        "class_frequency": {s: float(stats.present[i] / stats.n_scenes) for i, s in enumerate(stats.shapes)},
        "pairs": [
            {
                "given": r.given,
                "then": r.targets[0],
                "p_planned": r.p,
                "p_then_given": stats.p(r.given, r.targets[0]),
                "p_then_not_given": stats.p_absent(r.given, r.targets[0]),
                "p_given_then": stats.p(r.targets[0], r.given),
            }
            for r in config.rules()
        ],
    }


# ============================================================================== bootstrap


def _interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return math.nan, math.nan
    lo, hi = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def _resample(n: int, n_boot: int, seed: int) -> np.ndarray:
    if n_boot < 1:
        raise ConfigError(f"n_boot must be at least 1, got {n_boot}")
    return np.random.default_rng([_SALT, seed, n]).integers(0, n, size=(n_boot, n))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)


# ============================================================================== CHAIR


CHAIR_COLUMNS = [
    "scene",
    "seed",
    "index",
    "text",
    "n_words",
    "mentioned",
    "hallucinated",
    "missed",
    "n_present",
    "n_mentioned",
    "n_correct",
    "n_hallucinated",
    "chair_s",
]


def chair_table(scenes: Sequence[sc.Scene], texts: Sequence[str]) -> pd.DataFrame:
    """One row per description: which classes it mentions (synonyms and plurals parsed, each class
    counted once per description), which of those are absent (hallucinated), which present ones it
    missed, and whether it hallucinates at all (``chair_s``)."""
    if len(scenes) != len(texts):
        raise ConfigError(
            f"{len(scenes)} scenes but {len(texts)} descriptions; give one description per scene"
        )
    rows = []
    for k, (scene, text) in enumerate(zip(scenes, texts, strict=True)):
        check = sc.check_caption(scene, text)
        rows.append(
            {
                "scene": k,
                "seed": scene.seed,
                "index": scene.index,
                "text": text,
                "n_words": len(text.split()),
                "mentioned": ",".join(check.mentioned),
                "hallucinated": ",".join(check.hallucinated),
                "missed": ",".join(check.missed),
                "n_present": len(scene.classes),
                "n_mentioned": len(check.mentioned),
                "n_correct": len(check.correct),
                "n_hallucinated": len(check.hallucinated),
                "chair_s": bool(check.hallucinated),
            }
        )
    return pd.DataFrame(rows, columns=CHAIR_COLUMNS)


def chair_summary(
    table: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> pd.DataFrame:
    """CHAIR_S, CHAIR_I, object recall and mean length, with percentile bootstrap intervals (descriptions
    resampled). ``CHAIR_I`` = hallucinated / mentioned classes summed over descriptions (a ratio of
    sums, as Rohrbach et al.); ``recall`` = correctly mentioned / present classes."""
    h = table["n_hallucinated"].to_numpy(float)
    m = table["n_mentioned"].to_numpy(float)
    c = table["n_correct"].to_numpy(float)
    p = table["n_present"].to_numpy(float)
    s = table["chair_s"].to_numpy(float)
    w = table["n_words"].to_numpy(float)
    n = len(table)
    point = {
        "CHAIR_S": float(s.mean()) if n else math.nan,
        "CHAIR_I": float(_ratio(h.sum(), m.sum())),
        "recall": float(_ratio(c.sum(), p.sum())),
        "words": float(w.mean()) if n else math.nan,
    }
    rows = []
    idx = _resample(n, n_boot, seed) if n else None
    for metric, value in point.items():
        if idx is None:
            lo = hi = math.nan
        else:
            boot = {
                "CHAIR_S": s[idx].mean(1),
                "CHAIR_I": _ratio(h[idx].sum(1), m[idx].sum(1)),
                "recall": _ratio(c[idx].sum(1), p[idx].sum(1)),
                "words": w[idx].mean(1),
            }[metric]
            lo, hi = _interval(boot, alpha)
        rows.append(
            {
                "benchmark": "CHAIR",
                "setting": "captions",
                "metric": metric,
                "value": value,
                "lo": lo,
                "hi": hi,
                "n": n,
            }
        )
    return pd.DataFrame(rows)


# ============================================================================== POPE


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE probe: scene position ``scene`` in the evaluated list, the class asked about, whether it
    is present (``label``), the negative-sampling setting, and the question text."""

    scene: int
    shape: str
    label: bool
    kind: PopeKind
    text: str


def _ranked_absent(
    scene: sc.Scene, kind: PopeKind, stats: sc.Cooccurrence, rng: np.random.Generator
) -> list[str]:
    present = set(scene.classes)
    absent = [s for s in stats.shapes if s not in present]
    if kind == "random":
        return [absent[i] for i in rng.permutation(len(absent))]
    if kind == "popular":
        score = {s: float(stats.present[stats.shapes.index(s)]) for s in absent}
    elif kind == "adversarial":
        cond = np.nan_to_num(stats.conditional())
        score = {
            s: float(sum(cond[stats.shapes.index(p), stats.shapes.index(s)] for p in present)) for s in absent
        }
    else:
        raise ConfigError(f"POPE setting must be one of {', '.join(POPE_KINDS)}, got {kind!r}")
    ties = rng.random(len(absent))  # equal scores are broken at random, not by vocabulary order
    order = sorted(range(len(absent)), key=lambda i: (-score[absent[i]], ties[i]))
    return [absent[i] for i in order]


def pope_questions(
    scenes: Sequence[sc.Scene], stats: sc.Cooccurrence, kind: PopeKind, *, n_per_scene: int = 3, seed: int = 0
) -> list[PopeQuestion]:
    """Balanced POPE probes per scene: up to ``n_per_scene`` present classes (drawn at random) and as
    many absent ones, chosen by ``kind``: ``random`` (uniform among absent classes), ``popular`` (the
    absent classes most frequent in the training set ``stats``) or ``adversarial`` (the absent classes
    with the highest summed P(class | present class) in ``stats``)."""
    if n_per_scene < 1:
        raise ConfigError(f"n_per_scene must be at least 1, got {n_per_scene}")
    out = []
    for k, scene in enumerate(scenes):
        rng = np.random.default_rng([_SALT, seed, POPE_KINDS.index(kind), scene.seed, scene.index])
        present = [s for s in scene.classes if s in stats.shapes]
        chosen = [present[i] for i in rng.permutation(len(present))[:n_per_scene]]
        negatives = _ranked_absent(scene, kind, stats, rng)[: len(chosen)]
        out += [PopeQuestion(k, s, True, kind, pope_question(s)) for s in chosen]
        out += [PopeQuestion(k, s, False, kind, pope_question(s)) for s in negatives]
    return out


_NO_WORDS = re.compile(r"\b(no|not)\b", re.IGNORECASE)
_YES_WORD = re.compile(r"\byes\b", re.IGNORECASE)


def parse_yes_no(text: str) -> tuple[bool, bool]:
    """``(answer_is_yes, understood)`` following POPE's rule: "no" or "not" anywhere means no, anything
    else yes. ``understood`` is False when the text has neither "yes" nor a negation (counted as yes,
    as POPE does, but reported)."""
    if _NO_WORDS.search(text):
        return False, True
    return True, bool(_YES_WORD.search(text))


POPE_COLUMNS = ["scene", "shape", "kind", "label", "answer", "yes", "understood", "correct", "yes_minus_no"]


def pope_table(
    questions: Sequence[PopeQuestion], answers: Sequence[str], margins: Sequence[float] | None = None
) -> pd.DataFrame:
    """One row per probe: its label, the answer text, the parsed answer and whether it is right."""
    if len(questions) != len(answers):
        raise ConfigError(f"{len(questions)} questions but {len(answers)} answers")
    rows = []
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        yes, understood = parse_yes_no(a)
        rows.append(
            {
                "scene": q.scene,
                "shape": q.shape,
                "kind": q.kind,
                "label": q.label,
                "answer": a,
                "yes": yes,
                "understood": understood,
                "correct": yes == q.label,
                "yes_minus_no": float(margins[i]) if margins is not None else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=POPE_COLUMNS)


def _pope_metrics(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    total = tp + fp + tn + fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    with np.errstate(invalid="ignore"):
        f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "accuracy": _ratio(tp + tn, total),
        "precision": precision,
        "recall": recall,
        "F1": f1,
        "yes_ratio": _ratio(tp + fp, total),
    }


def pope_summary(
    table: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> pd.DataFrame:
    """Accuracy, precision, recall, F1 ("yes" is the positive answer) and yes-ratio per setting, with
    percentile bootstrap intervals that resample scenes (a scene's probes stay together)."""
    rows = []
    for kind, part in table.groupby("kind", sort=False):
        scenes_in = np.unique(part["scene"].to_numpy())
        pos = {s: i for i, s in enumerate(scenes_in)}
        k = part["scene"].map(pos).to_numpy()
        label, yes = part["label"].to_numpy(bool), part["yes"].to_numpy(bool)
        counts = np.zeros((4, len(scenes_in)))
        for row, mask in enumerate([label & yes, ~label & yes, ~label & ~yes, label & ~yes]):
            np.add.at(counts[row], k[mask], 1)
        point = _pope_metrics(*(counts.sum(1, keepdims=True)))
        idx = _resample(len(scenes_in), n_boot, seed)
        boot = _pope_metrics(*(counts[:, idx].sum(2)))
        for metric, value in point.items():
            lo, hi = _interval(boot[metric], alpha)
            rows.append(
                {
                    "benchmark": "POPE",
                    "setting": kind,
                    "metric": metric,
                    "value": float(value[0]),
                    "lo": lo,
                    "hi": hi,
                    "n": len(part),
                }
            )
        rows.append(
            {
                "benchmark": "POPE",
                "setting": kind,
                "metric": "understood",
                "value": float(part["understood"].mean()),
                "lo": math.nan,
                "hi": math.nan,
                "n": len(part),
            }
        )
    return pd.DataFrame(rows)


# ============================================================================== evaluation with a model


@dataclass(frozen=True)
class EvalConfig:
    """How :func:`evaluate` runs the benchmarks."""

    prompt: str = CAPTION_PROMPT
    max_new_tokens: int = 96
    pope_kinds: tuple[str, ...] = POPE_KINDS
    pope_per_scene: int = 3
    batch_size: int = 32
    n_boot: int = 1000
    seed: int = 0
    alpha: float = 0.05


def evaluate(
    model: LoadedModel,
    scenes: Sequence[sc.Scene],
    stats: sc.Cooccurrence,
    config: EvalConfig | None = None,
    *,
    progress: bool = False,
) -> dict[str, pd.DataFrame]:
    """CHAIR on greedy descriptions and POPE (each setting) on greedy yes/no answers of ``scenes``.

    ``stats`` are the training set's counts (:func:`training_statistics`), which rank POPE's popular
    and adversarial negatives. Returns ``summary`` (one row per benchmark, setting and metric with
    ``value, lo, hi, n``), ``captions`` (:func:`chair_table`) and ``pope`` (:func:`pope_table`).
    """
    from probe import vlm

    config = config or EvalConfig()
    if not scenes:
        raise ConfigError("no scenes to evaluate; pass at least one")
    images = sc.render_batch(scenes)
    t0 = time.perf_counter()
    texts = vlm.generate(
        model,
        images,
        config.prompt,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        progress=progress,
    )
    t_captions = time.perf_counter() - t0
    captions = chair_table(scenes, texts)
    questions = [
        q
        for kind in config.pope_kinds
        for q in pope_questions(scenes, stats, kind, n_per_scene=config.pope_per_scene, seed=config.seed)  # type: ignore[arg-type]
    ]
    t0 = time.perf_counter()
    answers: list[vlm.YesNoAnswer] = []
    chunk = 8 * config.batch_size  # the probes' images are copies: make them a chunk at a time
    for start in range(0, len(questions), chunk):
        part = questions[start : start + chunk]
        answers += vlm.answer_yes_no(
            model,
            images[[q.scene for q in part]],
            [q.text for q in part],
            batch_size=config.batch_size,
            progress=progress,
        )
    t_pope = time.perf_counter() - t0
    pope = pope_table(questions, [a.text for a in answers], [a.yes_minus_no for a in answers])
    summary = pd.concat(
        [
            chair_summary(captions, n_boot=config.n_boot, seed=config.seed, alpha=config.alpha),
            pope_summary(pope, n_boot=config.n_boot, seed=config.seed, alpha=config.alpha),
        ],
        ignore_index=True,
    )
    summary.attrs["seconds"] = {"captions": t_captions, "pope": t_pope}
    return {"summary": summary, "captions": captions, "pope": pope}


# ============================================================================== the training recipe


def train_scene_llava(
    base: str = "scene-llava",
    data: SceneCaptionConfig | None = None,
    train: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    n_eval: int | None = None,
    init: str | Path | None = None,
    command: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """``headlab train scene-llava``: scenes -> captions -> projector (+ LoRA) -> file -> benchmarks.

    ``base`` is ``scene-llava`` (clip-vit-b16 + smollm2-135m with a fresh projector), ``tiny-llava``,
    or a LLaVA checkpoint directory (its projector is trained further). ``init``: a projector file
    (without LoRA deltas) to continue from, so that a long run can be split over several calls of a
    time-limited machine (the optimiser and the schedule start again; give each call a new
    ``seed`` so that it sees the examples in a new order). ``out`` defaults to
    ``data/scene_llava_projector.safetensors``. ``n_eval`` held-out scenes of each split (default
    ``data.n_eval``; 0: none) are scored with CHAIR and POPE after training. Returns the record that
    is also written next to the weights.
    """
    import torch

    import probe
    from probe import vlm, vlm_train
    from probe.loading import resolve_device, resolve_dtype

    data = data or SceneCaptionConfig()
    train = train or vlm_train.TrainConfig()
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    target = Path(out) if out is not None else vlm.ASSEMBLIES["scene-llava"].projector_path
    start: vlm.ProjectorFile | None = None
    if init is not None:
        start = vlm.read_projector(init)
        if start.lora:
            raise ConfigError(
                f"{init} holds LoRA deltas; continuing from it would merge them into the language model and "
                "drop them from the new file. Continue only projector-only runs; train LoRA runs in one call"
            )
    t0 = time.perf_counter()
    if base in vlm.ASSEMBLIES:
        model = vlm.load_assembly(base, projector="fresh", seed=train.seed, device=dev, dtype=dt)
    else:
        model = probe.load_model(base, device=dev, dtype=dt, seed=train.seed)
    vlm._require_vlm(model)
    if start is not None:
        vlm.apply_projector(model, start)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    scenes = train_scenes(data)
    examples = training_examples(scenes, data)
    n_eval = data.n_eval if n_eval is None else n_eval
    held = eval_scenes(data, "iid", max(1, min(256, n_eval or 64)))
    held_examples = training_examples(held, dataclasses.replace(data, examples_per_scene=1))
    stats = sc.cooccurrence(scenes)
    t_data = time.perf_counter() - t0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        result = vlm_train.train(
            model,
            RenderedScenes(scenes),
            examples,
            train,
            eval_images=RenderedScenes(held),
            eval_examples=held_examples,
            feature_key=data.fingerprint("train", data.n_train),
            eval_feature_key=data.fingerprint("iid", len(held)),
            progress=progress,
        )
    result.timings.update({"load_s": t_load, "data_s": t_data})
    evaluation: dict[str, Any] = {}
    if n_eval:
        for split in ("iid", "conflict"):
            t0 = time.perf_counter()
            tables = evaluate(
                model, eval_scenes(data, split, n_eval), stats, EvalConfig(seed=train.seed), progress=progress
            )
            evaluation[split] = {
                "summary": tables["summary"].to_dict(orient="records"),
                "examples": tables["captions"]
                .head(5)[["text", "mentioned", "hallucinated"]]
                .to_dict(orient="records"),
                "seconds": time.perf_counter() - t0,
            }
    meta = {
        "command": command,
        "base": base,
        "init": {"path": str(init), "training": start.meta.get("training")} if start is not None else None,
        "data_config": dataclasses.asdict(data),
        "data_stats": data_statistics(scenes, examples, data),
        "evaluation": evaluation,
    }
    paths = vlm_train.save(result, target, model, meta=meta)
    record: dict[str, Any] = json.loads(paths["record"].read_text())
    record["files"] = {k: str(v) for k, v in paths.items()}
    return record
