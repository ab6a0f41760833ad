"""ACT: calibrate the hidden attention sinks of chosen heads and measure what it does to accuracy.

Background
----------
Yu, Wang, Fu, Shi, Shaikh & Lin, "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large
Language Models without Training through Attention Calibration" (ICML 2024; code:
GATECH-EIC/ACT) find attention sinks beyond the first token and show that damping some of them,
in some heads, raises zero-shot accuracy. Everything is computed on the post-softmax pattern
``A`` (``[T, T]``, causal, rows sum to 1) of one head on one input, inside the forward pass:

* **Column importance** (the primitive shared with :mod:`analyses.sinks`)::

      alpha_k = (sum_{t >= k} A[t, k]) / (T - k)

  with ``T`` and ``k`` counted in real tokens under left padding (``k = 0`` is the first real
  token; padding rows and columns never count). :func:`column_importance`.
* **Sinks** ``S = {k : alpha_k > 0.1}`` (``threshold="alpha"``, ``alpha_threshold``) or, as the
  paper also states it, ``S = {k : alpha_k > a / T}`` (``threshold="ratio"``, ``ratio_a = 5``, ``T``
  the real length). The **first** (lowest-position) detected sink is dropped, as the official code
  does (``indices[1:]``): only the later, *hidden* sinks are calibrated. :func:`detect_sinks`.
* **Calibration** of query row ``i`` (:func:`calibrate_pattern`)::

      A'[i, s] = beta · A[i, s]                                               s in S
      A'[i, j] = A[i, j] · (1 + (1 - beta) · sum_{s in S} A[i, s] / sum_{j' not in S} A[i, j'])   j not in S

  so the removed ``(1 - beta)·sum_S A[i, s]`` goes to the keys outside ``S`` in proportion to
  their attention (``beta = 0.4``). Rows keep their sum; every zero (causal, padding, sliding
  window) stays exactly zero because the update is multiplicative. The first detected sink is never
  damped; what it gets is set by ``first_sink``:

  - ``"share"`` (default): the official code's variant, the one the paper's published numbers come
    from. The first sink counts as one of the keys ``j not in S`` above (the code zeroes only the
    hidden-sink columns before taking the ratios, ``copied_attention_map[1:, indices] *= 0``), so
    it takes back its proportional share of the removed mass; usually holding most of the row, it
    takes back most of it.
  - ``"frozen"``: its column is left bit-exact as it was, and the removed mass goes only to the keys
    that are no sink at all (the sum in the gain then leaves the first sink out as well). A variant,
    not what the published numbers measure.

  With only the first sink detected, the row is unchanged in both.
* **Head filtering** (``filter="task"``, the paper): calibrate one head at a time on a calibration
  split; keep the heads whose calibration accuracy is ``>=`` the uncalibrated accuracy (heads that do
  not lower it; a head with no effect is kept); then calibrate all kept heads together and report
  accuracy on a held-out split before and after, with 95% percentile-bootstrap intervals
  (:func:`analyses.tasks.choice.accuracy`) and a paired bootstrap interval of the difference
  (items resampled, :func:`paired_difference`). ``filter="kind"`` keeps one head set per task type
  (classification, multiple choice) from the calibration items of that type: what the released code
  ships (``aug_indices_comb_classification``, ``indices_comb_MC``); ``filter="pooled"`` keeps one head
  set for all tasks from all calibration items; ``filter="none"`` calibrates every head in range.
* **Layer range**: the official code calibrates layers ``2 .. L-2`` (``signal in range(2, 31)`` on
  32-layer Llama): ``layer_start = 2``, ``layer_end = -1`` (exclusive; negative counts from the end).

Tasks: the built-in zero-shot tasks of :mod:`analyses.tasks.choice` (labels read at the final
prompt position; see that module for the scoring rule) and optionally a JSONL file of the user's
items (:func:`analyses.tasks.choice.load_jsonl`). Each task is split into ``n_calibration`` and
``n_heldout`` items by :func:`analyses.tasks.choice.split` (seeded).

Speed: the search costs ``heads_in_range × calibration sequences`` forward passes. It is batched:
a batch of calibration sequences is replicated ``G = heads_per_pass`` times and copy ``g`` edits
only head ``g`` (a per-batch-row mask inside the edit), so ``G`` heads are scored by one forward of
``G × batch_size`` sequences. Each copy is the same computation as scoring that head alone (a test
checks the accuracies are identical). Per-task and pooled accuracies come from the same per-item
results, so ``filter="task"`` and ``"pooled"`` cost the same. Only the logits of the positions that
are read are computed (``logits_to_keep``) where the model's forward accepts it.

Tables
------
* ``heads`` (one row per head of the model): ``layer``, ``head``, ``kv_head``, ``in_range`` (in the
  calibrated layer range), ``n_tasks_kept`` (head sets that kept it; 0 out of range),
  ``mean_delta`` (mean over head sets of the calibration accuracy with this head alone minus the
  uncalibrated one; NaN out of range or with ``filter="none"``), ``hidden_sinks`` (mean number of
  hidden sinks per calibration input, the first detected sink excluded), ``first_sink_pos`` (most
  common real position of the first detected sink, 0 = first real token; -1 if none).
* ``filter`` (one row per scope and searched head): ``scope`` (task name, task kind or ``"pooled"``),
  ``layer``, ``head``, ``acc_base``, ``acc_calibrated``, ``delta``, ``kept``. Empty with
  ``filter="none"``.
* ``tasks`` (one row per task): ``task``, ``kind``, ``chance``, ``n_calibration``, ``n_heldout``,
  ``scope`` (the head set applied: the task, ``"pooled"``, or ``"all"`` with ``filter="none"``),
  ``n_kept``, ``acc_before`` / ``before_low`` / ``before_high``, ``acc_after`` / ``after_low`` /
  ``after_high`` (held-out accuracy, 95% bootstrap interval), ``delta`` / ``delta_low`` /
  ``delta_high`` (after - before, paired bootstrap over items).
* ``items`` (one row per held-out item): ``task``, ``item`` (index within the task's held-out
  items), ``label``, ``pred_before``, ``pred_after``, ``correct_before``, ``correct_after``,
  ``margin_before``, ``margin_after`` (label log-probability minus the best other choice's).
* ``sink_tokens``: hidden sinks of in-range heads on the calibration inputs grouped by token string:
  ``token``, ``count`` (input positions that were a hidden sink for at least one in-range head),
  ``share_of_heads`` (mean share of in-range heads for which the position was a hidden sink).

Where we differ from the paper's code (and why), and caveats
------------------------------------------------------------
* Batches are left-padded; ``alpha`` and the real length ``T`` count real tokens only and the edit is
  told each row's real length (never inferred from zeros in the pattern). The official code runs one
  input at a time, so the numbers are the same.
* The official code sets row 0 of an edited head to ``[1, 0, …]`` after the edit; here row 0 (the
  first real token, which sees only itself) is never changed, which is the same thing. A row whose
  attention outside ``S`` is zero is left unchanged here (the official code would divide by zero).
* Scoring: classification reads the label words (the official code reads the *last* token of each
  label word encoded alone, our ``choice_token="last"``; default ``"first"``, see
  :mod:`analyses.tasks.choice`); multiple choice compares the option letters' log-probabilities,
  where the official code greedily generates one token and compares strings (a generated
  non-letter counts as wrong there; here the best letter is always an answer).
* No few-shot examples; the tasks are generated offline (no dataset can be downloaded).
* ``alpha_0 >= 1/T`` always (row 0 sees only position 0), so with ``alpha > 0.1`` the first token
  is a sink of every head on inputs shorter than 10 tokens.
* Positions seen by few queries are not excluded: ``alpha_{T-1}`` is the last token's attention to
  itself alone, so a head whose last query attends to itself with weight > 0.1 has a "sink" at the
  last position, and calibrating it changes the row that is scored. The official code does the same.
* The edit is computed in float32 and written back in the model's dtype (the official code runs
  float16); sliding-window layers (Gemma 3) use the same ``T - k`` denominator as the paper.
* Cost: SmolLM2-135M scores about 20 sequences of ~30 tokens per second on two CPU cores, so the
  default search (243 heads × 1200 calibration items) is a GPU job; on a CPU shrink the layer
  range and ``n_calibration``.

Usage
-----
>>> from analyses.act import ActConfig, run_act
>>> result = run_act(model, ActConfig(tasks=("sentiment", "topic"), filter="pooled", n_calibration=60))
>>> result.tables["tasks"][["task", "acc_before", "acc_after", "delta_low", "delta_high"]]
"""

from __future__ import annotations

from analyses.act.calibration import (
    FIRST_SINKS,
    THRESHOLDS,
    Calibration,
    FirstSink,
    Threshold,
    calibrate_heads,
    calibrate_pattern,
    column_importance,
    detect_sinks,
    sink_threshold,
)
from analyses.act.config import (
    ALL_HEADS,
    ALL_TASKS,
    FILTERS,
    POOLED,
    ActConfig,
    FilterMode,
    resolve_layers,
)
from analyses.act.run import (
    FILTER_COLUMNS,
    HEADS_COLUMNS,
    ITEMS_COLUMNS,
    TASKS_COLUMNS,
    run_act,
)
from analyses.act.scoring import (
    ChoiceScorer,
    margins,
    paired_difference,
    search_heads,
)
from analyses.act.statistics import (
    SINK_TOKENS_COLUMNS,
)
from analyses.act.summary import (
    summary,
)
from analyses.act.tasks import (
    load_tasks,
)
from analyses.registry import Analysis, register

__all__ = [
    "ALL_HEADS",
    "ALL_TASKS",
    "FILTERS",
    "FILTER_COLUMNS",
    "FIRST_SINKS",
    "HEADS_COLUMNS",
    "ITEMS_COLUMNS",
    "POOLED",
    "SINK_TOKENS_COLUMNS",
    "TASKS_COLUMNS",
    "THRESHOLDS",
    "ActConfig",
    "Calibration",
    "ChoiceScorer",
    "FilterMode",
    "FirstSink",
    "Threshold",
    "calibrate_heads",
    "calibrate_pattern",
    "column_importance",
    "detect_sinks",
    "load_tasks",
    "margins",
    "paired_difference",
    "resolve_layers",
    "run_act",
    "search_heads",
    "sink_threshold",
    "summary",
]

ANALYSIS = register(
    Analysis(
        name="act",
        config_cls=ActConfig,
        run=run_act,
        summary=summary,
        help="ACT: calibrate hidden attention sinks head by head; held-out accuracy before and after.",
        page="dashboard.act.page:ActPage",
        report="dashboard.act.report:report_sections",
        # ACT is a search over heads (one forward pass per head and calibration batch): a small config
        # keeps the demo to a few minutes on a CPU
        demo={
            "tasks": ("sentiment", "topic"),
            "n_calibration": 16,
            "n_heldout": 32,
            "layer_start": 2,
            "layer_end": 5,
        },
    )
)
