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
products on tensor cores in the model's dtype with float32 accumulation). Elsewhere a PyTorch
implementation computes the same numbers over blocks of query rows; it is also the reference the
kernels are checked against (``benchmarks/capture.py`` prints the agreement on the GPU).

Usage
-----
``attention_moments(query, key, scale=..., pad_offsets=..., sliding_window=...)`` with ``query``
``[b, H, T, d]`` and ``key`` ``[b, H_kv, T, d]`` (query head ``h`` reads KV head ``h // (H/H_kv)``).
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
    """Moments of one layer's attention rows for a batch; all ``[b, H, T]`` float32."""

    query: torch.Tensor  # [b, H, T, d] (kept to answer diag())
    key: torch.Tensor  # [b, H_kv, T, d]
    scale: float
    lse: torch.Tensor
    entropy: torch.Tensor
    mean_key: torch.Tensor
    colsum: torch.Tensor  # sum over real queries of p[t, k], per key k
    pad_offsets: torch.Tensor  # [b]

    def diag(self, offset: int) -> torch.Tensor:
        """``p[t, t - offset]`` for every query ``t`` (0 where ``t - offset`` is not a real key)."""
        _b, H, T, _d = self.query.shape
        group = H // self.key.shape[1]
        idx = torch.arange(T, device=self.query.device) - offset
        src = idx.clamp_min(0)
        k = self.key[:, :, src].repeat_interleave(group, dim=1) if group > 1 else self.key[:, :, src]
        s = (self.query.float() * k.float()).sum(-1) * self.scale
        p = torch.exp(s - self.lse)
        real_key = (idx[None, :] >= self.pad_offsets[:, None])[:, None, :]  # [b, 1, T]
        return torch.where(real_key & (idx >= 0)[None, None, :], p, torch.zeros_like(p))


def attention_moments(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    pad_offsets: torch.Tensor | None = None,
    sliding_window: int | None = None,
    block: int = 256,
    use_triton: bool | None = None,
) -> AttentionMoments:
    b, H, _T, d = query.shape
    if H % key.shape[1]:
        raise ValueError(f"{H} query heads cannot share {key.shape[1]} KV heads")
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    pads = pad_offsets if pad_offsets is not None else torch.zeros(b, dtype=torch.long, device=query.device)
    pads = pads.to(device=query.device, dtype=torch.int32)
    if use_triton is None:
        use_triton = triton_available(query)
    if use_triton:
        lse, entropy, mean_key, colsum = _moments_triton(query, key, scale, pads, sliding_window)
    else:
        lse, entropy, mean_key, colsum = _moments_torch(query, key, scale, pads, sliding_window, block)
    return AttentionMoments(query, key, scale, lse, entropy, mean_key, colsum, pads)


def triton_available(tensor: torch.Tensor) -> bool:
    return HAVE_TRITON and tensor.is_cuda and tensor.shape[-1] in (16, 32, 64, 128, 256)


# ------------------------------------------------------------------------------------ torch path


def _moments_torch(
    query: torch.Tensor, key: torch.Tensor, scale: float, pads: torch.Tensor, window: int | None, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, H, T, _ = query.shape
    group = H // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1) if group > 1 else key.float()
    k_t = k.transpose(-1, -2)
    dev = query.device
    key_idx = torch.arange(T, device=dev)
    key_real = key_idx[None, :] >= pads[:, None].long()  # [b, T]
    lse = torch.empty(b, H, T, device=dev)
    entropy = torch.empty_like(lse)
    mean_key = torch.empty_like(lse)
    colsum = torch.zeros_like(lse)
    for q0 in range(0, T, block):
        q1 = min(T, q0 + block)
        q_idx = torch.arange(q0, q1, device=dev)
        allowed = key_idx[None, :] <= q_idx[:, None]
        if window is not None:
            allowed = allowed & (key_idx[None, :] > q_idx[:, None] - window)
        allowed = allowed[None] & key_real[:, None, :]  # [b, q, T]
        s = torch.matmul(query[:, :, q0:q1].float(), k_t) * scale
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        blk_lse = torch.logsumexp(s, dim=-1)  # -inf for pad queries
        safe_lse = torch.where(torch.isfinite(blk_lse), blk_lse, torch.zeros_like(blk_lse))
        p = torch.exp(s - safe_lse[..., None])
        p = torch.where(allowed[:, None], p, torch.zeros_like(p))
        lse[:, :, q0:q1] = safe_lse
        entropy[:, :, q0:q1] = safe_lse - (p * torch.where(allowed[:, None], s, torch.zeros_like(s))).sum(-1)
        mean_key[:, :, q0:q1] = torch.matmul(p, key_idx.float())
        real_query = (q_idx[None, :] >= pads[:, None].long()).float()  # [b, q]
        colsum += torch.einsum("bhqk,bq->bhk", p, real_query)
    return lse, entropy, mean_key, colsum


# ----------------------------------------------------------------------------------- triton path

if HAVE_TRITON:

    @triton.jit
    def _row_moments_kernel(  # type: ignore[no-untyped-def]
        Q, K, LSE, ENT, MK, PADS,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd,
        T, H, GROUP, WINDOW, scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // GROUP
        pad = tl.load(PADS + b)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
        if HAS_WINDOW:
            lo = tl.maximum(lo, ((pid_m * BLOCK_M - WINDOW + 1) // BLOCK_N) * BLOCK_N)
            lo = tl.maximum(lo, 0)
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(
                K + b * skb + kvh * skh + offs_n[None, :] * skt + offs_d[:, None] * skd,
                mask=offs_n[None, :] < T, other=0.0,
            )  # fmt: skip
            s = tl.dot(q, k, input_precision=PRECISION) * scale
            valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= pad) & (offs_n[None, :] < T)
            if HAS_WINDOW:
                valid = valid & (offs_n[None, :] > offs_m[:, None] - WINDOW)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            s_i = s_i * alpha + tl.sum(p * tl.where(valid, s, 0.0), 1)
            k_i = k_i * alpha + tl.sum(p * offs_n[None, :].to(tl.float32), 1)
            m_i = m_new
        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        lse = tl.where(has, m_i + tl.log(l_safe), 0.0)
        out = bh * T + offs_m
        tl.store(LSE + out, lse, mask=offs_m < T)
        tl.store(ENT + out, tl.where(has, lse - s_i / l_safe, 0.0), mask=offs_m < T)
        tl.store(MK + out, tl.where(has, k_i / l_safe, 0.0), mask=offs_m < T)

    @triton.jit
    def _column_sum_kernel(  # type: ignore[no-untyped-def]
        Q, K, LSE, COL, PADS,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd,
        T, H, GROUP, WINDOW, scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // GROUP
        pad = tl.load(PADS + b)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k = tl.load(
            K + b * skb + kvh * skh + offs_n[None, :] * skt + offs_d[:, None] * skd,
            mask=offs_n[None, :] < T, other=0.0,
        )  # fmt: skip
        acc = tl.zeros([BLOCK_N], tl.float32)
        lo = tl.maximum((pid_n * BLOCK_N // BLOCK_M) * BLOCK_M, (pad // BLOCK_M) * BLOCK_M)
        hi = T
        if HAS_WINDOW:
            hi = tl.minimum(T, (pid_n + 1) * BLOCK_N + WINDOW)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = tl.load(
                Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=offs_m[:, None] < T, other=0.0,
            )  # fmt: skip
            lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * scale
            valid = (
                (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] >= pad) & (offs_n[None, :] >= pad)
                & (offs_m[:, None] < T) & (offs_n[None, :] < T)
            )  # fmt: skip
            if HAS_WINDOW:
                valid = valid & (offs_n[None, :] > offs_m[:, None] - WINDOW)
            p = tl.where(valid, tl.exp(tl.where(valid, s - lse[:, None], 0.0)), 0.0)
            acc += tl.sum(p, 0)
        tl.store(COL + bh * T + offs_n, acc, mask=offs_n < T)

    def _moments_triton(
        query: torch.Tensor, key: torch.Tensor, scale: float, pads: torch.Tensor, window: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b, H, T, d = query.shape
        group = H // key.shape[1]
        if key.dtype != query.dtype:
            key = key.to(query.dtype)
        lse = torch.empty(b, H, T, device=query.device, dtype=torch.float32)
        ent, mk, col = torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(lse)
        block_m = block_n = 64
        has_window = window is not None and window < T
        common = (
            *query.stride(), *key.stride(), T, H, group, int(window or 0), float(scale),
        )  # fmt: skip
        # float32 models get exact float32 products (no TF32), half-precision ones use tensor cores
        precision = "ieee" if query.dtype == torch.float32 else "tf32"
        meta = {
            "HEAD_DIM": d,
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "HAS_WINDOW": has_window,
            "PRECISION": precision,
        }
        _row_moments_kernel[(triton.cdiv(T, block_m), b * H)](query, key, lse, ent, mk, pads, *common, **meta)
        _column_sum_kernel[(triton.cdiv(T, block_n), b * H)](query, key, lse, col, pads, *common, **meta)
        return lse, ent, mk, col

else:  # pragma: no cover

    def _moments_triton(
        query: torch.Tensor, key: torch.Tensor, scale: float, pads: torch.Tensor, window: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise RuntimeError("Triton is not available in this torch build")
