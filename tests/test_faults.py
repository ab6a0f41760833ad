"""Fault injection: every row of the fault table (``tests/fault_cases.py``) on tiny models.

Bad ``--set`` values, unknown names, damaged and symlinked runs, damaged checkpoints and caches,
unwritable roots, interrupted runs, stale temporaries of killed writers, hooks after exceptions,
padding, generation and the dashboard's request checks. Each CLI case asserts the exit status, one
``error: ...`` line on stderr with no traceback, the fix named in it, and that nothing is left behind
in the case's run root, cache, report directory or working directory (hidden temporaries included).

``python tests/fault_cases.py`` prints the same table with each case's exit status and message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import fault_cases as fc


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> fc.Shared:
    """One tiny census run and one saved tiny checkpoint, copied by the cases that need them."""
    return fc.build_shared(tmp_path_factory.mktemp("fault-shared"))


def _explain(outcome: fc.Outcome, problems: list[str]) -> str:
    return "\n".join(
        [
            *problems,
            f"exit status: {outcome.code}",
            f"stderr: {outcome.stderr[-2000:]!r}",
            f"stdout: {outcome.stdout[-1000:]!r}",
        ]
    )


@pytest.mark.parametrize("case", fc.CLI_CASES, ids=[c.id for c in fc.CLI_CASES])
def test_cli_fault(case: fc.Case, shared: fc.Shared, tmp_path: Path) -> None:
    outcome, problems = fc.run_case(case, tmp_path / "ws", shared)
    assert not problems, _explain(outcome, problems)


@pytest.mark.parametrize("case", fc.API_CASES, ids=[c.id for c in fc.API_CASES])
def test_api_fault(case: fc.ApiCase, shared: fc.Shared, tmp_path: Path) -> None:
    _, problems = fc.run_api_case(case, tmp_path / "ws", shared)
    assert not problems, "\n".join(problems)


def test_the_table_names_each_case_once_and_covers_every_family() -> None:
    assert len(set(fc.ALL_IDS)) == len(fc.ALL_IDS)
    families = {c.family for c in [*fc.CLI_CASES, *fc.API_CASES]}
    assert {
        "bad --set",
        "bad input",
        "run references",
        "damaged runs",
        "symlinks",
        "interrupted runs",
        "damaged models",
        "stale temporaries",
        "hooks after exceptions",
        "padding",
        "generation",
        "dashboard",
    } <= families


def test_the_judge_sees_progress_bars_as_no_message() -> None:
    """Progress bars (redrawn with carriage returns on a terminal, one per line in a pipe) are not
    messages; anything else on stderr is."""
    bar = "census: natural text:  50%|#####     | 1/2 [00:00<00:00,  2.9seq/s]"
    assert fc.shown_lines(f"\r{bar}\r{' ' * 40}\rerror: x; do y\n") == ["error: x; do y"]
    assert fc.shown_lines(f"\n{bar}\n{' ' * 40}\nerror: x\n") == ["error: x"]
    assert fc.shown_lines("warning: something\nerror: x\n") == ["warning: something", "error: x"]
