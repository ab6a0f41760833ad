"""The vision support checks: what probe does right on a checkpoint of each vision family.

:func:`run_checks` loads a checkpoint directory (written by
:func:`probe.vision_families.save_checkpoint`) through ``probe.load_model`` and compares what probe
computes with what transformers computes on the same checkpoint and images. Results use the
vocabulary of :mod:`probe.support` (``pass``, ``refused`` with a one-line ConfigError, ``fail``).
The analyses' checks (vit-heads, VHD) are added by :mod:`analyses.vision_support`, which
``tests/test_vision_architectures.py`` and ``scripts/support_table.py`` call.

See docs/support.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probe.checkpoints import quiet_transformers
from probe.model import LoadedModel
from probe.support import ATOL, KERNEL_ATOL, CheckResult, _guard, _max_diff, _Planted
from probe.vision_families import VISION_FAMILIES

PROMPT = "Describe the image."

CHECKS: dict[str, str] = {
    "load": "probe.load_model(directory) loads it as a local checkpoint",
    "patterns": (
        "every attention layer's pattern hook fires on two images (vision: probe.vision.capture; LLaVA: the "
        "language model's hook_pattern with the image), and the patterns equal transformers' eager "
        f"output_attentions=True weights to {ATOL:g}"
    ),
    "outputs": (
        "probe's eager forward gives transformers' default (SDPA) model's image embedding (CLIP: "
        "image_embeds; SigLIP: the pooling head's output; others: the final-norm CLS token) and logits "
        f"to {KERNEL_ATOL:g}; LLaVA: the logits, and the per-head outputs read under SDPA "
        "(vlm.capture_head_outputs) equal the eager hook_z"
    ),
    "batch": (
        "two images in one batch give each image's patterns, reducer statistics (KeyAttention, "
        f"GridDistance), embedding and logits as alone, to {ATOL:g} (LLaVA: patterns and logits of "
        "the same prompt with two images)"
    ),
    "interventions": (
        "vision: gate_heads (scale, zero in a region, mean) and gate_variables change the embedding "
        "inside their block and leave weights, hooks and the embedding bit-identical after it, also when "
        "the block raises; LLaVA: the language-model interventions of the language matrix"
    ),
}
"""check name -> what it asserts, in table order (the analyses add theirs after these)."""

ModelCheck = Callable[[LoadedModel, "Reference"], CheckResult]


class Reference:
    """transformers' own model of the checkpoint: eager (for weights) and default (SDPA)."""

    def __init__(self, directory: Path, family: str) -> None:
        transformers = importlib.import_module("transformers")
        cls = getattr(transformers, VISION_FAMILIES[family].model_class)
        self.family = family
        with quiet_transformers():
            self.eager = cls.from_pretrained(str(directory), attn_implementation="eager").eval()
            self.default = cls.from_pretrained(str(directory)).eval()


def images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 RGB images, larger than the models' input and not square."""
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 52, 3), dtype=np.uint8)


def _pixels(model: LoadedModel, n: int = 2, seed: int = 0) -> torch.Tensor:
    return model.preprocess(images(n, seed))


def _is_vlm(model: LoadedModel) -> bool:
    return model.kind == "vision-language"


# --------------------------------------------------------------------------------------- patterns


def _vlm_inputs(model: LoadedModel, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    from probe import vlm

    batch = vlm.encode_prompts(model, [PROMPT] * n)
    return batch.input_ids, _pixels(model, n)


def _bridge_patterns(
    model: LoadedModel, ids: torch.Tensor, pixels: torch.Tensor
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The language model's patterns from probe's pattern hooks, and the logits, on an image prompt."""
    from probe.hooks import attn_hook

    assert model.bridge is not None
    seen: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Callable[..., None]:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            seen[layer] = pattern.detach().float().clone()

        return hook

    out = model.bridge.run_with_hooks(
        ids,
        pixel_values=pixels,
        fwd_hooks=[(attn_hook(layer, "pattern"), keep(layer)) for layer in range(model.n_layers)],
    )
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return seen, logits.float()


@torch.no_grad()
def check_patterns(model: LoadedModel, ref: Reference) -> CheckResult:
    if _is_vlm(model):
        ids, pixels = _vlm_inputs(model, 2)
        ours, _ = _bridge_patterns(model, ids, pixels)
        theirs = ref.eager(input_ids=ids, pixel_values=pixels, output_attentions=True).attentions
    else:
        from probe import vision

        pixels = _pixels(model)
        ours = vision.capture(model, pixels, patterns="all").patterns  # raises if a hook did not fire
        theirs = ref.eager(pixel_values=pixels, output_attentions=True).attentions
    missing = [layer for layer in range(model.n_layers) if layer not in ours]
    if missing:
        return CheckResult("fail", f"no pattern from layers {missing}")
    if theirs is None or len(theirs) != model.n_layers:
        return CheckResult(
            "fail", f"probe reads {model.n_layers} layers, transformers returned {len(theirs or ())}"
        )
    worst = 0.0
    for layer in range(model.n_layers):
        got, want = ours[layer], theirs[layer].float()
        if got.shape != want.shape:
            return CheckResult("fail", f"layer {layer}: pattern {tuple(got.shape)} vs {tuple(want.shape)}")
        worst = max(worst, _max_diff(got, want))
    if worst > ATOL:
        return CheckResult("fail", f"patterns differ by up to {worst:.2g}")
    return CheckResult("pass")


# ---------------------------------------------------------------------------------------- outputs


def reference_embedding(ref: Reference, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' image embedding of ``pixels`` with its default attention, where the family keeps it."""
    where = VISION_FAMILIES[ref.family].embedding
    if where == "cls":
        return ref.default.base_model(pixel_values=pixels).last_hidden_state[:, 0].float()
    return getattr(ref.default(pixel_values=pixels), where).float()


@torch.no_grad()
def check_outputs(model: LoadedModel, ref: Reference) -> CheckResult:
    if _is_vlm(model):
        return _check_vlm_outputs(model, ref)
    from probe import vision

    pixels = _pixels(model)
    ours = vision.forward(model, pixels)
    problems = []
    want = reference_embedding(ref, pixels)
    if (d := _max_diff(ours.embedding.float(), want)) > KERNEL_ATOL:
        problems.append(f"embedding differs by {d:.2g}")
    logits = getattr(ref.default(pixel_values=pixels), "logits", None)
    if (logits is None) != (ours.logits is None):
        problems.append("logits present on one side only")
    elif (
        logits is not None
        and ours.logits is not None
        and (d := _max_diff(ours.logits.float(), logits.float())) > KERNEL_ATOL
    ):
        problems.append(f"logits differ by {d:.2g}")
    return CheckResult("fail", "; ".join(problems)) if problems else CheckResult("pass")


def _check_vlm_outputs(model: LoadedModel, ref: Reference) -> CheckResult:
    from probe import vlm
    from probe.hooks import attn_hook
    from probe.kernels import native_attention

    assert model.bridge is not None
    ids, pixels = _vlm_inputs(model)
    _, ours = _bridge_patterns(model, ids, pixels)
    want = ref.default(input_ids=ids, pixel_values=pixels).logits.float()
    problems = []
    if (d := _max_diff(ours, want)) > KERNEL_ATOL:
        problems.append(f"logits differ by {d:.2g}")
    eager: dict[int, torch.Tensor] = {}
    model.bridge.run_with_hooks(
        ids,
        pixel_values=pixels,
        fwd_hooks=[
            (attn_hook(layer, "z"), lambda z, hook, layer=layer: eager.__setitem__(layer, z.detach().clone()))
            for layer in range(model.n_layers)
        ],
    )
    with vlm.capture_head_outputs(model) as record, native_attention(model, "sdpa") as native:
        native(input_ids=ids, pixel_values=pixels)
    record.check_fired()
    worst = max(_max_diff(record.outputs[layer][0].float(), eager[layer].float()) for layer in eager)
    if len(eager) != model.n_layers or worst > KERNEL_ATOL:
        problems.append(f"head outputs under SDPA differ from hook_z by {worst:.2g}")
    return CheckResult("fail", "; ".join(problems)) if problems else CheckResult("pass")


# ------------------------------------------------------------------------------------------ batch


@torch.no_grad()
def check_batch(model: LoadedModel, ref: Reference) -> CheckResult:
    if _is_vlm(model):
        ids, pixels = _vlm_inputs(model, 2)
        together = _bridge_patterns(model, ids, pixels)
        singles = [_bridge_patterns(model, ids[i : i + 1], pixels[i : i + 1]) for i in range(2)]
        worst = 0.0
        for i, (patterns, logits) in enumerate(singles):
            worst = max(worst, _max_diff(together[1][i], logits[0]))
            worst = max(worst, *(_max_diff(together[0][layer][i], patterns[layer][0]) for layer in patterns))
        if worst > ATOL:
            return CheckResult("fail", f"batched results differ from single-image ones by {worst:.2g}")
        return CheckResult("pass")
    from probe import vision

    assert model.image is not None
    pixels = _pixels(model)

    def read(chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        key, grid = vision.KeyAttention(), vision.GridDistance(model.image)  # type: ignore[arg-type]
        cap = vision.capture(model, chunk, patterns="all", reducers=[key, grid], batch_size=len(chunk))
        out = {f"pattern {layer}": p for layer, p in cap.patterns.items()}
        out |= {"KeyAttention": key.result(), "GridDistance": grid.result(), "embedding": cap.embedding}
        if cap.logits is not None:
            out["logits"] = cap.logits
        return out

    both = read(pixels)
    alone = [read(pixels[i : i + 1]) for i in range(2)]
    bad = {}
    for name, value in both.items():
        d = max(_max_diff(value[i], alone[i][name][0]) for i in range(2))
        if d > ATOL:
            bad[name] = d
    if bad:
        return CheckResult("fail", ", ".join(f"{n} differs by {d:.2g}" for n, d in bad.items()))
    return CheckResult("pass")


# ---------------------------------------------------------------------------------- interventions


def _vision_state(model: LoadedModel, pixels: torch.Tensor) -> tuple[Any, ...]:
    from probe import vision

    modules = list(model.hf_model.modules())
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    params = {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}
    grads = [p.requires_grad for p in model.hf_model.parameters()]
    with torch.no_grad():
        embedding = vision.forward(model, pixels).embedding.float()
    return embedding, params, n_hooks, grads


def _vision_same(before: tuple[Any, ...], after: tuple[Any, ...]) -> str:
    if not torch.equal(before[0], after[0]):
        return "the embedding changed"
    if before[1].keys() != after[1].keys() or any(
        not torch.equal(before[1][k], after[1][k]) for k in before[1]
    ):
        return "a weight changed"
    if before[2] != after[2]:
        return f"{after[2] - before[2]} hooks were left registered"
    if before[3] != after[3]:
        return "a weight's requires_grad changed"
    return ""


def check_interventions(model: LoadedModel, ref: Reference) -> CheckResult:
    if _is_vlm(model):
        from probe.support import check_interventions as language_interventions

        return language_interventions(model, None)  # type: ignore[arg-type]  # it reads no reference
    from probe import vision

    pixels = _pixels(model, 1)
    means = vision.mean_head_outputs(model, _pixels(model, 2, seed=1))
    last = model.n_layers - 1

    makers: Mapping[str, Callable[[], Any]] = {
        "gate_heads scale": lambda: vision.gate_heads(model, {(0, 0): 0.0, (last, 1): 2.0}),
        "gate_heads zero": lambda: vision.gate_heads(
            model, [(0, 1), (last, 2)], query_mask=vision.region_mask(model, rows=[0], include_prefix=True)
        ),
        "gate_heads mean": lambda: vision.gate_heads(model, [(last, 0)], mode="mean", means=means),
        "gate_variables": lambda: _zeroed_gate(model),
    }
    before = _vision_state(model, pixels)
    for what, make in makers.items():
        for raise_inside in (False, True):
            try:
                with make():
                    with torch.no_grad():
                        inside = vision.forward(model, pixels).embedding.float()
                    if _max_diff(inside, before[0]) <= ATOL:
                        return CheckResult("fail", f"{what} did not change the embedding")
                    if raise_inside:
                        raise _Planted
            except _Planted:
                pass
            problem = _vision_same(before, _vision_state(model, pixels))
            if problem:
                when = "after an error in its block" if raise_inside else "after its block"
                return CheckResult("fail", f"{what}: {problem} {when}")
    return CheckResult("pass")


@contextmanager
def _zeroed_gate(model: LoadedModel) -> Iterator[torch.Tensor]:
    """probe.vision.gate_variables with the gate of head (0, 0) set to 0 by hand."""
    from probe import vision

    with vision.gate_variables(model) as gates:
        gates.data[0, 0] = 0.0
        yield gates


_MODEL_CHECKS: dict[str, ModelCheck] = {
    "patterns": check_patterns,
    "outputs": check_outputs,
    "batch": check_batch,
    "interventions": check_interventions,
}


def run_checks(
    directory: str | Path, family: str, more: Mapping[str, ModelCheck] | None = None
) -> dict[str, CheckResult]:
    """Every check of :data:`CHECKS` (then those of ``more``) on one checkpoint directory of ``family``."""
    import probe

    directory = Path(directory)
    names = [*CHECKS, *(more or {})]
    loaded: dict[str, LoadedModel] = {}
    kind = VISION_FAMILIES[family].kind

    def load() -> CheckResult:
        with quiet_transformers():
            loaded["model"] = probe.load_model(str(directory), device="cpu")
        model = loaded["model"]
        if model.source != "local" or model.kind != kind:
            return CheckResult(
                "fail",
                f"loaded as a {model.kind} model by the {model.source!r} source, not a local {kind} one",
            )
        return CheckResult("pass")

    results = {"load": _guard(load)}
    if "model" not in loaded:
        after = "load refused" if results["load"].status == "refused" else "load failed"
        return {
            name: results["load"] if name == "load" else CheckResult(results["load"].status, after)
            for name in names
        }
    ref = Reference(directory, family)
    model = loaded["model"]
    for name, check in {**_MODEL_CHECKS, **(more or {})}.items():
        results[name] = _guard(lambda check=check: check(model, ref))  # type: ignore[misc]
    return results


def family_results(
    family: str, root: str | Path, more: Mapping[str, ModelCheck] | None = None
) -> dict[str, CheckResult]:
    """Write ``family``'s tiny checkpoint under ``root`` and run every check on it."""
    from probe.vision_families import save_checkpoint

    with quiet_transformers():
        directory = save_checkpoint(family, Path(root) / family)
    return run_checks(directory, family, more)
