"""Memory budget: estimate a capture's peak memory before it runs, and pick a batch size that fits.

:func:`estimate_capture` adds up the weights, the activations and attention of one layer (eager
patterns, or recomputed query blocks), the logits and what the reducers keep, with copy counts
fitted to measured captures (:mod:`probe.memory_measure`); :func:`plan_batch_size` returns the
largest batch that fits a fraction of :func:`available_memory`, or raises
:class:`MemoryBudgetError` saying what to change. Treat the numbers as "will it fit", not as a
profile.

See docs/capture.md (memory estimates).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from probe import devicemap
from probe.errors import ConfigError
from probe.kernels import SOFTCAP_BLOCK, attention_modules, soft_caps_logits
from probe.model import LoadedModel
from probe.moments import HAVE_TRITON, MomentStack
from probe.moments_triton import programs_per_head
from probe.reducers import ColumnImportance, KeepPatterns, PatternReducer

Mode = Literal["eager", "recompute"]

# Calibrated constants (docs/capture.md, memory estimates; measured with probe.memory_measure).
EAGER_ROW_COPIES = 5  # float32 [b, H, T, T] tensors alive in one eager layer (live: 3.6-4.5)
RECOMPUTE_ROW_COPIES = 7  # float32 [b, H, query_block, T] tensors alive per block (live: 4.8-5.7)
ACT_COPIES = 4  # [b, T, d_model] tensors alive around one layer
MLP_COPIES = 2  # [b, T, d_ff] tensors alive in one MLP (gate, up, act(gate)·up)
HEAP_SLACK = 2.5  # CPU: heap growth per byte of blocks below the mmap threshold (measured 1.5-3x)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest dynamic mmap threshold on 64-bit (M_MMAP_THRESHOLD)
CPU_OVERHEAD = 1 * 2**20  # thread scratch and small allocations of a CPU forward, bytes

_PROC_MEMINFO = Path("/proc/meminfo")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_SELF_CGROUP = Path("/proc/self/cgroup")


class MemoryBudgetError(ConfigError):
    """A capture plan that does not fit in the memory available, even with batch size 1."""


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``: binary units, 3 significant digits."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------- available memory


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _meminfo_available() -> int | None:
    try:
        for line in _PROC_MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sysconf_available() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dirs() -> list[tuple[int, Path]]:
    """(cgroup version, directory) candidates of this process's memory cgroup, most specific first."""
    out: list[tuple[int, Path]] = []
    try:
        lines = _PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if parts[0] == "0" and controllers == "":
            out.append((2, _CGROUP_ROOT / rel))
        elif "memory" in controllers.split(","):
            out.append((1, _CGROUP_ROOT / "memory" / rel))
    out += [(2, _CGROUP_ROOT), (1, _CGROUP_ROOT / "memory")]  # inside a container: its own root
    return out


def _cgroup_available() -> int | None:
    """Limit minus usage (reclaimable page cache added back) of the tightest memory cgroup, if any."""
    best: int | None = None
    for version, directory in _cgroup_dirs():
        if version == 2:
            limit = _read_int(directory / "memory.max")
            usage = _read_int(directory / "memory.current")
            cache = _stat_value(directory / "memory.stat", "inactive_file")
        else:
            limit = _read_int(directory / "memory.limit_in_bytes")
            usage = _read_int(directory / "memory.usage_in_bytes")
            cache = _stat_value(directory / "memory.stat", "total_inactive_file")
        if limit is None or limit >= 2**60:  # "max" / the v1 "unlimited" sentinel
            continue
        free = max(0, limit - (usage or 0) + cache)
        best = free if best is None else min(best, free)
    return best


def available_memory(device: str | torch.device) -> int:
    """Bytes that a new allocation on ``device`` can still use.

    CUDA: the driver's free memory plus what torch's caching allocator holds reserved but unused.
    CPU (and MPS, which shares host memory): ``MemAvailable`` of /proc/meminfo (else
    ``sysconf(SC_AVPHYS_PAGES)``), lowered to the memory cgroup's limit minus its usage when that is
    tighter (a container or a batch-system job). Memory already in use, the model's weights
    included, is not available.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + max(0, cached))
    host = _meminfo_available()
    if host is None:
        host = _sysconf_available()
    limited = _cgroup_available()
    candidates = [v for v in (host, limited) if v is not None]
    if not candidates:
        raise ConfigError("cannot tell how much memory this machine has (no /proc/meminfo or sysconf)")
    return min(candidates)


# ---------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class DevicePeak:
    """One device's share of a plan for a model spread over several: the weights the device map puts
    on it, and its peak (weights, the layer phase of the layers on it, the logits if the output head
    is on it, and the reducers and moments it keeps)."""

    device: str
    weights: int
    total: int
    layers: int = 0  # layers computing on it

    @property
    def transient(self) -> int:
        return self.total - self.weights


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory (bytes) of one capture batch, by what holds it.

    ``activations`` and ``attention`` are held in the *layer phase* (inside one layer), ``logits``
    in the *output phase* (after the last layer), so ``total`` is ``weights + reducers`` plus the
    larger of the two phases, plus, on the CPU, what the heap kept of the layer phase. ``transient``
    (``total - weights``) is what the capture needs on top of the weights, which are already
    resident once a model is loaded: this is what must fit in :func:`available_memory`.
    """

    weights: int
    activations: int
    attention: int
    reducers: int
    total: int
    logits: int = 0
    cache: int = 0  # a decode's KV cache, held from the prefill on
    mode: str = "eager"
    batch_size: int = 1
    seq_len: int = 0
    query_block: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    # a model spread by a device map: every device's share (then ``device``, ``weights`` and
    # ``total`` are those of the device with the largest peak)
    devices: tuple[DevicePeak, ...] = ()

    @property
    def transient(self) -> int:
        return self.total - self.weights

    def describe(self) -> str:
        block = f", query_block {self.query_block}" if self.mode == "recompute" else ""
        cache = f", KV cache {format_bytes(self.cache)}" if self.cache else ""
        where = f"on {self.device}"
        if self.devices:
            shares = ", ".join(f"{p.device} {format_bytes(p.total)}" for p in self.devices)
            where = f"over {len(self.devices)} devices ({shares}), largest on {self.device}"
        return (
            f"{self.mode} capture of {self.batch_size} x {self.seq_len} tokens{block} {where} "
            f"({self.dtype}): ~{format_bytes(self.total)} peak (weights {format_bytes(self.weights)}, "
            f"activations {format_bytes(self.activations)}, attention {format_bytes(self.attention)}, "
            f"logits {format_bytes(self.logits)}, reducers {format_bytes(self.reducers)}{cache})"
        )


_WEIGHT_BYTES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[Any, ...], int]] = (
    weakref.WeakKeyDictionary()
)


def weights_bytes(model: LoadedModel) -> int:
    """Bytes of every parameter and buffer of the transformers model (shared storage counted once).

    Counted once per model (walking every module takes milliseconds, and a capture plans its memory
    on every call); counted again if the first parameter's storage, dtype or device changed.
    """
    first = next(model.hf_model.parameters(), None)
    stamp = () if first is None else (first.dtype, first.device, first.untyped_storage().data_ptr())
    cached = _WEIGHT_BYTES.get(model.hf_model)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    total = _count_weight_bytes(model)
    _WEIGHT_BYTES[model.hf_model] = (stamp, total)
    return total


def _count_weight_bytes(model: LoadedModel) -> int:
    seen: set[tuple[str, int]] = set()
    total = 0
    for module in model.hf_model.modules():
        for tensor in itertools.chain(module._parameters.values(), module._buffers.values()):
            if tensor is None:
                continue
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if storage.data_ptr() != 0 and key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def _config_int(model: LoadedModel, *names: str) -> int | None:
    cfg: Any = model.hf_model.config
    configs = [getattr(cfg, "text_config", None), cfg]
    for c in configs:
        if c is None:
            continue
        for name in names:
            value = getattr(c, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _fused_moments(model: LoadedModel, reducers: Sequence[PatternReducer]) -> bool:
    """Whether a recompute capture computes its statistics with the fused (Triton) moment kernels."""
    if model.device.type != "cuda" or not all(getattr(r, "supports_moments", False) for r in reducers):
        return False
    return bool(HAVE_TRITON) and model.d_head in (16, 32, 64, 128, 256)


def _result_bytes(reducer: PatternReducer, n_sequences: int, T: int, n_layers: int, n_heads: int) -> int:
    """Host bytes of the per-sample results ``reducer`` accumulates over ``n_sequences`` sequences."""
    if isinstance(reducer, KeepPatterns):
        t = min(T, reducer.max_tokens)
        return min(n_sequences, reducer.n_samples) * n_layers * n_heads * t * t * 2
    if isinstance(reducer, ColumnImportance):
        return n_sequences * n_layers * n_heads * T * 4
    # other reducers keep a few numbers per (layer, head) and sample: bounded by their state
    return n_sequences * reducer.state_bytes(1, T, n_layers, n_heads)


def _sizes(
    model: LoadedModel, dtype: torch.dtype | None, weights: int | None
) -> tuple[torch.dtype, int, int, int, int]:
    """The dtype planned for, its element size, the weights' bytes in it (``weights``: already
    counted in the model's dtype), the MLP's width and the vocabulary."""
    dt = dtype or model.dtype
    s = torch.empty((), dtype=dt).element_size()
    if weights is None:
        weights = weights_bytes(model)
    if dt != model.dtype:
        weights = weights * s // torch.empty((), dtype=model.dtype).element_size()
    d_ff = _config_int(model, "intermediate_size", "n_inner", "ffn_dim") or 4 * model.d_model
    vocab = _config_int(model, "vocab_size") or len(model.tokenizer)
    return dt, s, weights, d_ff, vocab


def _capped_bytes(model: LoadedModel, b: int, T: int, s: int) -> int:
    """A soft-capped model's attention output, SOFTCAP_BLOCK query rows at a time: the scores in the
    model's dtype (``s`` bytes), their float32 softmax and its cast back; 0 for other models."""
    if not soft_caps_logits(model):
        return 0
    return b * model.n_heads * min(SOFTCAP_BLOCK, T) * T * (2 * s + 4)


def _window_mask(model: LoadedModel, T: int) -> bool:
    """Whether a sliding window shorter than ``T`` makes SDPA's mask a ``[b, 1, T, T]`` tensor."""
    window = model.sliding_window
    return window is not None and window < T


def estimate_capture(
    model: LoadedModel,
    *,
    batch_size: int,
    seq_len: int,
    reducers: Sequence[PatternReducer] = (),
    mode: Mode = "eager",
    query_block: int = 512,
    n_sequences: int | None = None,
    dtype: torch.dtype | None = None,
    weights: int | None = None,
    device_map: Mapping[str, str] | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of capturing ``batch_size`` sequences of ``seq_len`` tokens.

    ``seq_len`` is the padded length of a batch (BOS included). ``n_sequences`` (optional) adds, on
    a CPU device, the per-sample results the reducers accumulate over the whole capture. ``dtype``
    overrides the model's dtype (to answer "would bfloat16 fit?"). ``weights`` is
    ``weights_bytes(model)`` if already known (it walks every module, which takes a few ms). See
    docs/capture.md (memory estimates) for the model of each term. A model spread by a device map
    (``model.device_map``, or ``device_map`` given here) is planned device by device
    (:attr:`MemoryEstimate.devices`): each holds its weights, and the layer phase where it holds
    layers, the logits where it holds the output head, its layers' moments, and on the input's
    device the reducers and the gathered moments.
    """
    if mode not in ("eager", "recompute"):
        raise ConfigError(f"unknown capture mode {mode!r}; choose eager or recompute")
    if batch_size < 1 or seq_len < 1 or query_block < 1:
        raise ConfigError("batch_size, seq_len and query_block must be >= 1")
    dt, s, weights, d_ff, vocab = _sizes(model, dtype, weights)
    b, T = batch_size, seq_len
    H, L, D, d = model.n_heads, model.n_layers, model.d_model, model.d_head
    on_cpu = model.device.type != "cuda"
    heap = 0.0  # CPU: bytes the heap holds from the layer phase on (kept through the output phase)
    mapped = 0.0  # bytes held only while a layer runs (mmapped blocks on the CPU, any block on a GPU)

    def held(n_bytes: float, block: float) -> float:
        """Account ``n_bytes`` of layer-phase tensors made of blocks of ``block`` bytes.

        On the CPU, blocks below the mmap threshold come from the heap, which keeps them (and its
        fragments) from then on: they count HEAP_SLACK times and stay held through the output
        phase. Larger blocks are mapped and unmapped, as every block on a GPU is reused.
        """
        nonlocal heap, mapped
        if on_cpu and block < MMAP_THRESHOLD:
            heap += HEAP_SLACK * n_bytes
            return HEAP_SLACK * n_bytes
        mapped += n_bytes
        return n_bytes

    # layer phase: one layer's residual-stream / MLP tensors, and its attention tensors
    activations = held(ACT_COPIES * b * T * D * s, b * T * D * s) + held(
        MLP_COPIES * b * T * d_ff * s, b * T * d_ff * s
    )
    if mode == "eager":
        rows = b * H * T * T * 4
        attention = held(EAGER_ROW_COPIES * rows, rows) + held(b * T * T * s, b * T * T * s)  # + 4-D mask
    else:
        keys = b * H * T * d * 4
        attention = held(3 * keys, keys)  # float32 queries and keys (repeated to every query head)
        if _fused_moments(model, reducers):  # Triton: scores never leave the GPU's registers
            # lse (the moments go into the MomentStack), and the single pass's rows of partial
            # column sums (an unpadded batch; a padded one runs two passes and needs fewer)
            parts = 0 if soft_caps_logits(model) else programs_per_head(b, H, T, model.device)
            blocks, block = (1 + parts) * b * H * T * 4, parts * b * H * T * 4
        else:
            rows = b * H * min(query_block, T) * T * 4
            blocks, block = RECOMPUTE_ROW_COPIES * rows, rows
        # before the statistics, the layer's output from soft-capped scores (held one after the other)
        if (capped := _capped_bytes(model, b, T, s)) > blocks:
            blocks, block = capped, capped * 4 // (2 * s + 4)
        attention += held(blocks, block)
        if b > 1 or _window_mask(model, T):
            # a left-padded batch, or a sliding window shorter than the sequence, needs a
            # [b, 1, T, T] boolean mask, which the CPU's SDPA kernel copies to float. A single
            # causal sequence (a GPU's fused kernel, is_causal) needs none.
            attention += held(b * T * T * (5 if on_cpu else 1), b * T * T * (4 if on_cpu else 1))
    if on_cpu:
        activations += CPU_OVERHEAD
        heap += CPU_OVERHEAD
    # output phase: the logits, float32 (recompute asks for logits_to_keep=1). They are made after
    # the last layer, when what the layer phase mapped (or, on a GPU, freed) is no longer held.
    logits = (b * T if mode == "eager" else b) * vocab * 4
    peak = heap + max(mapped, logits)
    state = sum(r.state_bytes(b, T, L, H) for r in reducers)
    if on_cpu and n_sequences is not None:
        state += sum(_result_bytes(r, n_sequences, T, L, H) for r in reducers)
    stack = 0
    if mode == "recompute" and reducers and all(getattr(r, "supports_moments", False) for r in reducers):
        # every layer's moments are kept until the forward ends, then handed to the reducers
        offsets = {o for r in reducers for o in r.diag_offsets}
        stack = MomentStack.bytes_needed(L, b, H, T, len(offsets))
    est = MemoryEstimate(
        weights=int(weights),
        activations=int(activations),
        attention=int(attention),
        logits=int(logits),
        reducers=int(state + stack),
        total=int(weights + peak + state + stack),
        mode=mode,
        batch_size=b,
        seq_len=T,
        query_block=min(query_block, T),
        device=str(model.device),
        dtype=str(dt).removeprefix("torch."),
    )

    def beyond_weights(layout: _Layout, dev: str, n: int) -> float:
        home = dev == layout.home
        held_here = (state if home else 0) + stack * n // max(1, L)
        if home and len(layout.layers) > 1:
            held_here += stack  # the moments gathered from every device for the reducers
        return held_here + (heap if n else 0) + max(mapped if n else 0, logits if dev == layout.output else 0)

    return _per_device(est, model, device_map, dtype, weights, beyond_weights)


@dataclass(frozen=True)
class _Layout:
    """Where a spread model's parts are: weights and layers per device, the output head's and the
    input's device."""

    devices: list[str]
    weights: dict[str, int]
    layers: dict[str, int]
    output: str
    home: str


def _layout(model: LoadedModel, device_map: Mapping[str, str] | None, scale: float = 1.0) -> _Layout | None:
    """The layout of ``device_map`` (default: the model's own map) over the model's modules, or None
    for a model on one device; ``scale`` converts the weights' bytes to a planned dtype."""
    dmap = device_map if device_map is not None else model.device_map
    native = model.native_model
    if not dmap or native is None:
        return None
    layer_devs = devicemap.layer_devices(native, attention_modules(model), dmap, model.device)
    layers: dict[str, int] = {}
    for layer_dev in layer_devs:
        layers[str(layer_dev)] = layers.get(str(layer_dev), 0) + 1
    weights: dict[str, int] = {}
    for value, n_bytes in devicemap.weights_by_device(native, dmap).items():
        where = str(devicemap.execution_device(value, dmap)) if value != "cpu" else "cpu"
        weights[where] = weights.get(where, 0) + int(n_bytes * scale)
    tree: Any = native
    head = tree.get_output_embeddings() if hasattr(tree, "get_output_embeddings") else None
    output = str(layer_devs[-1])
    if head is not None:
        placed = devicemap.device_for(devicemap.module_names(native, [head])[0], dmap)
        output = str(devicemap.execution_device(placed, dmap)) if placed is not None else output
    home = str(devicemap.input_device(native, dmap))
    devices = list(dict.fromkeys([home, *(str(d) for d in layer_devs), output, *weights]))
    return _Layout(devices, weights, layers, output, home)


def _per_device(
    est: MemoryEstimate,
    model: LoadedModel,
    device_map: Mapping[str, str] | None,
    dtype: torch.dtype | None,
    weights: float,
    beyond_weights: Callable[[_Layout, str, int], float],
) -> MemoryEstimate:
    """``est`` as it is for a model on one device; for a spread one, with every device's share (each
    device's weights and ``beyond_weights(layout, device, its layers)``), its device, weights and
    total those of the largest peak. ``weights``: the weights' bytes in the planned dtype."""
    layout = _layout(model, device_map, weights / max(1, weights_bytes(model)) if dtype else 1.0)
    if layout is None:
        return est
    peaks = []
    for dev in layout.devices:
        n = layout.layers.get(dev, 0)
        own = layout.weights.get(dev, 0)
        peaks.append(DevicePeak(dev, own, int(own + beyond_weights(layout, dev, n)), n))
    top = max(peaks, key=lambda p: p.total)
    return dataclasses.replace(
        est, device=top.device, weights=top.weights, total=top.total, devices=tuple(peaks)
    )


def estimate_decode(
    model: LoadedModel,
    *,
    prompt_len: int,
    max_new_tokens: int,
    dtype: torch.dtype | None = None,
    device_map: Mapping[str, str] | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of :func:`probe.decode.greedy_decode` (or a KV-cached ``generate``)
    of one prompt: the weights, the KV cache of every layer at its final length, and the larger of
    one prefill layer's tensors (as :func:`estimate_capture` counts them, plus the layer's queries,
    keys and values) and the float32 logits of one position. Sliding-window layers are counted at
    full length (an overestimate where the cache keeps only the window). A model spread by a device
    map is planned device by device, each holding its weights and its layers' KV cache."""
    if prompt_len < 1 or max_new_tokens < 0:
        raise ConfigError("prompt_len must be >= 1 and max_new_tokens >= 0")
    dt, s, weights, d_ff, vocab = _sizes(model, dtype, None)
    T, total_len = prompt_len, prompt_len + max_new_tokens
    H, L, D, d, kv = model.n_heads, model.n_layers, model.d_model, model.d_head, model.n_kv_heads
    cache = 2 * L * kv * total_len * d * s
    activations = ACT_COPIES * T * D * s + MLP_COPIES * T * d_ff * s
    attention = T * (H + 2 * kv) * d * s  # the layer's queries, keys and values (SDPA's are fused)
    attention += _capped_bytes(model, 1, T, s)
    if _window_mask(model, T):
        attention += T * T  # the sliding window's boolean mask
    logits = vocab * 4
    total = weights + cache + max(activations + attention, logits)
    est = MemoryEstimate(
        weights=int(weights),
        activations=int(activations),
        attention=int(attention),
        reducers=0,
        cache=int(cache),
        total=int(total),
        logits=int(logits),
        mode="decode",
        batch_size=1,
        seq_len=total_len,
        device=str(model.device),
        dtype=str(dt).removeprefix("torch."),
    )

    def beyond_weights(layout: _Layout, dev: str, n: int) -> float:
        phase = max(activations + attention if n else 0, logits if dev == layout.output else 0)
        return cache * n // max(1, L) + phase

    return _per_device(est, model, device_map, dtype, weights, beyond_weights)


def over_budget(
    est: MemoryEstimate, fraction: float, seen: dict[str, int] | None = None
) -> tuple[int, str, int, int]:
    """How far ``est`` is over its budget (``fraction`` of the available memory) on the device where
    it is furthest over (a negative excess: it fits), with that device, what is available there and
    its budget. Every device of a spread model counts. ``seen`` keeps each device's available memory
    across the calls of one plan (read once)."""
    shares = est.devices or (DevicePeak(est.device, est.weights, est.total),)
    seen = {} if seen is None else seen
    worst: tuple[int, str, int, int] | None = None
    for share in shares:
        if share.device not in seen:
            seen[share.device] = available_memory(share.device)
        available = seen[share.device]
        budget = int(fraction * available)
        row = (share.transient - budget, share.device, available, budget)
        worst = row if worst is None or row[0] > worst[0] else worst
    assert worst is not None
    return worst


def check_decode_fits(
    model: LoadedModel, *, prompt_len: int, max_new_tokens: int, budget_fraction: float = 0.9
) -> MemoryEstimate:
    """Refuse, before the prefill, a decode whose :func:`estimate_decode` does not fit
    ``budget_fraction`` of :func:`available_memory`, with a :class:`MemoryBudgetError` naming the
    longest prompt that fits; else return the estimate."""
    est = estimate_decode(model, prompt_len=prompt_len, max_new_tokens=max_new_tokens)
    seen: dict[str, int] = {}
    excess, device, available, budget = over_budget(est, budget_fraction, seen)
    if excess <= 0:
        return est

    def need(t: int) -> int:
        alt = estimate_decode(model, prompt_len=t, max_new_tokens=max_new_tokens)
        return over_budget(alt, budget_fraction, seen)[0]

    longest = _largest_fitting(need, 0, prompt_len - 1, max(1, prompt_len // 256))
    fixes = [f"a prompt of at most {longest} tokens" if longest else "a much shorter prompt"]
    if model.dtype == torch.float32:
        fixes.append("the model loaded with dtype='bfloat16' (half the weights and KV cache)")
    fixes.append("more GPUs in the device map" if est.devices else "a device with more free memory")
    raise MemoryBudgetError(
        f"not enough memory: {est.describe()}; the decode needs ~{format_bytes(transient_on(est, device))} on "
        f"top of the weights, but {format_bytes(available)} is available on {device} and the budget is "
        f"{budget_fraction:.0%} of it ({format_bytes(budget)}). To fit, use " + "; or ".join(fixes) + "."
    )


def transient_on(est: MemoryEstimate, device: str) -> int:
    """What ``est`` needs on ``device`` beyond the weights already there."""
    return next((p.transient for p in est.devices if p.device == device), est.transient)


# ---------------------------------------------------------------------------------------- planning


def _largest_fitting(cost: Callable[[int], int], budget: int, hi: int, step: int = 1) -> int | None:
    """Largest ``x`` in ``step, 2·step, …, hi`` such that ``cost(y) <= budget`` for every ``y <= x``.

    The estimate is not monotone everywhere (on the CPU a block that crosses the mmap threshold
    stops counting heap slack), so a larger batch may look cheaper than a smaller one; a plan never
    relies on that: it stops at the first size that does not fit.
    """
    best = None
    for x in range(step, hi + 1, step):
        if cost(x) > budget:
            break
        best = x
    return best


def plan_batch_size(
    model: LoadedModel,
    *,
    n_sequences: int,
    seq_len: int,
    reducers: Sequence[PatternReducer] = (),
    mode: Mode = "eager",
    query_block: int = 512,
    requested_batch: int = 8,
    budget_fraction: float = 0.8,
) -> int:
    """The largest batch size ``<= requested_batch`` whose estimate fits the memory budget.

    The budget is ``budget_fraction × available_memory(model.device)``; the weights are already
    resident, so what must fit is :attr:`MemoryEstimate.transient`; on a model spread by a device
    map, each device's share against that device's memory (:func:`over_budget`). A smaller batch only
    means more chunks: results are the same. Raises :class:`MemoryBudgetError` (a :class:`ConfigError`) when
    even one sequence does not fit; the message gives the estimate, the memory available and what
    to change.
    """
    if n_sequences < 1 or requested_batch < 1:
        raise ConfigError("n_sequences and requested_batch must be >= 1")
    if not 0 < budget_fraction <= 1:
        raise ConfigError(f"budget_fraction must be in (0, 1] (got {budget_fraction})")
    weights = weights_bytes(model)
    seen: dict[str, int] = {}  # each device's available memory, read once

    def need(batch: int, **over: Any) -> MemoryEstimate:
        kwargs: dict[str, Any] = dict(
            batch_size=batch,
            seq_len=seq_len,
            reducers=reducers,
            mode=mode,
            query_block=query_block,
            n_sequences=n_sequences,
            weights=weights,
        )
        kwargs.update(over)
        return estimate_capture(model, **kwargs)

    def excess(est: MemoryEstimate) -> int:
        return over_budget(est, budget_fraction, seen)[0]

    best = _largest_fitting(lambda b: excess(need(b)), 0, min(requested_batch, n_sequences))
    if best is not None:
        return best
    worst = over_budget(need(1), budget_fraction, seen)
    raise MemoryBudgetError(_advice(model, need(1), need, excess, worst, budget_fraction))


def _advice(
    model: LoadedModel,
    est: MemoryEstimate,
    need: Callable[..., MemoryEstimate],
    excess: Callable[[MemoryEstimate], int],
    worst: tuple[int, str, int, int],
    fraction: float,
) -> str:
    """What to change when even one sequence does not fit; ``worst``: :func:`over_budget` of ``est``."""
    _, device, available, budget = worst
    fixes: list[str] = []
    if est.reducers > budget // 2:
        fixes.append(
            f"fewer sequences per run, or reducers that keep less (they hold ~{format_bytes(est.reducers)})"
        )
    step = max(1, est.seq_len // 256)  # a few hundred estimates at most
    longest = _largest_fitting(lambda t: excess(need(1, seq_len=t)), 0, est.seq_len - 1, step)
    if longest is not None:
        fixes.append(f"a shorter seq_len (at most {longest} tokens fits)")
    for q in (est.query_block, 256, 128, 64, 32):
        if est.mode == "recompute" and q >= est.query_block:
            continue
        alt = need(1, mode="recompute", query_block=q)
        if excess(alt) <= 0:
            what = "a smaller query_block" if est.mode == "recompute" else "mode='recompute'"
            fixes.append(f"{what} with query_block={q} (~{format_bytes(transient_on(alt, device))})")
            break
    if model.dtype == torch.float32:
        alt = need(1, dtype=torch.bfloat16)
        verdict = "fits" if excess(alt) <= 0 else "still too much"
        fixes.append(
            f"load the model with dtype='bfloat16' (~{format_bytes(transient_on(alt, device))}: {verdict}; "
            "the attention rows stay float32)"
        )
    if est.devices:
        fixes.append("more GPUs in the device map (--device-map balanced spreads the layers evenly)")
    else:
        where = "a GPU (device='cuda')" if model.device.type != "cuda" else "a GPU"
        fixes.append(f"{where} with more free memory, or fewer processes sharing this one")
    return (
        f"not enough memory: {est.describe()}; the capture needs ~{format_bytes(transient_on(est, device))} "
        f"on top of the weights, but {format_bytes(available)} is available on {device} and the budget is "
        f"{fraction:.0%} of it ({format_bytes(budget)}). To fit, use " + "; or ".join(fixes) + "."
    )
