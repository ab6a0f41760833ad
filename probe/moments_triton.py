"""The Triton kernels of :mod:`probe.moments` (CUDA only): tensors in, tensors out.

Flash-attention-style tiling: scores live only in registers, so memory is O(T) per head. Every
kernel is checked against the PyTorch path of :mod:`probe.moments` by
``benchmarks/moments_check.py``; see docs/capture.md (attention moments).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; the CPU build has none and uses the torch path
    import triton
    import triton.language as tl

    try:
        from triton.errors import TritonError as _KernelError
    except ImportError:  # pragma: no cover - a Triton older than its common error class
        from triton.compiler.errors import CompilationError as _KernelError

    HAVE_TRITON = True
    # what a kernel that cannot be built on this GPU or Triton raises (MLIR passes raise RuntimeError)
    KERNEL_ERRORS: tuple[type[Exception], ...] = (_KernelError, RuntimeError)
except ImportError:  # pragma: no cover - depends on the torch build
    HAVE_TRITON = False
    KERNEL_ERRORS = (RuntimeError,)

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


MAX_PROGRAMS = 32  # programs per head at most of the zig-zag kernels: each writes a row of T partial sums


def programs_per_head(b: int, H: int, T: int, device: torch.device) -> int:
    """Programs per head of the kernels that sum columns over query blocks in a zig-zag (the single
    pass, the pattern kernel): about eight per multiprocessor in all, at most
    :data:`MAX_PROGRAMS` and at most one per 64 query rows."""
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return max(1, min(MAX_PROGRAMS, -(-8 * n_sm // (b * H)), -(-T // 64)))


def length_key(T: int) -> int:
    """The autotuning key of a length: T rounded up to a power of two (at least 1,024)."""
    return max(1024, 1 << max(0, T - 1).bit_length())


if HAVE_TRITON:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [
            (64, 64, 4, 2),
            (128, 64, 4, 2),
            (128, 64, 8, 3),
            (64, 128, 4, 3),
            (128, 128, 8, 2),
            (128, 128, 8, 3),
        ]
    ]
    # The autotuners key on T_KEY, the length rounded up to a power of two, not on T itself: a
    # capture of prompts of many lengths would otherwise re-tune (and pay seconds) at every new one.

    def _prune(
        configs: list[triton.Config], nargs: dict[str, object], **kwargs: object
    ) -> list[triton.Config]:
        """Exact float32 products ("ieee") compile slowly in large tiles (over 30 s per kernel for
        the six configs) and were fastest in the smallest one: tune only that one for them."""
        precision = kwargs.get("PRECISION", nargs.get("PRECISION"))
        if precision != "ieee":
            return configs
        return [c for c in configs if c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] == 64][:1]

    _PRUNE = {"early_config_prune": _prune}

    @triton.jit
    def _cap(s, cap2):  # type: ignore[no-untyped-def]
        # the soft cap cap · tanh(s / cap) of scores in log2 units (cap2 = cap · log2 e), with
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp2 overflows to inf: tanh = 1)
        return cap2 * (1.0 - 2.0 / (tl.exp2(s * (2.0 / cap2) * 1.4426950408889634) + 1.0))

    @triton.jit
    def _row_block(  # type: ignore[no-untyped-def]
        q,
        k_base,
        start_n,
        offs_m,
        offs_d,
        skt,
        skd,
        T,
        pad,
        WINDOW,
        scale2,
        cap2,
        m_i,
        l_i,
        s_i,
        k_i,
        HAS_WINDOW: tl.constexpr,
        HAS_CAP: tl.constexpr,
        PRECISION: tl.constexpr,
        MASKED: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # one key block of the online softmax; MASKED=False for blocks every row sees whole
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ptrs = k_base + offs_n[None, :] * skt + offs_d[:, None] * skd
        if MASKED:  # noqa: SIM108 (a constexpr branch: one load is compiled)
            k = tl.load(ptrs, mask=offs_n[None, :] < T, other=0.0)
        else:
            k = tl.load(ptrs)
        s = tl.dot(q, k, input_precision=PRECISION) * scale2
        if HAS_CAP:
            s = _cap(s, cap2)
        if MASKED:
            valid = (
                (offs_n[None, :] <= offs_m[:, None])
                & (offs_n[None, :] >= pad)
                & (offs_m[:, None] >= pad)
                & (offs_m[:, None] < T)
            )
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

    @triton.jit
    def _row_pass(  # type: ignore[no-untyped-def]
        q,
        k_base,
        m_lo,
        offs_m,
        offs_d,
        skt,
        skd,
        T,
        pad,
        WINDOW,
        scale2,
        cap2,
        HAS_WINDOW: tl.constexpr,
        HAS_CAP: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # the online softmax of one block of query rows over every key block they see: masked
        # edge blocks, then the interior blocks, then the blocks that cross the diagonal
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
        for start_n in range(lo, int_lo, BLOCK_N):
            m_i, l_i, s_i, k_i = _row_block(
                q,
                k_base,
                start_n,
                offs_m,
                offs_d,
                skt,
                skd,
                T,
                pad,
                WINDOW,
                scale2,
                cap2,
                m_i,
                l_i,
                s_i,
                k_i,
                HAS_WINDOW,
                HAS_CAP,
                PRECISION,
                True,
                BLOCK_N,
            )
        for start_n in range(int_lo, int_hi, BLOCK_N):
            m_i, l_i, s_i, k_i = _row_block(
                q,
                k_base,
                start_n,
                offs_m,
                offs_d,
                skt,
                skd,
                T,
                pad,
                WINDOW,
                scale2,
                cap2,
                m_i,
                l_i,
                s_i,
                k_i,
                HAS_WINDOW,
                HAS_CAP,
                PRECISION,
                False,
                BLOCK_N,
            )
        for start_n in range(int_hi, hi, BLOCK_N):
            m_i, l_i, s_i, k_i = _row_block(
                q,
                k_base,
                start_n,
                offs_m,
                offs_d,
                skt,
                skd,
                T,
                pad,
                WINDOW,
                scale2,
                cap2,
                m_i,
                l_i,
                s_i,
                k_i,
                HAS_WINDOW,
                HAS_CAP,
                PRECISION,
                True,
                BLOCK_N,
            )
        return m_i, l_i, s_i, k_i

    @triton.autotune(
        configs=_CONFIGS, key=["T_KEY", "HEAD_DIM", "HAS_WINDOW", "HAS_CAP"], prune_configs_by=_PRUNE
    )
    @triton.jit
    def _row_moments_kernel(  # type: ignore[no-untyped-def]
        Q,
        K,
        LSE,
        ENT,
        MK,
        PADS,
        DIAG,
        sqb,
        sqh,
        sqt,
        sqd,
        skb,
        skh,
        skt,
        skd,
        T,
        T_KEY,
        H,
        GROUP,
        WINDOW,
        scale2,
        cap2,
        NBHT,
        D0,
        D1,
        D2,
        D3,
        HEAD_DIM: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_CAP: tl.constexpr,
        PRECISION: tl.constexpr,
        N_DIAG: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # scores in log2 units (s2 = s·log2 e) so that exp2 can be used; converted back at the end.
        # The last query blocks see the most keys: they are launched first, so that the light ones
        # fill the end of the grid instead of one heavy block running alone.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
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
            mask=offs_m[:, None] < T,
            other=0.0,
        )
        m_i, l_i, s_i, k_i = _row_pass(
            q,
            K + b * skb + kvh * skh,
            m_lo,
            offs_m,
            offs_d,
            skt,
            skd,
            T,
            pad,
            WINDOW,
            scale2,
            cap2,
            HAS_WINDOW,
            HAS_CAP,
            PRECISION,
            BLOCK_M,
            BLOCK_N,
        )
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
                ok = ok & (kpos > offs_m - WINDOW)  # o < WINDOW, as a vector (the interpreter wants one)
            kd = tl.load(
                K + b * skb + kvh * skh + kpos[:, None] * skt + offs_d[None, :] * skd,
                mask=ok[:, None],
                other=0.0,
            ).to(tl.float32)
            sd = tl.sum(qf * kd, 1) * scale2
            if HAS_CAP:
                sd = _cap(sd, cap2)
            tl.store(DIAG + j * NBHT + out, tl.where(ok, tl.exp2(sd - lse2), 0.0), mask=offs_m < T)

    @triton.jit
    def _column_block(  # type: ignore[no-untyped-def]
        k,
        q_base,
        LSE_base,
        start_m,
        offs_n,
        offs_d,
        sqt,
        sqd,
        T,
        pad,
        WINDOW,
        scale2,
        cap2,
        acc,
        HAS_WINDOW: tl.constexpr,
        HAS_CAP: tl.constexpr,
        PRECISION: tl.constexpr,
        MASKED: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        # one query block's contribution to the column sums; MASKED=False when it sees the keys whole.
        # Computed transposed (keys as rows, queries as columns): the sum over queries is then a
        # sum along each row, which stays within a warp, where a sum down the columns of the
        # matrix-multiply layout crosses warps through shared memory.
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ptrs = q_base + offs_m[None, :] * sqt + offs_d[:, None] * sqd
        if MASKED:
            q_t = tl.load(ptrs, mask=offs_m[None, :] < T, other=0.0)
            lse2 = tl.load(LSE_base + offs_m, mask=offs_m < T, other=0.0) * 1.4426950408889634
        else:
            q_t = tl.load(ptrs)
            lse2 = tl.load(LSE_base + offs_m) * 1.4426950408889634
        s_t = tl.dot(k, q_t, input_precision=PRECISION) * scale2  # [keys, queries]
        if HAS_CAP:
            s_t = _cap(s_t, cap2)
        if MASKED:
            valid = (
                (offs_n[:, None] <= offs_m[None, :])
                & (offs_m[None, :] >= pad)
                & (offs_m[None, :] < T)
                & (offs_n[:, None] >= pad)
                & (offs_n[:, None] < T)
            )
            if HAS_WINDOW:
                valid = valid & (offs_n[:, None] > offs_m[None, :] - WINDOW)
            p_t = tl.where(valid, tl.exp2(tl.where(valid, s_t - lse2[None, :], 0.0)), 0.0)
        else:
            p_t = tl.exp2(s_t - lse2[None, :])
        return acc + tl.sum(p_t, 1)

    @triton.jit
    def _column_ranges(  # type: ignore[no-untyped-def]
        n0, pad, T, WINDOW, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        # the query blocks that see the key block at n0: [lo, hi), of which [int_lo, int_hi) need no
        # mask (every query real, at or after every key, every key in its window)
        lo = tl.maximum((n0 // BLOCK_M) * BLOCK_M, (pad // BLOCK_M) * BLOCK_M)
        hi = T
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
        return lo, int_lo, int_hi, hi

    @triton.autotune(
        configs=_CONFIGS, key=["T_KEY", "HEAD_DIM", "HAS_WINDOW", "HAS_CAP"], prune_configs_by=_PRUNE
    )
    @triton.jit
    def _column_sum_kernel(  # type: ignore[no-untyped-def]
        Q,
        K,
        LSE,
        COL,
        PADS,
        sqb,
        sqh,
        sqt,
        sqd,
        skb,
        skh,
        skt,
        skd,
        T,
        T_KEY,
        H,
        GROUP,
        WINDOW,
        scale2,
        cap2,
        HEAD_DIM: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_CAP: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
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
        k = tl.load(  # [keys, head_dim]: the left operand of the transposed scores
            K + b * skb + kvh * skh + offs_n[:, None] * skt + offs_d[None, :] * skd,
            mask=offs_n[:, None] < T,
            other=0.0,
        )
        acc = tl.zeros([BLOCK_N], tl.float32)
        lo, int_lo, int_hi, hi = _column_ranges(n0, pad, T, WINDOW, HAS_WINDOW, BLOCK_M, BLOCK_N)
        q_base = Q + b * sqb + h * sqh
        lse_base = LSE + bh * T
        for start_m in range(lo, int_lo, BLOCK_M):
            acc = _column_block(
                k,
                q_base,
                lse_base,
                start_m,
                offs_n,
                offs_d,
                sqt,
                sqd,
                T,
                pad,
                WINDOW,
                scale2,
                cap2,
                acc,
                HAS_WINDOW,
                HAS_CAP,
                PRECISION,
                True,
                BLOCK_M,
            )
        for start_m in range(int_lo, int_hi, BLOCK_M):
            acc = _column_block(
                k,
                q_base,
                lse_base,
                start_m,
                offs_n,
                offs_d,
                sqt,
                sqd,
                T,
                pad,
                WINDOW,
                scale2,
                cap2,
                acc,
                HAS_WINDOW,
                HAS_CAP,
                PRECISION,
                False,
                BLOCK_M,
            )
        for start_m in range(int_hi, hi, BLOCK_M):
            acc = _column_block(
                k,
                q_base,
                lse_base,
                start_m,
                offs_n,
                offs_d,
                sqt,
                sqd,
                T,
                pad,
                WINDOW,
                scale2,
                cap2,
                acc,
                HAS_WINDOW,
                HAS_CAP,
                PRECISION,
                True,
                BLOCK_M,
            )
        tl.store(COL + bh * T + offs_n, acc, mask=offs_n < T)

    @triton.jit
    def _query_block(pid, r, N_PROG):  # type: ignore[no-untyped-def]
        # the program's query block of round r: p, 2P-1-p, 2P+p, ... (a zig-zag: equal work)
        return r * N_PROG + tl.where(r % 2 == 0, pid, N_PROG - 1 - pid)

    @triton.autotune(configs=_CONFIGS, key=["T_KEY"], reset_to_zero=["PART"])
    @triton.jit
    def _pattern_moments_kernel(  # type: ignore[no-untyped-def]
        P,
        ENT,
        MK,
        PART,
        PADS,
        spb,
        sph,
        spq,
        spk,
        T,
        T_KEY,
        H,
        NBHT,
        N_PROG,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # reads each visible pattern entry once: row entropy, row mean key, and column sums into
        # this program's own row of PART (query blocks in a zig-zag, as the single pass; no atomics)
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        pad = tl.load(PADS + b)
        base = P + b * spb + h * sph
        part_base = PART + pid * NBHT + bh * T
        n_blocks = tl.cdiv(T, BLOCK_M)
        for r in range(0, tl.cdiv(n_blocks, N_PROG)):
            j = _query_block(pid, r, N_PROG)
            if j < n_blocks:
                offs_m = j * BLOCK_M + tl.arange(0, BLOCK_M)
                row_real = (offs_m >= pad) & (offs_m < T)
                ent = tl.zeros([BLOCK_M], tl.float32)
                ek = tl.zeros([BLOCK_M], tl.float32)
                for start_n in range((pad // BLOCK_N) * BLOCK_N, tl.minimum((j + 1) * BLOCK_M, T), BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    valid = (
                        (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= pad) & row_real[:, None]
                    )
                    ptrs = base + offs_m[:, None] * spq + offs_n[None, :] * spk
                    p = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
                    ent += tl.sum(tl.where(p > 0, -p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), 1)
                    ek += tl.sum(p * offs_n[None, :].to(tl.float32), 1)
                    col_ptrs = part_base + offs_n
                    col = tl.load(col_ptrs, mask=offs_n < T, other=0.0)
                    tl.store(col_ptrs, col + tl.sum(p, 0), mask=offs_n < T)
                out = bh * T + offs_m
                tl.store(ENT + out, ent, mask=offs_m < T)
                tl.store(MK + out, ek, mask=offs_m < T)

    def launch_moments(
        query: torch.Tensor,
        key: torch.Tensor,
        scale: float,
        pads: torch.Tensor,
        window: int | None,
        in_kernel: tuple[int, ...],
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        softcap: float | None = None,
    ) -> None:
        """Run the row and column kernels: ``out = (lse, entropy, mean_key, colsum, diag)`` are written,
        ``diag[j]`` the diagonal ``in_kernel[j]`` (at most four); scores soft-capped as
        ``cap · tanh(s / cap)`` with ``softcap``."""
        lse, ent, mk, col, diag = out
        b, H, T, d = query.shape
        group = H // key.shape[1]
        has_window = window is not None and window < T
        common = (
            *query.stride(),
            *key.stride(),
            T,
            length_key(T),
            H,
            group,
            int(window or 0),
            float(scale) * _LOG2E,
            float(softcap or 1.0) * _LOG2E,
        )
        # float32 models get exact float32 products (no TF32); half-precision ones use tensor cores
        meta = {
            "HEAD_DIM": d,
            "HAS_WINDOW": has_window,
            "HAS_CAP": softcap is not None,
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

    def launch_pattern_moments(
        pattern: torch.Tensor, pads: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> None:
        """Run the pattern kernel: ``out = (entropy, mean_key, colsum)`` are written."""
        ent, mk, col = out
        b, H, T, _ = pattern.shape
        n_prog = programs_per_head(b, H, T, pattern.device)
        part = torch.zeros((n_prog, b, H, T), device=pattern.device, dtype=torch.float32)

        def grid(cfg: dict[str, int]) -> tuple[int, int]:
            return (n_prog, b * H)

        _pattern_moments_kernel[grid](
            pattern, ent, mk, part, pads, *pattern.stride(), T, length_key(T), H, b * H * T, n_prog
        )
        torch.sum(part, dim=0, out=col)

else:  # pragma: no cover

    def launch_moments(
        query: torch.Tensor,
        key: torch.Tensor,
        scale: float,
        pads: torch.Tensor,
        window: int | None,
        in_kernel: tuple[int, ...],
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        softcap: float | None = None,
    ) -> None:
        raise RuntimeError("Triton is not available in this torch build")

    def launch_pattern_moments(
        pattern: torch.Tensor, pads: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> None:
        raise RuntimeError("Triton is not available in this torch build")
