"""The single-pass Triton moment kernel (CUDA only): attention statistics from a known normaliser.

When the forward's own attention kernel hands back each row's log-sum-exp (see
:func:`probe.kernels.attend_with_lse`), every probability is final as soon as its score is made,
so the row statistics, the diagonals and the column sums come from one pass over the scores
instead of the two of :mod:`probe.moments_triton` (whose first pass only finds the normaliser).
Causal attention of unpadded sequences only. Checked against the PyTorch path of
:mod:`probe.moments` in Triton's interpreter by the tests and on a GPU by
``benchmarks/moments_check.py``; see docs/capture.md (attention moments).

Column sums cross query blocks. Program ``(p, bh)`` of the ``P`` programs of a head takes query
blocks ``p, 2P-1-p, 2P+p, ...`` (a zig-zag, so that every program has as many keys to visit) and
writes its column sums into its own row ``PART[p, bh, :]``; the ``P`` rows are then summed in a
fixed order, so the result does not depend on scheduling (no atomics). Three loop orders, all
tried by the autotuner (``ORDER`` in the configuration):

* ``ROWS_OUTER``, query blocks outside, key blocks inside: a query block's row sums stay in
  registers, and each tile adds its column sums (a sum over the tile's rows, across warps) into
  ``PART``;
* ``KEYS_OUTER``, key blocks outside, the program's query blocks inside: the tiles of one key block
  add up in registers and are summed over rows once per key block; the row sums are added, tile by
  tile, into the program's own rows of the entropy and mean-key outputs, and finished at the end;
* ``TRANSPOSED``, query blocks outside, each tile made transposed (keys as rows): a tile's column
  sums are sums along its rows, inside a warp, added into ``PART``; its row statistics add up
  element by element in two tile-sized accumulators, summed over keys once per query block.

The third is the newest: a launch with every order that fails (or whose first result disagrees
with the two passes) is retried once with the first two only (:func:`narrow`).
"""

from __future__ import annotations

import warnings

import torch

from probe.moments_triton import _LOG2E, _PRUNE, HAVE_TRITON, length_key, programs_per_head

ROWS_OUTER, KEYS_OUTER, TRANSPOSED = 0, 1, 2  # the loop orders (ORDER in a configuration)

NARROWED: list[str] = []
"""Why the single pass fell back, in this process, to the loop orders already measured on GPUs
(``_MEASURED``); empty while every order is tuned."""


def narrow(why: str) -> bool:
    """Tune only the measured loop orders from now on, with a warning, after the kernel with every
    order failed (``why``); False when that was done already, so that the caller gives up instead."""
    if NARROWED:
        return False
    NARROWED.append(why)
    warnings.warn(
        f"the single pass's newest loop order failed ({why}); it is tuned over the other orders from "
        "now on (the same numbers)",
        stacklevel=4,
    )
    return True


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from probe.moments_triton import _query_block

    def _configs(rows: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "ORDER": order}, num_warps=w, num_stages=st)
            for order, bm, bn, w, st in rows
        ]

    # the orders measured on GPUs (docs/scale.md)
    _MEASURED = _configs(
        [
            (ROWS_OUTER, 64, 64, 4, 2),
            (ROWS_OUTER, 128, 64, 4, 2),
            (ROWS_OUTER, 128, 64, 8, 3),
            (ROWS_OUTER, 64, 128, 4, 3),
            (ROWS_OUTER, 128, 128, 8, 2),
            (KEYS_OUTER, 64, 64, 4, 2),
            (KEYS_OUTER, 128, 64, 4, 2),
            (KEYS_OUTER, 128, 64, 8, 3),
            (KEYS_OUTER, 64, 128, 4, 3),
        ]
    )
    # two [BLOCK_N, BLOCK_M] float32 accumulators live in registers: tiles of 8,192 at most
    _CONFIGS = _MEASURED + _configs(
        [
            (TRANSPOSED, 64, 64, 4, 2),
            (TRANSPOSED, 64, 64, 4, 3),
            (TRANSPOSED, 128, 64, 8, 2),
            (TRANSPOSED, 64, 128, 8, 3),
        ]
    )

    @triton.jit
    def _tile(  # type: ignore[no-untyped-def]
        q,
        k,
        offs_m,
        offs_n,
        lse2,
        scale2,
        PRECISION: tl.constexpr,
        MASKED: tl.constexpr,
        TRANSPOSED: tl.constexpr,
    ):
        # the probabilities of one tile and its raw scores (the scale rides in the exponent's
        # multiply-add), queries as rows ([BLOCK_M] q, [d, BLOCK_N] k) or, TRANSPOSED, keys as rows
        # ([BLOCK_N, d] k, [d, BLOCK_M] q); MASKED for tiles that cross the diagonal
        if TRANSPOSED:
            s = tl.dot(k, q, input_precision=PRECISION)
            valid = offs_n[:, None] <= offs_m[None, :]
            norm = lse2[None, :]
        else:
            s = tl.dot(q, k, input_precision=PRECISION)
            valid = offs_n[None, :] <= offs_m[:, None]
            norm = lse2[:, None]
        if MASKED:
            s = tl.where(valid, s, 0.0)
            p = tl.where(valid, tl.exp2(s * scale2 - norm), 0.0)
        else:
            p = tl.exp2(s * scale2 - norm)
        return p, s

    @triton.jit
    def _queries_block(  # type: ignore[no-untyped-def]
        q_op,
        k_base,
        part_base,
        start_n,
        offs_m,
        offs_d,
        lse2,
        skt,
        skd,
        T,
        scale2,
        acc_s,
        acc_k,
        PRECISION: tl.constexpr,
        MASKED: tl.constexpr,
        BLOCK_N: tl.constexpr,
        TRANSPOSED: tl.constexpr,
    ):
        # queries outside: one key block. Row sums in registers: per row, or (TRANSPOSED) per tile
        # element, summed over keys by the caller; the tile's column sums into PART, a sum across
        # warps, or (TRANSPOSED) along the tile's rows, inside a warp
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TRANSPOSED:
            ptrs = k_base + offs_n[:, None] * skt + offs_d[None, :] * skd
            key_ok = offs_n[:, None] < T
        else:
            ptrs = k_base + offs_n[None, :] * skt + offs_d[:, None] * skd
            key_ok = offs_n[None, :] < T
        if MASKED:  # noqa: SIM108 (a constexpr branch: one load is compiled)
            k = tl.load(ptrs, mask=key_ok, other=0.0)
        else:
            k = tl.load(ptrs)
        p, s = _tile(q_op, k, offs_m, offs_n, lse2, scale2, PRECISION, MASKED, TRANSPOSED)
        if TRANSPOSED:
            acc_s += p * s
            acc_k += p * offs_n[:, None].to(tl.float32)
            cols = tl.sum(p, 1)
        else:
            acc_s += tl.sum(p * s, 1)
            acc_k += tl.sum(p * offs_n[None, :].to(tl.float32), 1)
            cols = tl.sum(p, 0)
        # this program's own row of partial column sums: read, add, write (no other program writes it)
        col_ptrs = part_base + offs_n
        if MASKED:
            tl.store(col_ptrs, tl.load(col_ptrs, mask=offs_n < T, other=0.0) + cols, mask=offs_n < T)
        else:
            tl.store(col_ptrs, tl.load(col_ptrs) + cols)
        return acc_s, acc_k

    @triton.jit
    def _keys_block(  # type: ignore[no-untyped-def]
        q,
        k,
        acc,
        ent_base,
        mk_base,
        offs_m,
        offs_n,
        row_ok,
        lse2,
        scale2,
        PRECISION: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        # keys outside: one query block; the tile adds into the key block's accumulator, its row
        # sums into this program's own rows of ENT and MK (raw: finished after the last key block)
        p, s = _tile(q, k, offs_m, offs_n, lse2, scale2, PRECISION, MASKED, False)
        ent_ptrs = ent_base + offs_m
        mk_ptrs = mk_base + offs_m
        tl.store(ent_ptrs, tl.load(ent_ptrs, mask=row_ok, other=0.0) + tl.sum(p * s, 1), mask=row_ok)
        kf = offs_n[None, :].to(tl.float32)
        tl.store(mk_ptrs, tl.load(mk_ptrs, mask=row_ok, other=0.0) + tl.sum(p * kf, 1), mask=row_ok)
        return acc + p

    @triton.jit
    def _diagonals(  # type: ignore[no-untyped-def]
        q,
        k_base,
        diag_ptrs,
        offs_m,
        row_ok,
        lse2,
        skt,
        skd,
        scale2,
        NBHT,
        D0,
        D1,
        D2,
        D3,
        HEAD_DIM: tl.constexpr,
        N_DIAG: tl.constexpr,
    ):
        # p[t, t - o] for up to four offsets: one key row per query, against the given normaliser
        offs_d = tl.arange(0, HEAD_DIM)
        qf = q.to(tl.float32)
        for jd in tl.static_range(N_DIAG):
            if jd == 0:
                o = D0
            elif jd == 1:
                o = D1
            elif jd == 2:
                o = D2
            else:
                o = D3
            kpos = offs_m - o
            ok = row_ok & (kpos >= 0)
            kd = tl.load(k_base + kpos[:, None] * skt + offs_d[None, :] * skd, mask=ok[:, None], other=0.0)
            sd = tl.sum(qf * kd.to(tl.float32), 1) * scale2
            tl.store(diag_ptrs + jd * NBHT, tl.where(ok, tl.exp2(sd - lse2), 0.0), mask=row_ok)

    @triton.jit
    def _load_rows(  # type: ignore[no-untyped-def]
        q_base, lse_base, m_lo, sqt, sqd, slt, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr
    ):
        # one query block's rows, queries and normalisers (log2 units); rows past the end get an
        # infinite normaliser, so that every probability of theirs is 0
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m * slt, mask=row_ok, other=float("inf")) * 1.4426950408889634
        return offs_m, row_ok, q, lse2

    @triton.jit
    def _queries_outer(  # type: ignore[no-untyped-def]
        q,
        k_base,
        part_base,
        m_lo,
        offs_m,
        lse2,
        skt,
        skd,
        T,
        scale2,
        HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        TRANSPOSED: tl.constexpr,
    ):
        # queries outside: every key block of one query block; key blocks wholly at or before every
        # row need no mask, those crossing the diagonal do. The row sums accumulate per row, or
        # (transposed) per tile element, summed over keys at the end
        offs_d = tl.arange(0, HEAD_DIM)
        if TRANSPOSED:
            q_op = tl.trans(q)
            acc_s = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            acc_k = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        else:
            q_op = q
            acc_s = tl.zeros([BLOCK_M], tl.float32)
            acc_k = tl.zeros([BLOCK_M], tl.float32)
        int_hi = (m_lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(m_lo + BLOCK_M, T)
        for start_n in range(0, int_hi, BLOCK_N):
            acc_s, acc_k = _queries_block(
                q_op,
                k_base,
                part_base,
                start_n,
                offs_m,
                offs_d,
                lse2,
                skt,
                skd,
                T,
                scale2,
                acc_s,
                acc_k,
                PRECISION,
                False,
                BLOCK_N,
                TRANSPOSED,
            )
        for start_n in range(int_hi, hi, BLOCK_N):
            acc_s, acc_k = _queries_block(
                q_op,
                k_base,
                part_base,
                start_n,
                offs_m,
                offs_d,
                lse2,
                skt,
                skd,
                T,
                scale2,
                acc_s,
                acc_k,
                PRECISION,
                True,
                BLOCK_N,
                TRANSPOSED,
            )
        if TRANSPOSED:
            acc_s = tl.sum(acc_s, 0)
            acc_k = tl.sum(acc_k, 0)
        return acc_s, acc_k

    @triton.jit
    def _row_sums(  # type: ignore[no-untyped-def]
        q,
        k_base,
        part_base,
        ent_ptrs,
        mk_ptrs,
        row_ok,
        m_lo,
        offs_m,
        lse2,
        skt,
        skd,
        T,
        scale2,
        HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ORDER: tl.constexpr,
    ):
        # one query block's raw row sums (of p·s and p·key) in the configuration's loop order
        # (ORDER compared with literals: Triton does not read Python globals)
        if ORDER == 1:  # KEYS_OUTER: added up already, in ENT and MK
            s_i = tl.load(ent_ptrs, mask=row_ok, other=0.0)
            k_i = tl.load(mk_ptrs, mask=row_ok, other=0.0)
        else:  # ROWS_OUTER or TRANSPOSED
            s_i, k_i = _queries_outer(
                q,
                k_base,
                part_base,
                m_lo,
                offs_m,
                lse2,
                skt,
                skd,
                T,
                scale2,
                HEAD_DIM,
                PRECISION,
                BLOCK_M,
                BLOCK_N,
                ORDER == 2,
            )
        return s_i, k_i

    @triton.jit
    def _keys_outer(  # type: ignore[no-untyped-def]
        q_base,
        k_base,
        lse_base,
        part_base,
        ent_base,
        mk_base,
        pid,
        N_PROG,
        n_blocks,
        rounds,
        sqt,
        sqd,
        skt,
        skd,
        slt,
        T,
        scale2,
        HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # keys outside: each key block against every query block of this program that sees it;
        # the tiles add up in registers and are summed over rows once per key block
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(0, T, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(
                k_base + offs_n[None, :] * skt + offs_d[:, None] * skd, mask=offs_n[None, :] < T, other=0.0
            )
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for r in range(0, rounds):
                j = _query_block(pid, r, N_PROG)
                m_lo = j * BLOCK_M
                if (j < n_blocks) & (m_lo + BLOCK_M > start_n):  # the block sees some of these keys
                    offs_m, row_ok, q, lse2 = _load_rows(
                        q_base, lse_base, m_lo, sqt, sqd, slt, T, HEAD_DIM, BLOCK_M
                    )
                    if start_n + BLOCK_N > m_lo:
                        acc = _keys_block(
                            q,
                            k,
                            acc,
                            ent_base,
                            mk_base,
                            offs_m,
                            offs_n,
                            row_ok,
                            lse2,
                            scale2,
                            PRECISION,
                            True,
                        )
                    else:
                        acc = _keys_block(
                            q,
                            k,
                            acc,
                            ent_base,
                            mk_base,
                            offs_m,
                            offs_n,
                            row_ok,
                            lse2,
                            scale2,
                            PRECISION,
                            False,
                        )
            tl.store(part_base + offs_n, tl.sum(acc, 0), mask=offs_n < T)

    @triton.jit
    def _lse_moments_body(  # type: ignore[no-untyped-def]
        Q,
        K,
        LSE,
        ENT,
        MK,
        PART,
        DIAG,
        sqb,
        sqh,
        sqt,
        sqd,
        skb,
        skh,
        skt,
        skd,
        slb,
        slh,
        slt,
        T,
        T_KEY,
        H,
        GROUP,
        scale2,
        NBHT,
        N_PROG,
        D0,
        D1,
        D2,
        D3,
        HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr,
        N_DIAG: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ORDER: tl.constexpr,
    ):
        # ENT, MK and PART come zeroed. LSE in natural units; scores in log2 units (exp2).
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        q_base = Q + b * sqb + h * sqh
        k_base = K + b * skb + (h // GROUP) * skh
        lse_base = LSE + b * slb + h * slh
        part_base = PART + (pid * NBHT) + bh * T
        n_blocks = tl.cdiv(T, BLOCK_M)
        rounds = tl.cdiv(n_blocks, N_PROG)
        if ORDER == 1:  # KEYS_OUTER
            _keys_outer(
                q_base,
                k_base,
                lse_base,
                part_base,
                ENT + bh * T,
                MK + bh * T,
                pid,
                N_PROG,
                n_blocks,
                rounds,
                sqt,
                sqd,
                skt,
                skd,
                slt,
                T,
                scale2,
                HEAD_DIM,
                PRECISION,
                BLOCK_M,
                BLOCK_N,
            )
        for r in range(0, rounds):
            j = _query_block(pid, r, N_PROG)
            if j < n_blocks:
                offs_m, row_ok, q, lse2 = _load_rows(
                    q_base, lse_base, j * BLOCK_M, sqt, sqd, slt, T, HEAD_DIM, BLOCK_M
                )
                out = bh * T + offs_m
                s_i, k_i = _row_sums(
                    q,
                    k_base,
                    part_base,
                    ENT + out,
                    MK + out,
                    row_ok,
                    j * BLOCK_M,
                    offs_m,
                    lse2,
                    skt,
                    skd,
                    T,
                    scale2,
                    HEAD_DIM,
                    PRECISION,
                    BLOCK_M,
                    BLOCK_N,
                    ORDER,
                )
                # entropy = lse - sum p s (the row sums to 1); natural units
                tl.store(ENT + out, (lse2 - s_i * scale2) * 0.6931471805599453, mask=row_ok)
                tl.store(MK + out, k_i, mask=row_ok)
                _diagonals(
                    q,
                    k_base,
                    DIAG + out,
                    offs_m,
                    row_ok,
                    lse2,
                    skt,
                    skd,
                    scale2,
                    NBHT,
                    D0,
                    D1,
                    D2,
                    D3,
                    HEAD_DIM,
                    N_DIAG,
                )

    def _tuned(configs: list[triton.Config]):  # type: ignore[no-untyped-def]
        return triton.autotune(
            configs=configs,
            key=["T_KEY", "HEAD_DIM"],
            prune_configs_by=_PRUNE,
            reset_to_zero=["ENT", "MK", "PART"],
        )(_lse_moments_body)

    _lse_moments_kernel = _tuned(_CONFIGS)
    _lse_moments_measured = _tuned(_MEASURED)

    def launch_lse_moments(
        query: torch.Tensor,
        key: torch.Tensor,
        scale: float,
        lse: torch.Tensor,
        in_kernel: tuple[int, ...],
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        """The single pass for causal, unpadded attention whose row log-sum-exp ``lse`` ``[b, H, T]``
        the forward's kernel handed back: ``out = (entropy, mean_key, colsum, diag)`` are written."""
        ent, mk, col, diag = out
        b, H, T, d = query.shape
        n_prog = programs_per_head(b, H, T, query.device)
        part = torch.zeros((n_prog, b, H, T), device=query.device, dtype=torch.float32)
        ent.zero_()
        mk.zero_()

        def grid(cfg: dict[str, int]) -> tuple[int, int]:
            return (n_prog, b * H)

        diag_args = [*in_kernel, 0, 0, 0, 0][:4]
        kernel = _lse_moments_measured if NARROWED else _lse_moments_kernel
        kernel[grid](
            query,
            key,
            lse,
            ent,
            mk,
            part,
            diag,
            *query.stride(),
            *key.stride(),
            *lse.stride(),
            T,
            length_key(T),
            H,
            H // key.shape[1],
            float(scale) * _LOG2E,
            b * H * T,
            n_prog,
            *diag_args,
            HEAD_DIM=d,
            PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            N_DIAG=len(in_kernel),
        )
        torch.sum(part, dim=0, out=col)

else:  # pragma: no cover

    def launch_lse_moments(
        query: torch.Tensor,
        key: torch.Tensor,
        scale: float,
        lse: torch.Tensor,
        in_kernel: tuple[int, ...],
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        raise RuntimeError("Triton is not available in this torch build")
