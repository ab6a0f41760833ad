"""duo_generate: a KV cache cut per KV head that decodes as the native model (every head a retrieval
head) and as duo_attention with binary gates (any mask), and keeps exactly what the formula counts."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from probe.duo_cache import DuoDecode, duo_generate, kv_ratio, kv_tokens
from probe.errors import ConfigError
from probe.kernels import native_attention
from probe.loading import LoadedModel
from probe.streaming import duo_attention
from tests.test_streaming import TEXT, close, tiny_gemma2, tiny_gemma3  # noqa: F401  (fixtures)

SINK, RECENT = 3, 5
NEW = 10


def _prompt(model: LoadedModel, repeats: int = 1) -> torch.Tensor:
    return model.encode([" ".join([TEXT] * repeats)]).input_ids


def native_greedy(model: LoadedModel, ids: torch.Tensor, new: int) -> tuple[list[int], torch.Tensor]:
    """The model's own greedy generation (SDPA, transformers' cache): new tokens and raw logits."""
    with torch.no_grad(), native_attention(model) as native:
        out: Any = native.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.stack([row[0] for row in out.logits])


def duo_reference(model: LoadedModel, ids: torch.Tensor, got: DuoDecode, mask: torch.Tensor) -> torch.Tensor:
    """duo_attention's logits, binary gates, over the prompt and every fed-back token, without a cache."""
    whole = torch.cat([ids[0], torch.tensor(got.tokens[:-1], dtype=ids.dtype)])[None]
    with torch.no_grad(), duo_attention(model, mask.float(), sink=SINK, recent=RECENT) as native:
        return native(input_ids=whole, use_cache=False).logits[0, ids.shape[1] - 1 :]


def _all(model: LoadedModel, value: bool) -> torch.Tensor:
    return torch.full((model.n_layers, model.n_kv_heads), value, dtype=torch.bool)


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3", "tiny_gemma2"])
@pytest.mark.parametrize("chunk", [None, 4, 17])
def test_all_retrieval_heads_decode_as_the_model_generates(
    name: str, chunk: int | None, request: pytest.FixtureRequest
) -> None:
    model: LoadedModel = request.getfixturevalue(name)
    ids = _prompt(model)
    tokens, logits = native_greedy(model, ids, NEW)
    got = duo_generate(
        model,
        ids,
        _all(model, True),
        sink=SINK,
        recent=RECENT,
        max_new_tokens=NEW,
        prefill_chunk=chunk,
        keep_logits=True,
    )
    assert got.tokens == tokens and len(tokens) == NEW
    assert got.logits is not None
    if chunk is None:  # one prefill, as generate does: within 1e-5
        torch.testing.assert_close(got.logits, logits, atol=1e-5, rtol=0)
    else:  # a chunked prefill sums in another order than generate's one pass (logits reach ~10)
        close(got.logits, logits)
    assert got.cache_bytes == got.full_cache_bytes  # nothing is cut
    n = ids.shape[1] + NEW - 1
    assert got.context_tokens == n
    windows = [model.sliding_window if t == "sliding_attention" else None for t in model.layer_types or []]
    want = [n if w is None else min(n, w) for w in windows] or [n] * model.n_layers
    assert got.kept_tokens.tolist() == [[k] * model.n_kv_heads for k in want]


MASKS = {
    "tiny_llama": [
        [[True, False], [False, False], [False, True]],
        [[False, True], [True, True], [True, False]],
    ],
    # layers: sliding, sliding, full; a streaming head on a sliding layer keeps sinks + recent
    "tiny_gemma3": [
        [[True, False], [False, False], [False, True]],
        [[False, False], [True, True], [True, False]],
        [[False, False], [False, False], [False, False]],
    ],
    # Gemma 2: the same layers, logits soft-capped in every branch of the cut cache
    "tiny_gemma2": [
        [[True, False], [False, False], [False, True]],
        [[False, False], [False, False], [False, False]],
    ],
}


@pytest.mark.parametrize(("name", "mask"), [(name, mask) for name, masks in MASKS.items() for mask in masks])
@pytest.mark.parametrize("chunk", [None, 4, 17])
def test_a_mixed_mask_gives_duo_attentions_logits_at_every_step(
    name: str, mask: list[list[bool]], chunk: int | None, request: pytest.FixtureRequest
) -> None:
    model: LoadedModel = request.getfixturevalue(name)
    ids, retrieval = _prompt(model), torch.tensor(mask)
    got = duo_generate(
        model,
        ids,
        retrieval,
        sink=SINK,
        recent=RECENT,
        max_new_tokens=NEW,
        prefill_chunk=chunk,
        keep_logits=True,
        stop_ids=(),
    )
    assert got.logits is not None and len(got.tokens) == NEW
    want = duo_reference(model, ids, got, retrieval)
    close(got.logits, want)
    assert [int(t) for t in want.argmax(-1)] == got.tokens
    # the mask matters: the same tokens through the uncut model give other logits
    whole = torch.cat([ids[0], torch.tensor(got.tokens[:-1])])[None]
    with torch.no_grad(), native_attention(model) as native:
        own = native(input_ids=whole, use_cache=False).logits[0, ids.shape[1] - 1 :]
    assert (own - got.logits).abs().max() > 0.1


def test_the_cache_keeps_the_models_own_keys_at_their_absolute_positions(tiny_llama: LoadedModel) -> None:
    """Keys are cached after RoPE: each kept slot holds the key of its absolute position."""
    ids = _prompt(tiny_llama, 3)
    retrieval = torch.tensor([[True, False], [False, False], [False, True]])
    got = duo_generate(
        tiny_llama, ids, retrieval, sink=SINK, recent=RECENT, max_new_tokens=NEW, stop_ids=(), keep_cache=True
    )
    assert got.cache is not None
    n = got.context_tokens
    whole = torch.cat([ids[0], torch.tensor(got.tokens[:-1])])[None]
    # duo_attention (binary gates) computes every key of the uncut sequence under the same mask
    gates = retrieval.float()
    with torch.no_grad(), duo_attention(tiny_llama, gates, sink=SINK, recent=RECENT) as native:
        own = native(input_ids=whole, use_cache=True).cache
    ring = list(range(n - RECENT, n))
    slots = list(range(SINK)) + [SINK + (a - SINK) % RECENT for a in ring]
    positions = list(range(SINK)) + ring
    for layer, entry in enumerate(got.cache.layers):
        keys, values = own.layers[layer].keys, own.layers[layer].values  # [1, n_kv, n, d]
        for group in entry.groups:
            assert group.key is not None and group.value is not None
            heads = group.heads
            if group.recent is None:
                assert torch.allclose(group.key, keys[:, heads], atol=1e-5)
                assert torch.allclose(group.value, values[:, heads], atol=1e-5)
            else:
                assert torch.allclose(group.key[:, :, slots], keys[:, heads][:, :, positions], atol=1e-5)
                assert torch.allclose(group.value[:, :, slots], values[:, heads][:, :, positions], atol=1e-5)


# ------------------------------------------------------------------------------ memory


def test_streaming_heads_keep_exactly_sink_plus_recent_and_the_saving_is_the_formulas(
    tiny_llama: LoadedModel,
) -> None:
    ids = _prompt(tiny_llama, 6)  # 264 tokens
    got = duo_generate(
        tiny_llama,
        ids,
        _all(tiny_llama, False),
        sink=SINK,
        recent=RECENT,
        max_new_tokens=NEW,
        prefill_chunk=64,
        stop_ids=(),
        keep_cache=True,
    )
    n = got.context_tokens
    assert n == ids.shape[1] + NEW - 1 > 10 * (SINK + RECENT)
    assert got.cache is not None
    for entry in got.cache.layers:
        (group,) = entry.groups
        assert group.key is not None and group.value is not None
        want = (1, tiny_llama.n_kv_heads, SINK + RECENT, tiny_llama.d_head)
        assert tuple(group.key.shape) == want and tuple(group.value.shape) == want
    assert (got.kept_tokens == SINK + RECENT).all()
    per_token = 2 * tiny_llama.d_head * 4  # key and value, float32
    assert got.full_cache_bytes == tiny_llama.n_layers * tiny_llama.n_kv_heads * n * per_token
    assert got.cache_bytes * n == got.full_cache_bytes * (SINK + RECENT)  # r = 0: (S + R) / N, exactly
    assert got.cache_ratio == pytest.approx(kv_ratio(0.0, SINK, RECENT, n), rel=1e-12)
    assert got.peak_bytes is None and got.decode_peak_bytes is None  # CPU
    assert got.prefill_seconds > 0 and got.decode_seconds_per_token > 0


@pytest.mark.parametrize(
    "mask", [[[True, False], [False, False], [False, True]], [[True] * 2, [False] * 2, [True] * 2]]
)
def test_a_mixed_cache_is_the_formulas_share_of_the_full_one(
    tiny_llama: LoadedModel, mask: list[list[bool]]
) -> None:
    ids = _prompt(tiny_llama, 6)
    retrieval = torch.tensor(mask)
    got = duo_generate(tiny_llama, ids, retrieval, sink=SINK, recent=RECENT, max_new_tokens=NEW, stop_ids=())
    n, heads, n_ret = got.context_tokens, retrieval.numel(), int(retrieval.sum())
    assert got.kept_tokens.tolist() == [[n if r else SINK + RECENT for r in row] for row in mask]
    # r + (1 - r)(S + R)/N with r = n_ret / heads, cross-multiplied so that it is exact
    assert got.cache_bytes * heads * n == got.full_cache_bytes * (
        n_ret * n + (heads - n_ret) * (SINK + RECENT)
    )
    assert got.cache_ratio == pytest.approx(kv_ratio(n_ret / heads, SINK, RECENT, n), rel=1e-12)
    assert kv_tokens(tiny_llama, retrieval, SINK, RECENT, n) == (int(got.kept_tokens.sum()), heads * n)


def test_gemma3_sliding_layers_keep_their_window_or_sinks_plus_recent(request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue("tiny_gemma3")
    ids = _prompt(model, 2)
    retrieval = torch.tensor([[True, False], [False, False], [False, True]])
    got = duo_generate(model, ids, retrieval, sink=SINK, recent=RECENT, max_new_tokens=NEW, stop_ids=())
    n, window, s_r = got.context_tokens, model.sliding_window, SINK + RECENT
    assert window == 6 and n > window
    assert got.kept_tokens.tolist() == [[window, s_r], [s_r, s_r], [s_r, n]]
    duo, full = kv_tokens(model, retrieval, SINK, RECENT, n)
    assert (duo, full) == (window + 4 * s_r + n, 2 * (2 * window + n))
    assert got.cache_bytes * full == got.full_cache_bytes * duo


def test_a_stop_token_ends_the_decode_and_the_cache_holds_what_was_fed(tiny_llama: LoadedModel) -> None:
    ids = _prompt(tiny_llama)
    free = duo_generate(
        tiny_llama, ids, _all(tiny_llama, True), sink=SINK, recent=RECENT, max_new_tokens=NEW, stop_ids=()
    )
    stop = free.tokens[3]
    first = free.tokens.index(stop)
    got = duo_generate(
        tiny_llama, ids, _all(tiny_llama, True), sink=SINK, recent=RECENT, max_new_tokens=NEW, stop_ids={stop}
    )
    assert got.tokens == free.tokens[: first + 1] and got.stopped_on == "eos"
    assert free.stopped_on == "max_new_tokens"
    assert got.context_tokens == ids.shape[1] + first
    assert (got.kept_tokens == got.context_tokens).all() and got.cache_bytes == got.full_cache_bytes


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"retrieval": torch.ones(3, 2)}, r"bool tensor \[n_layers, n_kv_heads\]"),
        ({"retrieval": [[True, True]] * 3}, r"bool tensor .* got list"),
        ({"retrieval": torch.ones(3, 4, dtype=torch.bool)}, r"shape \[3, 4\] .* \[3, 2\]"),
        ({"sink": 0}, r"sink must be a positive int"),
        ({"recent": -1}, r"recent must be a positive int"),
        ({"recent": 2.5}, r"recent must be a positive int"),
        ({"sink": True}, r"sink must be a positive int"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be a positive int"),
        ({"prefill_chunk": 0}, r"prefill_chunk must be a positive int or None"),
        ({"prompt_ids": torch.zeros(2, 5, dtype=torch.long)}, r"one sequence, got a batch of 2"),
        ({"prompt_ids": [[1, 2], [3, 4]]}, r"one sequence"),
        ({"prompt_ids": []}, r"prompt is empty"),
        ({"prompt_ids": [5] * 510}, r"510 tokens plus 4 new .* context of 512"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(
    tiny_llama: LoadedModel, change: dict[str, Any], message: str
) -> None:
    kwargs: dict[str, Any] = {
        "prompt_ids": [0, 5, 6, 7],
        "retrieval": _all(tiny_llama, True),
        "sink": SINK,
        "recent": RECENT,
        "max_new_tokens": 4,
    }
    kwargs.update(change)
    with pytest.raises(ConfigError, match=message) as err:
        duo_generate(tiny_llama, **kwargs)
    assert "\n" not in str(err.value)
    impl = tiny_llama.native_model.config._attn_implementation  # type: ignore[union-attr]
    assert impl != "headlab_duo_cache"


def test_decodes_do_not_nest_and_the_attention_runs_only_inside_one(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from probe import duo_cache
    from probe.errors import CaptureError
    from probe.kernels import attention_modules

    ids = [0, 5, 6, 7]
    first = attention_modules(tiny_llama)[0]
    monkeypatch.setitem(duo_cache._ACTIVE, id(first), (None, 0))  # a decode still running
    with pytest.raises(ConfigError, match="already running on tiny-llama"):
        duo_generate(tiny_llama, ids, _all(tiny_llama, True), sink=SINK, recent=RECENT, max_new_tokens=2)
    monkeypatch.delitem(duo_cache._ACTIVE, id(first))
    duo_cache._register()
    with (
        pytest.raises(CaptureError, match="outside duo_generate"),
        native_attention(tiny_llama, duo_cache.DUO_CACHE_IMPL) as native,
    ):
        native(input_ids=torch.tensor([ids]), use_cache=False)


def test_the_formula_refuses_what_is_not_a_share_or_a_length() -> None:
    assert kv_ratio(0.25, 64, 256, 32768) == pytest.approx(0.25 + 0.75 * 320 / 32768)
    assert kv_ratio(0.0, 64, 256, 100) == 1.0  # a streaming head keeps at most what there is
    with pytest.raises(ConfigError, match=r"share r must lie in \[0, 1\]"):
        kv_ratio(1.5, 4, 8, 100)
    with pytest.raises(ConfigError, match="context length n must be a positive int"):
        kv_ratio(0.5, 4, 8, 0)


# ------------------------------------------------------------------------------ a real model


@pytest.mark.real
def test_gemma3_270m_decodes_past_its_window_as_it_generates() -> None:
    """The real Gemma 3 (sliding window 512): a 700-token prompt, every head a retrieval head."""
    from analyses.tasks.needles.haystack import build_haystack
    from tests.conftest import real_model

    model = real_model("gemma3-270m")
    ids = model.encode([build_haystack(model.tokenizer, 700)]).input_ids
    tokens, logits = native_greedy(model, ids, 6)
    got = duo_generate(
        model,
        ids,
        _all(model, True),
        sink=16,
        recent=64,
        max_new_tokens=6,
        prefill_chunk=256,
        keep_logits=True,
    )
    assert got.tokens == tokens
    assert got.logits is not None
    # float32 logits of size ~30 by two summation orders (chunked prefill): a few 1e-5 apart
    torch.testing.assert_close(got.logits, logits, atol=1e-4, rtol=1e-5)
    streaming = duo_generate(
        model, ids, _all(model, False), sink=16, recent=64, max_new_tokens=2, prefill_chunk=256
    )
    assert (streaming.kept_tokens == 80).all()
    duo, full = kv_tokens(model, _all(model, False), 16, 64, streaming.context_tokens)
    assert streaming.cache_bytes * full == streaming.full_cache_bytes * duo
