"""Attention sinks: how many heads dump their attention on the first token, and on which others.

Sink_k (Gu et al., ICLR 2025) is the share of all heads whose column importance ``alpha_k`` exceeds
``eps``, thresholded per sample and averaged over samples; ``sink_1`` is the first real token.
Measured on natural text, uniformly random tokens and one random token repeated, with the hidden
sinks beyond the first token (Yu et al., ICML 2024) and the norms of the first token's hidden state,
keys and values against the other tokens'.

>>> result = run_sinks(model, SinksConfig(n_sequences=20))
>>> result.tables["summary"][["input_set", "sink_1"]]

See docs/analyses/sinks.md.
"""

from __future__ import annotations

from analyses.registry import Analysis, register
from analyses.roles import Role
from analyses.sinks.config import (
    HEAD_METRIC_LABELS,
    HEAD_METRICS,
    INPUT_LABELS,
    INPUT_SETS,
    QUANTITIES,
    QUANTITY_LABELS,
    SEED_OFFSETS,
    InputSet,
    SinksConfig,
)
from analyses.sinks.inputs import (
    input_rows,
    non_special_ids,
    random_token_rows,
    repeated_token_rows,
    token_decoder,
)
from analyses.sinks.reducers import (
    SinkReducer,
    TokenNorms,
    key_hooks,
    sink_indicator,
    sink_percent,
    sink_percent_of_mean_alpha,
    sink_share,
)
from analyses.sinks.run import measure_sinks, run_sinks
from analyses.sinks.summary import summary

__all__ = [
    "HEAD_METRICS",
    "HEAD_METRIC_LABELS",
    "INPUT_LABELS",
    "INPUT_SETS",
    "QUANTITIES",
    "QUANTITY_LABELS",
    "SEED_OFFSETS",
    "InputSet",
    "SinkReducer",
    "SinksConfig",
    "TokenNorms",
    "input_rows",
    "key_hooks",
    "measure_sinks",
    "non_special_ids",
    "random_token_rows",
    "repeated_token_rows",
    "run_sinks",
    "sink_indicator",
    "sink_percent",
    "sink_percent_of_mean_alpha",
    "sink_share",
    "summary",
    "token_decoder",
]

ANALYSIS = register(
    Analysis(
        name="sinks",
        config_cls=SinksConfig,
        run=run_sinks,
        summary=summary,
        help="Attention sinks: Sink_1 on natural, random and repeated tokens; hidden sinks; norms.",
        page="dashboard.sinks.page:SinksPage",
        report="dashboard.sinks.report:report_sections",
        docs="docs/analyses/sinks.md",
        atlas_metrics=("alpha0_natural", "sink_rate_natural", "hidden_sink_rate_natural"),
        roles=(
            Role(
                "sink",
                "sink head (first token)",
                "sink_rate_natural",
                "at_least",
                0.5,
                "Gu et al. 2025, When attention sink emerges in language models",
            ),
            Role(
                "hidden_sink",
                "hidden-sink head",
                "hidden_sink_rate_natural",
                "at_least",
                0.5,
                "Yu et al. 2024, Unveiling and harnessing hidden attention sinks (ACT)",
            ),
        ),
        demo={},
    )
)
