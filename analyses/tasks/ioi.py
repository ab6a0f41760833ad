"""Indirect-object identification (IOI) prompts for circuit analysis (Wang et al. 2022), built offline.

``"When Mary and John went to the store, John gave a drink to"`` -> ``" Mary"``: the indirect object
(IO) is the name that occurs once, the subject (S) occurs twice (S1, S2), END is the last position.
:func:`make_ioi` draws distinct items from the templates, in both name orders (ABBA, BABA), with
names, places and objects that are single tokens (:func:`usable_words`). Each :class:`IOIItem` has
its token ids, the positions of IO, S1, S2 and END (found through the tokenizer's offset mapping)
and token-aligned corrupted variants (``"abc"``, the paper's ABC distribution, and
``"s2_io_flip"``); :func:`group_by_template` batches items of one length without padding.

See docs/analyses/circuits.md.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any, Literal

from probe.errors import ConfigError
from probe.loading import BosPolicy, LoadedModel, bos_policy

Order = Literal["ABBA", "BABA"]
CorruptionKind = Literal["abc", "s2_io_flip"]
ORDERS: tuple[Order, ...] = ("ABBA", "BABA")
CORRUPTIONS: tuple[CorruptionKind, ...] = ("abc", "s2_io_flip")
MAX_TRIES_PER_ITEM = 200

# Templates: {N1} and {N2} are the first two names (IO, S for ABBA; S, IO for BABA), {S2} the
# subject's second mention; the prompt ends right before the IO. Every slot follows a space.
TEMPLATES: tuple[str, ...] = (
    "When {N1} and {N2} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "Then, {N1} and {N2} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a lot of fun at the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {N1} and {N2} were working at the {PLACE}. {S2} decided to give a {OBJECT} to",
    "Then, {N1} and {N2} were thinking about going to the {PLACE}. {S2} wanted to give a {OBJECT} to",
    "Then, {N1} and {N2} had a long argument, and afterwards {S2} said to",
    "After {N1} and {N2} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "While {N1} and {N2} were working at the {PLACE}, {S2} gave a {OBJECT} to",
    "While {N1} and {N2} were commuting to the {PLACE}, {S2} gave a {OBJECT} to",
    "After the lunch, {N1} and {N2} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Afterwards, {N1} and {N2} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {S2} gave it to",
    "The {PLACE} {N1} and {N2} went to had a {OBJECT}. {S2} gave it to",
    "Then, {N1} and {N2} had a long argument. Afterwards {S2} said to",
)

NAMES: tuple[str, ...] = (
    "Mary",
    "John",
    "James",
    "Robert",
    "Michael",
    "William",
    "David",
    "Richard",
    "Joseph",
    "Thomas",
    "Charles",
    "Daniel",
    "Matthew",
    "Anthony",
    "Mark",
    "Paul",
    "Steven",
    "Andrew",
    "Kevin",
    "Brian",
    "George",
    "Edward",
    "Ryan",
    "Jacob",
    "Gary",
    "Eric",
    "Jonathan",
    "Stephen",
    "Larry",
    "Justin",
    "Scott",
    "Frank",
    "Brandon",
    "Gregory",
    "Samuel",
    "Patrick",
    "Jack",
    "Dennis",
    "Jerry",
    "Tyler",
    "Aaron",
    "Henry",
    "Adam",
    "Peter",
    "Nathan",
    "Kyle",
    "Walter",
    "Ethan",
    "Jeremy",
    "Harold",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Nancy",
    "Lisa",
    "Betty",
    "Margaret",
    "Sandra",
    "Ashley",
    "Emily",
    "Donna",
    "Michelle",
    "Carol",
    "Amanda",
    "Melissa",
    "Deborah",
    "Stephanie",
    "Rebecca",
    "Laura",
    "Sharon",
    "Cynthia",
    "Kathleen",
    "Amy",
    "Angela",
    "Anna",
    "Helen",
    "Emma",
    "Nicole",
    "Samantha",
    "Katherine",
    "Christine",
    "Rachel",
    "Carolyn",
    "Janet",
    "Catherine",
    "Maria",
    "Heather",
    "Diane",
    "Julie",
    "Joyce",
    "Victoria",
    "Kelly",
    "Lauren",
    "Alice",
    "Grace",
    "Sophie",
    "Max",
    "Tom",
    "Alex",
    "Ben",
    "Sam",
    "Lucy",
)

PLACES: tuple[str, ...] = (
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "house",
    "park",
    "station",
    "library",
    "museum",
    "beach",
    "market",
    "church",
    "cinema",
    "theater",
    "bank",
    "hotel",
    "zoo",
    "farm",
    "gym",
    "bakery",
    "cafe",
    "airport",
    "mall",
    "river",
    "lake",
    "forest",
    "castle",
    "kitchen",
)

OBJECTS: tuple[str, ...] = (
    "ring",
    "kiss",
    "bone",
    "basketball",
    "computer",
    "necklace",
    "drink",
    "snack",
    "book",
    "ball",
    "bottle",
    "pen",
    "letter",
    "gift",
    "cake",
    "flower",
    "hat",
    "key",
    "phone",
    "ticket",
    "box",
    "sandwich",
    "card",
    "coin",
    "watch",
    "bag",
    "camera",
    "chair",
    "plate",
    "toy",
)


# ---------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class Target:
    """What a generator needs of a model: its tokenizer, a name for messages, and its BOS policy."""

    tokenizer: Any
    name: str
    bos: BosPolicy

    @property
    def prefix(self) -> list[int]:
        return [self.bos.token_id] if self.bos.prepend and self.bos.token_id is not None else []


def resolve_target(tokenizer_or_model: Any) -> Target:
    """A :class:`Target` from a LoadedModel (its BOS policy) or a bare tokenizer (its own default)."""
    if isinstance(tokenizer_or_model, LoadedModel):
        m = tokenizer_or_model
        if m.kind != "language":
            raise ConfigError(f"{m.name} is a {m.kind} model; prompt tasks need a language model")
        return Target(m.tokenizer, m.name, m.bos)
    tok = tokenizer_or_model
    if not callable(tok) or not hasattr(tok, "decode"):
        raise ConfigError(f"expected a LoadedModel or a tokenizer, got {type(tok).__name__}")
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"tokenizer {type(tok).__name__} gives no offset mapping; load a fast tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    name = getattr(tok, "name_or_path", "") or type(tok).__name__
    return Target(tok, name, bos_policy(tok, "default"))


_SINGLE: weakref.WeakKeyDictionary[Any, dict[str, int | None]] = weakref.WeakKeyDictionary()


def single_token_id(tokenizer: Any, word: str) -> int | None:
    """The id of ``" " + word`` if that is exactly one token for this tokenizer, else ``None``."""
    try:
        cache = _SINGLE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        cache = {}
    if word not in cache:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        cache[word] = int(ids[0]) if len(ids) == 1 else None
    return cache[word]


def single_token_words(tokenizer: Any, words: Sequence[str]) -> tuple[str, ...]:
    """The words of ``words`` that are one token with their leading space, in their given order."""
    return tuple(w for w in words if single_token_id(tokenizer, w) is not None)


@dataclass(frozen=True)
class Lexicon:
    """The usable names, places and objects for one tokenizer (each one token with a leading space)."""

    names: tuple[str, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]


def usable_words(tokenizer_or_model: Any) -> Lexicon:
    """Filter :data:`NAMES`, :data:`PLACES` and :data:`OBJECTS` to single tokens (leading space)."""
    tok = resolve_target(tokenizer_or_model).tokenizer
    lex = Lexicon(
        single_token_words(tok, NAMES), single_token_words(tok, PLACES), single_token_words(tok, OBJECTS)
    )
    if len(lex.names) < 5 or not lex.places or not lex.objects:
        raise ConfigError(
            f"this tokenizer keeps too few single-token words ({len(lex.names)} names, {len(lex.places)} "
            f"places, {len(lex.objects)} objects; IOI needs 5 names, 1 place, 1 object); use a "
            "tokenizer with a word-level vocabulary (BPE or SentencePiece)"
        )
    return lex


Part = Literal["all", "discovery", "held_out"]
PARTS: tuple[Part, ...] = ("all", "discovery", "held_out")


def word_part(lex: Lexicon, part: Part) -> Lexicon:
    """Every word (``"all"``), the even-indexed half (``"discovery"``) or the odd half (``"held_out"``)."""
    if part not in PARTS:
        raise ConfigError(f"part={part!r}: choose one of {', '.join(PARTS)}")
    if part == "all":
        return lex
    start = 0 if part == "discovery" else 1
    half = Lexicon(
        lex.names[start::2], lex.places[start::2] or lex.places, lex.objects[start::2] or lex.objects
    )
    if len(half.names) < 5:
        raise ConfigError(
            f"this tokenizer keeps {len(lex.names)} single-token names, too few to split into two halves of "
            "at least 5: use part='all' (held-out prompts then differ by seed only)"
        )
    return half


# ---------------------------------------------------------------------------------------- filling


def fill_segments(segments: Sequence[tuple[str, str | None]]) -> tuple[str, dict[str, tuple[int, int]]]:
    """Join ``(text, slot)`` segments; return the text and each named slot's character span."""
    text, spans = "", {}
    for piece, slot in segments:
        if slot is not None:
            spans[slot] = (len(text), len(text) + len(piece))
        text += piece
    return text, spans


def parse_template(template: str) -> list[tuple[str, str | None]]:
    """Split ``"When {N1} and …"`` into literal and slot segments: ``[("When ", None), ("N1", "N1"), …]``."""
    out: list[tuple[str, str | None]] = []
    rest = template
    while "{" in rest:
        lit, _, tail = rest.partition("{")
        slot, _, rest = tail.partition("}")
        if lit:
            out.append((lit, None))
        out.append((slot, slot))
    if rest:
        out.append((rest, None))
    return out


def tokenize_with_slots(
    target: Target, text: str, spans: Mapping[str, tuple[int, int]]
) -> tuple[tuple[int, ...], dict[str, int]] | None:
    """Token ids of ``text`` (BOS under ``target``'s policy) and the position of each slot's token.

    A slot's position is the one token whose character span overlaps the slot's; ``None`` when a slot
    overlaps several tokens or its token is not the slot word's own single-token id (a merge with a
    neighbour).
    """
    enc = target.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    shift = len(target.prefix)
    positions: dict[str, int] = {}
    for slot, (c0, c1) in spans.items():
        hits = [i for i, (a, b) in enumerate(offsets) if b > c0 and a < c1]
        if len(hits) != 1 or ids[hits[0]] != single_token_id(target.tokenizer, text[c0:c1]):
            return None
        positions[slot] = hits[0] + shift
    return tuple(target.prefix + ids), positions


# ---------------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Corruption:
    """A corrupted prompt token-aligned with its clean one (same length, same slot positions)."""

    kind: CorruptionKind
    text: str
    ids: tuple[int, ...]
    names: tuple[str, str, str]  # the names at the IO, S1 and S2 positions
    changed: tuple[int, ...]  # token positions where ids differ from the clean ids


@dataclass(frozen=True)
class IOIItem:
    """One IOI prompt, its answer (IO) and distractor (S), positions and corrupted variants.

    ``ids`` include the BOS when the policy prepends one, and all positions index ``ids``:
    ``ids[io_pos] == io_id``, ``ids[s1_pos] == ids[s2_pos] == s_id``, ``end_pos == len(ids) - 1``.
    ``template`` indexes :data:`TEMPLATES`. ``order`` is ``"ABBA"`` (IO named first) or ``"BABA"``.
    """

    text: str
    ids: tuple[int, ...]
    io: str
    s: str
    io_id: int
    s_id: int
    io_pos: int
    s1_pos: int
    s2_pos: int
    end_pos: int
    template: int
    order: Order
    place: str
    object: str
    bos: bool
    corruptions: tuple[Corruption, ...]

    def __post_init__(self) -> None:
        ok = (
            self.ids[self.io_pos] == self.io_id
            and self.ids[self.s1_pos] == self.ids[self.s2_pos] == self.s_id
            and self.end_pos == len(self.ids) - 1
            and all(len(c.ids) == len(self.ids) for c in self.corruptions)
        )
        if not ok:
            raise ConfigError(f"inconsistent IOI item {self.text!r}; build items with make_ioi")

    @property
    def answer(self) -> str:
        """The correct completion, with its leading space (`` Mary``)."""
        return " " + self.io

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def corrupt(self, kind: CorruptionKind) -> Corruption:
        """The corrupted variant ``kind`` (``"abc"`` or ``"s2_io_flip"``)."""
        for c in self.corruptions:
            if c.kind == kind:
                return c
        raise ConfigError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "io": self.io,
            "s": self.s,
            "io_id": self.io_id,
            "s_id": self.s_id,
            "io_pos": self.io_pos,
            "s1_pos": self.s1_pos,
            "s2_pos": self.s2_pos,
            "end_pos": self.end_pos,
            "template": self.template,
            "order": self.order,
            "n_tokens": self.n_tokens,
            **{f"{c.kind}_text": c.text for c in self.corruptions},
        }


def _fill(template: str, order: Order, io: str, s: str, s2: str, place: str, obj: str) -> tuple[str, dict]:
    n1, n2 = (io, s) if order == "ABBA" else (s, io)
    values = {"N1": n1, "N2": n2, "S2": s2, "PLACE": place, "OBJECT": obj}
    segments = [(values[slot] if slot else lit, slot) for lit, slot in parse_template(template)]
    return fill_segments(segments)


def _slot_roles(order: Order) -> dict[str, str]:
    """Which template slot holds IO and S1 in this order."""
    return {"io": "N1", "s1": "N2"} if order == "ABBA" else {"io": "N2", "s1": "N1"}


def build_item(
    target: Target,
    template: int,
    order: Order,
    io: str,
    s: str,
    place: str,
    obj: str,
    abc: tuple[str, str, str],
) -> IOIItem | None:
    """One item, or ``None`` when a slot merges with a neighbour or a variant does not align.

    ``abc`` are the three replacement names for the ABC variant, at the IO, S1 and S2 positions.
    """
    tmpl = TEMPLATES[template]
    roles = _slot_roles(order)
    text, spans = _fill(tmpl, order, io, s, s, place, obj)
    got = tokenize_with_slots(target, text, spans)
    if got is None:
        return None
    ids, pos = got
    io_pos, s1_pos, s2_pos = pos[roles["io"]], pos[roles["s1"]], pos["S2"]
    io_id, s_id = ids[io_pos], ids[s1_pos]

    corruptions = []
    # ABC: the names at IO, S1 and S2 become abc[0], abc[1], abc[2]; the S2 slot holds abc[2].
    c_text, c_spans = _fill(tmpl, order, abc[0], abc[1], abc[2], place, obj)
    flip_text, flip_spans = _fill(tmpl, order, io, s, io, place, obj)
    for kind, ctext, cspans, names, expect in (
        ("abc", c_text, c_spans, abc, {io_pos, s1_pos, s2_pos}),
        ("s2_io_flip", flip_text, flip_spans, (io, s, io), {s2_pos}),
    ):
        cgot = tokenize_with_slots(target, ctext, cspans)
        if cgot is None or len(cgot[0]) != len(ids) or cgot[1] != pos:
            return None
        changed = tuple(i for i, (a, b) in enumerate(zip(ids, cgot[0], strict=True)) if a != b)
        if set(changed) != expect:
            return None
        corruptions.append(Corruption(kind, ctext, cgot[0], names, changed))  # type: ignore[arg-type]

    return IOIItem(
        text=text,
        ids=ids,
        io=io,
        s=s,
        io_id=io_id,
        s_id=s_id,
        io_pos=io_pos,
        s1_pos=s1_pos,
        s2_pos=s2_pos,
        end_pos=len(ids) - 1,
        template=template,
        order=order,
        place=place,
        object=obj,
        bos=bool(target.prefix),
        corruptions=tuple(corruptions),
    )


# ---------------------------------------------------------------------------------------- datasets


def _check_choices(templates: Sequence[int] | None, orders: Sequence[str]) -> tuple[list[int], list[Order]]:
    chosen = list(range(len(TEMPLATES))) if templates is None else list(templates)
    if not chosen:
        raise ConfigError(
            f"no templates given; pass template ids from 0 to {len(TEMPLATES) - 1} or templates=None for all"
        )
    for t in chosen:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < len(TEMPLATES):
            raise ConfigError(
                f"unknown IOI template {t!r}; template ids are 0 to {len(TEMPLATES) - 1} "
                "(ioi.TEMPLATES), or templates=None for all"
            )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"templates {chosen} repeat an id; give each template once")
    ords = list(orders)
    bad = [o for o in ords if o not in ORDERS]
    if bad or not ords or len(set(ords)) != len(ords):
        raise ConfigError(f"bad orders {tuple(orders)!r}; give a non-empty subset of {ORDERS}")
    return chosen, ords  # type: ignore[return-value]


def capacity(
    tokenizer_or_model: Any,
    *,
    templates: Sequence[int] | None = None,
    orders: Sequence[str] = ORDERS,
    part: Part = "all",
) -> int:
    """How many distinct prompts the product space holds for this tokenizer (an upper bound:
    the rare draws whose slots merge with a neighbour are discarded)."""
    chosen, ords = _check_choices(templates, orders)
    lex = word_part(usable_words(tokenizer_or_model), part)
    n_names = len(lex.names)
    total = 0
    for t in chosen:
        tmpl = TEMPLATES[t]
        total += prod(
            (
                n_names * (n_names - 1),
                len(lex.places) if "{PLACE}" in tmpl else 1,
                len(lex.objects) if "{OBJECT}" in tmpl else 1,
            )
        )
    return total * len(ords)


def make_ioi(
    tokenizer_or_model: Any,
    n: int,
    seed: int = 0,
    *,
    templates: Sequence[int] | None = None,
    orders: Sequence[str] = ORDERS,
    part: Part = "all",
) -> list[IOIItem]:
    """``n`` distinct IOI items, deterministic per ``seed``.

    ``part`` draws from every word (``"all"``) or from one of two disjoint halves of the names,
    places and objects (``"discovery"``: the even-indexed words, ``"held_out"``: the odd ones), so
    held-out prompts share no name, place or object with the prompts a circuit was found on.

    Orders alternate (balanced), templates cycle through a seeded permutation of ``templates``
    (default: all of :data:`TEMPLATES`), and names, place and object are drawn uniformly from
    :func:`usable_words`. Raises :class:`~probe.errors.ConfigError` for ``n < 1``, ``n`` above
    :func:`capacity`, an unknown template id or order.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}; ask for at least one item")
    chosen, ords = _check_choices(templates, orders)
    cap = capacity(tokenizer_or_model, templates=chosen, orders=ords, part=part)
    if n > cap:
        raise ConfigError(
            f"asked for {n} IOI items but only {cap} distinct prompts exist for these "
            f"templates and orders; ask for at most {cap} or allow more templates"
        )
    target = resolve_target(tokenizer_or_model)
    lex = word_part(usable_words(target.tokenizer), part)
    rng = random.Random(f"ioi:{seed}" if part == "all" else f"ioi:{seed}:{part}")
    cycle = chosen[:]
    rng.shuffle(cycle)
    items: list[IOIItem] = []
    seen: set[str] = set()
    failures = 0
    while len(items) < n:
        i = len(items)
        order, template = ords[i % len(ords)], cycle[(i // len(ords)) % len(cycle)]
        io, s, *abc = rng.sample(lex.names, 5)
        place, obj = rng.choice(lex.places), rng.choice(lex.objects)
        text, _ = _fill(TEMPLATES[template], order, io, s, s, place, obj)
        item = None if text in seen else build_item(target, template, order, io, s, place, obj, tuple(abc))  # type: ignore[arg-type]
        if item is None:
            failures += 1
            if failures > MAX_TRIES_PER_ITEM * (i + 1):
                raise ConfigError(
                    f"could not draw {n} distinct aligned IOI items for {target.name} "
                    f"({i} after {failures} rejected draws); ask for fewer items"
                )
            continue
        seen.add(text)
        items.append(item)
    return items


def group_by_template(items: Sequence[IOIItem]) -> dict[tuple[int, int], list[IOIItem]]:
    """Items grouped by ``(template, n_tokens)`` in first-seen order: each group stacks without padding.

    With single-token slots every item of a template has the same length, so there is one group
    per template; the length in the key keeps a batch rectangular even where that fails.
    """
    groups: dict[tuple[int, int], list[IOIItem]] = {}
    for it in items:
        groups.setdefault((it.template, it.n_tokens), []).append(it)
    return groups
