"""Natural English text that is on every machine: the Python standard library's documentation.

The sink and census analyses need "natural text" and the retrieval analysis needs haystacks; no
corpus can be downloaded offline, but the docstrings of the standard library are real English prose
written by many authors. Paragraphs are taken from a fixed list of modules, filtered to prose
(long enough, mostly words, little code), de-duplicated and shuffled with a seed. The text depends
on the Python version (recorded in every run's manifest).
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

from probe.errors import ConfigError

SOURCE_MODULES = (
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "doctest",
    "email",
    "enum",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "json",
    "locale",
    "logging",
    "mailbox",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pkgutil",
    "platform",
    "poplib",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "turtle",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zoneinfo",
)

_WORD = re.compile(r"[A-Za-z][a-z]+")


def _docstrings(module_name: str) -> Iterator[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing on this platform (e.g. no tkinter): skip it
        return
    if module.__doc__:
        yield module.__doc__
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc:
            yield doc
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                mdoc = inspect.getdoc(member) if callable(member) else None
                if mdoc and mdoc != doc:
                    yield mdoc


def _is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < 25:
        return False
    wordlike = sum(bool(_WORD.fullmatch(w.strip(".,;:()'\"!?"))) for w in words)
    code_chars = sum(paragraph.count(c) for c in "=<>{}[]_`|\\#*")
    return wordlike / len(words) > 0.75 and code_chars / len(paragraph) < 0.01 and ">>>" not in paragraph


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """All prose paragraphs of the source modules, de-duplicated, in a fixed order."""
    seen: set[str] = set()
    out: list[str] = []
    for name in SOURCE_MODULES:
        for doc in _docstrings(name):
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                if text not in seen and _is_prose(text):
                    seen.add(text)
                    out.append(text)
    if len(out) < 50:
        raise ConfigError(f"found only {len(out)} prose paragraphs in the standard library; is it complete?")
    return tuple(out)


def natural_token_rows(tokenizer: Any, n: int, n_tokens: int, seed: int) -> list[list[int]]:
    """``n`` windows of ``n_tokens`` tokens (no BOS) cut from shuffled paragraphs.

    Each window starts at a paragraph start and runs on into the following paragraphs (joined by a
    blank line), so every window is real running text. Windows never overlap.
    """
    if n < 1 or n_tokens < 2:
        raise ConfigError("need n >= 1 sequences of n_tokens >= 2 tokens")
    paragraphs = list(prose_paragraphs())
    random.Random(seed).shuffle(paragraphs)
    rows: list[list[int]] = []
    i = 0
    while len(rows) < n:
        if i >= len(paragraphs):
            raise ConfigError(
                f"the standard library's prose gives only {len(rows)} windows of {n_tokens} tokens; "
                "ask for fewer or shorter sequences"
            )
        ids: list[int] = []
        while len(ids) < n_tokens and i < len(paragraphs):
            ids += tokenizer(("\n\n" if ids else "") + paragraphs[i], add_special_tokens=False)["input_ids"]
            i += 1
        if len(ids) >= n_tokens:
            rows.append(ids[:n_tokens])
    return rows


def haystack_text(min_chars: int, seed: int, exclude: Sequence[str] = ()) -> str:
    """At least ``min_chars`` characters of shuffled prose paragraphs (for needle-in-a-haystack)."""
    paragraphs = [p for p in prose_paragraphs() if not any(x in p for x in exclude)]
    random.Random(seed).shuffle(paragraphs)
    out: list[str] = []
    size = 0
    for p in paragraphs:
        out.append(p)
        size += len(p) + 2
        if size >= min_chars:
            return "\n\n".join(out)
    raise ConfigError(f"only {size} characters of prose available; ask for a shorter haystack")
