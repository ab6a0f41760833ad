"""Registering hooks on a model and always removing them.

:class:`HookSet` is the one place where probe attaches functions to a model's hook points: it
counts how often each hook fired (so a capture can prove that every hook it asked for ran) and
removes exactly the hooks it added on exit, also after an exception, leaving any other hooks alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from probe.errors import CaptureError
from probe.model import LoadedModel

HookFn = Callable[[torch.Tensor, Any], torch.Tensor | None]


class HookSet:
    """Hooks added by name to a model's TransformerBridge hook points; removed by :meth:`remove`."""

    def __init__(self, model: LoadedModel) -> None:
        if model.bridge is None:
            raise CaptureError(f"{model.name} is not wrapped by a TransformerBridge; use its torch hooks")
        self.model = model
        self._points = model.bridge.hook_dict
        self._handles: list[Any] = []
        self.added: list[str] = []
        self.fired: Counter[str] = Counter()

    def add(self, name: str, fn: HookFn, *, prepend: bool = False) -> None:
        """Call ``fn(activation, hook)`` at hook point ``name``; a returned tensor replaces the activation."""
        point = self._points.get(name)
        if point is None:
            raise CaptureError(
                f"hook point {name!r} does not exist on {self.model.name}; "
                f"names look like 'blocks.0.attn.hook_pattern' (see model.bridge.hook_dict)"
            )

        def counted(activation: torch.Tensor, hook: Any) -> torch.Tensor | None:
            self.fired[name] += 1
            return fn(activation, hook)

        self._handles.append((point, point.add_hook(counted, prepend=prepend)))  # type: ignore[arg-type]
        self.added.append(name)

    def remove(self) -> None:
        while self._handles:
            point, handle = self._handles.pop()
            handle.hook.remove()
            # The hook point also lists its handles (has_hooks() reads that list): drop ours.
            registry = getattr(point, "fwd_hooks", None)
            if registry is not None and handle in registry:
                registry.remove(handle)

    def check_fired(self, names: list[str] | None = None) -> None:
        """Raise if any of ``names`` (default: every hook added) never fired."""
        wanted = names if names is not None else list(dict.fromkeys(self.added))
        silent = [n for n in wanted if self.fired[n] == 0]
        if silent:
            raise CaptureError(
                f"hooks that never fired: {', '.join(silent[:6])}{' …' if len(silent) > 6 else ''}; "
                "the model did not run these modules (a fused kernel, or the wrong model path)"
            )


@contextmanager
def hooks(model: LoadedModel, fwd_hooks: Sequence[tuple[str, HookFn]] = ()) -> Iterator[HookSet]:
    """Context manager: add ``fwd_hooks`` (and whatever the block adds to the yielded set); remove all on exit."""
    hook_set = HookSet(model)
    try:
        for name, fn in fwd_hooks:
            hook_set.add(name, fn)
        yield hook_set
    finally:
        hook_set.remove()


def attn_hook(layer: int, what: str) -> str:
    """Name of an attention hook point: ``what`` in pattern, attn_scores, z, q, k, v, rot_q, rot_k."""
    return f"blocks.{layer}.attn.hook_{what}"
