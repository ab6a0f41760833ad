"""VHR: the choice of the vision-aware heads at the first generation step, layer by layer in one
forward, and the scales that reinforce them while generating.

See docs/analyses/vhd.md for the rule and how one forward makes the layer-by-layer choice exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from analyses.vhd.config import VhrSetting, parse_layers
from analyses.vhd.forward import Rows, forward_rows, o_proj_hooks
from probe.errors import CaptureError, ConfigError
from probe.loading import LoadedModel


@dataclass
class Selection:
    """What :func:`select_heads` decided for a batch: ``scales [B, layers, heads]`` (alpha or 1),
    ``selected``/``outlier`` masks and the first-step ``vhd``/``text_norm`` it decided on."""

    scales: torch.Tensor
    selected: torch.Tensor
    outlier: torch.Tensor
    vhd: torch.Tensor
    text_norm: torch.Tensor


def _decide(
    vhd: torch.Tensor, norm: torch.Tensor, outlier_removal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``[B, heads]``: outliers (VHD and norm both above mean + std) and selected heads
    (VHD, outliers set to 0, above the median)."""
    if outlier_removal:
        high_v = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, correction=0, keepdim=True)
        high_n = norm > norm.mean(-1, keepdim=True) + norm.std(-1, correction=0, keepdim=True)
        outlier = high_v & high_n
    else:
        outlier = torch.zeros_like(vhd, dtype=torch.bool)
    kept = torch.where(outlier, torch.zeros_like(vhd), vhd)
    median = torch.quantile(kept, 0.5, dim=-1, keepdim=True)
    return kept > median, outlier


def select_heads(model: LoadedModel, rows: Rows, setting: VhrSetting, *, seed: int = 0) -> Selection:
    """VHR's head choice at the first generation step, layer by layer, in one forward (see
    docs/analyses/vhd.md): returns the per-row scales to apply while generating."""
    b = rows.n_image_rows
    if rows.ids.shape[0] != 2 * b:
        raise ConfigError(
            "select_heads needs image rows and their text-only twins (make_rows(text_twin=True))"
        )
    layers = set(parse_layers(setting.layers, model.n_layers))
    shape = (b, model.n_layers, model.n_heads)
    scales = torch.ones(shape)
    selected = torch.zeros(shape, dtype=torch.bool)
    outlier = torch.zeros(shape, dtype=torch.bool)
    vhd_first = torch.full(shape, math.nan)
    norm_first = torch.full(shape, math.nan)
    generator = torch.Generator().manual_seed(seed)
    last = rows.width - 1

    def hook_for(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            z = args[0]
            heads = z.reshape(*z.shape[:-1], model.n_heads, -1)
            at = heads[:, last].float()
            vhd = torch.linalg.vector_norm(at[:b] - at[b:], dim=-1).cpu()
            norm = torch.linalg.vector_norm(at[b:], dim=-1).cpu()
            vhd_first[:, layer], norm_first[:, layer] = vhd, norm
            if layer not in layers:
                return None
            chosen, out = _decide(vhd, norm, setting.outlier_removal)
            if setting.random:  # the control: as many heads, drawn uniformly
                keys = torch.rand(b, model.n_heads, generator=generator)
                ranks = keys.argsort(-1).argsort(-1)
                chosen = ranks < chosen.sum(-1, keepdim=True)
            selected[:, layer], outlier[:, layer] = chosen, out
            factor = torch.where(chosen, torch.tensor(setting.alpha), torch.tensor(1.0))
            scales[:, layer] = factor
            both = torch.cat([factor, factor]).to(z.device, z.dtype)
            return ((heads * both[:, None, :, None]).reshape(z.shape), *args[1:])

        return hook

    with o_proj_hooks(model, hook_for):
        forward_rows(model, rows)
    if bool(torch.isnan(vhd_first).any()):
        raise CaptureError("some o_proj hooks never fired during the VHR selection pass")
    return Selection(scales, selected, outlier, vhd_first, norm_first)
