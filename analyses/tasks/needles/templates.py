"""The needle templates and a filled needle (one invented fact with its question and answer).

Two protocols ask about a needle. ``"needle"`` (Wu et al.'s task): the question asks for the needle
sentence itself, named by its place alone, and the model is to reproduce the whole sentence.
``"answer"``: the question asks for the needle's answer, and the answer turn starts with the needle's
own lead-in, so the model only has to produce the answer's few words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from probe.errors import ConfigError

Protocol = Literal["needle", "answer"]
PROTOCOLS: tuple[Protocol, ...] = ("needle", "answer")

# The needle protocol's question and answer lead-in, the same for every template: they name the
# needle by its place alone, so nothing else of the needle is in the prompt twice.
NEEDLE_QUESTION = "Which sentence of the text mentions {place}? Quote it exactly."
NEEDLE_PREFIX = 'The sentence that mentions {place} is: "'


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
            kind=self.kind,
            place=place,
            answer=answer,
            sentence=self.sentence.format(place=place, answer=answer),
            question=self.question.format(place=place),
            prefix=self.prefix.format(place=place),
            answer_offset=len(lead.format(place=place)),
        )


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

    def ask(self, protocol: Protocol) -> tuple[str, str]:
        """The question and the answer lead-in of ``protocol``."""
        if protocol == "needle":
            return NEEDLE_QUESTION.format(place=self.place), NEEDLE_PREFIX.format(place=self.place)
        if protocol == "answer":
            return self.question, self.prefix
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")

    def __post_init__(self) -> None:
        if self.sentence[self.answer_offset : self.answer_offset + len(self.answer)] != self.answer:
            raise ConfigError(f"needle {self.sentence!r} does not contain its answer at {self.answer_offset}")


TEMPLATES: tuple[NeedleTemplate, ...] = (
    NeedleTemplate(
        "passphrase",
        "The secret passphrase for the {place} archive is {answer}.",
        "What is the secret passphrase for the {place} archive?",
        "The secret passphrase for the {place} archive is",
        ("passphrase",),
    ),
    NeedleTemplate(
        "code_name",
        "The code name of the expedition to {place} was {answer}.",
        "What was the code name of the expedition to {place}?",
        "The code name of the expedition to {place} was",
        ("code name", "expedition"),
    ),
    NeedleTemplate(
        "greeting",
        "Visitors to {place} are greeted with the words {answer}.",
        "With which words are visitors to {place} greeted?",
        "Visitors to {place} are greeted with the words",
        ("greeted", "visitors"),
    ),
    NeedleTemplate(
        "ship",
        "The ship that sailed from {place} at dawn was named {answer}.",
        "What was the name of the ship that sailed from {place} at dawn?",
        "The ship that sailed from {place} at dawn was named",
        ("sailed", "ship"),
    ),
)
