"""Training contexts for the gates: haystack prose with several needles, a question, and the answers.

DuoAttention trains its gates on "multiple passkey" contexts: facts scattered through a long text,
then the facts' answers repeated at the end, teacher-forced. Here the facts are the needles of
:mod:`analyses.tasks.needles` (invented sentences whose answers are a few words) and the prose is
its haystack; see docs/analyses/duo.md (the training data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from analyses.tasks import needles
from probe.errors import ConfigError
from probe.loading import LoadedModel

_BOUNDARY = re.compile(r"(?<=[.!?])\s+")
QUESTION = "\n\nQuestion: The text above states {n} invented facts, about {places}. Give the answer of each fact, in the order they appear.\nAnswer:"


@dataclass(frozen=True)
class PasskeyContext:
    """One training context. ``ids`` (with BOS where the model's policy puts one) end with the
    answers; ``answer_span`` ``[start, end)`` are the answers' tokens. The loss reads the hidden
    states at :attr:`loss_positions`, the positions whose next token is an answer token."""

    ids: list[int]
    answer_span: tuple[int, int]
    length: int  # asked (the haystack is sized for it; the prompt may differ by a few tokens)
    depths: tuple[float, ...]  # each needle's depth, a fraction of the haystack's characters
    answers: tuple[str, ...]
    seed: int

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def loss_positions(self) -> range:
        return range(self.answer_span[0] - 1, self.answer_span[1] - 1)


def _insert(hay: str, sentences: list[str], depths: list[float]) -> tuple[str, list[float]]:
    """``hay`` with each sentence put at the sentence boundary nearest its depth (in characters)."""
    bounds = [0, *(m.end() for m in _BOUNDARY.finditer(hay)), len(hay)]

    def nearest(depth: float) -> int:
        return min(bounds, key=lambda b: (abs(b - depth * len(hay)), b))

    at = [nearest(d) for d in depths]
    pieces, last = [], 0
    for b, sentence in sorted(zip(at, sentences, strict=True), key=lambda x: x[0]):
        pieces.append(hay[last:b])
        glue = "" if b == 0 or hay[b - 1].isspace() else " "
        pieces.append(glue + sentence + ("" if b == len(hay) else " "))
        last = b
    pieces.append(hay[last:])
    return "".join(pieces), [b / max(1, len(hay)) for b in at]


def passkey_context(
    model: LoadedModel,
    length: int,
    *,
    n_passkeys: int,
    depth_min: float,
    depth_max: float,
    passkey_words: int,
    seed: int,
) -> PasskeyContext:
    """A context of about ``length`` tokens: haystack prose (seeded), ``n_passkeys`` needles at depths
    evenly spaced over ``[depth_min, depth_max]``, a question naming the needles' places, and the
    answers in order (``"a b, c d, ..."``) after ``Answer:``."""
    tok = model.tokenizer
    drawn = needles.make_needles(
        n_passkeys, seed, tokenizer=tok, answer_words=passkey_words, novel_answer_tokens=False
    )
    places = ", ".join(n.place for n in drawn)
    question = QUESTION.format(n=n_passkeys, places=places)
    answer = " " + ", ".join(n.answer for n in drawn) + "."
    lead = [model.bos.token_id] if model.bos.prepend and model.bos.token_id is not None else []
    fixed = " ".join(n.sentence for n in drawn) + question + answer
    overhead = len(tok(fixed, add_special_tokens=False)["input_ids"]) + len(lead) + n_passkeys
    if length - overhead < needles.MIN_HAYSTACK_TOKENS:
        raise ConfigError(
            f"a {length}-token training context cannot hold {n_passkeys} needles, the question and the answers "
            f"({overhead} tokens); use train_min_length >= {overhead + needles.MIN_HAYSTACK_TOKENS} or fewer n_passkeys"
        )
    hay = needles.build_haystack(tok, length - overhead, seed=seed)
    spaced = [depth_min + (depth_max - depth_min) * i / max(1, n_passkeys - 1) for i in range(n_passkeys)]
    if n_passkeys == 1:
        spaced = [(depth_min + depth_max) / 2]
    context, depths = _insert(hay, [n.sentence for n in drawn], spaced)
    prompt = context + question
    text = prompt + answer
    ids = lead + list(tok(text, add_special_tokens=False)["input_ids"])
    span = needles.find_span(tok, ids, len(prompt) + 1, len(text), text=text)
    model.check_context(len(ids))
    return PasskeyContext(
        ids=ids,
        answer_span=span,
        length=length,
        depths=tuple(depths),
        answers=tuple(n.answer for n in drawn),
        seed=seed,
    )
