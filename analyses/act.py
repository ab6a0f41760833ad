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

import difflib
import inspect
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import torch

from analyses.base import AnalysisResult, heads_frame
from analyses.registry import Analysis, register
from analyses.sinks import token_decoder
from analyses.tasks import choice
from analyses.tasks.choice import ChoiceItem, ChoiceToken
from probe.errors import ConfigError
from probe.hooks import HookFn, HookSet, attn_hook, hooks
from probe.interventions import Head, edit_pattern
from probe.loading import LoadedModel

Threshold = Literal["alpha", "ratio"]
FirstSink = Literal["share", "frozen"]  # "share": the official code's, behind the published numbers
FilterMode = Literal["task", "kind", "pooled", "none"]
THRESHOLDS: tuple[str, ...] = get_args(Threshold)
FIRST_SINKS: tuple[str, ...] = get_args(FirstSink)
FILTERS: tuple[str, ...] = get_args(FilterMode)
ALL_TASKS: tuple[str, ...] = tuple(choice.TASKS)
POOLED = "pooled"
ALL_HEADS = "all"

HEADS_COLUMNS = (
    "layer", "head", "kv_head", "in_range", "n_tasks_kept", "mean_delta", "hidden_sinks", "first_sink_pos",
)  # fmt: skip
FILTER_COLUMNS = ("scope", "layer", "head", "acc_base", "acc_calibrated", "delta", "kept")
TASKS_COLUMNS = (
    "task", "kind", "chance", "n_calibration", "n_heldout", "scope", "n_kept", "acc_before", "before_low",
    "before_high", "acc_after", "after_low", "after_high", "delta", "delta_low", "delta_high",
)  # fmt: skip
ITEMS_COLUMNS = (
    "task", "item", "label", "pred_before", "pred_after", "correct_before", "correct_after", "margin_before",
    "margin_after",
)  # fmt: skip
SINK_TOKENS_COLUMNS = ("token", "count", "share_of_heads")


# ---------------------------------------------------------------------------------------- config


@dataclass
class ActConfig:
    """Settings of the ACT analysis (defaults: the paper's code; see the module docstring).

    ``tasks``: built-in tasks of :mod:`analyses.tasks.choice` (may be empty when ``jsonl`` is given);
    ``jsonl``: a file of the user's items, one task per distinct ``"task"`` key (default: the file's
    stem). ``n_calibration`` / ``n_heldout``: items per task for the head search and for the
    report. ``layer_start`` .. ``layer_end`` (exclusive; negative counts from the end, None = to
    the last layer): the layers whose heads may be calibrated. ``heads_per_pass``: heads scored by
    one forward pass in the search (each forward holds ``batch_size × heads_per_pass`` sequences).
    ``keep``: ``"not_lower"`` keeps the heads whose calibration does not lower calibration accuracy
    (a head with no effect is kept), ``"raise"`` only those that raise it (the official
    code's released head lists are this sparse: a few heads per layer). ``first_sink``: ``"share"``
    (the official code's variant, behind the paper's published numbers) lets the first detected sink
    take its proportional share of the removed mass; ``"frozen"`` leaves its column untouched.
    """

    tasks: tuple[str, ...] = ALL_TASKS
    jsonl: str | None = None
    n_calibration: int = 200
    n_heldout: int = 500
    beta: float = 0.4
    threshold: Threshold = "alpha"
    alpha_threshold: float = 0.1
    ratio_a: float = 5.0
    layer_start: int = 2
    layer_end: int | None = -1
    filter: FilterMode = "task"
    keep: Literal["not_lower", "raise"] = "not_lower"
    first_sink: FirstSink = "share"
    heads_per_pass: int = 8
    batch_size: int = 16
    choice_token: ChoiceToken = "first"
    n_boot: int = 2000
    seed: int = 0

    def validate(self) -> None:
        _check_first_sink(self.first_sink)
        if self.keep not in ("not_lower", "raise"):
            raise ConfigError(
                f"keep must be 'not_lower' (keep heads that do not lower calibration accuracy, the default) "
                f"or 'raise' (only heads that raise it) (got {self.keep!r})"
            )
        if isinstance(self.tasks, str):
            raise ConfigError(f"tasks must be a tuple of task names, got the string {self.tasks!r}")
        for name in self.tasks:
            if name not in choice.TASKS:
                close = difflib.get_close_matches(name, ALL_TASKS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown task {name!r}.{hint} Choose from: {', '.join(ALL_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks lists a task twice: {list(self.tasks)}; give each once")
        if not self.tasks and not self.jsonl:
            raise ConfigError(
                f"no tasks: set tasks (from {', '.join(ALL_TASKS)}) or jsonl=path/to/items.jsonl"
            )
        if self.jsonl is not None and not Path(self.jsonl).expanduser().is_file():
            raise ConfigError(f"jsonl={self.jsonl!r} does not exist; give the path of a JSONL file of items")
        for name in ("n_calibration", "n_heldout", "heads_per_pass", "batch_size", "n_boot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1 (got {value!r})")
        for name in self.tasks:
            capacity = choice.TASKS[name].capacity
            if self.n_calibration + self.n_heldout > capacity:
                raise ConfigError(
                    f"task {name!r} has at most {capacity} distinct items but n_calibration + n_heldout = "
                    f"{self.n_calibration + self.n_heldout}; lower them"
                )
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must be in [0, 1] (got {self.beta}); the paper uses 0.4")
        if self.threshold not in THRESHOLDS:
            raise ConfigError(f"threshold must be one of {', '.join(THRESHOLDS)} (got {self.threshold!r})")
        if not 0.0 < self.alpha_threshold < 1.0:
            raise ConfigError(
                f"alpha_threshold must be in (0, 1) (got {self.alpha_threshold}); the paper uses 0.1"
            )
        if not (math.isfinite(self.ratio_a) and self.ratio_a > 0.0):
            raise ConfigError(f"ratio_a must be a positive number (got {self.ratio_a}); the paper uses 5")
        if self.filter not in FILTERS:
            raise ConfigError(f"filter must be one of {', '.join(FILTERS)} (got {self.filter!r})")
        if self.choice_token not in get_args(ChoiceToken):
            raise ConfigError(f"choice_token must be 'first' or 'last' (got {self.choice_token!r})")
        if (
            isinstance(self.layer_start, bool)
            or not isinstance(self.layer_start, int)
            or self.layer_start < 0
        ):
            raise ConfigError(f"layer_start must be an integer >= 0 (got {self.layer_start!r})")
        if self.layer_end is not None and (
            isinstance(self.layer_end, bool) or not isinstance(self.layer_end, int)
        ):
            raise ConfigError(f"layer_end must be an integer or None (got {self.layer_end!r})")
        if self.layer_end is not None and self.layer_end >= 0 and self.layer_end <= self.layer_start:
            raise ConfigError(
                f"layer_end={self.layer_end} must be above layer_start={self.layer_start} (it is exclusive); "
                "use a negative layer_end to count from the last layer, or None for all layers"
            )

    def calibration(self) -> Calibration:
        return Calibration(self.beta, self.threshold, self.alpha_threshold, self.ratio_a, self.first_sink)


def resolve_layers(config: ActConfig, n_layers: int) -> range:
    """The layers in range on a model of ``n_layers`` layers; ConfigError if none."""
    end = n_layers if config.layer_end is None else config.layer_end
    if end < 0:
        end += n_layers
    end = min(end, n_layers)
    if config.layer_start >= end:
        raise ConfigError(
            f"layer range {config.layer_start}..{config.layer_end} (exclusive end) selects no layer of a "
            f"{n_layers}-layer model; choose layer_start < layer_end within 0..{n_layers} "
            "(e.g. --set layer_start=0 --set layer_end=none for every layer)"
        )
    return range(config.layer_start, end)


# ---------------------------------------------------------------------------------------- the edit


def _real_rows(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, T]`` bool: which positions of a left-padded batch are real tokens."""
    offsets = T - lengths.to(torch.long)
    return torch.arange(T, device=lengths.device)[None, :] >= offsets[:, None]


def _per_row(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values`` ``[B, X]`` viewed as ``[B, 1, …, 1, X]`` for a tensor of ``ndim`` dimensions."""
    return values.reshape(values.shape[0], *([1] * (ndim - values.dim())), *values.shape[1:])


def column_importance(pattern: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``alpha`` ``[B, …, T]`` of post-softmax patterns ``[B, …, T, T]`` (left-padded batch).

    ``alpha[b, …, j] = sum over real queries t of A[t, j] / (T - j)`` for a real key column ``j``:
    the padded column ``j`` is real position ``k = j - offset`` and ``T - j`` is the real ``T_b - k``.
    NaN at padding columns. Rows of padding queries are ignored (they hold junk).
    """
    if pattern.shape[-1] != pattern.shape[-2]:
        raise ConfigError(f"a square pattern [.., T, T] is needed, got {tuple(pattern.shape)}")
    T = pattern.shape[-1]
    lengths = lengths.to(pattern.device)
    real = _real_rows(lengths, T)  # [B, T]
    flat = pattern.reshape(pattern.shape[0], -1, T, T).float()
    colsum = torch.einsum("bhqk,bq->bhk", flat, real.float()).reshape(*pattern.shape[:-2], T)
    denom = torch.arange(T, 0, -1, device=pattern.device, dtype=torch.float32)  # T - j
    alpha = colsum / denom
    return alpha.masked_fill(~_per_row(real, alpha.dim()), float("nan"))


def sink_threshold(
    lengths: torch.Tensor, threshold: Threshold, alpha_threshold: float, ratio_a: float
) -> torch.Tensor:
    """Per batch row, the alpha above which a key is a sink: ``alpha_threshold`` or ``ratio_a / T``."""
    if threshold == "alpha":
        return torch.full(lengths.shape, float(alpha_threshold), device=lengths.device)
    if threshold == "ratio":
        return float(ratio_a) / lengths.float()
    raise ConfigError(f"threshold must be one of {', '.join(THRESHOLDS)} (got {threshold!r})")


def detect_sinks(
    alpha: torch.Tensor,
    lengths: torch.Tensor,
    *,
    threshold: Threshold = "alpha",
    alpha_threshold: float = 0.1,
    ratio_a: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, hidden)``: bool masks like ``alpha`` ``[B, …, T]``.

    ``first`` marks the lowest-position detected sink (``alpha > threshold``) of each row, ``hidden``
    the other detected sinks (the ones ACT calibrates). Padding columns (NaN) are never sinks.
    """
    limit = _per_row(
        sink_threshold(lengths.to(alpha.device), threshold, alpha_threshold, ratio_a)[:, None], alpha.dim()
    )
    sinks = alpha > limit  # NaN compares False
    rank = sinks.to(torch.int32).cumsum(-1)
    return sinks & (rank == 1), sinks & (rank > 1)


def _check_first_sink(first_sink: str) -> None:
    if first_sink not in FIRST_SINKS:
        raise ConfigError(
            f"first_sink must be 'share' (the default: the first sink takes its proportional share of the "
            f"removed mass, as the official code whose numbers the paper publishes) or 'frozen' (its column "
            f"left untouched) (got {first_sink!r})"
        )


@dataclass(frozen=True)
class Calibration:
    """ACT's edit of one head's pattern: damp hidden sinks to ``beta``, give the rest to other keys
    (the first sink included with ``first_sink="share"``, the default; see :func:`calibrate_pattern`)."""

    beta: float = 0.4
    threshold: Threshold = "alpha"
    alpha_threshold: float = 0.1
    ratio_a: float = 5.0
    first_sink: FirstSink = "share"

    def sinks(self, pattern: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, hidden)`` sink masks ``[B, …, T]`` of patterns ``[B, …, T, T]``."""
        return detect_sinks(
            column_importance(pattern, lengths), lengths, threshold=self.threshold,
            alpha_threshold=self.alpha_threshold, ratio_a=self.ratio_a,
        )  # fmt: skip

    def apply(
        self, pattern: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The calibrated patterns (a new tensor); see :func:`calibrate_pattern`."""
        return calibrate_pattern(
            pattern, lengths, beta=self.beta, threshold=self.threshold,
            alpha_threshold=self.alpha_threshold, ratio_a=self.ratio_a, rows=rows,
            first_sink=self.first_sink,
        )  # fmt: skip


def calibrate_pattern(
    pattern: torch.Tensor,
    lengths: torch.Tensor,
    *,
    beta: float = 0.4,
    threshold: Threshold = "alpha",
    alpha_threshold: float = 0.1,
    ratio_a: float = 5.0,
    rows: torch.Tensor | None = None,
    first_sink: FirstSink = "share",
) -> torch.Tensor:
    """ACT-calibrate post-softmax patterns ``[B, …, T, T]`` of a left-padded batch (a new tensor).

    ``lengths`` ``[B]``: each batch row's real length. ``rows`` ``[B]`` bool: edit only these batch
    rows (the others are returned as they are). Hidden sinks are detected on each row's own pattern;
    see the module docstring for the formula. ``first_sink``: ``"share"`` (default, the official
    code's variant behind the paper's numbers) lets the first detected sink take its proportional
    share of the removed mass; ``"frozen"`` leaves its column bit-exact. Padding query rows, rows with
    no attention on hidden sinks and rows with no attention outside them are returned unchanged.
    """
    _check_first_sink(first_sink)
    if pattern.dim() < 3 or pattern.shape[-1] != pattern.shape[-2]:
        raise ConfigError(f"patterns must be [batch, .., T, T], got {tuple(pattern.shape)}")
    lengths = lengths.to(pattern.device)
    if lengths.shape != (pattern.shape[0],):
        raise ConfigError(
            f"lengths has shape {tuple(lengths.shape)} but the pattern has {pattern.shape[0]} batch rows; "
            "pass the real length of every row of the batch being run"
        )
    if rows is not None:
        rows = rows.to(pattern.device).bool()
        if rows.shape != (pattern.shape[0],):
            raise ConfigError(f"rows must be a [batch] bool mask, got {tuple(rows.shape)}")
        if not bool(rows.any()):
            return pattern.clone()
        if not bool(rows.all()):
            out = pattern.clone()
            out[rows] = calibrate_pattern(
                pattern[rows], lengths[rows], beta=beta, threshold=threshold,
                alpha_threshold=alpha_threshold, ratio_a=ratio_a, first_sink=first_sink,
            )  # fmt: skip
            return out
    T = pattern.shape[-1]
    A = pattern.float()
    first, hidden = detect_sinks(
        column_importance(A, lengths), lengths, threshold=threshold, alpha_threshold=alpha_threshold,
        ratio_a=ratio_a,
    )  # fmt: skip
    in_sink = hidden[..., None, :]  # [B, …, 1, T]: the same columns for every query row
    frozen = first[..., None, :] if first_sink == "frozen" else torch.zeros_like(in_sink)
    sink_mass = torch.where(in_sink, A, 0.0).sum(-1, keepdim=True)
    other_mass = torch.where(in_sink | frozen, 0.0, A).sum(-1, keepdim=True)
    real_query = _per_row(_real_rows(lengths, T), A.dim() - 1)[..., None]  # [B, …, T, 1]
    edit = real_query & (sink_mass > 0) & (other_mass > 0)
    gain = 1.0 + (1.0 - beta) * sink_mass / torch.where(edit, other_mass, 1.0)
    new = torch.where(in_sink, A * beta, torch.where(frozen, A, A * gain))
    return torch.where(edit & ~frozen, new.to(pattern.dtype), pattern)  # the frozen first sink: bit-exact


def calibrate_heads(
    model: LoadedModel,
    heads: Mapping[Head, torch.Tensor | None] | Iterable[Head],
    lengths: torch.Tensor,
    calibration: Calibration | None = None,
) -> AbstractContextManager[HookSet]:
    """Context manager: ACT-calibrate ``heads`` in the forward passes run inside it.

    ``lengths`` ``[B]`` are the real lengths of the (left-padded) batch that will be run, e.g.
    ``model.batch_from_ids(rows).lengths``. ``heads`` may map each head to a ``[B]`` bool mask of the
    batch rows to edit (None: every row), as the batched head search does.
    """
    cal = calibration or Calibration()
    masks: dict[Head, torch.Tensor | None] = (
        dict(heads) if isinstance(heads, Mapping) else dict.fromkeys(heads, None)
    )

    def make(rows: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda pattern: cal.apply(pattern, lengths, rows)

    return edit_pattern(model, {head: make(rows) for head, rows in masks.items()})


# ---------------------------------------------------------------------------------------- scoring


@dataclass
class _Chunk:
    input_ids: torch.Tensor  # [b, T]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor  # [b]
    row_ids: np.ndarray  # [b] indices into ChoiceScorer.rows
    read_row: np.ndarray  # per read: batch row
    read_col: np.ndarray  # per read: column of the padded sequence whose next-token logits are read
    read_item: np.ndarray
    read_choice: np.ndarray
    read_token: torch.Tensor


class ChoiceScorer:
    """Scores a fixed list of choice items again and again under different head calibrations.

    The same rule as :func:`analyses.tasks.choice.choice_logprobs` (an uncalibrated pass gives its
    numbers), with the batches built once. :meth:`logprobs` takes a list of head sets, one per
    *copy*: each batch is replicated once per copy and copy ``g`` calibrates only its heads, so
    several calibrations are scored by one forward pass.
    """

    def __init__(
        self,
        model: LoadedModel,
        items: Sequence[ChoiceItem],
        *,
        batch_size: int = 16,
        choice_token: ChoiceToken = "first",
    ) -> None:
        if model.bridge is None:
            raise ConfigError(f"{model.name} is not a language model; ACT needs one")
        if not items:
            raise ConfigError("no items to score; give at least one")
        self.model = model
        self.items = list(items)
        self.width = max(len(item.choices) for item in self.items)
        rows = [
            r for i, it in enumerate(self.items) for r in choice._plan(model.tokenizer, it, choice_token, i)
        ]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].context))
        self.rows = [rows[i] for i in order]
        params = inspect.signature(model.hf_model.forward).parameters
        self.keep_logits = "logits_to_keep" in params
        self.chunks: list[_Chunk] = []
        for start in range(0, len(self.rows), batch_size):
            ids = np.arange(start, min(start + batch_size, len(self.rows)))
            chunk_rows = [self.rows[i] for i in ids]
            batch = model.batch_from_ids([r.context for r in chunk_rows])
            T = batch.input_ids.shape[1]
            reads = [
                (b, T - len(r.context) + pos, r.item, c, token)
                for b, r in enumerate(chunk_rows)
                for c, pos, token in r.reads
            ]
            cols = np.array([x[1] for x in reads])
            self.chunks.append(
                _Chunk(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp_min(0), lengths=batch.lengths,
                    row_ids=ids, read_row=np.array([x[0] for x in reads]), read_col=cols,
                    read_item=np.array([x[2] for x in reads]), read_choice=np.array([x[3] for x in reads]),
                    read_token=torch.tensor([x[4] for x in reads], dtype=torch.long),
                )
            )  # fmt: skip

    @property
    def n_sequences(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def logprobs(
        self,
        copies: Sequence[Collection[Head]] = ((),),
        calibration: Calibration | None = None,
        *,
        observe: Callable[[_Chunk], AbstractContextManager[Any]] | None = None,
    ) -> np.ndarray:
        """``[len(copies), n_items, max_choices]`` log-probabilities; copy ``g`` calibrates ``copies[g]``.

        NaN past an item's own choices. ``observe(chunk)`` may return a context manager entered
        around each chunk's forward (hooks that only read, e.g. sink statistics; uncalibrated runs).
        """
        cal = calibration or Calibration()
        G = len(copies)
        if G < 1:
            raise ConfigError("give at least one copy (a head set, possibly empty)")
        sets = [frozenset(c) for c in copies]
        out = np.full((G, len(self.items), self.width), np.nan)
        for i, item in enumerate(self.items):
            out[:, i, : len(item.choices)] = 0.0
        bridge: Any = self.model.bridge
        for chunk in self.chunks:
            b, T = chunk.input_ids.shape
            lengths = chunk.lengths.repeat(G)
            masks: dict[Head, torch.Tensor | None] = {}
            for head in sorted(set().union(*sets)):
                chosen = torch.tensor([head in s for s in sets], device=lengths.device)
                masks[head] = None if bool(chosen.all()) else chosen.repeat_interleave(b)
            first_col = int(chunk.read_col.min())
            kwargs: dict[str, Any] = {"logits_to_keep": T - first_col} if self.keep_logits else {}
            with ExitStack() as stack:
                edits = (
                    stack.enter_context(calibrate_heads(self.model, masks, lengths, cal)) if masks else None
                )
                if observe is not None:
                    stack.enter_context(observe(chunk))
                logits = bridge(
                    chunk.input_ids.repeat(G, 1), attention_mask=chunk.attention_mask.repeat(G, 1),
                    position_ids=chunk.position_ids.repeat(G, 1), **kwargs,
                )  # fmt: skip
                if edits is not None:
                    edits.check_fired()  # a calibration that never ran would pass for "no effect"
            offset = T - logits.shape[1]  # logits kept for the last columns only
            n_reads = len(chunk.read_row)
            rows = torch.as_tensor(
                (np.arange(G)[:, None] * b + chunk.read_row[None, :]).ravel(), device=logits.device
            )
            cols = torch.as_tensor(np.tile(chunk.read_col - offset, G), device=logits.device)
            logp = torch.log_softmax(logits[rows, cols].float(), dim=-1)
            picked = logp.gather(1, chunk.read_token.repeat(G).to(logp.device)[:, None])[:, 0]
            values = picked.cpu().double().numpy().reshape(G, n_reads)
            for g in range(G):
                np.add.at(out[g], (chunk.read_item, chunk.read_choice), values[g])
        return out


def search_heads(
    scorer: ChoiceScorer,
    heads: Sequence[Head],
    calibration: Calibration | None = None,
    *,
    heads_per_pass: int = 8,
    progress: bool = True,
) -> np.ndarray:
    """Log-probabilities with each head calibrated alone: ``[len(heads), n_items, max_choices]``.

    ``heads_per_pass`` heads share one forward pass (the batch replicated once per head).
    """
    if heads_per_pass < 1:
        raise ConfigError(f"heads_per_pass must be >= 1 (got {heads_per_pass})")
    from tqdm.auto import tqdm

    out = np.empty((len(heads), len(scorer.items), scorer.width))
    bar = tqdm(total=len(heads), desc="ACT head search", unit="head", disable=not progress, leave=False)
    try:
        for start in range(0, len(heads), heads_per_pass):
            group = heads[start : start + heads_per_pass]
            out[start : start + len(group)] = scorer.logprobs([(h,) for h in group], calibration)
            bar.update(len(group))
    finally:
        bar.close()
    return out


def margins(logprobs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The label's log-probability minus the best other choice's, per item (``[..., n_items]``)."""
    idx = np.broadcast_to(labels, logprobs.shape[:-1])[..., None]
    label_logp = np.take_along_axis(logprobs, idx, axis=-1)[..., 0]
    others = logprobs.copy()
    np.put_along_axis(others, idx, np.nan, axis=-1)
    return label_logp - np.nanmax(others, axis=-1)


def paired_difference(
    before: np.ndarray, after: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(mean(after - before), low, high)``: percentile bootstrap over items (pairs kept together)."""
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1 or b.size == 0:
        raise ConfigError(
            f"before and after must be equal, non-empty 1-d arrays; got {b.shape} and {a.shape}"
        )
    diff = a - b
    value = float(diff.mean())
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    step = max(1, 2_000_000 // diff.size)  # bound the index array of one step
    for start in range(0, n_boot, step):
        k = min(step, n_boot - start)
        draws[start : start + k] = diff[rng.integers(0, diff.size, size=(k, diff.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return value, float(min(low, value)), float(max(high, value))


# ---------------------------------------------------------------------------------------- sink statistics


class _SinkStats:
    """Hidden sinks of every head on uncalibrated sequences (read in the pattern hooks)."""

    def __init__(self, scorer: ChoiceScorer, calibration: Calibration, in_range: Collection[int]) -> None:
        model = scorer.model
        n = scorer.n_sequences
        self.scorer = scorer
        self.cal = calibration
        self.in_range = set(in_range)
        self.n_layers = model.n_layers
        self.hidden_count = np.zeros((n, model.n_layers, model.n_heads), dtype=np.int64)
        self.first_pos = np.full((n, model.n_layers, model.n_heads), -1, dtype=np.int64)
        # per sequence: in-range heads with a hidden sink at each real position, and the tokens
        self.position_heads: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
        self.tokens: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
        self._chunk: _Chunk | None = None
        self._per_position: torch.Tensor | None = None

    @contextmanager
    def observe(self, chunk: _Chunk) -> Iterator[None]:
        """Hooks on every layer's pattern while ``chunk`` runs (uncalibrated, one copy)."""
        self._chunk = chunk
        self._per_position = torch.zeros(
            chunk.input_ids.shape, dtype=torch.long, device=chunk.input_ids.device
        )
        points = [(attn_hook(layer, "pattern"), self._hook(layer)) for layer in range(self.n_layers)]
        with hooks(self.scorer.model, points) as hook_set:
            yield
            hook_set.check_fired()
        self._finish()

    def _hook(self, layer: int) -> HookFn:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            chunk = self._chunk
            assert chunk is not None and self._per_position is not None
            b, T = chunk.input_ids.shape
            if pattern.shape[0] != b:
                raise ConfigError("sink statistics are gathered on uncalibrated, unreplicated passes only")
            first, hidden = self.cal.sinks(pattern, chunk.lengths)  # [b, H, T]
            offsets = (T - chunk.lengths).to(first.device)
            has = first.any(-1)
            pos = first.to(torch.int32).argmax(-1) - offsets[:, None]
            ids = chunk.row_ids
            self.hidden_count[ids, layer] = hidden.sum(-1).cpu().numpy()
            self.first_pos[ids, layer] = torch.where(has, pos, -1).cpu().numpy()
            if layer in self.in_range:
                self._per_position += hidden.sum(1)
            return None

        return hook

    def _finish(self) -> None:
        chunk, per_position = self._chunk, self._per_position
        assert chunk is not None and per_position is not None
        T = chunk.input_ids.shape[1]
        counts = per_position.cpu().numpy()
        ids = chunk.input_ids.cpu().numpy()
        for b, row in enumerate(chunk.row_ids):
            off = T - int(chunk.lengths[b])
            self.position_heads[row] = counts[b, off:]
            self.tokens[row] = ids[b, off:]
        self._chunk = self._per_position = None


# ---------------------------------------------------------------------------------------- items


@dataclass
class _Task:
    name: str
    kind: str
    calibration: list[ChoiceItem]
    heldout: list[ChoiceItem]


def _split_task(
    items: list[ChoiceItem], n_cal: int, n_held: int, seed: int
) -> tuple[list[ChoiceItem], list[ChoiceItem]]:
    want = n_cal + n_held
    if len(items) > want:
        keep = sorted(random.Random(f"headlab.act.subset:{seed}").sample(range(len(items)), want))
        items = [items[i] for i in keep]
    return choice.split(items, n_cal / want, seed)


def load_tasks(config: ActConfig) -> tuple[list[_Task], dict[str, str]]:
    """Each task's calibration and held-out items, plus notes on user tasks with fewer items."""
    tasks: list[_Task] = []
    notes: dict[str, str] = {}
    for name in config.tasks:
        items = choice.make_task(name, config.n_calibration + config.n_heldout, config.seed)
        cal, held = _split_task(items, config.n_calibration, config.n_heldout, config.seed)
        tasks.append(_Task(name, choice.TASKS[name].kind, cal, held))
    if config.jsonl:
        by_task: dict[str, list[ChoiceItem]] = {}
        for item in choice.load_jsonl(Path(config.jsonl).expanduser()):
            by_task.setdefault(item.task, []).append(item)
        for name, items in by_task.items():
            if name in config.tasks:
                raise ConfigError(
                    f"the jsonl file's task {name!r} has the name of a built-in task in tasks; rename it in the "
                    "file (a 'task' key per line) or drop it from tasks"
                )
            if len(items) < 2:
                raise ConfigError(f"task {name!r} of {config.jsonl} has {len(items)} item; give at least two")
            want = config.n_calibration + config.n_heldout
            if len(items) < want:
                notes[name] = (
                    f"{len(items)} items, fewer than n_calibration + n_heldout = {want}: split in the same "
                    "proportion"
                )
            cal, held = _split_task(items, config.n_calibration, config.n_heldout, config.seed)
            kind = Counter(item.kind for item in items).most_common(1)[0][0]
            tasks.append(_Task(name, kind, cal, held))
    return tasks, notes


# ---------------------------------------------------------------------------------------- the run


def _sink_tokens(stats: _SinkStats, n_in_range: int, decode: Callable[[int], str]) -> pd.DataFrame:
    tokens: list[str] = []
    shares: list[float] = []
    for counts, ids in zip(stats.position_heads, stats.tokens, strict=True):
        where = np.nonzero(counts)[0]
        tokens += [decode(int(ids[p])) for p in where]
        shares += (counts[where] / n_in_range).tolist()
    frame = pd.DataFrame(
        {"token": pd.Series(tokens, dtype=object), "share": np.asarray(shares, dtype=np.float64)}
    )
    grouped = frame.groupby("token", sort=False).agg(
        count=("share", "size"), share_of_heads=("share", "mean")
    )
    grouped = grouped.reset_index()
    grouped["count"] = grouped["count"].astype(np.int64)
    grouped["share_of_heads"] = grouped["share_of_heads"].astype(np.float64)
    return grouped.sort_values(["count", "share_of_heads"], ascending=[False, False], ignore_index=True)[
        list(SINK_TOKENS_COLUMNS)
    ]


def run_act(model: LoadedModel, config: ActConfig | None = None, *, progress: bool = True) -> AnalysisResult:
    """Detect hidden sinks, search heads on calibration items, report held-out accuracy before/after."""
    cfg = config or ActConfig()
    cfg.validate()
    if model.bridge is None:
        raise ConfigError(f"{model.name} is not a language model; ACT needs one")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cal = cfg.calibration()
    layers = resolve_layers(cfg, model.n_layers)
    in_range: list[Head] = [(layer, h) for layer in layers for h in range(model.n_heads)]

    tasks, task_notes = load_tasks(cfg)
    cal_items = [item for t in tasks for item in t.calibration]
    held_items = [item for t in tasks for item in t.heldout]
    cal_task = np.array([i for i, t in enumerate(tasks) for _ in t.calibration])
    held_task = np.array([i for i, t in enumerate(tasks) for _ in t.heldout])
    cal_labels = np.array([item.label for item in cal_items])
    held_labels = np.array([item.label for item in held_items])
    t0 = time.perf_counter()
    cal_scorer = ChoiceScorer(model, cal_items, batch_size=cfg.batch_size, choice_token=cfg.choice_token)
    held_scorer = ChoiceScorer(model, held_items, batch_size=cfg.batch_size, choice_token=cfg.choice_token)
    timings["tokenize"] = round(time.perf_counter() - t0, 3)

    # --- uncalibrated calibration pass: baseline accuracy and sink statistics
    t0 = time.perf_counter()
    stats = _SinkStats(cal_scorer, cal, layers)
    base_logp = cal_scorer.logprobs(((),), cal, observe=stats.observe)[0]
    base_correct = choice.predictions(base_logp) == cal_labels
    timings["baseline"] = round(time.perf_counter() - t0, 3)

    # --- head search
    scopes: list[tuple[str, np.ndarray]]  # (scope name, calibration item mask)
    if cfg.filter == "task":
        scopes = [(t.name, cal_task == i) for i, t in enumerate(tasks)]
    elif cfg.filter == "kind":  # one head set per task type, as the official code's released lists
        kinds = sorted({t.kind for t in tasks})
        task_kind = np.array([t.kind for t in tasks])
        scopes = [(k, task_kind[cal_task] == k) for k in kinds]
    elif cfg.filter == "pooled":
        scopes = [(POOLED, np.ones(len(cal_items), dtype=bool))]
    else:
        scopes = []
    kept: dict[str, list[Head]] = {}
    filter_rows: list[dict[str, Any]] = []
    delta = np.full((len(scopes), model.n_layers, model.n_heads), np.nan)
    t0 = time.perf_counter()
    if scopes:
        search_logp = search_heads(
            cal_scorer, in_range, cal, heads_per_pass=cfg.heads_per_pass, progress=progress
        )
        search_correct = (
            choice.predictions(search_logp.reshape(-1, cal_scorer.width)).reshape(
                len(in_range), len(cal_items)
            )
            == cal_labels[None, :]
        )
        for s, (scope, mask) in enumerate(scopes):
            acc_base = float(base_correct[mask].mean())
            kept[scope] = []
            for j, (layer, h) in enumerate(in_range):
                acc = float(search_correct[j, mask].mean())
                keep = acc > acc_base if cfg.keep == "raise" else acc >= acc_base
                delta[s, layer, h] = acc - acc_base
                if keep:
                    kept[scope].append((layer, h))
                filter_rows.append(
                    {"scope": scope, "layer": layer, "head": h, "acc_base": acc_base, "acc_calibrated": acc,
                     "delta": acc - acc_base, "kept": keep}
                )  # fmt: skip
    else:
        kept[ALL_HEADS] = list(in_range)
    timings["search"] = round(time.perf_counter() - t0, 3)

    # --- held-out: before, then each head set on the items it applies to
    t0 = time.perf_counter()
    before = held_scorer.logprobs(((),), cal)[0]
    after = np.full_like(before, np.nan)
    default_scope = POOLED if cfg.filter == "pooled" else ALL_HEADS
    scope_of_task = [
        t.name if cfg.filter == "task" else t.kind if cfg.filter == "kind" else default_scope for t in tasks
    ]
    for scope, heads in kept.items():
        on = np.array([scope_of_task[i] == scope for i in held_task])
        if not on.any():
            continue
        if not heads:
            after[on] = before[on]
            continue
        subset = [held_items[i] for i in np.nonzero(on)[0]]
        scorer = ChoiceScorer(model, subset, batch_size=cfg.batch_size, choice_token=cfg.choice_token)
        after[on, : scorer.width] = scorer.logprobs((tuple(heads),), cal)[0]
    timings["evaluate"] = round(time.perf_counter() - t0, 3)

    pred_before, pred_after = choice.predictions(before), choice.predictions(after)
    correct_before, correct_after = pred_before == held_labels, pred_after == held_labels
    task_rows = []
    for i, t in enumerate(tasks):
        on = held_task == i
        acc_b = choice.accuracy(correct_before[on], n_boot=cfg.n_boot, seed=cfg.seed)
        acc_a = choice.accuracy(correct_after[on], n_boot=cfg.n_boot, seed=cfg.seed)
        d, d_low, d_high = paired_difference(
            correct_before[on], correct_after[on], n_boot=cfg.n_boot, seed=cfg.seed
        )
        task_rows.append(
            {
                "task": t.name, "kind": t.kind,
                "chance": float(np.mean([1.0 / len(item.choices) for item in t.heldout])),
                "n_calibration": len(t.calibration), "n_heldout": len(t.heldout), "scope": scope_of_task[i],
                "n_kept": len(kept[scope_of_task[i]]),
                "acc_before": acc_b.value, "before_low": acc_b.low, "before_high": acc_b.high,
                "acc_after": acc_a.value, "after_low": acc_a.low, "after_high": acc_a.high,
                "delta": d, "delta_low": d_low, "delta_high": d_high,
            }
        )  # fmt: skip
    item_index = np.concatenate([np.arange(len(t.heldout)) for t in tasks])
    items = pd.DataFrame(
        {
            "task": pd.Series([held_items[i].task for i in range(len(held_items))], dtype=object),
            "item": item_index.astype(np.int64), "label": held_labels.astype(np.int64),
            "pred_before": pred_before.astype(np.int64), "pred_after": pred_after.astype(np.int64),
            "correct_before": correct_before.astype(bool), "correct_after": correct_after.astype(bool),
            "margin_before": margins(before, held_labels), "margin_after": margins(after, held_labels),
        }
    )  # fmt: skip

    # --- per head
    in_range_mask = np.zeros((model.n_layers, model.n_heads), dtype=bool)
    in_range_mask[list(layers)] = True
    n_kept = np.zeros((model.n_layers, model.n_heads), dtype=np.int64)
    for heads in kept.values():
        for layer, h in heads:
            n_kept[layer, h] += 1
    # in-range heads have a delta in every scope, the others none: a plain mean keeps NaN out of range
    mean_delta = delta.mean(axis=0) if len(scopes) else np.full(in_range_mask.shape, np.nan)
    first_sink = np.full((model.n_layers, model.n_heads), -1, dtype=np.int64)
    for layer in range(model.n_layers):
        for h in range(model.n_heads):
            found = stats.first_pos[:, layer, h]
            found = found[found >= 0]
            if found.size:
                first_sink[layer, h] = int(np.bincount(found).argmax())
    heads = heads_frame(model, {"mean_delta": mean_delta, "hidden_sinks": stats.hidden_count.mean(axis=0)})
    heads.insert(3, "in_range", in_range_mask.ravel())
    heads.insert(4, "n_tasks_kept", n_kept.ravel())
    heads["first_sink_pos"] = first_sink.ravel()
    heads = heads[list(HEADS_COLUMNS)]
    filter_frame = pd.DataFrame(filter_rows, columns=list(FILTER_COLUMNS)).astype(
        {"scope": object, "layer": np.int64, "head": np.int64, "acc_base": np.float64,
         "acc_calibrated": np.float64, "delta": np.float64, "kept": bool}
    )  # fmt: skip
    decode = token_decoder(model.tokenizer)
    tables = {
        "heads": heads,
        "filter": filter_frame,
        "tasks": pd.DataFrame(task_rows, columns=list(TASKS_COLUMNS)),
        "items": items[list(ITEMS_COLUMNS)],
        "sink_tokens": _sink_tokens(stats, len(in_range), decode),
    }
    timings["total"] = round(time.perf_counter() - t_start, 3)
    n_forward = cal_scorer.n_sequences * (1 + (len(in_range) if scopes else 0))
    return AnalysisResult(
        analysis="act",
        model_info=model.describe(),
        config=asdict(cfg),
        tables=tables,
        seeds={"seed": cfg.seed, "bootstrap": cfg.seed},
        timings=timings,
        notes={
            "alpha": "alpha_k = sum_{t>=k} A[t,k] / (T-k), real tokens only (left padding)",
            "sinks": (
                f"alpha_k > {cfg.alpha_threshold}"
                if cfg.threshold == "alpha"
                else f"alpha_k > {cfg.ratio_a}/T"
            )
            + "; the first (lowest-position) detected sink is never calibrated",
            "calibration": f"A[i,s] -> {cfg.beta}*A[i,s] on hidden sinks; the removed mass goes to the other "
            "keys in proportion to their attention (rows keep their sum); "
            + (
                "first_sink=share: the first sink is one of them (the official code's variant)"
                if cfg.first_sink == "share"
                else "first_sink=frozen: the first sink's column is left untouched"
            ),
            "layers": [layers.start, layers.stop],
            "n_heads_in_range": len(in_range),
            "keep_rule": "a head is kept when its calibration accuracy alone >= the uncalibrated accuracy",
            "scopes": {scope: len(h) for scope, h in kept.items()},
            "calibration_sequences": cal_scorer.n_sequences,
            "search_forward_sequences": n_forward,
            "logits_to_keep": cal_scorer.keep_logits,
            "bos": model.bos.describe(),
            "user_tasks": task_notes,
            "first_sink_pos": "most common real position (0 = first real token) of the first detected sink; "
            "-1 if none",
        },
    )


# ---------------------------------------------------------------------------------------- reporting


def summary(result: AnalysisResult) -> str:
    """A few lines for the CLI: per task, held-out accuracy before -> after with intervals."""
    cfg = result.config
    tasks = result.tables["tasks"]
    heads = result.tables["heads"]
    layers = result.notes.get("layers", [None, None])
    lines = [
        f"ACT on {result.model_info['name']}: filter={cfg.filter}, beta={cfg.beta}, "
        f"threshold={cfg.threshold}, layers {layers[0]}..{layers[1] - 1 if layers[1] is not None else '?'} "
        f"({int(heads['in_range'].sum())} heads in range)"
    ]
    for row in tasks.itertuples(index=False):
        lines.append(
            f"  {row.task:<14} {row.acc_before:.3f} [{row.before_low:.3f}, {row.before_high:.3f}] -> "
            f"{row.acc_after:.3f} [{row.after_low:.3f}, {row.after_high:.3f}]  delta {row.delta:+.3f} "
            f"[{row.delta_low:+.3f}, {row.delta_high:+.3f}]  ({row.n_kept} heads kept, scope {row.scope}, "
            f"n={row.n_heldout}, chance {row.chance:.2f})"
        )
    if len(tasks):
        lines.append(
            f"  mean over tasks: {tasks['acc_before'].mean():.3f} -> {tasks['acc_after'].mean():.3f} "
            f"({tasks['delta'].mean():+.3f})"
        )
    rng = heads[heads["in_range"]]
    lines.append(
        f"  hidden sinks per input (in-range heads): mean {rng['hidden_sinks'].mean():.2f}, "
        f"max {rng['hidden_sinks'].max():.2f}"
    )
    tokens = result.tables.get("sink_tokens")
    if tokens is not None and len(tokens):
        top = ", ".join(f"{t.token!r} ({t.count})" for t in tokens.head(5).itertuples(index=False))
        lines.append(f"  most frequent hidden-sink tokens: {top}")
    return "\n".join(lines)


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
