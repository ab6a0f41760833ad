"""The architecture matrix: every family of probe.families through every check of probe.support.

Each family's tiny checkpoint is written once into a temporary directory and checked once; a check
passes or is refused with a one-line ConfigError, never fails. docs/support.md must show exactly
what the checks return now.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from probe.families import FAMILIES
from probe.support import CHECKS, CheckResult, family_results

DOCS = Path(__file__).resolve().parent.parent / "docs" / "support.md"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, CheckResult]]:
    """family -> its check results, filled on first use (each checkpoint built and checked once)."""
    return {}


def _results(cache: dict[str, dict[str, CheckResult]], root: Path, family: str) -> dict[str, CheckResult]:
    if family not in cache:
        cache[family] = family_results(family, root)
    return cache[family]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def test_enough_families() -> None:
    assert len(FAMILIES) >= 16
    wanted = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"}
    assert wanted | {"gpt2", "gpt_neox", "falcon", "bloom", "mpt"} <= set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family: str, results: dict[str, dict[str, CheckResult]], root: Path) -> None:
    got = _results(results, root, family)
    assert list(got) == list(CHECKS)
    failed = {name: r.detail for name, r in got.items() if r.status == "fail"}
    assert not failed, f"{family}: {failed}"
    for name, r in got.items():
        if r.status == "refused":
            assert r.detail and "\n" not in r.detail, (family, name)


def test_refusals_are_config_errors(root: Path) -> None:
    """The refusals are raised as ConfigError by the public entry points, before any wrong number."""
    import probe
    from probe.decode import greedy_decode
    from probe.errors import ConfigError
    from probe.families import save_checkpoint

    with pytest.raises(ConfigError, match="new decoder architecture"):
        probe.load_model(str(save_checkpoint("falcon-new", root / "refuse-falcon-new")), device="cpu")
    bloom = probe.load_model(str(save_checkpoint("bloom", root / "refuse-bloom")), device="cpu")
    assert bloom.n_ctx == 2048  # BLOOM's config names no context length (ALiBi)
    with pytest.raises(ConfigError, match="attention interface"):
        greedy_decode(bloom, [5, 6, 7], 2)
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
    # Gemma 2's soft cap: recompute and decode compute it (the matrix checks them); duo_attention does not
    gemma2 = probe.load_model(str(save_checkpoint("gemma2", root / "refuse-gemma2")), device="cpu")
    gates = torch.ones(gemma2.n_layers, gemma2.n_kv_heads)
    with (
        pytest.raises(ConfigError, match="soft-caps its attention logits"),
        duo_attention(gemma2, gates, sink=1, recent=2),
    ):
        pass


def _table_rows(text: str) -> dict[str, list[str]]:
    header = [line for line in text.splitlines() if line.startswith("| family |")]
    assert len(header) == 1, "docs/support.md has no family table"
    columns = [c.strip().strip("`") for c in header[0].strip("|").split("|")]
    assert columns[2:] == list(CHECKS), f"docs/support.md columns {columns[2:]} are not {list(CHECKS)}"
    rows: dict[str, list[str]] = {}
    lines = text.splitlines()
    for line in lines[lines.index(header[0]) + 2 :]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells[2:]
    return rows


def test_support_table_is_current(results: dict[str, dict[str, CheckResult]], root: Path) -> None:
    rows = _table_rows(DOCS.read_text())
    assert sorted(rows) == sorted(FAMILIES), (
        "docs/support.md lists other families; run scripts/support_table.py"
    )
    for family in FAMILIES:
        want = [r.cell().replace("|", "/") for r in _results(results, root, family).values()]
        assert rows[family] == want, (
            f"docs/support.md row {family} is stale; run python scripts/support_table.py"
        )
