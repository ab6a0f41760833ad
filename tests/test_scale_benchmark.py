"""benchmarks/scale.py keeps running: its tiny shapes through every row on the CPU.

The benchmark's numbers come from a GPU (docs/scale.md); this checks that the code measuring them
works end to end on the same families (Gemma 2's soft cap, the LLaVA assembly) and that each row
carries what the tables print.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _scale() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_public_shape_has_its_lengths_and_a_tiny_twin() -> None:
    scale = _scale()
    assert set(scale.SHAPES) == {"llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b", "gemma-2-9b", "llava-1.5-7b"}
    assert 131072 in scale.SHAPES["llama-3.2-1b"].lengths
    assert all(32768 in s.lengths for s in scale.SHAPES.values())
    gemma = scale.tiny(scale.SHAPES["gemma-2-9b"]).kwargs
    assert gemma["attn_logit_softcapping"] == 50.0 and gemma["sliding_window"] < max(scale.TINY_LENGTHS)


def test_tiny_run_measures_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scale = _scale()
    out = tmp_path / "rows.jsonl"
    args = ["--tiny", "--device", "cpu", "--dtype", "float32", "--shapes", "gemma-2-9b,llava-1.5-7b"]
    scale.main([*args, "--reach", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    measured = [r for r in rows if "seconds" in r and "T" in r and not r["row"].startswith(("reach", "plan"))]
    by_shape = {(r["shape"], r["row"]) for r in measured}
    for row in ("sdpa", "forward", "census", "sinks", "generate", "retrieval"):
        assert ("gemma-2-9b", row) in by_shape
    assert {("llava-1.5-7b", "vhd"), ("llava-1.5-7b", "vhd-floor")} <= by_shape
    assert all(r["error"] == "" and r["seconds"] > 0 for r in measured)
    planned = [r for r in measured if r["row"] in ("census", "sinks", "generate", "retrieval")]
    assert planned and all(r["plan"] > r["weights"] for r in planned)
    assert all(isinstance(r["copy_hits"], int) for r in measured if r["row"] == "retrieval")
    reach = [r for r in rows if r["row"].startswith("reach")]
    assert len(reach) == 4 and all(r["largest"] == max(scale.TINY_LENGTHS) for r in reach)
    printed = capsys.readouterr().out
    assert "t/floor" in printed and "plan/m" in printed and "# plan gemma-2-9b" in printed
