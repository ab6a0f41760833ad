"""LongRoPE (Phi-3 128K): each sequence rotated by its own length, in a batch and across a generation.

The tiny ``phi3-longrope`` family switches from its short to its long factors past 32 tokens.
"""

from __future__ import annotations

import pytest
import torch

import probe
from probe import rope
from probe.errors import ConfigError
from probe.families import save_checkpoint

LIMIT = 32


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory) -> probe.LoadedModel:
    directory = save_checkpoint("phi3-longrope", tmp_path_factory.mktemp("phi3-longrope"))
    return probe.load_model(str(directory), device="cpu")


def test_the_switch_length_is_read_from_the_rotary_module(phi3: probe.LoadedModel) -> None:
    assert phi3.native_model is not None
    assert rope.switch_length(phi3.native_model) == LIMIT
    assert rope.switch_length(phi3.hf_model) == LIMIT
    assert rope.install(phi3.native_model) == 0  # already installed: a no-op


@torch.no_grad()
def test_a_short_row_beside_a_long_one_is_rotated_as_alone(phi3: probe.LoadedModel) -> None:
    """transformers picks the factors from the batch's largest position: the short row, padded beside
    a long one, would be rotated with the long factors."""
    short, long = list(range(3, 3 + 20)), list(range(3, 3 + 40))
    native = phi3.native_model
    assert native is not None
    batch = phi3.batch_from_ids([long, short])
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    both = native(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions
    ).logits
    for row in range(2):
        n = int(batch.lengths[row])
        alone = native(input_ids=batch.input_ids[row : row + 1, -n:]).logits[0]
        torch.testing.assert_close(both[row, -n:], alone, rtol=0, atol=1e-5)
    # the rotary module itself: per-row factors equal each row's own call
    rotary = native.model.rotary_emb
    x = torch.zeros(1)
    positions = torch.stack(
        [torch.arange(40), torch.cat([torch.zeros(20, dtype=torch.long), torch.arange(20)])]
    )
    cos, sin = rotary(x, positions)
    for row in range(2):
        cos1, sin1 = rotary(x, positions[row : row + 1])
        assert torch.equal(cos[row], cos1[0]) and torch.equal(sin[row], sin1[0])
    batch_cos, _ = rotary._headlab_rope_forward(x, positions)  # transformers' own choice
    assert torch.equal(batch_cos[0], cos[0]) and not torch.allclose(batch_cos[1], cos[1])


def test_generations_that_cannot_rotate_each_sequence_as_alone_are_refused(phi3: probe.LoadedModel) -> None:
    from probe.duo_cache import duo_generate

    retrieval = torch.ones(phi3.n_layers, phi3.n_kv_heads, dtype=torch.bool)
    with pytest.raises(ConfigError, match="cut cache cannot be recomputed"):
        duo_generate(phi3, list(range(3, 23)), retrieval, sink=2, recent=4, max_new_tokens=20)
    with pytest.raises(ConfigError, match="prefill_chunk=None or at least 33"):
        duo_generate(
            phi3, list(range(3, 43)), retrieval, sink=2, recent=4, max_new_tokens=2, prefill_chunk=16
        )
    # two rows crossing at different steps: generate would recompute only at the first
    with pytest.raises(ConfigError, match="cross it at different steps"):
        phi3.generate(phi3.batch_from_ids([list(range(3, 28)), list(range(3, 23))]), max_new_tokens=16)
    # each alone crosses and is recomputed as transformers' generate does: same tokens
    alone = phi3.batch_from_ids([list(range(3, 23))])
    out = phi3.generate(alone, max_new_tokens=16)
    assert out.shape == (1, alone.input_ids.shape[1] + 16)
    # a prompt already past the switch, or a generation that stays below it, is fine
    duo_generate(phi3, list(range(3, 43)), retrieval, sink=2, recent=4, max_new_tokens=2, prefill_chunk=33)
    duo_generate(phi3, list(range(3, 13)), retrieval, sink=2, recent=4, max_new_tokens=4)
