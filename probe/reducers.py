"""Reducers: per-head statistics computed from attention rows inside the hook.

A reducer sees the post-softmax rows of one layer as they are produced (all at once in eager mode,
in blocks of query rows in recompute mode), adds them into accumulators of size
``O(batch × heads × T)`` or less, and turns those into per-sample, per-head numbers when the batch
is done; every reducer is additive over query blocks. Sequences are left-padded and positions are
reported as real positions. Afterwards ``reducer.result()`` has a leading sample dimension.

See docs/capture.md (reducers) for the definitions and references.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from probe.moments import AttentionMoments

_NAN = float("nan")


@dataclass
class BatchInfo:
    """What reducers need to know about the batch whose rows they see."""

    lengths: torch.Tensor  # [b] real lengths (long, on the model's device)
    pad_offsets: torch.Tensor  # [b] index of the first real token
    T: int  # padded length
    n_layers: int
    n_heads: int
    # masks are the same for every layer of a batch: computed once (keeps per-layer launches few)
    _masks: dict[tuple[object, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def cached_mask(self, key: tuple[object, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._masks:
            self._masks[key] = make()
        return self._masks[key]

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def query_positions(self, q_start: int, q_len: int) -> torch.Tensor:
        """Real positions of the query rows [q_start, q_start+q_len): [b, q] (negative = padding)."""
        q = torch.arange(q_start, q_start + q_len, device=self.lengths.device)
        return q[None, :] - self.pad_offsets[:, None]

    def key_positions(self) -> torch.Tensor:
        """Real positions of all keys: [b, T] (negative = padding)."""
        k = torch.arange(self.T, device=self.lengths.device)
        return k[None, :] - self.pad_offsets[:, None]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Copy a result to the CPU; from a GPU through pinned memory (a pageable copy of a [b, L, H, T]
    result is several times slower)."""
    if not t.is_cuda or t.numel() < 1 << 18:  # small results: a plain copy (pinning costs more)
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host


class PatternReducer:
    """Base class. Subclasses implement :meth:`_start`, :meth:`update`, :meth:`_finish`.

    ``update(layer, rows, q_start)`` receives ``rows`` of shape ``[b, heads, q, T]`` (float32,
    post-softmax) for query rows ``q_start … q_start+q-1`` of ``layer``.
    """

    name = "reducer"

    def __init__(self) -> None:
        self._results: list[torch.Tensor] = []
        self.info: BatchInfo | None = None

    # --- lifecycle, driven by probe.capture
    def begin_batch(self, info: BatchInfo) -> None:
        self.info = info
        self._start(info)

    def end_batch(self) -> None:
        assert self.info is not None
        self._results.append(_to_host(self._finish(self.info).float()))
        self.info = None

    def result(self) -> torch.Tensor:
        """Per-sample results of every batch so far, concatenated on the sample dimension."""
        if not self._results:
            raise RuntimeError(f"reducer {self.name} saw no batch")
        if len({r.shape[1:] for r in self._results}) > 1:  # [.., T] results of batches of different T
            width = max(r.shape[-1] for r in self._results)
            padded = [torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=_NAN) for r in self._results]
            return torch.cat(padded)
        return torch.cat(self._results)

    def state_bytes(self, batch: int, T: int, n_layers: int, n_heads: int) -> int:
        """Bytes this reducer keeps on the device while a batch runs (for the memory budget)."""
        return 4 * batch * n_layers * n_heads * 2

    supports_moments = False  # True where update_moments is implemented
    # True where update_moments also takes ``layer=slice(None)`` with every layer's moments stacked
    # ([L, b, H, T]): a recompute capture then calls it once per batch instead of once per layer
    stacked_moments = False
    diag_offsets: tuple[int, ...] = ()  # diagonals p[t, t - o] that update_moments reads

    def update_moments(self, layer: int | slice, moments: AttentionMoments) -> None:
        """Update from a layer's attention moments (all queries at once) instead of its rows."""
        raise NotImplementedError(f"{self.name} needs the attention rows themselves")

    # --- to implement
    def _start(self, info: BatchInfo) -> None:
        raise NotImplementedError

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        raise NotImplementedError

    def _finish(self, info: BatchInfo) -> torch.Tensor:
        raise NotImplementedError

    # --- shared helpers
    @staticmethod
    def _query_mask(info: BatchInfo, q_start: int, q_len: int, min_pos: int = 0) -> torch.Tensor:
        """[b, q] float mask of real queries at real position >= min_pos."""
        return info.cached_mask(
            ("query", q_start, q_len, min_pos),
            lambda: (info.query_positions(q_start, q_len) >= min_pos).float(),
        )


class _SumCount(PatternReducer):
    """Per (layer, sample, head): a sum of per-query values and a count of queries."""

    def _start(self, info: BatchInfo) -> None:
        dev = info.lengths.device
        self.sums = torch.zeros(info.n_layers, info.batch_size, info.n_heads, device=dev)
        self.counts = torch.zeros(info.n_layers, info.batch_size, 1, device=dev)

    stacked_moments = True

    def _add(self, layer: int | slice, per_query: torch.Tensor, mask: torch.Tensor) -> None:
        """per_query: [b, h, q] values (or [L, b, h, q] for ``layer=slice(None)``); mask: [b, q]."""
        self.sums[layer] += torch.matmul(per_query, mask[:, :, None])[..., 0]
        self.counts[layer] += mask.sum(-1, keepdim=True)

    def _finish(self, info: BatchInfo) -> torch.Tensor:
        mean = self.sums / self.counts.clamp_min(1)
        mean = torch.where(self.counts > 0, mean, torch.full_like(mean, _NAN))
        return mean.permute(1, 0, 2)  # [b, L, H]


class RowEntropy(_SumCount):
    """Mean Shannon entropy (nats) of a head's attention rows.

    Averaged over the real queries that can see at least two keys (real position >= 1): the row of
    the first token is a point mass for every head and says nothing. Low entropy = focused head.
    """

    name = "entropy"

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        assert self.info is not None
        ent = torch.special.entr(rows).sum(-1)  # -sum p log p, [b, h, q]
        self._add(layer, ent, self._query_mask(self.info, q_start, rows.shape[2], min_pos=1))

    supports_moments = True

    def update_moments(self, layer: int | slice, moments: AttentionMoments) -> None:
        assert self.info is not None
        self._add(layer, moments.entropy, self._query_mask(self.info, 0, self.info.T, min_pos=1))


class MeanDistance(_SumCount):
    """Mean attention distance: ``sum_k A[t,k]·(t-k)``, averaged over real queries with position >= 1.

    In token positions (for a ViT the same idea is measured in patch-grid units elsewhere).
    """

    name = "mean_distance"

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        assert self.info is not None
        # sum_k A[t,k](t-k) = t - sum_k A[t,k]·k for a row that sums to one: one matrix-vector product
        q = torch.arange(q_start, q_start + rows.shape[2], device=rows.device, dtype=torch.float32)
        k = torch.arange(rows.shape[3], device=rows.device, dtype=rows.dtype)
        per_query = q - torch.matmul(rows, k).float()
        self._add(layer, per_query, self._query_mask(self.info, q_start, rows.shape[2], min_pos=1))

    supports_moments = True

    def update_moments(self, layer: int | slice, moments: AttentionMoments) -> None:
        assert self.info is not None
        t = torch.arange(self.info.T, device=moments.mean_key.device, dtype=torch.float32)
        self._add(layer, t - moments.mean_key, self._query_mask(self.info, 0, self.info.T, min_pos=1))


class DiagonalScore(_SumCount):
    """Mean attention from query ``t`` to key ``t - offset``, over real queries in a position range.

    ``offset=1`` is the previous-token score. On a sequence ``r r`` made of a random block ``r`` of
    length ``n`` repeated (starting at real position ``start``), queries in the second copy give:
    ``offset=n`` the duplicate-token score (attention to the earlier copy of the same token) and
    ``offset=n-1`` the induction score (attention to the token after the earlier copy).
    Queries count when their real position is in ``[query_from, query_to)`` and ``t - offset``
    is a real position.
    """

    def __init__(
        self, offset: int, *, query_from: int = 0, query_to: int | None = None, name: str = ""
    ) -> None:
        super().__init__()
        if offset < 0:
            raise ValueError("offset must be >= 0")
        self.offset = offset
        self.diag_offsets = (offset,)
        self.query_from = query_from
        self.query_to = query_to
        self.name = name or f"diagonal_{offset}"

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        assert self.info is not None
        b, _h, q_len, _T = rows.shape
        q_abs = torch.arange(q_start, q_start + q_len, device=rows.device)
        key_abs = (q_abs - self.offset).clamp_min(0)  # [q]
        picked = rows.gather(3, key_abs.view(1, 1, q_len, 1).expand(b, rows.shape[1], q_len, 1))[..., 0]
        self._add(layer, picked.float(), self._mask(q_start, q_len))

    def _mask(self, q_start: int, q_len: int) -> torch.Tensor:
        info = self.info
        assert info is not None
        lower = max(self.query_from, self.offset)
        upper = self.query_to if self.query_to is not None else info.T

        def make() -> torch.Tensor:
            pos = info.query_positions(q_start, q_len)  # [b, q]
            return ((pos >= lower) & (pos < upper)).float()

        return info.cached_mask(("diag", q_start, q_len, lower, upper), make)

    supports_moments = True

    def update_moments(self, layer: int | slice, moments: AttentionMoments) -> None:
        assert self.info is not None
        self._add(layer, moments.diag(self.offset), self._mask(0, self.info.T))


class ColumnImportance(PatternReducer):
    """``alpha_k = (sum_{t>=k} A[t,k]) / (T - k)``: mean attention key ``k`` receives from the queries
    that can see it, for every real key position ``k`` (the primitive the sink
    analyses share).

    With padding, ``T`` and ``k`` count real tokens only. Result: ``[n_samples, L, H, T_max]``,
    NaN beyond each sample's length. Keeps ``[L, b, H, T]`` column sums on the device while a batch
    runs: O(heads × T) per layer and sample.
    """

    name = "alpha"

    def _start(self, info: BatchInfo) -> None:
        self.colsum = torch.zeros(
            info.n_layers, info.batch_size, info.n_heads, info.T, device=info.lengths.device
        )

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        assert self.info is not None
        mask = self._query_mask(self.info, q_start, rows.shape[2])  # [b, q]
        self.colsum[layer] += torch.einsum("bhqk,bq->bhk", rows, mask.to(rows.dtype)).float()

    supports_moments = True
    stacked_moments = True

    def update_moments(self, layer: int | slice, moments: AttentionMoments) -> None:
        self.colsum[layer] += moments.colsum  # pad queries are already left out

    def _finish(self, info: BatchInfo) -> torch.Tensor:
        L, b, H, T = self.colsum.shape
        out = torch.full((b, L, H, T), _NAN, device=self.colsum.device)
        for i in range(b):
            off, n = int(info.pad_offsets[i]), int(info.lengths[i])
            denom = torch.arange(n, 0, -1, device=self.colsum.device, dtype=torch.float32)  # T - k
            out[i, :, :, :n] = self.colsum[:, i, :, off:] / denom
        return out

    def state_bytes(self, batch: int, T: int, n_layers: int, n_heads: int) -> int:
        return 4 * n_layers * batch * n_heads * T * 2


class KeepPatterns(PatternReducer):
    """Keep full patterns of the first ``n_samples`` samples (all heads), for display only.

    Stored in float16 on the CPU as ``[n_kept, L, H, T, T]`` in real positions. This is the one
    reducer that is O(T²): use it for a few short examples, never for long contexts.
    """

    name = "patterns"

    def __init__(self, n_samples: int = 2, max_tokens: int = 256) -> None:
        super().__init__()
        self.n_samples = n_samples
        self.max_tokens = max_tokens
        self._seen = 0

    def _start(self, info: BatchInfo) -> None:
        self.keep = max(0, min(self.n_samples - self._seen, info.batch_size))
        T = min(info.T, self.max_tokens)
        self.buf = torch.zeros(self.keep, info.n_layers, info.n_heads, T, T, dtype=torch.float16)

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        assert self.info is not None
        for i in range(self.keep):
            off = int(self.info.pad_offsets[i])
            q0 = max(q_start, off)
            q1 = min(q_start + rows.shape[2], off + self.buf.shape[-1])
            if q1 <= q0:
                continue
            block = rows[i, :, q0 - q_start : q1 - q_start, off : off + self.buf.shape[-1]]
            self.buf[i, layer, :, q0 - off : q1 - off, : block.shape[-1]] = block.to("cpu", torch.float16)

    def _finish(self, info: BatchInfo) -> torch.Tensor:
        self._seen += self.keep
        return self.buf

    def state_bytes(self, batch: int, T: int, n_layers: int, n_heads: int) -> int:
        return 0  # kept on the CPU

    def result(self) -> torch.Tensor:
        kept = [r for r in self._results if r.shape[0] > 0]
        if not kept:
            raise RuntimeError("no patterns kept")
        width = max(r.shape[-1] for r in kept)
        return torch.cat(
            [torch.nn.functional.pad(r, (0, width - r.shape[-1], 0, width - r.shape[-2])) for r in kept]
        )


def entropy_upper_bound(n_keys: int) -> float:
    """Entropy of a uniform row over ``n_keys`` keys (nats): the largest a row can have."""
    return math.log(n_keys)
