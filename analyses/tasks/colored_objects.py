"""One-shot Colored Objects prompts (Merullo et al., ICLR 2024), built offline.

A one-shot example, then a question such as "Q: On the desk, I see a yellow key, a black hat, and a
pink box. What color is the hat? A:" -> " black". :func:`make_colored_objects` draws distinct items
with objects and colours that are single tokens (:func:`usable_words`). Each
:class:`ColoredObjectsItem` has its token ids, the scene's candidate colours, the positions of every
object and colour mention, of the asked object in the question and of END, and a token-aligned
corruption that asks about another object of the scene; :func:`group_by_length` batches items of
one length.

See docs/analyses/circuits.md.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from math import perm
from typing import Any

from analyses.tasks.ioi import (
    PARTS,
    Part,
    Target,
    fill_segments,
    resolve_target,
    single_token_words,
    tokenize_with_slots,
)
from probe.errors import ConfigError

N_OBJECTS = 3
MAX_TRIES_PER_ITEM = 200

OBJECTS: tuple[str, ...] = (
    "pen",
    "cup",
    "book",
    "key",
    "hat",
    "box",
    "ball",
    "bag",
    "phone",
    "watch",
    "lamp",
    "plate",
    "bowl",
    "mug",
    "spoon",
    "fork",
    "knife",
    "bottle",
    "candle",
    "clock",
    "pencil",
    "notebook",
    "puzzle",
    "sock",
    "shoe",
    "scarf",
    "teddy",
    "wallet",
    "comb",
    "brush",
    "paperclip",
    "jug",
    "vase",
    "basket",
    "ruler",
    "keychain",
    "necklace",
    "ring",
    "coin",
    "card",
)

COLOURS: tuple[str, ...] = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "silver",
    "gold",
    "teal",
    "magenta",
    "burgundy",
    "turquoise",
    "mauve",
    "fuchsia",
)

SURFACES: tuple[str, ...] = (
    "table",
    "desk",
    "floor",
    "shelf",
    "counter",
    "bed",
    "chair",
    "couch",
    "dresser",
    "nightstand",
)


@dataclass(frozen=True)
class Lexicon:
    """The usable objects and colours for one tokenizer (each one token with a leading space)."""

    objects: tuple[str, ...]
    colours: tuple[str, ...]


def usable_words(tokenizer_or_model: Any) -> Lexicon:
    """Filter :data:`OBJECTS` and :data:`COLOURS` to single tokens (with their leading space)."""
    tok = resolve_target(tokenizer_or_model).tokenizer
    lex = Lexicon(single_token_words(tok, OBJECTS), single_token_words(tok, COLOURS))
    if len(lex.objects) < 2 * N_OBJECTS or len(lex.colours) < N_OBJECTS:
        raise ConfigError(
            f"this tokenizer keeps too few single-token words ({len(lex.objects)} objects, "
            f"{len(lex.colours)} colours; need {2 * N_OBJECTS} and {N_OBJECTS}); use a tokenizer with "
            "a word-level vocabulary (BPE or SentencePiece)"
        )
    return lex


@dataclass(frozen=True)
class ColoredObjectsItem:
    """One one-shot Colored Objects prompt and its token-aligned corruption.

    All positions index ``ids`` (BOS included where the policy prepends one):
    ``ids[object_positions[k]]`` is the query scene's ``objects[k]``, ``ids[colour_positions[k]]``
    its colour ``candidates[k]``; ``question_pos`` is the asked object in the question and
    ``end_pos == len(ids) - 1``. ``answer_id == candidate_ids[asked]``.
    """

    text: str
    ids: tuple[int, ...]
    objects: tuple[str, ...]
    candidates: tuple[str, ...]  # the scene's colours, in scene order
    candidate_ids: tuple[int, ...]
    asked: int  # index of the asked object
    answer: str  # " " + candidates[asked]
    answer_id: int
    object_positions: tuple[int, ...]
    colour_positions: tuple[int, ...]
    question_pos: int
    end_pos: int
    surface: str
    bos: bool
    corrupted_text: str
    corrupted_ids: tuple[int, ...]
    corrupted_asked: int

    def __post_init__(self) -> None:
        ok = (
            self.ids[self.question_pos] == self.ids[self.object_positions[self.asked]]
            and self.answer_id == self.candidate_ids[self.asked]
            and len(self.corrupted_ids) == len(self.ids)
            and self.end_pos == len(self.ids) - 1
            and self.corrupted_asked != self.asked
        )
        if not ok:
            raise ConfigError(
                f"inconsistent Colored Objects item {self.text!r}; build items with make_colored_objects"
            )

    @property
    def corrupted_answer(self) -> str:
        return " " + self.candidates[self.corrupted_asked]

    @property
    def corrupted_answer_id(self) -> int:
        return self.candidate_ids[self.corrupted_asked]

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "answer": self.answer,
            "answer_id": self.answer_id,
            "candidates": list(self.candidates),
            "asked": self.asked,
            "corrupted_asked": self.corrupted_asked,
            "n_tokens": self.n_tokens,
        }


def _scene(
    surface: str, objects: Sequence[str], colours: Sequence[str], asked: int, tag: str
) -> list[tuple[str, str | None]]:
    """Segments of ``"Q: On the {surface}, I see a c0 o0, a c1 o1, and a c2 o2. What color is the oK?\\nA:"``."""
    segs: list[tuple[str, str | None]] = [(f"Q: On the {surface}, I see", None)]
    for k, (obj, col) in enumerate(zip(objects, colours, strict=True)):
        lead = " a " if k < len(objects) - 1 else " and a "
        segs += [(lead, None), (col, f"{tag}colour{k}"), (" ", None), (obj, f"{tag}object{k}")]
        segs.append(("," if k < len(objects) - 1 else ".", None))
    segs += [(" What color is the ", None), (objects[asked], f"{tag}question"), ("?\nA:", None)]
    return segs


def _prompt(
    example: tuple[str, Sequence[str], Sequence[str], int],
    query: tuple[str, Sequence[str], Sequence[str], int],
) -> tuple[str, dict[str, tuple[int, int]]]:
    e_surface, e_objects, e_colours, e_asked = example
    segs = _scene(e_surface, e_objects, e_colours, e_asked, "example_")
    segs += [(" " + e_colours[e_asked] + "\n\n", None)]
    segs += _scene(*query, "")
    text, spans = fill_segments(segs)
    return text, {k: v for k, v in spans.items() if not k.startswith("example_")}


def build_item(
    target: Target,
    example: tuple[str, Sequence[str], Sequence[str], int],
    query: tuple[str, Sequence[str], Sequence[str], int],
    corrupted_asked: int,
) -> ColoredObjectsItem | None:
    """One item, or ``None`` when a slot merges with a neighbour or the corruption does not align."""
    surface, objects, colours, asked = query
    text, spans = _prompt(example, query)
    got = tokenize_with_slots(target, text, spans)
    c_text, c_spans = _prompt(example, (surface, objects, colours, corrupted_asked))
    c_got = tokenize_with_slots(target, c_text, c_spans)
    if got is None or c_got is None:
        return None
    ids, pos = got
    c_ids, c_pos = c_got
    if len(c_ids) != len(ids) or c_pos != pos:
        return None
    changed = [i for i, (a, b) in enumerate(zip(ids, c_ids, strict=True)) if a != b]
    if changed != [pos["question"]]:
        return None
    obj_pos = tuple(pos[f"object{k}"] for k in range(len(objects)))
    col_pos = tuple(pos[f"colour{k}"] for k in range(len(objects)))
    cand_ids = tuple(ids[p] for p in col_pos)
    return ColoredObjectsItem(
        text=text,
        ids=ids,
        objects=tuple(objects),
        candidates=tuple(colours),
        candidate_ids=cand_ids,
        asked=asked,
        answer=" " + colours[asked],
        answer_id=cand_ids[asked],
        object_positions=obj_pos,
        colour_positions=col_pos,
        question_pos=pos["question"],
        end_pos=len(ids) - 1,
        surface=surface,
        bos=bool(target.prefix),
        corrupted_text=c_text,
        corrupted_ids=c_ids,
        corrupted_asked=corrupted_asked,
    )


def word_part(lex: Lexicon, part: Part) -> Lexicon:
    """Every word (``"all"``), or the even (``"discovery"``) or odd (``"held_out"``) half of the
    objects; colours are few and stay shared."""
    if part not in PARTS:
        raise ConfigError(f"part={part!r}: choose one of {', '.join(PARTS)}")
    if part == "all":
        return lex
    half = Lexicon(lex.objects[0 if part == "discovery" else 1 :: 2], lex.colours)
    if len(half.objects) < 2 * N_OBJECTS:
        raise ConfigError(
            f"this tokenizer keeps {len(lex.objects)} single-token objects, too few to split into two halves "
            f"of at least {2 * N_OBJECTS}: use part='all' (held-out prompts then differ by seed only)"
        )
    return half


def capacity(tokenizer_or_model: Any, part: Part = "all") -> int:
    """Distinct queries for this tokenizer: surfaces × ordered object triples × ordered distinct
    colour triples × asked object. Prompts differ also by their one-shot example, so the number of
    distinct prompts is larger still; this is the bound :func:`make_colored_objects` enforces."""
    lex = word_part(usable_words(tokenizer_or_model), part)
    return len(SURFACES) * perm(len(lex.objects), N_OBJECTS) * perm(len(lex.colours), N_OBJECTS) * N_OBJECTS


def make_colored_objects(
    tokenizer_or_model: Any, n: int, seed: int = 0, part: Part = "all"
) -> list[ColoredObjectsItem]:
    """``n`` distinct one-shot Colored Objects items, deterministic per ``seed``.

    ``part``: every object, or one of two disjoint halves of the objects (see :func:`word_part`).

    The asked object's index cycles 0, 1, 2 (balanced answer positions); the corrupted question asks
    about one of the other two at random. Raises :class:`~probe.errors.ConfigError` for ``n < 1`` or
    ``n`` above :func:`capacity`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}; ask for at least one item")
    cap = capacity(tokenizer_or_model, part)
    if n > cap:
        raise ConfigError(
            f"asked for {n} Colored Objects items but only {cap} distinct prompts exist; ask for at most {cap}"
        )
    target = resolve_target(tokenizer_or_model)
    lex = word_part(usable_words(target.tokenizer), part)
    rng = random.Random(f"colored_objects:{seed}" if part == "all" else f"colored_objects:{seed}:{part}")
    items: list[ColoredObjectsItem] = []
    seen: set[str] = set()
    failures = 0
    while len(items) < n:
        i = len(items)
        e_surface, q_surface = rng.sample(SURFACES, 2)
        objs = rng.sample(lex.objects, 2 * N_OBJECTS)
        example = (e_surface, objs[:N_OBJECTS], rng.sample(lex.colours, N_OBJECTS), rng.randrange(N_OBJECTS))
        asked = i % N_OBJECTS
        query = (q_surface, objs[N_OBJECTS:], rng.sample(lex.colours, N_OBJECTS), asked)
        other = rng.choice([k for k in range(N_OBJECTS) if k != asked])
        item = build_item(target, example, query, other)
        if item is None or item.text in seen:
            failures += 1
            if failures > MAX_TRIES_PER_ITEM * (i + 1):
                raise ConfigError(
                    f"could not draw {n} distinct aligned Colored Objects items for {target.name} "
                    f"({i} after {failures} rejected draws); ask for fewer items"
                )
            continue
        seen.add(item.text)
        items.append(item)
    return items


__all__ = [
    "COLOURS",
    "OBJECTS",
    "SURFACES",
    "ColoredObjectsItem",
    "Lexicon",
    "build_item",
    "capacity",
    "group_by_length",
    "make_colored_objects",
    "usable_words",
]


def group_by_length(items: Sequence[ColoredObjectsItem]) -> dict[int, list[ColoredObjectsItem]]:
    """Items grouped by token length (surface words may take several tokens): batches without padding."""
    groups: dict[int, list[ColoredObjectsItem]] = {}
    for it in items:
        groups.setdefault(it.n_tokens, []).append(it)
    return groups
