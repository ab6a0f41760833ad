"""Retrieval heads: which heads copy the needle out of a long context while decoding.

Background: Wu et al. (2024), "Retrieval Head Mechanistically Explains Long-Context Factuality".
Each needle test (:mod:`analyses.tasks.needles`) is answered by greedy decoding
(:mod:`probe.decode`); a head copy-pastes at a step when its attention argmax lies in the scored
span on the very token being generated. Under the default ``protocol="needle"`` (the paper's) the
model is asked to reproduce the whole needle sentence, the span is the needle and the recall gate
compares with it; ``protocol="answer"`` scores the answer's few tokens instead. A head's retrieval
score is its mean per-test score (hits / |span|) over the tests whose reference was recalled
(ROUGE-1 recall above ``rouge_gate``); a retrieval head scores above ``threshold``. The retrieval
heads are then validated on held-out needles (:mod:`.heldout`), and the top-K against random-K
masking curve is drawn on the grid (:mod:`.masking`).

Usage:

>>> result = run_retrieval(model, RetrievalConfig(lengths=(1024,), depths=(0.0, 0.5, 1.0)))
>>> result.heads.nlargest(5, "retrieval_score")
>>> result.tables["validation"]

See docs/analyses/retrieval.md.
"""

from analyses.registry import Analysis, register
from analyses.retrieval.config import HELDOUT_SEED_OFFSET, RetrievalConfig, Span
from analyses.retrieval.heldout import found_heads, heldout_tests, validation_row
from analyses.retrieval.masking import masking_curve
from analyses.retrieval.run import run_retrieval
from analyses.retrieval.scoring import (
    aggregate_scores,
    copy_paste_hits,
    copy_significance,
    retrieval_scores_for_test,
)
from analyses.retrieval.summary import protocol_line, summary, validation_lines
from analyses.roles import Role

__all__ = [
    "HELDOUT_SEED_OFFSET",
    "RetrievalConfig",
    "Span",
    "aggregate_scores",
    "copy_paste_hits",
    "copy_significance",
    "found_heads",
    "heldout_tests",
    "masking_curve",
    "protocol_line",
    "retrieval_scores_for_test",
    "run_retrieval",
    "summary",
    "validation_lines",
    "validation_row",
]

ANALYSIS = register(
    Analysis(
        name="retrieval",
        config_cls=RetrievalConfig,
        run=run_retrieval,
        summary=summary,
        help="Retrieval heads on needle-in-a-haystack tests: scores, held-out validation, top-K vs random-K masking.",
        page="dashboard.retrieval.page:RetrievalPage",
        report="dashboard.retrieval.report:report_sections",
        docs="docs/analyses/retrieval.md",
        atlas_metrics=("retrieval_score",),
        roles=(
            Role(
                "retrieval",
                "retrieval head",
                "retrieval_score",
                "above",
                0.1,
                "Wu et al. 2025, Retrieval head mechanistically explains long-context factuality",
                evidence="retrieval_validated",
            ),
        ),
        # a small needle grid (each test is a prefill plus a short greedy decode), the masking curve
        # on a few tests, and the held-out validation on two held-out tests
        demo={
            "lengths": (512, 1024),
            "depths": (0.0, 0.5, 1.0),
            "n_needles": 1,
            "mask_fractions": (0.02, 0.05),
            "mask_seeds": 2,
            "mask_tests": 3,
            "heldout_needles": 2,
            "heldout_depths": (0.5,),
        },
    )
)
