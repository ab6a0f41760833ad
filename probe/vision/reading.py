"""Reading a vision model: attention patterns, head outputs, residual norms and image reducers.

:func:`capture` keeps only the heads asked for, or hands every layer's rows to reducers
(:class:`KeyAttention` and :class:`GridDistance` respect that every query sees every key).
See docs/capture.md (vision models).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from probe.errors import CaptureError, ConfigError
from probe.heads import selection_by_layer
from probe.images import ImageInput, ImageSpec
from probe.model import LoadedModel
from probe.reducers import BatchInfo, PatternReducer, _SumCount
from probe.types import HeadSelection
from probe.vision.forward import _run, _starts
from probe.vision.hooks import _first_arg, _image, _pixels, _split_heads, module_hooks
from probe.vision.load import check_eager


@dataclass
class VisionCapture:
    """What :func:`capture` read. Tensors are float32 on the CPU, one row per image."""

    embedding: torch.Tensor  # [N, d_embed]
    logits: torch.Tensor | None  # [N, n_labels] or None
    patterns: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, k, T, T]
    pattern_heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> the k heads, in order
    head_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, T, k, d_head]
    output_heads: dict[int, list[int]] = field(default_factory=dict)
    resid_norms: torch.Tensor | None = None  # [N, n_layers + 1, T]: block 0's input, then each block's output

    def pattern(self, layer: int, head: int) -> torch.Tensor:
        """``[N, T, T]`` pattern of one captured head."""
        if layer not in self.patterns or head not in self.pattern_heads[layer]:
            raise ConfigError(f"head ({layer}, {head}) was not captured; pass it in patterns=")
        return self.patterns[layer][:, self.pattern_heads[layer].index(head)]

    def head_output(self, layer: int, head: int) -> torch.Tensor:
        """``[N, T, d_head]`` output (before the output projection) of one captured head."""
        if layer not in self.head_outputs or head not in self.output_heads[layer]:
            raise ConfigError(f"head ({layer}, {head}) was not captured; pass it in head_outputs=")
        return self.head_outputs[layer][:, :, self.output_heads[layer].index(head)]


def capture(
    model: LoadedModel,
    images: ImageInput,
    *,
    patterns: HeadSelection | None = None,
    head_outputs: HeadSelection | None = None,
    reducers: Sequence[PatternReducer] = (),
    residual: bool = False,
    batch_size: int = 16,
) -> VisionCapture:
    """Run ``model`` over images and read what is asked, with hooks that are gone afterwards.

    ``patterns`` / ``head_outputs``: ``(layer, head)`` pairs or ``"all"``; only those heads are kept
    (full ``[T, T]`` patterns cost ``4·T²`` bytes per head and image: 155 kB for ViT-B/16).
    ``reducers`` see every layer's post-softmax rows ``[batch, heads, T, T]`` in the hook and keep
    only their accumulators. ``residual`` records token norms of the residual stream. Raises
    :class:`CaptureError` if attention is not eager, returns no weights, or a hook did not fire.
    Interventions active around the call apply (a capture inside :func:`gate_heads` sees the
    gated model).
    """
    spec = _image(model)
    check_eager(model)
    pixels = _pixels(model, images)
    want_patterns = selection_by_layer(model, patterns)
    want_outputs = selection_by_layer(model, head_outputs)
    names = model.extra["modules"]
    pattern_layers = sorted(set(want_patterns) | (set(range(model.n_layers)) if reducers else set()))
    store_p: dict[int, list[torch.Tensor]] = {layer: [] for layer in want_patterns}
    store_z: dict[int, list[torch.Tensor]] = {layer: [] for layer in want_outputs}
    norms: list[list[torch.Tensor]] = []
    embeddings: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []

    def pattern_hook(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor):
                raise CaptureError(
                    f"layer {layer} of {model.name} returned no attention weights: a fused kernel ran. "
                    "Load the model with probe.load_model, which forces eager attention"
                )
            rows = weights.detach().float()
            if layer in store_p:
                store_p[layer].append(rows[:, want_patterns[layer]].cpu())
            for reducer in reducers:
                reducer.update(layer, rows, 0)

        return hook

    def output_hook(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            z = _split_heads(_first_arg(args, names["out_proj"][layer]), model.n_heads)
            store_z[layer].append(z[:, :, want_outputs[layer]].detach().float().cpu())

        return hook

    def resid_in(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        norms.append([_first_arg(args, names["layers"][0]).detach().float().norm(dim=-1).cpu()])

    def resid_out(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        norms[-1].append(hidden.detach().float().norm(dim=-1).cpu())

    starts = _starts(pixels, batch_size)
    with torch.no_grad(), module_hooks(model) as hooks:
        for layer in pattern_layers:
            hooks.forward(names["attention"][layer], pattern_hook(layer))
        for layer in want_outputs:
            hooks.pre(names["out_proj"][layer], output_hook(layer))
        if residual:
            hooks.pre(names["layers"][0], resid_in)
            for layer_name in names["layers"]:
                hooks.forward(layer_name, resid_out)
        for start in starts:
            chunk = pixels[start : start + batch_size]
            info = BatchInfo(
                lengths=torch.full((chunk.shape[0],), spec.n_tokens, dtype=torch.long, device=model.device),
                pad_offsets=torch.zeros(chunk.shape[0], dtype=torch.long, device=model.device),
                T=spec.n_tokens,
                n_layers=model.n_layers,
                n_heads=model.n_heads,
            )
            for reducer in reducers:
                reducer.begin_batch(info)
            out = _run(model, chunk, hooks)
            for reducer in reducers:
                reducer.end_batch()
            embeddings.append(out.embedding.float().cpu())
            if out.logits is not None:
                logits.append(out.logits.float().cpu())
        hooks.check_fired(times=len(starts))
    return VisionCapture(
        embedding=torch.cat(embeddings),
        logits=torch.cat(logits) if logits else None,
        patterns={layer: torch.cat(v) for layer, v in store_p.items()},
        pattern_heads=want_patterns,
        head_outputs={layer: torch.cat(v) for layer, v in store_z.items()},
        output_heads=want_outputs,
        resid_norms=torch.cat([torch.stack(n, dim=1) for n in norms]) if residual else None,
    )


def residual_norms(model: LoadedModel, images: ImageInput, *, batch_size: int = 16) -> torch.Tensor:
    """``[N, n_layers + 1, T]`` L2 norm of every token of the residual stream.

    Index 0 is the input of the first block (for CLIP: after its pre-norm), index ``l + 1`` the
    output of block ``l``. Tokens whose norm stands far above the median (the "artifact" or
    "register" tokens) show up in the middle and late layers of large ViTs.
    """
    out = capture(model, images, residual=True, batch_size=batch_size).resid_norms
    assert out is not None
    return out


# ============================================================================== reducers for images


class KeyAttention(PatternReducer):
    """Mean attention each key receives, averaged over all queries: ``[n_images, L, H, T]``.

    Attention in a ViT is bidirectional, so every query sees every key and the mean is over all
    ``T`` queries (:class:`probe.reducers.ColumnImportance` divides by the causal ``T - k`` and
    does not apply). A token that soaks up attention (CLS, an artifact token) has a large value.
    """

    name = "key_attention"

    def _start(self, info: BatchInfo) -> None:
        self.colsum = torch.zeros(
            info.n_layers, info.batch_size, info.n_heads, info.T, device=info.lengths.device
        )
        self.queries = torch.zeros(info.n_layers, device=info.lengths.device)

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        self.colsum[layer] += rows.float().sum(dim=2)
        self.queries[layer] += rows.shape[2]

    def _finish(self, info: BatchInfo) -> torch.Tensor:
        mean = self.colsum / self.queries.clamp_min(1)[:, None, None, None]
        mean[self.queries == 0] = float("nan")
        return mean.permute(1, 0, 2, 3)

    def state_bytes(self, batch: int, T: int, n_layers: int, n_heads: int) -> int:
        return 4 * n_layers * batch * n_heads * T


class GridDistance(_SumCount):
    """Mean attention distance in pixels (Dosovitskiy et al.): ``[n_images, L, H]``.

    For each patch query, ``Σ_k A[q,k]·‖p_q − p_k‖ / Σ_k A[q,k]`` over patch keys ``k`` (prefix
    keys left out and the row renormalised over patches), with ``p`` the patch centres in pixels;
    averaged over patch queries. Small = local head, large = global head.
    """

    name = "grid_distance"

    def __init__(self, image: ImageSpec) -> None:
        super().__init__()
        self.image = image
        rc = image.patch_rc()[image.n_prefix :].float() * image.patch_size
        self.distances = torch.cdist(rc, rc)  # [P, P] pixels

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        assert self.info is not None
        p = self.image.n_prefix
        if q_start != 0 or rows.shape[2] != self.image.n_tokens:
            raise CaptureError("GridDistance needs every query row of a layer at once")
        patch = rows[:, :, p:, p:].float()  # [b, h, P, P]
        dist = self.distances.to(patch.device)
        per_query = (patch * dist).sum(-1) / patch.sum(-1).clamp_min(1e-12)  # [b, h, P]
        mask = torch.ones(rows.shape[0], per_query.shape[-1], device=rows.device)
        self._add(layer, per_query, mask)
