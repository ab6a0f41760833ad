"""Whether a generated answer recalls the needle: ROUGE-1 recall, and the gate a test must pass."""

from __future__ import annotations

import re
from collections import Counter

from probe.errors import ConfigError

RECALL_GATE = 0.5  # a test counts when ROUGE-1 recall of the answer is above this (the paper's 50)

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


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
