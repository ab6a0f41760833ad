"""Errors that tell the user what went wrong and how to fix it.

Every error raised on bad input derives from :class:`HeadlabError`; the CLI prints ``str(err)``
as one line and exits non-zero, so messages always end with the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HeadlabError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class UnknownModelError(HeadlabError, KeyError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(
            f"unknown model {name!r}.{hint} Known names: {', '.join(known)}; or pass a local directory, "
            f"a .gguf file, or a Hugging Face id with --allow-hub (`headlab models` lists the catalogue)."
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingPackageError(HeadlabError):
    def __init__(self, what: str, install: str) -> None:
        super().__init__(f"{what} is not installed; install it with: {install}")


class ChecksumMismatchError(HeadlabError):
    def __init__(self, path: str, got: str, expected: str, fix: str) -> None:
        super().__init__(
            f"checksum mismatch for {path}: sha256 {got[:16]}… but expected {expected[:16]}…; {fix}"
        )


class ContextTooLongError(HeadlabError, ValueError):
    def __init__(self, model: str, length: int, limit: int) -> None:
        super().__init__(
            f"context of {length} tokens is longer than {model} allows ({limit}); "
            f"use a shorter context (e.g. --seq-len {limit}) or a model with a longer context"
        )


class DeviceUnavailableError(HeadlabError):
    pass


class ConfigError(HeadlabError, ValueError):
    """A config value out of range or of the wrong kind."""


class CaptureError(HeadlabError, RuntimeError):
    """A capture did not measure what was asked (a hook that did not fire, no attention weights)."""


class RunStoreError(HeadlabError):
    """A run directory is missing, damaged or incomplete."""
