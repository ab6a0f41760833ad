"""The layout rules: readable file sizes, ruff owning the layout, docs the repository owns."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_structure", ROOT / "scripts" / "check_structure.py")
assert _spec is not None and _spec.loader is not None
check_structure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_structure)

LIBRARY = ("probe", "analyses", "dashboard", "headlab")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_library_modules_keep_to_the_limits() -> None:
    files = sorted(p for package in LIBRARY for p in (ROOT / package).rglob("*.py"))
    assert len(files) > 50
    problems = [line for f in files for line in check_structure.problems(f)]
    assert problems == []


def test_the_checker_finds_what_it_is_for(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(check_structure.MAX_FUNCTION + 1))
    bad = tmp_path / "bad.py"
    brief = "DESIGN" + ".md"  # spelled in two parts so that this file does not name it
    bad.write_text(f'"""See {brief}."""\n\n\ndef long():\n{body}\n\n\ny = [1,2]  # fmt' + ": skip\n")
    found = check_structure.problems(bad)
    assert any("long is" in p for p in found)
    assert any("fmt: skip" in p for p in found)
    assert any("outside the repository" in p for p in found)
    good = tmp_path / "good.py"
    good.write_text('"""A short module."""\n\nx = 1\n')
    assert check_structure.problems(good) == []


def test_no_file_refers_to_briefs_outside_the_repository() -> None:
    outside = re.compile(r"\b(DESIGN|PAPERS|MODELS|STYLE)\.md\b|\.\./shared")
    texts = [*ROOT.glob("*.md"), *ROOT.joinpath("docs").rglob("*.md"), *ROOT.joinpath("tests").rglob("*.py")]
    texts += [
        p for package in (*LIBRARY, "scripts", "benchmarks") for p in ROOT.joinpath(package).rglob("*.py")
    ]
    offenders = [str(p.relative_to(ROOT)) for p in texts if outside.search(p.read_text())]
    assert offenders == []


def test_relative_links_in_the_docs_resolve() -> None:
    pages = [ROOT / "README.md", *sorted(ROOT.joinpath("docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
