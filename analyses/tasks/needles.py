"""Needle-in-a-haystack tests for retrieval-head scoring (Wu et al. 2024), built offline.

What one test is
----------------
A *needle* is one invented fact, ``"The secret passphrase for the Quillhaven archive is amber
falcon lantern."``, inserted at depth ``d`` (the fraction of the haystack before it) into a
*haystack* of real prose, followed by a question (``"What is the secret passphrase for the
Quillhaven archive?"``). The model must copy the *answer* (``amber falcon lantern``) from the
context. Retrieval scoring (Wu et al. 2024) needs to know exactly which prompt tokens are the answer
(the paper's code scores copies from the span of the answer, its ``real_needle``):
:class:`NeedleTest` records the prompt's token ids and the token spans of the needle and of its
answer, found by character offsets (:func:`find_span`), never by searching for the answer's
standalone token ids (a word tokenizes differently after a space, at the start of a text, or with
punctuation attached).

The haystack
------------
No corpus can be downloaded offline, so the haystack is the documentation of the installed Python
standard library: the prose paragraphs of :func:`analyses.tasks.text.prose_paragraphs` (docstrings
of ~95 modules), the docstrings of further standard-library modules (:data:`EXTRA_MODULES`) and the
language-reference topics of ``pydoc_data.topics`` (what ``help("FOR")`` shows), all filtered to
prose by the same rule. The source is de-duplicated *by sentence*: a paragraph that repeats any
sentence of an earlier one is dropped, so no sentence occurs twice in a haystack (docstrings of
subclasses and wrappers often repeat their parent's sentences). Paragraphs mentioning the needles'
key words (``passphrase``, ``expedition``, …) are dropped too, so nothing in the haystack competes
with the needle. :func:`source_stats` counts what is left; on CPython 3.11 it is 1,682 paragraphs
(4,005 sentences), 98K tokens for Gemma 3's tokenizer and 102K for SmolLM2's, so a 32K-token
haystack uses a third of it and different seeds give different texts. The text depends on the
Python version (recorded in every run's manifest).

A haystack of ``m`` tokens is the first ``m`` tokens of one text: the source's paragraphs in a
seeded order, joined by blank lines, tokenized as a whole and cut by tokens, as the paper's code
trims its haystack. It is whole paragraphs, then whole sentences, then the beginning of one more
sentence. The needle goes inline at the sentence boundary nearest to ``d * m`` tokens (the start
and the end of the haystack count as boundaries: depth 0 puts the needle first, depth 1 last, after
the cut sentence); :attr:`NeedleTest.depth_actual` is where it landed. The whole prompt is then
tokenized at once, as the model will see it, and ``m`` is corrected until the prompt has exactly
the requested number of tokens (BOS, chat markup, needle, question and answer prefix included);
this takes two to four tokenizations. Tokenization is not additive across joins, so a few sizes
cannot be reached by cutting one text (the count jumps by two where a cut brings in a separator
token and a word together); the same order started at its next paragraph is then tried (up to
:data:`ROTATIONS` texts), and only if none fits is the closest *shorter* prompt used
(:attr:`NeedleTest.n_tokens` says so). In the tests every length asked of SmolLM2's, Gemma 3's and
the byte tokenizer (256 to 8,192 tokens, and 32,768 on Gemma 3) came out exact. Each needle of a
grid has its own paragraph order, drawn from ``(seed, needle index)``; a 32K-token test for Gemma 3
takes about 0.15 s to build on one CPU core.

Needles and answers
-------------------
Four templates (:data:`TEMPLATES`), invented place names and answers of ``answer_words`` words
(default 3) drawn from a pool of concrete words (animals, colours, objects). An answer's tokens
must not occur anywhere else in the prompt, the haystack included (checked on the prompt's own
token ids): otherwise a head attending to another copy of the token would look like, or hide, a
copy from the needle. Candidate words whose tokens occur anywhere in the source are removed from
the pool up front; a needle whose answer still meets a token elsewhere (a merge across a join) is
discarded and another drawn. Numbers are not used: both real tokenizers split digits into single
tokens, all of which occur in the haystack. A byte-level tokenizer cannot meet the rule at all (every
byte occurs in prose); pass ``novel_answer_tokens=False`` for it.

The prompt
----------
If the tokenizer has a chat template (and ``chat`` is not ``False``), the context and question are
one user message and the generation prompt follows; otherwise the plain form
``"{context}\\n\\nQuestion: {question}\\nAnswer:"``. With ``answer_prefix=True`` (the default) the
answer turn begins with the needle's own lead-in (``"The secret passphrase for the Quillhaven
archive is"``), so the model's first generated tokens are the answer. BOS follows the model's BOS
policy (:class:`probe.loading.BosPolicy`); a chat template that writes its own BOS keeps it and
none is added a second time.

Usage
-----
::

    from analyses.tasks import needles

    tests = needles.make_grid(model, lengths=[1024, 4096, 16384], depths=[0, 0.5, 1], n_needles=3, seed=0)
    t = tests[0]
    t.prompt_ids[t.answer_span[0]:t.answer_span[1]] == t.answer_ids     # True
    needles.rouge1_recall(generated_text, t.answer) > needles.RECALL_GATE  # the paper's gate

References
----------
* Wu, Wang, Xiao, Peng & Fu (2024). Retrieval Head Mechanistically Explains Long-Context
  Factuality. (Official code: nightdessert/Retrieval_Head; its haystack trimming and ROUGE-1
  recall > 50 gate are followed here; its ROUGE uses a Porter stemmer, this one does not.)
* Kamradt (2023). LLMTest_NeedleInAHaystack.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import warnings
import weakref
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any

from analyses.tasks.text import _docstrings, _is_prose, prose_paragraphs
from probe.errors import ConfigError, ContextTooLongError
from probe.loading import BosPolicy, LoadedModel, bos_policy

RECALL_GATE = 0.5  # a test counts when ROUGE-1 recall of the answer is above this (the paper's 50)
MIN_HAYSTACK_TOKENS = 16

# Standard-library modules beyond analyses.tasks.text.SOURCE_MODULES: present on every CPython
# 3.11+ on every platform (no deprecated, private, platform-only or optional modules).
EXTRA_MODULES = (
    "abc", "array", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.runners", "asyncio.streams", "asyncio.tasks", "asyncio.transports", "bdb",
    "builtins", "bz2", "code", "codeop", "compileall", "concurrent.futures._base",
    "concurrent.futures.process", "cProfile", "dbm.dumb", "dis", "email._policybase", "email.charset",
    "email.feedparser", "email.generator", "email.header", "email.headerregistry", "email.message",
    "email.parser", "email.policy", "email.utils", "filecmp", "fileinput", "fnmatch", "gc", "getopt",
    "graphlib", "http.cookies", "importlib.abc", "importlib.util", "itertools", "json.decoder",
    "json.encoder", "linecache", "logging.config", "logging.handlers", "lzma", "math",
    "multiprocessing.shared_memory", "operator", "pickletools", "plistlib", "pstats", "py_compile",
    "pyclbr", "quopri", "rlcompleter", "struct", "symtable", "sys", "sysconfig", "tracemalloc", "types",
    "unicodedata", "unittest.case", "unittest.mock", "unittest.result", "venv", "wsgiref.handlers",
    "wsgiref.util", "wsgiref.validate", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader",
    "xmlrpc.client", "xmlrpc.server", "zipapp", "zipimport", "zlib",
)  # fmt: skip

_SENTENCE_BREAK = re.compile(r"(?<=[.!?]) (?=[A-Z\"'(])")
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


# ---------------------------------------------------------------------------------------- needles


@dataclass(frozen=True)
class NeedleTemplate:
    """A kind of needle: its sentence, question and answer lead-in, with ``{place}``/``{answer}``."""

    kind: str
    sentence: str
    question: str
    prefix: str
    keywords: tuple[str, ...]  # haystack paragraphs mentioning one of these are left out

    def fill(self, place: str, answer: str) -> Needle:
        lead, _, _ = self.sentence.partition("{answer}")
        return Needle(
            kind=self.kind, place=place, answer=answer,
            sentence=self.sentence.format(place=place, answer=answer),
            question=self.question.format(place=place), prefix=self.prefix.format(place=place),
            answer_offset=len(lead.format(place=place)),
        )  # fmt: skip


@dataclass(frozen=True)
class Needle:
    """One filled needle: ``sentence[answer_offset:answer_offset + len(answer)] == answer``."""

    kind: str
    place: str
    answer: str
    sentence: str
    question: str
    prefix: str
    answer_offset: int

    def __post_init__(self) -> None:
        if self.sentence[self.answer_offset : self.answer_offset + len(self.answer)] != self.answer:
            raise ConfigError(f"needle {self.sentence!r} does not contain its answer at {self.answer_offset}")


TEMPLATES: tuple[NeedleTemplate, ...] = (
    NeedleTemplate(
        "passphrase", "The secret passphrase for the {place} archive is {answer}.",
        "What is the secret passphrase for the {place} archive?",
        "The secret passphrase for the {place} archive is", ("passphrase",),
    ),
    NeedleTemplate(
        "code_name", "The code name of the expedition to {place} was {answer}.",
        "What was the code name of the expedition to {place}?",
        "The code name of the expedition to {place} was", ("code name", "expedition"),
    ),
    NeedleTemplate(
        "greeting", "Visitors to {place} are greeted with the words {answer}.",
        "With which words are visitors to {place} greeted?",
        "Visitors to {place} are greeted with the words", ("greeted", "visitors"),
    ),
    NeedleTemplate(
        "ship", "The ship that sailed from {place} at dawn was named {answer}.",
        "What was the name of the ship that sailed from {place} at dawn?",
        "The ship that sailed from {place} at dawn was named", ("sailed", "ship"),
    ),
)  # fmt: skip

PLACES = (
    "Quillhaven", "Brackenford", "Marrowdale", "Thistlemoor", "Caldwick", "Fernhollow", "Ashcombe",
    "Dunmire", "Elderwick", "Hartsmere", "Ironvale", "Kestrelton", "Larkspur Hill", "Mossgate",
    "Oakhurst", "Pinecrest", "Ravensholm", "Saltmarsh", "Thornbury", "Umberleigh", "Westerfold",
    "Yarrowby", "Zennor Cove", "Bramblewood", "Coldharbour", "Dovecliff", "Eastmere", "Foxgrove",
    "Gullhaven", "Hollowmere", "Lindenfall", "Northwick",
)  # fmt: skip

ANSWER_WORDS = (
    # animals
    "falcon", "otter", "heron", "badger", "walrus", "lynx", "bison", "gecko", "jackal", "puffin",
    "osprey", "condor", "ferret", "hedgehog", "lobster", "mackerel", "narwhal", "panther", "pelican",
    "raccoon", "salmon", "toucan", "weasel", "wombat", "zebra", "beaver", "camel", "coyote", "dolphin",
    "donkey", "gazelle", "giraffe", "gorilla", "hamster", "iguana", "kangaroo", "koala", "lemur",
    "leopard", "moose", "octopus", "ostrich", "panda", "parrot", "peacock", "penguin", "rabbit",
    "reindeer", "sparrow", "squirrel", "tiger", "vulture", "whale", "buffalo", "cheetah", "flamingo",
    # colours and materials
    "amber", "crimson", "scarlet", "violet", "indigo", "golden", "emerald", "ivory", "olive", "coral",
    "azure", "cobalt", "maroon", "russet", "teal", "turquoise", "lavender", "magenta", "ochre",
    "bronze", "velvet", "marble", "granite", "copper", "silk", "cedar", "oak", "jade", "pearl",
    # objects and plants
    "lantern", "anchor", "compass", "kettle", "violin", "saddle", "chimney", "candle", "meadow",
    "orchard", "pebble", "quilt", "ribbon", "teapot", "trumpet", "umbrella", "wagon", "anvil", "barrel",
    "blanket", "cactus", "canoe", "carpet", "cherry", "clover", "daisy", "feather", "fiddle", "garnet",
    "ginger", "glacier", "harp", "helmet", "honey", "jasmine", "kite", "lemon", "lily", "maple",
    "mitten", "mustard", "nutmeg", "oyster", "pepper", "pillow", "plum", "pumpkin", "raisin",
    "saffron", "sapphire", "scarf", "spruce", "tulip", "walnut", "willow", "banjo", "biscuit",
    "bucket", "button", "cabbage", "carrot", "castle", "cotton", "cradle", "drum", "forest", "fountain",
    "harbor", "island", "jelly", "lagoon", "mango", "mountain", "orange", "paddle", "parsley",
    "peanut", "potato", "river", "rocket", "sandal", "tomato", "trolley", "tunnel", "valley", "waffle",
)  # fmt: skip


# ---------------------------------------------------------------------------------------- the tests


@dataclass(frozen=True)
class NeedleTest:
    """One prompt of the grid: (length, depth, needle). Spans are ``[start, end)`` token indices.

    ``prompt_ids`` include the BOS token when the model's policy (or its chat template) puts one
    first. ``answer_ids == prompt_ids[answer_span[0]:answer_span[1]]``: the answer's tokens as they
    appear in this context (with their leading space merged in, where the tokenizer does that).
    ``haystack_span`` is the whole context (haystack with the needle inside it).
    """

    prompt_ids: list[int]
    needle_span: tuple[int, int]
    answer_span: tuple[int, int]
    haystack_span: tuple[int, int]
    answer: str
    answer_ids: list[int]
    needle: str
    question: str
    answer_prefix: str  # "" when the prompt ends at the question (plain) or the generation prompt (chat)
    kind: str
    place: str
    length: int  # asked
    depth: float  # asked
    n_tokens: int  # == len(prompt_ids); equals ``length`` unless no haystack cut could give it
    depth_actual: float  # haystack tokens before the needle / haystack tokens (needle excluded)
    seed: int
    needle_index: int
    chat: bool
    bos: bool  # the first prompt token is the BOS token
    novel_answer_tokens: bool  # the answer's tokens were checked to occur nowhere else in the prompt

    def describe(self) -> dict[str, Any]:
        """The test's scalars (no token ids), one row of a results table."""
        return {
            "needle_index": self.needle_index, "kind": self.kind, "place": self.place,
            "answer": self.answer, "length": self.length, "depth": self.depth,
            "n_tokens": self.n_tokens, "depth_actual": self.depth_actual,
            "needle_start": self.needle_span[0], "needle_end": self.needle_span[1],
            "answer_start": self.answer_span[0], "answer_end": self.answer_span[1],
            "answer_tokens": len(self.answer_ids), "chat": self.chat, "bos": self.bos,
            "answer_prefix": self.answer_prefix, "seed": self.seed,
        }  # fmt: skip


# ---------------------------------------------------------------------------------------- scoring


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words, as the ``rouge_score`` package tokenizes (without stemming)."""
    return _ROUGE_TOKEN.findall(text.lower())


def rouge1_recall(prediction: str, reference: str) -> float:
    """ROUGE-1 recall: the share of the reference's words that the prediction contains.

    Word counts are clipped (a reference word twice needs two in the prediction). The retrieval-head
    paper counts a test when this is above :data:`RECALL_GATE` (0.5).
    """
    ref = Counter(rouge_tokens(reference))
    if not ref:
        raise ConfigError(f"reference {reference!r} has no words; ROUGE-1 recall needs a non-empty answer")
    pred = Counter(rouge_tokens(prediction))
    return sum(min(n, pred[w]) for w, n in ref.items()) / sum(ref.values())


# ---------------------------------------------------------------------------------------- spans


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of ``text`` (no special tokens added) and, for fast tokenizers, character offsets."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False))


def _first_true(lo: int, hi: int, pred: Callable[[int], bool]) -> int:
    """Smallest ``i`` in ``[lo, hi)`` with ``pred(i)`` (monotone), or ``hi``."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def find_span(
    tokenizer: Any,
    ids: Sequence[int],
    start_char: int,
    end_char: int,
    *,
    text: str | None = None,
    offsets: Sequence[tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """Token span ``[s, e)`` of the tokens that cover characters ``[start_char, end_char)`` of a text.

    ``ids`` is the tokenization of ``text``, possibly after special tokens that are not in the text
    (a BOS). A token belongs to the span when it overlaps the characters; a token that merges a
    leading space into the word (``" amber"``) is therefore included, a token of the space alone is
    not, and a token that glues punctuation to the last word is included whole (check the decoded
    span if that matters). The characters are mapped to tokens by, in this order: ``offsets`` (one
    ``(start, end)`` pair per id, ``(0, 0)`` for special tokens); the tokenizer's offset mapping
    (fast tokenizers, ``text`` needed); or incremental decoding (any tokenizer: a binary search
    over decoded prefixes; character positions then refer to ``text`` if given, which must be the
    end of the decoded ids, else to the decoded text).
    """
    n = len(ids)
    if not 0 <= start_char < end_char:
        raise ConfigError(f"empty or negative character range [{start_char}, {end_char}); give start < end")
    if offsets is None and text is not None and getattr(tokenizer, "is_fast", False):
        text_ids, text_offsets = _encode(tokenizer, text)
        skip = n - len(text_ids)
        if skip < 0 or list(ids[skip:]) != text_ids:
            raise ConfigError("ids are not the tokenization of text; pass the ids the tokenizer gives for it")
        offsets = [(0, 0)] * skip + (text_offsets or [])
    if offsets is not None:
        if len(offsets) != n:
            raise ConfigError(f"{len(offsets)} offsets for {n} token ids; give one (start, end) per id")
        hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end_char and b > start_char]
        if not hit:
            raise ConfigError(f"no token covers characters [{start_char}, {end_char}) of the text")
        return hit[0], hit[-1] + 1
    # Incremental decoding: the length of the decoded prefix ids[:i] grows with i.
    decoded = _decode(tokenizer, ids)
    shift = 0
    if text is not None:
        if not decoded.endswith(text):
            raise ConfigError(
                "the decoded ids do not end with text (the tokenizer normalises it); pass offsets, "
                "or character positions in the decoded text with text=None"
            )
        shift = len(decoded) - len(text)
    lo_char, hi_char = start_char + shift, end_char + shift
    if hi_char > len(decoded):
        raise ConfigError(f"character range ends at {end_char}, after the end of the text")

    def prefix_len(i: int) -> int:
        return len(_decode(tokenizer, ids[:i])) if i > 0 else 0

    s = _first_true(0, n, lambda i: prefix_len(i + 1) > lo_char)
    e = _first_true(s + 1, n + 1, lambda i: prefix_len(i) >= hi_char)
    return s, min(e, n)


# ---------------------------------------------------------------------------------------- haystack source


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
        sentence_ids=sentence_ids, paragraph_starts=starts,
        break_tokens=n_break, vocabulary=vocabulary, words=tuple(words),
        n_tokens=sum(map(len, sentence_ids)) + n_break * (len(paragraphs) - 1),
    )  # fmt: skip
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


# ---------------------------------------------------------------------------------------- needles drawn


def make_needles(
    n: int,
    seed: int = 0,
    *,
    tokenizer: Any = None,
    answer_words: int = 3,
    novel_answer_tokens: bool = True,
    exclude: Sequence[str] = (),
) -> list[Needle]:
    """``n`` needles with distinct answers; kinds rotate over :data:`TEMPLATES` in a seeded order.

    With a ``tokenizer`` and ``novel_answer_tokens``, answer words are drawn only from those whose
    tokens occur nowhere in the haystack source. ``exclude``: answers not to draw.
    """
    if n < 1:
        raise ConfigError(f"ask for at least one needle, got {n}")
    drawer = _Drawer(seed, tokenizer, answer_words, novel_answer_tokens, exclude)
    return [drawer.draw(i) for i in range(n)]


class _Drawer:
    """Needle ``i`` has a fixed kind and place; its answer is drawn anew on every call."""

    def __init__(
        self, seed: int, tokenizer: Any, answer_words: int, novel: bool, exclude: Sequence[str]
    ) -> None:
        if not 1 <= answer_words <= 8:
            raise ConfigError(f"answer_words must be between 1 and 8, got {answer_words}")
        self.words = answer_words
        self.pool: tuple[str, ...] = ANSWER_WORDS
        if tokenizer is not None and novel:
            self.pool = _source(tokenizer).words
            if len(self.pool) < 2 * answer_words:
                name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
                raise ConfigError(
                    f"only {len(self.pool)} answer words have tokens that never occur in the haystack for "
                    f"{name} (a byte-level or very small vocabulary); pass novel_answer_tokens=False"
                )
        self.rng = random.Random(f"headlab-needles:{seed}")
        self.kinds = list(TEMPLATES)
        self.rng.shuffle(self.kinds)
        self.places = list(PLACES)
        self.rng.shuffle(self.places)
        self.used = set(exclude)

    def draw(self, i: int) -> Needle:
        for _ in range(10_000):
            answer = " ".join(self.rng.sample(self.pool, self.words))
            if answer not in self.used:
                self.used.add(answer)
                return self.kinds[i % len(self.kinds)].fill(self.places[i % len(self.places)], answer)
        raise ConfigError(
            f"cannot draw another distinct answer from {len(self.pool)} words; ask for fewer needles"
        )


# ---------------------------------------------------------------------------------------- prompts


class _Rejected(ConfigError):
    """The needle cannot be used with this tokenizer (its answer's tokens are not unique)."""


@dataclass(frozen=True)
class _Target:
    tokenizer: Any
    name: str
    bos: BosPolicy
    n_ctx: int | None


def _target(model_or_tokenizer: Any, max_context: int | None) -> _Target:
    if isinstance(model_or_tokenizer, LoadedModel):
        m = model_or_tokenizer
        if m.kind != "language":
            raise ConfigError(f"{m.name} is a {m.kind} model; needle tests need a language model")
        limit = m.n_ctx if max_context is None else min(m.n_ctx, max_context)
        return _Target(m.tokenizer, m.name, m.bos, limit)
    tok = model_or_tokenizer
    if not callable(tok) or not hasattr(tok, "decode"):
        raise ConfigError(f"expected a LoadedModel or a tokenizer, got {type(tok).__name__}")
    name = getattr(tok, "name_or_path", "") or type(tok).__name__
    return _Target(tok, name, bos_policy(tok, "default"), max_context)


@dataclass(frozen=True)
class _Frame:
    """The prompt around the context: ``head + context + mid``; ``lead``: the BOS id to put first, if any."""

    head: str
    mid: str
    lead: list[int]
    chat: bool
    prefix: str


def _frame(target: _Target, needle: Needle, chat: bool | None, answer_prefix: bool) -> _Frame:
    tok = target.tokenizer
    has_template = bool(getattr(tok, "chat_template", None))
    if chat and not has_template:
        raise ConfigError(
            f"chat=True but {target.name}'s tokenizer has no chat template; use chat=None or False"
        )
    use_chat = has_template if chat is None else chat
    prefix = needle.prefix if answer_prefix else ""
    question = f"\n\nQuestion: {needle.question}"
    if use_chat:
        sentinel = "\ue000HEADLAB-CONTEXT\ue000"
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": sentinel + question}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(rendered, str) or rendered.count(sentinel) != 1:
            raise ConfigError(f"{target.name}'s chat template does not keep the message text; use chat=False")
        head, tail = rendered.split(sentinel)
        if question not in tail:
            raise ConfigError(f"{target.name}'s chat template changes the question; use chat=False")
        mid = tail + prefix
    else:
        head, mid = "", question + "\nAnswer:" + (" " + prefix if prefix else "")
    bos_tok = getattr(tok, "bos_token", None)
    template_bos = bool(use_chat and bos_tok and head.startswith(bos_tok))
    lead = (
        [target.bos.token_id]
        if target.bos.prepend and target.bos.token_id is not None and not template_bos
        else []
    )
    return _Frame(head=head, mid=mid, lead=lead, chat=use_chat, prefix=prefix)


@dataclass
class _Built:
    ids: list[int]
    offsets: list[tuple[int, int]] | None
    text: str
    context: tuple[int, int]  # characters of the context in text
    needle_start: int  # character


def _assemble(target: _Target, order: _Order, frame: _Frame, needle: Needle, depth: float, m: int) -> _Built:
    hay, bounds = order.cut(m)
    b = min(bounds, key=lambda x: (abs(x[1] - depth * m), x[1]))[0]  # nearest; the earlier on a tie
    if b == 0:
        context, offset = needle.sentence + (" " + hay if hay else ""), 0
    else:
        sep = "" if hay[b - 1].isspace() else " "
        context, offset = hay[:b] + sep + needle.sentence + hay[b:], b + len(sep)
    text = frame.head + context + frame.mid
    ids, offsets = _encode(target.tokenizer, text)
    if offsets is not None:
        offsets = [(0, 0)] * len(frame.lead) + offsets
    return _Built(
        ids=frame.lead + ids, offsets=offsets, text=text,
        context=(len(frame.head), len(frame.head) + len(context)), needle_start=len(frame.head) + offset,
    )  # fmt: skip


_INTERN: dict[int, int] = {}


def _check_length(target: _Target, length: int) -> None:
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ConfigError(f"lengths are prompt sizes in tokens (positive integers), got {length!r}")
    if target.n_ctx is not None and length > target.n_ctx:
        raise ContextTooLongError(target.name, length, target.n_ctx)


def _build_test(
    target: _Target, orders: _Orders, needle: Needle, length: int, depth: float, *, seed: int,
    needle_index: int, chat: bool | None, answer_prefix: bool, novel: bool,
) -> NeedleTest:  # fmt: skip
    _check_length(target, length)
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depths are fractions of the haystack between 0 and 1, got {depth!r}")
    tok = target.tokenizer
    frame = _frame(target, needle, chat, answer_prefix)
    bare = len(_assemble(target, orders[0], frame, needle, depth, 0).ids)
    if length - bare < MIN_HAYSTACK_TOKENS:
        raise ConfigError(
            f"a prompt of {length} tokens cannot hold the needle and question ({bare} tokens) and a haystack "
            f"of at least {MIN_HAYSTACK_TOKENS}; ask for a length of at least {bare + MIN_HAYSTACK_TOKENS}"
        )
    best: tuple[int, Any] | None = None
    for rotate in range(ROTATIONS):
        order = orders[rotate]
        if length - bare > order.capacity:
            raise _too_long_for_source(tok, length - bare, order.capacity)

        def build(m: int, order: _Order = order) -> tuple[int, _Built]:
            b = _assemble(target, order, frame, needle, depth, m)
            return len(b.ids), b

        found = _fit(build, length, length - bare, order.capacity)
        if found[0] <= length and (best is None or found[0] > best[0]):
            best = found
        if found[0] == length:
            break
    if best is None:
        raise ConfigError(
            f"could not fit the needle and question into {length} tokens; ask for a longer length"
        )
    n, built = best
    # One int object per token id across all tests (a 32K prompt: 0.26 MB of pointers, not 1.2 MB).
    ids, text = [_INTERN.setdefault(i, i) for i in built.ids], built.text

    def span(a: int, b: int) -> tuple[int, int]:
        return find_span(tok, ids, a, b, text=text, offsets=built.offsets)

    a0 = built.needle_start + needle.answer_offset
    answer_span = span(a0, a0 + len(needle.answer))
    needle_span = span(built.needle_start, built.needle_start + len(needle.sentence))
    haystack_span = span(*built.context)
    answer_ids = ids[answer_span[0] : answer_span[1]]
    if _decode(tok, answer_ids).strip() != needle.answer:
        raise _Rejected(
            f"the answer {needle.answer!r} shares a token with the text around it "
            f"({_decode(tok, answer_ids)!r}); draw another needle"
        )
    if novel:
        elsewhere = set(ids[: answer_span[0]]) | set(ids[answer_span[1] :])
        if elsewhere.intersection(answer_ids):
            raise _Rejected(f"a token of the answer {needle.answer!r} occurs elsewhere in the prompt")
    hay_len = (haystack_span[1] - haystack_span[0]) - (needle_span[1] - needle_span[0])
    depth_actual = (needle_span[0] - haystack_span[0]) / hay_len if hay_len > 0 else 0.0
    return NeedleTest(
        prompt_ids=ids, needle_span=needle_span, answer_span=answer_span, haystack_span=haystack_span,
        answer=needle.answer, answer_ids=answer_ids, needle=needle.sentence, question=needle.question,
        answer_prefix=frame.prefix, kind=needle.kind, place=needle.place, length=length,
        depth=float(depth), n_tokens=n, depth_actual=min(1.0, max(0.0, depth_actual)), seed=seed,
        needle_index=needle_index, chat=frame.chat,
        bos=bool(ids) and target.bos.token_id is not None and ids[0] == target.bos.token_id,
        novel_answer_tokens=novel,
    )  # fmt: skip


def make_test(
    model_or_tokenizer: Any,
    length: int,
    depth: float,
    needle: Needle,
    *,
    seed: int = 0,
    needle_index: int = 0,
    chat: bool | None = None,
    answer_prefix: bool = True,
    novel_answer_tokens: bool = True,
    max_context: int | None = None,
) -> NeedleTest:
    """One test: ``needle`` at ``depth`` in a prompt of exactly ``length`` tokens.

    The haystack's paragraph order depends on ``(seed, needle_index)``, as in :func:`make_grid`.
    Raises :class:`~probe.errors.ConfigError` if the answer's tokens occur elsewhere in the prompt
    (with ``novel_answer_tokens``) or merge with the text around them.
    """
    target = _target(model_or_tokenizer, max_context)
    return _build_test(
        target, _Orders(target.tokenizer, f"{seed}:{needle_index}"), needle, length, depth, seed=seed, needle_index=needle_index, chat=chat,
        answer_prefix=answer_prefix, novel=novel_answer_tokens,
    )  # fmt: skip


def iter_grid(
    model_or_tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_needles: int = 3,
    seed: int = 0,
    *,
    answer_words: int = 3,
    chat: bool | None = None,
    answer_prefix: bool = True,
    novel_answer_tokens: bool = True,
    max_context: int | None = None,
    progress: bool = False,
) -> Iterator[NeedleTest]:
    """The tests of :func:`make_grid`, one at a time (a long grid need not be held in memory)."""
    target = _target(model_or_tokenizer, max_context)
    lengths, depths = list(lengths), [float(d) for d in depths]
    if not lengths or not depths:
        raise ConfigError("give at least one length and one depth")
    for length in lengths:
        _check_length(target, length)
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ConfigError(f"depths are fractions of the haystack between 0 and 1, got {bad}")
    if n_needles < 1:
        raise ConfigError(f"n_needles must be at least 1, got {n_needles}")
    from tqdm.auto import tqdm

    drawer = _Drawer(seed, target.tokenizer, answer_words, novel_answer_tokens, ())
    bar = tqdm(
        total=n_needles * len(lengths) * len(depths),
        desc="needles",
        unit="test",
        disable=not progress,
        leave=False,
    )
    try:
        for index in range(n_needles):
            orders = _Orders(target.tokenizer, f"{seed}:{index}", hint=max(lengths))
            for attempt in range(100):
                needle = drawer.draw(index)
                try:
                    tests = [
                        _build_test(
                            target,
                            orders,
                            needle,
                            length,
                            depth,
                            seed=seed,
                            needle_index=index,
                            chat=chat,
                            answer_prefix=answer_prefix,
                            novel=novel_answer_tokens,
                        )
                        for length in lengths
                        for depth in depths
                    ]
                except _Rejected as err:
                    if attempt == 99:
                        raise ConfigError(
                            f"100 needles in a row were unusable: {err}; try another seed, fewer answer_words, "
                            "or novel_answer_tokens=False (a byte-level tokenizer cannot have unseen answer tokens)"
                        ) from err
                    continue
                bar.update(len(tests))
                yield from tests
                break
    finally:
        bar.close()


def make_grid(
    model_or_tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_needles: int = 3,
    seed: int = 0,
    *,
    answer_words: int = 3,
    chat: bool | None = None,
    answer_prefix: bool = True,
    novel_answer_tokens: bool = True,
    max_context: int | None = None,
    progress: bool = False,
) -> list[NeedleTest]:
    """Every (needle, length, depth) test, needle-major, then length, then depth.

    ``model_or_tokenizer``: a :class:`~probe.loading.LoadedModel` (its tokenizer, BOS policy and
    context length apply) or a bare tokenizer (BOS as the tokenizer adds it; no context limit unless
    ``max_context``). ``lengths``: prompt sizes in tokens, met exactly; a length beyond the model's
    context raises :class:`~probe.errors.ContextTooLongError`, one too small for the needle and
    question a :class:`~probe.errors.ConfigError`. ``depths``: fractions in ``[0, 1]``. Each needle has
    its own haystack order, drawn from ``(seed, needle index)``. The paper's grid is 20 lengths x 10
    depths x 3 needles.
    """
    return list(
        iter_grid(
            model_or_tokenizer,
            lengths,
            depths,
            n_needles,
            seed,
            answer_words=answer_words,
            chat=chat,
            answer_prefix=answer_prefix,
            novel_answer_tokens=novel_answer_tokens,
            max_context=max_context,
            progress=progress,
        )
    )
