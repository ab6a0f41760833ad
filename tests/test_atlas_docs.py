"""docs/atlas.md lists every role the registrations declare, and no other, with its analysis and rule."""

from __future__ import annotations

from pathlib import Path

from analyses.registry import ANALYSES

PAGE = Path(__file__).resolve().parent.parent / "docs" / "atlas.md"
HEADER = ("Role", "Analysis", "Rule")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _plain(cell: str) -> str:
    return cell.strip().strip("`").strip()


def role_table(text: str) -> dict[str, tuple[str, str]]:
    """``{role: (analysis, rule)}`` from the markdown table whose header starts Role | Analysis | Rule."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("|") and tuple(_cells(line)[:3]) == HEADER:
            rows: dict[str, tuple[str, str]] = {}
            for row in lines[i + 2 :]:
                if not row.lstrip().startswith("|"):
                    break
                cells = _cells(row)
                name = _plain(cells[0])
                assert name not in rows, f"docs/atlas.md lists role {name} twice"
                rows[name] = (_plain(cells[1]), _plain(cells[2]))
            return rows
    raise AssertionError(f"docs/atlas.md has no table headed {' | '.join(HEADER)}")


def declared() -> dict[str, tuple[str, str]]:
    return {role.name: (entry.name, role.threshold) for entry in ANALYSES.values() for role in entry.roles}


def test_the_parser_reads_a_table_and_stops_at_its_end() -> None:
    text = "intro\n\n| Role | Analysis | Rule | Paper |\n| --- | --- | --- | --- |\n"
    text += (
        "| `sink` | `sinks` | `sink_rate_natural >= 0.5` | Gu |\n| `x` | `y` | `z > 1` | P |\n\nafter | a |\n"
    )
    assert role_table(text) == {"sink": ("sinks", "sink_rate_natural >= 0.5"), "x": ("y", "z > 1")}


def test_every_registered_role_is_in_the_docs_table_and_no_other() -> None:
    listed, registered = role_table(PAGE.read_text(encoding="utf-8")), declared()
    assert registered, "no analysis declares a role"
    missing = sorted(set(registered) - set(listed))
    gone = sorted(set(listed) - set(registered))
    assert not missing, f"roles declared but not in the table of docs/atlas.md: {', '.join(missing)}"
    assert not gone, f"roles in the table of docs/atlas.md that no analysis declares: {', '.join(gone)}"


def test_the_docs_table_gives_each_role_its_analysis_and_rule() -> None:
    listed, registered = role_table(PAGE.read_text(encoding="utf-8")), declared()
    wrong = [
        f"{name}: docs say {listed[name]}, the registration {registered[name]}"
        for name in sorted(set(listed) & set(registered))
        if listed[name] != registered[name]
    ]
    assert not wrong, "docs/atlas.md's role table is stale:\n" + "\n".join(wrong)
