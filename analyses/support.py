"""Which registered language-model analyses run on each architecture family of the support matrix.

:func:`analysis_results` runs every registered analysis of language models (:func:`language_analyses`)
on a loaded model through its registry entry, as ``headlab run`` does, with the small settings of
:data:`SETTINGS`, and records ``pass`` (it ran, and the head scores of :data:`SCORES` are finite
numbers of shape ``[n_layers, n_heads]``), ``refused`` (a one-line
:class:`~probe.errors.ConfigError`) or ``fail`` (any other error, or scores of another shape or not
finite). :func:`family_support` writes a family's tiny checkpoint once, with :data:`TASK_WORDS` as
whole tokens so that the circuit tasks can build their prompts, and gives both tables' rows: the
checks of :mod:`probe.support` and the analyses, on the same loaded model.
``tests/test_architectures.py`` and ``scripts/support_table.py`` (which writes docs/support.md)
both call these functions.

See docs/support.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from analyses.base import AnalysisResult, config_from_overrides
from analyses.registry import ANALYSES
from analyses.tasks import colored_objects, ioi
from probe.checkpoints import first_line, quiet_transformers
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.support import CheckResult, check_checkpoint, family_checkpoint

TASK_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *ioi.NAMES,
            *ioi.PLACES,
            *ioi.OBJECTS,
            *colored_objects.OBJECTS,
            *colored_objects.COLOURS,
            *colored_objects.SURFACES,
        ]
    )
)
"""The circuit tasks' words (IOI names, places, objects; Colored Objects objects, colours, surfaces),
each one token of the families' tokenizer: the byte tokenizer alone spells them byte by byte, and
the tasks refuse a tokenizer that keeps none of them whole."""

# the circuit analyses share one config: 2 prompts per task, every head patched, the held-out test
# on 2 prompts against the smallest null the validation allows
_CIRCUITS: dict[str, Any] = {
    "n_items": 2,
    "n_random": 1,
    "batch_size": 8,
    "n_heldout": 2,
    "n_reference": 2,
    "n_boot": 10,
    "progress": False,
}

SETTINGS: dict[str, dict[str, Any]] = {
    "census": {
        "n_natural": 2,
        "seq_len": 24,
        "n_repeated": 2,
        "repeat_len": 8,
        "batch_size": 2,
        "n_examples": 1,
    },
    "sinks": {"seq_len": 24, "n_sequences": 2, "batch_size": 2, "n_examples": 1, "hidden_min_queries": 4},
    "act": {
        "tasks": ("sentiment",),
        "n_calibration": 2,
        "n_heldout": 2,
        "layer_start": 0,
        "layer_end": None,
        "batch_size": 4,
        "n_boot": 20,
    },
    "retrieval": {
        "lengths": (176,),
        "depths": (0.5,),
        "n_needles": 1,
        "max_new_tokens": 2,
        "mask_fractions": (0.25,),
        "mask_seeds": 1,
        "mask_tests": 1,
        "heldout_needles": 1,
        "heldout_depths": (0.5,),
        "novel_answer_tokens": False,
        "progress": False,
    },
    "duo": {
        "sink": 2,
        "recent": 8,
        "train_min_length": 176,
        "train_max_length": 176,
        "train_n_lengths": 1,
        "n_passkeys": 1,
        "steps": 1,
        "n_contexts": 1,
        "shares": (0.5,),
        "lengths": (176,),
        "depths": (0.5,),
        "n_needles": 1,
        "novel_answer_tokens": False,
        "max_new_tokens": 2,
        "random_seeds": 1,
        "score_lengths": (176,),
        "score_depths": (0.5,),
        "score_needles": 1,
        "n_boot": 10,
        "block": 16,
        "progress": False,
    },
    "ioi": _CIRCUITS,
    "colored-objects": _CIRCUITS,
    "circuit-reuse": _CIRCUITS,
}
"""analysis -> the settings over its config's defaults it runs with here: the smallest that run
every part of the analysis (a random tiny model recalls no needle, so the retrieval and Duo scores
past the grid have nothing to validate)."""


def _columns(*names: str) -> Callable[[AnalysisResult], np.ndarray]:
    def scores(result: AnalysisResult) -> np.ndarray:
        heads = result.heads.sort_values(["layer", "head"])
        shape = (int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1) if len(heads) else (0, 0)
        if len(heads) != shape[0] * shape[1]:
            raise ValueError(f"the heads table has {len(heads)} rows, not one per layer and head")
        return np.stack([heads[name].to_numpy(dtype=np.float64).reshape(shape) for name in names])

    return scores


def _copy_scores(result: AnalysisResult) -> np.ndarray:
    return np.asarray(result.arrays["scores"], dtype=np.float64)  # [tests, layers, heads]


SCORES: dict[str, tuple[str, Callable[[AnalysisResult], np.ndarray]]] = {
    "census": (
        "entropy, alpha_0, prev_token, mean_distance, induction, duplicate_token",
        _columns("entropy", "alpha_0", "prev_token", "mean_distance", "induction", "duplicate_token"),
    ),
    "sinks": (
        "alpha0, sink_rate, hidden_sink_rate on each input set",
        _columns(
            *(
                f"{m}_{s}"
                for m in ("alpha0", "sink_rate", "hidden_sink_rate")
                for s in ("natural", "random", "repeated")
            )
        ),
    ),
    "act": ("mean_delta, hidden_sinks", _columns("mean_delta", "hidden_sinks")),
    "retrieval": (
        "every test's copy score (retrieval_score averages them over the recalled tests only)",
        _copy_scores,
    ),
    "duo": ("duo_gate", _columns("duo_gate")),
    "ioi": ("ioi_attribution, ioi_activation", _columns("ioi_attribution", "ioi_activation")),
    "colored-objects": ("co_attribution, co_activation", _columns("co_attribution", "co_activation")),
    "circuit-reuse": (
        "both tasks' attribution and activation scores",
        _columns("ioi_attribution", "ioi_activation", "co_attribution", "co_activation"),
    ),
}
"""analysis -> (what its head scores are, how to read them from its result as ``[..., n_layers,
n_heads]``)."""


def language_analyses() -> list[str]:
    """The registered analyses of language models, in registry order; the head atlas, which reads
    other runs from the run store and computes nothing on the model, is not one of them."""
    return [
        name
        for name, entry in ANALYSES.items()
        if "language" in entry.model_kinds and not entry.reads_run_store
    ]


def settings_text(name: str) -> str:
    """``name``'s settings of :data:`SETTINGS` as ``headlab run --set`` writes them."""

    def show(value: Any) -> str:
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        return "none" if value is None else str(value)

    return " ".join(
        f"{key}={show(value)}" for key, value in SETTINGS.get(name, {}).items() if key != "progress"
    )


def run_analysis(model: LoadedModel, name: str) -> CheckResult:
    """Analysis ``name`` on ``model`` with its :data:`SETTINGS`, as a table cell's result."""
    if name not in SETTINGS or name not in SCORES:
        return CheckResult("fail", f"{name} has no settings or head scores in analyses/support.py")
    entry = ANALYSES[name]
    try:
        config = config_from_overrides(entry.config_cls, SETTINGS[name])
        with quiet_transformers():
            result = entry.run(model, config)
        scores = SCORES[name][1](result)
    except ConfigError as err:
        return CheckResult("refused", first_line(err))
    except Exception as err:  # any other error is a failure of the analysis, recorded
        return CheckResult("fail", f"{type(err).__name__}: {first_line(err)}")
    want = (model.n_layers, model.n_heads)
    if scores.shape[-2:] != want:
        return CheckResult("fail", f"head scores of shape {scores.shape}, not [..., {want[0]}, {want[1]}]")
    if not np.isfinite(scores).all():
        return CheckResult("fail", f"{int((~np.isfinite(scores)).sum())} head scores are not finite")
    return CheckResult("pass")


def analysis_results(model: LoadedModel) -> dict[str, CheckResult]:
    """Every analysis of :func:`language_analyses` on ``model``, in table order."""
    return {name: run_analysis(model, name) for name in language_analyses()}


def family_support(family: str, root: str | Path) -> tuple[dict[str, CheckResult], dict[str, CheckResult]]:
    """``family``'s tiny checkpoint (with :data:`TASK_WORDS`) written under ``root``, loaded once:
    its check results (:mod:`probe.support`) and its analysis results."""
    model, checks = check_checkpoint(family_checkpoint(family, root, TASK_WORDS))
    if model is None:
        why = "load refused" if checks["load"].status == "refused" else "load failed"
        return checks, {name: CheckResult(checks["load"].status, why) for name in language_analyses()}
    return checks, analysis_results(model)
