"""Needle-in-a-haystack tests for retrieval-head scoring (Wu et al. 2024), built offline.

A needle (one invented fact) goes at a chosen depth into a haystack of standard-library prose,
followed by a question; each :class:`NeedleTest` has exactly the requested number of tokens and
records the token spans of the needle and of its answer, whose tokens occur nowhere else in the
prompt. Stages: :mod:`.words` and :mod:`.templates` (what needles are made of), :mod:`.spans`
(characters to tokens), :mod:`.haystack` (the prose source and its exact cuts), :mod:`.draw`
(needles), :mod:`.prompts` (one test), :mod:`.grid` (every test of a grid), :mod:`.scoring`
(ROUGE-1 recall and the gate).

    tests = needles.make_grid(model, lengths=[1024, 4096], depths=[0, 0.5, 1], n_needles=3, seed=0)
    needles.rouge1_recall(generated_text, tests[0].reference) > needles.RECALL_GATE

See docs/analyses/retrieval.md.
"""

from analyses.tasks.needles.draw import make_needles
from analyses.tasks.needles.grid import iter_grid, make_grid
from analyses.tasks.needles.haystack import ROTATIONS, build_haystack, haystack_paragraphs, source_stats
from analyses.tasks.needles.prompts import MIN_HAYSTACK_TOKENS, NeedleTest, make_test
from analyses.tasks.needles.scoring import RECALL_GATE, rouge1_recall, rouge_tokens
from analyses.tasks.needles.spans import find_span
from analyses.tasks.needles.templates import (
    NEEDLE_PREFIX,
    NEEDLE_QUESTION,
    PROTOCOLS,
    TEMPLATES,
    Needle,
    NeedleTemplate,
    Protocol,
)
from analyses.tasks.needles.words import ANSWER_WORDS, EXTRA_MODULES, PLACES

__all__ = [
    "ANSWER_WORDS",
    "EXTRA_MODULES",
    "MIN_HAYSTACK_TOKENS",
    "NEEDLE_PREFIX",
    "NEEDLE_QUESTION",
    "PLACES",
    "PROTOCOLS",
    "RECALL_GATE",
    "ROTATIONS",
    "TEMPLATES",
    "Needle",
    "NeedleTemplate",
    "NeedleTest",
    "Protocol",
    "build_haystack",
    "find_span",
    "haystack_paragraphs",
    "iter_grid",
    "make_grid",
    "make_needles",
    "make_test",
    "rouge1_recall",
    "rouge_tokens",
    "source_stats",
]
