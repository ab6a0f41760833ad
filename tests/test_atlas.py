"""The head atlas: role rules with known answers, the join on hand-made runs, provenance and refusals,
findings, exports read back, the CLI, and the atlas of a tiny model's real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analyses import registry, runstore
from analyses.atlas import (
    AtlasConfig,
    build_atlas,
    compare,
    correlations,
    missing_analyses,
    multi_role,
    overlap,
    role_depth,
    run_atlas,
    run_missing,
    summary,
)
from analyses.atlas.export import export_atlas, read_json_export
from analyses.registry import ANALYSES
from analyses.roles import Role
from probe.errors import ConfigError

N_LAYERS, N_HEADS, N_KV = 4, 4, 2


def model_info(name: str = "m", sha: str = "a" * 64, bos_id: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "language",
        "weight_sha256": sha,
        "bos": {"mode": "default", "prepend": False, "token_id": bos_id, "token": "<s>"},
        "n_layers": N_LAYERS,
        "n_heads": N_HEADS,
        "n_kv_heads": N_KV,
        "d_head": 8,
        "dtype": "float32",
        **extra,
    }


def keys() -> pd.DataFrame:
    layer, head = np.meshgrid(np.arange(N_LAYERS), np.arange(N_HEADS), indexing="ij")
    return pd.DataFrame(
        {"layer": layer.ravel(), "head": head.ravel(), "kv_head": head.ravel() // (N_HEADS // N_KV)}
    )


def census_heads(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    heads = keys()
    for col in ("entropy", "alpha_0", "mean_distance"):
        heads[col] = rng.random(len(heads))
    heads["prev_token"] = 0.0
    heads["induction"] = 0.0
    heads["duplicate_token"] = 0.0
    heads.loc[(heads["layer"] == 0) & (heads["head"] == 1), "prev_token"] = 0.9  # L0H1 previous-token
    heads.loc[(heads["layer"] == 2) & (heads["head"] == 3), "induction"] = 0.7  # L2H3 induction
    heads.loc[(heads["layer"] == 2) & (heads["head"] == 3), "duplicate_token"] = 0.41  # and duplicate-token
    heads.loc[(heads["layer"] == 3) & (heads["head"] == 0), "duplicate_token"] = 0.4  # not above 0.4
    return heads


def sinks_heads() -> pd.DataFrame:
    heads = keys()
    heads["alpha0_natural"] = np.linspace(0, 1, len(heads))
    heads["sink_rate_natural"] = (heads["layer"] >= 2).astype(float)  # layers 2, 3 are sink heads
    heads["hidden_sink_rate_natural"] = 0.0
    return heads


def retrieval_heads() -> pd.DataFrame:
    heads = keys()
    heads["retrieval_score"] = 0.0
    heads.loc[(heads["layer"] == 2) & (heads["head"] == 3), "retrieval_score"] = 0.5
    heads.loc[(heads["layer"] == 1) & (heads["head"] == 0), "retrieval_score"] = 0.1  # not above 0.1
    heads["retrieval_validated"] = heads["retrieval_score"] > 0.3
    return heads


def write(root: Path, analysis: str, heads: pd.DataFrame, **info: Any) -> Path:
    return runstore.write_run(
        root, analysis=analysis, model_info=model_info(**info), config={"x": 1}, tables={"heads": heads}
    )


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write(root, "census", census_heads())
    write(root, "sinks", sinks_heads())
    write(root, "retrieval", retrieval_heads())
    return root


def head_row(atlas: pd.DataFrame, layer: int, head: int) -> pd.Series:
    return atlas[(atlas["layer"] == layer) & (atlas["head"] == head)].iloc[0]


# ------------------------------------------------------------------------------------------- roles


def _frame(values: list[Any], kv: list[int] | None = None) -> pd.DataFrame:
    n = len(values)
    return pd.DataFrame(
        {"layer": [0] * n, "head": list(range(n)), "kv_head": kv or list(range(n)), "x": values}
    )


def test_threshold_rules_and_nan() -> None:
    heads = _frame([0.1, 0.2, 0.3, math.nan])
    assert list(Role("r", "r", "x", "above", 0.2, "p").flags(heads)) == [False, False, True, False]
    assert list(Role("r", "r", "x", "at_least", 0.2, "p").flags(heads)) == [False, True, True, False]
    assert list(Role("r", "r", "x", "below", 0.2, "p").flags(heads)) == [True, False, False, False]


def test_top_share_rounds_half_up_and_keeps_ties() -> None:
    heads = _frame([5.0, 3.0, 3.0, 1.0, math.nan])
    # 0.3 * 5 = 1.5 -> 2 units: 5 and the 3s tied with the second; 0.1 * 5 = 0.5 -> 1; 0.25 * 5 -> 1
    assert list(Role("r", "r", "x", "top_share", 0.3, "p").flags(heads)) == [True, True, True, False, False]
    assert list(Role("r", "r", "x", "top_share", 0.1, "p").flags(heads)) == [True, False, False, False, False]
    assert list(Role("r", "r", "x", "top_share", 0.25, "p").flags(heads)) == [
        True,
        False,
        False,
        False,
        False,
    ]
    # rank_share keeps what DuoAttention's own rounding keeps at the same share
    from analyses.duo import n_retrieval

    ranks = _frame([float(r) for r in range(1, 11)])
    for share in (0.1, 0.25, 0.45, 0.5):
        kept = Role("r", "r", "x", "rank_share", share, "p").flags(ranks)
        assert int(kept.sum()) == n_retrieval(share, 10)


def test_per_kv_head_counts_kv_heads_not_query_heads() -> None:
    # two KV heads shared by pairs of query heads: a 50% share is one KV head, i.e. two query heads
    heads = _frame([0.9, 0.9, 0.2, 0.2], kv=[0, 0, 1, 1])
    role = Role("r", "r", "x", "top_share", 0.5, "p", per_kv_head=True)
    assert list(role.flags(heads)) == [True, True, False, False]
    rank = Role("r", "r", "x", "rank_share", 0.5, "p", per_kv_head=True)
    assert list(rank.flags(_frame([2, 2, 1, 1], kv=[0, 0, 1, 1]))) == [False, False, True, True]


def test_label_and_flag_rules() -> None:
    heads = _frame(["name_mover", "backup_mover+name_mover", "", "negative_mover"])
    assert list(Role("r", "r", "x", "label", "name_mover", "p").flags(heads)) == [True, True, False, False]
    kept = _frame(["kept:all", "", "kept:late+other", "keptx"])
    assert list(Role("r", "r", "x", "label", "kept:*", "p").flags(kept)) == [True, False, True, False]
    flags = _frame([True, False, "True", "false"])
    assert list(Role("r", "r", "x", "flag", None, "p").flags(flags)) == [True, False, True, False]


def test_bad_role_declarations_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs a share"):
        Role("r", "r", "x", "top_share", 1.5, "p")
    with pytest.raises(ConfigError, match="unknown rule"):
        Role("r", "r", "x", "bigger", 1.0, "p")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lower-case"):
        Role("Bad Name", "r", "x", "above", 1.0, "p")
    with pytest.raises(ConfigError, match="lacks"):
        Role("r", "r", "nope", "above", 1.0, "p").flags(_frame([1.0]))


def test_role_names_are_unique_over_the_registry() -> None:
    names = [r.name for e in ANALYSES.values() for r in e.roles]
    assert len(names) == len(set(names)) and len(names) >= 20
    entry = ANALYSES["census"]
    clash = registry.Analysis(
        name="clash-test",
        config_cls=entry.config_cls,
        run=entry.run,
        summary=entry.summary,
        help="x",
        roles=(Role("induction", "x", "induction", "above", 0.1, "p"),),
    )
    with pytest.raises(ValueError, match="already declared by 'census'"):
        registry.register(clash)
    assert "clash-test" not in ANALYSES


# -------------------------------------------------------------------------------------------- join


def test_join_flags_roles_from_the_registry_with_provenance(store: Path) -> None:
    result = build_atlas("m", AtlasConfig(root=str(store)))
    atlas, roles = result.tables["heads"], result.tables["roles"].set_index("role")
    assert len(atlas) == N_LAYERS * N_HEADS
    np.testing.assert_allclose(atlas["depth"], atlas["layer"] / N_LAYERS)
    # every declared role of the joined analyses, with the registry's threshold
    for name in ("census", "sinks", "retrieval"):
        for role in ANALYSES[name].roles:
            assert roles.loc[role.name, "threshold"] == role.threshold
            assert roles.loc[role.name, "paper"] == role.paper
    l2h3 = head_row(atlas, 2, 3)
    assert l2h3["roles"] == "induction+duplicate_token+sink+retrieval" and l2h3["n_roles"] == 4
    assert bool(l2h3["validated.retrieval"])
    assert head_row(atlas, 0, 1)["roles"] == "previous_token"
    assert head_row(atlas, 3, 0)["roles"] == "sink"  # duplicate_token 0.4 is not above 0.4
    assert not head_row(atlas, 1, 0)["role.retrieval"]  # 0.1 is not above 0.1
    assert roles.loc["sink", "n_heads"] == 8 and roles.loc["retrieval", "n_validated"] == 1
    assert roles.loc["induction", "n_validated"] == -1  # census tests no role on held-out inputs
    assert "role.duo_retrieval" not in atlas.columns  # no duo run: no column, not a column of False
    # provenance: every atlas column names its run, config hash and weights
    columns = result.tables["columns"].set_index("column")
    assert set(atlas.columns) - set(columns.index) == {
        "layer",
        "head",
        "kv_head",
        "depth",
        "n_roles",
        "roles",
    }
    census_id = runstore.list_runs(store, analysis="census")[0].run_id
    assert columns.loc["census.induction", "run_id"] == census_id
    assert columns.loc["role.induction", "source_column"] == "induction"
    assert set(columns["model_sha256"]) == {"a" * 64}
    assert columns["config_hash"].str.len().eq(12).all()


def test_missing_analyses_are_absent_and_the_newest_run_is_used(store: Path) -> None:
    newer = census_heads()
    newer["induction"] = 0.0  # a newer census run finds no induction head
    newest = write(store, "census", newer)
    result = build_atlas("m", AtlasConfig(root=str(store)))
    assert set(result.tables["sources"]["analysis"]) == {"census", "sinks", "retrieval"}
    assert result.tables["sources"].set_index("analysis").loc["census", "run_id"] == newest.name
    assert not result.tables["heads"]["role.induction"].any()
    # naming the older run joins it instead
    older = [s.run_id for s in runstore.list_runs(store, analysis="census")][1]
    named = build_atlas("m", AtlasConfig(root=str(store), runs=(older,)))
    assert bool(head_row(named.tables["heads"], 2, 3)["role.induction"])


def test_runs_of_other_weights_or_bos_are_refused_naming_which(store: Path) -> None:
    odd = write(store, "sinks", sinks_heads(), sha="b" * 64)
    with pytest.raises(ConfigError, match=f"different weights.*{odd.name}") as err:
        build_atlas("m", AtlasConfig(root=str(store)))
    assert "\n" not in str(err.value) and "--run-missing" in str(err.value)
    # with the model's own record as reference, the odd run is skipped for the older matching one
    result = build_atlas("m", AtlasConfig(root=str(store)), reference=model_info())
    skipped = result.tables["skipped"]
    assert list(skipped["run_id"]) == [odd.name] and "weights sha256" in skipped["reason"].iloc[0]
    text = summary(result)
    assert "skipped" in text
    # a tested role says how many of its heads passed the held-out check; an untested one does not
    assert "retrieval 1 (1 held-out)" in text and "induction 1," in text
    # a named run of other weights or of another BOS policy is refused
    with pytest.raises(ConfigError, match=f"{odd.name} \\(sinks\\) cannot join"):
        build_atlas("m", AtlasConfig(root=str(store), runs=(odd.name,)), reference=model_info())
    prepending = model_info()
    prepending["bos"] = {"mode": "default", "prepend": True, "token_id": 1, "token": "<s>"}
    bos = write(store, "retrieval", retrieval_heads(), bos_id=7)
    with pytest.raises(ConfigError, match="BOS policy"):
        build_atlas("m", AtlasConfig(root=str(store), runs=(bos.name,)), reference=prepending)
    # what counts is what reaches the model: no BOS under either mode is the same policy
    always = runstore.write_run(
        store,
        analysis="retrieval",
        model_info={**model_info(), "bos": {"mode": "always", "prepend": False, "token_id": 1}},
        config={"x": 1},
        tables={"heads": retrieval_heads()},
    )
    joined = build_atlas("m", AtlasConfig(root=str(store), runs=(always.name,)), reference=model_info())
    assert always.name in set(joined.tables["sources"]["run_id"])


def test_named_runs_of_another_model_or_analysis_are_refused(store: Path) -> None:
    other = write(store, "census", census_heads(), name="other")
    with pytest.raises(ConfigError, match="is of model other, not m"):
        build_atlas("m", AtlasConfig(root=str(store), runs=(other.name,)))
    first, second = (s.run_id for s in runstore.list_runs(store, analysis="sinks")[:1] * 2)
    with pytest.raises(ConfigError, match="two runs of sinks"):
        build_atlas("m", AtlasConfig(root=str(store), runs=(first, second)))
    with pytest.raises(ConfigError, match="no intact run of nobody"):
        build_atlas("nobody", AtlasConfig(root=str(store)))


def test_a_run_of_another_shape_is_refused(store: Path) -> None:
    write(store, "census", census_heads().iloc[:-4])  # one layer short
    with pytest.raises(ConfigError, match="another shape"):
        build_atlas("m", AtlasConfig(root=str(store)))


def test_a_run_with_its_validation_off_counts_as_not_tested(tmp_path: Path) -> None:
    heads = retrieval_heads().assign(retrieval_validated=False, retrieval_role="")
    write(tmp_path, "retrieval", heads)
    result = build_atlas("m", AtlasConfig(root=str(tmp_path)))
    assert result.tables["roles"].set_index("role").loc["retrieval", "n_validated"] == -1
    assert "validated.retrieval" not in result.tables["heads"].columns
    # a test that had no usable held-out input measured nothing: not tested either
    empty = retrieval_heads().assign(
        retrieval_role="retrieval", retrieval_effect=np.nan, retrieval_validated=False
    )
    write(tmp_path, "retrieval", empty)
    again = build_atlas("m", AtlasConfig(root=str(tmp_path)))
    assert again.tables["roles"].set_index("role").loc["retrieval", "n_validated"] == -1


def test_a_run_without_a_roles_column_is_listed_not_guessed(tmp_path: Path) -> None:
    heads = retrieval_heads().drop(columns=["retrieval_score"]).assign(activation_frequency=0.5)
    run = write(tmp_path, "retrieval", heads)
    result = build_atlas("m", AtlasConfig(root=str(tmp_path)))
    assert "role.retrieval" not in result.tables["heads"].columns
    reason = result.tables["skipped"].set_index("run_id").loc[run.name, "reason"]
    assert "no column retrieval_score" in reason and "rerun retrieval" in reason


# ---------------------------------------------------------------------------------------- findings


def test_overlap_correlations_and_multi_role_have_known_answers(store: Path) -> None:
    result = build_atlas("m", AtlasConfig(root=str(store)))
    atlas = result.tables["heads"]
    over = overlap(atlas).set_index(["role_a", "role_b"])
    row = over.loc[("sink", "retrieval")]
    assert row["both"] == 1 and row["n_a"] == 8 and row["n_b"] == 1
    assert row["jaccard"] == pytest.approx(1 / 8) and row["expected_both"] == pytest.approx(8 * 1 / 16)
    pair = over.loc[("induction", "duplicate_token")]
    assert pair["jaccard"] == pytest.approx(1.0)
    corr = correlations(atlas)
    rho = corr[(corr["metric_a"] == "census.entropy") & (corr["metric_b"] == "sinks.alpha0_natural")].iloc[0]
    expected = stats.spearmanr(atlas["census.entropy"], atlas["sinks.alpha0_natural"]).statistic
    assert rho["spearman"] == pytest.approx(expected) and rho["n"] == 16 and not rho["same_analysis"]
    assert corr["spearman"].abs().dropna().is_monotonic_decreasing
    many = multi_role(atlas)
    assert (many.iloc[0]["layer"], many.iloc[0]["head"], many.iloc[0]["n_roles"]) == (2, 3, 4)
    assert (many["n_roles"] >= 2).all()


def test_models_side_by_side_by_relative_depth(store: Path, tmp_path: Path) -> None:
    a = build_atlas("m", AtlasConfig(root=str(store)))
    other_root = tmp_path / "other"
    write(other_root, "sinks", sinks_heads(), name="n")
    b = build_atlas("n", AtlasConfig(root=str(other_root)))
    tables = compare([a, b], depth_bins=2)
    depth = role_depth({"m": a.tables["heads"]}, 2).set_index(["role", "bin"])
    # sinks are layers 2 and 3 of 4: the deeper half entirely, the shallower not at all
    assert depth.loc[("sink", 1), "share"] == 1.0 and depth.loc[("sink", 0), "share"] == 0.0
    totals = tables["role_totals"]
    assert set(totals["model"]) == {"m", "n"}
    assert set(totals[totals["model"] == "n"]["role"]) == {"sink", "hidden_sink"}  # n has no census run
    assert set(tables["metrics"]["model"]) == {"m", "n"}
    with pytest.raises(ConfigError, match="two atlases of m"):
        compare([a, a])


# ------------------------------------------------------------------------------ run store, export


def test_the_atlas_is_a_run_and_exports_read_back_equal(store: Path, tmp_path: Path) -> None:
    path = build_atlas("m", AtlasConfig(root=str(store))).save(store)
    run = runstore.open_run(path)
    assert run.analysis == "atlas" and run.model_name == "m"
    assert run.config.root == str(store)
    written = export_atlas(run, tmp_path / "out")
    heads = run.table("heads")
    back = pd.read_csv(written[0])
    back["roles"] = back["roles"].fillna("").astype(object)  # a head without a role: "" in CSV
    heads["roles"] = heads["roles"].astype(object)
    pd.testing.assert_frame_equal(back, heads, check_dtype=False)
    tables = read_json_export(written[1])
    pd.testing.assert_frame_equal(tables["heads"], heads, check_dtype=False)
    pd.testing.assert_frame_equal(tables["roles"], run.table("roles"), check_dtype=False)
    assert json.loads(written[1].read_text())["run_id"] == run.run_id
    assert not list((tmp_path / "out").glob(".*"))  # no temporaries left


# ---------------------------------------------------------------------------------------------- CLI


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    from headlab.cli import main

    monkeypatch.setattr("sys.argv", ["headlab", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_builds_saves_exports_and_compares(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(store, "sinks", sinks_heads(), name="n")
    export = tmp_path / "export"
    code, out, err = _cli(
        monkeypatch,
        capsys,
        "atlas",
        "--model",
        "m",
        "--model",
        "n",
        "--root",
        str(store),
        "--export",
        str(export),
    )
    assert code == 0, err
    assert (
        "atlas of m: 16 heads, 3 analyses joined" in out and "atlas of n: 16 heads, 1 analyses joined" in out
    )
    assert "heads per role" in out and "(page /atlas)" in out
    assert len(runstore.list_runs(store, analysis="atlas")) == 2
    assert {p.name for p in export.iterdir()} >= {"atlas-m.csv", "atlas-m.json", "compare-role_depth.csv"}
    code, _, err = _cli(monkeypatch, capsys, "atlas", "--model", "nobody", "--root", str(store))
    assert code != 0 and err.count("\n") == 1 and "no intact run of nobody" in err


# --------------------------------------------------------------------------- a tiny model's real runs


def test_run_missing_then_run_atlas_on_a_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import probe
    from analyses.atlas import missing

    model = probe.load_model("tiny-llama", device="cpu")
    fast = {
        "census": {"n_natural": 4, "seq_len": 32, "n_repeated": 2, "repeat_len": 8, "batch_size": 4},
        "sinks": {"seq_len": 32, "n_sequences": 4, "batch_size": 4},
    }
    # only census and sinks, with tiny presets, to keep the test short; the selection logic is the real one
    monkeypatch.setattr(missing, "atlas_analyses", lambda kind: [ANALYSES["census"], ANALYSES["sinks"]])
    monkeypatch.setattr(missing, "preset", lambda entry: fast[entry.name])
    todo, cannot = missing_analyses(model, tmp_path)
    assert [e.name for e in todo] == ["census", "sinks"] and cannot == []
    lines: list[str] = []
    paths = run_missing(model, tmp_path, echo=lines.append)
    assert len(paths) == 2 and lines[0].startswith("[1/2] census on tiny-llama")
    assert missing_analyses(model, tmp_path)[0] == []  # nothing left to run
    result = run_atlas(model, AtlasConfig(root=str(tmp_path)))
    atlas = result.tables["heads"]
    assert len(atlas) == model.n_layers * model.n_heads
    census = runstore.open_run(paths[0]).heads.sort_values(["layer", "head"]).reset_index(drop=True)
    np.testing.assert_allclose(atlas["census.induction"], census["induction"])
    for role in ANALYSES["census"].roles:
        assert list(atlas[f"role.{role.name}"]) == list(role.flags(census))
    assert set(result.tables["columns"]["model_sha256"]) == {model.describe()["weight_sha256"]}
