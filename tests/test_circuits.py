"""IOI / Colored Objects circuits: patching against brute force, classes, reuse, intervention, config.

The tiny models get whole-word tokens for every lexicon word (names, places, objects, colours,
surfaces), so both tasks build real prompts on them. Every batched operation of
:mod:`analyses.circuits` is checked against an independent per-head route through
:mod:`probe.interventions` (``freeze_heads``, ``patch_activation``, ``cache_activations``,
``cache_z``, ``edit_pattern``) and the bridge's own full logits.
The three runs end to end are tested in ``test_circuits_runs.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import pytest
import torch

import probe
from analyses import circuits
from analyses.circuits import CircuitConfig, GroupCache, PromptSet, Receivers, Runner
from analyses.tasks import colored_objects as co
from analyses.tasks import ioi
from probe import interventions as iv
from probe.errors import ConfigError
from probe.hooks import attn_hook
from probe.interventions import Head
from probe.loading import LoadedModel

WORDS = [*ioi.NAMES, *ioi.PLACES, *ioi.OBJECTS, *co.OBJECTS, *co.COLOURS, *co.SURFACES]
_WORDY: dict[str, LoadedModel] = {}


def wordy(name: str) -> LoadedModel:
    """A tiny model whose tokenizer has every task word as one token (built once per session)."""
    if name not in _WORDY:
        _WORDY[name] = probe.load_model(name, device="cpu", tiny_words=WORDS)
    return _WORDY[name]


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def model(request: pytest.FixtureRequest) -> LoadedModel:
    return wordy(request.param)


def every_head(model: LoadedModel) -> list[Head]:
    return [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]


_TASKS: dict[tuple[str, str], tuple[circuits.TaskData, list[GroupCache]]] = {}


def task_caches(
    model: LoadedModel, task: str = "ioi", n: int = 4
) -> tuple[circuits.TaskData, list[GroupCache]]:
    """The task's prompts (seed 0) and one clean/corrupted cache per template group."""
    key = (model.name, f"{task}:{n}")
    if key not in _TASKS:
        data = circuits.TASK_BUILDERS[task](model, n, 0)
        runner = Runner(model)
        _TASKS[key] = (data, [circuits.cache_group(runner, g) for g in data.groups])
    return _TASKS[key]


# ------------------------------------------------------------------------ independent reference


def bridge_logit_diff(model: LoadedModel, ids: torch.Tensor, group: PromptSet) -> torch.Tensor:
    """logit(right) - logit(wrong) at END from the bridge's own full logits (under active hooks)."""
    with torch.no_grad():
        logits = model.bridge(ids)  # type: ignore[misc]
    rows = torch.arange(len(group))
    at_end = logits[rows, group.roles["end"]]
    return at_end[rows, group.right] - at_end[rows, group.wrong]


# ------------------------------------------------------------------------------------ 1. runner


def test_runner_reads_the_bridges_own_logits_at_end(model: LoadedModel) -> None:
    runner = Runner(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(model.tokenizer), (3, 11), generator=gen)
    end = torch.tensor([10, 6, 2])
    final = runner.run(ids, end=end)
    assert final is not None and final.shape == (3, model.d_model)
    with torch.no_grad():
        full = model.bridge(ids)  # type: ignore[misc]
    expected = full[torch.arange(3), end]
    torch.testing.assert_close(runner.logits(final), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # rows differ: END is read per row

    data, caches = task_caches(model)
    for group, cache in zip(data.groups, caches, strict=True):
        by_hand = bridge_logit_diff(model, group.clean, group)
        torch.testing.assert_close(cache.clean.logit_diff, by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            cache.corrupt.logit_diff, bridge_logit_diff(model, group.corrupt, group), atol=1e-5, rtol=1e-5
        )
        with torch.no_grad():
            logits = model.bridge(group.clean)[torch.arange(len(group)), group.roles["end"]]  # type: ignore[misc]
        assert torch.equal(cache.clean.top_token, logits.argmax(-1))  # type: ignore[arg-type]
        torch.testing.assert_close(cache.clean.candidate_logits, logits.gather(1, group.candidates))
        z = iv.cache_z(model, group.clean)
        for layer in range(model.n_layers):
            torch.testing.assert_close(cache.clean_z[layer], z[layer])


def test_runner_refuses_a_model_without_a_language_head() -> None:
    with pytest.raises(ConfigError, match="not a language model"):
        Runner(probe.load_model("tiny-vit", device="cpu"))


# ------------------------------------------------------------------- 2. path patching = definition

SENDERS: list[Head] = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 3)]
RECEIVERS = {
    "logits": Receivers("logits"),
    "q": Receivers("q", ((2, 1), (1, 3))),  # two layers: the layer-1 receiver feeds the layer-2 one too
    "kv": Receivers("kv", ((2, 0), (1, 3))),  # tiny-llama: siblings (2, 1) and (1, 2) must stay clean
    "k": Receivers("k", ((2, 2),)),
}


@pytest.mark.parametrize("kind", list(RECEIVERS))
def test_batched_path_patching_equals_the_two_step_definition(model: LoadedModel, kind: str) -> None:
    receivers = RECEIVERS[kind]
    runner = Runner(model)
    data, caches = task_caches(model)
    group, cache = data.groups[0], caches[0]
    clean_z, corrupt_z = iv.cache_z(model, group.clean), iv.cache_z(model, group.corrupt)
    batched = circuits.path_patching_raw(runner, cache, SENDERS, receivers)
    assert batched.shape == (len(SENDERS), len(group))
    naive = torch.stack(
        [circuits.path_patching_reference(model, group, clean_z, corrupt_z, s, receivers) for s in SENDERS]
    )
    torch.testing.assert_close(batched, naive, atol=1e-5, rtol=1e-5)
    moved = float((naive - cache.clean.logit_diff).abs().max())
    assert moved > 1e-4, "no sender changed the metric: the comparison proves nothing"


def test_gqa_siblings_are_pinned_and_only_the_receiver_sees_new_keys() -> None:
    """Without pinning the KV-group partner, the answer differs: the pin is not a no-op."""
    model = wordy("tiny-llama")
    assert model.kv_head(0) == model.kv_head(1)
    runner = Runner(model)
    data, caches = task_caches(model)
    group, cache = data.groups[0], caches[0]
    receivers = Receivers("kv", ((2, 0),))
    clean_z, corrupt_z = iv.cache_z(model, group.clean), iv.cache_z(model, group.corrupt)
    senders: list[Head] = [(0, 0), (0, 3), (1, 1)]
    batched = circuits.path_patching_raw(runner, cache, senders, receivers)
    both = Receivers("kv", ((2, 0), (2, 1)))  # the partner as a receiver too: nothing left to pin
    unpinned = torch.stack(
        [circuits.path_patching_reference(model, group, clean_z, corrupt_z, s, both) for s in senders]
    )
    torch.testing.assert_close(
        circuits.path_patching_raw(runner, cache, senders, both), unpinned, atol=1e-4, rtol=1e-4
    )
    assert not torch.allclose(batched, unpinned, atol=1e-4)


# ----------------------------------------------------------------- 3. only along the chosen path


def test_a_sender_at_or_above_every_receiver_changes_nothing(model: LoadedModel) -> None:
    runner = Runner(model)
    _, caches = task_caches(model)
    for receivers in (
        Receivers("q", ((1, 0), (1, 2))),
        Receivers("kv", ((1, 1),)),
        Receivers("k", ((1, 3),)),
    ):
        senders: list[Head] = [(1, 1), (2, 3), (1, 3), (0, 0), (0, 2)]
        shares = circuits.path_patching(runner, caches, senders, receivers)
        assert shares[:3].tolist() == [0.0, 0.0, 0.0]  # skipped, not computed
        assert np.abs(shares[3:]).max() > 1e-4
        raw = circuits.path_patching_raw(runner, caches[0], senders[:3], receivers)
        torch.testing.assert_close(raw, caches[0].clean.logit_diff.expand(3, -1), atol=1e-5, rtol=1e-5)


def test_patching_clean_into_clean_changes_nothing(model: LoadedModel) -> None:
    runner = Runner(model)
    data, _ = task_caches(model)
    group = dataclasses.replace(data.groups[0], corrupt=data.groups[0].clean)
    cache = circuits.cache_group(runner, group)
    torch.testing.assert_close(cache.corrupt.logit_diff, cache.clean.logit_diff)
    for receivers in RECEIVERS.values():
        raw = circuits.path_patching_raw(runner, cache, SENDERS, receivers)
        torch.testing.assert_close(raw, cache.clean.logit_diff.expand(len(SENDERS), -1), atol=1e-5, rtol=1e-5)
    # shares of a zero gap are undefined: refused with the reason
    with pytest.raises(ConfigError, match="same mean logit difference"):
        circuits.path_patching(runner, [cache], SENDERS, RECEIVERS["logits"])
    with pytest.raises(ConfigError, match="same mean logit difference"):
        circuits.activation_patching(runner, [cache], SENDERS)


def test_logits_path_equals_activation_patching_for_last_layer_senders(model: LoadedModel) -> None:
    """Into the logits, a sender's path differs from its total effect only through later heads: for a
    last-layer head (no later head; same-layer heads do not read it) the two are the same number."""
    runner = Runner(model)
    _, caches = task_caches(model)
    heads = every_head(model)
    path = circuits.path_patching(runner, caches, heads, Receivers("logits"))
    act = circuits.activation_patching(runner, caches, heads)
    last = [i for i, (layer, _) in enumerate(heads) if layer == model.n_layers - 1]
    earlier = [i for i, (layer, _) in enumerate(heads) if layer < model.n_layers - 1]
    np.testing.assert_allclose(path[last], act[last], rtol=1e-4, atol=1e-4)
    assert np.abs(path[earlier] - act[earlier]).max() > 1e-3  # later heads react in one, not the other


# ------------------------------------------------------------------- 4. activation patching


def test_batched_activation_patching_equals_a_per_head_loop(model: LoadedModel) -> None:
    runner = Runner(model)
    data, caches = task_caches(model)
    heads = every_head(model)
    clean = torch.cat([c.clean.logit_diff for c in caches]).double()
    corrupt = torch.cat([c.corrupt.logit_diff for c in caches]).double()
    gap = float(clean.mean() - corrupt.mean())
    loop = []
    for layer, h in heads:
        deltas = []
        for group in data.groups:
            corrupt_z = iv.cache_z(model, group.corrupt, [layer])[layer]
            before = bridge_logit_diff(model, group.clean, group)
            with iv.patch_activation(model, attn_hook(layer, "z"), corrupt_z, heads=[h]):
                deltas.append(bridge_logit_diff(model, group.clean, group) - before)
        loop.append(float(torch.cat(deltas).double().mean()) / gap)
    assert np.abs(np.asarray(loop)).max() > 1e-3
    for batch_size in (5, 512):  # a few heads per pass, or all of them in one
        batched = circuits.activation_patching(runner, caches, heads, batch_size=batch_size)
        np.testing.assert_allclose(batched, loop, rtol=1e-4, atol=1e-4)
    some = heads[5:9]
    np.testing.assert_allclose(
        circuits.activation_patching(runner, caches, some), loop[5:9], rtol=1e-4, atol=1e-4
    )


def test_attribution_patching_is_the_slope_of_activation_patching(model: LoadedModel) -> None:
    """Attribution patching is the first-order term: patching z_clean + eps * (z_corrupt - z_clean)
    into one head changes the logit difference by eps * attribution * gap, to first order."""
    runner = Runner(model)
    _, caches = task_caches(model)
    attribution = circuits.attribution_patching(runner, caches)
    clean = torch.cat([c.clean.logit_diff for c in caches]).double()
    corrupt = torch.cat([c.corrupt.logit_diff for c in caches]).double()
    gap = float(clean.mean() - corrupt.mean())
    eps = 1e-2
    checked = 0
    for layer, h in [(0, 1), (1, 2), (model.n_layers - 1, 0)]:
        deltas = []
        for cache in caches:
            nudged = cache.clean_z[layer] + eps * (cache.corrupt_z[layer] - cache.clean_z[layer])
            with iv.patch_activation(model, attn_hook(layer, "z"), nudged, heads=[h]):
                after = bridge_logit_diff(model, cache.group.clean, cache.group)
            deltas.append(after - cache.clean.logit_diff)
        slope = float(torch.cat(deltas).double().mean()) / eps / gap
        if abs(attribution[layer, h]) > 1e-3:
            checked += 1
        np.testing.assert_allclose(slope, attribution[layer, h], rtol=0.05, atol=2e-3)
    assert checked >= 1  # at least one head with a clearly non-zero slope was compared
    np.testing.assert_allclose(
        circuits.screened_senders(model, attribution, 3),
        sorted(sorted(every_head(model), key=lambda x: -abs(attribution[x]))[:3]),
    )


# ------------------------------------------------------------------------- 5. mean ablation


def test_mean_ablation_keeps_everything_or_replaces_everything(model: LoadedModel) -> None:
    runner = Runner(model)
    data, caches = task_caches(model)
    means = circuits.template_means(runner, caches, data.groups)
    for group, mean in zip(data.groups, means, strict=True):  # the mean over the template's ABC prompts
        corrupt_z = iv.cache_z(model, group.corrupt)
        for layer in range(model.n_layers):
            torch.testing.assert_close(mean[layer], corrupt_z[layer].mean(0), atol=1e-6, rtol=1e-5)

    heads = every_head(model)
    some: list[Head] = [(0, 1), (1, 2), (2, 0), (2, 3)]
    got = circuits.mean_ablated_logit_diff(runner, caches, means, [heads, [], some], batch_size=4)
    clean = float(torch.cat([c.clean.logit_diff for c in caches]).double().mean())
    assert got[0] == pytest.approx(clean, abs=1e-5)

    def by_hand(keep: Sequence[Head]) -> float:
        lds = []
        for group, mean in zip(data.groups, means, strict=True):
            with ExitStack() as stack:
                for layer in range(model.n_layers):
                    ablate = [h for h in range(model.n_heads) if (layer, h) not in keep]
                    if ablate:
                        stack.enter_context(
                            iv.patch_activation(model, attn_hook(layer, "z"), mean[layer][None], heads=ablate)
                        )
                lds.append(bridge_logit_diff(model, group.clean, group))
        return float(torch.cat(lds).double().mean())

    assert got[1] == pytest.approx(by_hand([]), abs=1e-4)
    assert got[2] == pytest.approx(by_hand(some), abs=1e-4)
    assert abs(got[1] - clean) > 1e-3 and abs(got[2] - got[1]) > 1e-3


def test_template_means_do_not_depend_on_how_a_template_is_chunked(model: LoadedModel) -> None:
    """``prepare`` cuts a template group into chunks of ``batch_size // 4`` prompts: the means must
    pool the chunks of one template, or mean ablation would depend on the batch size."""
    runner = Runner(model)
    data = circuits.ioi_task(model, 16, seed=1, part="discovery")
    assert max(len(g) for g in data.groups) > 1
    whole = [circuits.cache_group(runner, g) for g in data.groups]
    m_whole = circuits.template_means(runner, whole, data.groups)
    small_data, single, sig_single = circuits.prepare(
        runner, "ioi", CircuitConfig(n_items=16, seed=1, batch_size=4, progress=False)
    )
    # the signatures read during the caching pass equal those of a separate pass
    separate = circuits.attention_signatures(runner, data.groups)
    assert set(sig_single) == set(separate)
    for name, grid in separate.items():
        np.testing.assert_allclose(sig_single[name], grid, rtol=1e-5, atol=1e-7)
    assert all(len(c.group) == 1 for c in single) and small_data.texts == data.texts
    m_single = circuits.template_means(runner, single, small_data.groups)
    owner = [g for g, group in enumerate(data.groups) for _ in range(len(group))]
    assert len(owner) == len(single)
    for k, g in enumerate(owner):
        for layer in range(model.n_layers):
            torch.testing.assert_close(m_single[k][layer], m_whole[g][layer], atol=1e-6, rtol=1e-5)
    keep: list[list[Head]] = [[], [(1, 0), (2, 2)]]
    np.testing.assert_allclose(
        circuits.mean_ablated_logit_diff(runner, single, m_single, keep, batch_size=4),
        circuits.mean_ablated_logit_diff(runner, whole, m_whole, keep),
        atol=1e-5,
    )


# ------------------------------------------------------------------ 6. classes, top heads, reuse

ATT = 0.1


def _grids(**cells: dict[Head, float]) -> dict[str, np.ndarray]:
    out = {name: np.zeros((3, 4)) for name in circuits.SIGNATURES}
    for name, values in cells.items():
        for head, v in values.items():
            out[name][head] = v
    return out


def _scores(values: dict[Head, float]) -> np.ndarray:
    grid = np.zeros((3, 4))
    for head, v in values.items():
        grid[head] = v
    return grid


def test_classify_logits_stage_by_score_sign_and_signature() -> None:
    cfg = CircuitConfig(min_share=0.02, min_attention=ATT)
    scores = _scores(
        {
            (2, 1): -0.5,
            (2, 3): -0.3,
            (1, 0): -0.4,
            (1, 2): -0.6,
            (2, 0): 0.2,
            (0, 0): -0.01,
            (0, 1): np.nan,
            (0, 2): 0.02,
        }
    )
    sig = _grids(
        end_to_target={
            (2, 1): 0.6,
            (2, 3): 0.5,
            (1, 0): 0.05,
            (1, 2): 0.3,
            (2, 0): 0.5,
            (0, 0): 0.9,
            (0, 1): 0.9,
            (0, 2): 0.4,
        },
        end_to_dup={(2, 1): 0.1, (1, 2): 0.4, (0, 2): 0.1},
    )
    found = circuits.classify("logits", scores, sig, cfg)
    assert set(found) == {"name_mover", "negative_mover"}
    # strongest first; (1, 0) fails min_attention, (1, 2) looks more at the duplicate, (0, 0) is
    # below min_share, (0, 1) was not tested (NaN)
    assert found["name_mover"] == [(2, 1), (2, 3)]
    assert found["negative_mover"] == [(2, 0), (0, 2)]  # positive scores, exactly min_share included
    capped = circuits.classify("logits", scores, sig, dataclasses.replace(cfg, max_per_class=1))
    assert capped["name_mover"] == [(2, 1)] and capped["negative_mover"] == [(2, 0)]
    strict = circuits.classify("logits", scores, sig, dataclasses.replace(cfg, min_share=0.35))
    assert strict["name_mover"] == [(2, 1)] and strict["negative_mover"] == []


def test_classify_later_stages() -> None:
    cfg = CircuitConfig(min_share=0.02, min_attention=ATT)
    sig = _grids(
        end_to_dup={(1, 0): 0.5, (1, 1): 0.5, (1, 3): 0.05},
        end_to_target={(1, 0): 0.1, (1, 1): 0.7},
        dup2_to_dup1_next={(0, 0): 0.4, (0, 1): 0.2, (0, 2): 0.3, (0, 3): 0.3},
        dup2_to_dup1={(0, 0): 0.1, (0, 1): 0.6, (0, 2): 0.3, (0, 3): 0.05},
        dup1_next_to_dup1={(0, 0): 0.8, (0, 1): 0.05, (0, 2): 0.3},
    )
    mq = _scores({(1, 0): -0.2, (1, 1): -0.4, (1, 3): -0.3, (0, 0): 0.5})
    assert circuits.classify("mover_queries", mq, sig, cfg) == {"s_inhibition": [(1, 0)]}
    kv = _scores({(0, 0): -0.1, (0, 1): -0.2, (0, 2): -0.3, (0, 3): 0.3})
    found = circuits.classify("inhibition_kv", kv, sig, cfg)
    # (0, 2) ties: duplicate-token wins ties; (0, 3) has the signature of an induction head but a
    # positive score
    assert found == {"induction": [(0, 0)], "duplicate_token": [(0, 2), (0, 1)]}
    k = _scores({(0, 0): -0.05, (0, 1): -0.5, (0, 2): -0.2, (0, 3): np.nan})
    assert circuits.classify("induction_k", k, sig, cfg) == {"previous_token": [(0, 2), (0, 0)]}


def test_top_heads_by_absolute_score_ignoring_untested_heads() -> None:
    grid = _scores({(0, 0): 0.1, (1, 2): -0.9, (2, 3): 0.5, (2, 0): np.nan, (1, 1): -0.3})
    assert circuits.top_heads(grid, 25.0) == {(1, 2), (2, 3), (1, 1)}  # 3 of 12
    assert circuits.top_heads(grid, 1.0) == {(1, 2)}  # at least one
    everything = circuits.top_heads(grid, 100.0)
    assert len(everything) == 11 and (2, 0) not in everything


def test_overlap_curve_on_hand_built_grids() -> None:
    base = (100.0 - np.arange(100)).reshape(10, 10)  # head i has the i-th largest score
    b_logits = -base.copy()  # sign does not matter
    b_logits.flat[1], b_logits.flat[50] = b_logits.flat[50], b_logits.flat[1]
    b_mq = base.copy()
    b_mq.flat[0] = b_mq.flat[1] = np.nan  # untested on b
    a = {"logits": base, "mover_queries": base}
    b = {"logits": b_logits, "mover_queries": b_mq}
    table = circuits.overlap_curve(a, b, [2.0, 5.0])
    assert list(table.columns) == ["stage", "percent", "k", "shared", "overlap", "jaccard"]
    got = {(r.stage, r.percent): (r.k, r.shared, r.overlap, r.jaccard) for r in table.itertuples()}
    assert set(got) == {(s, p) for s in ("logits", "mover_queries", "all") for p in (2.0, 5.0)}
    assert got[("logits", 2.0)] == pytest.approx((2, 1, 0.5, 1 / 3))  # {0,1} vs {0,50}
    assert got[("logits", 5.0)] == pytest.approx((5, 4, 0.8, 4 / 6))
    assert got[("mover_queries", 2.0)] == pytest.approx((2, 0, 0.0, 0.0))  # {0,1} vs {2,3}
    assert got[("mover_queries", 5.0)] == pytest.approx((5, 3, 0.6, 3 / 7))  # {0..4} vs {2..6}
    assert got[("all", 2.0)] == pytest.approx((4, 1, 0.25, 1 / 7))
    assert got[("all", 5.0)] == pytest.approx((10, 7, 0.7, 7 / 13))
    same = circuits.overlap_curve(a, a, [2.0])
    assert (same["overlap"] == 1.0).all() and (same["jaccard"] == 1.0).all()


def test_rank_correlations() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4))
    y = x.copy()
    y[0, 0] = np.nan  # left out
    table = circuits.rank_correlations(
        {"logits": x, "mover_queries": x, "inhibition_kv": x},
        {"logits": y, "mover_queries": -(x**3), "inhibition_kv": np.ones((3, 4))},
    )
    rows = table.set_index("stage")
    assert list(rows.index) == ["logits", "mover_queries", "inhibition_kv"]
    assert rows.loc["logits", "spearman"] == pytest.approx(1.0) and rows.loc["logits", "n_heads"] == 11
    assert (
        rows.loc["mover_queries", "spearman"] == pytest.approx(-1.0)
        and rows.loc["mover_queries", "n_heads"] == 12
    )
    assert np.isnan(rows.loc["inhibition_kv", "spearman"])  # a constant grid has no ranking


# ----------------------------------------------------------------------------- 7. intervention


def _hand_group(end: list[int], wrong: list[list[int]], t: int = 6) -> PromptSet:
    n = len(end)
    zeros = torch.zeros(n, dtype=torch.long)
    return PromptSet(
        clean=torch.zeros(n, t, dtype=torch.long),
        corrupt=torch.zeros(n, t, dtype=torch.long),
        right=zeros,
        wrong=zeros,
        candidates=torch.zeros(n, 3, dtype=torch.long),
        answer_index=zeros,
        roles={r: torch.tensor(end) for r in circuits.ROLES},
        wrong_positions=torch.tensor(wrong),
        items=np.arange(n),
    )


def test_wrong_options_edit_moves_ends_row_onto_the_wrong_options() -> None:
    group = _hand_group(end=[5, 3], wrong=[[1, 2], [0, 2]])
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(4, 6, 6, generator=gen).tril()
    pattern = raw / raw.sum(-1, keepdim=True)  # two copies of the two prompts: [4, T, T]
    before = pattern.clone()
    out = circuits.wrong_options_edit(group, 2)(pattern)
    assert torch.equal(pattern, before)  # the input is left alone
    expected = pattern.clone()
    for b, (e, wrong) in enumerate([(5, [1, 2]), (3, [0, 2])] * 2):
        expected[b, e] = 0.0
        expected[b, e, wrong] = 0.5
    assert torch.equal(out, expected)
    torch.testing.assert_close(out.sum(-1), torch.ones(4, 6))
    assert (out.triu(1) == 0).all()


def test_intervention_by_hand(model: LoadedModel) -> None:
    runner = Runner(model)
    data, caches = task_caches(model, "colored_objects", 6)
    heads: list[Head] = [(1, 2), (2, 0)]
    out = circuits.intervene(runner, data.groups, [[], heads], batch_size=2)

    def edit(group: PromptSet) -> iv.PatternEdit:
        def fn(p: torch.Tensor) -> torch.Tensor:
            for b in range(p.shape[0]):
                e, wrong = int(group.roles["end"][b]), group.wrong_positions[b]
                p[b, e] = 0.0
                p[b, e, wrong] = 1.0 / len(wrong)
            return p

        return fn

    base, edited, cand, vocab = [], [], [], []
    for group in data.groups:
        base.append(bridge_logit_diff(model, group.clean, group))
        with iv.edit_pattern(model, dict.fromkeys(heads, edit(group))):
            edited.append(bridge_logit_diff(model, group.clean, group))
            with torch.no_grad():
                logits = model.bridge(group.clean)[torch.arange(len(group)), group.roles["end"]]  # type: ignore[misc]
        cand.append(logits.gather(1, group.candidates).argmax(-1) == group.answer_index)
        vocab.append(logits.argmax(-1) == group.right)
    np.testing.assert_allclose(out[0]["logit_diff"], torch.cat(base).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        out[0]["logit_diff"], torch.cat([c.clean.logit_diff for c in caches]).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(out[1]["logit_diff"], torch.cat(edited).numpy(), atol=1e-5)
    assert np.array_equal(out[1]["candidate_correct"], torch.cat(cand).numpy())
    assert np.array_equal(out[1]["vocab_correct"], torch.cat(vocab).numpy())
    assert np.array_equal(out[0]["items"], np.concatenate([g.items for g in data.groups]))
    assert np.abs(out[1]["logit_diff"] - out[0]["logit_diff"]).max() > 1e-3


# --------------------------------------------------------------------------- 8. configuration


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"n_items": 1}, "n_items=1: use at least 2"),
        ({"n_items": True}, "n_items"),
        ({"min_share": 1.0}, r"min_share=1.0: a share of the gap in \[0, 1\)"),
        ({"min_share": -0.1}, "min_share"),
        ({"min_attention": 1.5}, r"min_attention=1.5: an attention weight in \[0, 1\]"),
        ({"max_per_class": 0}, "max_per_class=0: allow at least 1"),
        ({"n_random": 0}, "n_random=0: draw at least 1"),
        ({"reuse_percents": ()}, r"reuse_percents=\(\): percentages in \(0, 100\]"),
        ({"reuse_percents": (0.0, 2.0)}, "reuse_percents"),
        ({"reuse_percents": (2.0, 150.0)}, "reuse_percents"),
        ({"max_senders": 0}, "max_senders=0: test at least 1 head, or none"),
        ({"batch_size": 0}, "batch_size=0: use at least 1"),
        ({"n_boot": 0}, "n_boot=0: use at least 1"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(changes: dict[str, Any], match: str) -> None:
    CircuitConfig().validate()
    with pytest.raises(ConfigError, match=match):
        CircuitConfig(**changes).validate()
    with pytest.raises(ConfigError, match=match):  # before any work
        circuits.run_ioi(wordy("tiny-gpt2"), CircuitConfig(**changes))


def test_bad_receivers_are_refused() -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        Receivers("values")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="need at least one head"):
        Receivers("q")
    with pytest.raises(ConfigError, match=r"layers are 0\.\.2 and heads 0\.\.3"):
        circuits.path_patching_raw(
            Runner(wordy("tiny-gpt2")), task_caches(wordy("tiny-gpt2"))[1][0], [(3, 0)], Receivers("logits")
        )


def test_cli_show_config_and_overrides() -> None:
    from typer.testing import CliRunner

    from headlab.cli import app

    cli = CliRunner()
    result = cli.invoke(app, ["run", "ioi", "--show-config"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    expected = dataclasses.asdict(CircuitConfig())
    assert shown == {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}
    result = cli.invoke(
        app,
        ["run", "circuit-reuse", "--show-config", "--set", "max_senders=12", "--set", "reuse_percents=2,5"],
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["max_senders"] == 12 and shown["reuse_percents"] == [2.0, 5.0]
    result = cli.invoke(app, ["run", "colored-objects", "--show-config", "--set", "min_share=1.5"])
    assert isinstance(result.exception, ConfigError) and "min_share" in str(result.exception)
