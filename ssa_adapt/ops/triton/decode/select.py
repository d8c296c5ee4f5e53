"""Selection for decode steps (T <= 4 queries per row, inference only, no gradient): `decode_select`.

`decode_select` scores the cached complete-block key means of an `SSACache` (block_means [B, NB, H, D] float32,
relative to each row's document start) in two launches:

1. `_decode_score_kernel`, grid (B * T * H, splits of the blocks): the logits `scale * q_g . kbar_j` of the G
   heads of the group for a range of blocks go to a scratch buffer, with the range's softmax max / normaliser
   per head (occupancy: at batch 1 the (row, KV head) pairs alone would leave most SMs idle at 128k context).
2. `_decode_finish_kernel`, grid (B * T * H): merges the statistics and turns the logits into the group-summed
   importance I(j), as unique int64 keys `(float bits of I << 32) | (2^31 - 1 - j)` (larger is better; equal
   importances go to the lower block, as the reference's stable sort). Lane i of a BN-wide chunk keeps the three
   best keys of blocks j = i (mod BN) with elementwise max/min only. The budget-th best of 64 lane-group maxima
   (distinct blocks) bounds the threshold from below; the few keys above it are compacted and ranked exactly
   ([CAP, CAP] comparisons), and the chosen and forced blocks go to the column that counts the kept blocks below
   them (ascending without a sort: `tl.sort` crashes Triton 3.6 on sm_90). Exact unless more than CAP keys
   survive or some lane's third key is chosen (its fourth might then belong too): those rows take an exact
   fallback, a bisection over the float bits of the importance written to a scratch row (31 counting passes).
   `DecodeOptions.finish = "auto"` (the default) runs `_decode_finish_chunks_kernel` instead while the grid stays
   small: grid (B * T * H, chunks of `chunk_blocks` blocks), each chunk keeping its own best keys, the row's last
   chunk to finish (an atomic count, reset after) merging them into the output row; still two launches.

The programs' bodies are jit functions (`_score_split`, `_finish_row`) that `step.py`'s one-launch decode step
runs in turn. The tunables are `options.DecodeOptions` (`KernelOptions.decode`), passed as `options`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import utils
from ..options import DEFAULT_OPTIONS, KernelOptions
from ..utils import cdiv, check_block_size, check_doc_start, next_pow2, num_programs
from .launch import PER_STEP, last_dim_contiguous, split_count, workspace

__all__ = ["decode_select", "check_selection"]


@triton.jit(do_not_specialize=PER_STEP)
def _decode_score_kernel(
    q,  # [B, T, HQ, D] (strided)
    kbar,  # [B, NB, H, D] float32 (strided, last dim contiguous)
    q_pos,  # [B, T] int64 or None
    doc_start,  # [B, T] int64 or None (used when q_pos is None)
    logits,  # [B * T * H, G, NB] float32 out (log2 domain)
    stats,  # [B * T * H, NSPLIT, 2, GP] float32 out: max, normaliser
    scale_log2,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    T,
    TK,
    NB,
    NSPLIT,
    BPS,  # blocks per split
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BN: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    _score_split(q, kbar, q_pos, doc_start, logits, stats, scale_log2, stride_qb, stride_qt, stride_qh, stride_kb,
                 stride_kn, stride_kh, T, TK, NB, NSPLIT, BPS, tl.program_id(0).to(tl.int64), tl.program_id(1),
                 H, G, GP, D, BD, BS, BN, PRECISION, HAS_POS, HAS_DOCS)  # fmt: skip


@triton.jit
def _score_split(q, kbar, q_pos, doc_start, logits, stats, scale_log2, stride_qb, stride_qt, stride_qh, stride_kb,
                 stride_kn, stride_kh, T, TK, NB, NSPLIT, BPS, i_bth, i_sp, H: tl.constexpr, G: tl.constexpr,
                 GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
                 PRECISION: tl.constexpr, HAS_POS: tl.constexpr, HAS_DOCS: tl.constexpr):  # fmt: skip
    """`_decode_score_kernel`'s program (i_bth, i_sp): the logits of split i_sp's blocks of row i_bth to `logits`,
    their softmax max / normaliser per head to `stats` (also the first phase of `_decode_step_kernel`, one split)."""
    i_bt = i_bth // H
    i_h = i_bth % H
    i_b = i_bt // T
    i_t = i_bt % T
    if HAS_POS:
        pos = tl.load(q_pos + i_bt).to(tl.int32)
    elif HAS_DOCS:
        pos = (i_t + TK - T - tl.load(doc_start + i_bt)).to(tl.int32)
    else:
        pos = (i_t + TK - T).to(tl.int32)
    n_c = tl.minimum((pos + 1) // BS, NB)  # complete blocks of the query's document
    o_g = tl.arange(0, GP)
    o_d = tl.arange(0, BD)
    m_g = o_g < G
    m_d = o_d < D
    p_q = q + i_b * stride_qb + i_t * stride_qt + (i_h * G + o_g)[:, None] * stride_qh + o_d[None, :]
    # [GP, BD] fp32: the reference scores in float32
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    p_kb = kbar + i_b * stride_kb + i_h * stride_kh
    p_l = logits + i_bth * G * NB
    b_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([GP], dtype=tl.float32)
    lo = i_sp * BPS
    hi = tl.minimum(lo + BPS, n_c)
    for s0 in range(lo, hi, BN):
        o_n = s0 + tl.arange(0, BN)
        m_n = o_n < hi
        # [BN, BD]
        b_kb = tl.load(p_kb + o_n[:, None] * stride_kn + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        # [GP, BN] in float32 (score_precision: "ieee" exact products on the CUDA cores, "tf32x3" on the tensor cores)
        b_s = tl.dot(b_q, tl.trans(b_kb), input_precision=PRECISION) * scale_log2
        tl.store(p_l + o_g[:, None] * NB + o_n[None, :], b_s, mask=m_g[:, None] & m_n[None, :])
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_l = b_l * tl.exp2(b_m - m_use) + tl.sum(tl.exp2(b_s - m_use[:, None]), 1)
        b_m = m_new
    p_st = stats + (i_bth * NSPLIT + i_sp) * 2 * GP + o_g
    tl.store(p_st, b_m)
    tl.store(p_st + GP, b_l)


@triton.jit
def _query_position(q_pos, doc_start, i_bt, T, TK, HAS_POS: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Position of query i_bt = b * T + t inside its document (int32)."""
    i_t = i_bt % T
    if HAS_POS:
        pos = tl.load(q_pos + i_bt).to(tl.int32)
    elif HAS_DOCS:
        pos = (i_t + TK - T - tl.load(doc_start + i_bt)).to(tl.int32)
    else:
        pos = (i_t + TK - T).to(tl.int32)
    return pos


@triton.jit
def _row_blocks(q_pos, doc_start, i_bth, T, TK, NB, H: tl.constexpr, BS: tl.constexpr, S: tl.constexpr,
                SINK: tl.constexpr, LOCAL: tl.constexpr, HAS_POS: tl.constexpr, HAS_DOCS: tl.constexpr):  # fmt: skip
    """The block layout of row i_bth = (b * T + t) * H + h: (query position, its own block, complete blocks, first
    local block, forced sinks, first forced local block, forced locals (none counted twice), candidates to choose)."""
    pos = _query_position(q_pos, doc_start, i_bth // H, T, TK, HAS_POS, HAS_DOCS)
    cur = pos // BS
    n_c = tl.minimum((pos + 1) // BS, NB)
    c_lo = tl.maximum(cur - LOCAL + 1, 0)
    n_sink = tl.minimum(cur + 1, SINK)
    l_lo = tl.maximum(c_lo, SINK)
    n_local = tl.maximum(cur - l_lo + 1, 0)
    budget = tl.maximum(S - n_sink - n_local, 0)
    return pos, cur, n_c, c_lo, n_sink, l_lo, n_local, budget


@triton.jit
def _merged_stats(stats, i_bth, NSPLIT, G: tl.constexpr, GP: tl.constexpr, GS: tl.constexpr, NSP: tl.constexpr):
    """Softmax max and 1 / normaliser [GP] of the group's heads over all complete blocks, from the scoring
    kernel's per-split statistics (log2 domain; 0 for padded heads). The splits are read NSP at a time in one
    [NSP, GP] load (NSP: `_stats_chunk`): a loop over single splits waits for each load in turn (~0.5 us apiece;
    132 splits at batch 1 were most of the finishing kernel's time on the H200)."""
    o_g = tl.arange(0, GP)
    o_i = tl.arange(0, NSP)
    m_g = o_g < G
    p_st = stats + i_bth * NSPLIT * 2 * GS + o_g[None, :]
    b_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([GP], dtype=tl.float32)
    for i0 in range(0, NSPLIT, NSP):
        m_ig = ((i0 + o_i) < NSPLIT)[:, None] & m_g[None, :]
        p_i = p_st + (i0 + o_i)[:, None] * 2 * GS
        m_i = tl.load(p_i, mask=m_ig, other=float("-inf"))
        l_i = tl.load(p_i + GS, mask=m_ig, other=0.0)
        m_new = tl.maximum(b_m, tl.max(m_i, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_l = b_l * tl.exp2(b_m - m_use) + tl.sum(tl.where(m_ig, l_i * tl.exp2(m_i - m_use[None, :]), 0.0), 0)
        b_m = m_new
    b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_il = tl.where(m_g & (b_l > 0), 1.0 / tl.where(b_l > 0, b_l, 1.0), 0.0)
    return b_m, b_il


@triton.jit
def _block_keys(p_l, o_n, m_n, b_m, b_il, c_lo, NB, G: tl.constexpr, GP: tl.constexpr, SINK: tl.constexpr):
    """Keys [BN] of blocks o_n (valid where m_n) from the row's logits p_l [G, NB] and the merged statistics:
    (float bits of I(j) << 32) | (2^31 - 1 - j) for candidates (not sink, before the first local block c_lo;
    unique, larger is better, ties to the lower block), -1 elsewhere."""
    o_g = tl.arange(0, GP)
    m_gn = (o_g < G)[:, None] & m_n[None, :]
    b_s = tl.load(p_l + o_g[:, None] * NB + o_n[None, :], mask=m_gn, other=float("-inf"))
    b_i = tl.sum(tl.where(m_gn, tl.exp2(b_s - b_m[:, None]) * b_il[:, None], 0.0), 0)
    cand = m_n & (o_n >= SINK) & (o_n < c_lo)
    key = (b_i.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - o_n).to(tl.int64)
    return tl.where(cand, key, -1)


@triton.jit
def _store_ascending(p_o, b_c, chosen, n_sink, n_local, l_lo, S: tl.constexpr, SP: tl.constexpr,
                     FP: tl.constexpr, SINK: tl.constexpr):  # fmt: skip
    """Write the chosen keys' blocks (b_c [CAP] keys, chosen [CAP]) and the forced blocks (the first n_sink, then
    n_local from l_lo) to the output row p_o in ascending order, -1 after them. Without a sort: a kept block's
    column is the number of kept blocks below it."""
    BIG: tl.constexpr = 1 << 30
    j_c = tl.where(chosen, (2147483647 - (b_c & 2147483647)).to(tl.int32), BIG)
    o_f = tl.arange(0, FP)
    j_f = tl.where(o_f < SINK, o_f, l_lo + o_f - SINK)
    ok_f = ((o_f < SINK) & (o_f < n_sink)) | ((o_f >= SINK) & (o_f - SINK < n_local))
    j_f = tl.where(ok_f, j_f, BIG)
    col_c = tl.sum((j_c[None, :] < j_c[:, None]).to(tl.int32), 1) + tl.sum(
        (j_f[None, :] < j_c[:, None]).to(tl.int32), 1
    )
    col_f = tl.sum((j_f[None, :] < j_f[:, None]).to(tl.int32), 1) + tl.sum(
        (j_c[None, :] < j_f[:, None]).to(tl.int32), 1
    )
    tl.store(p_o + col_c, j_c, mask=chosen & (col_c < S))
    tl.store(p_o + col_f, j_f, mask=ok_f & (col_f < S))
    n_keep = tl.sum(chosen.to(tl.int32), 0) + n_sink + n_local
    o_s = tl.arange(0, SP)
    tl.store(p_o + o_s, tl.full([SP], -1, dtype=tl.int32), mask=(o_s >= n_keep) & (o_s < S))


@triton.jit(do_not_specialize=PER_STEP)
def _decode_finish_kernel(
    logits,  # [B * T * H, G, NB] float32 (log2 domain)
    stats,  # [B * T * H, NSPLIT, 2, GP] float32
    imp,  # [B * T * H, NB] int32 scratch (fallback): float bits of the candidates' importance, -1 elsewhere
    comp,  # [B * T * H, CAP] int64 scratch: the surviving keys
    q_pos,
    doc_start,
    out,  # [B, T, H, S] int32 out
    T,
    TK,
    NB,
    NSPLIT,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,  # rows for the group here: next power of two >= G
    GS: tl.constexpr,  # head stride of `stats` (the scoring kernel's padded group)
    NSP: tl.constexpr,  # splits of `stats` read at a time
    BS: tl.constexpr,
    S: tl.constexpr,
    SP: tl.constexpr,
    FP: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    BN: tl.constexpr,
    LG: tl.constexpr,
    CAP: tl.constexpr,
    FAST: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    _finish_row(logits, stats, imp, comp, q_pos, doc_start, out, T, TK, NB, NSPLIT, tl.program_id(0).to(tl.int64),
                H, G, GP, GS, NSP, BS, S, SP, FP, SINK, LOCAL, BN, LG, CAP, FAST, HAS_POS, HAS_DOCS)  # fmt: skip


@triton.jit
def _finish_row(logits, stats, imp, comp, q_pos, doc_start, out, T, TK, NB, NSPLIT, i_bth, H: tl.constexpr,
                G: tl.constexpr, GP: tl.constexpr, GS: tl.constexpr, NSP: tl.constexpr, BS: tl.constexpr,
                S: tl.constexpr, SP: tl.constexpr, FP: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr,
                BN: tl.constexpr, LG: tl.constexpr, CAP: tl.constexpr, FAST: tl.constexpr, HAS_POS: tl.constexpr,
                HAS_DOCS: tl.constexpr):  # fmt: skip
    """`_decode_finish_kernel`'s program for row i_bth: its output row of block indices from the logits and the
    scoring's statistics (also the second phase of `_decode_step_kernel`)."""
    pos, cur, n_c, c_lo, n_sink, l_lo, n_local, budget = _row_blocks(
        q_pos, doc_start, i_bth, T, TK, NB, H, BS, S, SINK, LOCAL, HAS_POS, HAS_DOCS
    )
    o_g = tl.arange(0, GP)
    m_g = o_g < G
    o_b = tl.arange(0, BN)

    # ---- softmax statistics of every head over all complete blocks, from the splits
    b_m, b_il = _merged_stats(stats, i_bth, NSPLIT, G, GP, GS, NSP)

    p_l = logits + i_bth * G * NB
    p_o = out + i_bth * S
    o_s = tl.arange(0, SP)

    # ---- fast path: key = (importance bits << 32) | (2^31 - 1 - j) (unique; larger is better, ties to the lower
    # block). Lane i of the chunk keeps the 3 best keys of blocks j = i (mod BN): no reduction inside the loop.
    t1 = tl.full([BN], -1, dtype=tl.int64)
    t2 = tl.full([BN], -1, dtype=tl.int64)
    t3 = tl.full([BN], -1, dtype=tl.int64)
    if FAST:
        for s0 in range(0, n_c, BN):
            o_n = s0 + o_b
            m_n = o_n < n_c
            key = _block_keys(p_l, o_n, m_n, b_m, b_il, c_lo, NB, G, GP, SINK)
            n3 = tl.maximum(t3, tl.minimum(t2, key))
            n2 = tl.maximum(t2, tl.minimum(t1, key))
            t1 = tl.maximum(t1, key)
            t2 = n2
            t3 = n3
    # lower bound on the budget-th best key: the budget-th best of LG lane-group maxima (distinct blocks)
    g_max = tl.max(tl.reshape(t1, [BN // LG, LG]), 0)
    g_rank = tl.sum((g_max[None, :] > g_max[:, None]).to(tl.int32), 1)
    lb = tl.max(tl.where((g_rank == budget - 1) & (g_max >= 0), g_max, -1), 0)
    lb = tl.where(budget > 0, tl.maximum(lb, 0), 9223372036854775807)
    # survivors (keys >= lb) of the three tiers, compacted in tier order
    s1 = t1 >= lb
    s2 = t2 >= lb
    s3 = t3 >= lb
    c1 = tl.cumsum(s1.to(tl.int32), 0)
    c2 = tl.cumsum(s2.to(tl.int32), 0)
    c3 = tl.cumsum(s3.to(tl.int32), 0)
    n1 = tl.sum(s1.to(tl.int32), 0)
    n2 = tl.sum(s2.to(tl.int32), 0)
    n_s = n1 + n2 + tl.sum(s3.to(tl.int32), 0)
    p_c = comp + i_bth * CAP
    pos1 = c1 - 1
    pos2 = n1 + c2 - 1
    pos3 = n1 + n2 + c3 - 1
    tl.store(p_c + pos1, t1, mask=s1 & (pos1 < CAP))
    tl.store(p_c + pos2, t2, mask=s2 & (pos2 < CAP))
    tl.store(p_c + pos3, t3, mask=s3 & (pos3 < CAP))
    tl.debug_barrier()  # read back below by other threads of this program
    o_c = tl.arange(0, CAP)
    b_c = tl.load(p_c + o_c, mask=o_c < n_s, other=-1)
    c_rank = tl.sum((b_c[None, :] > b_c[:, None]).to(tl.int32), 1)
    chosen = (b_c >= 0) & (c_rank < budget)
    # exact unless the survivors overflowed, or a lane's third key was chosen (its fourth might beat the last one)
    deep = tl.sum((chosen & (o_c >= n1 + n2)).to(tl.int32), 0)
    fast = FAST & (n_s <= CAP) & (deep == 0)
    if fast:
        _store_ascending(p_o, b_c, chosen, n_sink, n_local, l_lo, S, SP, FP, SINK)
    else:
        # ---- exact fallback: importance bits of every candidate to scratch, bisection, ordered output pass
        p_i = imp + i_bth * NB
        cnt_v = tl.zeros([BN], dtype=tl.int32)
        for s0 in range(0, n_c, BN):
            o_n = s0 + o_b
            m_n = o_n < n_c
            m_gn = m_g[:, None] & m_n[None, :]
            b_s = tl.load(p_l + o_g[:, None] * NB + o_n[None, :], mask=m_gn, other=float("-inf"))
            b_i = tl.sum(tl.where(m_gn, tl.exp2(b_s - b_m[:, None]) * b_il[:, None], 0.0), 0)
            cand = m_n & (o_n >= SINK) & (o_n < c_lo)
            tl.store(p_i + o_n, tl.where(cand, b_i.to(tl.int32, bitcast=True), -1), mask=m_n)
            cnt_v += cand.to(tl.int32)
        n_cand = tl.sum(cnt_v, 0)
        tl.debug_barrier()  # the row is read back below by other threads of this program
        # threshold: the largest tau with #{bits >= tau} >= budget (branch-free: scalars keep one type)
        zero = pos * 0
        lo = zero
        hi = zero + 0x7F800000  # +inf: importance is finite and >= 0
        for _ in range(0, 31):
            mid = lo + (hi - lo + 1) // 2
            cnt_v = tl.zeros([BN], dtype=tl.int32)
            for s0 in range(0, n_c, BN):
                o_n = s0 + o_b
                bits = tl.load(p_i + o_n, mask=o_n < n_c, other=-1)
                cnt_v += (bits >= mid).to(tl.int32)
            ok = tl.sum(cnt_v, 0) >= budget
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        tau = tl.where(n_cand > budget, lo, -1)  # -1: every candidate fits (bits >= 0 > tau)
        cnt_v = tl.zeros([BN], dtype=tl.int32)
        for s0 in range(0, n_c, BN):
            o_n = s0 + o_b
            bits = tl.load(p_i + o_n, mask=o_n < n_c, other=-1)
            cnt_v += (bits > tau).to(tl.int32)
        n_gt = tl.sum(cnt_v, 0)
        need = budget - n_gt  # how many of the blocks exactly at tau are taken, lowest index first
        # ascending output: each kept block goes to the column counting the kept blocks below it
        n_keep = zero
        n_tie = zero
        for s0 in range(0, cur + 1, BN):
            o_n = s0 + o_b
            m_n = o_n <= cur
            bits = tl.load(p_i + o_n, mask=m_n & (o_n < n_c), other=-1)
            tie = (bits == tau) & (bits >= 0)
            tie_rank = n_tie + tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)
            forced = m_n & ((o_n < SINK) | (o_n >= c_lo))
            keep = forced | (bits > tau) | (tie & (tie_rank < need))
            keep = keep & m_n
            k32 = keep.to(tl.int32)
            col = n_keep + tl.cumsum(k32, 0) - k32
            tl.store(p_o + col, o_n, mask=keep & (col < S))
            n_keep += tl.sum(k32, 0)
            n_tie += tl.sum(tie.to(tl.int32), 0)
        tl.store(p_o + o_s, tl.full([SP], -1, dtype=tl.int32), mask=(o_s >= n_keep) & (o_s < S))


@triton.jit
def _kth_key(v, budget, PAIRS: tl.constexpr):
    """The threshold tau for which the keys v >= tau are the `budget` best of v (unique where >= 0; -1: none): the
    budget-th best key, the lowest set key when at most `budget` are set, int64 max when budget is 0 or none is.
    PAIRS: by pairwise ranks ([N, N] comparisons), else by a bisection over the key values (63 counting passes)."""
    BIG: tl.constexpr = 9223372036854775807
    if PAIRS:
        rank = tl.sum((v[None, :] > v[:, None]).to(tl.int32), 1)
        tau = tl.min(tl.where((v >= 0) & (rank < budget), v, BIG), 0)
    else:
        tau = tl.max(v, 0) * 0
        hi = tl.max(v, 0)
        for _ in range(0, 63):
            mid = tau + (hi - tau + 1) // 2
            ok = tl.sum((v >= mid).to(tl.int32), 0) >= budget
            tau = tl.where(ok, mid, tau)
            hi = tl.where(ok, hi, mid - 1)
    lowest = tl.min(tl.where(v >= 0, v, BIG), 0)  # at most `budget` set: all of them
    tau = tl.where(tl.sum((v >= 0).to(tl.int32), 0) > budget, tau, lowest)
    return tl.where(budget > 0, tau, BIG)


@triton.jit
def _chunk_threshold(key, budget, LG: tl.constexpr, CAP: tl.constexpr, SMALL: tl.constexpr, p_c, BN: tl.constexpr):
    """`_kth_key` of one chunk's keys [BN]. Fast: the budget-th best of LG lane-group maxima (distinct blocks) bounds
    it from below, and the few keys above that bound (compacted through p_c [CAP]) are ranked exactly ([SMALL, SMALL]
    comparisons when at most SMALL survive, the usual case, else [CAP, CAP]); more than CAP of them: a bisection."""
    g_max = tl.max(tl.reshape(key, [BN // LG, LG]), 0)
    g_rank = tl.sum((g_max[None, :] > g_max[:, None]).to(tl.int32), 1)
    lb = tl.max(tl.where((g_rank == budget - 1) & (g_max >= 0), g_max, -1), 0)
    lb = tl.where(budget > 0, tl.maximum(lb, 0), 9223372036854775807)
    surv = key >= lb
    n_s = tl.sum(surv.to(tl.int32), 0)
    at = tl.cumsum(surv.to(tl.int32), 0) - 1
    tl.store(p_c + at, key, mask=surv & (at < CAP))
    tl.debug_barrier()  # read back below by other threads of this program
    if n_s <= SMALL:
        o_c = tl.arange(0, SMALL)
        tau = _kth_key(tl.load(p_c + o_c, mask=o_c < n_s, other=-1), budget, True)
    elif n_s <= CAP:
        o_c = tl.arange(0, CAP)
        tau = _kth_key(tl.load(p_c + o_c, mask=o_c < n_s, other=-1), budget, True)
    else:
        tau = _kth_key(key, budget, False)
    return tau


@triton.jit(do_not_specialize=PER_STEP)
def _decode_finish_chunks_kernel(
    logits,  # [B * T * H, G, NB] float32 (log2 domain)
    stats,  # [B * T * H, NSPLIT, 2, GS] float32
    comp,  # [B * T * H, NCH, CAP] int64 scratch: a chunk's surviving keys
    cand,  # [B * T * H, NCH, SP] int64 scratch: each chunk's best keys, ascending by block, -1 after them
    count,  # [B * T * H] int32, 0 between calls: chunks of the row done
    q_pos,
    doc_start,
    out,  # [B, T, H, S] int32 out
    T,
    TK,
    NB,
    NSPLIT,
    NCH,  # chunks of BN blocks per row (the grid's second axis)
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    GS: tl.constexpr,
    NSP: tl.constexpr,
    BS: tl.constexpr,
    S: tl.constexpr,
    SP: tl.constexpr,
    FP: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    BN: tl.constexpr,
    LG: tl.constexpr,
    CAP: tl.constexpr,
    SMALL: tl.constexpr,  # survivors up to this many are ranked in a SMALL x SMALL comparison
    NV: tl.constexpr,  # next power of two >= NCH * SP: the merged candidates
    PAIRS: tl.constexpr,  # rank the merged candidates by pairwise comparison (else bisection)
    HAS_POS: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Finishing split over chunks of BN blocks, in one launch, grid (B * T * H, NCH): each program keeps its
    chunk's `budget` best keys (any of the row's best is among its chunk's best), and the row's last program to
    finish (counted atomically) merges the NCH * SP candidates into the output row and resets the count."""
    i_bth = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    pos, cur, n_c, c_lo, n_sink, l_lo, n_local, budget = _row_blocks(
        q_pos, doc_start, i_bth, T, TK, NB, H, BS, S, SINK, LOCAL, HAS_POS, HAS_DOCS
    )
    b_m, b_il = _merged_stats(stats, i_bth, NSPLIT, G, GP, GS, NSP)
    o_n = i_c * BN + tl.arange(0, BN)
    key = _block_keys(logits + i_bth * G * NB, o_n, o_n < n_c, b_m, b_il, c_lo, NB, G, GP, SINK)
    tau = _chunk_threshold(key, budget, LG, CAP, SMALL, comp + (i_bth * NCH + i_c) * CAP, BN)
    keep = (key >= tau) & (key >= 0)
    k32 = keep.to(tl.int32)
    col = tl.cumsum(k32, 0) - 1  # ascending blocks: lanes are in block order
    p_cand = cand + i_bth * NCH * SP
    tl.store(p_cand + i_c * SP + col, key, mask=keep & (col < SP))
    o_s = tl.arange(0, SP)
    tl.store(p_cand + i_c * SP + o_s, tl.full([SP], -1, dtype=tl.int64), mask=o_s >= tl.sum(k32, 0))
    tl.debug_barrier()  # every thread's candidates are written before the count says so
    if tl.atomic_add(count + i_bth, 1, sem="acq_rel") == NCH - 1:
        # ---- the row's last chunk: the budget best of all chunks' candidates, then the output row
        o_v = tl.arange(0, NV)
        v = tl.load(p_cand + o_v, mask=o_v < NCH * SP, other=-1, cache_modifier=".cg")
        chosen = (v >= 0) & (v >= _kth_key(v, budget, PAIRS))
        c32 = chosen.to(tl.int32)
        n_ch = tl.sum(c32, 0)
        p_o = out + i_bth * S
        # columns: the sinks, then the chosen blocks (chunk by chunk, each ascending), then the local blocks
        tl.store(p_o + n_sink + tl.cumsum(c32, 0) - c32, (2147483647 - (v & 2147483647)).to(tl.int32), mask=chosen)
        o_f = tl.arange(0, FP)
        tl.store(p_o + o_f, o_f, mask=o_f < n_sink)
        tl.store(p_o + n_sink + n_ch + o_f, l_lo + o_f, mask=o_f < n_local)
        n_keep = n_sink + n_ch + n_local
        tl.store(p_o + o_s, tl.full([SP], -1, dtype=tl.int32), mask=(o_s >= n_keep) & (o_s < S))
        tl.atomic_xchg(count + i_bth, 0)


_COUNTS: dict[torch.device, torch.Tensor] = {}


def _row_counts(device: torch.device, units: int) -> torch.Tensor:
    """The chunked finishing's per-row counters [>= units] int32: zero between calls (the row's last program
    resets its count), so they are allocated once per device and kept. Calls on one device must not overlap
    (one stream at a time, as a decode loop runs)."""
    counts = _COUNTS.get(device)
    if counts is None or counts.numel() < units:
        counts = _COUNTS[device] = torch.zeros(max(units, 4096), dtype=torch.int32, device=device)
    return counts


def _stats_chunk(nsplit: int, G: int, chunk: int | None) -> int:
    """Splits whose statistics the finishing kernels read in one load: `chunk` (`DecodeOptions.stats_chunk`), or
    all of them, up to 2048 values."""
    if chunk is not None:
        return max(2, chunk)
    return max(2, min(next_pow2(nsplit), 2048 // max(2, next_pow2(G))))


def check_selection(block_count: int, sink_blocks: int, local_blocks: int) -> None:
    """The selection settings the decode kernels take (else a ValueError naming them)."""
    if sink_blocks < 0 or local_blocks < 0 or block_count < 1 or sink_blocks + local_blocks > block_count:
        raise ValueError(
            f"sink_blocks={sink_blocks}, local_blocks={local_blocks}, block_count={block_count}: the kernels need "
            "0 <= sink_blocks + local_blocks <= block_count (use backend='reference' otherwise)."
        )


@torch.no_grad()
def decode_select(
    q: torch.Tensor,
    block_means: torch.Tensor,
    q_pos: torch.Tensor | None = None,
    *,
    block_size: int = 16,
    block_count: int = 16,
    sink_blocks: int = 0,
    local_blocks: int = 1,
    scale: float | None = None,
    key_len: int | None = None,
    doc_start: torch.Tensor | None = None,
    num_splits: int | None = None,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """SSA block selection from cached block means, for few queries per row (inference only, no gradient).

    q [B, T, HQ, D], block_means [B, NB, H, D] (float32, complete blocks of each row's document, relative to its
    start; rows with fewer complete blocks may hold garbage after their last one), q_pos [B, T] the position of
    each query inside its document -> block_indices [B, T, H, block_count] int32, ascending, -1 padded: the
    sink blocks, the `local_blocks` blocks ending with the query's block, and the best other complete blocks
    (j complete iff (j + 1) * BS - 1 <= pos) by I(j) = sum over the group of softmax_j(scale * q . kbar_j).
    Equal to `reference.select_blocks(..., block_means=...)` up to importance ties within float32 rounding.
    Without q_pos, positions are `key_len - T + t - doc_start[b, t]` (doc_start None: 0), as for a KV cache of
    `key_len` keys. num_splits: programs per (query, KV head) in the scoring pass (default: fill the GPU).
    options: `KernelOptions` (None: the defaults); reads `options.decode` and `options.poison`.
    """
    B, T, HQ, D = q.shape
    Bm, NB, H, Dm = block_means.shape
    if Bm != B or Dm != D or HQ % H:
        raise ValueError(
            f"block_means must be [B, NB, H, D] for q {tuple(q.shape)} (HQ a multiple of H); "
            f"got {tuple(block_means.shape)}."
        )
    check_block_size(block_size)
    check_selection(block_count, sink_blocks, local_blocks)
    if q_pos is None:
        if key_len is None:
            raise ValueError("decode_select needs q_pos [B, T], or key_len (and doc_start) to derive it.")
        ds = check_doc_start(doc_start, B, T, q.device)
        if key_len < T:
            raise ValueError(f"key_len={key_len} is shorter than the {T} queries.")
    else:
        if q_pos.shape != (B, T):
            raise ValueError(f"q_pos must be [B, T] = {(B, T)}; got {tuple(q_pos.shape)}.")
        q_pos = q_pos.to(device=q.device, dtype=torch.int64).contiguous()
        ds, key_len = None, T
    options = DEFAULT_OPTIONS if options is None else options
    opt, poison = options.decode, options.poison
    scale = D**-0.5 if scale is None else scale
    G = HQ // H
    S = block_count
    out = utils.new_empty((B, T, H, S), torch.int32, q.device, poison)
    if out.numel() == 0:
        return out
    q = last_dim_contiguous(q)
    kbar = block_means if block_means.dtype == torch.float32 else block_means.float()
    kbar = last_dim_contiguous(kbar)
    GP = max(16, next_pow2(G))
    BD = max(16, next_pow2(D))
    units = B * T * H
    nsplit = split_count(units, cdiv(max(NB, 1), opt.score_blocks), q.device, num_splits, opt.programs_per_sm)
    bps = cdiv(cdiv(max(NB, 1), nsplit), opt.score_blocks) * opt.score_blocks
    nsplit = cdiv(max(NB, 1), bps)
    nb = max(NB, 1)
    nch = cdiv(nb, opt.chunk_blocks)
    finish = opt.finish
    if finish == "auto":
        finish = "chunks" if units * nch <= num_programs(q.device, opt.chunk_programs_per_sm) else "row"
    SP = max(2, next_pow2(S))
    chunks = finish == "chunks"
    # one scratch allocation (a decode step is launch-bound): logits [units, G, nb], stats [units, nsplit, 2, GP],
    # chunks: the chunks' candidates [units, nch, SP] int64, row: importance bits [units, nb] int32; surviving keys
    # [units, caps, CAP] int64
    imp_words = 2 * units * nch * SP if chunks else units * nb
    caps = nch if chunks else 1
    logits, stats, imp, comp = workspace(
        q.device, poison, units * G * nb, units * nsplit * 2 * GP, imp_words, 2 * units * caps * opt.finish_cap
    )
    comp = comp.view(torch.int64)
    common = dict(HAS_POS=q_pos is not None, HAS_DOCS=ds is not None)
    _decode_score_kernel[(units, nsplit)](
        q,
        kbar,
        q_pos,
        ds,
        logits,
        stats,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        kbar.stride(0),
        kbar.stride(1),
        kbar.stride(2),
        T,
        key_len,
        NB,
        nsplit,
        bps,
        H=H,
        G=G,
        GP=GP,
        D=D,
        BD=BD,
        BS=block_size,
        BN=opt.score_blocks,
        PRECISION=opt.score_precision,
        num_warps=opt.score_warps,
        **common,
    )
    fp = max(2, next_pow2(sink_blocks + local_blocks))
    nsp = _stats_chunk(nsplit, G, opt.stats_chunk)
    if chunks:
        nv = max(2, next_pow2(nch * SP))
        _decode_finish_chunks_kernel[(units, nch)](
            logits, stats, comp, imp.view(torch.int64), _row_counts(q.device, units), q_pos, ds, out,
            T, key_len, NB, nsplit, nch,
            H=H, G=G, GP=max(2, next_pow2(G)), GS=GP, NSP=nsp, BS=block_size, S=S, SP=SP, FP=fp, SINK=sink_blocks,
            LOCAL=local_blocks, BN=opt.chunk_blocks, LG=min(opt.finish_groups, opt.chunk_blocks), CAP=opt.finish_cap,
            SMALL=min(opt.chunk_small, opt.finish_cap), NV=nv, PAIRS=nv <= opt.chunk_pairs, num_warps=opt.finish_warps,
            **common,
        )  # fmt: skip
        return out
    imp = imp.view(torch.int32)
    _decode_finish_kernel[(units,)](
        logits,
        stats,
        imp,
        comp,
        q_pos,
        ds,
        out,
        T,
        key_len,
        NB,
        nsplit,
        H=H,
        G=G,
        GP=max(2, next_pow2(G)),
        GS=GP,
        NSP=nsp,
        BS=block_size,
        S=S,
        SP=SP,
        FP=fp,
        SINK=sink_blocks,
        LOCAL=local_blocks,
        BN=opt.finish_blocks,
        LG=min(opt.finish_groups, opt.finish_blocks),
        CAP=opt.finish_cap,
        FAST=opt.finish_fast,
        num_warps=opt.finish_warps,
        **common,
    )
    return out
