"""Capture end to end on tiny models and the real one: modes agree, padding is invisible, hooks go."""

from __future__ import annotations

import pytest
import torch

from analyses.census import CensusConfig, run_census
from probe import capture as capture_module
from probe import moments
from probe.capture import capture
from probe.errors import CaptureError, ConfigError, ContextTooLongError
from probe.loading import LoadedModel
from probe.moments import AttentionMoments, MomentStack, attention_moments, pattern_moments
from probe.reducers import (
    ColumnImportance,
    DiagonalScore,
    KeepPatterns,
    MeanDistance,
    PatternReducer,
    RowEntropy,
)


def random_rows(n: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


def reducers() -> list[PatternReducer]:
    return [RowEntropy(), MeanDistance(), DiagonalScore(1), ColumnImportance()]


def no_hooks_left(model: LoadedModel) -> bool:
    assert model.bridge is not None
    return not any(point.has_hooks() for point in model.bridge.hook_dict.values())


def test_eager_and_recompute_give_the_same_numbers(tiny_model: LoadedModel) -> None:
    rows = random_rows(5, [20, 33, 7, 50, 12])
    eager, recompute = reducers(), reducers()
    capture(tiny_model, rows, eager, mode="eager", batch_size=3, progress=False)
    capture(tiny_model, rows, recompute, mode="recompute", batch_size=3, query_block=8, progress=False)
    for a, b in zip(eager, recompute, strict=True):
        assert torch.allclose(a.result(), b.result(), atol=1e-4, equal_nan=True), a.name
    assert no_hooks_left(tiny_model)


@pytest.mark.parametrize("mode", ["eager", "recompute"])
def test_a_sequence_alone_and_left_padded_in_a_batch_score_the_same(
    tiny_model: LoadedModel, mode: str
) -> None:
    rows = random_rows(3, [40, 9, 25])
    batched, alone = reducers(), reducers()
    capture(tiny_model, rows, batched, mode=mode, batch_size=3, progress=False)  # type: ignore[arg-type]
    capture(tiny_model, rows[1:2], alone, mode=mode, batch_size=1, progress=False)  # type: ignore[arg-type]
    for a, b in zip(alone, batched, strict=True):
        single, padded = a.result()[0], b.result()[1]
        padded = padded[..., : single.shape[-1]] if single.dim() == 3 else padded
        assert torch.allclose(single, padded, atol=1e-5, equal_nan=True), a.name


def test_hooks_are_removed_after_an_error_inside_a_reducer(tiny_llama: LoadedModel) -> None:
    class Exploding(RowEntropy):
        def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
            if layer == 1:
                raise RuntimeError("reducer failed")
            super().update(layer, rows, q_start)

        def update_moments(self, layer: int | slice, moments: AttentionMoments) -> None:
            if layer == 1 or isinstance(layer, slice):  # a recompute capture hands every layer at once
                raise RuntimeError("reducer failed")
            super().update_moments(layer, moments)

    with pytest.raises(RuntimeError, match="reducer failed"):
        capture(tiny_llama, random_rows(2, [10]), [Exploding()], progress=False)
    assert no_hooks_left(tiny_llama)
    with pytest.raises(RuntimeError, match="reducer failed"):
        capture(tiny_llama, random_rows(2, [10]), [Exploding()], mode="recompute", progress=False)
    assert capture_module._RecomputeState.active is None
    # and the model still runs through the bridge afterwards
    capture(tiny_llama, random_rows(1, [10]), [RowEntropy()], progress=False)


def test_a_layer_that_produces_no_rows_fails_loudly_naming_it(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = capture_module._RecomputeState.__init__

    def drop_layer_1(self, layer_of, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, {k: v for k, v in layer_of.items() if v != 1}, *args, **kwargs)

    monkeypatch.setattr(capture_module._RecomputeState, "__init__", drop_layer_1)
    with pytest.raises(CaptureError, match=r"layers \[1\]"):
        capture(tiny_llama, random_rows(1, [10]), [RowEntropy()], mode="recompute", progress=False)


def test_bad_arguments_are_refused(tiny_gpt2: LoadedModel) -> None:
    with pytest.raises(ConfigError):
        capture(tiny_gpt2, [], [RowEntropy()], progress=False)
    with pytest.raises(ConfigError):
        capture(tiny_gpt2, random_rows(1, [5]), [RowEntropy()], mode="fused", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ContextTooLongError):
        capture(tiny_gpt2, random_rows(1, [300]), [RowEntropy()], progress=False)


def test_census_on_a_tiny_model_has_one_row_per_head(tiny_llama: LoadedModel) -> None:
    cfg = CensusConfig(n_natural=3, seq_len=24, n_repeated=2, repeat_len=6, n_examples=1)
    result = run_census(tiny_llama, cfg, progress=False)
    heads = result.heads
    assert len(heads) == tiny_llama.n_layers * tiny_llama.n_heads
    assert list(heads.groupby("head")["kv_head"].first()) == [0, 0, 1, 1]
    assert heads[["entropy", "alpha_0", "prev_token", "induction", "duplicate_token"]].notna().all().all()
    assert ((heads["alpha_0"] >= 0) & (heads["alpha_0"] <= 1)).all()
    assert result.arrays["example_patterns"].shape[:3] == (1, 3, 4)


def test_census_of_long_rows_keeps_only_their_first_positions_patterns(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example patterns of a long census are the first 256 positions' (equal to the full rows'
    patterns there: causal attention does not look ahead), and the statistics' captures run on the
    moments path (no reducer that needs rows)."""
    from analyses import census

    modes: list[tuple[str, bool]] = []
    real_capture = census.capture

    def spy(model, rows, reducers, **kwargs):  # type: ignore[no-untyped-def]
        modes.append((kwargs["mode"], all(r.supports_moments for r in reducers)))
        return real_capture(model, rows, reducers, **kwargs)

    monkeypatch.setattr(census, "capture", spy)
    cfg = CensusConfig(n_natural=2, seq_len=300, n_repeated=2, repeat_len=150, n_examples=1, mode="recompute")
    result = run_census(tiny_llama, cfg, progress=False)
    kept = result.arrays["example_patterns"]
    assert kept.shape == (1, tiny_llama.n_layers, tiny_llama.n_heads, 256, 256)
    assert len(result.tables["examples"]) == 256
    assert modes[:2] == [("recompute", True), ("recompute", True)]  # the statistics: moments only
    full = KeepPatterns(n_samples=1, max_tokens=400)
    row = [int(t) for t in result.tables["examples"]["token_id"]][1:]  # BOS is prepended again
    natural = census.natural_token_rows(tiny_llama.tokenizer, 2, 300, 0)[0]
    assert row == natural[:255]
    real_capture(tiny_llama, [natural], [full], mode="eager", progress=False)
    want = full.result()[0, :, :, :256, :256].numpy()
    assert abs(kept[0].astype("float32") - want).max() < 1e-3  # float16 storage


@pytest.mark.real
def test_census_on_the_real_model_finds_induction_and_previous_token_heads(smollm: LoadedModel) -> None:
    cfg = CensusConfig(n_natural=8, n_repeated=6, seq_len=96, repeat_len=24, n_examples=1)
    eager = run_census(smollm, cfg, progress=False).heads
    recompute = run_census(
        smollm, CensusConfig(**{**cfg.__dict__, "mode": "recompute"}), progress=False
    ).heads
    metrics = ["entropy", "alpha_0", "prev_token", "mean_distance", "induction", "duplicate_token"]
    assert (eager[metrics] - recompute[metrics]).abs().max().max() < 1e-4
    assert eager["induction"].max() > 0.5, "SmolLM2 has induction heads (census measured ~0.89)"
    assert eager["prev_token"].max() > 0.5
    top = eager.nlargest(1, "induction").iloc[0]
    assert top["induction"] > 5 * eager["induction"].median()


@pytest.mark.parametrize(
    ("window", "softcap", "pattern_rows"),
    [(None, None, None), (5, None, None), (None, 1.5, None), (5, 1.5, None), (5, None, 3)],
)
def test_moments_equal_the_statistics_of_explicit_rows(
    window: int | None, softcap: float | None, pattern_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both moment paths (from q/k without a T×T tensor, and from the pattern) against explicit rows,
    with left padding and grouped-query heads, with and without soft-capped scores; the pattern's
    PyTorch path also in blocks of ``pattern_rows`` query rows (the last one short)."""
    torch.manual_seed(0)
    b, H, H_kv, T, d = 2, 4, 2, 13, 16
    if pattern_rows is not None:
        monkeypatch.setattr(moments, "PATTERN_BLOCK_ELEMENTS", pattern_rows * b * H * T)
    q, k = torch.randn(b, H, T, d), torch.randn(b, H_kv, T, d)
    pads = torch.tensor([0, 4])
    kk = k.repeat_interleave(H // H_kv, dim=1)
    s = q @ kk.transpose(-1, -2) / d**0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    t = torch.arange(T)
    allowed = (t[None, :] <= t[:, None])[None] & (t[None, None, :] >= pads[:, None, None])
    if window is not None:
        allowed = allowed & (t[None, :] > t[:, None] - window)[None]
    p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
    from_qk = attention_moments(
        q,
        k,
        pad_offsets=pads,
        sliding_window=window,
        softcap=softcap,
        diag_offsets=(1, 3),
        block=4,
        use_triton=False,
    )
    from_pattern = pattern_moments(p, pad_offsets=pads, diag_offsets=(1, 3), use_triton=False)
    for m in (from_qk, from_pattern):
        for i in range(b):
            r = slice(int(pads[i]), T)
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
            assert torch.allclose(m.entropy[i][:, r], ent[i][:, r], atol=1e-5)
            assert torch.allclose(m.mean_key[i][:, r], (p @ t.float())[i][:, r], atol=1e-4)
            real_q = (t >= pads[i]).float()
            assert torch.allclose(m.colsum[i], torch.einsum("hqk,q->hk", p[i], real_q), atol=1e-5)
            for o in (1, 3):
                diag = torch.stack(
                    [p[i, :, tt, tt - o] if tt - o >= int(pads[i]) else torch.zeros(H) for tt in range(T)], -1
                )
                assert torch.allclose(m.diag(o)[i], diag, atol=1e-6)


def test_moments_written_into_a_stack_equal_the_plain_ones() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 11, 16), torch.randn(2, 2, 11, 16)
    pads = torch.tensor([0, 3])
    plain = attention_moments(q, k, pad_offsets=pads, diag_offsets=(1, 4), use_triton=False)
    stack = MomentStack(3, 2, 4, 11, (1, 4), q.device)
    got = attention_moments(q, k, pad_offsets=pads, diag_offsets=(1, 4), use_triton=False, out=(stack, 2))
    for name in ("entropy", "mean_key", "colsum"):
        assert torch.equal(getattr(got, name), getattr(plain, name))
        assert torch.equal(getattr(stack, name)[2], getattr(plain, name))
        assert not getattr(stack, name)[:2].any()  # other layers untouched
    assert torch.equal(stack.stacked().diag(4)[2], plain.diag(4))
    with pytest.raises(ValueError, match="same diag_offsets"):
        attention_moments(q, k, diag_offsets=(2,), use_triton=False, out=(stack, 0))


def test_the_kernels_tune_once_per_power_of_two_of_the_length() -> None:
    """The Triton autotuners key on the length's power-of-two bucket: prompts of 5,000 and 8,000
    tokens share one tuning, 8,193 starts the next; short ones share the smallest."""
    from probe.moments_triton import length_key

    assert length_key(5000) == length_key(8000) == length_key(8192) == 8192
    assert length_key(8193) == 16384
    assert length_key(1) == length_key(700) == length_key(1024) == 1024
    assert length_key(131072) == 131072


def test_reducers_fed_every_layer_at_once_equal_those_fed_layer_by_layer(tiny_llama: LoadedModel) -> None:
    """A recompute capture hands stacked moments to reducers that take them and per-layer views to
    the others: both give the same numbers."""

    class LayerByLayer(RowEntropy):
        stacked_moments = False

        def __init__(self) -> None:
            super().__init__()
            self.layers: list[int | slice] = []

        def update_moments(self, layer: int | slice, moments: AttentionMoments) -> None:
            self.layers.append(layer)
            super().update_moments(layer, moments)

    rows = random_rows(3, [17, 30, 9])
    stacked, per_layer = RowEntropy(), LayerByLayer()
    capture(tiny_llama, rows, [stacked, per_layer], mode="recompute", batch_size=3, progress=False)
    assert per_layer.layers == list(range(tiny_llama.n_layers))
    assert torch.allclose(stacked.result(), per_layer.result(), atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("mask", ["causal", "sdpa-bool", "eager-float"])
def test_softcapped_attention_equals_transformers_eager(mask: str) -> None:
    """The blockwise soft-capped kernel against transformers' eager formula (Gemma 2), with grouped
    KV heads, a left-padded row, a sliding window and a KV cache offset; the cap binds (scores >> cap)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from probe.kernels import softcapped_attention

    torch.manual_seed(3)
    b, H, H_kv, T, n_keys, d, window, cap = 2, 4, 2, 9, 12, 8, 6, 2.0
    q, k, v = (
        torch.randn(b, H, T, d) * 3,
        torch.randn(b, H_kv, n_keys, d) * 3,
        torch.randn(b, H_kv, n_keys, d),
    )
    pos, key_pos = torch.arange(T) + n_keys - T, torch.arange(n_keys)
    visible = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - window)
    visible = visible[None, None].expand(b, 1, T, n_keys).clone()
    if mask != "causal":
        visible[1, :, :, :3] = False  # row 1 is left-padded by 3 keys
    lowest = torch.finfo(torch.float32).min
    additive = torch.zeros(b, 1, T, n_keys).masked_fill(~visible, lowest)
    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim, module.training = H // H_kv, d, False  # type: ignore[assignment]
    want, _ = eager_attention_forward(module, q, k, v, additive, scaling=d**-0.5, softcap=cap)
    given = {"causal": None, "sdpa-bool": visible, "eager-float": additive}[mask]
    got = softcapped_attention(q, k, v, given, d**-0.5, cap, sliding_window=window, block=4)
    assert got.shape == want.shape == (b, T, H, d)
    assert torch.allclose(got, want, atol=1e-6)
    uncapped, _ = eager_attention_forward(module, q, k, v, additive, scaling=d**-0.5)
    assert (uncapped - want).abs().max() > 0.1  # the cap changes the answer: the check could fail


def test_soft_capped_models_run_the_blocked_kernel_not_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 2's classes declare no SDPA support; the fast path must still be the blocked soft-capped
    kernel (eager's [b, h, T, T] weights OOM at 32K on an 80 GB GPU), and give eager's logits and
    greedy tokens."""
    import probe
    from probe import families, kernels
    from probe.kernels import SOFTCAP_IMPL, fast_implementation, native_attention

    hf, tok = families.build("gemma2")
    model = probe.wrap(hf, tok, name="tiny-gemma2", device="cpu", dtype="float32")
    assert fast_implementation(model) == SOFTCAP_IMPL
    calls = []
    kernel = kernels.softcapped_attention
    monkeypatch.setattr(kernels, "softcapped_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with native_attention(model) as native:
            fast = native(input_ids=ids, use_cache=False).logits
        assert len(calls) == model.n_layers
        with native_attention(model, "eager") as native:
            eager = native(input_ids=ids, use_cache=False).logits
    assert torch.allclose(fast, eager, atol=1e-5)
    batch = model.batch_from_ids([ids[0].tolist()])
    ours = model.generate(batch, max_new_tokens=8)
    with native_attention(model, "eager") as native:
        reference = native.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=8, do_sample=False
        )
    assert torch.equal(ours, reference)
