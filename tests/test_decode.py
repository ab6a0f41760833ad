"""Decode-step recording (probe.decode): argmax rows, uniform masking, prefill reuse, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.decode import greedy_decode, prefill
from probe.errors import ConfigError, ContextTooLongError
from probe.interventions import uniform_attention
from probe.loading import LoadedModel


def _prompt(model: LoadedModel, n: int = 24, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    vocab = int(model.hf_model.config.vocab_size if hasattr(model.hf_model, "config") else 200)
    return rng.integers(3, min(vocab, 250), size=n).tolist()


def _eager_rows(
    model: LoadedModel, ids: list[int], heads: list[tuple[int, int]] | None = None
) -> dict[int, torch.Tensor]:
    """Every layer's full pattern [heads, T, T] from the bridge (optionally with uniform heads on all rows)."""
    assert model.bridge is not None
    names = {f"blocks.{i}.attn.hook_pattern" for i in range(model.n_layers)}
    if heads:
        with uniform_attention(model, heads):
            _, cache = model.bridge.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n in names)
    else:
        _, cache = model.bridge.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n in names)
    return {i: cache[f"blocks.{i}.attn.hook_pattern"][0] for i in range(model.n_layers)}


def test_argmax_rows_match_the_eager_patterns(tiny_model: LoadedModel) -> None:
    ids = _prompt(tiny_model)
    out = greedy_decode(tiny_model, ids, 6, stop_ids=())
    assert len(out.tokens) == 6 and out.argmax.shape == (6, tiny_model.n_layers, tiny_model.n_heads)
    patterns = _eager_rows(tiny_model, ids + out.tokens[:-1])
    P = len(ids)
    for layer, pat in patterns.items():
        for s in range(6):
            row = pat[:, P - 1 + s]  # step s's query is token P-1+s
            np.testing.assert_array_equal(row.argmax(-1).numpy(), out.argmax[s, layer])
            np.testing.assert_allclose(row.amax(-1).numpy(), out.max_weight[s, layer], rtol=1e-4, atol=1e-6)
    # Every recorded position is a real, causal one.
    steps = np.arange(6)[:, None, None]
    assert (out.argmax >= 0).all() and (out.argmax <= P - 1 + steps).all()


def test_greedy_tokens_match_transformers_generate(tiny_llama: LoadedModel) -> None:
    ids = _prompt(tiny_llama, 30, seed=3)
    out = greedy_decode(tiny_llama, ids, 8, stop_ids=())
    assert tiny_llama.native_model is not None
    ref = tiny_llama.native_model.generate(  # type: ignore[operator]
        torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert ref[0, len(ids) :].tolist() == out.tokens


def test_uniform_heads_match_the_bridge_intervention(tiny_llama: LoadedModel) -> None:
    """Masked heads attend uniformly at decode steps: same logits as the bridge's uniform_attention
    applied to the decode rows only (the prefill rows keep the model's pattern)."""
    ids = _prompt(tiny_llama, 20, seed=5)
    heads = [(0, 1), (1, 0), (1, 3)]
    out = greedy_decode(tiny_llama, ids, 4, uniform_heads=heads, stop_ids=(), keep_logits=True)
    plain = greedy_decode(tiny_llama, ids, 4, stop_ids=(), keep_logits=True)
    assert out.logits is not None and plain.logits is not None
    assert not np.allclose(out.logits[0], plain.logits[0])  # the masking does something
    assert tiny_llama.bridge is not None
    full = ids + out.tokens[:-1]
    decode_rows = list(range(len(ids) - 1, len(full)))
    with uniform_attention(tiny_llama, heads, query_positions=decode_rows):
        logits = tiny_llama.bridge(torch.tensor([full]))[0]
    ref = logits[len(ids) - 1 :].float().numpy()
    np.testing.assert_allclose(out.logits, ref, rtol=1e-4, atol=1e-4)


def test_prefill_is_reusable_with_keep(tiny_llama: LoadedModel) -> None:
    ids = _prompt(tiny_llama, 16, seed=7)
    pre = prefill(tiny_llama, ids, 5)
    a = greedy_decode(tiny_llama, pre, 5, stop_ids=(), keep=True)
    b = greedy_decode(tiny_llama, pre, 5, uniform_heads=[(0, 0)], stop_ids=(), keep=True, record=False)
    c = greedy_decode(tiny_llama, pre, 5, stop_ids=(), keep=True)
    assert a.tokens == c.tokens
    np.testing.assert_array_equal(a.argmax, c.argmax)
    assert (b.argmax == -1).all()  # record=False forms no score rows


def test_stops_on_eos(tiny_llama: LoadedModel) -> None:
    ids = _prompt(tiny_llama, 12, seed=1)
    first = greedy_decode(tiny_llama, ids, 3, stop_ids=()).tokens[0]
    out = greedy_decode(tiny_llama, ids, 10, stop_ids={first})
    assert out.tokens == [first] and out.stopped_on == "eos" and out.argmax.shape[0] == 1


def test_whole_prompt_prefill_equals_decoding_the_last_prompt_token(tiny_llama: LoadedModel) -> None:
    """Given ids, step 0 is read from the whole-prompt prefill's last row; given a Prefill, step 0
    decodes the last prompt token. Both are the same computation: same tokens, rows and logits, with
    and without masked heads."""
    ids = _prompt(tiny_llama, 21, seed=11)
    for heads in ([], [(0, 1), (1, 2)]):
        whole = greedy_decode(tiny_llama, ids, 5, uniform_heads=heads, stop_ids=(), keep_logits=True)
        split = greedy_decode(
            tiny_llama, prefill(tiny_llama, ids, 5), 5, uniform_heads=heads, stop_ids=(), keep_logits=True
        )
        assert whole.tokens == split.tokens
        np.testing.assert_array_equal(whole.argmax, split.argmax)
        np.testing.assert_allclose(whole.max_weight, split.max_weight, rtol=1e-5, atol=1e-6)
        assert whole.logits is not None and split.logits is not None
        np.testing.assert_allclose(whole.logits, split.logits, rtol=1e-4, atol=1e-4)


def test_bad_input(tiny_llama: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="at least two tokens"):
        prefill(tiny_llama, [5], 3)
    with pytest.raises(ConfigError, match="empty"):
        greedy_decode(tiny_llama, [], 3)
    assert len(greedy_decode(tiny_llama, [5], 3, stop_ids=()).tokens) == 3  # one token is a prompt
    with pytest.raises(ConfigError, match="max_new_tokens"):
        greedy_decode(tiny_llama, [5, 6, 7], 0)
    with pytest.raises(ConfigError, match="does not exist"):
        greedy_decode(tiny_llama, [5, 6, 7], 2, uniform_heads=[(99, 0)])
    with pytest.raises(ContextTooLongError):
        greedy_decode(tiny_llama, list(range(3, 10)), tiny_llama.n_ctx)


def test_sliding_window_positions_are_absolute_on_gemma3() -> None:
    """Gemma 3's local layers keep only the last 512 keys in the cache: recorded positions must still
    be absolute prompt positions, equal to the eager pattern's argmax at every layer."""
    from analyses.tasks.needles import build_haystack
    from tests.conftest import real_model

    model = real_model("gemma3-270m")
    assert model.sliding_window is not None and model.sliding_window < 600
    text = build_haystack(model.tokenizer, 640, seed=1)
    ids = (
        model.batch_from_ids([model.tokenizer(text, add_special_tokens=False)["input_ids"]])
        .input_ids[0]
        .tolist()
    )
    out = greedy_decode(model, ids, 3, stop_ids=())
    patterns = _eager_rows(model, ids + out.tokens[:-1])
    P = len(ids)
    for layer, pat in patterns.items():
        for s in range(3):
            np.testing.assert_array_equal(pat[:, P - 1 + s].argmax(-1).numpy(), out.argmax[s, layer])
    local = [i for i, t in enumerate(model.layer_types or []) if t == "sliding_attention"]
    assert local and (out.argmax[:, local] > P - 1 - model.sliding_window).all()
