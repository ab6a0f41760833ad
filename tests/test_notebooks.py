"""Every notebook under notebooks/ runs from top to bottom without an error (on the real model).

Notebooks are found by globbing, so a new notebook is executed without touching this file. Each runs
in a fresh kernel of *this* interpreter (a kernelspec written into a temporary directory, so the test
needs no kernel installed for the user), with a temporary working directory and the run store root
pointed at a temporary directory, so nothing is written into the repository.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SLOW = {"02_sinks_act.ipynb", "04_circuits.ipynb"}  # minutes on a CPU: `make test-all` runs them
KERNEL_NAME = "headlab-test"
TIMEOUT_S = 900


def test_there_is_at_least_one_notebook() -> None:
    assert NOTEBOOKS, f"no notebook found under {ROOT / 'notebooks'}"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a kernelspec that starts an IPython kernel of the current interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec_dir = root / KERNEL_NAME
    spec_dir.mkdir()
    python_path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "headlab (test)",
        "language": "python",
        "env": {"PYTHONPATH": python_path},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def _errors(nb: object) -> list[str]:
    out = []
    for cell in getattr(nb, "cells", []):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                out.append(f"{output.get('ename')}: {output.get('evalue')}")
    return out


@pytest.mark.real
@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p for p in NOTEBOOKS],
    ids=[p.name for p in NOTEBOOKS],
)
def test_notebook_executes_without_error(
    path: Path, kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    monkeypatch.setenv("HEADLAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    assert not _errors(nb), f"{path.name} is committed with error outputs"
    manager = KernelManager(
        kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    )
    client = NotebookClient(
        nb,
        km=manager,
        timeout=TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    assert not _errors(nb)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "runs")
    assert not leftovers, f"{path.name} left files in its working directory: {leftovers}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name} has stored outputs; clear them before committing"
            )
