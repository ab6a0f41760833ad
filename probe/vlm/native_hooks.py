"""Per-head outputs of the language model read with torch pre-hooks on the native modules.

They work under SDPA and with a KV cache (inside :func:`probe.vlm.generate`); see docs/capture.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from probe.errors import CaptureError, ConfigError
from probe.model import LoadedModel
from probe.vlm.assembly import LAYOUT
from probe.vlm.wrap import _require_vlm


@dataclass
class HeadOutputs:
    """Per-head outputs before ``o_proj`` recorded by :func:`capture_head_outputs`.

    ``outputs[layer]`` lists one tensor ``[batch, T, heads, d_head]`` per forward pass of the native
    model in the block (generation: the prompt, then one ``T = 1`` step per new token), on the CPU.
    """

    layers: list[int]
    n_heads: int
    outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    fired: dict[int, int] = field(default_factory=dict)

    def check_fired(self) -> None:
        silent = [layer for layer in self.layers if not self.fired.get(layer)]
        if silent:
            raise CaptureError(
                f"o_proj hooks of layers {silent[:6]} never fired; the native model did not run them"
            )


@contextmanager
def capture_head_outputs(
    model: LoadedModel, layers: Sequence[int] | None = None, *, keep: bool = True
) -> Iterator[HeadOutputs]:
    """Record the language model's per-head outputs (``o_proj`` inputs) at every native forward in the block.

    Torch pre-hooks on the native modules, so this works under SDPA and with a KV cache (inside
    :func:`generate`); the bridge's ``blocks.{l}.attn.hook_z`` gives the same tensors on eager runs.
    Hooks are removed on exit, also after an error; ``keep=False`` only counts calls.
    """
    _require_vlm(model)
    native = model.native_model
    assert native is not None
    chosen = list(range(model.n_layers)) if layers is None else [int(x) for x in layers]
    bad = [layer for layer in chosen if not 0 <= layer < model.n_layers]
    if bad:
        raise ConfigError(f"layers {bad} do not exist; {model.name} has layers 0 to {model.n_layers - 1}")
    record = HeadOutputs(layers=chosen, n_heads=model.n_heads, outputs={layer: [] for layer in chosen})
    handles = []

    def make(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            record.fired[layer] = record.fired.get(layer, 0) + 1
            if keep:
                z = args[0].detach()
                record.outputs[layer].append(z.reshape(*z.shape[:-1], model.n_heads, -1).to("cpu"))

        return hook

    try:
        for layer in chosen:
            module = native.get_submodule(LAYOUT.block(layer, LAYOUT.out_proj))
            handles.append(module.register_forward_pre_hook(make(layer)))
        yield record
    finally:
        for handle in handles:
            handle.remove()
