"""Interventions: reversible edits of what attention heads compute, as context managers.

Pattern edits (:func:`edit_pattern`, :func:`uniform_attention`) change where a head looks; head
scaling (:func:`scale_heads`) multiplies its output; activation patching (:func:`patch_activation`
with :func:`cache_activations`) and path patching (:func:`freeze_heads` with :func:`cache_z`)
replace activations by those of another run. Every intervention adds hooks on entry and removes
them on exit, also after an error, and never changes a weight; arguments are checked before any
hook is added. ``(layer, head)`` always means a query head.

See docs/interventions.md.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch

from probe.errors import ConfigError
from probe.heads import by_layer as _by_layer
from probe.heads import check_head as _check_head
from probe.heads import check_int as _check_int
from probe.hooks import HookFn, HookSet, attn_hook, hooks
from probe.model import LoadedModel
from probe.types import Head

PatternEdit = Callable[[torch.Tensor], torch.Tensor]
"""Maps one head's post-softmax pattern ``[batch, T_q, T_k]`` to a tensor of the same shape."""
Positions = Sequence[int] | torch.Tensor
"""Sequence positions: ints (negative counts from the end, the same for every row; with left
padding ``-1`` is every row's last real token), a 1-D integer tensor, or a bool mask ``[batch, T]``
(or ``[T]``) that may differ per row."""

__all__ = [
    "Head",
    "PatternEdit",
    "Positions",
    "allowed_keys",
    "cache_activations",
    "cache_z",
    "compose",
    "edit_pattern",
    "freeze_heads",
    "patch_activation",
    "scale_heads",
    "uniform_attention",
]


# ------------------------------------------------------------------------------------ validation


def _bridge_points(model: LoadedModel) -> Mapping[str, Any]:
    if model.bridge is None:
        raise ConfigError(
            f"{model.name} is not wrapped by a TransformerBridge; interventions need a language model "
            "loaded with probe.load_model"
        )
    return model.bridge.hook_dict


_PATTERN_POINT = re.compile(r"attn\.hook_pattern$")


def _check_pattern_edits(model: LoadedModel, who: str) -> None:
    """Refuse ``who`` on a bridge whose attention-pattern hook reports the pattern without computing
    the output from it (GPT-J's and OPT's: they hand on transformers' attention weights, used by
    nothing after the hook), where an edit would silently change nothing. Asked once per model: a
    forward of six tokens with layer 0's pattern halved must change the logits."""
    bridge: Any = model.bridge
    live = getattr(bridge, "_headlab_pattern_live", None)
    if live is None:
        live = _pattern_edits_act(model)
        object.__setattr__(bridge, "_headlab_pattern_live", live)
    if not live:
        raise ConfigError(
            f"{model.family or model.name}'s TransformerBridge reports attention patterns at hook_pattern but "
            f"computes the attention output without them, so {who} would change nothing; edit the heads' "
            "outputs instead (scale_heads, freeze_heads, or patch_activation at blocks.L.attn.hook_z)"
        )


@torch.no_grad()
def _pattern_edits_act(model: LoadedModel) -> bool:
    bridge: Any = model.bridge
    ids = (torch.arange(3, 9, device=model.device) % len(model.tokenizer))[None]
    base = bridge(ids)

    def halve(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
        return pattern * 0.5

    with warnings.catch_warnings():  # the bridge may warn that it discards the edit: asked here
        warnings.simplefilter("ignore", UserWarning)
        edited = bridge.run_with_hooks(ids, fwd_hooks=[(attn_hook(0, "pattern"), halve)])
    return not torch.equal(edited, base)


def _check_positions(positions: Positions | None, what: str) -> Positions | None:
    """Check the kind of ``positions`` now; their range is checked against each input's length."""
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor):
        if positions.dtype == torch.bool:
            if positions.dim() not in (1, 2):
                raise ConfigError(
                    f"{what} as a bool mask must be [T] or [batch, T], got {tuple(positions.shape)}"
                )
            return positions
        if positions.is_floating_point() or positions.is_complex() or positions.dim() > 1:
            raise ConfigError(
                f"{what} must be integer indices or a bool mask, got {positions.dtype} {tuple(positions.shape)}"
            )
        return positions.flatten()
    if isinstance(positions, str | bytes) or not isinstance(positions, Sequence):
        raise ConfigError(
            f"{what} must be a sequence of ints, an integer tensor or a bool mask, got {positions!r}"
        )
    return [_check_int(p, f"each of {what}") for p in positions]


def _position_mask(
    positions: Positions | None, batch: int, length: int, device: torch.device, what: str
) -> torch.Tensor | None:
    """``positions`` as a bool mask ``[batch, length]``; None means every position."""
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.shape[-1] != length or (positions.dim() == 2 and positions.shape[0] not in (1, batch)):
            raise ConfigError(
                f"{what} mask has shape {tuple(positions.shape)} but the input is [{batch}, {length}]; "
                "give a mask of the input's shape"
            )
        return positions.to(device).reshape(-1, length).expand(batch, length)
    index = torch.as_tensor(positions, dtype=torch.long).flatten()
    if index.numel() and bool(((index < -length) | (index >= length)).any()):
        raise ConfigError(
            f"{what} {index.tolist()} are out of range for a sequence of {length} tokens; "
            f"use positions in -{length}..{length - 1}"
        )
    mask = torch.zeros(length, dtype=torch.bool)
    mask[index % length] = True
    return mask.to(device).expand(batch, length)


def _check_name(model: LoadedModel, name: str) -> None:
    points = _bridge_points(model)
    if name not in points:
        raise ConfigError(
            f"hook point {name!r} does not exist on {model.name}; names look like "
            "'blocks.0.hook_resid_pre' or 'blocks.0.attn.hook_z' (see model.bridge.hook_dict)"
        )


# Per-head hook points: name suffix -> (head axis, sequence axis, heads are KV heads).
_PER_HEAD = {
    "hook_pattern": (1, 2, False),
    "hook_attn_scores": (1, 2, False),
    "hook_z": (2, 1, False),
    "o.hook_in": (2, 1, False),  # the same hook point as hook_z
    "hook_result": (2, 1, False),
    "hook_q": (2, 1, False),
    "hook_rot_q": (2, 1, False),
    "hook_k": (2, 1, True),
    "hook_v": (2, 1, True),
    "hook_rot_k": (2, 1, True),
}
_ATTN_NAME = re.compile(r"^blocks\.\d+\.attn\.(.+)$")


def _axes(
    model: LoadedModel, name: str, heads: Sequence[int] | None
) -> tuple[int, int | None, list[int] | None]:
    """(sequence axis, head axis, checked heads) of hook point ``name``."""
    match = _ATTN_NAME.match(name)
    suffix = match.group(1) if match else None
    spec = _PER_HEAD.get(suffix) if suffix is not None else None
    if heads is None:
        return (spec[1] if spec else 1), None, None
    if spec is None:
        raise ConfigError(
            f"heads= only applies to per-head hook points (blocks.L.attn.hook_z, hook_pattern, hook_q, "
            f"hook_k, hook_v, ...), not {name!r}; leave heads out or patch blocks.L.attn.hook_z"
        )
    head_axis, seq_axis, kv = spec
    count = model.n_kv_heads if kv else model.n_heads
    if isinstance(heads, str | bytes) or not isinstance(heads, Sequence):
        raise ConfigError(f"heads= must be a sequence of head indices of this layer, got {heads!r}")
    checked = [_check_int(h, "a head index") for h in heads]
    bad = [h for h in checked if not 0 <= h < count]
    if bad:
        kind = "KV heads" if kv else "heads"
        raise ConfigError(
            f"heads {bad} do not exist at {name} of {model.name}: its {kind} are 0..{count - 1}; "
            "pass head indices in that range"
        )
    return seq_axis, head_axis, sorted(set(checked))


def _patched(
    activation: torch.Tensor,
    source: torch.Tensor,
    *,
    seq_axis: int,
    head_axis: int | None,
    heads: list[int] | None,
    positions: Positions | None,
    name: str,
) -> torch.Tensor:
    """``activation`` with ``source`` written at the chosen positions and heads (a new tensor)."""
    src = source.to(device=activation.device, dtype=activation.dtype)
    try:
        shape = torch.broadcast_shapes(src.shape, activation.shape)
    except RuntimeError:
        shape = None
    if shape != activation.shape:
        raise ConfigError(
            f"the cached values for {name} have shape {tuple(source.shape)} but the activation has "
            f"{tuple(activation.shape)} on this input; cache them from an input of the same length "
            "(and the same batch size, or batch size 1)"
        )
    where = torch.ones((), dtype=torch.bool, device=activation.device)
    rows = _position_mask(
        positions, activation.shape[0], activation.shape[seq_axis], activation.device, "positions"
    )
    if rows is not None:
        view = [1] * activation.dim()
        view[0], view[seq_axis] = rows.shape
        where = where & rows.reshape(view)
    if heads is not None and head_axis is not None:
        chosen = torch.zeros(activation.shape[head_axis], dtype=torch.bool, device=activation.device)
        chosen[heads] = True
        view = [1] * activation.dim()
        view[head_axis] = chosen.numel()
        where = where & chosen.reshape(view)
    return torch.where(where, src, activation)


# ---------------------------------------------------------------------------------- interventions


def edit_pattern(
    model: LoadedModel,
    edits: Mapping[Head, PatternEdit],
    *,
    positions: Positions | None = None,
) -> AbstractContextManager[HookSet]:
    """Apply ``fn`` to the post-softmax pattern of each head ``(layer, head)`` in ``edits``.

    ``fn`` receives the head's pattern ``[batch, T_q, T_k]`` (a copy: it may edit in place) and
    returns a tensor of that shape; the rest of the forward pass (``pattern @ V``, the output
    projection, later layers) runs on it. Nothing is renormalised: an edit that should keep rows
    summing to 1 must do so itself. ``positions`` restricts the edit to those query rows (the other
    rows keep the model's values). Use it for targeted edits (drop the attention to the first token,
    move attention to a chosen key) without touching any weight.
    """
    _bridge_points(model)
    _check_pattern_edits(model, "edit_pattern")
    grouped: dict[int, list[tuple[int, PatternEdit]]] = {}
    for head, fn in edits.items():
        layer, index = _check_head(model, head)
        if not callable(fn):
            raise ConfigError(f"the edit for head ({layer}, {index}) must be a function, got {fn!r}")
        grouped.setdefault(layer, []).append((index, fn))
    rows_wanted = _check_positions(positions, "positions")

    def make(layer: int, layer_edits: list[tuple[int, PatternEdit]]) -> HookFn:
        def hook(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            batch, _, t_q, _ = pattern.shape
            rows = _position_mask(rows_wanted, batch, t_q, pattern.device, "positions")
            out = pattern.clone()
            for index, fn in layer_edits:
                new = fn(pattern[:, index].clone())
                if not isinstance(new, torch.Tensor) or new.shape != pattern[:, index].shape:
                    got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise ConfigError(
                        f"the pattern edit for head ({layer}, {index}) returned {got}; it must return a "
                        f"tensor of the pattern's shape {tuple(pattern[:, index].shape)} [batch, T_q, T_k]"
                    )
                new = new.to(pattern.dtype)
                out[:, index] = new if rows is None else torch.where(rows[:, :, None], new, pattern[:, index])
            return out

        return hook

    return hooks(model, [(attn_hook(layer, "pattern"), make(layer, e)) for layer, e in grouped.items()])


def scale_heads(model: LoadedModel, scales: Mapping[Head, float]) -> AbstractContextManager[HookSet]:
    """Multiply each head's output ``z`` (``hook_z``, ``[batch, T, heads, d_head]``) by its scale.

    ``z`` is the head's attention-weighted sum of values before the output projection, so the
    head's contribution to the residual stream, ``z[:, :, h] @ W_O[h]``, is scaled by exactly that
    factor (the output bias is not part of any head and is left alone). A scale of 0 zero-ablates the
    head (the head masking of Michel et al., 2019); 1 is the identity.
    """
    _bridge_points(model)
    grouped: dict[int, list[tuple[int, float]]] = {}
    for head, scale in scales.items():
        layer, index = _check_head(model, head)
        try:
            factor = float(scale)
        except (TypeError, ValueError):
            raise ConfigError(
                f"the scale of head ({layer}, {index}) must be a number, got {scale!r}"
            ) from None
        if not math.isfinite(factor):
            raise ConfigError(f"the scale of head ({layer}, {index}) must be finite, got {factor}")
        grouped.setdefault(layer, []).append((index, factor))

    def make(layer_scales: list[tuple[int, float]]) -> HookFn:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            factors = torch.ones(z.shape[2], dtype=z.dtype, device=z.device)
            for index, factor in layer_scales:
                factors[index] = factors[index] * factor
            return z * factors[:, None]

        return hook

    return hooks(model, [(attn_hook(layer, "z"), make(s)) for layer, s in grouped.items()])


def allowed_keys(
    model: LoadedModel,
    layer: int,
    t_q: int,
    t_k: int,
    *,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Which keys each query may see, ``[batch or 1, T_q, T_k]`` bool: causal, within the sliding
    window on sliding-window layers, and (given ``attention_mask`` ``[batch, T_k]``, 1 = real token)
    only real tokens. The last ``T_q`` keys are the queries' own positions (a KV cache comes first).
    """
    q = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
    k = torch.arange(t_k, device=device)[None, :]
    allowed = k <= q
    window = model.layer_window(layer)
    if window:
        allowed = allowed & (k > q - window)
    allowed = allowed[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device).bool()[:, None, :]
    return allowed


def uniform_attention(
    model: LoadedModel,
    heads: Iterable[Head],
    *,
    query_positions: Positions | None = None,
    attention_mask: torch.Tensor | None = None,
) -> AbstractContextManager[HookSet]:
    """Make each head attend uniformly to the keys it may see (the uniform-weights baseline).

    Row ``q`` of the head's pattern becomes ``1/n`` on each of the ``n`` keys the query may see
    (causal: keys ``<= q``; on sliding-window layers only the window; with ``attention_mask``
    ``[batch, T]`` only real tokens, so left padding gets no weight) and exactly 0 elsewhere; rows
    still sum to 1. The head's output becomes the mean of the visible values, which removes what the
    head *selects* while keeping its value and output maps. A query that may see no key (a padding
    position under ``attention_mask``) keeps the model's row. ``query_positions`` restricts the edit
    to those rows. Pass the same ``attention_mask`` to the bridge if it should also mask the other
    heads; the bridge run on ``input_ids`` alone attends to padding.
    """
    _bridge_points(model)
    _check_pattern_edits(model, "uniform_attention")
    grouped = _by_layer(model, heads)
    rows_wanted = _check_positions(query_positions, "query_positions")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
    ):
        raise ConfigError(
            "attention_mask must be a [batch, T] tensor (1 = real token), e.g. model.encode(...).attention_mask"
        )

    def make(layer: int, indices: list[int]) -> HookFn:
        def hook(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            batch, _, t_q, t_k = pattern.shape
            if attention_mask is not None and (
                attention_mask.shape[0] not in (1, batch) or attention_mask.shape[1] != t_k
            ):
                raise ConfigError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but layer {layer}'s pattern has "
                    f"{batch} rows of {t_k} keys; pass the attention_mask of the batch being run"
                )
            allowed = allowed_keys(
                model, layer, t_q, t_k, attention_mask=attention_mask, device=pattern.device
            )
            counts = allowed.sum(-1, keepdim=True)
            uniform = allowed.to(pattern.dtype) / counts.clamp_min(1).to(pattern.dtype)
            rows = counts > 0  # [b or 1, T_q, 1]
            wanted = _position_mask(rows_wanted, batch, t_q, pattern.device, "query_positions")
            if wanted is not None:
                rows = rows & wanted[:, :, None]
            out = pattern.clone()
            for index in indices:
                out[:, index] = torch.where(rows, uniform, pattern[:, index])
            return out

        return hook

    return hooks(model, [(attn_hook(layer, "pattern"), make(layer, idx)) for layer, idx in grouped.items()])


@torch.no_grad()
def cache_activations(
    model: LoadedModel,
    input_ids: torch.Tensor,
    names: Iterable[str],
    *,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run the model once on ``input_ids`` ``[batch, T]`` and return copies of the named activations.

    The copies are detached clones, so they stay valid after the run and can be patched into another
    run (:func:`patch_activation`, :func:`freeze_heads`). Interventions active around the call apply
    (their hooks run first), so one can cache a corrupted or ablated run. Raises
    :class:`probe.errors.CaptureError` if a named hook point never fired (a hook point that the
    bridge only runs when a flag is set, such as ``hook_result``).
    """
    names = list(dict.fromkeys(names))
    for name in names:
        _check_name(model, name)
    store: dict[str, torch.Tensor] = {}

    def make(name: str) -> HookFn:
        def hook(activation: torch.Tensor, hook: Any) -> None:
            store[name] = activation.detach().clone()

        return hook

    bridge: Any = model.bridge
    with hooks(model, [(name, make(name)) for name in names]) as hook_set:
        if attention_mask is None:
            bridge(input_ids)
        else:
            bridge(input_ids, attention_mask=attention_mask)
        hook_set.check_fired()
    return store


def cache_z(
    model: LoadedModel,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Every (or the given) layer's ``hook_z`` ``[batch, T, heads, d_head]`` on ``input_ids``, by layer.

    The form :func:`freeze_heads` takes.
    """
    chosen = list(range(model.n_layers)) if layers is None else [_check_int(x, "a layer") for x in layers]
    bad = [x for x in chosen if not 0 <= x < model.n_layers]
    if bad:
        raise ConfigError(f"layers {bad} do not exist on {model.name}: layers are 0..{model.n_layers - 1}")
    cache = cache_activations(
        model, input_ids, [attn_hook(x, "z") for x in chosen], attention_mask=attention_mask
    )
    return {x: cache[attn_hook(x, "z")] for x in chosen}


def patch_activation(
    model: LoadedModel,
    name: str,
    source: torch.Tensor,
    *,
    positions: Positions | None = None,
    heads: Sequence[int] | None = None,
) -> AbstractContextManager[HookSet]:
    """Replace the activation at hook point ``name`` by ``source`` (cached from another run).

    ``source`` has the activation's shape (from :func:`cache_activations` on an input of the same
    length) or batch size 1, which is broadcast over the batch. ``positions`` restricts the patch to
    those sequence positions (for patterns: query rows). ``heads`` (head indices of the layer in
    ``name``) restricts it to those heads at per-head hook points: ``hook_z``, ``hook_q``,
    ``hook_rot_q``, ``hook_pattern``, ``hook_attn_scores`` index query heads, while ``hook_k``,
    ``hook_v``, ``hook_rot_k`` index KV heads (with grouped-query attention a KV head feeds
    ``group_size`` query heads; patch ``hook_z`` or ``hook_pattern`` to reach one query head).
    Everything outside the chosen positions and heads keeps the running input's values.
    """
    _check_name(model, name)
    if _PATTERN_POINT.search(name):
        _check_pattern_edits(model, f"patching {name}")
    if not isinstance(source, torch.Tensor):
        raise ConfigError(f"source must be a tensor cached from {name}, got {type(source).__name__}")
    seq_axis, head_axis, checked = _axes(model, name, heads)
    wanted = _check_positions(positions, "positions")

    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        return _patched(
            activation,
            source,
            seq_axis=seq_axis,
            head_axis=head_axis,
            heads=checked,
            positions=wanted,
            name=name,
        )

    return hooks(model, [(name, hook)])


def freeze_heads(
    model: LoadedModel,
    heads: Iterable[Head],
    cached_z: Mapping[int, torch.Tensor],
    *,
    positions: Positions | None = None,
) -> AbstractContextManager[HookSet]:
    """Pin each head's output ``z`` to its value in another run: ``cached_z[layer][:, :, head]``.

    ``cached_z`` maps a layer to its ``hook_z`` ``[batch, T, heads, d_head]`` (see :func:`cache_z`).
    Freezing is what path patching needs: to let an effect flow only along one path, every head off
    that path is frozen to the reference run, so it cannot pass the change on. The head's output
    projection and everything downstream are untouched. ``positions`` restricts the freeze to those
    sequence positions.
    """
    _bridge_points(model)
    grouped = _by_layer(model, heads)
    missing = [layer for layer in grouped if layer not in cached_z]
    if missing:
        raise ConfigError(
            f"cached_z has no hook_z for layers {missing}; cache them with cache_z(model, input_ids) "
            "(a dict {layer: blocks.L.attn.hook_z})"
        )
    for layer in grouped:
        if not isinstance(cached_z[layer], torch.Tensor) or cached_z[layer].dim() != 4:
            raise ConfigError(
                f"cached_z[{layer}] must be a hook_z tensor [batch, T, heads, d_head]; see cache_z"
            )
    wanted = _check_positions(positions, "positions")

    def make(layer: int, indices: list[int]) -> HookFn:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            return _patched(
                z,
                cached_z[layer],
                seq_axis=1,
                head_axis=2,
                heads=indices,
                positions=wanted,
                name=attn_hook(layer, "z"),
            )

        return hook

    return hooks(model, [(attn_hook(layer, "z"), make(layer, idx)) for layer, idx in grouped.items()])


@contextmanager
def compose(*managers: AbstractContextManager[Any]) -> Iterator[list[Any]]:
    """Enter ``managers`` in order and exit them in reverse, also after an error; yields their values.

    The same as nesting them (or an :class:`contextlib.ExitStack`): at a hook point they share,
    the first one's hook runs first. If entering one fails, those already entered are exited.
    """
    with ExitStack() as stack:
        yield [stack.enter_context(manager) for manager in managers]
