"""The haystack: standard-library prose de-duplicated by sentence, tokenized once per tokenizer, put
in seeded paragraph orders and cut to an exact number of tokens. See docs/analyses/retrieval.md."""

from __future__ import annotations

import contextlib
import io
import random
import re
import warnings
import weakref
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any

from analyses.tasks.needles.spans import _decode, _encode
from analyses.tasks.needles.templates import TEMPLATES
from analyses.tasks.needles.words import ANSWER_WORDS, EXTRA_MODULES
from analyses.tasks.text import _docstrings, _is_prose, prose_paragraphs
from probe.errors import ConfigError

_SENTENCE_BREAK = re.compile(r"(?<=[.!?]) (?=[A-Z\"'(])")


def _sentences(paragraph: str) -> list[str]:
    return _SENTENCE_BREAK.split(paragraph)


def _sentence_key(sentence: str) -> str:
    return " ".join(sentence.lower().split())


@lru_cache(maxsize=1)
def haystack_paragraphs() -> tuple[tuple[str, ...], ...]:
    """Every haystack paragraph as its sentences, in a fixed order; no sentence occurs twice.

    Sources: :func:`analyses.tasks.text.prose_paragraphs`, the docstrings of :data:`EXTRA_MODULES`,
    and the topics of ``pydoc_data.topics``, filtered to prose by the same rule. A paragraph is left
    out if it repeats a sentence of an earlier one, or mentions a needle template's key word.
    """
    candidates: list[str] = list(prose_paragraphs())
    seen_paragraphs = set(candidates)
    docs: list[str] = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in EXTRA_MODULES:
            docs.extend(_docstrings(name))
        try:
            from pydoc_data.topics import topics

            docs.extend(topics[key] for key in sorted(topics))
        except ImportError:  # a distribution that strips pydoc_data: the docstrings remain
            pass
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(para.split())
            if text not in seen_paragraphs and _is_prose(text):
                seen_paragraphs.add(text)
                candidates.append(text)
    words = "|".join(re.escape(k) for t in TEMPLATES for k in t.keywords)
    banned = re.compile(rf"\b(?:{words})\b", re.IGNORECASE)
    seen: set[str] = set()
    out: list[tuple[str, ...]] = []
    for para in candidates:
        if banned.search(para):
            continue
        sentences = _sentences(para)
        keys = [_sentence_key(s) for s in sentences]
        if len(set(keys)) < len(keys) or any(k in seen for k in keys):
            continue
        seen.update(keys)
        out.append(tuple(sentences))
    return tuple(out)


@dataclass
class _Source:
    """The haystack source as one tokenizer sees it (built once per tokenizer)."""

    sentence_ids: list[list[int]]  # each sentence tokenized alone
    paragraph_starts: list[int]  # first sentence index of each paragraph (+ total at the end)
    break_tokens: int  # tokens of the blank line between paragraphs
    vocabulary: frozenset[int]  # every token id of the source
    words: tuple[str, ...]  # answer words none of whose tokens occurs in the source
    n_tokens: int  # an estimate: sentences tokenized alone, plus the blank lines


_SOURCES: weakref.WeakKeyDictionary[Any, _Source] = weakref.WeakKeyDictionary()


def _source(tokenizer: Any) -> _Source:
    try:
        cached = _SOURCES.get(tokenizer)
    except TypeError:  # not weak-referenceable: build every time
        cached = None
    if cached is not None:
        return cached
    paragraphs = haystack_paragraphs()
    flat = [s for p in paragraphs for s in p]
    sentence_ids = [list(x) for x in tokenizer(flat, add_special_tokens=False)["input_ids"]]
    starts = [0, *accumulate(len(p) for p in paragraphs)]
    vocabulary = frozenset(t for ids in sentence_ids for t in ids)
    words = []
    for word in ANSWER_WORDS:
        ids = _encode(tokenizer, " " + word)[0]
        if len(ids) <= 3 and not vocabulary.intersection(ids):
            words.append(word)
    n_break = len(_encode(tokenizer, "\n\n")[0])
    source = _Source(
        sentence_ids=sentence_ids,
        paragraph_starts=starts,
        break_tokens=n_break,
        vocabulary=vocabulary,
        words=tuple(words),
        n_tokens=sum(map(len, sentence_ids)) + n_break * (len(paragraphs) - 1),
    )
    with contextlib.suppress(TypeError):
        _SOURCES[tokenizer] = source
    return source


def source_stats(tokenizer: Any) -> dict[str, int]:
    """How much distinct prose the haystack source holds, in this tokenizer's tokens.

    ``tokens``: the whole source joined as a haystack (blank lines between paragraphs) and tokenized.
    """
    src = _source(tokenizer)
    joined = "\n\n".join(" ".join(p) for p in haystack_paragraphs())
    return {
        "paragraphs": len(src.paragraph_starts) - 1,
        "sentences": len(src.sentence_ids),
        "tokens": len(_encode(tokenizer, joined)[0]),
        "distinct_token_ids": len(src.vocabulary),
        "answer_words": len(src.words),
    }


class _Order:
    """The source's paragraphs in one seeded order, joined into one text and cut by its own tokens.

    ``cut(m)`` is the text of the first ``m`` tokens of the joined text (tokenized as a whole, as the
    paper's code trims its haystack), with the sentence boundaries inside it.
    """

    def __init__(self, tokenizer: Any, seed: int | str, rotate: int = 0, hint: int = 0) -> None:
        self.tokenizer, self.hint = tokenizer, hint  # hint: the longest cut expected
        src = _source(tokenizer)
        paragraphs = haystack_paragraphs()
        order = list(range(len(paragraphs)))
        random.Random(f"headlab-needles-haystack:{seed}").shuffle(order)
        order = order[rotate:] + order[:rotate]
        self.units: list[tuple[str, bool]] = []  # (sentence, starts a paragraph)
        costs: list[int] = []
        for p in order:
            for j, k in enumerate(range(src.paragraph_starts[p], src.paragraph_starts[p + 1])):
                self.units.append((paragraphs[p][j], j == 0))
                costs.append(len(src.sentence_ids[k]) + (src.break_tokens if j == 0 and costs else 0))
        self.cum = [0, *accumulate(costs)]  # estimated tokens of units[:i] joined
        self.n_units = 0
        self.text = ""
        self.ids: list[int] = []
        self.ends: list[int] | None = None  # character end of each token (fast tokenizers)
        self.unit_ends: list[int] = []  # character end of each joined unit

    @property
    def capacity(self) -> int:
        """Tokens of the whole source in this order (an estimate until it is all tokenized)."""
        return len(self.ids) if self.n_units == len(self.units) else self.cum[-1]

    def _ensure(self, m: int) -> None:
        if len(self.ids) >= m + 8 or self.n_units == len(self.units):
            return
        k = min(len(self.units), bisect_right(self.cum, int(m * 1.1) + 256) + 1)
        parts, ends, size = [], [], 0
        for i, (text, first) in enumerate(self.units[:k]):
            piece = (("\n\n" if first else " ") if i else "") + text
            parts.append(piece)
            size += len(piece)
            ends.append(size)
        self.n_units, self.text, self.unit_ends = k, "".join(parts), ends
        self.ids, offsets = _encode(self.tokenizer, self.text)
        self.ends = [b for _, b in offsets] if offsets is not None else None

    def cut(self, m: int) -> tuple[str, list[tuple[int, int]]]:
        """The first ``m`` tokens' text and the places a needle may go: ``(character, token)``
        pairs at the start, after every whole sentence, and at the end."""
        self._ensure(max(m, self.hint))
        if m > len(self.ids):
            raise _too_long_for_source(self.tokenizer, m, len(self.ids))
        if m <= 0:
            return "", [(0, 0)]
        if self.ends is not None:
            end = self.ends[m - 1]
        else:
            prefix = _decode(self.tokenizer, self.ids[:m]).rstrip("\ufffd")  # a cut inside a UTF-8 character
            if not self.text.startswith(prefix):
                raise ConfigError(
                    "this tokenizer gives no offsets and its decoding changes the text; use a fast tokenizer"
                )
            end = len(prefix)
        bounds = [(0, 0)]
        for b in self.unit_ends:
            if b >= end:
                break
            if self.ends is not None:
                bounds.append((b, bisect_right(self.ends, b)))
            else:  # no offsets: the token position in proportion to the characters
                bounds.append((b, round(m * b / end)))
        bounds.append((end, m))
        return self.text[:end], bounds


class _Orders:
    """Lazily built rotations of one seeded order: rotation ``r`` starts at its ``r``-th paragraph.

    Tokenization is not additive, so a few prompt sizes cannot be reached by cutting one text (the
    count jumps by two where a cut adds a separator token and a word); another rotation is another
    text whose jumps fall elsewhere.
    """

    def __init__(self, tokenizer: Any, seed: int | str, hint: int = 0) -> None:
        self.tokenizer, self.seed, self.hint = tokenizer, seed, hint
        self._orders: dict[int, _Order] = {}

    def __getitem__(self, rotate: int) -> _Order:
        if rotate not in self._orders:
            self._orders[rotate] = _Order(self.tokenizer, self.seed, rotate, hint=self.hint)
        return self._orders[rotate]


ROTATIONS = 4  # texts tried for an exact prompt size before settling for the closest shorter one


def _fit(build: Callable[[int], tuple[int, Any]], target: int, m0: int, hi: int) -> tuple[int, Any]:
    """Find a haystack size ``m`` in ``[1, hi]`` whose prompt has ``target`` tokens.

    ``build(m) -> (n_tokens, result)``; ``n`` grows with ``m`` but not always one for one. Falls back
    to the longest prompt below ``target`` (or the shortest above it, if none is below).
    """
    tried: dict[int, tuple[int, Any]] = {}

    def run(m: int) -> tuple[int, Any]:
        if m not in tried:
            tried[m] = build(m)
        return tried[m]

    m = max(1, min(m0, hi))
    for _ in range(12):
        n, result = run(m)
        if n == target:
            return n, result
        nxt = max(1, min(m + target - n, hi))
        if nxt in tried:
            break
        m = nxt
    near = sorted(tried, key=lambda k: abs(tried[k][0] - target))[0]
    for m in range(max(1, near - 4), min(hi, near + 4) + 1):
        n, result = run(m)
        if n == target:
            return n, result
    below = [v for v in tried.values() if v[0] <= target]
    if not below:
        return min(tried.values(), key=lambda v: v[0])
    return max(below, key=lambda v: v[0])


def build_haystack(tokenizer: Any, n_tokens: int, seed: int = 0) -> str:
    """Exactly ``n_tokens`` tokens of haystack prose (tokenized alone, no special tokens).

    Whole paragraphs in a seeded order, then the first tokens of the next sentence, as the
    haystacks of :func:`make_grid` (without a needle).
    """
    if n_tokens < 1:
        raise ConfigError(f"n_tokens must be at least 1, got {n_tokens}")
    orders = _Orders(tokenizer, f"{seed}:0")
    best: tuple[int, str] = (0, "")
    for rotate in range(ROTATIONS):
        order = orders[rotate]

        def build(m: int, order: _Order = order) -> tuple[int, str]:
            text = order.cut(m)[0]
            return len(_encode(tokenizer, text)[0]), text

        n, text = _fit(build, n_tokens, n_tokens, order.capacity)
        if n == n_tokens:
            return str(text)
        if n < n_tokens:
            best = max(best, (n, str(text)))
    return best[1]


def _too_long_for_source(tokenizer: Any, n: int, capacity: int) -> ConfigError:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return ConfigError(
        f"the standard library's prose gives only {capacity} tokens of haystack for {name}, "
        f"{n} were asked for; ask for a shorter length"
    )
