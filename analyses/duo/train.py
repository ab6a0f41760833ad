"""Training DuoAttention's gates: distil the full model's final hidden states into the gated model.

Per step: one passkey context (:mod:`.data`); the targets are the full model's final hidden states
(the last layer's output after the final norm, what the unembedding reads), computed without
gradient; the gated model runs inside :func:`probe.streaming.duo_attention`; the loss is the mean
squared error on the positions that predict the answer tokens plus ``lam`` · mean|gate|; AdamW
steps the gates only, which are clamped to [0, 1] after every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from analyses.duo.config import TRAIN_SEED_OFFSET, DuoConfig
from analyses.duo.data import PasskeyContext, passkey_context
from probe.errors import CaptureError
from probe.kernels import native_attention
from probe.loading import LoadedModel
from probe.streaming import duo_attention


def final_hidden(native: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[1, T, d_model]``: the last hidden state after the final norm (transformers' last
    ``hidden_states`` entry); only one position of logits is computed."""
    out = native(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


@torch.no_grad()
def full_targets(model: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The full model's final hidden states (its own attention, no gates: SDPA, or the soft-capped
    formula for a model that caps its logits)."""
    with native_attention(model) as native:
        return final_hidden(native, ids)


def duo_loss(
    hidden: torch.Tensor, target: torch.Tensor, positions: Sequence[int], gates: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, distillation, regulariser)``: the mean squared error between ``hidden`` and ``target``
    ``[1, T, d]`` over ``positions`` (mean over positions and dimensions), and ``lam`` · mean|gates|."""
    idx = torch.as_tensor(list(positions), dtype=torch.long, device=hidden.device)
    distill = F.mse_loss(hidden[0, idx].float(), target[0, idx].float())
    reg = lam * gates.abs().mean()
    return distill + reg, distill, reg


def training_contexts(model: LoadedModel, cfg: DuoConfig) -> Callable[[int], PasskeyContext]:
    """Step ``i``'s context: its length drawn (seeded) from :attr:`DuoConfig.train_lengths`, its haystack
    order and needles from ``seed + TRAIN_SEED_OFFSET + i``; distinct contexts are cycled after
    ``n_contexts`` steps."""
    base = cfg.seed + TRAIN_SEED_OFFSET
    lengths = np.random.default_rng(base).choice(cfg.train_lengths, size=cfg.n_contexts)
    cache: dict[int, PasskeyContext] = {}

    def context(step: int) -> PasskeyContext:
        i = step % cfg.n_contexts
        if i not in cache:
            cache[i] = passkey_context(
                model,
                int(lengths[i]),
                n_passkeys=cfg.n_passkeys,
                depth_min=cfg.depth_min,
                depth_max=cfg.depth_max,
                passkey_words=cfg.passkey_words,
                seed=base + i,
            )
        return cache[i]

    return context


@dataclass
class Trained:
    """The trained gates ``[n_layers, n_kv_heads]``, the per-step losses, and the seconds spent."""

    gates: np.ndarray
    loss: pd.DataFrame
    seconds: dict[str, float]


def _check_frozen(native: torch.nn.Module) -> None:
    if any(p.grad is not None for p in native.parameters()):
        raise CaptureError(
            "a model weight received a gradient while training the gates; the weights must stay frozen"
        )


def train_gates(model: LoadedModel, cfg: DuoConfig) -> Trained:
    """Train one gate per KV head from 1 for ``cfg.steps`` steps (module docstring)."""
    from tqdm.auto import tqdm

    native = model.native_model
    assert native is not None
    gates = torch.nn.Parameter(torch.ones(model.n_layers, model.n_kv_heads, device=model.device))
    optimiser = torch.optim.AdamW([gates], lr=cfg.lr, weight_decay=0.0)
    contexts = training_contexts(model, cfg)
    rows: list[dict[str, float]] = []
    seconds = {"data": 0.0, "targets": 0.0, "steps": 0.0}
    bar = tqdm(range(cfg.steps), desc="duo gates", unit="step", disable=not cfg.progress, leave=False)
    for step in bar:
        t0 = time.perf_counter()
        ctx = contexts(step)
        ids = torch.tensor([ctx.ids], device=model.device)
        t1 = time.perf_counter()
        target = full_targets(model, ids)
        t2 = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        with duo_attention(model, gates, sink=cfg.sink, recent=cfg.recent, block=cfg.block) as gated:
            total, distill, reg = duo_loss(
                final_hidden(gated, ids), target, ctx.loss_positions, gates, cfg.lam
            )
            total.backward()
        _check_frozen(native)
        optimiser.step()
        with torch.no_grad():
            gates.clamp_(0.0, 1.0)
        t3 = time.perf_counter()
        seconds["data"] += t1 - t0
        seconds["targets"] += t2 - t1
        seconds["steps"] += t3 - t2
        rows.append(
            {
                "step": step,
                "length": ctx.n_tokens,
                "distill": float(distill.detach()),
                "reg": float(reg.detach()),
                "loss": float(total.detach()),
                "gate_mean": float(gates.detach().mean()),
            }
        )
        bar.set_postfix(loss=f"{rows[-1]['loss']:.4g}", distill=f"{rows[-1]['distill']:.3g}")
    bar.close()
    columns = ["step", "length", "distill", "reg", "loss", "gate_mean"]
    loss = pd.DataFrame(rows, columns=columns)
    rounded = {k: round(v, 3) for k, v in seconds.items()}
    return Trained(gates.detach().cpu().numpy().astype(np.float64), loss, rounded)
