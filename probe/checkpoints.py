"""Reading checkpoint directories: weight files checked before they are read, configs, tokenizers.

Shared by every model source (language, vision, vision-language); imports nothing from probe but
its errors. See docs/models.md for the sources that use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from probe.errors import CheckpointError, HeadlabError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with the structure of a ``.safetensors`` file (header and size), or None.

    Reads the header only: its length, its JSON, and that the tensors it lists cover the file
    exactly, which catches truncated files, random bytes and damaged headers. Damage inside the
    tensor data of a file that has no recorded checksum cannot be seen here.
    """
    size = path.stat().st_size
    if size < 8:
        return f"it has {size} bytes, too few for a safetensors header"
    with path.open("rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            return f"its first 8 bytes announce a {length}-byte header but the file has {size} bytes"
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"its header entry {key!r} has no valid data_offsets"
        end = max(end, offsets[1])
    if 8 + length + end != size:
        return f"its header lists {8 + length + end} bytes of data but the file has {size}"
    return None


def check_checkpoint_files(directory: Path, *, tokenizer: bool = False) -> None:
    """Refuse a checkpoint directory whose weight files are unreadable (or, with ``tokenizer``, that
    has no tokenizer), with a :class:`CheckpointError` saying which file and how to fix it."""
    for file in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem is not None:
            raise CheckpointError(
                f"{file} is damaged or not a safetensors file ({problem}); copy the checkpoint again or "
                "re-save it with save_pretrained"
            )
    if tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it beside the "
            f"weights with tokenizer.save_pretrained({str(directory)!r})"
        )


def load_language_dir(directory: Path, dtype: torch.dtype, **placement: Any) -> tuple[torch.nn.Module, Any]:
    """A causal LM and its tokenizer from a checkpoint directory; ``placement``: ``from_pretrained``'s
    ``device_map`` and ``offload_folder`` (see :func:`probe.loading.placement`)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_checkpoint_files(directory, tokenizer=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"could not load the tokenizer in {directory} ({first_line(err)}); save it beside the weights "
            f"with tokenizer.save_pretrained({str(directory)!r})"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=dtype, attn_implementation="eager", **placement
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(
            f"could not load the checkpoint in {directory} ({first_line(err)}); it needs config.json and "
            "model.safetensors (or pytorch_model.bin) written by save_pretrained"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def first_line(err: BaseException, limit: int = 240) -> str:
    """The error's first line, cut to ``limit`` characters with an ellipsis where it is longer."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def text_config(hf_config: Any) -> Any:
    return getattr(hf_config, "text_config", None) or hf_config


def model_family(hf_config: Any) -> str:
    return str(getattr(text_config(hf_config), "model_type", "unknown"))


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, or a clear error."""
    file = directory / "config.json"
    if not file.is_file():
        raise HeadlabError(f"{directory} has no config.json; pass a transformers checkpoint directory")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HeadlabError(
            f"{file} is not valid JSON ({err}); re-save the checkpoint with save_pretrained"
        ) from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise HeadlabError(f"{file} has no model_type; re-save the checkpoint with save_pretrained")
    return data


@contextmanager
def quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def force_eager(hf_model: torch.nn.Module) -> None:
    """Switch a transformers vision model to eager attention (the only kind that returns weights)."""
    setter = getattr(hf_model, "set_attn_implementation", None)
    if callable(setter):
        setter("eager")
    for module in hf_model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"
