"""Attention moments: the census statistics of a layer from its queries and keys, without any T×T tensor.

Background
----------
Every row statistic the census needs is a moment of the softmax row ``p_t = softmax(s_t)`` with
``s_tk = scale · q_t·k_k`` (masked causally, by padding and by a sliding window):

* ``lse_t = log sum_k exp(s_tk)``                       (the normaliser)
* ``entropy_t = lse_t - sum_k p_tk s_tk``               (Shannon entropy, nats)
* ``mean_key_t = sum_k p_tk · k``                       (so mean distance = ``t - mean_key_t``)
* ``p_t,t-o = exp(s_t,t-o - lse_t)``                     (previous-token, induction, duplicate scores)

and the column statistic ``colsum_k = sum_t p_tk`` (the numerator of ``alpha_k``) is one more pass
over the same scores once ``lse`` is known. On a CUDA device two Triton kernels compute them with
flash-attention-style tiling (scores live only in registers: memory O(T) per head, the matrix
products on tensor cores in the model's dtype with float32 accumulation; only the blocks that cross
the diagonal, the padding or a window's edge pay for masks). Elsewhere a PyTorch
implementation computes the same numbers over blocks of query rows; it is also the reference the
kernels are checked against (``benchmarks/moments_check.py`` prints the agreement on a GPU).

A capture writes every layer's moments into one :class:`MomentStack` and hands it to its reducers
once the forward is done, so the work per layer during the forward is the two kernel launches.

When the pattern already exists (eager mode, where interventions may have edited it),
:func:`pattern_moments` computes the same moments by reading each pattern once (one more Triton
kernel on CUDA), instead of the several full passes separate PyTorch reductions would make.

Usage
-----
``attention_moments(query, key, scale=..., pad_offsets=..., sliding_window=..., diag_offsets=(1,))``
with ``query`` ``[b, H, T, d]`` and ``key`` ``[b, H_kv, T, d]`` (query head ``h`` reads KV head
``h // (H/H_kv)``); ``pattern_moments(pattern, pad_offsets=..., diag_offsets=(1,))`` with
``pattern`` ``[b, H, T, T]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of torch; the CPU build has none and uses the torch path
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the torch build
    HAVE_TRITON = False


@dataclass
class AttentionMoments:
    """Moments of one layer's attention rows for a batch; all ``[b, H, T]`` float32.

    Rows of padding queries hold zeros; ``colsum`` counts real queries only.
    """

    entropy: torch.Tensor
    mean_key: torch.Tensor
    colsum: torch.Tensor
    diagonals: dict[int, torch.Tensor]  # offset -> p[t, t - offset] (0 where t - offset is no real key)

    def diag(self, offset: int) -> torch.Tensor:
        if offset not in self.diagonals:
            raise KeyError(f"diagonal {offset} was not computed; pass it in diag_offsets")
        return self.diagonals[offset]


class MomentStack:
    """The moments of every layer of one batch, written in place layer by layer.

    ``entropy``, ``mean_key`` and ``colsum`` are ``[L, b, H, T]``; ``diag`` is ``[L, n_diag, b, H, T]``
    in the order of ``offsets``. A capture hands :meth:`stacked` to its reducers once the forward is
    done, so the per-layer work during the forward is the kernels alone.
    """

    def __init__(
        self, n_layers: int, b: int, H: int, T: int, offsets: tuple[int, ...], device: torch.device
    ) -> None:
        self.offsets = tuple(sorted(set(offsets)))
        shape = (n_layers, b, H, T)
        self.entropy = torch.zeros(shape, device=device)
        self.mean_key = torch.zeros(shape, device=device)
        self.colsum = torch.zeros(shape, device=device)
        self.diag = torch.zeros((n_layers, max(1, len(self.offsets)), b, H, T), device=device)

    @staticmethod
    def bytes_needed(n_layers: int, b: int, H: int, T: int, n_offsets: int) -> int:
        return 4 * n_layers * b * H * T * (3 + max(1, n_offsets))

    def layer(self, i: int) -> AttentionMoments:
        diagonals = {o: self.diag[i, j] for j, o in enumerate(self.offsets)}
        return AttentionMoments(self.entropy[i], self.mean_key[i], self.colsum[i], diagonals)

    def stacked(self) -> AttentionMoments:
        diagonals = {o: self.diag[:, j] for j, o in enumerate(self.offsets)}
        return AttentionMoments(self.entropy, self.mean_key, self.colsum, diagonals)


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
    diag_offsets: tuple[int, ...] = (),
    block: int = 256,
    use_triton: bool | None = None,
    out: tuple[MomentStack, int] | None = None,
) -> AttentionMoments:
    """Moments of ``softmax(scale · q kᵀ)`` under the causal, padding and sliding-window masks.

    With ``out=(stack, layer)`` they are written into that layer of a :class:`MomentStack` (made with
    the same ``diag_offsets``) and its views are returned.
    """
    b, H, _T, d = query.shape
    if H % key.shape[1]:
        raise ValueError(f"{H} query heads cannot share {key.shape[1]} KV heads")
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    pads = _pads(pad_offsets, b, query.device)
    offsets = tuple(sorted(set(diag_offsets)))
    if use_triton is None:
        use_triton = triton_available(query)
    if out is not None and out[0].offsets != offsets:
        raise ValueError(
            f"the moment stack holds diagonals {list(out[0].offsets)} but {list(offsets)} were asked for; "
            "build the MomentStack with the same diag_offsets"
        )
    if use_triton:
        return _moments_triton(query, key, scale, pads, sliding_window, offsets, out)
    moments = _moments_torch(query, key, scale, pads, sliding_window, offsets, block)
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
    if use_triton is None:
        use_triton = HAVE_TRITON and pattern.is_cuda
    if use_triton:
        return _pattern_triton(pattern, pads, offsets)
    return _pattern_torch(pattern, pads, offsets)


def triton_available(tensor: torch.Tensor) -> bool:
    return HAVE_TRITON and tensor.is_cuda and tensor.shape[-1] in (16, 32, 64, 128, 256)


# ------------------------------------------------------------------------------------ torch path


def _masks(pads: torch.Tensor, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(T, device=device)
    real = idx[None, :] >= pads[:, None].long()  # [b, T]
    return idx, real


def _diag_from_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    lse: torch.Tensor,
    pads: torch.Tensor,
    offset: int,
    window: int | None,
) -> torch.Tensor:
    _b, H, T, _ = query.shape
    group = H // key.shape[1]
    idx, real = _masks(pads, T, query.device)
    src = (idx - offset).clamp_min(0)
    k = key[:, :, src].float()
    k = k.repeat_interleave(group, dim=1) if group > 1 else k
    p = torch.exp((query.float() * k).sum(-1) * scale - lse)
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
        s = torch.matmul(query[:, :, q0:q1].float(), k_t[..., k0:q1]).mul_(scale)
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
    diagonals = {o: _diag_from_scores(query, key, scale, lse, pads, o, window) for o in offsets}
    return AttentionMoments(entropy, mean_key, colsum, diagonals)


def _pattern_torch(pattern: torch.Tensor, pads: torch.Tensor, offsets: tuple[int, ...]) -> AttentionMoments:
    b, H, T, _ = pattern.shape
    idx, real = _masks(pads, T, pattern.device)
    visible = (idx[None, :] <= idx[:, None])[None] & real[:, None, :] & real[:, :, None]  # [b, q, k]
    p = torch.where(visible[:, None], pattern.float(), torch.zeros((), device=pattern.device))
    entropy = torch.special.entr(p).sum(-1)
    mean_key = torch.matmul(p, idx.float())
    colsum = p.sum(2)
    diagonals = {}
    for o in offsets:
        src = (idx - o).clamp_min(0)
        picked = p.gather(3, src.view(1, 1, T, 1).expand(b, H, T, 1))[..., 0]
        diagonals[o] = torch.where((idx - o >= 0)[None, None, :], picked, torch.zeros_like(picked))
    return AttentionMoments(entropy, mean_key, colsum, diagonals)


# ----------------------------------------------------------------------------------- triton path

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

if HAVE_TRITON:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [(64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2)]
    ]

    @triton.jit
    def _row_block(  # type: ignore[no-untyped-def]
        q, k_base, start_n, offs_m, offs_d, skt, skd, T, pad, WINDOW, scale2, m_i, l_i, s_i, k_i,
        HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # one key block of the online softmax; MASKED=False for blocks every row sees whole
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ptrs = k_base + offs_n[None, :] * skt + offs_d[:, None] * skd
        if MASKED:  # noqa: SIM108 (a constexpr branch: one load is compiled)
            k = tl.load(ptrs, mask=offs_n[None, :] < T, other=0.0)
        else:
            k = tl.load(ptrs)
        s = tl.dot(q, k, input_precision=PRECISION) * scale2
        if MASKED:
            valid = (
                (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= pad)
                & (offs_m[:, None] >= pad) & (offs_m[:, None] < T)
            )  # fmt: skip
            if HAS_WINDOW:
                valid = valid & (offs_n[None, :] > offs_m[:, None] - WINDOW)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            s_i = s_i * alpha + tl.sum(p * tl.where(valid, s, 0.0), 1)
        else:
            s_i = s_i * alpha + tl.sum(p * s, 1)
        k_i = k_i * alpha + tl.sum(p * offs_n[None, :].to(tl.float32), 1)
        return m_new, l_i, s_i, k_i

    @triton.autotune(configs=_CONFIGS, key=["T", "HEAD_DIM", "HAS_WINDOW"])
    @triton.jit
    def _row_moments_kernel(  # type: ignore[no-untyped-def]
        Q, K, LSE, ENT, MK, PADS, DIAG,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd,
        T, H, GROUP, WINDOW, scale2, NBHT, D0, D1, D2, D3,
        HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, N_DIAG: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # scores in log2 units (s2 = s·log2 e) so that exp2 can be used; converted back at the end
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // GROUP
        pad = tl.load(PADS + b)
        m_lo = pid_m * BLOCK_M
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
            mask=offs_m[:, None] < T, other=0.0,
        )  # fmt: skip
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        s_i = tl.zeros([BLOCK_M], tl.float32)
        k_i = tl.zeros([BLOCK_M], tl.float32)
        lo = (pad // BLOCK_N) * BLOCK_N
        # interior key blocks need no mask: all keys real, at or before every row, inside every window
        int_lo = ((pad + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        if HAS_WINDOW:
            lo = tl.maximum(lo, ((m_lo - WINDOW + 1) // BLOCK_N) * BLOCK_N)
            lo = tl.maximum(lo, 0)
            int_lo = tl.maximum(int_lo, ((m_lo + BLOCK_M - WINDOW + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(m_lo + BLOCK_M, T)
        int_lo = tl.minimum(tl.maximum(int_lo, lo), hi)
        int_hi = tl.maximum(((m_lo + 1) // BLOCK_N) * BLOCK_N, int_lo)
        k_base = K + b * skb + kvh * skh
        for start_n in range(lo, int_lo, BLOCK_N):
            m_i, l_i, s_i, k_i = _row_block(
                q, k_base, start_n, offs_m, offs_d, skt, skd, T, pad, WINDOW, scale2, m_i, l_i, s_i, k_i,
                HAS_WINDOW, PRECISION, True, BLOCK_N,
            )  # fmt: skip
        for start_n in range(int_lo, int_hi, BLOCK_N):
            m_i, l_i, s_i, k_i = _row_block(
                q, k_base, start_n, offs_m, offs_d, skt, skd, T, pad, WINDOW, scale2, m_i, l_i, s_i, k_i,
                HAS_WINDOW, PRECISION, False, BLOCK_N,
            )  # fmt: skip
        for start_n in range(int_hi, hi, BLOCK_N):
            m_i, l_i, s_i, k_i = _row_block(
                q, k_base, start_n, offs_m, offs_d, skt, skd, T, pad, WINDOW, scale2, m_i, l_i, s_i, k_i,
                HAS_WINDOW, PRECISION, True, BLOCK_N,
            )  # fmt: skip
        row_real = (offs_m >= pad) & (offs_m < T)
        has = (l_i > 0) & row_real
        l_safe = tl.where(has, l_i, 1.0)
        lse2 = m_i + tl.log2(l_safe)
        out = bh * T + offs_m
        tl.store(LSE + out, tl.where(has, lse2 * 0.6931471805599453, 0.0), mask=offs_m < T)
        tl.store(ENT + out, tl.where(has, (lse2 - s_i / l_safe) * 0.6931471805599453, 0.0), mask=offs_m < T)
        tl.store(MK + out, tl.where(has, k_i / l_safe, 0.0), mask=offs_m < T)
        # diagonals p[t, t - o]: one key row per query, scored against the finished normaliser
        qf = q.to(tl.float32)
        for j in tl.static_range(N_DIAG):
            if j == 0:
                o = D0
            elif j == 1:
                o = D1
            elif j == 2:
                o = D2
            else:
                o = D3
            kpos = offs_m - o
            ok = has & (kpos >= pad) & (kpos >= 0)
            if HAS_WINDOW:
                ok = ok & (o < WINDOW)
            kd = tl.load(
                K + b * skb + kvh * skh + kpos[:, None] * skt + offs_d[None, :] * skd,
                mask=ok[:, None],
                other=0.0,
            ).to(tl.float32)
            sd = tl.sum(qf * kd, 1) * scale2
            tl.store(DIAG + j * NBHT + out, tl.where(ok, tl.exp2(sd - lse2), 0.0), mask=offs_m < T)

    @triton.jit
    def _column_block(  # type: ignore[no-untyped-def]
        k, q_base, LSE_base, start_m, offs_n, offs_d, sqt, sqd, T, pad, WINDOW, scale2, acc,
        HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        # one query block's contribution to the column sums; MASKED=False when it sees the keys whole
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ptrs = q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd
        if MASKED:
            q = tl.load(ptrs, mask=offs_m[:, None] < T, other=0.0)
            lse2 = tl.load(LSE_base + offs_m, mask=offs_m < T, other=0.0) * 1.4426950408889634
        else:
            q = tl.load(ptrs)
            lse2 = tl.load(LSE_base + offs_m) * 1.4426950408889634
        s = tl.dot(q, k, input_precision=PRECISION) * scale2
        if MASKED:
            valid = (
                (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] >= pad) & (offs_m[:, None] < T)
                & (offs_n[None, :] >= pad) & (offs_n[None, :] < T)
            )  # fmt: skip
            if HAS_WINDOW:
                valid = valid & (offs_n[None, :] > offs_m[:, None] - WINDOW)
            p = tl.where(valid, tl.exp2(tl.where(valid, s - lse2[:, None], 0.0)), 0.0)
        else:
            p = tl.exp2(s - lse2[:, None])
        return acc + tl.sum(p, 0)

    @triton.autotune(configs=_CONFIGS, key=["T", "HEAD_DIM", "HAS_WINDOW"])
    @triton.jit
    def _column_sum_kernel(  # type: ignore[no-untyped-def]
        Q, K, LSE, COL, PADS,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd,
        T, H, GROUP, WINDOW, scale2,
        HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # one program per block of keys; loops over the queries that can see them
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // GROUP
        pad = tl.load(PADS + b)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k = tl.load(
            K + b * skb + kvh * skh + offs_n[None, :] * skt + offs_d[:, None] * skd,
            mask=offs_n[None, :] < T, other=0.0,
        )  # fmt: skip
        acc = tl.zeros([BLOCK_N], tl.float32)
        lo = tl.maximum((n0 // BLOCK_M) * BLOCK_M, (pad // BLOCK_M) * BLOCK_M)
        hi = T
        # interior query blocks need no mask: every query real, at or after every key, keys in window
        int_lo = ((n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        int_lo = tl.maximum(int_lo, ((pad + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        int_hi = (T // BLOCK_M) * BLOCK_M
        if HAS_WINDOW:
            hi = tl.minimum(T, n0 + BLOCK_N + WINDOW)
            int_hi = tl.minimum(int_hi, ((n0 + WINDOW) // BLOCK_M) * BLOCK_M)
        if n0 < pad:  # the block holds padding keys: mask every query block
            int_hi = lo
        int_lo = tl.minimum(tl.maximum(int_lo, lo), hi)
        int_hi = tl.maximum(tl.minimum(int_hi, hi), int_lo)
        q_base = Q + b * sqb + h * sqh
        lse_base = LSE + bh * T
        for start_m in range(lo, int_lo, BLOCK_M):
            acc = _column_block(
                k, q_base, lse_base, start_m, offs_n, offs_d, sqt, sqd, T, pad, WINDOW, scale2, acc,
                HAS_WINDOW, PRECISION, True, BLOCK_M,
            )  # fmt: skip
        for start_m in range(int_lo, int_hi, BLOCK_M):
            acc = _column_block(
                k, q_base, lse_base, start_m, offs_n, offs_d, sqt, sqd, T, pad, WINDOW, scale2, acc,
                HAS_WINDOW, PRECISION, False, BLOCK_M,
            )  # fmt: skip
        for start_m in range(int_hi, hi, BLOCK_M):
            acc = _column_block(
                k, q_base, lse_base, start_m, offs_n, offs_d, sqt, sqd, T, pad, WINDOW, scale2, acc,
                HAS_WINDOW, PRECISION, True, BLOCK_M,
            )  # fmt: skip
        tl.store(COL + bh * T + offs_n, acc, mask=offs_n < T)

    @triton.autotune(configs=_CONFIGS, key=["T"], reset_to_zero=["COL"])
    @triton.jit
    def _pattern_moments_kernel(  # type: ignore[no-untyped-def]
        P, ENT, MK, COL, PADS,
        spb, sph, spq, spk,
        T, H,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # reads each visible pattern entry once: row entropy, row mean key, column sums (atomics)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        pad = tl.load(PADS + b)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_real = (offs_m >= pad) & (offs_m < T)
        ent = tl.zeros([BLOCK_M], tl.float32)
        ek = tl.zeros([BLOCK_M], tl.float32)
        lo = (pad // BLOCK_N) * BLOCK_N
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
        base = P + b * spb + h * sph
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= pad) & row_real[:, None]
            p = tl.load(base + offs_m[:, None] * spq + offs_n[None, :] * spk, mask=valid, other=0.0).to(
                tl.float32
            )
            ent += tl.sum(tl.where(p > 0, -p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), 1)
            ek += tl.sum(p * offs_n[None, :].to(tl.float32), 1)
            tl.atomic_add(COL + bh * T + offs_n, tl.sum(p, 0), mask=offs_n < T)
        out = bh * T + offs_m
        tl.store(ENT + out, ent, mask=offs_m < T)
        tl.store(MK + out, ek, mask=offs_m < T)

    def _moments_triton(
        query: torch.Tensor,
        key: torch.Tensor,
        scale: float,
        pads: torch.Tensor,
        window: int | None,
        offsets: tuple[int, ...],
        out: tuple[MomentStack, int] | None = None,
    ) -> AttentionMoments:
        b, H, T, d = query.shape
        group = H // key.shape[1]
        if key.dtype != query.dtype:
            key = key.to(query.dtype)
        lse = torch.empty(b, H, T, device=query.device, dtype=torch.float32)
        in_kernel = offsets[:4]  # up to four diagonals ride along in the row kernel
        if out is None:
            ent, mk, col = torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(lse)
            diag = torch.empty((max(1, len(in_kernel)), b, H, T), device=query.device, dtype=torch.float32)
        else:  # written in place into the stack's layer
            stack, layer = out
            ent, mk, col, diag = (
                stack.entropy[layer],
                stack.mean_key[layer],
                stack.colsum[layer],
                stack.diag[layer],
            )
        has_window = window is not None and window < T
        common = (*query.stride(), *key.stride(), T, H, group, int(window or 0), float(scale) * _LOG2E)
        # float32 models get exact float32 products (no TF32); half-precision ones use tensor cores
        meta = {
            "HEAD_DIM": d,
            "HAS_WINDOW": has_window,
            "PRECISION": "ieee" if query.dtype == torch.float32 else "tf32",
        }

        def grid(cfg: dict[str, int]) -> tuple[int, int]:
            return (triton.cdiv(T, cfg["BLOCK_M"]), b * H)

        def grid_n(cfg: dict[str, int]) -> tuple[int, int]:
            return (triton.cdiv(T, cfg["BLOCK_N"]), b * H)

        diag_args = [*in_kernel, 0, 0, 0, 0][:4]
        _row_moments_kernel[grid](
            query,
            key,
            lse,
            ent,
            mk,
            pads,
            diag,
            *common,
            b * H * T,
            *diag_args,
            **meta,
            N_DIAG=len(in_kernel),
        )
        _column_sum_kernel[grid_n](query, key, lse, col, pads, *common, **meta)
        diagonals = {o: diag[j] for j, o in enumerate(in_kernel)}
        for j, o in enumerate(offsets[4:], start=4):
            values = _diag_from_scores(query, key, scale, lse, pads, o, window)
            diagonals[o] = values if out is None else diag[j].copy_(values)
        return AttentionMoments(ent, mk, col, diagonals)

    def _pattern_triton(
        pattern: torch.Tensor, pads: torch.Tensor, offsets: tuple[int, ...]
    ) -> AttentionMoments:
        b, H, T, _ = pattern.shape
        ent = torch.empty(b, H, T, device=pattern.device, dtype=torch.float32)
        mk, col = torch.empty_like(ent), torch.zeros_like(ent)

        def grid(cfg: dict[str, int]) -> tuple[int, int]:
            return (triton.cdiv(T, cfg["BLOCK_M"]), b * H)

        _pattern_moments_kernel[grid](pattern, ent, mk, col, pads, *pattern.stride(), T, H)
        idx = torch.arange(T, device=pattern.device)
        diagonals = {}
        for o in offsets:
            src = (idx - o).clamp_min(0)
            picked = pattern.gather(3, src.view(1, 1, T, 1).expand(b, H, T, 1))[..., 0].float()
            ok = (idx - o >= 0)[None, None, :] & (src[None, :] >= pads[:, None].long())[:, None, :]
            diagonals[o] = torch.where(ok, picked, torch.zeros_like(picked))
        return AttentionMoments(ent, mk, col, diagonals)

else:  # pragma: no cover

    def _moments_triton(
        query: torch.Tensor,
        key: torch.Tensor,
        scale: float,
        pads: torch.Tensor,
        window: int | None,
        offsets: tuple[int, ...],
        out: tuple[MomentStack, int] | None = None,
    ) -> AttentionMoments:
        raise RuntimeError("Triton is not available in this torch build")

    def _pattern_triton(
        pattern: torch.Tensor, pads: torch.Tensor, offsets: tuple[int, ...]
    ) -> AttentionMoments:
        raise RuntimeError("Triton is not available in this torch build")
