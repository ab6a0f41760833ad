"""Device maps: one model spread over several devices by accelerate's dispatch, and what that changes.

A device map names a device for each module of the transformers model (``{"model.layers.0":
"cuda:0", ...}``, values ``cuda:N``, an integer ``N``, ``cpu`` or ``disk``); ``auto`` and
``balanced`` ask accelerate's ``infer_auto_device_map`` for one. :func:`parse_device_map` reads what
the user gave (a dict, ``auto``/``balanced``, JSON text or a ``.json`` file), :func:`check_device_map`
validates a map against the model's modules, :func:`resolve_device_map` turns the spec into a map,
:func:`dispatch` places an in-memory model by it. :func:`device_for`, :func:`execution_device` and
:func:`layer_devices` say where a module or a layer runs; :func:`weights_by_device` counts the bytes
each device holds (the memory plan reads it). This module imports nothing from probe but its errors.

See docs/multi-gpu.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from probe.errors import DeviceMapError

DeviceMapSpec = str | Mapping[str, str | int] | None
"""What a caller may pass: None (one device), ``auto``, ``balanced``, JSON text, a ``.json`` file or a dict."""

OFFLOAD = ("cpu", "disk")
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def _fix() -> str:
    return 'give --device-map auto, balanced or JSON such as \'{"model.embed_tokens": 0, "model.layers.0": 0, ...}\''


def normalise_device(value: object, *, check_present: bool = True) -> str:
    """``0`` and ``cuda`` -> ``cuda:0``; ``cuda:N``, ``cpu`` and ``disk`` stay; anything else is refused.

    With ``check_present``, a CUDA index beyond the GPUs present is refused too."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DeviceMapError(f"device map value {value!r} is not a device; use cuda:N (or N), cpu or disk")
    text = f"cuda:{value}" if isinstance(value, int) else value.strip().lower()
    if text in OFFLOAD:
        return text
    match = _CUDA.match(text)
    if match is None:
        why = " (the meta device holds no weights)" if text == "meta" else ""
        raise DeviceMapError(
            f"device map value {value!r} is not a device{why}; use cuda:N (or N), cpu or disk"
        )
    index = int(match.group(1) or 0)
    if index < 0:
        raise DeviceMapError(f"device map value {value!r} is not a device; use cuda:N with N >= 0")
    if check_present:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            seen = f"{count} CUDA device(s) visible" if count else "no CUDA GPU is usable"
            raise DeviceMapError(
                f"device map value {value!r} names GPU {index} but {seen}; map modules to "
                + (f"cuda:0..cuda:{count - 1}" if count else "cpu (or use --device cpu without a device map)")
            )
    return f"cuda:{index}"


def parse_device_map(spec: DeviceMapSpec, *, check_present: bool = True) -> str | dict[str, str] | None:
    """``auto``/``balanced`` as they are, a map (dict, JSON text or a ``.json`` file) as a dict of
    normalised devices, None or ``""`` as None; anything else is a one-line :class:`DeviceMapError`."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, str):
        text = spec.strip()
        if text in ("auto", "balanced"):
            return text
        source = "the device map"
        if not text.startswith("{"):
            path = Path(text).expanduser()
            if path.suffix != ".json" or not path.is_file():
                raise DeviceMapError(
                    f"device map {spec!r} is neither auto, balanced, JSON nor a .json file; {_fix()}"
                )
            source = f"the device map file {path}"
            text = path.read_text()
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise DeviceMapError(
                f"{source} is not valid JSON ({err.msg} at character {err.pos}); {_fix()}"
            ) from None
    if not isinstance(spec, Mapping) or not spec:
        raise DeviceMapError(f"a device map is a non-empty JSON object of module name -> device; {_fix()}")
    out: dict[str, str] = {}
    for name, value in spec.items():
        if not isinstance(name, str):
            raise DeviceMapError(
                f"device map key {name!r} is not a module name; keys are names like model.layers.0"
            )
        out[name] = normalise_device(value, check_present=check_present)
    return out


def _covers(key: str, name: str) -> bool:
    return key == "" or name == key or name.startswith(key + ".")


def device_for(name: str, device_map: Mapping[str, str]) -> str | None:
    """The device the map gives module or tensor ``name``: its most specific entry, else None."""
    best: str | None = None
    for key in device_map:
        if _covers(key, name) and (best is None or len(key) > len(best)):
            best = key
    return None if best is None else device_map[best]


def main_device(device_map: Mapping[str, str]) -> str:
    """Where offloaded (``cpu``/``disk``) modules run, as accelerate decides: the first GPU of the map,
    else ``cpu``."""
    gpus = [d for d in device_map.values() if d not in OFFLOAD]
    return gpus[0] if gpus else "cpu"


def execution_device(value: str, device_map: Mapping[str, str]) -> torch.device:
    """The device a module mapped to ``value`` computes on (offloaded weights come to the main device)."""
    main = main_device(device_map)
    return torch.device(main if value == "disk" or (value == "cpu" and main != "cpu") else value)


def execution_devices(device_map: Mapping[str, str]) -> list[torch.device]:
    """Every device some module computes on, in the map's order."""
    return list(dict.fromkeys(execution_device(v, device_map) for v in device_map.values()))


def check_device_map(model: torch.nn.Module, device_map: Mapping[str, str]) -> None:
    """Refuse a map that names modules the model does not have, nests one entry inside another, leaves
    weights (layers) unplaced, splits tied weights, or mixes GPUs with CPU or disk offload (the
    TransformerBridge does not run such a map)."""
    modules = dict(model.named_modules())
    tensors = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    unknown = [k for k in device_map if k and k not in modules and k not in tensors]
    if unknown:
        layers = _layer_names(modules)
        hint = f" (its layers are {layers[0]} ... {layers[-1]})" if layers else ""
        raise DeviceMapError(
            f"the device map names {', '.join(map(repr, unknown[:4]))}, which {type(model).__name__} does "
            f"not have{hint}; use the module names of model.named_modules()"
        )
    nested = [(a, b) for a in device_map for b in device_map if a != b and _covers(a, b)]
    if nested:
        outer, inner = nested[0]
        raise DeviceMapError(
            f"the device map places {inner!r} inside {outer or 'the whole model'!r} twice; map each module once"
        )
    missing = _unplaced(model, device_map)
    if missing:
        raise DeviceMapError(
            f"the device map places no device for {', '.join(missing[:6])}"
            + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            + "; map every module (or a parent of it) to a device"
        )
    values = set(device_map.values())
    if values & set(OFFLOAD) and values - set(OFFLOAD):
        raise DeviceMapError(
            "the device map mixes GPUs with cpu/disk offload, which the TransformerBridge does not run; put "
            "every module on a GPU (more GPUs, or dtype bfloat16), or run on the CPU with --device cpu"
        )
    from accelerate.utils import find_tied_parameters

    for group in find_tied_parameters(model):
        where = {device_for(n, device_map) for n in group}
        if len(where) > 1:
            raise DeviceMapError(
                f"the device map splits the tied weights {', '.join(group)} over {', '.join(sorted(map(str, where)))}; "
                "map the modules that share them to the same device"
            )


def _layer_names(modules: Mapping[str, torch.nn.Module]) -> list[str]:
    return [n for n in modules if re.search(r"\.(layers|h|blocks)\.\d+$", n)]


def _unplaced(model: torch.nn.Module, device_map: Mapping[str, str]) -> list[str]:
    """The largest modules (or tensors) with weights none of whose weights the map places."""
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    unplaced = [n for n in names if device_for(n, device_map) is None]
    if not unplaced:
        return []
    out: list[str] = []
    left = set(unplaced)
    for module_name, _module in model.named_modules():
        if not module_name or any(_covers(o, module_name) for o in out):
            continue
        inside = [n for n in names if _covers(module_name, n)]
        if inside and all(n in left for n in inside):
            out.append(module_name)
    out += [n for n in unplaced if not any(_covers(o, n) for o in out)]
    return out


def _no_split(model: torch.nn.Module) -> list[str]:
    return list(getattr(model, "_no_split_modules", None) or [])


def resolve_device_map(
    spec: DeviceMapSpec,
    model: torch.nn.Module,
    *,
    dtype: torch.dtype,
    max_memory: Mapping[int | str, int | str] | None = None,
    check_present: bool = True,
) -> dict[str, str] | None:
    """The checked map for ``model`` (real or on the meta device): the given one, or accelerate's
    ``infer_auto_device_map`` for ``auto`` (fill the first devices) and ``balanced`` (even shares of
    the GPUs); ``max_memory`` caps each device (accelerate's default: what is free)."""
    parsed = parse_device_map(spec, check_present=check_present)
    if parsed is None:
        return None
    if isinstance(parsed, str):
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        memory = dict(max_memory) if max_memory is not None else None
        if parsed == "balanced":
            memory = get_balanced_memory(
                model, max_memory=memory, no_split_module_classes=_no_split(model), dtype=dtype
            )
        inferred = infer_auto_device_map(
            model, max_memory=memory, no_split_module_classes=_no_split(model), dtype=dtype
        )
        parsed = {
            name: normalise_device(value, check_present=check_present) for name, value in inferred.items()
        }
    check_device_map(model, parsed)
    return parsed


def is_dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate placed ``model`` by a device map (its modules carry accelerate's hooks)."""
    return bool(getattr(model, "hf_device_map", None)) and any(
        getattr(m, "_hf_hook", None) is not None for m in model.modules()
    )


def recorded_map(model: torch.nn.Module, *, check_present: bool = True) -> dict[str, str]:
    """The dispatched model's ``hf_device_map`` with normalised devices."""
    recorded: Mapping[str, Any] = getattr(model, "hf_device_map", None) or {}
    return {str(k): normalise_device(v, check_present=check_present) for k, v in recorded.items()}


def spread(device_map: Mapping[str, str] | None) -> bool:
    """Whether a map makes a model compute on more than one device or keeps weights offloaded."""
    if not device_map:
        return False
    return len(execution_devices(device_map)) > 1 or "disk" in device_map.values()


def dispatch(model: torch.nn.Module, device_map: Mapping[str, str]) -> torch.nn.Module:
    """Place an in-memory ``model`` by ``device_map`` with accelerate's ``dispatch_model``; ``disk``
    entries go to a temporary folder removed with the model."""
    from accelerate import dispatch_model

    folder = offload_folder(device_map)
    placed = dispatch_model(model, device_map=dict(device_map), offload_dir=folder)
    remove_with(placed, folder)
    return placed


def offload_folder(device_map: Mapping[str, str] | None) -> str | None:
    """A temporary folder for the ``disk`` entries of ``device_map`` (None without any); pass it to
    :func:`remove_with` once the model that reads it exists."""
    if not device_map or "disk" not in device_map.values():
        return None
    return tempfile.mkdtemp(prefix="headlab-offload-")


@contextlib.contextmanager
def removed_on_error(folder: str | None) -> Iterator[None]:
    """Remove the offload ``folder`` if the block fails (a load that stops leaves nothing behind)."""
    try:
        yield
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def remove_with(owner: object, folder: str | None) -> None:
    """Remove ``folder`` when ``owner`` is collected (or when the process exits)."""
    if folder is not None:
        weakref.finalize(owner, shutil.rmtree, folder, True)


def input_device(model: torch.nn.Module, device_map: Mapping[str, str]) -> torch.device:
    """Where the model's inputs go: the device its input embedding computes on."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is not None:
        value = device_for(module_names(model, [embedding])[0], device_map)
        if value is not None:
            return execution_device(value, device_map)
    return execution_devices(device_map)[0]


def place(
    model: torch.nn.Module, device: torch.device, dtype: torch.dtype, spec: DeviceMapSpec
) -> tuple[torch.nn.Module, dict[str, str] | None, torch.device]:
    """Put ``model`` where it runs: on ``device`` without a map; by the map of ``spec`` (dispatched
    with accelerate where it spreads the model) otherwise; where it is, if accelerate placed it
    already. Returns the model, the map (None unless the model is spread) and its input device."""
    placed_already = bool(getattr(model, "hf_device_map", None)) and (
        spec is not None or is_dispatched(model)
    )
    if placed_already:
        device_map = recorded_map(model)
        check_device_map(model, device_map)
    elif spec is not None:
        resolved = resolve_device_map(spec, model, dtype=dtype)
        assert resolved is not None
        device_map = resolved
    else:
        return model.to(device=device, dtype=dtype), None, device
    first = input_device(model, device_map)
    if not spread(device_map):
        return model.to(device=first, dtype=dtype), None, first
    if not placed_already:
        model = dispatch(model.to(dtype=dtype), device_map)
    return model, device_map, first


def shared_hooks(model: torch.nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo entry for each of accelerate's hooks in ``model``, so that a copy of the
    module tree shares them (and the offloaded weights they hold) instead of copying them."""
    return {id(h): h for m in model.modules() if (h := getattr(m, "_hf_hook", None)) is not None}


def module_names(model: torch.nn.Module, wanted: Iterable[torch.nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in wanted]


def layer_devices(
    native: torch.nn.Module,
    attention: Iterable[torch.nn.Module],
    device_map: Mapping[str, str] | None,
    default: torch.device,
) -> list[torch.device]:
    """The device each layer's attention computes on: from the map by the attention module's name
    (``default`` for every layer without a map)."""
    modules = list(attention)
    if not device_map:
        return [default] * len(modules)
    out = []
    for name in module_names(native, modules):
        value = device_for(name, device_map)
        out.append(default if value is None else execution_device(value, device_map))
    return out


def weights_by_device(model: torch.nn.Module, device_map: Mapping[str, str]) -> dict[str, int]:
    """Bytes of parameters and buffers the map places on each device (tied tensors counted once;
    ``disk`` entries hold none in memory). Reads shapes only, so a meta or offloaded model works."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, tensor in _named_tensors(model):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        value = device_for(name, device_map)
        if value is None or value == "disk":
            continue
        out[value] = out.get(value, 0) + tensor.numel() * tensor.element_size()
    return out


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def state_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict's entries in name order, each offloaded one (a meta tensor between calls)
    brought to the CPU from accelerate's weights one at a time, so a model spread with offload
    hashes as it would on one device."""
    from accelerate.utils import align_module_device

    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if not tensor.is_meta:
            yield name, tensor
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        with align_module_device(module, torch.device("cpu")):
            value = getattr(module, leaf)
            if value is None or value.is_meta:
                raise DeviceMapError(
                    f"{name} is on the meta device and no offloaded copy of it was found; load the model "
                    "again with its device map (its offload folder may have been removed)"
                )
            yield name, value.detach().clone()


def materialised(module: torch.nn.Module) -> contextlib.ExitStack:
    """Inside the block, every weight of ``module`` that accelerate offloaded (a meta tensor between
    calls) holds its values on its execution device, as during the module's own forward; code that
    reads weights directly (``W_O``, norms) must do it inside. A no-op for modules not offloaded."""
    from accelerate.utils import align_module_device

    stack = contextlib.ExitStack()
    for sub in module.modules():
        stack.enter_context(align_module_device(sub))
    return stack
