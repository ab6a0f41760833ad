"""Torch hooks on a vision model's modules, the checks every entry point makes, and query masks.

:class:`ModuleHooks` is the torch-module twin of :class:`probe.hooks.HookSet`: it counts every
call, removes exactly its own hooks on exit (also after an error) and can prove that every hook
fired. :func:`region_mask` and :func:`distance_band` pick query tokens of the patch grid.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from probe.errors import CaptureError, ConfigError
from probe.images import ImageInput, ImageSpec
from probe.model import LoadedModel


class ModuleHooks:
    """Forward hooks and pre-hooks added to a model's torch modules by name; removed by :meth:`remove`.

    The torch-module counterpart of :class:`probe.hooks.HookSet`: counts how often each hook fired,
    and removes exactly the hooks it added (other hooks on the same modules stay).
    """

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.added: list[str] = []
        self.fired: Counter[str] = Counter()

    def _module(self, name: str) -> torch.nn.Module:
        try:
            return self.model.hf_model.get_submodule(name)
        except AttributeError:
            raise CaptureError(f"module {name!r} does not exist in {self.model.name}") from None

    def forward(self, name: str, fn: Callable[[torch.nn.Module, tuple[Any, ...], Any], Any]) -> None:
        """Call ``fn(module, args, output)`` after ``name`` runs; a returned value replaces the output."""
        key = f"{name}:forward"

        def counted(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            self.fired[key] += 1
            return fn(module, args, output)

        self._handles.append(self._module(name).register_forward_hook(counted))
        self.added.append(key)

    def pre(self, name: str, fn: Callable[[torch.nn.Module, tuple[Any, ...]], Any]) -> None:
        """Call ``fn(module, args)`` before ``name`` runs; a returned tuple replaces the positional args."""
        key = f"{name}:pre"

        def counted(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
            self.fired[key] += 1
            return fn(module, args)

        self._handles.append(self._module(name).register_forward_pre_hook(counted))
        self.added.append(key)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def check_fired(self, times: int = 1) -> None:
        """Raise if a hook fired fewer than ``times`` times (each forward pass fires each hook once)."""
        silent = [k for k in dict.fromkeys(self.added) if self.fired[k] < times]
        if silent:
            raise CaptureError(
                f"hooks that did not fire {times} time(s): {', '.join(silent[:4])}{' …' if len(silent) > 4 else ''}; "
                "the model did not run these modules (wrong module layout, or a different forward path)"
            )


@contextmanager
def module_hooks(model: LoadedModel) -> Iterator[ModuleHooks]:
    """Context manager: yields a :class:`ModuleHooks`; every hook added in the block goes on exit."""
    _require_vision(model)
    hooks = ModuleHooks(model)
    try:
        yield hooks
    finally:
        hooks.remove()


def _require_vision(model: LoadedModel) -> None:
    if model.kind != "vision" or "modules" not in model.extra:
        raise ConfigError(
            f"{model.name} is a {model.kind} model; probe.vision works on vision models loaded with "
            "probe.load_model (e.g. clip-vit-b16, tiny-vit or a ViT/DeiT/CLIP/SigLIP/DINOv2 checkpoint directory)"
        )


def _image(model: LoadedModel) -> ImageSpec:
    _require_vision(model)
    assert model.image is not None
    return model.image


def _pixels(model: LoadedModel, images: ImageInput) -> torch.Tensor:
    pixels = _image(model).preprocess(images)
    return pixels.to(device=model.device, dtype=model.dtype)


def _query_mask(
    mask: torch.Tensor | None, batch: int, n_tokens: int, device: torch.device
) -> torch.Tensor | None:
    """``mask`` as bool ``[batch, T, 1, 1]`` (broadcast over heads and d_head); None = every query."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() not in (1, 2) or mask.shape[-1] != n_tokens:
        raise ConfigError(
            f"query_mask must be a bool tensor [T] or [batch, T] with T = {n_tokens}, got {mask.dtype} "
            f"{tuple(mask.shape)}; build one with probe.vision.region_mask or distance_band"
        )
    if mask.dim() == 2 and mask.shape[0] not in (1, batch):
        raise ConfigError(f"query_mask has {mask.shape[0]} rows but the batch has {batch} images")
    return mask.to(device).reshape(-1, n_tokens)[:, :, None, None]


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)


def _first_arg(args: tuple[Any, ...], where: str) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        raise CaptureError(
            f"{where} was called without a positional tensor; this transformers version differs"
        )
    return args[0]


def region_mask(
    model: LoadedModel,
    *,
    rows: Iterable[int] | None = None,
    cols: Iterable[int] | None = None,
    include_prefix: bool = False,
) -> torch.Tensor:
    """``[T]`` bool mask of the patches in the given grid rows and columns (default: all).

    Prefix tokens (CLS, distillation) are included only with ``include_prefix``. Use it as
    ``query_mask`` of :func:`gate_heads` to prune a head in one region of the image only.
    """
    spec = _image(model)
    n_rows, n_cols = spec.grid
    row_set = set(range(n_rows)) if rows is None else set(rows)
    col_set = set(range(n_cols)) if cols is None else set(cols)
    bad = [r for r in row_set if not 0 <= r < n_rows] + [c for c in col_set if not 0 <= c < n_cols]
    if bad:
        raise ConfigError(f"rows/cols {sorted(bad)} are outside the {n_rows}×{n_cols} patch grid")
    rc = spec.patch_rc()
    mask = torch.tensor([(int(r) in row_set and int(c) in col_set) for r, c in rc.tolist()])
    mask[: spec.n_prefix] = include_prefix
    return mask


def distance_band(
    model: LoadedModel,
    centre: tuple[float, float] | None = None,
    inner: float = 0.0,
    outer: float = math.inf,
    *,
    include_prefix: bool = False,
) -> torch.Tensor:
    """``[T]`` bool mask of patches whose centre lies at ``inner <= d < outer`` from ``centre``.

    Distances are Euclidean, in patch units, between patch centres; ``centre`` is a (row, col)
    grid coordinate (default: the middle of the grid, ``((rows-1)/2, (cols-1)/2)``).
    """
    spec = _image(model)
    if inner < 0 or outer <= inner:
        raise ConfigError(f"a distance band needs 0 <= inner < outer, got inner={inner}, outer={outer}")
    n_rows, n_cols = spec.grid
    cr, cc = centre if centre is not None else ((n_rows - 1) / 2, (n_cols - 1) / 2)
    rc = spec.patch_rc().float()
    d = torch.sqrt((rc[:, 0] - cr) ** 2 + (rc[:, 1] - cc) ** 2)
    mask = (d >= inner) & (d < outer)
    mask[: spec.n_prefix] = include_prefix
    return mask
