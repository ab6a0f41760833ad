"""The sink metric (``alpha_k > eps`` per sample, Sink_k in %) and the reducers that capture it:
:class:`SinkReducer` (alpha) and :class:`TokenNorms` (norms of the first token against the others)."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from analyses.sinks.config import QUANTITIES
from probe.errors import CaptureError, ConfigError
from probe.hooks import HookFn, attn_hook, hooks
from probe.loading import LoadedModel
from probe.reducers import BatchInfo, ColumnImportance, PatternReducer


def sink_indicator(alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """``alpha > eps`` per sample, layer, head and position (False where alpha is NaN: no token)."""
    return alpha > eps


def sink_share(alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """``[n, T]`` (float64): per sample and position, the share of all (layer, head) with
    ``alpha_k > eps``.

    ``alpha`` is ``[n, L, H, T]`` (:class:`ColumnImportance`); NaN beyond a sample's length.
    """
    share = sink_indicator(alpha, eps).double().mean(dim=(1, 2))  # float64: exact shares of counts
    missing = torch.isnan(alpha).all(dim=1).all(dim=1)
    return share.masked_fill(missing, float("nan"))


def sink_percent(alpha: torch.Tensor, eps: float, k: int = 0) -> float:
    """``Sink_k^eps`` in %: thresholded per sample, averaged over samples (the paper's metric)."""
    return 100.0 * float(torch.nanmean(sink_share(alpha, eps)[:, k]))


def sink_percent_of_mean_alpha(alpha: torch.Tensor, eps: float, k: int = 0) -> float:
    """Share (in %) of heads whose *sample-averaged* ``alpha_k`` exceeds ``eps``.

    NOT the paper's Sink (which thresholds every sample first); kept to show that the two differ.
    """
    mean = torch.nanmean(alpha[..., k], dim=0)  # [L, H]
    return 100.0 * float((mean > eps).float().mean())


class SinkReducer(ColumnImportance):
    """:class:`ColumnImportance` (``alpha_k`` per sample, layer, head, real position) with the sink
    threshold ``eps``: :meth:`indicator`, :meth:`share` and :meth:`percent` give the per-sample
    indicator, the per-sample share of heads and ``Sink_k^eps`` in %."""

    name = "sink"

    def __init__(self, eps: float = 0.3) -> None:
        super().__init__()
        if not 0.0 < eps < 1.0:
            raise ConfigError(f"eps must be between 0 and 1 (got {eps})")
        self.eps = eps

    def alpha(self) -> torch.Tensor:
        """``[n_samples, L, H, T_max]`` column importance (NaN beyond each sample's length)."""
        return self.result()

    def indicator(self) -> torch.Tensor:
        return sink_indicator(self.result(), self.eps)

    def share(self) -> torch.Tensor:
        return sink_share(self.result(), self.eps)

    def percent(self, k: int = 0) -> float:
        return sink_percent(self.result(), self.eps, k)


# ------------------------------------------------------------------------------------ the norms


class TokenNorms(PatternReducer):
    """L2 norms of the first real token's hidden state, keys and values against the other tokens.

    Not a pattern statistic: in an eager capture it reads ``blocks.{l}.hook_resid_pre``, the key
    hook of :func:`key_hooks` and ``hook_v`` through :meth:`hook_points`; in a recompute capture
    (``reads_native``) the capture hands it each native decoder layer's input and the key and value
    its attention receives, in the same forward (no pattern is formed). It takes the batch layout
    (padding) from the :class:`BatchInfo` that the capture hands every reducer. Its pattern updates
    do nothing.

    Result: ``[n_samples, L, 1 + 2·n_kv, 2]``: column 0 the hidden state, then the keys of each KV
    head, then the values of each; last dimension (norm of the first real token, mean norm of the
    other real tokens; NaN for a one-token sample).
    """

    name = "token_norms"
    supports_moments = True
    stacked_moments = True  # its moment updates do nothing: one call per batch is enough
    reads_native = True  # a recompute capture hands it each layer's input, key and value

    def __init__(self, n_layers: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.n_kv = n_kv_heads
        self.width = 1 + 2 * n_kv_heads

    def columns(self, quantity: str) -> slice:
        if quantity == "hidden":
            return slice(0, 1)
        if quantity == "key":
            return slice(1, 1 + self.n_kv)
        if quantity == "value":
            return slice(1 + self.n_kv, 1 + 2 * self.n_kv)
        raise KeyError(f"unknown quantity {quantity!r}; choose from {', '.join(QUANTITIES)}")

    def _start(self, info: BatchInfo) -> None:
        self.values = torch.full(
            (info.batch_size, self.n_layers, self.width, 2), float("nan"), device=info.lengths.device
        )

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        return None

    def update_moments(self, layer: int | slice, moments: Any) -> None:
        return None

    def _finish(self, info: BatchInfo) -> torch.Tensor:
        return self.values

    def state_bytes(self, batch: int, T: int, n_layers: int, n_heads: int) -> int:
        return 4 * batch * n_layers * self.width * 2

    def record(self, layer: int, quantity: str, activation: torch.Tensor) -> None:
        """Reduce one hook's activation ``[b, T, d]`` or ``[b, T, n_kv, d]`` to the two norms."""
        info = self.info
        if info is None:
            raise CaptureError("TokenNorms saw an activation outside a batch; run it through capture")
        # the norms on the layer's own device; only [b, T, n] of them go to this reducer's device
        norms = activation.float().norm(dim=-1).to(self.values.device)
        if norms.dim() == 2:
            norms = norms[..., None]  # [b, T, 1]
        cols = self.columns(quantity)
        if norms.shape[-1] != cols.stop - cols.start:
            raise CaptureError(
                f"{quantity} activation of layer {layer} has {norms.shape[-1]} heads, expected "
                f"{cols.stop - cols.start}"
            )
        pos = info.key_positions()  # [b, T]
        first = (pos == 0).to(norms.dtype)
        other = (pos >= 1).to(norms.dtype)
        n_other = other.sum(-1, keepdim=True)  # [b, 1]
        sink_norm = torch.einsum("btn,bt->bn", norms, first)
        other_norm = torch.einsum("btn,bt->bn", norms, other) / n_other.clamp_min(1)
        other_norm = other_norm.masked_fill(n_other == 0, float("nan"))
        self.values[:, layer, cols, 0] = sink_norm
        self.values[:, layer, cols, 1] = other_norm

    def hook_points(self, model: LoadedModel) -> list[tuple[str, HookFn]]:
        """(bridge hook name, function) for every layer's hidden state, key and value."""
        if model.bridge is None:
            raise CaptureError(f"{model.name} has no TransformerBridge: its norms cannot be hooked")
        keys = key_hooks(model)
        out: list[tuple[str, HookFn]] = []
        for layer in range(self.n_layers):
            for quantity, name in (
                ("hidden", f"blocks.{layer}.hook_resid_pre"),
                ("key", f"blocks.{layer}.attn.{keys[layer]}"),
                ("value", attn_hook(layer, "v")),
            ):
                out.append((name, self._hook(layer, quantity)))
        return out

    def _hook(self, layer: int, quantity: str) -> HookFn:
        def hook(activation: torch.Tensor, hook: Any) -> None:
            self.record(layer, quantity, activation)

        return hook


_KEY_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, list[str]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def key_hooks(model: LoadedModel) -> list[str]:
    """Per layer, the attention hook that holds the key the attention uses, up to RoPE:
    ``hook_rot_k`` where the bridge fires it (after any q/k norm and RoPE), else ``hook_k``.

    A bridge of a rotary model declares ``hook_rot_k`` but fires it only where it rotates the keys
    itself: the fused-qkv bridges (Phi-3, GPT-NeoX, Falcon) rotate them without that hook, and have
    no q/k norm, so their ``hook_k`` holds the key before RoPE, a rotation that keeps its norm. Which
    hooks fire is found once per bridge by a two-token forward.
    """
    bridge = model.bridge
    if bridge is None:
        raise CaptureError(f"{model.name} has no TransformerBridge: its keys cannot be hooked")
    if bridge not in _KEY_HOOKS:
        rotary = [layer for layer in range(model.n_layers) if attn_hook(layer, "rot_k") in bridge.hook_dict]
        fired: set[int] = set()

        def seen(layer: int) -> HookFn:
            def hook(activation: torch.Tensor, hook: Any) -> None:
                fired.add(layer)

            return hook

        if rotary:
            ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)
            with hooks(model, [(attn_hook(layer, "rot_k"), seen(layer)) for layer in rotary]):
                bridge(ids)
        _KEY_HOOKS[bridge] = ["hook_rot_k" if layer in fired else "hook_k" for layer in range(model.n_layers)]
    return list(_KEY_HOOKS[bridge])
