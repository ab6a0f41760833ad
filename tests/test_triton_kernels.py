"""The Triton moment kernels, run by Triton's interpreter on the CPU (tests/triton_interpreted.py).

The kernels otherwise run only on a CUDA GPU (checked there by benchmarks/moments_check.py); the
interpreter executes their index arithmetic, masks and reductions here, against the PyTorch path,
in four configurations, indices into each kernel's list modulo its length: 0 (64×64 tiles; the
single pass with queries outside), 5 (128×128 tiles for the two passes; the single pass with keys
outside), 9 and 12 (64×128 and 64×64 tiles for the two passes; the single pass transposed, 64×64
and 64×128 tiles). Triton is a dev dependency on Linux x86-64, where its wheels exist.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="Triton publishes wheels for Linux x86-64 only",
)
@pytest.mark.parametrize("config", [0, 5, 9, 12])
def test_kernels_match_the_torch_path_under_the_interpreter(config: int) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_interpreted.py"), str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "triton is not installed" not in done.stderr, (
        "install the dev extras (make test does): pip install -e .[dev]"
    )
    lines = [line.split() for line in done.stdout.splitlines() if line.strip()]
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    names = [" ".join(parts[:-1]) for parts in lines]
    # every case was run: per dtype the three two-pass cases (plain, window, window and cap) and
    # the one pass; the fall-backs of kernels that fail or compute wrongly, a kernel asked for by
    # name that fails, a failing newest loop order narrowing the single pass, the first-use checks
    # passing; the pattern kernel
    assert len(names) == 17 and any(n.startswith("one-pass") for n in names), names
    assert all(float(parts[-1]) < 2e-5 for parts in lines), done.stdout
