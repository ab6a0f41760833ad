from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import pytest
import torch

import probe
from probe import interventions as iv
from probe.errors import CaptureError, ConfigError
from probe.loading import LoadedModel

TEXTS = ["the quick brown fox", "a lazy dog"]
OTHER = ["jumps over the cat", "sleeps on a mat!!"]

Make = Callable[[LoadedModel, torch.Tensor], AbstractContextManager[Any]]


def _ids(model: LoadedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean ids, other ids (same padded length) and the clean attention mask; batch 2, left-padded."""
    batch = model.encode(TEXTS + OTHER)
    return batch.input_ids[:2], batch.input_ids[2:], batch.attention_mask[:2]


def _run(model: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.bridge(ids)  # type: ignore[misc]


def _hook_state(model: LoadedModel) -> dict[str, tuple[list[int], list[int]]]:
    """Every hook point's TransformerLens handles and torch forward hooks, by identity."""
    return {
        name: ([id(h) for h in point.fwd_hooks], list(point._forward_hooks))
        for name, point in model.bridge.hook_dict.items()  # type: ignore[union-attr]
    }


def _z(model: LoadedModel, ids: torch.Tensor, layer: int) -> torch.Tensor:
    return iv.cache_z(model, ids, [layer])[layer]


def _pattern(model: LoadedModel, ids: torch.Tensor, layer: int) -> torch.Tensor:
    name = f"blocks.{layer}.attn.hook_pattern"
    return iv.cache_activations(model, ids, [name])[name]


def _patch_last_position(model: LoadedModel, other: torch.Tensor) -> AbstractContextManager[Any]:
    name = "blocks.1.hook_resid_pre"
    source = iv.cache_activations(model, other, [name])[name]
    return iv.patch_activation(model, name, source, positions=[-1])


# One non-trivial intervention of each kind, made fresh for every use (context managers are single-use).
INTERVENTIONS: dict[str, Make] = {
    "edit_pattern": lambda m, other: iv.edit_pattern(m, {(1, 2): lambda p: p.flip(-1).tril()}),
    "scale_heads": lambda m, other: iv.scale_heads(m, {(0, 1): 0.0, (2, 3): 3.0}),
    "uniform_attention": lambda m, other: iv.uniform_attention(m, [(0, 0), (1, 1)]),
    "patch_activation": lambda m, other: _patch_last_position(m, other),
    "freeze_heads": lambda m, other: iv.freeze_heads(m, [(0, 2), (1, 0)], iv.cache_z(m, other)),
    "compose": lambda m, other: iv.compose(
        iv.scale_heads(m, {(1, 1): 0.5}), iv.uniform_attention(m, [(2, 0)])
    ),
}


@pytest.mark.parametrize("kind", list(INTERVENTIONS))
def test_the_model_is_unchanged_after_the_block_and_after_an_error(
    tiny_model: LoadedModel, kind: str
) -> None:
    ids, other, _ = _ids(tiny_model)
    make = INTERVENTIONS[kind]
    before_state = _hook_state(tiny_model)
    before = _run(tiny_model, ids)
    with make(tiny_model, other):
        assert _hook_state(tiny_model) != before_state, "the intervention added no hook"
        inside = _run(tiny_model, ids)
    assert not torch.equal(inside, before), f"{kind} did not change the logits"
    assert torch.equal(_run(tiny_model, ids), before)
    assert _hook_state(tiny_model) == before_state

    with pytest.raises(RuntimeError, match="boom"), make(tiny_model, other):
        _run(tiny_model, ids)
        raise RuntimeError("boom")
    assert torch.equal(_run(tiny_model, ids), before)
    assert _hook_state(tiny_model) == before_state
    for name, point in tiny_model.bridge.hook_dict.items():  # type: ignore[union-attr]
        assert not point._forward_hooks, f"a torch hook was left on {name}"


def test_no_hook_is_left_listed_on_any_hook_point() -> None:
    model = probe.load_model("tiny-llama", device="cpu")  # private: nothing else has touched it
    ids, other, _ = _ids(model)
    points = model.bridge.hook_dict  # type: ignore[union-attr]
    assert not any(p.has_hooks() for p in points.values())
    for make in INTERVENTIONS.values():
        with make(model, other):
            assert any(p.has_hooks() for p in points.values())
            _run(model, ids)
        leftover = [name for name, p in points.items() if p.has_hooks() or p.fwd_hooks]
        assert not leftover, f"hooks left on {leftover[:4]}"
    iv.cache_activations(model, ids, ["blocks.0.hook_resid_pre", "blocks.2.attn.hook_z"])
    assert not any(p.has_hooks() for p in points.values())


def test_identity_interventions_change_nothing(tiny_model: LoadedModel) -> None:
    ids, _, _ = _ids(tiny_model)
    clean = _run(tiny_model, ids)
    every_head = [(layer, head) for layer in range(tiny_model.n_layers) for head in range(tiny_model.n_heads)]
    with iv.edit_pattern(tiny_model, dict.fromkeys(every_head, lambda p: p)):
        assert torch.equal(_run(tiny_model, ids), clean)
    with iv.scale_heads(tiny_model, dict.fromkeys(every_head, 1.0)):
        assert torch.equal(_run(tiny_model, ids), clean)
    with iv.freeze_heads(tiny_model, every_head, iv.cache_z(tiny_model, ids)):
        assert torch.equal(_run(tiny_model, ids), clean)
    names = [
        name
        for layer in range(tiny_model.n_layers)
        for name in (
            f"blocks.{layer}.hook_resid_pre",
            f"blocks.{layer}.attn.hook_pattern",
            f"blocks.{layer}.attn.hook_z",
            f"blocks.{layer}.hook_mlp_out",
        )
    ]
    cache = iv.cache_activations(tiny_model, ids, names)
    with ExitStack() as stack:  # clean into clean, at every layer at once
        for name in names:
            stack.enter_context(iv.patch_activation(tiny_model, name, cache[name]))
        assert torch.equal(_run(tiny_model, ids), clean)


@pytest.mark.parametrize("scale", [0.0, 2.5, -1.0])
def test_scaling_a_last_layer_head_matches_the_hand_computation(
    tiny_model: LoadedModel, scale: float
) -> None:
    ids, _, _ = _ids(tiny_model)
    bridge: Any = tiny_model.bridge
    last, head = tiny_model.n_layers - 1, 1
    names = [f"blocks.{last}.attn.hook_z", f"blocks.{last}.hook_resid_mid", f"blocks.{last}.hook_attn_out"]
    clean = iv.cache_activations(tiny_model, ids, names)
    with iv.scale_heads(tiny_model, {(last, head): scale}):
        scaled = iv.cache_activations(tiny_model, ids, names)
        logits = _run(tiny_model, ids)

    z, z_scaled = clean[names[0]], scaled[names[0]]
    assert torch.equal(z_scaled[:, :, head], z[:, :, head] * scale)
    others = [h for h in range(tiny_model.n_heads) if h != head]
    assert torch.equal(z_scaled[:, :, others], z[:, :, others])

    # The head adds z_h @ W_O[h] to the residual stream; scaling z adds (s - 1) times that.
    w_o = bridge.blocks[last].attn.W_O  # [heads, d_head, d_model]
    delta = (scale - 1.0) * torch.einsum("btd,dm->btm", z[:, :, head], w_o[head])
    assert torch.allclose(scaled[names[2]], clean[names[2]] + delta, atol=1e-5)
    resid_mid = clean[names[1]] + delta
    with torch.no_grad():
        block = bridge.blocks[last]
        resid_post = resid_mid + block.mlp(block.ln2(resid_mid))
        by_hand = bridge.unembed(bridge.ln_final(resid_post))
    assert torch.allclose(logits, by_hand, atol=1e-5)
    assert not torch.allclose(logits, _run(tiny_model, ids), atol=1e-3)


def _visible(t: int, mask: torch.Tensor | None) -> torch.Tensor:
    """[batch or 1, T, T]: causal keys that are real tokens."""
    causal = torch.ones(t, t).tril().bool()[None]
    return causal if mask is None else causal & mask.bool()[:, None, :]


@pytest.mark.parametrize("masked", [False, True])
def test_uniform_attention_rows_are_exactly_uniform_over_the_visible_keys(
    tiny_model: LoadedModel, masked: bool
) -> None:
    ids, _, mask = _ids(tiny_model)
    assert mask[1, 0] == 0, "the second text must be left-padded for this test"
    layer, head = 1, 0
    clean_pattern = _pattern(tiny_model, ids, layer)
    clean_z = _z(tiny_model, ids, layer)
    v = iv.cache_activations(tiny_model, ids, [f"blocks.{layer}.attn.hook_v"])[f"blocks.{layer}.attn.hook_v"]
    with iv.uniform_attention(tiny_model, [(layer, head)], attention_mask=mask if masked else None):
        pattern = _pattern(tiny_model, ids, layer)  # captured by a hook that runs after the edit
        z = _z(tiny_model, ids, layer)

    t = ids.shape[1]
    visible = _visible(t, mask if masked else None).expand(2, t, t)
    counts = visible.sum(-1, keepdim=True)
    expected = torch.where(visible, 1.0 / counts.clamp_min(1).float(), torch.zeros(()))
    real_rows = counts[..., 0] > 0
    edited = pattern[:, head]
    assert torch.equal(edited[real_rows], expected[real_rows])
    assert torch.equal(edited[~real_rows], clean_pattern[:, head][~real_rows])  # padding queries keep theirs
    assert (edited.triu(1) == 0).all()
    assert torch.allclose(edited.sum(-1), torch.ones(2, t), atol=1e-6)
    if masked:
        assert (edited[1][real_rows[1]][:, mask[1] == 0] == 0).all(), "padding got attention"
        assert not real_rows.all()
    untouched = [h for h in range(tiny_model.n_heads) if h != head]
    assert torch.equal(pattern[:, untouched], clean_pattern[:, untouched])

    # The edit propagates: the head's output is the mean of the values it may see (GQA: its KV head).
    mean_v = torch.einsum("bqk,bkd->bqd", expected, v[:, :, tiny_model.kv_head(head)])
    assert torch.allclose(z[:, :, head][real_rows], mean_v[real_rows], atol=1e-5)
    assert torch.equal(z[:, :, untouched], clean_z[:, :, untouched])


def test_uniform_attention_can_be_restricted_to_some_queries(tiny_model: LoadedModel) -> None:
    ids, _, _ = _ids(tiny_model)
    clean = _pattern(tiny_model, ids, 2)
    with iv.uniform_attention(tiny_model, [(2, 3)], query_positions=[-1]):
        pattern = _pattern(tiny_model, ids, 2)
    t = ids.shape[1]
    assert torch.equal(pattern[:, 3, :-1], clean[:, 3, :-1])
    assert torch.equal(pattern[:, 3, -1], torch.full((2, t), 1.0 / t))
    assert not torch.equal(clean[:, 3, -1], pattern[:, 3, -1])


def test_a_pattern_edit_changes_exactly_the_chosen_rows_and_reaches_the_output(
    tiny_model: LoadedModel,
) -> None:
    ids, _, _ = _ids(tiny_model)
    layer, head = 2, 2

    def attend_to_first(p: torch.Tensor) -> torch.Tensor:
        p.zero_()  # the edit gets a copy, so editing in place is allowed
        p[..., 0] = 1.0
        return p

    clean_pattern, clean_z = _pattern(tiny_model, ids, layer), _z(tiny_model, ids, layer)
    v = iv.cache_activations(tiny_model, ids, [f"blocks.{layer}.attn.hook_v"])[f"blocks.{layer}.attn.hook_v"]
    clean_logits = _run(tiny_model, ids)
    with iv.edit_pattern(tiny_model, {(layer, head): attend_to_first}, positions=[-2, -1]):
        pattern, z = _pattern(tiny_model, ids, layer), _z(tiny_model, ids, layer)
        logits = _run(tiny_model, ids)
    assert torch.equal(pattern[:, head, -2:, 0], torch.ones(2, 2))
    assert (pattern[:, head, -2:, 1:] == 0).all()
    assert torch.equal(pattern[:, head, :-2], clean_pattern[:, head, :-2])
    kv = v[:, 0, tiny_model.kv_head(head)]  # [batch, d_head]
    assert torch.allclose(z[:, -2:, head], kv[:, None].expand(2, 2, -1), atol=1e-6)
    assert torch.equal(z[:, :-2], clean_z[:, :-2])  # causal: earlier positions are untouched
    partner = [h for h in range(tiny_model.n_heads) if h != head]  # includes the KV-group partner on llama
    assert torch.equal(z[:, :, partner], clean_z[:, :, partner])
    assert torch.equal(logits[:, :-2], clean_logits[:, :-2])
    assert not torch.allclose(logits[:, -1], clean_logits[:, -1], atol=1e-4)


def test_patching_another_inputs_first_residual_reproduces_its_logits(tiny_model: LoadedModel) -> None:
    ids, other, _ = _ids(tiny_model)
    name = "blocks.0.hook_resid_pre"
    source = iv.cache_activations(tiny_model, other, [name])[name]
    clean, target = _run(tiny_model, ids), _run(tiny_model, other)
    assert not torch.allclose(clean, target, atol=1e-3)
    with iv.patch_activation(tiny_model, name, source):
        assert torch.equal(_run(tiny_model, ids), target)
    with iv.patch_activation(tiny_model, name, source, positions=[-1]):
        patched = _run(tiny_model, ids)
    assert torch.equal(patched[:, :-1], clean[:, :-1])  # causal: earlier positions cannot see it
    assert not torch.allclose(patched[:, -1], clean[:, -1], atol=1e-3)
    per_row = torch.zeros(ids.shape, dtype=torch.bool)
    per_row[0] = True  # a bool mask: patch every position of the first row only
    with iv.patch_activation(tiny_model, name, source, positions=per_row):
        patched = _run(tiny_model, ids)
    assert torch.equal(patched[0], target[0]) and torch.equal(patched[1], clean[1])


def test_patching_hook_z_of_some_heads_touches_only_those_heads(tiny_model: LoadedModel) -> None:
    ids, other, _ = _ids(tiny_model)
    layer = 1
    name = f"blocks.{layer}.attn.hook_z"
    source = _z(tiny_model, other, layer)
    clean_z = _z(tiny_model, ids, layer)
    with iv.patch_activation(tiny_model, name, source[:1], heads=[0, 3]):  # batch 1: broadcast
        z = _z(tiny_model, ids, layer)
    assert torch.equal(z[:, :, [0, 3]], source[:1, :, [0, 3]].expand(2, -1, -1, -1))
    assert torch.equal(z[:, :, [1, 2]], clean_z[:, :, [1, 2]])


def test_freezing_heads_pins_their_output(tiny_model: LoadedModel) -> None:
    ids, other, _ = _ids(tiny_model)
    own, foreign = iv.cache_z(tiny_model, ids), iv.cache_z(tiny_model, other)
    clean = _run(tiny_model, ids)
    heads = [(0, 1), (2, 0)]
    with iv.freeze_heads(tiny_model, heads, own):
        assert torch.equal(_run(tiny_model, ids), clean)
    with iv.freeze_heads(tiny_model, heads, foreign):
        frozen = iv.cache_z(tiny_model, ids)
        assert not torch.allclose(_run(tiny_model, ids), clean, atol=1e-4)
    assert torch.equal(frozen[0][:, :, 1], foreign[0][:, :, 1])
    assert torch.equal(frozen[2][:, :, 0], foreign[2][:, :, 0])
    assert torch.equal(frozen[0][:, :, [0, 2, 3]], own[0][:, :, [0, 2, 3]])  # same layer, other heads
    assert not torch.equal(frozen[1], own[1])  # later layers see the frozen head's output
    # Head 0 of layer 2 is pinned, its KV-group partner (head 1 on llama) still reacts to layer 0.
    assert not torch.equal(frozen[2][:, :, 1], own[2][:, :, 1])


def test_interventions_on_different_heads_commute_and_compose(tiny_model: LoadedModel) -> None:
    ids, other, _ = _ids(tiny_model)
    foreign = iv.cache_z(tiny_model, other)
    clean = _run(tiny_model, ids)
    state = _hook_state(tiny_model)
    pairs: list[
        tuple[Callable[[], AbstractContextManager[Any]], Callable[[], AbstractContextManager[Any]]]
    ] = [
        (
            lambda: iv.scale_heads(tiny_model, {(0, 1): 2.0}),
            lambda: iv.uniform_attention(tiny_model, [(1, 2)]),
        ),
        (
            lambda: iv.freeze_heads(tiny_model, [(1, 0)], foreign),
            lambda: iv.scale_heads(tiny_model, {(1, 3): 0.0}),
        ),
        (
            lambda: iv.edit_pattern(tiny_model, {(2, 1): lambda p: p.roll(1, -1).tril()}),
            lambda: iv.uniform_attention(tiny_model, [(2, 0)]),
        ),
    ]
    for make_a, make_b in pairs:
        with make_a():
            only_a = _run(tiny_model, ids)
        with make_a(), make_b():
            ab = _run(tiny_model, ids)
        with make_b(), make_a():
            ba = _run(tiny_model, ids)
        with iv.compose(make_a(), make_b()):
            composed = _run(tiny_model, ids)
        assert torch.equal(ab, ba) and torch.equal(ab, composed)
        assert not torch.allclose(ab, only_a, atol=1e-5) and not torch.allclose(ab, clean, atol=1e-5)
        assert torch.equal(_run(tiny_model, ids), clean)
        assert _hook_state(tiny_model) == state


def test_on_the_same_head_the_later_intervention_sees_the_earlier_ones_result(
    tiny_model: LoadedModel,
) -> None:
    ids, other, _ = _ids(tiny_model)
    foreign = iv.cache_z(tiny_model, other)
    with iv.compose(
        iv.scale_heads(tiny_model, {(1, 2): 2.0}), iv.freeze_heads(tiny_model, [(1, 2)], foreign)
    ):
        z_freeze_last = _z(tiny_model, ids, 1)
    with iv.compose(
        iv.freeze_heads(tiny_model, [(1, 2)], foreign), iv.scale_heads(tiny_model, {(1, 2): 2.0})
    ):
        z_scale_last = _z(tiny_model, ids, 1)
    assert torch.equal(z_freeze_last[:, :, 2], foreign[1][:, :, 2])
    assert torch.equal(z_scale_last[:, :, 2], foreign[1][:, :, 2] * 2.0)


class _Recorder(AbstractContextManager[str]):
    """A context manager that logs when it is entered and exited (and whether with an error)."""

    def __init__(self, log: list[str], name: str, fail_on_enter: bool = False) -> None:
        self.log, self.name, self.fail_on_enter = log, name, fail_on_enter

    def __enter__(self) -> str:
        if self.fail_on_enter:
            raise RuntimeError(f"{self.name} cannot start")
        self.log.append(f"enter {self.name}")
        return self.name

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        self.log.append(f"exit {self.name}{' after error' if error is not None else ''}")


def test_compose_exits_every_manager_in_reverse_order_also_after_an_error(tiny_gpt2: LoadedModel) -> None:
    ids, _, _ = _ids(tiny_gpt2)
    clean, state = _run(tiny_gpt2, ids), _hook_state(tiny_gpt2)
    log: list[str] = []
    with iv.compose(
        _Recorder(log, "a"), iv.scale_heads(tiny_gpt2, {(0, 0): 0.0}), _Recorder(log, "b")
    ) as got:
        assert got[0] == "a" and got[2] == "b"
        assert not torch.equal(_run(tiny_gpt2, ids), clean)
    assert log == ["enter a", "enter b", "exit b", "exit a"]
    log.clear()
    with (
        pytest.raises(RuntimeError, match="boom"),
        iv.compose(_Recorder(log, "a"), iv.scale_heads(tiny_gpt2, {(0, 0): 0.0}), _Recorder(log, "b")),
    ):
        raise RuntimeError("boom")
    assert log == ["enter a", "enter b", "exit b after error", "exit a after error"]
    log.clear()
    with (
        pytest.raises(RuntimeError, match="cannot start"),
        iv.compose(_Recorder(log, "a"), iv.scale_heads(tiny_gpt2, {(0, 0): 0.0}), _Recorder(log, "b", True)),
    ):
        pass
    assert log == ["enter a", "exit a after error"]
    assert _hook_state(tiny_gpt2) == state and torch.equal(_run(tiny_gpt2, ids), clean)


BAD_HEADS = [(3, 0), (0, 4), (-1, 0), (0, -1)]


@pytest.mark.parametrize("bad", BAD_HEADS)
def test_a_head_that_does_not_exist_is_refused_with_the_valid_range(
    tiny_model: LoadedModel, bad: Any
) -> None:
    state = _hook_state(tiny_model)
    z = iv.cache_z(tiny_model, _ids(tiny_model)[0])
    makers: list[Callable[[], object]] = [
        lambda: iv.edit_pattern(tiny_model, {bad: lambda p: p}),
        lambda: iv.scale_heads(tiny_model, {bad: 0.0}),
        lambda: iv.uniform_attention(tiny_model, [(0, 0), bad]),
        lambda: iv.freeze_heads(tiny_model, [bad], z),
    ]
    for make in makers:
        with pytest.raises(ConfigError, match=r"layers are 0\.\.2 and heads 0\.\.3"):
            make()
    assert _hook_state(tiny_model) == state


@pytest.mark.parametrize("bad", [(0,), "01", (0, 1.0), (True, 0), 3])
def test_heads_must_be_layer_head_pairs_of_ints(tiny_gpt2: LoadedModel, bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"\(layer, head\)|must be an int"):
        iv.uniform_attention(tiny_gpt2, [bad])


def test_bad_arguments_give_clear_errors(tiny_llama: LoadedModel) -> None:
    ids, _, _ = _ids(tiny_llama)
    z = _z(tiny_llama, ids, 0)
    with pytest.raises(ConfigError, match="does not exist"):
        iv.patch_activation(tiny_llama, "blocks.9.hook_resid_pre", z)
    with pytest.raises(ConfigError, match=r"heads are 0\.\.3"):
        iv.patch_activation(tiny_llama, "blocks.0.attn.hook_z", z, heads=[4])
    with pytest.raises(ConfigError, match=r"KV heads are 0\.\.1"):
        iv.patch_activation(tiny_llama, "blocks.0.attn.hook_v", z, heads=[2])
    with pytest.raises(ConfigError, match="per-head hook points"):
        iv.patch_activation(tiny_llama, "blocks.0.hook_resid_pre", z, heads=[0])
    with pytest.raises(ConfigError, match="no hook_z for layers"):
        iv.freeze_heads(tiny_llama, [(1, 0)], {0: z})
    with pytest.raises(ConfigError, match="must be a number"):
        iv.scale_heads(tiny_llama, {(0, 0): "half"})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="sequence of ints"):
        iv.edit_pattern(tiny_llama, {(0, 0): lambda p: p}, positions=3)  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match="never fired"):
        iv.cache_activations(tiny_llama, ids, ["blocks.0.attn.hook_result"])  # needs use_attn_result


def test_errors_found_while_the_model_runs_still_remove_the_hooks(tiny_llama: LoadedModel) -> None:
    ids, _, mask = _ids(tiny_llama)
    state = _hook_state(tiny_llama)
    clean = _run(tiny_llama, ids)
    t = ids.shape[1]
    cases: list[tuple[AbstractContextManager[Any], str]] = [
        (
            iv.edit_pattern(tiny_llama, {(0, 0): lambda p: p[:, :1]}),
            "must return a tensor of the pattern's shape",
        ),
        (iv.edit_pattern(tiny_llama, {(0, 0): lambda p: p}, positions=[t]), "out of range"),
        (iv.uniform_attention(tiny_llama, [(0, 0)], attention_mask=mask[:, 1:]), "attention_mask has shape"),
        (
            iv.patch_activation(tiny_llama, "blocks.0.hook_resid_pre", torch.zeros(2, t + 1, 64)),
            "same length",
        ),
    ]
    for manager, message in cases:
        with pytest.raises(ConfigError, match=message), manager:
            _run(tiny_llama, ids)
        assert _hook_state(tiny_llama) == state
    assert torch.equal(_run(tiny_llama, ids), clean)


def test_allowed_keys_follow_causality_windows_padding_and_a_kv_cache(tiny_llama: LoadedModel) -> None:
    causal = iv.allowed_keys(tiny_llama, 0, 4, 4)
    assert torch.equal(causal[0], torch.ones(4, 4).tril().bool())
    windowed_model = dataclasses.replace(
        tiny_llama, layer_types=["sliding_attention", "full_attention", "full_attention"], sliding_window=2
    )
    window = iv.allowed_keys(windowed_model, 0, 4, 4)[0]
    assert window.sum(-1).tolist() == [1, 2, 2, 2] and window[3].tolist() == [False, False, True, True]
    assert torch.equal(iv.allowed_keys(windowed_model, 1, 4, 4), causal)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    padded = iv.allowed_keys(tiny_llama, 0, 4, 4, attention_mask=mask)
    assert padded[0].sum(-1).tolist() == [0, 0, 1, 2] and torch.equal(padded[1], causal[0])
    decode = iv.allowed_keys(tiny_llama, 0, 1, 5)  # one new query after 4 cached keys
    assert decode[0].tolist() == [[True] * 5]


def test_pattern_edits_are_refused_where_the_bridge_does_not_use_the_pattern(
    tmp_path: Any, tiny_llama: LoadedModel
) -> None:
    """GPT-J's and OPT's bridges fire hook_pattern with transformers' weights but compute their output
    without them: an edit there would silently change nothing, so it is refused; head outputs still act."""
    from transformers import OPTConfig, OPTForCausalLM

    from probe.families import save_checkpoint
    from probe.hooks import attn_hook
    from probe.tiny import byte_tokenizer

    gptj = probe.load_model(str(save_checkpoint("gptj", tmp_path / "gptj")), device="cpu")
    tok = byte_tokenizer(prepend_bos=False)
    opt_config = OPTConfig(
        vocab_size=len(tok),
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        pad_token_id=2,
        bos_token_id=0,
        eos_token_id=1,
    )
    opt = probe.wrap(OPTForCausalLM(opt_config).eval(), tok)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    name = attn_hook(0, "pattern")
    for model in (gptj, opt):
        source = iv.cache_activations(model, ids, [name])[name]
        refused = pytest.raises(ConfigError, match="computes the attention output without them")
        with refused, iv.edit_pattern(model, {(0, 0): lambda p: p * 0.5}):
            pass
        with refused, iv.uniform_attention(model, [(0, 0)]):
            pass
        with refused, iv.patch_activation(model, name, source.flip(-1)):
            pass
        with torch.no_grad(), iv.scale_heads(model, {(0, 0): 0.0}):
            scaled = _run(model, ids)
        assert not torch.equal(scaled, _run(model, ids))
    with iv.edit_pattern(tiny_llama, {(0, 0): lambda p: p * 0.5}):  # a bridge that uses it: allowed
        pass
