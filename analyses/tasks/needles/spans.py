"""Tokens and characters: encoding with offsets, decoding, and the token span of a character range."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from probe.errors import ConfigError


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
