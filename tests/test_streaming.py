"""Streaming attention against an explicit masked softmax, and duo_attention on tiny Llama and Gemma 3
models: exact at gates 1, pure streaming at gates 0, linear in between, gradients only to the gates."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import probe
from probe import interventions as iv
from probe import streaming as st
from probe.errors import ConfigError
from probe.kernels import attention_modules, native_attention, register_attention
from probe.loading import LoadedModel

TEXT = "the quick brown fox jumps over the lazy dog"  # 44 tokens with BOS on tiny-llama
SINK, RECENT = 2, 5
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]  # the CUDA cases exist where a GPU does


def streaming_mask(t_q: int, t_k: int, sink: int, recent: int, device: Any = "cpu") -> torch.Tensor:
    """The explicit ``[T_q, T_k]`` mask of streaming attention: sinks plus the last ``recent`` keys."""
    q = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k = torch.arange(t_k, device=device)[None, :]
    return (k <= q) & ((k < sink) | (k > q - recent))


def window_mask(t_q: int, t_k: int, window: int | None, device: Any = "cpu") -> torch.Tensor:
    q = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k = torch.arange(t_k, device=device)[None, :]
    return (k <= q) & (k > q - window) if window else k <= q


def masked_softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention with the whole score matrix and repeated KV heads, in float64 (``softcap``: the
    scores are ``cap · tanh(s / cap)``)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = q.double() @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def qkv(b: int, h: int, hkv: int, t_q: int, t_k: int, d: int = 8, **kw: Any) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(b, h, t_q, d, **kw),
        torch.randn(b, hkv, t_k, d, **kw),
        torch.randn(b, hkv, t_k, d, **kw),
    )


# ------------------------------------------------------------------------------ the kernels

# (T_k, T_q, sink, recent, block, H, H_kv)
CASES = [
    (20, 20, 2, 3, 4, 4, 4),  # blocks of 4, plain multi-head
    (22, 22, 1, 5, 7, 4, 2),  # the last block padded, GQA
    (40, 40, 4, 8, 128, 6, 2),  # one block holds every query
    (40, 40, 3, 6, 1, 4, 1),  # one query per block, multi-query
    (33, 5, 3, 4, 2, 4, 2),  # 5 queries after 28 cached keys
    (33, 1, 2, 3, 16, 4, 2),  # a decode step
    (30, 30, 0, 6, 5, 4, 2),  # no sinks: a sliding window
    (12, 12, 4, 8, 3, 4, 2),  # sink + recent >= T: the whole prefix
    (12, 3, 6, 6, 2, 2, 1),  # the same with a cache
]


@pytest.mark.parametrize(("t_k", "t_q", "sink", "recent", "block", "h", "hkv"), CASES)
def test_streaming_attention_is_a_masked_softmax(
    t_k: int, t_q: int, sink: int, recent: int, block: int, h: int, hkv: int
) -> None:
    q, k, v = qkv(2, h, hkv, t_q, t_k)
    out = st.streaming_attention(q, k, v, sink=sink, recent=recent, block=block, scaling=0.3)
    want = masked_softmax(q, k, v, streaming_mask(t_q, t_k, sink, recent), scale=0.3)
    assert out.shape == (2, h, t_q, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    if sink + recent < t_k:  # the streaming window really drops keys here
        causal = masked_softmax(q, k, v, window_mask(t_q, t_k, None), scale=0.3)
        assert (out.double() - causal).abs().max() > 1e-3


@pytest.mark.parametrize(("t_k", "t_q", "sink", "recent", "block", "h", "hkv"), CASES)
def test_soft_capped_streaming_attention_is_a_capped_masked_softmax(
    t_k: int, t_q: int, sink: int, recent: int, block: int, h: int, hkv: int
) -> None:
    q, k, v = qkv(2, h, hkv, t_q, t_k)
    kw = {"sink": sink, "recent": recent, "block": block, "scaling": 0.3}
    out = st.streaming_attention(q, k, v, softcap=0.5, **kw)
    want = masked_softmax(q, k, v, streaming_mask(t_q, t_k, sink, recent), scale=0.3, softcap=0.5)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # the cap binds: scores reach about 3, capped at 0.5
    assert (out - st.streaming_attention(q, k, v, **kw)).abs().max() > 1e-2


@pytest.mark.parametrize(("t_k", "t_q", "window"), [(15, 15, None), (15, 15, 4), (15, 3, 4), (15, 1, 20)])
def test_soft_capped_full_attention_is_a_capped_masked_softmax(
    t_k: int, t_q: int, window: int | None
) -> None:
    q, k, v = qkv(2, 4, 2, t_q, t_k)
    out = st.full_attention(q, k, v, sliding_window=window, scaling=0.5, softcap=0.7)
    want = masked_softmax(q, k, v, window_mask(t_q, t_k, window), scale=0.5, softcap=0.7)
    assert out.shape == (2, 4, t_q, 8)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_soft_capped_attention_refuses_dropout() -> None:
    q, k, v = qkv(1, 4, 2, 12, 12)
    for run in (st.full_attention, lambda *a, **kw: st.streaming_attention(*a, sink=1, recent=3, **kw)):
        with pytest.raises(ConfigError, match="soft-capped attention runs without dropout"):
            run(q, k, v, dropout=0.1, softcap=1.0)


def test_with_the_whole_prefix_in_view_streaming_is_full_causal_attention() -> None:
    q, k, v = qkv(1, 4, 2, 10, 10)
    out = st.streaming_attention(q, k, v, sink=4, recent=6, block=3)
    torch.testing.assert_close(out, st.full_attention(q, k, v), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        out.double(), masked_softmax(q, k, v, window_mask(10, 10, None)), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("t_k", "t_q", "window"), [(15, 15, None), (15, 15, 4), (15, 3, None), (15, 3, 4), (15, 1, 20)]
)
def test_full_attention_is_causal_with_its_window(t_k: int, t_q: int, window: int | None) -> None:
    q, k, v = qkv(2, 4, 2, t_q, t_k)
    out = st.full_attention(q, k, v, sliding_window=window, scaling=0.5)
    want = masked_softmax(q, k, v, window_mask(t_q, t_k, window), scale=0.5)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_streaming_attention_runs_in_each_dtype_and_device(
    device: str, dtype: torch.dtype, tol: float
) -> None:
    q, k, v = (x.to(device=device, dtype=dtype) for x in qkv(2, 8, 2, 64, 64, d=16))
    out = st.streaming_attention(q, k, v, sink=4, recent=9, block=16)
    want = masked_softmax(q, k, v, streaming_mask(64, 64, 4, 9, device))
    assert out.dtype == dtype and out.device.type == device
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize(("t", "sink", "recent", "block"), [(23, 2, 4, 5), (21, 0, 2, 8)])
def test_streaming_attention_gradients_are_those_of_the_masked_softmax(
    t: int, sink: int, recent: int, block: int
) -> None:
    # (21, 0, 2, 8): the last block's padding rows lie beyond every window key it gathered
    q, k, v = qkv(2, 4, 2, t, t, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 4, t, 8, dtype=torch.float64)
    (st.streaming_attention(q, k, v, sink=sink, recent=recent, block=block) * weight).sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]  # type: ignore[union-attr]
    for x in (q, k, v):
        x.grad = None
    (masked_softmax(q, k, v, streaming_mask(t, t, sink, recent)) * weight).sum().backward()
    for mine, want in zip(got, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(mine, want, atol=1e-10, rtol=1e-8)
    small = qkv(1, 2, 1, 6, 9, d=3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: st.streaming_attention(a, b, c, sink=1, recent=2, block=2), small
    )


class _Sizes(TorchDispatchMode):
    """The largest tensor any operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_grows_with_the_square_of_the_length() -> None:
    t, h, sink, recent, block = 1024, 2, 4, 16, 32
    q, k, v = qkv(1, h, 1, t, t, requires_grad=True)
    with _Sizes() as sizes:
        st.streaming_attention(q, k, v, sink=sink, recent=recent, block=block).sum().backward()
    # scores of every block at once: H · T · (sink + recent + block - 1); T² would be 1M
    assert sizes.largest <= h * t * (sink + recent + block)
    assert sizes.largest < t * t // 4


def test_bad_kernel_arguments_are_refused() -> None:
    q, k, v = qkv(1, 4, 2, 6, 6)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"sink": -1, "recent": 2}, "sink must be at least 0"),
        ({"sink": 1, "recent": 0}, "recent must be a positive int"),
        ({"sink": 1.5, "recent": 2}, "sink must be an int"),
        ({"sink": 1, "recent": 2, "block": 0}, "block must be a positive int"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            st.streaming_attention(q, k, v, **kwargs)
    with pytest.raises(ConfigError, match="multiple of KV heads"):
        st.streaming_attention(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8), sink=1, recent=2)
    with pytest.raises(ConfigError, match="last of the"):
        st.streaming_attention(torch.randn(1, 4, 8, 8), k, v, sink=1, recent=2)
    with pytest.raises(ConfigError, match="4-D"):
        st.streaming_attention(q[0], k, v, sink=1, recent=2)


# ------------------------------------------------------------------------------ reference forwards

REFERENCE = "headlab_test_masked_softmax"
_MODES: dict[int | str, Any] = {}  # layer -> "own" (causal, the layer's window) or "stream"; "cap" -> bool


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention with an explicit mask per layer, ignoring the mask transformers built."""
    t_q, t_k = query.shape[2], key.shape[2]
    if _MODES[module.layer_idx] == "stream":
        mask = streaming_mask(t_q, t_k, SINK, RECENT, query.device)
    else:
        mask = window_mask(t_q, t_k, getattr(module, "sliding_window", None), query.device)
    softcap = kwargs.get("softcap") if _MODES["cap"] else None
    out = masked_softmax(query, key, value, mask, scale=scaling, softcap=softcap)
    return out.to(query.dtype).transpose(1, 2), None


def reference_logits(
    model: LoadedModel, ids: torch.Tensor, modes: list[str], softcap: bool = True
) -> torch.Tensor:
    """The logits with each layer's attention ``modes`` (its soft cap applied unless ``softcap`` is False)."""
    register_attention(REFERENCE, _reference_attention)
    _MODES.clear()
    _MODES.update(enumerate(modes))
    _MODES["cap"] = softcap
    with torch.no_grad(), native_attention(model, REFERENCE) as native:
        return native(input_ids=ids, use_cache=False).logits


def sdpa_logits(model: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), native_attention(model) as native:
        return native(input_ids=ids, use_cache=False).logits


def duo_logits(model: LoadedModel, ids: torch.Tensor, gates: torch.Tensor, **kw: Any) -> torch.Tensor:
    with st.duo_attention(model, gates, sink=SINK, recent=RECENT, **kw) as native:
        return native(input_ids=ids, use_cache=False).logits


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Logits of one model by two float32 paths (logits reach about 10 on the tiny Gemma 3)."""
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)


def _renormalised_to(mask: torch.Tensor):  # type: ignore[no-untyped-def]
    def edit(pattern: torch.Tensor) -> torch.Tensor:
        kept = pattern * mask
        return kept / kept.sum(-1, keepdim=True)

    return edit


def _tiny_gemma(tmp_path_factory: pytest.TempPathFactory, version: int) -> LoadedModel:
    """A random Gemma ``version`` (2 or 3): 3 layers (sliding window 6, sliding, full), 4 heads over
    2 KV heads; Gemma 2 soft-caps its attention logits at 1 (binding: its scores reach about 4)."""
    import transformers

    from probe.tiny import byte_tokenizer

    tok = byte_tokenizer(prepend_bos=True)
    extra: dict[str, Any] = (
        {"attn_logit_softcapping": 1.0, "final_logit_softcapping": None} if version == 2 else {}
    )
    cfg = getattr(transformers, "Gemma2Config" if version == 2 else "Gemma3TextConfig")(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=256,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **extra,
    )
    model_class = transformers.Gemma2ForCausalLM if version == 2 else transformers.Gemma3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = model_class(cfg).eval()
        for name, p in model.named_parameters():
            torch.nn.init.normal_(p, mean=float("norm" in name), std=0.15 if p.dim() >= 2 else 0.05)
    directory = Path(tmp_path_factory.mktemp(f"gemma{version}"))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return probe.load_model(str(directory), device="cpu")


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return _tiny_gemma(tmp_path_factory, 3)


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return _tiny_gemma(tmp_path_factory, 2)


def _ids(model: LoadedModel) -> torch.Tensor:
    return model.encode([TEXT]).input_ids


# ------------------------------------------------------------------------------ duo_attention


def test_gates_at_one_reproduce_the_model(
    tiny_llama: LoadedModel, tiny_gemma3: LoadedModel, tiny_gemma2: LoadedModel
) -> None:
    for model in (tiny_llama, tiny_gemma3, tiny_gemma2):
        ids = _ids(model)
        own = sdpa_logits(model, ids)
        ones = torch.ones(model.n_layers, model.n_kv_heads)
        with torch.no_grad():
            assert torch.equal(duo_logits(model, ids, ones), own)  # the streaming branch skipped
            # the bridge runs eager attention: equal up to the rounding of another kernel
            assert torch.allclose(duo_logits(model, ids, ones), model.bridge(ids), atol=1e-4)  # type: ignore[misc]
        trained = ones.clone().requires_grad_(True)  # computed, and weighted by exactly 0
        assert torch.equal(duo_logits(model, ids, trained).detach(), own)
        close(own, reference_logits(model, ids, ["own"] * model.n_layers))


def test_gates_at_zero_are_pure_streaming_attention(
    tiny_llama: LoadedModel, tiny_gemma3: LoadedModel, tiny_gemma2: LoadedModel
) -> None:
    ids = _ids(tiny_llama)
    t = ids.shape[1]
    with torch.no_grad():
        zeros = duo_logits(tiny_llama, ids, torch.zeros(3, 2))
        edit = _renormalised_to(streaming_mask(t, t, SINK, RECENT).float())
        heads = {(layer, h): edit for layer in range(3) for h in range(4)}
        with iv.edit_pattern(tiny_llama, heads):
            edited = tiny_llama.bridge(ids)  # type: ignore[misc]
    assert torch.allclose(zeros, edited, atol=1e-4)
    close(zeros, reference_logits(tiny_llama, ids, ["stream"] * 3))
    assert (zeros - sdpa_logits(tiny_llama, ids)).abs().max() > 0.1
    # Gemma 3: the streaming branch is sinks + recent on the sliding layers too, not their window
    ids = _ids(tiny_gemma3)
    with torch.no_grad():
        zeros = duo_logits(tiny_gemma3, ids, torch.zeros(3, 2))
    close(zeros, reference_logits(tiny_gemma3, ids, ["stream"] * 3))
    assert (zeros - sdpa_logits(tiny_gemma3, ids)).abs().max() > 0.1
    # Gemma 2: both branches soft-cap the scores as the model's eager attention does
    ids = _ids(tiny_gemma2)
    with torch.no_grad():
        zeros = duo_logits(tiny_gemma2, ids, torch.zeros(3, 2))
        uncapped = reference_logits(tiny_gemma2, ids, ["stream"] * 3, softcap=False)
    close(zeros, reference_logits(tiny_gemma2, ids, ["stream"] * 3))
    assert (zeros - sdpa_logits(tiny_gemma2, ids)).abs().max() > 0.1
    assert (zeros - uncapped).abs().max() > 0.1  # the cap matters here


@pytest.mark.parametrize("name", ["tiny_gemma3", "tiny_gemma2"])
def test_each_layer_takes_the_branch_its_gates_choose(name: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(name)
    ids = _ids(model)
    for gates, modes in [
        ([[0, 0], [1, 1], [1, 1]], ["stream", "own", "own"]),  # a sliding layer streams
        ([[1, 1], [1, 1], [0, 0]], ["own", "own", "stream"]),  # the full layer streams
    ]:
        with torch.no_grad():
            got = duo_logits(model, ids, torch.tensor(gates, dtype=torch.float32))
        close(got, reference_logits(model, ids, modes))


def _attention_outputs(
    model: LoadedModel, ids: torch.Tensor, gates: torch.Tensor, layer: int
) -> torch.Tensor:
    """The heads' outputs at ``layer`` (the output projection's input ``[B, T, H · d_head]``)."""
    seen: list[torch.Tensor] = []
    o_proj: Any = attention_modules(model)[layer].o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            duo_logits(model, ids, gates)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3", "tiny_gemma2"])
def test_a_mixed_gate_mixes_its_kv_heads_outputs_linearly(name: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(name)
    ids, layer, d = _ids(model), 1, model.d_head
    ones = torch.ones(model.n_layers, model.n_kv_heads)
    streaming = ones.clone()
    streaming[layer] = 0.0
    mixed = ones.clone()
    mixed[layer, 0] = 0.3  # KV head 0 feeds query heads 0 and 1; KV head 1 stays full
    full_out = _attention_outputs(model, ids, ones, layer)
    stream_out = _attention_outputs(model, ids, streaming, layer)
    mixed_out = _attention_outputs(model, ids, mixed, layer)
    group = slice(0, model.group_size * d)
    torch.testing.assert_close(
        mixed_out[..., group], 0.3 * full_out[..., group] + 0.7 * stream_out[..., group]
    )
    assert torch.equal(mixed_out[..., group.stop :], full_out[..., group.stop :])
    assert (full_out - stream_out)[..., group].abs().max() > 1e-2


def test_gradients_reach_the_gates_and_nothing_else(tiny_llama: LoadedModel) -> None:
    ids = _ids(tiny_llama)
    gates = torch.tensor([[1.0, 0.5], [0.0, 0.8], [0.3, 1.0]], requires_grad=True)
    logits = duo_logits(tiny_llama, ids, gates)
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    assert gates.grad is not None and gates.grad.shape == (3, 2)
    assert torch.isfinite(gates.grad).all() and (gates.grad != 0).all()  # gates at 0 and 1 included
    params = [*tiny_llama.native_model.parameters(), *tiny_llama.hf_model.parameters()]  # type: ignore[union-attr]
    assert all(p.grad is None and not p.requires_grad for p in params)
    # d loss / d gate, by a central difference in float64 around gate (1, 1)
    step = 1e-2
    losses = []
    for delta in (step, -step):
        moved = gates.detach().clone()
        moved[1, 1] += delta
        with torch.no_grad():
            out = duo_logits(tiny_llama, ids, moved).double()
        losses.append(torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:]))
    assert abs(float(losses[0] - losses[1]) / (2 * step) - float(gates.grad[1, 1])) < 2e-3 * max(
        1.0, abs(float(gates.grad[1, 1]))
    )


def test_the_streaming_branch_is_skipped_only_where_it_cannot_matter(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    kernel = st.streaming_attention

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(st, "streaming_attention", counted)
    ids = _ids(tiny_llama)
    gates = torch.tensor([[1.0, 1.0], [1.0, 0.9], [0.0, 0.0]])
    with torch.no_grad():
        duo_logits(tiny_llama, ids, gates)
    assert len(calls) == 2  # layer 0 is all 1
    calls.clear()
    duo_logits(tiny_llama, ids, gates.clone().requires_grad_(True))
    assert len(calls) == 3  # its gates' gradient needs the streaming branch


def test_a_kv_cache_decodes_as_the_whole_sequence(tiny_llama: LoadedModel) -> None:
    ids = _ids(tiny_llama)
    gates = torch.tensor([[0.2, 0.9], [0.0, 0.5], [1.0, 0.4]])
    with torch.no_grad(), st.duo_attention(tiny_llama, gates, sink=SINK, recent=RECENT) as native:
        whole = native(input_ids=ids, use_cache=False).logits
        cache = native(input_ids=ids[:, :-4], use_cache=True).cache
        chunk = native(input_ids=ids[:, -4:-1], cache=cache, use_cache=True).logits  # 3 queries
        step = native(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits  # 1 query
    torch.testing.assert_close(chunk, whole[:, -4:-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, whole[:, -1:], atol=1e-5, rtol=1e-5)


def test_a_sliding_window_cache_is_refused(tiny_gemma3: LoadedModel) -> None:
    ids = _ids(tiny_gemma3)
    with (
        torch.no_grad(),
        st.duo_attention(tiny_gemma3, torch.full((3, 2), 0.5), sink=SINK, recent=RECENT) as native,
    ):
        cache = native(input_ids=ids[:, :-1], use_cache=True).cache
        with pytest.raises(ConfigError, match=r"sliding-window cache.*use_cache=False"):
            native(input_ids=ids[:, -1:], cache=cache, use_cache=True)


# ------------------------------------------------------------------------------ refusals


def _untouched(model: LoadedModel) -> Iterator[object]:
    """The attention implementation of the native model and each layer, its pre-hooks, the active blocks."""
    native = model.native_model
    assert native is not None
    yield getattr(native.config, "_attn_implementation", None)
    yield from (getattr(m.config, "_attn_implementation", None) for m in attention_modules(model))
    yield len(native._forward_pre_hooks), len(st._ACTIVE)


def test_bad_arguments_are_refused_before_anything_changes(tiny_llama: LoadedModel) -> None:
    before = list(_untouched(tiny_llama))
    ok = torch.ones(3, 2)
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (torch.ones(3, 4), {}, r"shape \[3, 4\].*\[n_layers, n_kv_heads\] = \[3, 2\]"),
        (torch.ones(2), {}, r"needs \[n_layers, n_kv_heads\]"),
        (torch.full((3, 2), 1.2), {}, r"\[0, 1\].*clamp"),
        (torch.full((3, 2), -0.1), {}, r"\[0, 1\]"),
        (torch.full((3, 2), float("nan")), {}, r"\[0, 1\]"),
        (torch.ones(3, 2, dtype=torch.long), {}, "floating-point tensor"),
        ([[1.0, 1.0]] * 3, {}, "floating-point tensor"),
        (ok, {"sink": 0}, "sink must be a positive int"),
        (ok, {"recent": 0}, "recent must be a positive int"),
        (ok, {"recent": True}, "recent must be an int"),
        (ok, {"sink": 2.0}, "sink must be an int"),
    ]
    for gates, kwargs, match in cases:
        window = {"sink": SINK, "recent": RECENT, **kwargs}
        with pytest.raises(ConfigError, match=match), st.duo_attention(tiny_llama, gates, **window):
            pytest.fail("entered the block")
        assert list(_untouched(tiny_llama)) == before
    for broken, match in [
        (dataclasses.replace(tiny_llama, native_model=None), "native causal language model"),
        (dataclasses.replace(tiny_llama, kind="vision"), "vision model"),
    ]:
        with pytest.raises(ConfigError, match=match), st.duo_attention(broken, ok, sink=SINK, recent=RECENT):
            pytest.fail("entered the block")


def test_bad_inputs_inside_the_block_are_refused_and_the_model_restored(tiny_llama: LoadedModel) -> None:
    before = list(_untouched(tiny_llama))
    batch = tiny_llama.encode([TEXT, "short"])
    gates = torch.full((3, 2), 0.5)
    with st.duo_attention(tiny_llama, gates, sink=SINK, recent=RECENT) as native:
        with pytest.raises(ConfigError, match="padded batches"):
            native(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        native(
            input_ids=batch.input_ids[:1, -5:],
            attention_mask=torch.ones(1, 5, dtype=torch.long),
            use_cache=False,
        )
        with (
            pytest.raises(ConfigError, match="already active"),
            st.duo_attention(tiny_llama, gates, sink=1, recent=2),
        ):
            pytest.fail("entered the block")
        gates[0, 0] = 1.5  # an optimiser step that was not clamped
        with pytest.raises(ConfigError, match=r"left \[0, 1\].*clamp_"):
            native(input_ids=batch.input_ids[:1], use_cache=False)
    assert list(_untouched(tiny_llama)) == before
    with (
        pytest.raises(RuntimeError, match="boom"),
        st.duo_attention(tiny_llama, torch.ones(3, 2), sink=1, recent=2),
    ):
        raise RuntimeError("boom")
    assert list(_untouched(tiny_llama)) == before
