"""The architecture matrix: every family of probe.families through every check of probe.support
and every language-model analysis of analyses.support.

Each family's tiny checkpoint is written once into a temporary directory, loaded once, checked and
analysed once; a check or an analysis passes or is refused with a one-line ConfigError, never
fails. docs/support.md must show exactly what the checks and the analyses return now.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analyses.support import SCORES, SETTINGS, family_support, language_analyses, run_analysis
from probe.families import FAMILIES
from probe.loading import LoadedModel
from probe.support import CHECKS, CheckResult

DOCS = Path(__file__).resolve().parent.parent / "docs" / "support.md"

Row = tuple[dict[str, CheckResult], dict[str, CheckResult]]  # the checks, the analyses


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Row]:
    """family -> its check and analysis results, filled on first use (each checkpoint built, loaded,
    checked and analysed once)."""
    return {}


def _results(cache: dict[str, Row], root: Path, family: str) -> Row:
    if family not in cache:
        cache[family] = family_support(family, root)
    return cache[family]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def test_enough_families() -> None:
    assert len(FAMILIES) >= 16
    wanted = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"}
    assert wanted | {"gpt2", "gpt_neox", "falcon", "bloom", "mpt"} <= set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family: str, results: dict[str, Row], root: Path) -> None:
    checks, analyses = _results(results, root, family)
    assert list(checks) == list(CHECKS)
    assert list(analyses) == language_analyses()
    for got in (checks, analyses):
        failed = {name: r.detail for name, r in got.items() if r.status == "fail"}
        assert not failed, f"{family}: {failed}"
        for name, r in got.items():
            if r.status == "refused":
                assert r.detail and "\n" not in r.detail, (family, name)
    if family in ("bloom", "mpt"):  # ALiBi inside the layer: no decode scoring, so no rows to check
        assert checks["decode-rows"] == checks["greedy-decode"]
        assert (
            checks["decode-rows"].status == "refused"
            and "attention interface" in checks["decode-rows"].detail
        )


def test_every_language_analysis_has_settings_and_scores() -> None:
    """A newly registered language-model analysis needs its row here: settings and head scores."""
    names = language_analyses()
    assert {"census", "sinks", "act", "retrieval", "duo", "ioi"} <= set(names)
    assert "atlas" not in names and "vit-heads" not in names
    assert set(SETTINGS) == set(names) and set(SCORES) == set(names)


def test_an_analysis_with_bad_head_scores_fails(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from analyses import support

    L, H = tiny_llama.n_layers, tiny_llama.n_heads
    assert run_analysis(tiny_llama, "sinks").status == "pass"
    cases = {
        "not finite": np.full((1, L, H), np.nan),
        "of shape": np.zeros((1, L, H + 1)),
    }
    for problem, scores in cases.items():
        monkeypatch.setitem(support.SCORES, "sinks", ("x", lambda result, s=scores: s))
        got = run_analysis(tiny_llama, "sinks")
        assert got.status == "fail" and problem in got.detail, got
    monkeypatch.setitem(support.SETTINGS, "sinks", {"seq_len": 2})  # below the config's minimum
    assert run_analysis(tiny_llama, "sinks") == CheckResult("refused", "seq_len must be >= 4 (got 2)")


def test_decode_rows_fails_on_a_wrong_row_and_accepts_a_tie(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_decode_rows against planted errors: a moved argmax, a max weight off by 1e-4, and ties
    in transformers' row at the recorded argmax (accepted within TIE, refused beyond it)."""
    import probe
    from probe import decode, support

    directory = support.family_checkpoint("llama", root / "rows-llama")
    model = probe.load_model(str(directory), device="cpu")
    ref = support._Reference(directory)
    assert support.check_decode_rows(model, ref) == CheckResult("pass")
    real = decode.greedy_decode
    s, layer, head = 3, 1, 2
    query = len(support.prompt_ids(model)) - 1 + s
    first = real(model, support.prompt_ids(model), support.DECODE_ROW_STEPS, stop_ids=())
    ours = int(first.argmax[s, layer, head])

    def decoding(edit):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = real(*args, **kwargs)
            edit(out)
            return out

        return run

    other = (ours + 1) % (query + 1)
    monkeypatch.setattr(
        decode, "greedy_decode", decoding(lambda out: out.argmax.__setitem__((s, layer, head), other))
    )
    got = support.check_decode_rows(model, ref)
    assert got.status == "fail" and f"step {s} L{layer}H{head}" in got.detail, got
    monkeypatch.setattr(decode, "greedy_decode", decoding(lambda out: out.max_weight.__iadd__(1e-4)))
    got = support.check_decode_rows(model, ref)
    assert got.status == "fail" and "max weights differ" in got.detail, got
    monkeypatch.setattr(decode, "greedy_decode", real)

    class Planted:
        """transformers' eager model with position ``other`` of one row raised to ``top + by``."""

        def __init__(self, by: float) -> None:
            self.by = by

        def eager(self, **kwargs):  # type: ignore[no-untyped-def]
            out = ref.eager(**kwargs)
            if kwargs["input_ids"].shape[1] == query + 1:  # the forward whose last row is step s's
                row = out.attentions[layer][0, head, query]
                row[other] = row.max() + self.by
            return out

    assert support.check_decode_rows(model, Planted(0.0)) == CheckResult("pass")  # a tie: ours stands
    assert support.check_decode_rows(model, Planted(support.TIE / 2)) == CheckResult("pass")
    got = support.check_decode_rows(model, Planted(3 * support.TIE))  # beyond the tie: ours is wrong
    assert got.status == "fail" and f"step {s} L{layer}H{head}" in got.detail, got


def test_refusals_are_config_errors(root: Path) -> None:
    """The refusals are raised as ConfigError by the public entry points, before any wrong number."""
    import probe
    from probe.decode import greedy_decode
    from probe.errors import ConfigError
    from probe.families import save_checkpoint

    bloom = probe.load_model(str(save_checkpoint("bloom", root / "refuse-bloom")), device="cpu")
    assert bloom.n_ctx == 2048  # BLOOM's config names no context length (ALiBi)
    with pytest.raises(ConfigError, match="attention interface"):
        greedy_decode(bloom, [5, 6, 7], 2)
    from analyses.retrieval import RetrievalConfig, run_retrieval

    with pytest.raises(ConfigError, match="retrieval heads are scored on decode steps"):
        run_retrieval(bloom, RetrievalConfig(lengths=(64,)))
    # ALiBi is computed inside BLOOM's layer: rebuilding or replacing its attention would drop it
    from probe.capture import capture
    from probe.reducers import RowEntropy
    from probe.streaming import duo_attention

    with pytest.raises(ConfigError, match="so recompute mode cannot stand in for it"):
        capture(bloom, [[5, 6, 7]], [RowEntropy()], mode="recompute", progress=False)
    gates = torch.ones(bloom.n_layers, bloom.n_kv_heads)
    with (
        pytest.raises(ConfigError, match="so duo_attention cannot stand in for it"),
        duo_attention(bloom, gates, sink=1, recent=2),
    ):
        pass


def _table_rows(text: str, columns: list[str], skip: int) -> dict[str, list[str]]:
    """The rows of the family table whose header is ``family``, ``skip - 1`` more columns, then
    ``columns``: family -> its cells under ``columns``."""
    lines = text.splitlines()
    headers = [
        line
        for line in lines
        if line.startswith("| family |")
        and [c.strip().strip("`") for c in line.strip().strip("|").split("|")][skip:] == columns
    ]
    assert len(headers) == 1, f"docs/support.md has no family table of columns {columns}"
    rows: dict[str, list[str]] = {}
    for line in lines[lines.index(headers[0]) + 2 :]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells[skip:]
    return rows


@pytest.mark.parametrize(("table", "columns", "skip"), [(0, list(CHECKS), 2), (1, language_analyses(), 1)])
def test_support_table_is_current(
    results: dict[str, Row], root: Path, table: int, columns: list[str], skip: int
) -> None:
    rows = _table_rows(DOCS.read_text(), columns, skip)
    assert sorted(rows) == sorted(FAMILIES), (
        "docs/support.md lists other families; run scripts/support_table.py"
    )
    for family in FAMILIES:
        want = [r.cell().replace("|", "/") for r in _results(results, root, family)[table].values()]
        assert rows[family] == want, (
            f"docs/support.md row {family} is stale; run python scripts/support_table.py"
        )


def test_falcon_new_decoder_architecture_is_split_by_kv_group(root: Path) -> None:
    """Falcon-40B's fused qkv runs over each KV group's queries, then its key and value: the bridge's
    projections must equal transformers' own split, and the bridge's forward transformers' logits."""
    import probe
    from probe.families import save_checkpoint

    model = probe.load_model(str(save_checkpoint("falcon-new", root / "falcon-new-split")), device="cpu")
    assert (model.n_heads, model.n_kv_heads) == (4, 2)
    hf_attn = model.hf_model.transformer.h[0].self_attention
    bridge_attn = model.bridge.blocks[0].attn
    x = torch.randn(1, 5, model.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grouped = hf_attn.query_key_value(x).view(1, 5, 2, -1, model.d_head)  # [.., kv, 4/2 + 2, d]
        want = (grouped[..., :-2, :].flatten(-3, -2), grouped[..., -2, :], grouped[..., -1, :])
        got = [bridge_attn.q(x), bridge_attn.k(x), bridge_attn.v(x)]
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w.flatten(-2), rtol=0, atol=1e-6)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
        torch.testing.assert_close(model.bridge(ids), model.hf_model(ids).logits, rtol=0, atol=1e-5)
