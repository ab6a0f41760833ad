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

from collections.abc import Callable, Sequence
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
DECODE_ROW_STEPS = 8  # decode steps whose recorded rows are compared with transformers' eager rows
ATOL = 1e-5
TIE = 1e-6  # two weights of one row this close are a tie: either position is that row's argmax
KERNEL_ATOL = 1e-4  # two attention kernels (eager, SDPA) on the same numbers: float32 rounding

CHECKS: dict[str, str] = {
    "load": "probe.load_model(directory) loads it as a local checkpoint",
    "patterns": (
        "an eager capture fires the pattern hook of every layer, and its patterns equal transformers' "
        f"eager output_attentions=True weights to {ATOL:g}"
    ),
    "recompute": (
        "a recompute capture (SDPA kept, rows rebuilt from q/k in query blocks of 4) gives the eager "
        f"capture's statistics (entropy, mean distance, column importance) to {ATOL:g}, on a left-padded batch"
    ),
    "padding": (
        "a prompt alone and the same prompt left-padded in a batch give the same statistics and logits "
        f"to {ATOL:g}"
    ),
    "interventions": (
        "every intervention (edit_pattern, scale_heads, uniform_attention, freeze_heads, "
        "patch_activation, native_attention, duo_attention) changes the logits inside its block "
        f"(native_attention: equal to {KERNEL_ATOL:g}) and leaves weights, hooks and logits bit-identical "
        "after it, also when the block raises; duo_attention with every gate at 1 gives the model's "
        f"logits to {ATOL:g}"
    ),
    "generate": f"model.generate (KV cache) gives transformers' greedy tokens, {NEW_TOKENS} new tokens",
    "generate-nocache": f"model.generate(use_cache=False) gives transformers' greedy tokens, {NEW_TOKENS} new tokens",
    "greedy-decode": f"probe.decode.greedy_decode gives transformers' greedy tokens, {NEW_TOKENS} new tokens",
    "decode-rows": (
        f"at each of {DECODE_ROW_STEPS} probe.decode.greedy_decode steps, every head's recorded argmax "
        "position and max weight are those of transformers' eager output_attentions=True row at the step's "
        f"query (the max weight to {ATOL:g}; the argmax exactly, or a position tied with it within {TIE:g})"
    ),
}
"""check name -> what it asserts, in table order."""


@dataclass(frozen=True)
class CheckResult:
    status: Status
    detail: str = ""  # the refusal's reason, or what went wrong

    def cell(self) -> str:
        """The result as a table cell of docs/support.md."""
        if self.status == "pass":
            return f"✓ ({self.detail})" if self.detail else "✓"
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


def _stat_reducers() -> list[PatternReducer]:
    from probe.reducers import ColumnImportance, MeanDistance, RowEntropy

    return [RowEntropy(), MeanDistance(), ColumnImportance()]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference; infinite where NaN (no value) is not in the same places."""
    if a.shape != b.shape or not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    real = ~torch.isnan(a)
    return float((a[real] - b[real]).abs().max()) if bool(real.any()) else 0.0


def _pair(model: LoadedModel) -> list[list[int]]:
    """A longer prompt and the prompt itself: in one batch the second is left-padded."""
    ids = _raw_ids(model)
    return [ids + ids[:7], ids]


def _stats(model: LoadedModel, rows: list[list[int]], mode: str, batch_size: int) -> list[torch.Tensor]:
    from probe.capture import capture

    reducers = _stat_reducers()
    capture(
        model,
        rows,
        reducers,
        mode=mode,  # type: ignore[arg-type]
        batch_size=batch_size,
        query_block=4,
        progress=False,
        plan_memory=False,
    )
    return [r.result() for r in reducers]


@torch.no_grad()
def check_recompute(model: LoadedModel, ref: _Reference) -> CheckResult:
    rows = _pair(model)
    eager, recompute = _stats(model, rows, "eager", 2), _stats(model, rows, "recompute", 2)
    names = [r.name for r in _stat_reducers()]
    worst = {n: _max_diff(a, b) for n, a, b in zip(names, eager, recompute, strict=True)}
    bad = {n: d for n, d in worst.items() if d > ATOL}
    if bad:
        return CheckResult("fail", ", ".join(f"{n} differs by {d:.2g}" for n, d in bad.items()))
    return CheckResult("pass")


def _bridge_logits(model: LoadedModel, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """probe's forward (the TransformerBridge) as float32 logits."""
    assert model.bridge is not None
    out = model.bridge(input_ids, **kwargs)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def _logits(model: LoadedModel, rows: list[list[int]]) -> torch.Tensor:
    """probe's forward on a left-padded batch of raw rows, positions following the real tokens."""
    batch = model.batch_from_ids(rows)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    return _bridge_logits(model, batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions)


@torch.no_grad()
def check_padding(model: LoadedModel, ref: _Reference) -> CheckResult:
    rows = _pair(model)
    alone, batched = _stats(model, rows[1:], "eager", 1), _stats(model, rows, "eager", 2)
    problems = []
    for reducer, a, b in zip(_stat_reducers(), alone, batched, strict=True):
        one, two = a[0], b[1]
        if two.dim() and two.shape != one.shape:  # [.., T_max] results: the real positions come first
            two = two[..., : one.shape[-1]]
        if (d := _max_diff(one, two)) > ATOL:
            problems.append(f"{reducer.name} differs by {d:.2g}")
    single, padded = _logits(model, rows[1:])[0], _logits(model, rows)[1]
    n = single.shape[0]
    if (d := _max_diff(single, padded[-n:])) > ATOL:
        problems.append(f"logits differ by {d:.2g}")
    return CheckResult("fail", "; ".join(problems)) if problems else CheckResult("pass")


class _Planted(Exception):
    """The error raised inside an intervention's block to check that leaving it restores the model."""


def _state(
    model: LoadedModel, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], int]:
    native = model.native_model
    assert native is not None and model.bridge is not None
    modules = [*model.bridge.modules(), *native.modules()]
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    params = {k: v.detach().clone() for k, v in native.state_dict().items()}
    return _bridge_logits(model, ids), native(input_ids=ids).logits.float(), params, n_hooks


def _same(before: tuple[Any, ...], after: tuple[Any, ...]) -> str:
    if not torch.equal(before[0], after[0]):
        return "probe's logits changed"
    if not torch.equal(before[1], after[1]):
        return "the native model's logits changed"
    if before[2].keys() != after[2].keys() or any(
        not torch.equal(before[2][k], after[2][k]) for k in before[2]
    ):
        return "a weight changed"
    if before[3] != after[3]:
        return f"{after[3] - before[3]} hooks were left registered"
    return ""


@torch.no_grad()
def check_interventions(model: LoadedModel, ref: _Reference) -> CheckResult:
    from probe import interventions as iv
    from probe.hooks import attn_hook
    from probe.kernels import native_attention
    from probe.streaming import duo_attention

    ids = torch.tensor([prompt_ids(model)])  # [1, T], BOS policy applied
    before = _state(model, ids)
    z = iv.cache_z(model, ids, [0])
    name = attn_hook(0, "pattern")
    source = iv.cache_activations(model, ids, [name])[name]
    makers: dict[str, Callable[[], Any]] = {
        "edit_pattern": lambda: iv.edit_pattern(model, {(0, 0): lambda p: p * 0.5}),
        "scale_heads": lambda: iv.scale_heads(model, {(0, 0): 0.0, (model.n_layers - 1, 1): 2.0}),
        "uniform_attention": lambda: iv.uniform_attention(model, [(0, 0), (1, 1)]),
        "freeze_heads": lambda: iv.freeze_heads(model, [(0, 1)], {0: z[0] * 0.5}),
        "patch_activation": lambda: iv.patch_activation(model, name, source.flip(-1)),
        "native_attention": lambda: native_attention(model, "eager"),
        "duo_attention": lambda: duo_attention(
            model, torch.zeros(model.n_layers, model.n_kv_heads), sink=1, recent=2, block=4
        ),
    }
    refused = []
    for what, make in makers.items():
        for raise_inside in (False, True):
            try:
                with make() as handle:
                    if isinstance(handle, torch.nn.Module):  # the native model, re-wired
                        inside, outside = handle(input_ids=ids).logits.float(), before[1]
                    else:  # hooks on the bridge
                        inside, outside = _bridge_logits(model, ids), before[0]
                    # native_attention switches kernels: the same numbers up to their rounding;
                    # every other one edits the attention
                    changed = _max_diff(inside, outside) > KERNEL_ATOL
                    if changed != (what != "native_attention"):
                        return CheckResult(
                            "fail", f"{what} {'changed' if changed else 'did not change'} the logits"
                        )
                    if raise_inside:
                        raise _Planted
            except _Planted:
                pass
            except ConfigError:  # this intervention refuses this model: nothing ran
                refused.append(what)
            problem = _same(before, _state(model, ids))
            if problem:
                when = "after an error in its block" if raise_inside else "after its block"
                return CheckResult("fail", f"{what}: {problem} {when}")
    if "duo_attention" not in refused:  # with every gate at 1 it must be the model itself (its fast path)
        with native_attention(model) as native:
            want = native(input_ids=ids).logits.float()
        with duo_attention(model, torch.ones(model.n_layers, model.n_kv_heads), sink=1, recent=2) as gated:
            if (d := _max_diff(gated(input_ids=ids).logits.float(), want)) > ATOL:
                return CheckResult(
                    "fail", f"duo_attention with every gate at 1 changes the logits by {d:.2g}"
                )
    return CheckResult("pass", f"{', '.join(dict.fromkeys(refused))} refused" if refused else "")


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


@torch.no_grad()
def check_decode_rows(model: LoadedModel, ref: _Reference) -> CheckResult:
    """greedy_decode's per-step argmax and max weight against transformers' eager attention rows.

    Step ``s``'s query is position ``len(prompt) - 1 + s`` of prompt + generated tokens: its row is
    the last row of one eager forward over the tokens up to it (one forward per step: a LongRoPE
    model rotates a sequence by its length, so a longer forward would give other rows).
    """
    from probe.decode import greedy_decode

    ids = prompt_ids(model)
    result = greedy_decode(model, ids, DECODE_ROW_STEPS, stop_ids=())  # every step, EOS or not
    steps = len(result.tokens)
    if steps != DECODE_ROW_STEPS or result.argmax.shape != (steps, model.n_layers, model.n_heads):
        return CheckResult(
            "fail",
            f"{steps} steps, argmax {result.argmax.shape}; wanted {DECODE_ROW_STEPS} steps of every head",
        )
    queries = torch.arange(steps) + len(ids) - 1  # step s's query position
    rows = torch.full((steps, model.n_layers, model.n_heads, int(queries[-1]) + 1), 0.0)  # [steps, L, H, T]
    for s in range(steps):
        seq = torch.tensor([ids + result.tokens[:s]])
        theirs = ref.eager(
            input_ids=seq, attention_mask=torch.ones_like(seq), output_attentions=True
        ).attentions
        if theirs is None or len(theirs) != model.n_layers:
            return CheckResult("fail", "transformers returned no attention weights")
        rows[s, :, :, : seq.shape[1]] = torch.stack([a[0, :, -1].float() for a in theirs])
    argmax = torch.from_numpy(result.argmax)
    if bool(((argmax < 0) | (argmax > queries[:, None, None])).any()):
        return CheckResult("fail", "a recorded argmax lies outside the keys its query sees")
    want_max = rows.amax(dim=-1)
    at_ours = rows.gather(-1, argmax[..., None])[..., 0]  # the reference's weight where ours peaks
    wrong = (at_ours < want_max - TIE).nonzero().tolist()
    if wrong:
        s, layer, head = wrong[0]
        return CheckResult(
            "fail",
            f"{len(wrong)} argmaxes differ; first at step {s} L{layer}H{head}: position "
            f"{int(argmax[s, layer, head])} vs {int(rows[s, layer, head].argmax())}",
        )
    if (d := _max_diff(torch.from_numpy(result.max_weight).float(), want_max)) > ATOL:
        return CheckResult("fail", f"max weights differ by up to {d:.2g}")
    return CheckResult("pass")


_MODEL_CHECKS: dict[str, Callable[[LoadedModel, _Reference], CheckResult]] = {
    "patterns": check_patterns,
    "recompute": check_recompute,
    "padding": check_padding,
    "interventions": check_interventions,
    "generate": lambda m, r: check_generate(m, r, use_cache=True),
    "generate-nocache": lambda m, r: check_generate(m, r, use_cache=False),
    "greedy-decode": check_greedy_decode,
    "decode-rows": check_decode_rows,
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
    return check_checkpoint(directory)[1]


def check_checkpoint(directory: str | Path) -> tuple[LoadedModel | None, dict[str, CheckResult]]:
    """The model probe loaded from ``directory`` (None where loading was refused or failed) and every
    check of :data:`CHECKS` on it, in table order; the checks leave the model as it was loaded."""
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
        return None, {
            name: CheckResult(results["load"].status, after) if name != "load" else results[name]
            for name in CHECKS
        }
    ref = _Reference(directory)
    model = loaded["model"]
    for name, check in _MODEL_CHECKS.items():
        results[name] = _guard(lambda check=check: check(model, ref))  # type: ignore[misc]
    return model, results


def family_checkpoint(family: str, root: str | Path, words: Sequence[str] = ()) -> Path:
    """Write ``family``'s tiny checkpoint (``words`` as whole tokens) into ``root/family``."""
    from probe.families import save_checkpoint

    with quiet_transformers():
        return save_checkpoint(family, Path(root) / family, words=words)


def family_results(family: str, root: str | Path, words: Sequence[str] = ()) -> dict[str, CheckResult]:
    """Write ``family``'s tiny checkpoint under ``root`` and run every check on it."""
    return run_checks(family_checkpoint(family, root, words))
