"""Answering one needle test: how many tokens to decode, the scored span, the recall of a decode."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from analyses.retrieval.config import RetrievalConfig
from analyses.retrieval.scoring import retrieval_scores_for_test
from analyses.tasks import needles
from probe.decode import DecodeResult, Prefill, greedy_decode
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.types import Head


def max_new(cfg: RetrievalConfig, test: needles.NeedleTest) -> int:
    """Tokens to decode: ``max_new_tokens``, else the reference's tokens + 8."""
    start, end = test.scored_span
    return cfg.max_new_tokens or (end - start) + 8


def scored_span(cfg: RetrievalConfig, test: needles.NeedleTest) -> tuple[int, int]:
    """The span hits are counted in: the whole needle or its answer (:attr:`RetrievalConfig.scored_span`)."""
    return test.needle_span if cfg.scored_span == "needle" else test.answer_span


def text(model: LoadedModel, tokens: Sequence[int]) -> str:
    return str(model.tokenizer.decode(list(tokens), skip_special_tokens=True))


def room(model: LoadedModel, cfg: RetrievalConfig) -> int:
    """An upper bound on the tokens a test decodes (its reference's tokens + 8), before any test exists."""
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    bound = 8 + 4 * cfg.answer_words
    if cfg.protocol == "needle":  # the needle's words around its answer
        tok = model.tokenizer
        sentences = [t.sentence.format(place=p, answer="") for t in needles.TEMPLATES for p in needles.PLACES]
        bound += max(len(ids) for ids in tok(sentences, add_special_tokens=False)["input_ids"])
    return bound


def check_room(model: LoadedModel, cfg: RetrievalConfig, longest: int) -> None:
    need = room(model, cfg)
    if longest + need > model.n_ctx:
        raise ConfigError(
            f"a {longest}-token prompt leaves no room to decode {need} tokens within {model.name}'s context of "
            f"{model.n_ctx}; use lengths up to {model.n_ctx - need}"
        )


@dataclass
class Answer:
    """One decode of one test: the text, its ROUGE-1 recall of the reference, and the per-head
    score ``[layers, heads]`` (None when the decode recorded no argmax)."""

    decode: DecodeResult
    text: str
    recall: float
    scores: np.ndarray | None


def answer(
    model: LoadedModel,
    cfg: RetrievalConfig,
    test: needles.NeedleTest,
    prompt: Sequence[int] | Prefill,
    *,
    masked: Collection[Head] = (),
    record: bool = True,
) -> Answer:
    """Greedy-decode ``test`` (from its ids or a shared :class:`~probe.decode.Prefill`, which is
    kept), with ``masked`` heads attending uniformly, and score it."""
    out = greedy_decode(
        model,
        prompt,
        max_new(cfg, test),
        uniform_heads=list(masked),
        record=record,
        keep=isinstance(prompt, Prefill),
    )
    said = text(model, out.tokens)
    scores = (
        retrieval_scores_for_test(out.argmax, out.tokens, test.prompt_ids, scored_span(cfg, test))
        if record
        else None
    )
    return Answer(out, said, needles.rouge1_recall(said, test.reference), scores)
