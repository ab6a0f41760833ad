"""Held-out validation of the circuit classes: fresh prompts on disjoint words, the ablation runs
against the faithfulness code, direct effects against the model's own arithmetic, backup movers,
the significance rule that admits heads, and the validation table of a run."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from analyses import circuits
from analyses.circuits import CircuitConfig, Runner, heldout
from analyses.circuits.classes import admitted
from analyses.circuits.faithfulness import mean_ablated_logit_diff, template_means
from analyses.tasks import colored_objects as co
from analyses.tasks import ioi
from probe.hooks import attn_hook, hooks
from tests.test_circuits import task_caches, wordy

CFG = CircuitConfig(
    n_items=8, n_random=3, batch_size=64, n_boot=50, progress=False, n_heldout=6, n_reference=6
)


def test_discovery_and_held_out_prompts_share_no_word():
    model = wordy("tiny-gpt2")
    disc = ioi.make_ioi(model, 30, 0, part="discovery")
    held = ioi.make_ioi(model, 30, 0, part="held_out")
    lex = ioi.usable_words(model)
    halves = [ioi.word_part(lex, part) for part in ("discovery", "held_out")]
    for field in ("names", "places", "objects"):
        assert not set(getattr(halves[0], field)) & set(getattr(halves[1], field)), field
    assert {w for it in disc for w in (it.io, it.s)} <= set(halves[0].names)
    assert {w for it in held for w in (it.io, it.s)} <= set(halves[1].names)
    assert ioi.make_ioi(model, 5, 0)[0].text == ioi.make_ioi(model, 5, 0, part="all")[0].text
    d = co.make_colored_objects(model, 12, 0, part="discovery")
    h = co.make_colored_objects(model, 12, 0, part="held_out")
    objects = lambda items: {o for it in items for o in it.objects}  # noqa: E731
    assert not objects(d) & objects(h)


def test_ablation_runs_agree_with_the_faithfulness_code():
    model = wordy("tiny-llama")
    data, caches = task_caches(model, "ioi", 4)
    runner = Runner(model)
    means = template_means(runner, caches, data.groups)
    every = [(a, b) for a in range(model.n_layers) for b in range(model.n_heads)]
    sets = [[], [(1, 0), (2, 3)], every]
    r = heldout.run_sets(runner, caches, means, sets, batch_size=8)
    clean = torch.cat([c.clean.logit_diff for c in caches]).double().numpy()
    np.testing.assert_allclose(r.logit_diff[0], clean, rtol=1e-5, atol=1e-5)
    keep = [[h for h in every if h not in set(s)] for s in sets]
    reference = mean_ablated_logit_diff(runner, caches, means, keep, batch_size=8)
    np.testing.assert_allclose(r.logit_diff.mean(1), reference, rtol=1e-5, atol=1e-5)
    kept = heldout.run_sets(runner, caches, means, [every, []], keep=True, batch_size=8)
    np.testing.assert_allclose(kept.logit_diff[0], clean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept.logit_diff[1], r.logit_diff[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_direct_effects_are_each_heads_output_through_the_linearised_readout(name: str):
    model = wordy(name)
    _, caches = task_caches(model, "ioi", 4)
    runner = Runner(model)
    cache = caches[0]
    group = cache.group
    means = [{layer: z.float().mean(0) for layer, z in cache.corrupt_z.items()}]
    r = heldout.run_sets(runner, [cache], means, [[]], direct=True, batch_size=8)
    assert r.direct is not None
    dla = r.direct[0]  # [n, L, H]
    # the model's own numbers: attention output at END per layer, final residual, logits
    store: dict[str, torch.Tensor] = {}
    rows = torch.arange(len(group))
    end = group.roles["end"]

    def keep(name: str) -> Any:
        def hook(x: torch.Tensor, hook: Any) -> None:
            store[name] = x[rows, end].detach().clone()

        return hook

    last = model.n_layers - 1
    points = [(attn_hook(last, "z"), keep("z")), (f"blocks.{last}.attn.hook_out", keep("out"))]
    points.append(("ln_final.hook_in", keep("resid")))
    with hooks(model, points), torch.no_grad():
        model.bridge(group.clean)  # type: ignore[misc]
    bridge: Any = model.bridge
    w_o = bridge.blocks[last].attn.W_O.detach()
    contrib = torch.einsum("bhd,hdm->bhm", store["z"], w_o)
    bias = (
        bridge.blocks[last].attn.b_O.detach()
        if getattr(bridge.blocks[last].attn, "b_O", None) is not None
        else 0
    )
    torch.testing.assert_close(contrib.sum(1) + bias, store["out"], rtol=1e-4, atol=1e-5)
    # the linearised readout: a small step along one head's output moves the logit diff by dla * eps
    x = store["resid"].double()
    eps = 1e-3

    def ld(resid: torch.Tensor) -> torch.Tensor:
        logits = runner.logits(bridge.ln_final(resid.float()))
        return (logits[rows, group.right] - logits[rows, group.wrong]).double()

    with torch.no_grad():
        step = (ld(x + eps * contrib[:, 0].double()) - ld(x - eps * contrib[:, 0].double())) / (2 * eps)
    np.testing.assert_allclose(dla[:, last, 0], step.numpy(), rtol=2e-2, atol=2e-3)


def test_significance_admits_only_consistent_scores():
    cfg = dataclasses.replace(CFG, alpha=0.05)
    rng = np.random.default_rng(0)
    items = rng.normal(0.0, 0.01, (20, 2, 3))
    items[:, 1, 2] -= 0.05  # a consistent mover-like effect (lowers the metric)
    items[:, 0, 0] += 0.05
    scores = items.mean(0)
    movers = admitted(scores, items, -1.0, cfg)
    assert np.argwhere(movers).tolist() == [[1, 2]]
    assert np.argwhere(admitted(scores, items, 1.0, cfg)).tolist() == [[0, 0]]
    share = dataclasses.replace(cfg, admit="share", min_share=0.04)
    assert np.argwhere(admitted(scores, items, -1.0, share)).tolist() == [[1, 2]]


def test_pooled_means_average_every_prompt_of_a_key():
    model = wordy("tiny-llama")
    _, caches = task_caches(model, "ioi", 4)
    _, more = task_caches(model, "ioi", 8)
    means = heldout.pooled_means(caches, more)
    for cache, mean in zip(caches, means, strict=True):
        same = [c for c in [*caches, *more] if c.group.key == cache.group.key]
        total = sum(len(c.group) for c in same)
        expected = sum(c.corrupt_z[0].float().sum(0) for c in same) / total
        torch.testing.assert_close(mean[0], expected)


@pytest.fixture(scope="module")
def held_run() -> Any:
    model = wordy("tiny-gpt2")
    cfg = dataclasses.replace(CFG, admit="share", min_share=0.0)
    return model, circuits.run_ioi(model, cfg)


def test_run_validates_every_class_on_held_out_prompts(held_run: Any):
    _, result = held_run
    t = result.tables
    val = t["validation"]
    assert list(val.columns[:2]) == ["task", "role"]
    circuit = t["circuit"]
    classes = set(circuit["class"])
    tested = set(val["role"])
    assert classes - {"s_inhibition", "backup_mover"} <= tested
    for row in val.itertuples():
        assert row.inputs.startswith("held-out ioi prompts (n=6")
        assert row.effect_low <= row.effect <= row.effect_high
        assert 0.0 <= row.percentile <= 100.0 and 0.0 < row.p_value <= 1.0
        assert row.validated == (
            row.p_value <= 0.05 and (row.effect_high < 0 if row.direction == "lower" else row.effect_low > 0)
        )
    heads = t["heads"]
    roles = heads[heads["ioi_role"] != ""]
    found = set(zip(circuit["layer"], circuit["head"], strict=True))
    assert set(zip(roles["layer"], roles["head"], strict=True)) <= found
    for row in val[val["role"] != "circuit"].itertuples():
        for token in row.heads.split():
            layer, head = map(int, token[1:].split("H"))
            assert row.role in heads[(heads["layer"] == layer) & (heads["head"] == head)]["ioi_role"].iloc[0]
    assert (heads["ioi_validated_on"] != "").sum() == len(roles)
    assert "held-out validation" in circuits.summary(result)
