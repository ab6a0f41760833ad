"""Head gates on vision models: scale, zero or mean-replace a head's output, and its importance.

Edits act on a head's output before the output projection, optionally only at some query tokens.
See docs/interventions.md (vision head gates).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch

from probe.errors import ConfigError
from probe.heads import selection_by_layer
from probe.images import ImageInput
from probe.model import LoadedModel
from probe.types import Head
from probe.vision.forward import VisionOutput, _run, _starts, forward
from probe.vision.hooks import (
    ModuleHooks,
    _first_arg,
    _pixels,
    _query_mask,
    _require_vision,
    _split_heads,
    module_hooks,
)

GateMode = Literal["scale", "zero", "mean"]


def _check_means(
    model: LoadedModel, grouped: Mapping[int, list[int]], means: Mapping[int, torch.Tensor] | None
) -> None:
    if means is None:
        raise ConfigError(
            "mode='mean' needs means={layer: tensor}; compute them with probe.vision.mean_head_outputs"
        )
    for layer in grouped:
        m = means.get(layer)
        shapes = ((model.n_heads, model.d_head), (model.n_ctx, model.n_heads, model.d_head))
        if not isinstance(m, torch.Tensor) or tuple(m.shape) not in shapes:
            raise ConfigError(
                f"means[{layer}] must be a tensor [heads, d_head] or [T, heads, d_head] "
                f"({shapes[0]} or {shapes[1]}), got {None if m is None else tuple(m.shape)}; "
                "see probe.vision.mean_head_outputs"
            )


def gate_heads(
    model: LoadedModel,
    heads: Mapping[Head, float] | Iterable[Head],
    *,
    mode: GateMode | None = None,
    means: Mapping[int, torch.Tensor] | None = None,
    query_mask: torch.Tensor | None = None,
) -> contextlib.AbstractContextManager[ModuleHooks]:
    """Context manager: scale, zero or mean-replace chosen heads' outputs while the block runs.

    ``heads`` is ``{(layer, head): factor}`` (mode ``"scale"``, the default for a mapping) or a
    list of heads (mode ``"zero"``, the default, or ``"mean"`` with ``means`` from
    :func:`mean_head_outputs`). The edit acts on the head's output ``z_h`` before the output
    projection, so zeroing removes exactly the head's term ``z_h W_O,hᵀ`` from the residual stream
    (the output projection's bias stays). ``query_mask`` (bool ``[T]`` or ``[batch, T]``, see
    :func:`region_mask`, :func:`distance_band`) limits the edit to those query tokens. The model is
    unchanged after the block, also after an error.
    """
    _require_vision(model)
    if isinstance(heads, Mapping):
        mode = mode or "scale"
        if mode != "scale":
            raise ConfigError(
                f"a {{head: factor}} mapping means mode='scale'; for mode={mode!r} pass a list of heads"
            )
        factors: dict[Head, float] = {}
        for head, value in heads.items():
            try:
                factor = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"the factor of head {head} must be a number, got {value!r}") from None
            if not math.isfinite(factor):
                raise ConfigError(f"the factor of head {head} must be finite, got {factor}")
            factors[head] = factor
        grouped = selection_by_layer(model, factors)
    else:
        mode = mode or "zero"
        if mode not in ("zero", "mean"):
            raise ConfigError(f"mode must be 'scale', 'zero' or 'mean', got {mode!r}")
        factors = {}
        grouped = selection_by_layer(model, heads)
    if mode == "mean":
        _check_means(model, grouped, means)
    names = model.extra["modules"]["out_proj"]
    n_heads, n_tokens = model.n_heads, model.n_ctx

    def make(layer: int, indices: list[int]) -> Callable[[torch.nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = _first_arg(args, names[layer])
            z = _split_heads(x, n_heads)
            where = _query_mask(query_mask, z.shape[0], n_tokens, z.device)
            if mode == "scale":
                f = torch.ones(n_heads, dtype=z.dtype, device=z.device)
                for index in indices:
                    f[index] = factors[(layer, index)]
                new = z * f[:, None]
            elif mode == "zero":
                keep = torch.ones(n_heads, dtype=z.dtype, device=z.device)
                keep[indices] = 0
                new = z * keep[:, None]
            else:
                assert means is not None
                m = means[layer].to(device=z.device, dtype=z.dtype)
                chosen = torch.zeros(n_heads, dtype=torch.bool, device=z.device)
                chosen[indices] = True
                new = torch.where(chosen[:, None], m.expand_as(z), z)
            if where is not None:
                new = torch.where(where, new, z)
            return (new.reshape(x.shape), *args[1:])

        return hook

    @contextmanager
    def manager() -> Iterator[ModuleHooks]:
        with module_hooks(model) as hooks:
            for layer, indices in grouped.items():
                hooks.pre(names[layer], make(layer, indices))
            yield hooks

    return manager()


@contextmanager
def gate_variables(
    model: LoadedModel,
    *,
    batch: int | None = None,
    query_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield differentiable gates, all 1: ``[n_layers, n_heads]``, or ``[batch, n_layers, n_heads]``.

    While the block runs, every head's output is multiplied by its gate (only at ``query_mask``
    tokens if given), so ``loss.backward()`` leaves ``∂loss/∂gate`` in ``gates.grad``. With
    ``batch`` each image has its own gates, so one backward pass of a summed per-image loss gives
    per-image gradients. Gates can also be set (``gates.data[l, h] = 0``) to prune by hand.
    """
    _require_vision(model)
    shape = (model.n_layers, model.n_heads) if batch is None else (batch, model.n_layers, model.n_heads)
    gates = torch.ones(shape, device=model.device, dtype=torch.float32, requires_grad=True)
    names = model.extra["modules"]["out_proj"]

    def make(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = _split_heads(_first_arg(args, names[layer]), model.n_heads)
            if batch is None:
                g = gates[layer][None, None, :, None]
            else:
                if x.shape[0] != batch:
                    raise ConfigError(
                        f"gates were made for batch={batch} but the forward has {x.shape[0]} images"
                    )
                g = gates[:, layer][:, None, :, None]
            g = g.to(x.dtype)
            where = _query_mask(query_mask, x.shape[0], model.n_ctx, x.device)
            new = x * g if where is None else torch.where(where, x * g, x)
            return (new.reshape(*x.shape[:-2], -1), *args[1:])

        return hook

    with module_hooks(model) as hooks:
        for layer in range(model.n_layers):
            hooks.pre(names[layer], make(layer))
        yield gates


def gate_importance(
    model: LoadedModel,
    images: ImageInput,
    loss_fn: Callable[[VisionOutput], torch.Tensor],
    *,
    batch_size: int = 8,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image gradients ``∂loss/∂gate`` at gates = 1: ``[N, n_layers, n_heads]`` (float32, CPU).

    ``loss_fn`` maps the model's :class:`VisionOutput` to one loss per image ``[N]`` (e.g. the
    negative log-probability of the label, or the embedding's cosine to a target). Michel et al.'s
    importance of head ``h`` is ``result.abs().mean(0)``: the first-order change of the loss when
    the head is removed.
    """
    pixels = _pixels(model, images)
    grads = []
    for start in _starts(pixels, batch_size):
        chunk = pixels[start : start + batch_size]
        with torch.enable_grad(), gate_variables(model, batch=chunk.shape[0], query_mask=query_mask) as gates:
            losses = loss_fn(forward(model, chunk))
            if losses.dim() != 1 or losses.shape[0] != chunk.shape[0]:
                raise ConfigError(
                    f"loss_fn must return one loss per image, shape [{chunk.shape[0]}], got {tuple(losses.shape)}"
                )
            (grad,) = torch.autograd.grad(losses.sum(), gates)
        grads.append(grad.detach().float().cpu())
    return torch.cat(grads)


@torch.no_grad()
def mean_head_outputs(
    model: LoadedModel, images: ImageInput, *, per_token: bool = True, batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """Mean head outputs over reference images: ``{layer: [T, heads, d_head]}`` (or ``[heads, d_head]``).

    The reference for mean-ablation (:func:`gate_heads` with ``mode="mean"``): replacing a head's
    output by its mean keeps the average signal it sends and removes what depends on the image.
    ``per_token`` keeps one mean per token position (CLS and each patch differ); otherwise one
    mean over all tokens. Accumulated in the hook, so memory does not grow with the image count.
    """
    pixels = _pixels(model, images)
    names = model.extra["modules"]["out_proj"]
    sums = {
        layer: torch.zeros(model.n_ctx, model.n_heads, model.d_head, dtype=torch.float64, device=model.device)
        for layer in range(model.n_layers)
    }

    def make(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            z = _split_heads(_first_arg(args, names[layer]), model.n_heads)
            sums[layer] += z.double().sum(0)

        return hook

    starts = _starts(pixels, batch_size)
    with module_hooks(model) as hooks:
        for layer in range(model.n_layers):
            hooks.pre(names[layer], make(layer))
        for start in starts:
            _run(model, pixels[start : start + batch_size], hooks)
        hooks.check_fired(times=len(starts))
    n = pixels.shape[0]
    means = {layer: (s / n).to(model.dtype) for layer, s in sums.items()}
    if not per_token:
        means = {layer: m.mean(0) for layer, m in means.items()}
    return means
