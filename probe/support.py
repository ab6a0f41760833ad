"""The architecture support checks: what probe does right on a checkpoint of each family.

:func:`run_checks` loads a checkpoint directory (written by :func:`probe.families.save_checkpoint`)
through ``probe.load_model`` and compares what probe computes with what transformers computes on
the same checkpoint. Each check ends as ``pass``, ``refused`` (probe raised a one-line
:class:`~probe.errors.ConfigError` saying why and what to do instead) or ``fail`` (a wrong number,
or any other error). ``tests/test_architectures.py`` and ``scripts/support_table.py`` (which writes
docs/support.md) both call these functions.

See docs/support.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from probe.checkpoints import first_line, quiet_transformers
from probe.errors import ConfigError
from probe.model import LoadedModel
from probe.reducers import BatchInfo, PatternReducer

Status = Literal["pass", "refused", "fail"]

PROMPT = "The quick brown fox jumps over the lazy dog."  # 44 bytes: past every sliding window used
NEW_TOKENS = 32
ATOL = 1e-5

CHECKS: dict[str, str] = {
    "load": "probe.load_model(directory) loads it as a local checkpoint",
    "patterns": (
        "an eager capture fires the pattern hook of every layer, and its patterns equal transformers' "
        f"eager output_attentions=True weights to {ATOL:g}"
    ),
    "generate": f"model.generate (KV cache) gives transformers' greedy tokens, {NEW_TOKENS} new tokens",
    "generate-nocache": f"model.generate(use_cache=False) gives transformers' greedy tokens, {NEW_TOKENS} new tokens",
    "greedy-decode": f"probe.decode.greedy_decode gives transformers' greedy tokens, {NEW_TOKENS} new tokens",
}
"""check name -> what it asserts, in table order."""


@dataclass(frozen=True)
class CheckResult:
    status: Status
    detail: str = ""  # the refusal's reason, or what went wrong

    def cell(self) -> str:
        """The result as a table cell of docs/support.md."""
        if self.status == "pass":
            return "✓"
        if self.status == "refused":
            return f"refused ({self.detail})"
        return f"✗ ({self.detail})"


class _KeepRows(PatternReducer):
    """Every layer's float32 rows of one batch, unreduced (for exact comparisons only)."""

    name = "rows"

    def _start(self, info: BatchInfo) -> None:
        self.rows: dict[int, torch.Tensor] = {}

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        assert q_start == 0
        self.rows[layer] = rows.detach().to("cpu", torch.float32).clone()

    def _finish(self, info: BatchInfo) -> torch.Tensor:
        return torch.zeros(info.batch_size)


class _Reference:
    """transformers' own models of the checkpoint: eager (for weights) and default (for generate)."""

    def __init__(self, directory: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.directory = directory
        with quiet_transformers():
            self.eager = AutoModelForCausalLM.from_pretrained(
                str(directory), attn_implementation="eager"
            ).eval()
            self.default = AutoModelForCausalLM.from_pretrained(str(directory)).eval()


def prompt_ids(model: LoadedModel) -> list[int]:
    """The prompt's ids as probe feeds them (BOS policy applied)."""
    return [int(t) for t in model.encode([PROMPT]).input_ids[0]]


def _raw_ids(model: LoadedModel) -> list[int]:
    return [int(t) for t in model.tokenizer(PROMPT, add_special_tokens=False).input_ids]


@torch.no_grad()
def check_patterns(model: LoadedModel, ref: _Reference) -> CheckResult:
    from probe.capture import capture

    keep = _KeepRows()
    capture(model, [_raw_ids(model)], [keep], mode="eager", batch_size=1, progress=False, plan_memory=False)
    missing = [layer for layer in range(model.n_layers) if layer not in keep.rows]
    if missing:
        return CheckResult("fail", f"no pattern from layers {missing}")
    ids = torch.tensor([prompt_ids(model)])
    theirs = ref.eager(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True).attentions
    if theirs is None or len(theirs) != model.n_layers:
        return CheckResult("fail", "transformers returned no attention weights")
    worst = 0.0
    for layer in range(model.n_layers):
        ours, want = keep.rows[layer], theirs[layer].float()
        if ours.shape != want.shape:
            return CheckResult("fail", f"layer {layer}: pattern {tuple(ours.shape)} vs {tuple(want.shape)}")
        worst = max(worst, float((ours - want).abs().max()))
    if worst > ATOL:
        return CheckResult("fail", f"patterns differ by up to {worst:.2g}")
    return CheckResult("pass")


@torch.no_grad()
def reference_tokens(model: LoadedModel, ref: _Reference) -> list[int]:
    ids = torch.tensor([prompt_ids(model)])
    out = ref.default.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    return [int(t) for t in out[0, ids.shape[1] :]]


def _compare(ours: list[int], want: list[int]) -> CheckResult:
    if ours == want:
        return CheckResult("pass")
    first = next(
        (i for i, (a, b) in enumerate(zip(ours, want, strict=False)) if a != b), min(len(ours), len(want))
    )
    return CheckResult("fail", f"tokens differ from step {first} ({len(ours)} vs {len(want)} tokens)")


def check_generate(model: LoadedModel, ref: _Reference, *, use_cache: bool) -> CheckResult:
    n = len(prompt_ids(model))
    out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, use_cache=use_cache)
    return _compare([int(t) for t in out[0, n:]], reference_tokens(model, ref))


def check_greedy_decode(model: LoadedModel, ref: _Reference) -> CheckResult:
    from probe.decode import greedy_decode

    result = greedy_decode(model, prompt_ids(model), NEW_TOKENS)
    return _compare([int(t) for t in result.tokens], reference_tokens(model, ref))


_MODEL_CHECKS: dict[str, Callable[[LoadedModel, _Reference], CheckResult]] = {
    "patterns": check_patterns,
    "generate": lambda m, r: check_generate(m, r, use_cache=True),
    "generate-nocache": lambda m, r: check_generate(m, r, use_cache=False),
    "greedy-decode": check_greedy_decode,
}


def _guard(fn: Callable[[], CheckResult]) -> CheckResult:
    try:
        return fn()
    except ConfigError as err:
        return CheckResult("refused", first_line(err))
    except Exception as err:  # any other error is a failure of the check, recorded
        return CheckResult("fail", f"{type(err).__name__}: {first_line(err)}")


def run_checks(directory: str | Path) -> dict[str, CheckResult]:
    """Every check of :data:`CHECKS` on one checkpoint directory, in table order."""
    import probe

    directory = Path(directory)
    loaded: dict[str, Any] = {}

    def load() -> CheckResult:
        with quiet_transformers():
            loaded["model"] = probe.load_model(str(directory), device="cpu")
        if loaded["model"].source != "local":
            return CheckResult(
                "fail", f"loaded by the {loaded['model'].source!r} source, not as a local checkpoint"
            )
        return CheckResult("pass")

    results = {"load": _guard(load)}
    if "model" not in loaded:
        after = "load refused" if results["load"].status == "refused" else "load failed"
        return {
            name: CheckResult(results["load"].status, after) if name != "load" else results[name]
            for name in CHECKS
        }
    ref = _Reference(directory)
    model = loaded["model"]
    for name, check in _MODEL_CHECKS.items():
        results[name] = _guard(lambda check=check: check(model, ref))  # type: ignore[misc]
    return results


def family_results(family: str, root: str | Path) -> dict[str, CheckResult]:
    """Write ``family``'s tiny checkpoint under ``root`` and run every check on it."""
    from probe.families import save_checkpoint

    with quiet_transformers():
        directory = save_checkpoint(family, Path(root) / family)
    return run_checks(directory)
