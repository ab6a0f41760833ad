"""End-to-end checks on the real embedded models (offline; fetched and converted on first use)."""

from __future__ import annotations

import pytest
import torch

import probe
from probe.loading import LoadedModel
from probe.sanity import sanity_check
from tests.conftest import real_model

pytestmark = pytest.mark.real


def test_greedy_continuation_knows_the_capital_of_france(smollm: LoadedModel) -> None:
    report = sanity_check(smollm, "The capital of France is", new_tokens=5)
    assert "Paris" in report.continuation
    assert report.ok() and all(r["fired"] for r in report.rows) and len(report.rows) == 30


def _independent_logits(model: LoadedModel, ids: torch.Tensor, attn: str) -> torch.Tensor:
    """Logits of a separately loaded plain transformers model."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(
        model.path, dtype=torch.float32, attn_implementation=attn
    ).eval()
    with torch.no_grad():
        return plain(input_ids=ids).logits


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_bridge_logits_match_plain_transformers(name: str) -> None:
    model = real_model(name)
    assert model.caveat.startswith("4-bit") and len(model.weight_sha256) == 64
    ids = model.encode(["Attention heads are small; their effects are not. The quick brown fox"]).input_ids
    with torch.no_grad():
        bridge_logits = model.bridge(ids)  # type: ignore[misc]
    # Same arithmetic (eager attention): agreement to 1e-4. Against the fused SDPA kernel the
    # order of operations differs and float32 drift of a few 1e-4 is expected.
    eager_diff = (bridge_logits - _independent_logits(model, ids, "eager")).abs().max().item()
    assert eager_diff < 1e-4, eager_diff
    sdpa_diff = (bridge_logits - _independent_logits(model, ids, "sdpa")).abs().max().item()
    assert sdpa_diff < 5e-3, sdpa_diff


def test_embedded_models_have_the_documented_shapes() -> None:
    smol, gemma = real_model("smollm2-135m"), real_model("gemma3-270m")
    assert (smol.n_layers, smol.n_heads, smol.n_kv_heads, smol.d_model, smol.n_ctx) == (30, 9, 3, 576, 8192)
    assert not smol.bos.prepend  # SmolLM2's tokenizer adds no BOS
    assert (gemma.n_layers, gemma.n_heads, gemma.n_kv_heads, gemma.d_model, gemma.n_ctx) == (
        18,
        4,
        1,
        640,
        32768,
    )
    assert gemma.bos.prepend and gemma.bos.token == "<bos>"
    assert gemma.layer_types is not None and {"sliding_attention", "full_attention"} == set(gemma.layer_types)
    assert probe.DEFAULT_MODEL == "smollm2-135m"
