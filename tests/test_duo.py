"""DuoAttention gates: binarising by share, the loss and its gradient, training, the config's
refusals, the KV-cache formula, agreement with the retrieval score, saved gates, end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from analyses import runstore
from analyses.base import config_from_overrides
from analyses.duo import (
    DuoConfig,
    PasskeyContext,
    agreement_table,
    binarise,
    duo_decode,
    duo_loss,
    full_targets,
    kv_head_scores,
    kv_ratio,
    load_gates,
    n_retrieval,
    passkey_context,
    run_duo,
    save_gates,
    selections,
    spearman,
    summary,
    train_gates,
)
from analyses.duo.train import final_hidden
from analyses.tasks import needles
from probe.decode import greedy_decode
from probe.errors import ConfigError
from probe.loading import LoadedModel
from probe.streaming import duo_attention
from tests.conftest import fixed_code_revision

# tiny-llama: 3 layers x 2 KV heads (4 query heads), a byte-level tokenizer, 512 positions
TINY = {
    "sink": 4,
    "recent": 16,
    "train_min_length": 400,
    "train_max_length": 480,
    "train_n_lengths": 2,
    "n_passkeys": 2,
    "steps": 3,
    "n_contexts": 2,
    "lengths": (300,),
    "depths": (0.5,),
    "n_needles": 2,
    "novel_answer_tokens": False,
    "score_lengths": (300,),
    "score_depths": (0.5,),
    "score_needles": 1,
    "random_seeds": 2,
    "shares": (0.25, 0.5),
    "n_boot": 100,
    "progress": False,
}


def tiny_config(**changes: object) -> DuoConfig:
    return DuoConfig(**{**TINY, **changes})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ binarising


def test_binarise_keeps_the_top_share_by_gate_value() -> None:
    gates = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    np.testing.assert_array_equal(binarise(gates, 0.5), [[1, 0, 1], [0, 1, 0]])  # k = 3
    np.testing.assert_array_equal(binarise(gates, 0.2), [[1, 0, 0], [0, 0, 0]])  # 1.2 -> 1
    # never a 0.5 threshold: gates all below 0.5 still give half retrieval heads, all above it too
    assert binarise(np.full((2, 3), 0.2), 0.5).sum() == 3
    assert binarise(np.full((2, 3), 0.9), 0.5).sum() == 3


def test_ties_go_to_the_earlier_layer_then_the_lower_kv_head() -> None:
    gates = np.array([[0.3, 0.7], [0.7, 0.7]])
    np.testing.assert_array_equal(binarise(gates, 0.25), [[0, 1], [0, 0]])  # k = 1 of the three 0.7s
    np.testing.assert_array_equal(binarise(gates, 0.5), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(binarise(np.full((2, 2), 0.4), 0.75), [[1, 1], [1, 0]])


def test_the_share_rounds_half_up_within_one_and_n() -> None:
    assert n_retrieval(0.25, 6) == 2  # 1.5
    assert n_retrieval(0.25, 10) == 3  # 2.5
    assert n_retrieval(0.24, 10) == 2
    assert n_retrieval(0.01, 10) == 1  # at least one retrieval head
    assert n_retrieval(0.99, 10) == 10
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="strictly between 0 and 1"):
            n_retrieval(bad, 10)


# ------------------------------------------------------------------------------ formula and agreement


def test_kv_ratio_is_the_papers_formula() -> None:
    assert kv_ratio(0.25, 1000, 32, 128) == pytest.approx(0.25 + 0.75 * 160 / 1000)
    assert kv_ratio(0.5, 4096, 128, 256) == pytest.approx(0.5 + 0.5 * 384 / 4096)
    assert kv_ratio(0.1, 100, 32, 128) == 1.0  # a streaming head keeps the whole short context
    with pytest.raises(ConfigError):
        kv_ratio(0.5, 0, 4, 4)


def test_agreement_on_hand_built_rankings() -> None:
    gates = np.array([[0.9, 0.8, 0.1], [0.7, 0.2, 0.3]])
    same = gates * 2  # the same order
    table = agreement_table(gates, same, (0.5,))
    row = table.iloc[0]
    assert (
        row["k"] == 3
        and row["overlap"] == 3
        and row["jaccard"] == 1.0
        and row["spearman"] == pytest.approx(1.0)
    )
    assert row["chance"] == pytest.approx(9 / 6)
    reversed_ = -gates
    row = agreement_table(gates, reversed_, (0.5, 0.2)).iloc[1]
    assert row["k"] == 1 and row["overlap"] == 0 and row["spearman"] == pytest.approx(-1.0)
    # top-2 by gate: (0,0), (0,1); by score: (0,0), (1,2): one in common
    scores = np.array([[5.0, 0.0, 1.0], [2.0, 0.5, 4.0]])
    row = agreement_table(gates, scores, (1 / 3,)).iloc[0]
    assert (row["k"], row["overlap"], row["jaccard"]) == (2, 1, pytest.approx(1 / 3))
    assert np.isnan(spearman(gates, np.ones_like(gates)))  # a constant ranking has no correlation


def test_kv_head_scores_take_the_largest_query_head() -> None:
    scores = np.array([[0.1, 0.4, np.nan, np.nan], [0.0, 0.0, 0.3, np.nan]])
    np.testing.assert_allclose(kv_head_scores(scores, 2), [[0.4, np.nan], [0.0, 0.3]])


def test_selections_have_the_same_size_per_share() -> None:
    gates = np.linspace(0, 1, 12).reshape(3, 4)
    cfg = tiny_config(shares=(0.25, 0.5), random_seeds=3)
    chosen = selections(gates, -gates, cfg)
    assert [c.selection for c in chosen[:6]] == [
        "full",
        "duo",
        "retrieval_score",
        "random",
        "random",
        "random",
    ]
    for c in chosen[1:]:
        assert c.mask.sum() == n_retrieval(c.share, 12)
    duo, score = chosen[1], chosen[2]
    assert duo.mask.ravel()[-3:].all() and score.mask.ravel()[:3].all()  # highest gates, highest -gates
    randoms = [c.mask for c in chosen if c.selection == "random" and c.share == 0.5]
    assert len({m.tobytes() for m in randoms}) > 1  # seeds draw different sets
    assert [c.selection for c in selections(gates, np.full_like(gates, np.nan), cfg)].count(
        "retrieval_score"
    ) == 0


# ------------------------------------------------------------------------------ config


def test_config_refusals() -> None:
    with pytest.raises(ConfigError, match="would drop nothing"):
        tiny_config(sink=100, recent=200)  # 300 >= the 300-token evaluation length
    with pytest.raises(ConfigError, match="train_min_length"):
        DuoConfig(sink=512, recent=512, lengths=(2048,), score_lengths=(2048,))
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        tiny_config(shares=(0.5, 1.0))
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        tiny_config(shares=(0.0,))
    with pytest.raises(ConfigError, match="train_max_length"):
        tiny_config(train_max_length=100)
    with pytest.raises(ConfigError, match="lr must be"):
        tiny_config(lr=0.0)
    with pytest.raises(ConfigError, match=r"^shares are fractions"):
        config_from_overrides(DuoConfig, ["shares=0.1,2"])
    assert DuoConfig().train_lengths == (1024, 1463, 1902, 2341, 2779, 3218, 3657, 4096)


def test_lengths_beyond_the_model_are_refused(tiny_llama: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="beyond tiny-llama's context of 512"):
        run_duo(tiny_llama, tiny_config(train_max_length=600))
    with pytest.raises(ConfigError, match="no room to decode"):
        run_duo(tiny_llama, tiny_config(lengths=(500,)))


@pytest.mark.parametrize(
    ("family", "why"),
    [
        ("mpt", "mpt computes attention inside its layers"),  # was an AttributeError in MPT's SDPA path
    ],
)
def test_families_duo_attention_refuses_are_refused_before_training(
    family: str, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import probe
    from analyses.duo import train
    from probe.families import save_checkpoint

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the gate training ran")

    monkeypatch.setattr(train, "full_targets", no_training)
    model = probe.load_model(str(save_checkpoint(family, tmp_path / family)), device="cpu")
    with pytest.raises(ConfigError, match=f"{why}.*duo_attention"):
        run_duo(
            model,
            tiny_config(train_min_length=240, train_max_length=248, lengths=(240,), score_lengths=(240,)),
        )


# ------------------------------------------------------------------------------ data and loss


@pytest.fixture
def context(tiny_llama: LoadedModel) -> PasskeyContext:
    return passkey_context(
        tiny_llama, 480, n_passkeys=2, depth_min=0.1, depth_max=0.9, passkey_words=2, seed=7
    )


def test_the_context_ends_with_the_needles_answers(tiny_llama: LoadedModel, context: PasskeyContext) -> None:
    start, end = context.answer_span
    assert end == context.n_tokens and abs(context.n_tokens - 480) <= 20
    said = tiny_llama.tokenizer.decode(context.ids[start:end])
    assert said.strip() == ", ".join(context.answers) + "."
    assert list(context.loss_positions) == list(range(start - 1, end - 1))
    assert 0.0 <= context.depths[0] < context.depths[-1] <= 1.0  # the nearest sentence boundaries, in order
    text = tiny_llama.tokenizer.decode(context.ids[:start])
    assert all(a in text for a in context.answers)  # each needle is in the context too


def _loss(
    model: LoadedModel, ctx: PasskeyContext, gates: torch.Tensor, lam: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([ctx.ids])
    target = full_targets(model, ids)
    with duo_attention(model, gates, sink=4, recent=16) as native:
        return duo_loss(final_hidden(native, ids), target, ctx.loss_positions, gates, lam)


def test_the_loss_is_the_regulariser_alone_at_gates_one(
    tiny_llama: LoadedModel, context: PasskeyContext
) -> None:
    ones = torch.ones(tiny_llama.n_layers, tiny_llama.n_kv_heads, requires_grad=True)
    total, distill, reg = _loss(tiny_llama, context, ones)
    assert (
        float(distill.detach()) == 0.0
        and float(reg.detach()) == pytest.approx(0.05)
        and float(total.detach()) == pytest.approx(0.05)
    )
    zeros = torch.zeros(tiny_llama.n_layers, tiny_llama.n_kv_heads, requires_grad=True)
    total, distill, reg = _loss(tiny_llama, context, zeros)
    assert context.n_tokens > 20 and float(distill.detach()) > 1e-3 and float(reg.detach()) == 0.0


def test_gradients_reach_the_gates_only(tiny_llama: LoadedModel, context: PasskeyContext) -> None:
    gates = torch.full((tiny_llama.n_layers, tiny_llama.n_kv_heads), 0.5, requires_grad=True)
    total, _, _ = _loss(tiny_llama, context, gates)
    total.backward()
    assert gates.grad is not None and bool((gates.grad != 0).any())
    assert tiny_llama.native_model is not None
    assert all(p.grad is None for p in tiny_llama.native_model.parameters())


def test_a_few_steps_lower_the_loss_and_keep_gates_in_range(tiny_llama: LoadedModel) -> None:
    cfg = tiny_config(steps=6, n_contexts=1, train_n_lengths=1, train_max_length=400)
    trained = train_gates(tiny_llama, cfg)
    g = trained.gates
    assert g.shape == (3, 2) and g.min() >= 0.0 and g.max() <= 1.0 and g.min() < 1.0
    loss = trained.loss
    assert list(loss["step"]) == list(range(6)) and loss["distill"].iloc[0] == 0.0
    assert loss["loss"].iloc[-1] < loss["loss"].iloc[0]
    ctx = passkey_context(
        tiny_llama,
        400,
        n_passkeys=2,
        depth_min=0.05,
        depth_max=0.95,
        passkey_words=2,
        seed=cfg.seed + 300_007,
    )
    before = _loss(tiny_llama, ctx, torch.ones(3, 2))[0]
    after = _loss(tiny_llama, ctx, torch.tensor(g, dtype=torch.float32))[0]
    assert float(after) < float(before)


def test_decoding_with_every_gate_one_is_the_models_own(tiny_llama: LoadedModel) -> None:
    test = needles.make_grid(tiny_llama, [300], [0.5], 1, novel_answer_tokens=False)[0]
    ours = duo_decode(tiny_llama, np.ones((3, 2)), test.prompt_ids, 12, tiny_config())
    theirs = greedy_decode(tiny_llama, test.prompt_ids, 12, record=False)
    assert ours.tokens == theirs.tokens


# ------------------------------------------------------------------------------ saved gates


def test_gates_save_load_and_refuse_another_model(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    gates = np.array([[1.0, 0.25], [0.5, 0.0], [0.125, 0.75]])
    path = save_gates(tmp_path / "g.json", gates, tiny_llama, tiny_config())
    assert path.stat().st_size < 1_000_000
    loaded, record = load_gates(path, tiny_llama)
    np.testing.assert_array_equal(loaded, gates)
    assert record["model"] == "tiny-llama" and record["config"]["sink"] == 4
    other = json.loads(path.read_text())
    other["model"] = "smollm2-135m"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="trained on 'smollm2-135m', not 'tiny-llama'"):
        load_gates(tmp_path / "other.json", tiny_llama)
    wrong = json.loads(path.read_text())
    wrong["gates"], wrong["shape"] = [[1.0] * 3] * 3, [3, 3]
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(ConfigError, match=r"needs \[n_layers, n_kv_heads\] = \[3, 2\]"):
        load_gates(tmp_path / "wrong.json", tiny_llama)
    with pytest.raises(ConfigError, match="no such file"):
        load_gates(tmp_path / "none.json", tiny_llama)


def test_shipped_gates_are_found_by_model_name_or_refused_with_the_command(
    tiny_llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from analyses.duo import gates as gates_module

    monkeypatch.setattr(gates_module, "DATA_DIR", tmp_path)
    with pytest.raises(ConfigError, match="train them: headlab train duo-gates --model tiny-llama"):
        load_gates("shipped", tiny_llama)
    gates = np.array([[1.0, 0.25], [0.5, 0.0], [0.125, 0.75]])
    save_gates(gates_module.shipped_path("tiny-llama"), gates, tiny_llama, tiny_config())
    loaded, _ = load_gates("shipped", tiny_llama)
    np.testing.assert_array_equal(loaded, gates)
    assert not list(tmp_path.glob(".*"))  # written whole, no temporary left


def test_train_duo_gates_writes_a_file_run_duo_can_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from headlab.cli import main

    out = tmp_path / "g.json"
    sets = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TINY.items()]
    argv = ["headlab", "train", "duo-gates", "--model", "tiny-llama", "--device", "cpu", "--out", str(out)]
    monkeypatch.setattr("sys.argv", [*argv, *[a for s in sets for a in ("--set", s)]])
    with pytest.raises(SystemExit) as exc:
        main()
    text = capsys.readouterr().out
    assert exc.value.code in (0, None), text
    assert "trained 3 steps at lengths [400, 480]" in text and f"gates written: {out}" in text
    payload = json.loads(out.read_text())
    assert payload["trained"]["steps"] == 3 and len(payload["loss"]["distill"]) == 3
    assert payload["trained"]["command"].startswith(
        "headlab train duo-gates --model tiny-llama --device cpu --dtype float32 --set sink=4"
    )
    assert payload["trained"]["dtype"] == "float32"  # --dtype auto: float32 on the CPU


def test_auto_loads_shipped_gates_with_their_loss_curve_else_trains(
    tiny_llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from analyses.duo import gates as gates_module

    monkeypatch.setattr(gates_module, "DATA_DIR", tmp_path)
    cfg = replace(
        tiny_config(), gates_from="auto", retrieval_score=False, random_seeds=1, measure_cache=False
    )
    trained = run_duo(tiny_llama, cfg)  # nothing shipped for tiny-llama: it trains
    assert trained.notes["gates_from"] is None and len(trained.tables["loss"]) == cfg.steps
    record = {
        "trained": {"steps": 4, "lengths": [400], "seconds": 2.0, "device": "cuda", "dtype": "bfloat16"},
        "loss": {
            "step": [0, 1, 2, 3],
            "length": [400] * 4,
            "distill": [0.0, 0.5, 0.25, 0.125],
            "reg": [0.05] * 4,
        },
    }
    gates = np.array([[1.0, 0.25], [0.5, 0.0], [0.125, 0.75]])
    other = replace(tiny_config(), sink=2, recent=8)  # trained with another window
    save_gates(gates_module.shipped_path("tiny-llama"), gates, tiny_llama, other, extra=record)
    loaded = run_duo(tiny_llama, cfg)
    assert loaded.notes["gates_from"] == str(gates_module.shipped_path("tiny-llama"))
    np.testing.assert_allclose(loaded.arrays["gates"], gates.astype(np.float32))
    loss = loaded.tables["loss"]
    assert list(loss["step"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(loss["loss"], [0.05, 0.55, 0.3, 0.175])
    assert loss["gate_mean"].isna().all()  # not in the record: not made up
    text = summary(loaded)
    assert "trained 4 steps on lengths [400], 2 s on cuda, bfloat16)" in text
    assert "trained with sink=2, recent=8; this run's streaming heads use sink=4, recent=16" in text


@pytest.mark.parametrize(("name", "shape"), [("smollm2-135m", [30, 3]), ("gemma3-270m", [18, 1])])
def test_the_shipped_gates_belong_to_the_catalogue_models(name: str, shape: list[int]) -> None:
    """Each shipped gates file names its catalogue model, that model's weights and shape, and the
    command and settings that trained it (checked without loading the model)."""
    from analyses.duo import gates as gates_module
    from probe import zoo

    path = gates_module.shipped_path(name)
    payload = json.loads(path.read_text())
    assert path.stat().st_size < 1_000_000
    spec = zoo.CATALOGUE[name]
    assert payload["model"] == name and payload["weight_sha256"] == spec.weight_sha256
    g = np.asarray(payload["gates"])
    assert list(g.shape) == payload["shape"] == shape  # [n_layers, n_kv_heads] of the model
    assert ((g >= 0) & (g <= 1)).all() and g.std() > 0  # trained: not all at their initial 1
    trained = payload["trained"]
    assert trained["command"].startswith(
        f"headlab train duo-gates --model {name} --device cuda --dtype bfloat16"
    )
    assert f"--set steps={trained['steps']}" in trained["command"]
    assert len(payload["loss"]["distill"]) == trained["steps"] == len(payload["loss"]["reg"])
    c = payload["config"]
    settings = DuoConfig(
        train_min_length=c["train_min_length"],
        train_max_length=c["train_max_length"],
        train_n_lengths=c["train_n_lengths"],
    )
    assert trained["lengths"] == list(settings.train_lengths)


# ------------------------------------------------------------------------------ end to end


def test_a_tiny_run_writes_every_table_and_round_trips(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    cfg = tiny_config()
    result = run_duo(tiny_llama, cfg)
    t = result.tables
    assert set(t) >= {"heads", "gates", "loss", "accuracy", "decodes", "memory", "agreement", "score_tests"}
    assert len(t["heads"]) == 12 and len(t["gates"]) == 6 and len(t["loss"]) == 3
    assert sorted(t["gates"]["rank"]) == list(range(1, 7))
    np.testing.assert_allclose(result.arrays["gates"].ravel(), t["gates"]["gate"], rtol=1e-6)
    n_conditions = 1 + len(cfg.shares) * (1 + cfg.random_seeds)  # no test of the score grid was recalled
    assert len(t["decodes"]) == 2 * n_conditions or len(t["decodes"]) == 2 * (n_conditions + len(cfg.shares))
    pooled = t["accuracy"][t["accuracy"]["length"] == 0]
    assert (pooled["n_tests"] == 2).all() and (pooled["recall_low"] <= pooled["recall_high"]).all()
    memory = t["memory"]
    assert list(memory["share"]) == [0.25, 0.5]
    expected = [kv_ratio(k / 6, n, 4, 16) for k, n in zip(memory["k"], memory["n_tokens"], strict=True)]
    np.testing.assert_allclose(memory["kv_ratio"], expected)
    np.testing.assert_allclose(memory["kv_ratio_layers"], expected)  # no sliding-window layer here
    np.testing.assert_allclose(
        memory["measured_ratio"], expected, rtol=1e-9
    )  # no sliding layers: the formula
    assert "top KV heads" in summary(result) and "KV cache at share 0.25" in summary(result)
    with fixed_code_revision():
        saved = runstore.open_run(result.save(tmp_path / "runs"))
    assert saved.config == result.config
    for name in ("heads", "gates", "loss", "accuracy", "memory", "agreement"):
        assert list(saved.table(name).columns) == list(t[name].columns)
    # the saved gates skip training and give the same selections
    path = save_gates(tmp_path / "gates.json", result.arrays["gates"], tiny_llama, cfg)
    again = run_duo(tiny_llama, replace(cfg, gates_from=str(path), retrieval_score=False, random_seeds=1))
    assert len(again.tables["loss"]) == 0 and again.notes["gates_from"] == str(path)
    np.testing.assert_allclose(again.arrays["gates"], result.arrays["gates"], atol=1e-6)
    duo = t["decodes"][t["decodes"]["selection"] == "duo"].reset_index(drop=True)
    duo_again = again.tables["decodes"][again.tables["decodes"]["selection"] == "duo"].reset_index(drop=True)
    assert list(duo["generated"]) == list(duo_again["generated"])
