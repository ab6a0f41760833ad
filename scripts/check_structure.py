"""Report what the layout rules forbid: modules over 800 lines, functions over 120 lines,
``# fmt: skip`` markers, module docstrings over 30 lines, and references to files outside the
repository. Exit status 1 when anything is found.

    python scripts/check_structure.py [paths...]   # default: probe analyses dashboard headlab
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

MAX_MODULE = 800
MAX_FUNCTION = 120
MAX_DOCSTRING = 30
OUTSIDE = re.compile(r"DESIGN\.md|PAPERS\.md|MODELS\.md|STYLE\.md|\.\./shared")


def problems(path: Path) -> list[str]:
    text = path.read_text()
    found = []
    lines = text.count("\n") + 1
    if lines > MAX_MODULE:
        found.append(f"{path}: {lines} lines (at most {MAX_MODULE})")
    skips = text.count("# fmt: skip") + text.count("# fmt: off")
    if skips:
        found.append(f"{path}: {skips} fmt: skip/off markers")
    if OUTSIDE.search(text):
        found.append(f"{path}: refers to a file outside the repository")
    tree = ast.parse(text)
    doc = ast.get_docstring(tree, clean=False)
    if doc and doc.count("\n") + 1 > MAX_DOCSTRING:
        found.append(f"{path}: module docstring of {doc.count(chr(10)) + 1} lines (at most {MAX_DOCSTRING})")
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION:
                found.append(f"{path}:{node.lineno}: {node.name} is {length} lines (at most {MAX_FUNCTION})")
    return found


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path(p) for p in ("probe", "analyses", "dashboard", "headlab")]
    files = sorted(p for r in roots for p in ([r] if r.is_file() else r.rglob("*.py")))
    found = [line for f in files for line in problems(f)]
    print("\n".join(found) if found else f"{len(files)} files: nothing to report")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
