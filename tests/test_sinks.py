"""Attention sinks: alpha and Sink on hand-built patterns, padding invariance, the run end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import analyses.sinks as sinks
from analyses import runstore
from analyses.base import config_from_overrides
from analyses.sinks import (
    SinkReducer,
    SinksConfig,
    TokenNorms,
    measure_sinks,
    run_sinks,
    sink_percent,
    sink_percent_of_mean_alpha,
    sink_share,
)
from analyses.sinks.tables import eligible
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.reducers import BatchInfo, ColumnImportance, PatternReducer
from tests.conftest import fixed_revision, real_model

# ------------------------------------------------------------------------------ hand-built patterns


def uniform_causal(T: int) -> torch.Tensor:
    """A[t, k] = 1/(t+1) for k <= t."""
    return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).float()[:, None]


def to_first(T: int) -> torch.Tensor:
    A = torch.zeros(T, T)
    A[:, 0] = 1.0
    return A


def previous_token(T: int) -> torch.Tensor:
    A = torch.zeros(T, T)
    A[0, 0] = 1.0
    for t in range(1, T):
        A[t, t - 1] = 1.0
    return A


def feed(
    reducer: PatternReducer,
    samples: list[list[list[torch.Tensor]]],
    *,
    pads: list[int] | None = None,
    block: int | None = None,
) -> None:
    """One batch: ``samples[b][layer][head]`` is a [T_b, T_b] pattern; sample b is left-padded to the
    longest (plus ``pads[b]`` extra), pad rows hold junk that must be ignored."""
    n_layers, n_heads = len(samples[0]), len(samples[0][0])
    lengths = [s[0][0].shape[0] for s in samples]
    extra = pads or [0] * len(samples)
    width = max(n + p for n, p in zip(lengths, extra, strict=True))
    offsets = [width - n for n in lengths]
    full = torch.zeros(len(samples), n_layers, n_heads, width, width)
    for b, sample in enumerate(samples):
        off = offsets[b]
        for layer in range(n_layers):
            for h in range(n_heads):
                full[b, layer, h] = uniform_causal(width)  # junk in pad rows/columns
                full[b, layer, h, off:, :off] = 0.0
                full[b, layer, h, off:, off:] = sample[layer][h]
    info = BatchInfo(
        lengths=torch.tensor(lengths),
        pad_offsets=torch.tensor(offsets),
        T=width,
        n_layers=n_layers,
        n_heads=n_heads,
    )
    reducer.begin_batch(info)
    step = block or width
    for layer in range(n_layers):
        for q0 in range(0, width, step):
            reducer.update(layer, full[:, layer, :, q0 : q0 + step], q0)
    reducer.end_batch()


def test_alpha_is_the_papers_column_importance() -> None:
    T = 16
    red = ColumnImportance()
    feed(red, [[[to_first(T), uniform_causal(T), previous_token(T)]]])
    alpha = red.result()[0, 0]  # [heads, T]
    assert alpha[0, 0] == 1.0 and torch.all(alpha[0, 1:] == 0)
    harmonic = [sum(1 / (t + 1) for t in range(k, T)) / (T - k) for k in range(T)]
    assert torch.allclose(alpha[1], torch.tensor(harmonic), atol=1e-6)
    # previous-token head: key k < T-1 gets one query (k+1) of the T-k that see it; k = 0 gets two
    expected_prev = [2 / T] + [1 / (T - k) for k in range(1, T - 1)] + [0.0]
    assert torch.allclose(alpha[2], torch.tensor(expected_prev), atol=1e-6)


def test_two_first_token_heads_and_one_uniform_give_two_thirds() -> None:
    T = 16  # uniform alpha_0 = H_16 / 16 = 0.211 < 0.3 (at T = 8 it would be 0.34: a "sink")
    assert sum(1 / t for t in range(1, T + 1)) / T < 0.3
    red = SinkReducer(eps=0.3)
    feed(red, [[[to_first(T), to_first(T), uniform_causal(T)]]])  # one sample, one layer, 3 heads
    assert red.share()[0, 0].item() == pytest.approx(2 / 3)
    assert red.percent(0) == pytest.approx(200 / 3)
    assert torch.all(red.share()[0, 1:] == 0)  # no other position is a sink for any head
    # two layers, two samples: the share is over all (layer, head), then over samples
    red2 = SinkReducer(eps=0.3)
    sample_a = [[to_first(T), uniform_causal(T)], [to_first(T), to_first(T)]]  # 3 of 4 heads
    sample_b = [[uniform_causal(T), uniform_causal(T)], [to_first(T), uniform_causal(T)]]  # 1 of 4
    feed(red2, [sample_a, sample_b])
    assert red2.share()[:, 0].tolist() == pytest.approx([0.75, 0.25])
    assert red2.percent(0) == pytest.approx(50.0)


def test_per_sample_threshold_differs_from_thresholding_the_mean_alpha() -> None:
    T = 16
    # One head. Sample A: a full sink (alpha_0 = 1); sample B: previous-token (alpha_0 = 2/T).
    red = SinkReducer(eps=0.3)
    feed(red, [[[to_first(T)]], [[previous_token(T)]]])
    alpha = red.alpha()
    assert alpha[:, 0, 0, 0].tolist() == pytest.approx([1.0, 2 / T])
    assert sink_percent(alpha, 0.3) == pytest.approx(50.0)  # the paper: 1 of 2 samples
    assert sink_percent_of_mean_alpha(alpha, 0.3) == pytest.approx(100.0)  # mean 0.56 > 0.3
    # and the other way round: three samples just above eps, one at zero -> mean below eps
    A_hi = 0.32 * to_first(T) + 0.68 * previous_token(T)
    A_hi[0] = torch.nn.functional.one_hot(torch.tensor(0), T).float()
    red2 = SinkReducer(eps=0.3)
    feed(red2, [[[A_hi]], [[A_hi]], [[previous_token(T)]], [[previous_token(T)]]])
    a0 = red2.alpha()[:, 0, 0, 0]
    assert float(a0[0]) > 0.3 and float(a0.mean()) < 0.3
    assert sink_percent(red2.alpha(), 0.3) == pytest.approx(50.0)
    assert sink_percent_of_mean_alpha(red2.alpha(), 0.3) == pytest.approx(0.0)


def test_a_hidden_sink_at_a_later_position_shows_in_the_position_map() -> None:
    T, k = 16, 5
    hidden = torch.zeros(T, T)
    for t in range(T):
        hidden[t, t if t < k else k] = 1.0  # queries >= k all attend to k; earlier ones to themselves
    red = SinkReducer(eps=0.3)
    feed(red, [[[to_first(T), hidden, uniform_causal(T), uniform_causal(T)]]])
    share = red.share()[0]
    assert share[0].item() == pytest.approx(0.25) and share[k].item() == pytest.approx(0.25)
    assert red.alpha()[0, 0, 1, k].item() == 1.0
    # the last position's alpha is one weight (its self-attention): a self-attending head makes it a
    # "sink" at k = T-1, which is why hidden sinks need hidden_min_queries queries
    assert red.alpha()[0, 0, 1, T - 1].item() == 0.0
    assert eligible(T, 8) == slice(1, T - 7)


def test_padding_and_query_blocks_do_not_change_alpha_or_sink() -> None:
    torch.manual_seed(0)
    T = 12
    scores = torch.randn(2, 3, T, T) * 3
    scores = scores.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    pats = torch.softmax(scores, -1)
    sample = [[pats[layer, h] for h in range(3)] for layer in range(2)]
    alone, padded = SinkReducer(0.3), SinkReducer(0.3)
    feed(alone, [sample])
    short = [[uniform_causal(5) for _ in range(3)] for _ in range(2)]
    feed(padded, [short, sample], pads=[0, 4], block=5)
    assert torch.allclose(alone.alpha()[0], padded.alpha()[1, ..., :T], atol=1e-6)
    assert torch.equal(alone.share()[0], padded.share()[1, :T])
    assert torch.isnan(padded.alpha()[0, ..., 5:]).all()  # beyond the short sample's length
    assert torch.isnan(sink_share(padded.alpha(), 0.3)[0, 5:]).all()


def test_sink_reducer_rejects_a_bad_threshold() -> None:
    with pytest.raises(ConfigError, match="eps"):
        SinkReducer(eps=1.5)


# ------------------------------------------------------------------------------ on a tiny model


def _rows(n: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


@pytest.mark.parametrize("mode", ["eager", "recompute"])
def test_a_sequence_alone_and_left_padded_give_the_same_sink_alpha_and_norms(
    tiny_llama: LoadedModel, mode: str
) -> None:
    rows = _rows(3, [40, 9, 25])
    batched, batched_norms = measure_sinks(tiny_llama, rows, mode=mode, batch_size=3, eps=0.1)  # type: ignore[arg-type]
    alone, alone_norms = measure_sinks(tiny_llama, rows[1:2], mode=mode, batch_size=1, eps=0.1)  # type: ignore[arg-type]
    n = len(rows[1]) + 1  # BOS prepended by the tiny llama's policy
    single, padded = alone.alpha()[0], batched.alpha()[1]
    assert single.shape[-1] == n
    assert torch.allclose(single, padded[..., :n], atol=1e-5)
    assert torch.isnan(padded[..., n:]).all()
    assert torch.equal(alone.share()[0], batched.share()[1, :n])
    assert alone_norms is not None and batched_norms is not None
    assert torch.allclose(alone_norms.result()[0], batched_norms.result()[1], rtol=1e-4, atol=1e-5)


def test_eager_and_recompute_agree_on_alpha_and_norms(tiny_llama: LoadedModel) -> None:
    rows = _rows(4, [30, 17])
    eager, eager_norms = measure_sinks(tiny_llama, rows, mode="eager", batch_size=2)
    rec, rec_norms = measure_sinks(tiny_llama, rows, mode="recompute", batch_size=3, query_block=8)
    assert torch.allclose(eager.alpha(), rec.alpha(), atol=1e-4, equal_nan=True)
    assert eager_norms is not None and rec_norms is not None
    assert torch.allclose(eager_norms.result(), rec_norms.result(), rtol=1e-4)
    assert tiny_llama.bridge is not None
    assert not any(point.has_hooks() for point in tiny_llama.bridge.hook_dict.values())


def test_token_norms_match_a_direct_computation(tiny_llama: LoadedModel) -> None:
    from probe.hooks import hooks

    rows = _rows(2, [11, 6])
    _, norms = measure_sinks(tiny_llama, rows, batch_size=2)
    assert norms is not None
    got: dict[str, torch.Tensor] = {}

    def keep(name: str):  # type: ignore[no-untyped-def]
        def fn(act: torch.Tensor, hook: object) -> None:
            got[name] = act.detach().clone()

        return fn

    names = ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_rot_k", "blocks.1.attn.hook_v"]
    ids = tiny_llama.batch_from_ids([rows[1]]).input_ids  # alone: no padding
    assert tiny_llama.bridge is not None
    with hooks(tiny_llama, [(n, keep(n)) for n in names]):
        tiny_llama.bridge(ids)
    result = norms.result()[1, 1]  # sample 1, layer 1: [1 + 2 n_kv, 2]
    hidden = got[names[0]][0].norm(dim=-1)
    assert result[0, 0].item() == pytest.approx(hidden[0].item(), rel=1e-4)
    assert result[0, 1].item() == pytest.approx(hidden[1:].mean().item(), rel=1e-4)
    keys = got[names[1]][0].norm(dim=-1)  # [T, n_kv]
    values = got[names[2]][0].norm(dim=-1)
    n_kv = tiny_llama.n_kv_heads
    assert torch.allclose(result[1 : 1 + n_kv, 0], keys[0], rtol=1e-4)
    assert torch.allclose(result[1 : 1 + n_kv, 1], keys[1:].mean(0), rtol=1e-4)
    assert torch.allclose(result[1 + n_kv :, 0], values[0], rtol=1e-4)
    assert TokenNorms(3, n_kv).columns("value") == slice(1 + n_kv, 1 + 2 * n_kv)


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "qwen3"])
def test_key_norms_are_those_of_the_keys_transformers_attends_with(family: str, tmp_path: Path) -> None:
    """The fused-qkv bridges (Phi-3, GPT-NeoX) declare hook_rot_k but never fire it: the key norms
    come from hook_k there (RoPE keeps norms), and equal the norms of the keys transformers' own
    attention receives (after q/k norm and RoPE: Qwen3 reads hook_rot_k)."""
    import probe
    from probe.families import save_checkpoint
    from probe.kernels import attention_modules, native_attention, register_attention

    model = probe.load_model(str(save_checkpoint(family, tmp_path / family)), device="cpu")
    want_hook = "hook_rot_k" if family == "qwen3" else "hook_k"
    assert sinks.key_hooks(model) == [want_hook] * model.n_layers
    rows = _rows(1, [12])
    _, norms = measure_sinks(model, rows, batch_size=1)
    assert norms is not None
    layer_of = {id(m): i for i, m in enumerate(attention_modules(model))}
    keys: dict[int, torch.Tensor] = {}

    def record(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        keys[layer_of[id(module)]] = key[0].norm(dim=-1)  # [n_kv, T]: the keys it attends with
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    register_attention(f"test_sinks_keys_{family}", record)  # registered once per name and process
    with native_attention(model, f"test_sinks_keys_{family}") as native, torch.no_grad():
        native(input_ids=model.batch_from_ids(rows).input_ids)
    got = norms.result()[0]  # [L, 1 + 2 n_kv, 2]
    cols = norms.columns("key")
    for layer in range(model.n_layers):
        torch.testing.assert_close(got[layer, cols, 0], keys[layer][:, 0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[layer, cols, 1], keys[layer][:, 1:].mean(-1), rtol=1e-4, atol=1e-6)


def test_input_sets(tiny_llama: LoadedModel) -> None:
    tok = tiny_llama.tokenizer
    special = set(tok.all_special_ids)
    rand = sinks.input_rows(tok, "random", 5, 30, seed=0)
    assert len(rand) == 5 and all(len(r) == 30 for r in rand)
    assert not special & {t for r in rand for t in r}
    rep = sinks.input_rows(tok, "repeated", 6, 20, seed=0)
    assert all(len(set(r)) == 1 and len(r) == 20 for r in rep)
    assert len({r[0] for r in rep}) > 1  # a different token per sequence
    assert not special & {r[0] for r in rep}
    assert sinks.input_rows(tok, "random", 5, 30, seed=0) == rand  # seeded
    assert sinks.input_rows(tok, "random", 5, 30, seed=1) != rand
    nat = sinks.input_rows(tok, "natural", 3, 25, seed=0)
    assert all(len(r) == 25 for r in nat)
    with pytest.raises(ConfigError, match="unknown input set"):
        sinks.input_rows(tok, "poetry", 1, 5, seed=0)


def test_config_validation() -> None:
    cfg = config_from_overrides(SinksConfig, ["inputs=natural,repeated", "eps=0.2", "seq_len=32"])
    assert cfg.inputs == ("natural", "repeated") and cfg.eps == 0.2
    for bad, match in [
        (["eps=1.2"], "eps"),
        (["inputs=natural,poetry"], "unknown input set"),
        (["inputs=natural,natural"], "twice"),
        (["seq_len=2"], "seq_len"),
        (["hidden_min_queries=64"], "hidden_min_queries"),
        (["hidden_min_share=0"], "hidden_min_share"),
        (["n_examples=200"], "n_examples"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config_from_overrides(SinksConfig, bad)


SMALL = SinksConfig(seq_len=24, n_sequences=6, batch_size=4, n_examples=2, hidden_min_queries=4)


def test_run_sinks_on_a_tiny_model_writes_every_table(
    tiny_llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_sinks(tiny_llama, SMALL, progress=False)
    L, H, T = tiny_llama.n_layers, tiny_llama.n_heads, SMALL.seq_len
    heads = result.heads
    assert len(heads) == L * H and {"layer", "head", "kv_head"} <= set(heads.columns)
    for s in sinks.INPUT_SETS:
        for metric in sinks.HEAD_METRICS:
            assert f"{metric}_{s}" in heads.columns
        assert heads[f"alpha0_{s}"].between(0, 1).all()
        assert result.arrays[f"alpha_{s}"].shape == (L, H, T)
        assert result.arrays[f"example_alpha_{s}"].shape == (2, L, H, T)
    summary = result.tables["summary"]
    assert list(summary["input_set"]) == list(sinks.INPUT_SETS)
    assert (summary["seq_len"] == T).all() and summary["bos_prepended"].all()
    assert (summary["first_token"] == tiny_llama.bos.token).all()
    positions = result.tables["positions"]
    assert len(positions) == 3 * T
    # sink_1 is the position map at k = 0 and equals the mean over heads of the per-head sink rate
    for s in sinks.INPUT_SETS:
        row = summary[summary["input_set"] == s].iloc[0]
        p0 = positions[(positions["input_set"] == s) & (positions["position"] == 0)].iloc[0]
        assert row["sink_1"] == pytest.approx(p0["sink_pct"], abs=1e-6)
        assert row["sink_1"] == pytest.approx(100 * heads[f"sink_rate_{s}"].mean(), abs=1e-4)
    elig = positions[positions["hidden_eligible"]]["position"]
    assert elig.min() == 1 and elig.max() == T - SMALL.hidden_min_queries
    examples = result.tables["examples"]
    assert len(examples) == 3 * 2 * T
    first = examples[(examples["input_set"] == "natural") & (examples["example"] == 0)]
    assert first["token"].iloc[0] == tiny_llama.bos.token
    norms = result.tables["norms"]
    assert len(norms) == 3 * L * 3 and set(norms["quantity"]) == set(sinks.QUANTITIES)
    assert np.allclose(norms["ratio"], norms["sink_norm"] / norms["other_norm"])
    assert len(result.tables["norms_kv"]) == 3 * L * (1 + 2 * tiny_llama.n_kv_heads)
    assert result.notes["key_hook"] == "hook_rot_k"
    assert result.model_info["bos"]["prepend"] is True
    assert "Sink_1" in sinks.summary(result)
    # the run store keeps every table and array
    monkeypatch.setattr(runstore, "code_revision", fixed_revision)
    run = runstore.open_run(result.save(tmp_path))
    assert run.analysis == "sinks" and set(result.tables) <= set(run.table_names)
    pd.testing.assert_frame_equal(run.table("summary"), summary)


def test_recompute_run_matches_eager_run(tiny_llama: LoadedModel) -> None:
    small = SinksConfig(seq_len=20, n_sequences=4, inputs=("random",), n_examples=0)
    eager = run_sinks(tiny_llama, small, progress=False)
    rec = run_sinks(tiny_llama, SinksConfig(**{**small.__dict__, "mode": "recompute"}), progress=False)
    np.testing.assert_allclose(eager.arrays["alpha_random"], rec.arrays["alpha_random"], atol=1e-4)
    np.testing.assert_allclose(eager.tables["norms"]["ratio"], rec.tables["norms"]["ratio"], rtol=1e-4)
    assert "examples" not in eager.tables


def test_gpt2_without_bos_and_without_rotary_keys(tiny_gpt2: LoadedModel) -> None:
    small = SinksConfig(seq_len=16, n_sequences=3, inputs=("repeated",), n_examples=1, hidden_min_queries=4)
    result = run_sinks(tiny_gpt2, small, progress=False)
    assert result.notes["key_hook"] == "hook_k"
    summary = result.tables["summary"].iloc[0]
    assert not summary["bos_prepended"]
    ex = result.tables["examples"]
    assert ex["token_id"].nunique() == 1  # no BOS: the repeated token fills all 16 positions
    assert len(result.tables["norms_kv"]) == tiny_gpt2.n_layers * (1 + 2 * tiny_gpt2.n_heads)


def test_context_longer_than_the_model_allows(tiny_llama: LoadedModel) -> None:
    from probe.errors import ContextTooLongError

    with pytest.raises(ContextTooLongError):
        run_sinks(
            tiny_llama, SinksConfig(seq_len=tiny_llama.n_ctx + 1, n_sequences=1, n_examples=1), progress=False
        )


# ------------------------------------------------------------------------------ the real model

REAL = SinksConfig(n_sequences=12, batch_size=12, n_examples=1)


@pytest.mark.real
def test_smollm2_sinks_natural_and_random_but_none_on_repeated_tokens(smollm: LoadedModel) -> None:
    """Measured with the default config (T=64, 100 sequences, eps=0.3), SmolLM2-135M (no BOS by its
    tokenizer's default): Sink_1 ≈ 73% natural, ≈ 79% random, 0.00% repeated. A RoPE model
    loses the first-token sink when every token is the same (Gu et al., Proposition 4): it holds.
    The first token has a massive hidden state (≈ 100x the others from layer 12 on) but *smaller*
    keys and values than the other tokens (the papers' "key bias" picture)."""
    result = run_sinks(smollm, REAL, progress=False)
    summary = result.tables["summary"].set_index("input_set")
    assert not summary["bos_prepended"].any()
    assert 55 < summary.loc["natural", "sink_1"] < 90
    assert 60 < summary.loc["random", "sink_1"] < 95
    assert summary.loc["repeated", "sink_1"] < 1.0
    norms = result.tables["norms"]
    nat = norms[norms["input_set"] == "natural"].set_index(["quantity", "layer"])["ratio"]
    assert nat.loc["hidden"].loc[12:].min() > 10  # massive activation of the first token
    assert nat.loc["key"].loc[12:].max() < 1.0 and nat.loc["value"].loc[12:].max() < 1.0
    rep = norms[(norms["input_set"] == "repeated") & (norms["quantity"] == "hidden")]
    assert np.allclose(rep["ratio"], 1.0, atol=0.05)  # identical tokens: identical states
    # hidden sinks on natural text: " the" is the most frequent listed hidden-sink token
    hidden = result.tables["hidden_sinks"]
    assert (hidden["position"] >= 1).all()
    nat_tokens = hidden[hidden["input_set"] == "natural"]["token"].value_counts()
    assert nat_tokens.index[0] == " the"


@pytest.mark.real
def test_gemma3_keeps_the_bos_sink_on_repeated_tokens() -> None:
    """Gemma 3 prepends <bos> (its tokenizer's default): the first token differs from the repeated
    one, and the BOS sink stays (measured, default config: ≈ 77% natural, ≈ 79% random, ≈ 64%
    repeated)."""
    gemma = real_model("gemma3-270m")
    cfg = SinksConfig(n_sequences=6, batch_size=6, n_examples=0, norms=False)
    summary = run_sinks(gemma, cfg, progress=False).tables["summary"].set_index("input_set")
    assert summary["bos_prepended"].all() and (summary["first_token"] == "<bos>").all()
    assert summary.loc["natural", "sink_1"] > 60 and summary.loc["random", "sink_1"] > 60
    assert summary.loc["repeated", "sink_1"] > 40
    assert math.isfinite(summary.loc["repeated", "sink_1_sem"])


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "qwen3", "gemma2"])
def test_recompute_norms_come_from_the_same_native_forward(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In recompute mode the token norms are read from the native forward (the layers' inputs, the
    keys and values the attention receives), equal to the eager bridge's, on a left-padded batch,
    without any bridge forward (whose eager patterns are O(T²))."""
    import probe
    from probe.families import save_checkpoint

    model = probe.load_model(str(save_checkpoint(family, tmp_path / family)), device="cpu")
    rows = _rows(2, [14, 9])
    eager_alpha, eager = measure_sinks(model, rows, batch_size=2)
    assert model.bridge is not None

    def no_bridge(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bridge ran in a recompute capture")

    monkeypatch.setattr(model.bridge, "forward", no_bridge)
    rec_alpha, rec = measure_sinks(model, rows, batch_size=2, mode="recompute", query_block=4)
    assert eager is not None and rec is not None
    torch.testing.assert_close(rec.result(), eager.result(), rtol=1e-4, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(rec_alpha.alpha(), eager_alpha.alpha(), rtol=1e-4, atol=1e-5, equal_nan=True)
