"""The needle templates and a filled needle (one invented fact with its question and answer)."""

from __future__ import annotations

from dataclasses import dataclass

from probe.errors import ConfigError


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
