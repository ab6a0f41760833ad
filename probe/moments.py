"""Attention moments: the census statistics of a layer from its queries and keys, without any T×T tensor.

Every row statistic the reducers need (entropy, mean key position, the diagonals ``p[t, t - o]``)
and the column sums are moments of the softmax rows: :func:`attention_moments` computes them from
queries and keys under the causal, padding and sliding-window masks, :func:`pattern_moments` from
patterns that already exist. On CUDA the Triton kernels of :mod:`probe.moments_triton` do it with
scores kept in registers; elsewhere (and as their reference) a PyTorch path over blocks of query
rows. A capture writes every layer's moments into one :class:`MomentStack`.

See docs/capture.md (attention moments).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from probe import moments_single, moments_triton
from probe.moments_single import launch_lse_moments
from probe.moments_triton import (
    HAVE_TRITON,
    KERNEL_ERRORS,
    launch_moments,
    launch_pattern_moments,
    length_key,
)

_T = TypeVar("_T")

__all__ = [
    "HAVE_TRITON",
    "AttentionMoments",
    "MomentStack",
    "attention_moments",
    "pattern_moments",
    "triton_available",
]


@dataclass
class AttentionMoments:
    """Moments of one layer's attention rows for a batch; all ``[b, H, T]`` float32.

    Rows of padding queries hold zeros; ``colsum`` counts real queries only.
    """

    entropy: torch.Tensor
    mean_key: torch.Tensor
    colsum: torch.Tensor
    diagonals: dict[int, torch.Tensor]  # offset -> p[t, t - offset] (0 where t - offset is no real key)

    def to(self, device: torch.device) -> AttentionMoments:
        """These moments on ``device`` (the same object when they are there already)."""
        if self.entropy.device == device:
            return self
        diagonals = {o: d.to(device) for o, d in self.diagonals.items()}
        return AttentionMoments(
            self.entropy.to(device), self.mean_key.to(device), self.colsum.to(device), diagonals
        )

    def differences(self, reference: AttentionMoments) -> dict[str, float]:
        """The largest difference from ``reference`` of each field: entropy, mean key and column
        sums relative to ``max(1, |reference|)``; each of the reference's diagonals (``diag{o}``),
        absolute (they are probabilities)."""
        out = {
            f: ((getattr(self, f) - getattr(reference, f)).abs() / getattr(reference, f).abs().clamp_min(1.0))
            .max()
            .item()
            for f in ("entropy", "mean_key", "colsum")
        }
        for o in reference.diagonals:
            out[f"diag{o}"] = (self.diag(o) - reference.diag(o)).abs().max().item()
        return out

    def diag(self, offset: int) -> torch.Tensor:
        if offset not in self.diagonals:
            raise KeyError(f"diagonal {offset} was not computed; pass it in diag_offsets")
        return self.diagonals[offset]


class MomentStack:
    """The moments of every layer of one batch, written in place layer by layer.

    Each layer's moments live on the device that layer computes on (``layer_devices``; ``device``
    for every layer by default), so a model spread over several GPUs writes them where its kernels
    run: one ``[n, b, H, T]`` tensor per device and statistic for that device's ``n`` layers, and
    ``[n, n_diag, b, H, T]`` diagonals in the order of ``offsets``. A capture hands :meth:`stacked`
    (every layer, ``[L, ...]``, gathered on ``device``) to its reducers once the forward is done, so
    the per-layer work during the forward is the kernels alone.
    """

    def __init__(
        self,
        n_layers: int,
        b: int,
        H: int,
        T: int,
        offsets: tuple[int, ...],
        device: torch.device,
        layer_devices: list[torch.device] | None = None,
    ) -> None:
        self.offsets = tuple(sorted(set(offsets)))
        self.device = torch.device(device)
        devices = (
            [self.device] * n_layers if layer_devices is None else [torch.device(d) for d in layer_devices]
        )
        if len(devices) != n_layers:
            raise ValueError(f"{len(devices)} layer devices given for {n_layers} layers")
        groups: dict[torch.device, list[int]] = {}
        for layer, dev in enumerate(devices):
            groups.setdefault(dev, []).append(layer)
        self.n_layers = n_layers
        self._parts: list[tuple[list[int], list[torch.Tensor]]] = []
        self._where: dict[int, tuple[int, int]] = {}  # layer -> (part, row)
        n_diag = max(1, len(self.offsets))
        for dev, layers in groups.items():
            shape = (len(layers), b, H, T)
            tensors = [torch.zeros(shape, device=dev) for _ in range(3)]
            tensors.append(torch.zeros((len(layers), n_diag, b, H, T), device=dev))
            for row, layer in enumerate(layers):
                self._where[layer] = (len(self._parts), row)
            self._parts.append((layers, tensors))

    @staticmethod
    def bytes_needed(n_layers: int, b: int, H: int, T: int, n_offsets: int) -> int:
        return 4 * n_layers * b * H * T * (3 + max(1, n_offsets))

    @property
    def devices(self) -> list[torch.device]:
        """The devices holding some layer's moments."""
        return [part[1][0].device for part in self._parts]

    def outputs(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s entropy, mean key, column sums ``[b, H, T]`` and diagonals ``[n_diag, b, H, T]``,
        on the layer's device, for a kernel to write into."""
        part, row = self._where[i]
        entropy, mean_key, colsum, diag = self._parts[part][1]
        return entropy[row], mean_key[row], colsum[row], diag[row]

    def layer(self, i: int) -> AttentionMoments:
        entropy, mean_key, colsum, diag = self.outputs(i)
        diagonals = {o: diag[j] for j, o in enumerate(self.offsets)}
        return AttentionMoments(entropy, mean_key, colsum, diagonals)

    def _field(self, k: int) -> torch.Tensor:
        """Field ``k`` (entropy, mean key, column sums ``[L, b, H, T]``, diagonals ``[L, n_diag, b, H,
        T]``) on ``device``: a view when one part on ``device`` holds every layer, else gathered in
        layer order."""
        first = self._parts[0][1][k]
        if len(self._parts) == 1 and first.device == self.device:
            return first
        out = torch.empty((self.n_layers, *first.shape[1:]), device=self.device)
        for part_layers, part_tensors in self._parts:
            index = torch.tensor(part_layers, device=self.device)
            out.index_copy_(0, index, part_tensors[k].to(self.device, non_blocking=True))
        return out

    @property
    def entropy(self) -> torch.Tensor:
        return self._field(0)

    @property
    def mean_key(self) -> torch.Tensor:
        return self._field(1)

    @property
    def colsum(self) -> torch.Tensor:
        return self._field(2)

    @property
    def diag(self) -> torch.Tensor:
        return self._field(3)

    def stacked(self) -> AttentionMoments:
        """Every layer's moments ``[L, ...]`` on ``device`` (gathered from every device holding some)."""
        entropy, mean_key, colsum, diag = (self._field(k) for k in range(4))
        diagonals = {o: diag[:, j] for j, o in enumerate(self.offsets)}
        return AttentionMoments(entropy, mean_key, colsum, diagonals)


def _pads(pad_offsets: torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor:
    if pad_offsets is None:
        return torch.zeros(b, dtype=torch.int32, device=device)
    return pad_offsets.to(device=device, dtype=torch.int32)


def attention_moments(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    pad_offsets: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    diag_offsets: tuple[int, ...] = (),
    block: int = 256,
    use_triton: bool | None = None,
    out: tuple[MomentStack, int] | None = None,
    lse: torch.Tensor | None = None,
) -> AttentionMoments:
    """Moments of ``softmax(scale · q kᵀ)`` under the causal, padding and sliding-window masks.

    ``lse``: the rows' log-sum-exp ``[b, H, T]`` (natural units) of plain causal attention — no
    padding, no window shorter than the sequence, no cap — as the forward's own attention kernel
    returns it. The Triton path then needs one pass over the scores instead of two (the first only
    finds this normaliser). The caller vouches for the conditions; the torch path ignores it.

    ``softcap``: the scores are ``cap · tanh(scale · q kᵀ / cap)`` (Gemma 2), in the two-pass Triton
    kernels as in the torch path (a given ``lse`` is then not used). With ``out=(stack, layer)`` the
    moments are written into that layer of a :class:`MomentStack` (made with the same
    ``diag_offsets``) and its views are returned. ``use_triton=None`` chooses the Triton kernels on
    CUDA and falls back, with a warning, where one fails (see :data:`KERNEL_FAILED`); ``True``
    insists, and a failing kernel raises.
    """
    b, H, _T, d = query.shape
    if H % key.shape[1]:
        raise ValueError(f"{H} query heads cannot share {key.shape[1]} KV heads")
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    pads = _pads(pad_offsets, b, query.device)
    offsets = tuple(sorted(set(diag_offsets)))
    auto = use_triton is None
    if auto:
        failed = "moments" in KERNEL_FAILED or (softcap is not None and "capped" in KERNEL_FAILED)
        use_triton = triton_available(query) and not failed
    if out is not None and out[0].offsets != offsets:
        raise ValueError(
            f"the moment stack holds diagonals {list(out[0].offsets)} but {list(offsets)} were asked for; "
            "build the MomentStack with the same diag_offsets"
        )
    if use_triton:
        got = _guarded(
            "moments" if softcap is None else "capped",
            not auto,
            lambda: _moments_triton(
                query, key, scale, pads, sliding_window, offsets, out, lse, softcap, strict=not auto
            ),
        )
        if got is not None:
            return got
    moments = _moments_torch(query, key, scale, pads, sliding_window, offsets, block, softcap)
    if out is None:
        return moments
    target = out[0].layer(out[1])
    target.entropy.copy_(moments.entropy)
    target.mean_key.copy_(moments.mean_key)
    target.colsum.copy_(moments.colsum)
    for o in offsets:
        target.diagonals[o].copy_(moments.diagonals[o])
    return target


def pattern_moments(
    pattern: torch.Tensor,
    *,
    pad_offsets: torch.Tensor | None = None,
    diag_offsets: tuple[int, ...] = (),
    use_triton: bool | None = None,
) -> AttentionMoments:
    """The same moments read from post-softmax patterns ``[b, H, T, T]`` (keys above the diagonal
    and padding keys are ignored; rows of padding queries give zeros)."""
    b = pattern.shape[0]
    pads = _pads(pad_offsets, b, pattern.device)
    offsets = tuple(sorted(set(diag_offsets)))
    auto = use_triton is None
    if auto:
        use_triton = cuda_triton(pattern) and "pattern" not in KERNEL_FAILED
    if use_triton:
        got = _guarded("pattern", not auto, lambda: _pattern_triton(pattern, pads, offsets, strict=not auto))
        if got is not None:
            return got
    return _pattern_torch(pattern, pads, offsets)


KERNEL_FAILED: dict[str, str] = {}
"""Triton kernels ("moments": the two passes, "capped": the two passes with a soft cap, "single":
the single pass, "pattern") that failed to build, run or pass their first-use check in this
process, with why; the automatic choice does not try them again."""


class KernelDisagrees(RuntimeError):
    """A Triton kernel's first result of a kind disagrees with its reference (see :func:`_check_once`)."""


CHECK_TOL = 1e-3  # largest relative difference (to at least 1) a kernel's first result may show
_CHECKED: set[tuple[object, ...]] = set()


def _check_once(
    kind: tuple[object, ...], got: AttentionMoments, reference: Callable[[], AttentionMoments], what: str
) -> None:
    """The first result of each kind of call (kernel, dtype, head width, length bucket, device) is
    compared, on one head group of one sequence, with a reference already trusted: a kernel that
    builds but computes wrongly on this GPU (which Triton's interpreter, used by the tests, cannot
    show) raises :class:`KernelDisagrees` instead of giving wrong numbers."""
    if kind in _CHECKED:
        return
    worst = max(got.differences(reference()).values())
    if not worst <= CHECK_TOL:
        raise KernelDisagrees(f"its first result differs from {what} by {worst:.2g}")
    _CHECKED.add(kind)


def _two_passes(query: torch.Tensor, key: torch.Tensor, scale: float, pads: torch.Tensor) -> AttentionMoments:
    """The two-pass kernels' moments (no window, no cap, no diagonal): the single pass's reference."""
    b, H, T, _ = query.shape
    lse, ent, mk, col = (torch.empty(b, H, T, device=query.device, dtype=torch.float32) for _ in range(4))
    diag = torch.empty((1, b, H, T), device=query.device, dtype=torch.float32)
    # through the module, not this module's name: a caller counting the layers' launches of
    # launch_moments (benchmarks/scale.py) does not count this check
    moments_triton.launch_moments(query, key, scale, pads, None, (), (lse, ent, mk, col, diag))
    return AttentionMoments(ent, mk, col, {})


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _guarded(
    which: str, strict: bool, run: Callable[[], _T], narrow: Callable[[str], bool] | None = None
) -> _T | None:
    """``run()``, or None when the Triton kernel ``which`` it runs fails to build or launch, or its
    first-use check disagrees: recorded in :data:`KERNEL_FAILED` with a warning (once), so that the
    caller takes the slower path, which computes the same numbers. Out of memory is no kernel
    failure; with ``strict`` (kernels asked for by name) the failure is the answer: raised. A kernel
    with a ``narrow`` (drop its newest configurations, say why; False when nothing is left to drop)
    is first run once more over the configurations that remain."""
    try:
        return run()
    except torch.OutOfMemoryError:
        raise
    except KERNEL_ERRORS as err:
        if narrow is not None and narrow(_why(err)):
            return _guarded(which, strict, run)
        if strict:
            raise
        KERNEL_FAILED[which] = _why(err)
        instead = "in two passes" if which == "single" else "by the PyTorch path"
        warnings.warn(
            f"the Triton {which} kernel failed ({KERNEL_FAILED[which]}); the attention statistics are "
            f"computed {instead} instead (the same numbers, slower)",
            stacklevel=2,
        )
        return None


def cuda_triton(tensor: torch.Tensor) -> bool:
    """Whether Triton kernels can run on ``tensor``'s device."""
    return HAVE_TRITON and tensor.is_cuda


def triton_available(tensor: torch.Tensor) -> bool:
    """Whether the moment kernels can run on queries ``tensor`` (on CUDA, a supported head width)."""
    return cuda_triton(tensor) and tensor.shape[-1] in (16, 32, 64, 128, 256)


# ------------------------------------------------------------------------------------ torch path


def _masks(pads: torch.Tensor, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(T, device=device)
    real = idx[None, :] >= pads[:, None].long()  # [b, T]
    return idx, real


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``cap · tanh(scores / cap)`` (in place), or the scores themselves without a cap."""
    if softcap is None:
        return scores
    return scores.div_(softcap).tanh_().mul_(softcap)


def _diag_from_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    lse: torch.Tensor,
    pads: torch.Tensor,
    offset: int,
    window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    _b, H, T, _ = query.shape
    group = H // key.shape[1]
    idx, real = _masks(pads, T, query.device)
    src = (idx - offset).clamp_min(0)
    k = key[:, :, src].float()
    k = k.repeat_interleave(group, dim=1) if group > 1 else k
    p = torch.exp(_capped((query.float() * k).sum(-1) * scale, softcap) - lse)
    ok = real[:, None, :] & (idx - offset >= 0)[None, None, :] & real[:, src][:, None, :]
    if window is not None and offset >= window:  # the key is outside every query's window
        ok = torch.zeros_like(ok)
    return torch.where(ok, p, torch.zeros_like(p))


def _moments_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    pads: torch.Tensor,
    window: int | None,
    offsets: tuple[int, ...],
    block: int,
    softcap: float | None = None,
) -> AttentionMoments:
    b, H, T, _ = query.shape
    group = H // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1) if group > 1 else key.float()
    k_t = k.transpose(-1, -2)
    dev = query.device
    key_idx, key_real = _masks(pads, T, dev)
    lse = torch.zeros(b, H, T, device=dev)
    entropy, mean_key, colsum = torch.zeros_like(lse), torch.zeros_like(lse), torch.zeros_like(lse)
    key_pos = key_idx.float()
    for q0 in range(0, T, block):
        q1 = min(T, q0 + block)
        # only the keys some query of the block can see: up to its last query, from its window's start
        k0 = 0 if window is None else max(0, q0 - window + 1)
        q_idx, k_idx = key_idx[q0:q1], key_idx[k0:q1]
        allowed = k_idx[None, :] <= q_idx[:, None]
        if window is not None:
            allowed = allowed & (k_idx[None, :] > q_idx[:, None] - window)
        allowed = allowed[None] & key_real[:, None, k0:q1] & key_real[:, q0:q1, None]  # [b, q, k]
        blocked = ~allowed[:, None]
        s = _capped(torch.matmul(query[:, :, q0:q1].float(), k_t[..., k0:q1]).mul_(scale), softcap)
        s.masked_fill_(blocked, float("-inf"))
        blk_lse = torch.logsumexp(s, dim=-1)  # -inf for padding queries
        finite = torch.isfinite(blk_lse)
        safe_lse = torch.where(finite, blk_lse, torch.zeros_like(blk_lse))
        p = torch.exp(s - safe_lse[..., None])  # exactly 0 where masked (exp of -inf)
        lse[:, :, q0:q1] = safe_lse
        expected_s = (p * s.masked_fill_(blocked, 0.0)).sum(-1)
        entropy[:, :, q0:q1] = torch.where(finite, safe_lse - expected_s, torch.zeros_like(expected_s))
        mean_key[:, :, q0:q1] = torch.matmul(p, key_pos[k0:q1])
        colsum[..., k0:q1] += p.sum(2)
    diagonals = {o: _diag_from_scores(query, key, scale, lse, pads, o, window, softcap) for o in offsets}
    return AttentionMoments(entropy, mean_key, colsum, diagonals)


PATTERN_BLOCK_ELEMENTS = 1 << 25  # float32 elements of the rows the PyTorch path forms at a time


def _pattern_torch(pattern: torch.Tensor, pads: torch.Tensor, offsets: tuple[int, ...]) -> AttentionMoments:
    """The PyTorch path of :func:`pattern_moments`, over blocks of query rows (float32 copies of
    at most :data:`PATTERN_BLOCK_ELEMENTS` at a time, so a long pattern needs no [T, T] copy)."""
    b, H, T, _ = pattern.shape
    idx, real = _masks(pads, T, pattern.device)
    rows = max(1, PATTERN_BLOCK_ELEMENTS // max(1, b * H * T))
    entropy, mean_key = (torch.empty(b, H, T, device=pattern.device, dtype=torch.float32) for _ in range(2))
    colsum = torch.zeros(b, H, T, device=pattern.device, dtype=torch.float32)
    diagonals = {o: torch.empty(b, H, T, device=pattern.device, dtype=torch.float32) for o in offsets}
    zero = torch.zeros((), device=pattern.device)
    for lo in range(0, T, rows):
        hi = min(T, lo + rows)
        q_idx = idx[lo:hi]
        visible = (
            (idx[None, :] <= q_idx[:, None])[None] & real[:, None, :] & real[:, lo:hi, None]
        )  # [b, q, k]
        p = torch.where(visible[:, None], pattern[:, :, lo:hi].float(), zero)
        entropy[..., lo:hi] = torch.special.entr(p).sum(-1)
        mean_key[..., lo:hi] = torch.matmul(p, idx.float())
        colsum += p.sum(2)
        for o in offsets:
            src = (q_idx - o).clamp_min(0)
            picked = p.gather(3, src.view(1, 1, hi - lo, 1).expand(b, H, hi - lo, 1))[..., 0]
            diagonals[o][..., lo:hi] = torch.where((q_idx - o >= 0)[None, None, :], picked, zero)
    return AttentionMoments(entropy, mean_key, colsum, diagonals)


# ----------------------------------------------------------------------------------- triton path


def _on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The CUDA device ``device`` made current (kernels of a layer on another GPU of a split model
    must launch there), or nothing off CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _moments_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    pads: torch.Tensor,
    window: int | None,
    offsets: tuple[int, ...],
    out: tuple[MomentStack, int] | None = None,
    given_lse: torch.Tensor | None = None,
    softcap: float | None = None,
    strict: bool = False,
) -> AttentionMoments:
    b, H, T, _d = query.shape
    if key.dtype != query.dtype:
        key = key.to(query.dtype)
    if softcap is not None or ("single" in KERNEL_FAILED and not strict):  # the single pass does not cap
        given_lse = None
    lse = torch.empty(b, H, T, device=query.device, dtype=torch.float32) if given_lse is None else given_lse
    in_kernel = offsets[:4]  # up to four diagonals ride along in the row kernel
    if out is None:
        ent, mk, col = torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(lse)
        diag = torch.empty((max(1, len(in_kernel)), b, H, T), device=query.device, dtype=torch.float32)
    else:  # written in place into the stack's layer (on the layer's device)
        ent, mk, col, diag = out[0].outputs(out[1])
        if ent.device != query.device:
            raise ValueError(
                f"the moment stack keeps this layer on {ent.device} but its queries are on {query.device}; "
                "build the MomentStack with the model's layer devices"
            )
    g = H // key.shape[1]  # the first KV head's query heads of the first sequence: the first-use check
    with _on(query.device):  # Triton launches on the current CUDA device: the layer's own
        if given_lse is not None:

            def single() -> bool:
                launch_lse_moments(query, key, scale, lse, in_kernel, (ent, mk, col, diag))
                if not strict:
                    _check_once(
                        ("single", query.dtype, _d, length_key(T), str(query.device)),
                        AttentionMoments(ent[:1, :g], mk[:1, :g], col[:1, :g], {}),
                        lambda: _two_passes(query[:1, :g], key[:1, :1], scale, pads[:1]),
                        "the two-pass kernels",
                    )
                return True

            if (
                _guarded("single", strict, single, moments_single.narrow) is None
            ):  # the two passes, from now on
                given_lse, lse = None, torch.empty_like(lse)
        if given_lse is None:
            launch_moments(query, key, scale, pads, window, in_kernel, (lse, ent, mk, col, diag), softcap)
            if softcap is not None and not strict:
                _check_once(
                    (
                        "capped",
                        query.dtype,
                        _d,
                        length_key(T),
                        window is not None and window < T,
                        str(query.device),
                    ),
                    AttentionMoments(ent[:1, :g], mk[:1, :g], col[:1, :g], {}),
                    lambda: _moments_torch(
                        query[:1, :g], key[:1, :1], scale, pads[:1], window, (), 1024, softcap
                    ),
                    "the PyTorch path",
                )
    diagonals = {o: diag[j] for j, o in enumerate(in_kernel)}
    for j, o in enumerate(offsets[4:], start=4):
        values = _diag_from_scores(query, key, scale, lse, pads, o, window, softcap)
        diagonals[o] = values if out is None else diag[j].copy_(values)
    return AttentionMoments(ent, mk, col, diagonals)


def _pattern_triton(
    pattern: torch.Tensor, pads: torch.Tensor, offsets: tuple[int, ...], strict: bool = False
) -> AttentionMoments:
    b, H, T, _ = pattern.shape
    ent = torch.empty(b, H, T, device=pattern.device, dtype=torch.float32)
    mk, col = torch.empty_like(ent), torch.zeros_like(ent)
    with _on(pattern.device):
        launch_pattern_moments(pattern, pads, (ent, mk, col))
    if not strict:  # the reference forms rows in blocks: any length is checked
        _check_once(
            ("pattern", pattern.dtype, length_key(T), str(pattern.device)),
            AttentionMoments(ent[:1, :1], mk[:1, :1], col[:1, :1], {}),
            lambda: _pattern_torch(pattern[:1, :1], pads[:1], ()),
            "the PyTorch path",
        )
    idx = torch.arange(T, device=pattern.device)
    diagonals = {}
    for o in offsets:
        src = (idx - o).clamp_min(0)
        picked = pattern.gather(3, src.view(1, 1, T, 1).expand(b, H, T, 1))[..., 0].float()
        ok = (idx - o >= 0)[None, None, :] & (src[None, :] >= pads[:, None].long())[:, None, :]
        diagonals[o] = torch.where(ok, picked, torch.zeros_like(picked))
    return AttentionMoments(ent, mk, col, diagonals)
