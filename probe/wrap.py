"""A transformers causal language model already in memory, wrapped as a :class:`LoadedModel`.

``probe.wrap(model, tokenizer)`` gives the same kind of loaded model that ``probe.load_model``
gives for the same checkpoint on disk (same family, hooks, bridge and ``describe()`` fields), with
``source="memory"`` and a ``weight_sha256`` computed from the state dict (:func:`memory_sha256`).
The user's model object is not changed: headlab works on a module tree of its own whose parameters
share storage with the user's (no copy of the weights unless another device or dtype is asked for).

See docs/models.md (a model already in memory).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from probe import devicemap
from probe.checkpoints import model_family
from probe.errors import ConfigError, DeviceMapError
from probe.loading import _wrap_language, resolve_device, resolve_dtype
from probe.model import BosMode, LoadedModel

__all__ = ["memory_sha256", "wrap"]

_SHA_PREFIX = b"headlab-state-dict-v1\0"


def memory_sha256(model: torch.nn.Module) -> str:
    """sha256 over a module's state dict, deterministic across runs and processes.

    For each entry in sorted name order: the name, the dtype, the shape (JSON) and the tensor's raw
    bytes as stored (little-endian, C order, on the CPU), each field ended by a NUL byte; the whole
    preceded by a version tag. Tied weights appear under each of their names. It identifies the
    weights, not a file: it differs from the sha256 of the ``.safetensors`` file the same weights
    were saved to (and from ``checkpoint_sha256`` of that directory).
    """
    digest = hashlib.sha256(_SHA_PREFIX)
    for name, tensor in devicemap.state_items(model):  # offloaded weights read one at a time
        t = tensor.detach()
        digest.update(name.encode() + b"\0")
        digest.update(str(t.dtype).removeprefix("torch.").encode() + b"\0")
        digest.update(json.dumps(list(t.shape)).encode() + b"\0")
        flat = t.to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        digest.update(b"\0")
    return digest.hexdigest()


def _causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _check_causal_lm(model: Any) -> None:
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise ConfigError(
            f"probe.wrap takes a transformers causal language model, got {type(model).__name__}; "
            "load one with AutoModelForCausalLM, or pass a name or path to probe.load_model"
        )
    known = _causal_lm_classes()
    if not any(cls.__name__ in known for cls in type(model).__mro__):
        cfg = model.config
        is_vision = getattr(cfg, "vision_config", None) is not None or hasattr(cfg, "image_size")
        what = "an image or vision-language model" if is_vision else "not a causal language model"
        raise ConfigError(
            f"{type(model).__name__} is {what} (probe.wrap takes AutoModelForCausalLM models); "
            "load vision and vision-language models with probe.load_model (the vision loaders), and "
            "for a bare decoder pass its ...ForCausalLM model"
        )


def _check_materialised(model: torch.nn.Module) -> set[torch.device]:
    tensors = [*model.parameters(), *model.buffers()]
    if devicemap.is_dispatched(model):  # offloaded weights sit on the meta device between calls
        return {t.device for t in tensors if not t.is_meta}
    if any(t.is_meta for t in tensors):
        raise ConfigError(
            f"{type(model).__name__} has weights on the meta device (not materialised); load it with "
            "from_pretrained without device_map='meta'/init_empty_weights, or call probe.load_model(path)"
        )
    return {t.device for t in tensors}


def _check_vocab(model: Any, tokenizer: Any) -> None:
    if tokenizer is None or not callable(tokenizer):
        raise ConfigError("probe.wrap needs the model's tokenizer; pass AutoTokenizer.from_pretrained(...)")
    embedding = model.get_input_embeddings()
    rows = int(embedding.weight.shape[0])
    size = len(tokenizer)
    if size > rows:
        raise ConfigError(
            f"the tokenizer has {size} tokens but the model's embedding has {rows} rows; pass the "
            "tokenizer this model was trained with (or resize_token_embeddings first)"
        )


def _default_name(model: Any) -> str:
    source = str(getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", ""))
    return Path(source).name if source else model_family(model.config)


def _own_tree(model: torch.nn.Module) -> torch.nn.Module:
    """A module tree of headlab's own whose parameters are new ``Parameter`` objects on the same
    storage as the user's (no weights copied) and whose buffers are the user's tensors."""
    memo: dict[int, Any] = dict(devicemap.shared_hooks(model))  # accelerate's hooks: shared, not copied
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.data, requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b
    return copy.deepcopy(model, memo=memo)


def wrap(
    model: Any,
    tokenizer: Any,
    *,
    name: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    bos: BosMode = "default",
    weight_sha256: str | None = None,
) -> LoadedModel:
    """Wrap a transformers causal language model already in memory as a :class:`LoadedModel`.

    ``model`` is what ``AutoModelForCausalLM.from_pretrained(...)`` (or ``from_config``) returned;
    ``tokenizer`` its tokenizer. ``name`` defaults to the last part of the config's
    ``name_or_path`` (the name ``load_model`` would give the directory), else the family.
    ``device`` and ``dtype`` default to the model's own, so nothing is copied; asking for another
    one copies the weights into headlab's tree only. ``bos`` is the BOS policy of ``load_model``.

    The result has ``source="memory"``, ``path=None`` and ``weight_sha256`` from
    :func:`memory_sha256` over the model's state dict as passed (not a file's sha256), unless
    ``weight_sha256`` gives it (64 hex digits; hashing reads every weight onto the CPU, some 10-20 s
    for an 8B model on a GPU: pass the digest a run already recorded for these weights). The user's
    model is left as it was: headlab works on a module tree of its own (eager attention, eval mode,
    no gradients) sharing the parameter storage, so the user's attention implementation, training
    mode, ``requires_grad`` flags and device are untouched; the tokenizer is copied before its pad
    token and padding side are set. Because the storage is shared, training the user's model
    in place afterwards changes the wrapped model's weights too (its ``weight_sha256`` then no
    longer describes them): wrap again after training.

    A model accelerate spread with a device map (``from_pretrained(..., device_map=...)`` or
    ``dispatch_model``) is wrapped where it lies, its map recorded as ``device_map`` and accelerate's
    hooks shared with headlab's tree (see docs/multi-gpu.md); ``device`` and ``dtype`` must then be
    left out.

    Refused with a one-line :class:`ConfigError`: not a causal LM (encoders, vision and
    vision-language models: use ``probe.load_model``), a tokenizer larger than the embedding, weights
    on the meta device (not offloaded by accelerate), weights spread over several devices by hand
    without ``device``, and the families that ``probe.load_model`` refuses (see docs/support.md).
    """
    _check_causal_lm(model)
    devices = _check_materialised(model)
    _check_vocab(model, tokenizer)
    dispatched = devicemap.is_dispatched(model)
    if dispatched:
        _check_dispatched(model, device, dtype)
        device = next(iter(devices), torch.device("cpu"))  # replaced by the map's input device
    elif device is None:
        if len(devices) > 1:
            raise ConfigError(
                f"the model's weights are spread over {len(devices)} devices; pass device='cuda:0' (or 'cpu')"
            )
        device = next(iter(devices), torch.device("cpu"))
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype if dtype is not None else getattr(model, "dtype", None))
    if weight_sha256 is None:
        weight_sha256 = memory_sha256(model)
    elif len(weight_sha256) != 64 or any(c not in "0123456789abcdef" for c in weight_sha256):
        raise ConfigError(f"weight_sha256 must be 64 lowercase hex digits, got {weight_sha256!r}")

    own: Any = _own_tree(model)
    if callable(getattr(own, "set_attn_implementation", None)):
        own.set_attn_implementation("eager")  # as load_model loads checkpoints; on the copy's config
    else:
        own.config._attn_implementation = "eager"
    tok = copy.deepcopy(tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return _wrap_language(
        name or _default_name(model),
        model_family(model.config),
        "memory",
        own,
        tok,
        device=target_device,
        dtype=target_dtype,
        bos=bos,
        weight_sha256=weight_sha256,
        path=None,
        device_map=devicemap.recorded_map(model) if dispatched else None,
    )


def _check_dispatched(model: Any, device: Any, dtype: Any) -> None:
    """A model accelerate spread by a device map is wrapped where it lies: another device or dtype
    would need a copy of every weight (offloaded ones included), so both are refused."""
    if device is not None:
        raise DeviceMapError(
            f"the model is spread by a device map ({len(set(model.hf_device_map.values()))} devices); leave "
            "device out (it runs where the map put it), or load it on one device to pick one"
        )
    if dtype is not None and resolve_dtype(dtype) != getattr(model, "dtype", None):
        raise DeviceMapError(
            f"the model is spread by a device map in {model.dtype}; leave dtype out, or load it with "
            "from_pretrained(..., dtype=...) in the dtype wanted"
        )
