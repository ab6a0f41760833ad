"""Attention sinks: how many heads dump their attention on the first token, and on which others.

Background
----------
Gu et al., "When Attention Sink Emerges in Language Models: An Empirical View" (ICLR 2025; code:
sail-sg/Attention-Sink) measure sinks with the column importance (the shared
primitive, :class:`probe.reducers.ColumnImportance`)::

    alpha_k = (sum_{t >= k} A[t, k]) / (T - k)                (k = 0 is the first real token)
    Sink_k^eps = mean over samples of [ share of all (layer, head) with alpha_k > eps ]     in %

The threshold is applied **per sample** (one indicator per sample, layer, head), then averaged over
samples: the official ``compute_attention_sink`` takes the mean of ``importance > eps`` over samples,
layers and heads at once. Thresholding the sample-averaged ``alpha_k`` is a different number
(:func:`sink_percent_of_mean_alpha`, kept only to show the difference; never reported as Sink).
The papers count positions from 1, so their ``Sink_1`` is our ``k = 0``; the tables call it
``sink_1``.

Defaults follow the paper's code: ``eps = 0.3``, ``T = 64`` tokens, 100 sequences. **T counts the
BOS token** when the BOS policy prepends one (the official code tokenizes with the tokenizer's
default and then cuts to 64 tokens): with BOS, a sequence is BOS + 63 tokens. The BOS policy is the
model's (``model.bos``, the tokenizer's default unless loaded with ``bos="always"|"never"``) and is
recorded in ``model_info['bos']`` and in the ``summary`` table. Three input sets:

* ``natural``: windows of standard-library documentation prose (:mod:`analyses.tasks.text`);
* ``random``: tokens drawn uniformly from the vocabulary without special tokens (every added token
  flagged special is left out, e.g. Gemma's ``<unused…>``), independently per position;
* ``repeated``: one such random token repeated to fill the sequence (a different token per
  sequence). With a BOS policy that prepends BOS, the sequence is BOS + the repeated token: the
  first token then differs from the others, unlike the all-identical inputs of the paper's
  Propositions 1–4 (RoPE/NoPE/ALiBi models lose the first-token sink when *all* tokens are equal).

What is measured, per input set:

* ``summary``: ``sink_1`` (Sink of the first real token, in %) with its standard error over samples.
* ``positions``: the per-position sink map, ``Sink_k^eps`` for every position ``k`` (the official
  ``metric1`` vector), plus the mean ``alpha_k``.
* hidden sinks (the sinks beyond the first token, Yu et al., ICML 2024): a position ``k >= 1`` is a
  sink *for a head* when its ``alpha_k > eps`` as well (the same threshold as the first token).
  Late positions are seen by few queries (``alpha_{T-1}`` is a single weight, the last token's
  attention to itself), so only positions seen by at least ``hidden_min_queries`` queries count
  as hidden sinks. ``hidden_sinks`` lists every (sample, position) that is a sink for at least
  ``hidden_min_share`` of all heads, with its token; ``hidden_tokens`` groups them by token string
  (how often a token is such a sink where it occurs, and for what share of heads on average).
* ``heads`` (one row per head): ``alpha0_<set>`` (mean first-token alpha, ``_sem`` its standard
  error), ``sink_rate_<set>`` (share of samples where the head's first-token alpha > eps),
  ``hidden_sinks_<set>`` (mean number of hidden-sink positions per sample),
  ``hidden_sink_rate_<set>`` (share of samples with at least one), ``hidden_alpha_max_<set>``
  (mean over samples of the head's largest alpha at an eligible position ``k >= 1``).
* ``norms`` / ``norms_kv``: L2 norms of the first real token's hidden state (the residual stream
  entering each layer, ``hook_resid_pre``, as the official ``output_hidden_states``), key and value
  (per KV head; keys as the attention uses them, after any q/k norm and RoPE — ``hook_rot_k`` where
  the model has it; RoPE is a rotation and does not change the norm) against the mean norm of the
  other real tokens. Each is averaged over samples; ``ratio = sink_norm / other_norm``. ``norms``
  averages keys and values over KV heads (as the official code averages over heads).
* ``examples`` (+ arrays ``example_alpha_<set>``, ``[n_examples, L, H, T]``): a few sequences'
  tokens and alpha per position, for display.
* arrays ``alpha_<set>`` (mean alpha, ``[L, H, T]``) and ``sink_rate_<set>`` (share of samples with
  alpha_k > eps, ``[L, H, T]``): the per-head maps at every position.

Capture: ``mode="eager"`` reads the bridge's patterns; the norms come from hooks on the same
forward. ``mode="recompute"`` keeps the model's SDPA kernel for the alpha capture; the norms then
need one more (bridge) forward, since only the bridge has the hook points.

Usage
-----
>>> from analyses.sinks import SinksConfig, run_sinks
>>> result = run_sinks(model, SinksConfig(n_sequences=20))
>>> result.tables["summary"][["input_set", "sink_1"]]
"""

from __future__ import annotations

from analyses.registry import Analysis, register
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
        demo={},
    )
)
