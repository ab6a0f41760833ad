"""A short real forward with a hook on every attention layer: does the model do what it should?

Used by the demo and by ``headlab sanity``: it checks that every layer's pattern hook fired, that
patterns are causal probability rows, that the bridge's logits match plain transformers, and shows
a greedy continuation (native model and bridge, which must agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from probe.errors import CaptureError
from probe.kernels import native_attention
from probe.model import LoadedModel


@dataclass
class SanityReport:
    rows: list[dict[str, Any]]  # one per layer
    max_logit_diff_vs_transformers: float  # bridge (eager, hooked) vs the model's SDPA kernel
    continuation: str  # greedy, native model (transformers' own generate)
    prompt: str
    dtype: str = "float32"
    bridge_continuation: str | None = None  # the same through the bridge (hooks live); None if refused

    def ok(self) -> bool:
        # half-precision patterns sum to one only to about 1e-2
        tol = 1e-3 if self.dtype == "float32" else 2e-2
        rows_ok = all(r["fired"] and r["row_sum_err"] < tol and r["causal_leak"] < 1e-6 for r in self.rows)
        return rows_ok and self.generation_agrees()

    def generation_agrees(self) -> bool:
        """Generation through the bridge gives the native model's tokens (or is refused outright)."""
        return self.bridge_continuation is None or self.bridge_continuation == self.continuation


@torch.no_grad()
def sanity_check(
    model: LoadedModel, prompt: str = "The capital of France is", new_tokens: int = 8
) -> SanityReport:
    if model.bridge is None:
        raise CaptureError(f"{model.name} has no TransformerBridge; the language sanity check does not apply")
    batch = model.encode([prompt])
    ids = batch.input_ids
    seen: dict[int, dict[str, Any]] = {}

    def make_hook(layer: int) -> Any:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            p = pattern.float()[0]  # [heads, T, T]
            T = p.shape[-1]
            upper = torch.triu(torch.ones(T, T, dtype=torch.bool, device=p.device), diagonal=1)
            entropy = -(p.clamp_min(1e-12).log() * p).sum(-1).mean().item()
            seen[layer] = {
                "layer": layer,
                "fired": True,
                "heads": p.shape[0],
                "row_sum_err": (p.sum(-1) - 1).abs().max().item(),
                "causal_leak": p[:, upper].abs().max().item() if T > 1 else 0.0,
                "mean_entropy": entropy,
                "mean_first_token_mass": p[:, :, 0].mean().item(),
            }

        return hook

    hooks: list[Any] = [(f"blocks.{i}.attn.hook_pattern", make_hook(i)) for i in range(model.n_layers)]
    bridge_logits = model.bridge.run_with_hooks(ids, fwd_hooks=hooks)
    rows = [seen.get(i, {"layer": i, "fired": False}) for i in range(model.n_layers)]
    missing = [r["layer"] for r in rows if not r["fired"]]
    if missing:
        raise CaptureError(
            f"attention pattern hooks did not fire for layers {missing}: the model ran a fused attention "
            "kernel that returns no weights; load it with eager attention"
        )
    with native_attention(model, "sdpa") as native:  # the model's own fast kernel, no bridge in the way
        hf_logits = native(input_ids=ids).logits
    diff = (bridge_logits.float() - hf_logits.float()).abs().max().item()
    out = model.generate(batch, max_new_tokens=new_tokens)
    continuation = model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    bridge_continuation = None
    if model.extra.get("bridge_generation") == "ok":  # otherwise its generate refuses, saying why
        bridged = model.hf_model.generate(  # type: ignore[operator]
            ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
        bridge_continuation = model.tokenizer.decode(bridged[0, ids.shape[1] :], skip_special_tokens=True)
    return SanityReport(
        rows, diff, continuation, prompt, str(model.dtype).removeprefix("torch."), bridge_continuation
    )
