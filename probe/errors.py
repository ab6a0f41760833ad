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
    """``length`` tokens (BOS included) do not fit the model's ``limit``.

    ``bos`` says whether the model prepends a BOS token, which the advised text length leaves room
    for. Analyses take their lengths from their config (``--set seq_len=...``; census counts text
    tokens, sinks counts BOS too, so the advised value fits both).
    """

    def __init__(self, model: str, length: int, limit: int, *, bos: bool = False) -> None:
        fits = limit - int(bos)
        prepended = " after the BOS token the model prepends" if bos else ""
        super().__init__(
            f"context of {length} tokens{' (BOS included)' if bos else ''} is longer than {model} allows "
            f"({limit}); use at most {fits} tokens of text{prepended}: with headlab run, "
            f"--set seq_len={fits} (or lower the length setting that --show-config lists), in Python "
            f"model.encode(texts, max_tokens={limit}); or use a model with a longer context"
        )


class DeviceUnavailableError(HeadlabError):
    pass


class CacheDamagedError(HeadlabError):
    """A converted model in the cache does not match what its marker recorded when it was written."""

    def __init__(self, what: str, directory: str, problem: str, fix: str) -> None:
        super().__init__(
            f"the converted cache of {what} in {directory} is damaged ({problem}), so nothing was computed "
            f"from it; rebuild it with: {fix}"
        )


class CacheNotWritableError(HeadlabError):
    """The model cache directory cannot be created or written."""


class CheckpointError(HeadlabError):
    """A local checkpoint directory or weight file that cannot be read (truncated, not the format it claims)."""


class ModelPathError(HeadlabError, FileNotFoundError):
    """A model given as a path that does not exist."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"no such file or directory: {path}; pass an existing checkpoint directory or .gguf file "
            "(or a catalogue name: `headlab models` lists them)"
        )

    def __str__(self) -> str:  # OSError would format its own message
        return str(self.args[0])


class ConfigError(HeadlabError, ValueError):
    """A config value out of range or of the wrong kind."""


class DeviceMapError(ConfigError):
    """A device map that cannot place the model (unknown modules, missing layers, unknown or absent
    devices), or something that cannot run on a model spread over several devices."""


class CaptureError(HeadlabError, RuntimeError):
    """A capture did not measure what was asked (a hook that did not fire, no attention weights)."""


class RunStoreError(HeadlabError):
    """A run directory is missing, damaged or incomplete."""
