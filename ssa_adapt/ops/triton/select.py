"""SSA block selection in Triton: block means, then per (query tile, KV head) three passes over the complete blocks
(softmax statistics; a lower bound on each token's budget-th best importance from lane maxima; the blocks at or
above it, ranked exactly), so no [T, T / BS] tensor ever reaches global memory and no top-k loop runs in the common case.

q [B, T, HQ, D], k [B, TK, H, D] -> block_indices [B, T, H, S] int32 (ascending, relative to the document start,
-1 in unused slots). Same contract as `ssa_adapt.ops.reference.select_blocks`; README.md has the derivations.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference import check_qkv
from . import utils
from .options import DEFAULT_OPTIONS, KernelOptions, SelectOptions
from .utils import (
    cdiv,
    check_block_size,
    check_doc_start,
    dot_precision,
    group_pad,
    kbar_dtype,
    next_pow2,
    slot_starts,
)

__all__ = ["select_blocks", "block_means"]


@triton.jit(do_not_specialize=["TK", "NSLOT"])
def _block_means_kernel(
    k,  # [B, TK, H, D]
    slot_start,  # [B, NSLOT] int32 or None: first key of each slot's block (-1: none)
    kbar,  # [B, H, NSLOT, BD] out
    mult,  # each mean is stored times this (the selection's logit scale)
    TK,
    NSLOT,
    H: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BN: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_n = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_n = o_n < NSLOT
    if HAS_DOCS:
        start = tl.load(slot_start + i_b * NSLOT + o_n, mask=m_n, other=-1)
    else:
        start = o_n * BS
    m_k = m_n & (start >= 0)
    p_k = k + (i_b * TK * H + i_h) * D
    # [BN, BD] fp32 sum of the BS keys of each block
    b_acc = tl.zeros([BN, BD], dtype=tl.float32)
    for i in range(BS):
        row = (start + i).to(tl.int64)
        m = (m_k & (row < TK))[:, None] & (o_d < D)[None, :]
        b_acc += tl.load(p_k + row[:, None] * (H * D) + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    p_o = kbar + (i_bh * NSLOT + o_n)[:, None] * BD + o_d[None, :]
    tl.store(p_o, (b_acc * (mult / BS)).to(kbar.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _chunk_logits(b_q, p_kb, s0, NSLOT, BD: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Logits (log2 domain: the means carry the scale) of the tile's rows against the block means of slots
    [s0, s0 + BN): [M, BN] float32."""
    o_d = tl.arange(0, BD)
    o_s = s0 + tl.arange(0, BN)
    # [BN, BD]
    b_kb = tl.load(p_kb + o_s[:, None] * BD + o_d[None, :], mask=(o_s < NSLOT)[:, None], other=0.0)
    return tl.dot(b_q, tl.trans(b_kb), input_precision=DOT_PREC)


@triton.jit
def _group_probabilities(b_s, b_c, BT: tl.constexpr, GP: tl.constexpr, TL: tl.constexpr, BN: tl.constexpr):
    """exp2(L - (m + log2 l)) of [M, BN] logits summed over each token's heads -> [BT, BN] float32, no mask."""
    b_p = tl.exp2(b_s - b_c[:, None])
    return tl.reshape(tl.sum(tl.reshape(b_p, [BT // TL, GP, TL, BN]), 1), [BT, BN])


@triton.jit
def _importances(
    b_s,  # [M, BN] the chunk's logits (`_chunk_logits`)
    s0,  # first slot of the chunk
    b_c,  # [M] log2 of the softmax normaliser with its max, m + log2(l) (log2 domain); +BIG for rows without one
    t_base,  # [BT] slot of the token's document block 0
    t_n,  # [BT] the token's candidates are SINK <= j < SINK + t_n
    BT: tl.constexpr,
    GP: tl.constexpr,
    TL: tl.constexpr,
    BN: tl.constexpr,
    SINK: tl.constexpr,
):
    """I(j) of the chunk's blocks per token, [BT, BN] float32, -1 where block j is not a candidate of the token;
    and j itself, [BT, BN] int32 (relative to the token's document).

    Rows are ordered (token // TL, head, token % TL) (`_row_token_head`), so the group sum is a reshape and a sum.
    A head's probability is one exponential, exp2(L - (m + log2 l)): the normaliser rides in the exponent, not in a
    multiply. Rows without a normaliser (padded heads, tokens past T, no complete block) have +BIG there, so their
    exp2 is exactly 0 and no row mask is needed. A candidate of a token is a complete block of every row of that
    token; elsewhere exp2 may overflow, and the candidate mask replaces those values."""
    o_s = s0 + tl.arange(0, BN)
    b_i = _group_probabilities(b_s, b_c, BT, GP, TL, BN)
    jt = o_s[None, :] - t_base[:, None]
    # SINK <= jt < SINK + t_n as one unsigned compare
    cand = (jt - SINK).to(tl.uint32) < t_n.to(tl.uint32)[:, None]
    return tl.where(cand, b_i, -1.0), jt


@triton.jit
def _lane_chunk(b_q, p_kb, s0, NSLOT, b_c, t_base, t_n, b_lane, p_cm, m_t, BT: tl.constexpr, GP: tl.constexpr,
                TL: tl.constexpr, BD: tl.constexpr, LANES: tl.constexpr, SINK: tl.constexpr, MASKED: tl.constexpr,
                SKIP: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Pass 2 on the chunk of slots [s0, s0 + LANES): the lane maxima b_lane [BT, LANES] raised by its importances
    (MASKED: non-candidates count as -1; a chunk of candidates of every valid token needs no mask). SKIP: each
    valid token's best importance in the chunk also goes to p_cm [BT] (bfloat16) for pass 3."""
    b_s = _chunk_logits(b_q, p_kb, s0, NSLOT, BD, LANES, DOT_PREC)
    if MASKED:
        b_i, jt = _importances(b_s, s0, b_c, t_base, t_n, BT, GP, TL, LANES, SINK)
    else:
        b_i = _group_probabilities(b_s, b_c, BT, GP, TL, LANES)
    if SKIP:
        tl.store(p_cm, tl.max(b_i, 1).to(tl.bfloat16), mask=m_t)
    return tl.maximum(b_lane, b_i)


@triton.jit
def _row_token_head(o_r, GP: tl.constexpr, TL: tl.constexpr):
    """Token (within the tile) and head of each row o_r [M]: rows are ordered (token // TL, head, token % TL), so
    that with TL = 16 / GP the heads of a token sit in the high bits of a 16-row MMA fragment (the group sum then
    needs fewer shuffles, and its result fewer copies, than with the heads in the low bits)."""
    return (o_r // (TL * GP)) * TL + o_r % TL, (o_r // TL) % GP


@triton.jit
def _stats_chunk(b_q, p_kb, s0, NSLOT, r_base, r_nc, m_r, b_m, b_l, b_lane, BT: tl.constexpr, GP: tl.constexpr,
                 TL: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, RUNNING: tl.constexpr,
                 DOT_PREC: tl.constexpr):  # fmt: skip
    """Pass 1's online softmax statistics (max b_m, normaliser b_l, [M]) updated with the chunk of slots
    [s0, s0 + BN). MASKED: logits of blocks that are not complete blocks of the row's document become -inf (a chunk
    inside every row's complete blocks needs no mask: the same values).
    RUNNING: also lane maxima that bound each token's importances from below while the statistics grow: b_lane
    [BT, BN] (lane i: blocks j = s0 + i mod BN) first scaled by the token's smallest ratio of a head's old to new
    normaliser (2^m l; each <= 1), then raised by the chunk's importances under the new statistics; a value from
    chunk c so scaled up to the end is at most its block's final importance (README.md section 1). Else b_lane is
    returned as it came."""
    o_s = s0 + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    if MASKED:
        # [BN, BD]
        b_kb = tl.load(p_kb + o_s[:, None] * BD + o_d[None, :], mask=(o_s < NSLOT)[:, None], other=0.0)
        # [M, BN]
        b_s = tl.dot(b_q, tl.trans(b_kb), input_precision=DOT_PREC)
        j = o_s[None, :] - r_base[:, None]
        # 0 <= j < r_nc as one unsigned compare
        b_s = tl.where(j.to(tl.uint32) < tl.maximum(r_nc, 0).to(tl.uint32)[:, None], b_s, float("-inf"))
    else:
        b_kb = tl.load(p_kb + o_s[:, None] * BD + o_d[None, :])
        b_s = tl.dot(b_q, tl.trans(b_kb), input_precision=DOT_PREC)
    m_new = tl.maximum(b_m, tl.max(b_s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_e = tl.exp2(b_s - m_use[:, None])
    old = b_l * tl.exp2(b_m - m_use)
    l_new = old + tl.sum(b_e, 1)
    if RUNNING:
        ok = m_r & (l_new > 0)
        inv = tl.where(ok, 1.0 / tl.where(ok, l_new, 1.0), 0.0)
        ratio = tl.where(ok, old * inv, 1.0)  # [M]
        r_tok = tl.reshape(tl.min(tl.reshape(ratio, [BT // TL, GP, TL]), 1), [BT])
        imp = tl.reshape(tl.sum(tl.reshape(b_e * inv[:, None], [BT // TL, GP, TL, BN]), 1), [BT, BN])
        b_lane = tl.maximum(b_lane * r_tok[:, None], imp)
    return m_new, l_new, b_lane


@triton.jit
def _token_geometry(doc_start, i_b, i_t, T, off, BT: tl.constexpr, BS: tl.constexpr, SINK: tl.constexpr,
                    LOCAL: tl.constexpr, S: tl.constexpr, HAS_DOCS: tl.constexpr):  # fmt: skip
    """Per token of the tile [BT]: (valid, its block, its document's block-0 slot, end of its candidates (SINK <= j
    < t_hi), how many candidates it chooses: 0 for tokens past T, so that nothing of theirs is stored)."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    if HAS_DOCS:
        t_ds = tl.load(doc_start + i_b * T + o_t, mask=m_t, other=0).to(tl.int32)
    else:
        t_ds = tl.zeros([BT], dtype=tl.int32)
    t_pos = o_t + off - t_ds
    t_cur = t_pos // BS
    t_base = (t_ds + BS - 1) // BS
    t_hi = tl.minimum(t_cur - LOCAL + 1, (t_pos + 1) // BS)
    n_sink = tl.minimum(t_cur + 1, SINK)
    n_local = tl.maximum(t_cur - tl.maximum(t_cur - LOCAL + 1, SINK) + 1, 0)
    return m_t, t_cur, t_base, t_hi, tl.where(m_t, S - n_sink - n_local, 0)


@triton.jit
def _lane_bound(p_lf, b_lane, budget, m_t, BT: tl.constexpr, LANES: tl.constexpr):
    """The budget-th largest of each token's lane maxima b_lane [BT, LANES] (importances of distinct candidates, so
    a lower bound on the token's budget-th best importance), lowered by 1e-6 relative and clamped at 0; +inf for
    tokens that choose nothing.
    Ranks come from the columns read back from the scratch rows p_lf [BT] (no [BT, LANES, LANES] tensor)."""
    o_l = tl.arange(0, LANES)
    tl.store(p_lf[:, None] + o_l[None, :], b_lane, mask=m_t[:, None])
    tl.debug_barrier()
    l_rank = tl.zeros([BT, LANES], dtype=tl.int32)  # lanes strictly above this one
    for i_c in range(0, LANES):
        col = tl.load(p_lf + i_c, mask=m_t, other=-1.0)
        l_rank += (col[:, None] > b_lane).to(tl.int32)
    tl.debug_barrier()
    # with ties the budget-th largest value is the smallest of those with fewer than `budget` lanes above them
    bound = tl.min(tl.where(l_rank < budget[:, None], b_lane, float("inf")), 1)
    # lowered by ~8 float steps: pass 3 recomputes the importances, and a compiler that rounds one of them
    # differently (FMA contraction) must not push a lane maximum below the bound; a few more survivors cost nothing
    return tl.maximum(bound * (1.0 - 1e-6), 0.0)


@triton.jit
def _rank_survivors(p_sf, cnt, CAP: tl.constexpr, ROW: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr):
    """The best KP of the cnt [BT] survivors in each token's scratch row p_sf [BT] (importances in columns [0, CAP),
    their blocks' int32 bits ROW columns later; at most CAP), better = larger importance, then the lower block (the
    reference's stable sort) -> their blocks [BT, KP] int32 in rank order (-1 where fewer). Exact ranks: each
    survivor against every column of its row."""
    o_c = tl.arange(0, CAP)
    o_k = tl.arange(0, KP)
    n_cnt = tl.minimum(cnt, CAP)
    m_c = o_c[None, :] < n_cnt[:, None]
    b_sf = tl.load(p_sf[:, None] + o_c[None, :], mask=m_c, other=-1.0)  # [BT, CAP]
    b_sj = tl.load(p_sf[:, None] + ROW + o_c[None, :], mask=m_c, other=0.0).to(tl.int32, bitcast=True)
    s_rank = tl.zeros([BT, CAP], dtype=tl.int32)
    for i_c in range(0, tl.max(n_cnt, 0)):
        m_i = i_c < n_cnt
        c_f = tl.load(p_sf + i_c, mask=m_i, other=-1.0)[:, None]  # -1: below every survivor
        c_j = tl.load(p_sf + ROW + i_c, mask=m_i, other=0.0).to(tl.int32, bitcast=True)[:, None]
        s_rank += ((c_f > b_sf) | ((c_f == b_sf) & (c_j < b_sj))).to(tl.int32)
    j_top = tl.full([BT, KP], -1, dtype=tl.int32)
    for r in tl.static_range(KP):
        j = tl.max(tl.where((s_rank == r) & m_c, b_sj, -1), 1)
        j_top = tl.where(o_k[None, :] == r, j[:, None], j_top)
    return j_top


@triton.jit
def _exact_fallback(b_q, p_kb, lo2, hi2, NSLOT, b_c, t_base, t_n, bound,
                    BT: tl.constexpr, GP: tl.constexpr, TL: tl.constexpr, BD: tl.constexpr, LANES: tl.constexpr,
                    KP: tl.constexpr, SINK: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """A tile where some token has more than CAP candidates at or above its bound: an online top-KP over those
    candidates, inserting each row's best remaining key until none is above its row's threshold; keys are
    (float bits of I << 32) | (2^31 - 1 - j), unique, ordered as the ranks of `_rank_survivors` -> [BT, KP] int32
    blocks in rank order."""
    o_k = tl.arange(0, KP)
    b_top = tl.full([BT, KP], -1, dtype=tl.int64)
    b_thr = tl.full([BT], -1, dtype=tl.int64)  # smallest key kept (-1 while the list is not full)
    for s0 in range(lo2, hi2, LANES):
        b_s = _chunk_logits(b_q, p_kb, s0, NSLOT, BD, LANES, DOT_PREC)
        b_i, jt = _importances(b_s, s0, b_c, t_base, t_n, BT, GP, TL, LANES, SINK)
        key = (b_i.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - jt).to(tl.int64)
        key = tl.where((b_i >= bound[:, None]) & (key > b_thr[:, None]), key, -1)
        n = tl.max(tl.max(key, 1), 0)
        while n >= 0:
            best = tl.max(key, 1)
            low = tl.min(b_top, 1)
            i_low = tl.min(tl.where(b_top == low[:, None], o_k[None, :], KP), 1)
            b_top = tl.where((best > low)[:, None] & (o_k[None, :] == i_low[:, None]), best[:, None], b_top)
            b_thr = tl.min(b_top, 1)
            key = tl.where((key != best[:, None]) & (key > b_thr[:, None]), key, -1)
            n = tl.max(tl.max(key, 1), 0)
    rank = tl.sum((b_top[:, None, :] > b_top[:, :, None]).to(tl.int32), 2)  # [BT, KP] keys better than this one
    j_all = (2147483647 - (b_top & 2147483647)).to(tl.int32)
    j_top = tl.full([BT, KP], -1, dtype=tl.int32)
    for r in tl.static_range(KP):
        j = tl.max(tl.where((rank == r) & (b_top >= 0), j_all, -1), 1)
        j_top = tl.where(o_k[None, :] == r, j[:, None], j_top)
    return j_top


@triton.jit
def _survivor_chunk(b_q, p_kb, s0, NSLOT, b_c, t_base, t_n, bound, cnt, p_sf, tri, BT: tl.constexpr,
                    GP: tl.constexpr, TL: tl.constexpr, BD: tl.constexpr, LANES: tl.constexpr, SINK: tl.constexpr,
                    CAP: tl.constexpr, ROW: tl.constexpr, PREFIX_DOT: tl.constexpr,
                    DOT_PREC: tl.constexpr):  # fmt: skip
    """Pass 3 on the chunk of slots [s0, s0 + LANES): its candidates at or above their token's bound appended to
    the token's scratch row p_sf [BT] (importances, then their blocks' bits ROW columns later) -> the counts cnt
    [BT] raised by the chunk's survivors."""
    b_s = _chunk_logits(b_q, p_kb, s0, NSLOT, BD, LANES, DOT_PREC)
    b_i, jt = _importances(b_s, s0, b_c, t_base, t_n, BT, GP, TL, LANES, SINK)
    keep = b_i >= bound[:, None]
    if PREFIX_DOT:
        at = cnt[:, None] + tl.dot(keep.to(tl.float16), tri).to(tl.int32) - 1
    else:
        at = cnt[:, None] + tl.cumsum(keep.to(tl.int32), 1) - 1
    m_st = keep & (at < CAP)
    p_at = p_sf[:, None] + at
    tl.store(p_at, b_i, mask=m_st)
    tl.store(p_at + ROW, jt.to(tl.float32, bitcast=True), mask=m_st)
    return cnt + tl.sum(keep.to(tl.int32), 1)


@triton.jit
def _popc(x):
    """Set bits of each uint32 element -> int32. Written out (SWAR) since the interpreter has no popcount; ptxas
    compiles it to one POPC."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _mask_chunk(b_q, p_kb, s0, NSLOT, b_c, t_base, t_n, bound, bit, p_w, m_t, BT: tl.constexpr, GP: tl.constexpr,
                TL: tl.constexpr, BD: tl.constexpr, LANES: tl.constexpr, WL: tl.constexpr, SINK: tl.constexpr,
                MASKED: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Pass 3 with survivor masks on the chunk of slots [s0, s0 + LANES): which candidates reach their token's
    bound, as LANES / WL words of WL bits per token (bit [BT, W, WL]: each lane's bit), stored to p_w [BT] (word i
    at p_w + i, float32 bits). No per-survivor store: the survivors' importances are recomputed once per tile
    (`_survivor_importances`)."""
    W: tl.constexpr = LANES // WL
    b_s = _chunk_logits(b_q, p_kb, s0, NSLOT, BD, LANES, DOT_PREC)
    if MASKED:
        b_i, _ = _importances(b_s, s0, b_c, t_base, t_n, BT, GP, TL, LANES, SINK)
    else:
        b_i = _group_probabilities(b_s, b_c, BT, GP, TL, LANES)
    keep = tl.reshape(b_i >= bound[:, None], [BT, W, WL])
    words = tl.reduce_or(tl.where(keep, bit, 0), 2)  # [BT, W]
    o_w = tl.arange(0, W)
    tl.store(p_w[:, None] + o_w[None, :], words.to(tl.float32, bitcast=True), mask=m_t[:, None])


@triton.jit
def _decode_masks(p_sf, cnt, s0, n_words, m_t, WL: tl.constexpr, ROW: tl.constexpr, CAP: tl.constexpr,
                  BT: tl.constexpr):  # fmt: skip
    """The survivor masks of a segment (n_words words of WL bits in columns [0, n_words) of the scratch rows p_sf
    [BT]; word i covers slots s0 + i WL ...) appended as slots to the tokens' lists (columns ROW + [0, CAP), float32
    bits; a list's column is its token's count so far) -> the counts cnt [BT] raised by the segment's survivors.
    Each word's survivors start at the token's count plus the bits of the words before it (a prefix over the
    words, not over blocks); the k-th step of the loop extracts every word's k-th lowest bit."""
    o_c = tl.arange(0, ROW)
    m_w = m_t[:, None] & (o_c[None, :] < n_words)
    # a stride of 1 the compiler cannot see: with columns known to be contiguous it vectorises this load, and the
    # stores below (one element per thread) then convert their pointers, values and masks through shared memory
    # at every step (187 instead of 101 instructions per step at G = 3, sm_90, Triton 3.6)
    one = (n_words >= 0).to(tl.int32)
    words = tl.load(p_sf[:, None] + o_c[None, :] * one, mask=m_w, other=0.0).to(tl.uint32, bitcast=True)
    n_w = _popc(words)  # [BT, ROW]
    at = cnt[:, None] + tl.cumsum(n_w, 1) - n_w
    slot0 = s0 + o_c * WL
    rem = words
    for k in range(0, tl.max(tl.max(n_w, 1), 0)):
        low = rem & (~rem + 1)
        col = at + k
        slot = slot0[None, :] + _popc(low - 1)
        tl.store(p_sf[:, None] + ROW + col, slot.to(tl.float32, bitcast=True), mask=(rem != 0) & (col < CAP))
        rem = rem ^ low
    return cnt + tl.sum(n_w, 1)


@triton.jit
def _survivor_importances(q_rows, p_kb, p_sf, cnt, b_c, m_t, BT: tl.constexpr, GP: tl.constexpr, TL: tl.constexpr,
                          G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, CAP: tl.constexpr, ROW: tl.constexpr,
                          CC: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """I(j) of each token's listed survivors (slots in columns ROW + [0, cnt)), recomputed: the tokens' G query
    heads [BT, GP, BD] against the gathered block means [BT, BD, CC] of CC survivors at a time (a batched dot), one
    exponential per head with the same normaliser m + log2 l as the passes, summed over the group; stored in columns
    [0, cnt) for `_rank_survivors`. q_rows [BT]: pointers to each token's first query head of the group."""
    o_g = tl.arange(0, GP)
    o_d = tl.arange(0, BD)
    o_cc = tl.arange(0, CC)
    m_q = m_t[:, None, None] & (o_g < G)[None, :, None] & (o_d < D)[None, None, :]
    q3 = tl.load(q_rows[:, None, None] + (o_g * D)[None, :, None] + o_d[None, None, :], mask=m_q, other=0.0)
    q3 = q3.to(p_kb.dtype.element_ty)
    # the normaliser per (token, head): rows are ordered (token // TL, head, token % TL)
    c3 = tl.reshape(tl.permute(tl.reshape(b_c, [BT // TL, GP, TL]), (0, 2, 1)), [BT, GP])
    n_cnt = tl.minimum(cnt, CAP)
    for c0 in range(0, tl.max(n_cnt, 0), CC):
        col = c0 + o_cc
        m_c = col[None, :] < n_cnt[:, None]  # [BT, CC]
        slot = tl.load(p_sf[:, None] + ROW + col[None, :], mask=m_c, other=0.0).to(tl.int32, bitcast=True)
        kb = tl.load(p_kb + slot[:, None, :] * BD + o_d[None, :, None], mask=m_c[:, None, :], other=0.0)
        logit = tl.dot(q3, kb, input_precision=DOT_PREC)  # [BT, GP, CC]
        imp = tl.sum(tl.exp2(logit - c3[:, :, None]), 1)
        tl.store(p_sf[:, None] + col[None, :], imp, mask=m_c)


@triton.jit
def _pass2_bound(b_q, p_kb, NSLOT, b_c, t_base, t_n, p_sf, p_cm, m_t, budget, lo2, n2, c_lo2, c_hi2,
                 BT: tl.constexpr, GP: tl.constexpr, TL: tl.constexpr, BD: tl.constexpr, LANES: tl.constexpr,
                 SINK: tl.constexpr, INTERIOR: tl.constexpr, SKIP: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Pass 2 (the kernel's comment): each token's lower bound on its budget-th best importance [BT]."""
    b_lane = tl.full([BT, LANES], -1.0, dtype=tl.float32)
    if INTERIOR:
        for c in range(c_lo2, c_hi2):
            b_lane = _lane_chunk(b_q, p_kb, lo2 + c * LANES, NSLOT, b_c, t_base, t_n, b_lane, p_cm + c, m_t,
                                 BT, GP, TL, BD, LANES, SINK, False, SKIP, DOT_PREC)  # fmt: skip
    for c in range(0, c_lo2):
        b_lane = _lane_chunk(b_q, p_kb, lo2 + c * LANES, NSLOT, b_c, t_base, t_n, b_lane, p_cm + c, m_t,
                             BT, GP, TL, BD, LANES, SINK, True, SKIP, DOT_PREC)  # fmt: skip
    for c in range(c_hi2, n2):
        b_lane = _lane_chunk(b_q, p_kb, lo2 + c * LANES, NSLOT, b_c, t_base, t_n, b_lane, p_cm + c, m_t,
                             BT, GP, TL, BD, LANES, SINK, True, SKIP, DOT_PREC)  # fmt: skip
    return _lane_bound(p_sf, b_lane, budget, m_t, BT, LANES)


@triton.jit
def _pass3(b_q, p_kb, NSLOT, b_c, t_base, t_n, bound, p_sf, p_cm, m_t, lo2, hi2, n2, c_lo2, c_hi2, chunk_list,
           skip_stats, i_bh, i_t, NCH, BT: tl.constexpr, GP: tl.constexpr, TL: tl.constexpr, BD: tl.constexpr,
           LANES: tl.constexpr, WL: tl.constexpr, SINK: tl.constexpr, CAP: tl.constexpr, ROW: tl.constexpr,
           MASKS: tl.constexpr, MASK_MIN: tl.constexpr, SKIP: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Pass 3 (the kernel's comment) -> each token's survivor count [BT]; the survivors in its scratch row."""
    cnt = tl.zeros([BT], dtype=tl.int32)
    PREFIX_DOT: tl.constexpr = (BT >= 16) & (LANES >= 16)  # the shapes a tensor-core product takes
    o_l = tl.arange(0, LANES)
    tri = (o_l[:, None] <= o_l[None, :]).to(tl.float16)  # [LANES, LANES]
    # MASKS: tiles with at least MASK_MIN chunks store one word of survivor bits per token and WL blocks instead of
    # a store per survivor (no prefix count, no layout conversions in the loop); the masks of SEG chunks fill the
    # scratch row's first ROW columns, then go to the tokens' slot lists, segment by segment. Shorter tiles take
    # the plain loop: the masks' decoding and the recomputed importances cost about as much as ~12 chunks save.
    masked = MASKS and n2 >= MASK_MIN
    if masked:
        W: tl.constexpr = LANES // WL
        SEG: tl.constexpr = ROW // W
        bit = tl.full([BT, W, WL], 1, tl.uint32) << tl.arange(0, WL).to(tl.uint32)[None, None, :]
        for c0 in range(0, n2, SEG):
            c1 = tl.minimum(c0 + SEG, n2)
            # pass 2's interior chunks (candidates of every valid token) need no candidate mask here either: one
            # loop per kind of chunk, as there
            a = tl.minimum(tl.maximum(c_lo2, c0), c1)
            b = tl.minimum(tl.maximum(c_hi2, a), c1)
            for c in range(c0, a):
                _mask_chunk(b_q, p_kb, lo2 + c * LANES, NSLOT, b_c, t_base, t_n, bound, bit, p_sf + (c - c0) * W,
                            m_t, BT, GP, TL, BD, LANES, WL, SINK, True, DOT_PREC)  # fmt: skip
            for c in range(a, b):
                _mask_chunk(b_q, p_kb, lo2 + c * LANES, NSLOT, b_c, t_base, t_n, bound, bit, p_sf + (c - c0) * W,
                            m_t, BT, GP, TL, BD, LANES, WL, SINK, False, DOT_PREC)  # fmt: skip
            for c in range(b, c1):
                _mask_chunk(b_q, p_kb, lo2 + c * LANES, NSLOT, b_c, t_base, t_n, bound, bit, p_sf + (c - c0) * W,
                            m_t, BT, GP, TL, BD, LANES, WL, SINK, True, DOT_PREC)  # fmt: skip
            tl.debug_barrier()
            cnt = _decode_masks(p_sf, cnt, lo2 + c0 * LANES, (c1 - c0) * W, m_t, WL, ROW, CAP, BT)
            tl.debug_barrier()
    elif SKIP:
        # A chunk holds a survivor of a token only if the token's best importance there (pass 2, rounded to
        # bfloat16: within 2^-9 relative) reaches its bound, lowered here by 2^-7 to stay on the safe side. The
        # tile's hot chunks are listed first, so that pass 3's loop has no branch and keeps its loads asynchronous.
        hot_bound = bound * (1.0 - 1.0 / 128)
        p_list = chunk_list + (i_bh * tl.num_programs(0) + i_t) * NCH
        o_cb = tl.arange(0, 32)
        n_hot = 0
        for c0 in range(0, n2, 32):
            cc = c0 + o_cb
            m_cc = m_t[:, None] & (cc < n2)[None, :]
            b_cm = tl.load(p_cm[:, None] + cc[None, :], mask=m_cc, other=float("-inf")).to(tl.float32)
            hot = tl.max((b_cm >= hot_bound[:, None]).to(tl.int32), 0)  # [32]
            tl.store(p_list + n_hot + tl.cumsum(hot, 0) - 1, cc, mask=hot > 0)
            n_hot += tl.sum(hot, 0)
        tl.debug_barrier()
        if n_hot < n2:
            for i in range(0, n_hot):
                c = tl.load(p_list + i)
                cnt = _survivor_chunk(b_q, p_kb, lo2 + c * LANES, NSLOT, b_c, t_base, t_n, bound, cnt, p_sf, tri,
                                      BT, GP, TL, BD, LANES, SINK, CAP, ROW, PREFIX_DOT, DOT_PREC)  # fmt: skip
        else:  # nothing to skip: the plain loop (no list to read)
            for s0 in range(lo2, hi2, LANES):
                cnt = _survivor_chunk(b_q, p_kb, s0, NSLOT, b_c, t_base, t_n, bound, cnt, p_sf, tri,
                                      BT, GP, TL, BD, LANES, SINK, CAP, ROW, PREFIX_DOT, DOT_PREC)  # fmt: skip
        if skip_stats is not None:
            tl.atomic_add(skip_stats, n2)
            tl.atomic_add(skip_stats + 1, n2 - n_hot)
    else:
        for s0 in range(lo2, hi2, LANES):
            cnt = _survivor_chunk(b_q, p_kb, s0, NSLOT, b_c, t_base, t_n, bound, cnt, p_sf, tri,
                                  BT, GP, TL, BD, LANES, SINK, CAP, ROW, PREFIX_DOT, DOT_PREC)  # fmt: skip
    return cnt


@triton.jit(do_not_specialize=["T", "TK", "NSLOT", "NCH"])
def _select_kernel(
    q,  # [B, T, HQ, D]
    kbar,  # [B, H, NSLOT, BD]
    doc_start,  # [B, T] int64 or None
    scratch,  # [B, T, H, ROW + CAP] float32: the lane maxima (for their ranks), then the survivors' importances;
    # from column ROW the survivors' blocks (int32 bits)
    chunk_max,  # SKIP: [B, T, H, NCH] bfloat16, each token's best importance per chunk of pass 2 (else unused)
    chunk_list,  # SKIP: [B * H, tiles, NCH] int32, each tile's chunks with a survivor (else unused)
    skip_stats,  # SKIP: int32 [2] or None: pass 3's chunks and the skipped ones, added atomically
    out,  # [B, T, H, S] int32
    T,
    TK,
    NSLOT,
    NCH,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    S: tl.constexpr,
    KP: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
    LANES: tl.constexpr,
    CAP: tl.constexpr,
    ROW: tl.constexpr,
    INTERIOR: tl.constexpr,  # pass 1's chunks inside every row's range skip the masks (False: every chunk masked)
    SKIP: tl.constexpr,  # pass 3 skips the chunks where no token of the tile reaches its bound
    MASKS: tl.constexpr,  # pass 3 stores survivor masks; the survivors' importances are recomputed afterwards
    WL: tl.constexpr,  # MASKS: bits per mask word (min(LANES, 32))
    CC: tl.constexpr,  # MASKS: survivors per step of the recomputation
    MASK_MIN: tl.constexpr,  # MASKS: tiles with fewer pass-3 chunks take the plain loop
    RUNNING: tl.constexpr,  # pass 1 also keeps a lower bound (no pass 2 unless a token has more than CAP above it)
    LONGEST_FIRST: tl.constexpr,  # the grid's first programs take the last tiles (the most blocks)
    HAS_DOCS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_t = tl.program_id(0)
    if LONGEST_FIRST:  # causal: a tile's work grows with its index, so the longest start first, not last
        i_t = tl.num_programs(0) - 1 - i_t
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    HQ: tl.constexpr = H * G
    M: tl.constexpr = BT * GP
    TL: tl.constexpr = min(BT, max(1, 16 // GP))  # tokens per run of rows (`_row_token_head`)
    off = TK - T
    o_d = tl.arange(0, BD)

    # ---- rows: (token, head of the group), [M]; padded heads (g >= G) are masked out
    o_r = tl.arange(0, M)
    r_tt, r_g = _row_token_head(o_r, GP, TL)
    r_t = i_t * BT + r_tt
    m_r = (r_t < T) & (r_g < G)
    if HAS_DOCS:
        r_ds = tl.load(doc_start + i_b * T + r_t, mask=r_t < T, other=0).to(tl.int32)
    else:
        r_ds = tl.zeros([M], dtype=tl.int32)
    r_nc = (r_t + off - r_ds + 1) // BS  # complete blocks of the row's document
    r_base = (r_ds + BS - 1) // BS  # slot of the document's block 0
    p_q = q + (i_b * T * HQ + i_h * G) * D + ((r_t * HQ + r_g) * D)[:, None] + o_d[None, :]
    # [M, BD]
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d < D)[None, :], other=0.0)
    b_q = b_q.to(kbar.dtype.element_ty)
    p_kb = kbar + i_bh * NSLOT * BD

    # ---- tokens, [BT]: candidates SINK <= j < t_hi, `budget` of them to choose
    m_t, t_cur, t_base, t_hi, budget = _token_geometry(doc_start, i_b, i_t, T, off, BT, BS, SINK, LOCAL, S, HAS_DOCS)
    o_t = i_t * BT + tl.arange(0, BT)
    lo2 = tl.min(tl.where(m_t, t_base + SINK, NSLOT), 0)
    hi2 = tl.max(tl.where(m_t, t_base + t_hi, 0), 0)
    t_n = tl.maximum(t_hi - SINK, 0)
    o_k = tl.arange(0, KP)
    p_row = ((i_b * T + o_t) * H + i_h).to(tl.int64)  # [BT] the tokens' scratch rows
    p_sf = scratch + p_row * (ROW + CAP)
    p_cm = chunk_max + p_row * NCH  # [BT] (SKIP only)

    # ---- pass 1: per-row softmax max and normaliser over the complete blocks
    lo = tl.min(tl.where(m_r, r_base, NSLOT), 0)
    hi = tl.max(tl.where(m_r, r_base + r_nc, 0), 0)
    b_m = tl.full([M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([M], dtype=tl.float32)
    b_lane1 = tl.zeros([BT, BN if RUNNING else 1], dtype=tl.float32)  # RUNNING: lane maxima (`_stats_chunk`)
    # chunks inside [lo_in, hi_in) hold complete blocks of every valid row and need no masks: with INTERIOR they
    # run in a loop of their own between the masked chunks before and after them (one loop per kind of chunk, so
    # that each loop's loads are software-pipelined; a branch inside one loop kept them synchronous)
    if INTERIOR:
        lo_in = tl.max(tl.where(m_r, r_base, 0), 0)
        hi_in = tl.min(tl.where(m_r, r_base + r_nc, NSLOT), 0)
        n_ch = tl.cdiv(hi - lo, BN)
        c_lo = tl.minimum(tl.maximum(tl.cdiv(lo_in - lo, BN), 0), n_ch)
        c_hi = tl.minimum(tl.maximum((hi_in - lo) // BN, c_lo), n_ch)
        for c in range(0, c_lo):
            b_m, b_l, b_lane1 = _stats_chunk(b_q, p_kb, lo + c * BN, NSLOT, r_base, r_nc, m_r, b_m, b_l, b_lane1,
                                             BT, GP, TL, BD, BN, True, RUNNING, DOT_PREC)  # fmt: skip
        for c in range(c_lo, c_hi):
            b_m, b_l, b_lane1 = _stats_chunk(b_q, p_kb, lo + c * BN, NSLOT, r_base, r_nc, m_r, b_m, b_l, b_lane1,
                                             BT, GP, TL, BD, BN, False, RUNNING, DOT_PREC)  # fmt: skip
        for c in range(c_hi, n_ch):
            b_m, b_l, b_lane1 = _stats_chunk(b_q, p_kb, lo + c * BN, NSLOT, r_base, r_nc, m_r, b_m, b_l, b_lane1,
                                             BT, GP, TL, BD, BN, True, RUNNING, DOT_PREC)  # fmt: skip
    else:
        for s0 in range(lo, hi, BN):
            b_m, b_l, b_lane1 = _stats_chunk(b_q, p_kb, s0, NSLOT, r_base, r_nc, m_r, b_m, b_l, b_lane1,
                                             BT, GP, TL, BD, BN, True, RUNNING, DOT_PREC)  # fmt: skip
    # passes 2 and 3 take exp2(logit - (m + log2 l)); rows without a normaliser get BIG there, so exp2 gives 0
    has_l = m_r & (b_l > 0)
    b_c = tl.where(has_l, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), 1e30)

    # ---- pass 2: a lower bound on each token's budget-th best importance. Lane i of a chunk keeps the best
    # importance of the blocks j = i (mod LANES) (elementwise max, no reduction); the lane maxima belong to
    # distinct candidates, so their budget-th largest cannot exceed the budget-th largest of all candidates.
    # With INTERIOR the chunks that hold candidates of every valid token (c_lo2 <= c < c_hi2) run without the
    # candidate mask, in a loop of their own (rows of tokens past T have m + log2 l = BIG: importance 0, and they
    # choose nothing).
    n2 = tl.cdiv(hi2 - lo2, LANES)
    c_lo2 = n2
    c_hi2 = n2
    if INTERIOR:
        lo_c = tl.max(tl.where(m_t, t_base + SINK, 0), 0)
        hi_c = tl.min(tl.where(m_t, t_base + t_hi, NSLOT), 0)
        c_lo2 = tl.minimum(tl.maximum(tl.cdiv(lo_c - lo2, LANES), 0), n2)
        c_hi2 = tl.minimum(tl.maximum((hi_c - lo2) // LANES, c_lo2), n2)
    # ---- pass 3: the candidates at or above the bound (about `budget` of them; the same importances bit for
    # bit: same chunks, same code) go to the token's scratch row, a prefix count giving their columns (one pointer
    # tensor for both stores: 168 registers instead of 190 at G = 4 with Triton 3.6, three programs per SM instead
    # of two). The prefix count is a [BT, LANES] x [LANES, LANES] product with a triangle of ones where the tile
    # allows one: exact (counts <= LANES in float32), and at G = 3 it takes pass 3 from 391 to 309 instructions
    # per thread and chunk (sm_90, Triton 3.6) by replacing tl.cumsum's scan and its layout conversions.
    if RUNNING:
        # the bound pass 1 kept (lanes of forced blocks left out, folded to LANES lanes); where some token of the
        # tile has more than CAP survivors above it, pass 2's tighter bound and pass 3 again (exact either way)
        o_ln = tl.arange(0, BN)
        forced = ((o_ln[None, :] - (t_base - lo)[:, None]) & (BN - 1)) < SINK
        forced |= ((o_ln[None, :] - (t_base + t_hi - lo)[:, None]) & (BN - 1)) < LOCAL
        b_lane = tl.max(tl.reshape(tl.where(forced, -1.0, b_lane1), [BT, BN // LANES, LANES]), 1)
        bound = _lane_bound(p_sf, b_lane, budget, m_t, BT, LANES)
        cnt = _pass3(b_q, p_kb, NSLOT, b_c, t_base, t_n, bound, p_sf, p_cm, m_t, lo2, hi2, n2, c_lo2, c_hi2,
                     chunk_list, skip_stats, i_bh, i_t, NCH, BT, GP, TL, BD, LANES, WL, SINK, CAP, ROW, MASKS,
                     MASK_MIN, SKIP, DOT_PREC)  # fmt: skip
        tl.debug_barrier()
        if tl.max(cnt, 0) > CAP:
            bound = _pass2_bound(b_q, p_kb, NSLOT, b_c, t_base, t_n, p_sf, p_cm, m_t, budget, lo2, n2, c_lo2, c_hi2,
                                 BT, GP, TL, BD, LANES, SINK, INTERIOR, SKIP, DOT_PREC)  # fmt: skip
            cnt = _pass3(b_q, p_kb, NSLOT, b_c, t_base, t_n, bound, p_sf, p_cm, m_t, lo2, hi2, n2, c_lo2, c_hi2,
                         chunk_list, skip_stats, i_bh, i_t, NCH, BT, GP, TL, BD, LANES, WL, SINK, CAP, ROW, MASKS,
                         MASK_MIN, SKIP, DOT_PREC)  # fmt: skip
    else:  # written out again, not shared with the retry: a shared runtime branch would enter the default kernel
        bound = _pass2_bound(b_q, p_kb, NSLOT, b_c, t_base, t_n, p_sf, p_cm, m_t, budget, lo2, n2, c_lo2, c_hi2,
                             BT, GP, TL, BD, LANES, SINK, INTERIOR, SKIP, DOT_PREC)  # fmt: skip
        cnt = _pass3(b_q, p_kb, NSLOT, b_c, t_base, t_n, bound, p_sf, p_cm, m_t, lo2, hi2, n2, c_lo2, c_hi2,
                     chunk_list, skip_stats, i_bh, i_t, NCH, BT, GP, TL, BD, LANES, WL, SINK, CAP, ROW, MASKS,
                     MASK_MIN, SKIP, DOT_PREC)  # fmt: skip
    masked = MASKS and n2 >= MASK_MIN  # as `_pass3` decided
    tl.debug_barrier()
    if tl.max(cnt, 0) > CAP:
        j_top = _exact_fallback(b_q, p_kb, lo2, hi2, NSLOT, b_c, t_base, t_n, bound,
                                BT, GP, TL, BD, LANES, KP, SINK, DOT_PREC)  # fmt: skip
    elif masked:
        q_rows = q + (i_b * T * HQ + i_h * G) * D + o_t.to(tl.int64) * (HQ * D)
        _survivor_importances(q_rows, p_kb, p_sf, cnt, b_c, m_t, BT, GP, TL, G, D, BD, CAP, ROW, CC, DOT_PREC)
        tl.debug_barrier()
        j_top = _rank_survivors(p_sf, cnt, CAP, ROW, KP, BT)  # slots: the blocks relative to the document
        j_top = tl.where(j_top >= 0, j_top - t_base[:, None], -1)
    else:
        j_top = _rank_survivors(p_sf, cnt, CAP, ROW, KP, BT)

    # ---- forced blocks (sink, then local ending with the current block) and the best `budget` candidates
    BIG: tl.constexpr = 1 << 30
    v_sel = tl.where((j_top >= 0) & (o_k[None, :] < budget[:, None]), j_top, BIG)
    f = o_k[None, :]
    j_f = tl.where(f < SINK, f + 0 * t_cur[:, None], t_cur[:, None] - LOCAL + 1 + f - SINK)
    ok_f = ((f < SINK) & (j_f <= t_cur[:, None])) | ((f >= SINK) & (f < SINK + LOCAL) & (j_f >= SINK) & (j_f >= 0))
    v_f = tl.where(ok_f, j_f, BIG)
    # ascending order without a sort: a kept block's column is the number of kept blocks below it
    r_f = tl.sum((v_f[:, None, :] < v_f[:, :, None]).to(tl.int32), 2)
    r_f += tl.sum((v_sel[:, None, :] < v_f[:, :, None]).to(tl.int32), 2)
    r_s = tl.sum((v_f[:, None, :] < v_sel[:, :, None]).to(tl.int32), 2)
    r_s += tl.sum((v_sel[:, None, :] < v_sel[:, :, None]).to(tl.int32), 2)
    c = o_k[None, None, :]
    col = tl.minimum(
        tl.min(tl.where(r_f[:, :, None] == c, v_f[:, :, None], BIG), 1),
        tl.min(tl.where(r_s[:, :, None] == c, v_sel[:, :, None], BIG), 1),
    )
    p_o = out + p_row[:, None] * S + o_k[None, :]
    tl.store(p_o, tl.where(col == BIG, -1, col), mask=m_t[:, None] & (o_k < S)[None, :])


def block_means(
    k: torch.Tensor,
    block_size: int,
    doc_start: torch.Tensor | None,
    T: int,
    options: KernelOptions | None = None,
    multiplier: float = 1.0,
) -> torch.Tensor:
    """Block means of the keys times `multiplier`: k [B, TK, H, D] -> kbar [B, H, NSLOT, BD] (float16, float32 for
    float32 keys). The selection passes its logit scale (scale * log2 e), so that its logits need no multiply.

    Without documents slot j is block j (NSLOT = TK // BS); with documents see `slot_starts`.
    """
    options = options or DEFAULT_OPTIONS
    B, TK, H, D = k.shape
    BS = block_size
    BD = max(16, next_pow2(D))
    starts = None if doc_start is None else slot_starts(doc_start, TK, BS)
    nslot = TK // BS if starts is None else starts.shape[1]
    kbar = utils.new_empty((B, H, max(nslot, 1), BD), kbar_dtype(k.dtype), k.device, options.poison)
    if nslot > 0 and B * H > 0:
        slots = options.select.means_slots
        grid = (cdiv(nslot, slots), B * H)
        _block_means_kernel[grid](
            k, starts, kbar, multiplier, TK, nslot, H=H, D=D, BD=BD, BS=BS, BN=slots, HAS_DOCS=starts is not None
        )
    return kbar


def select_kernel_config(H: int, G: int, D: int, block_size: int, block_count: int, sink_blocks: int,
                         local_blocks: int, has_docs: bool, dtype: torch.dtype, opt: SelectOptions,
                         compiled: bool = True) -> tuple[dict, dict]:  # fmt: skip
    """The selection kernel's constexprs and launch options (num_warps, num_stages, maxnreg) for a shape and
    `SelectOptions`: what `select_blocks` launches, and what `benchmarks/kernel_sass.py` compiles ahead of time."""
    GP = group_pad(G)
    KP = max(2, next_pow2(block_count))
    # the lower bound needs at least `budget` lanes; compiled, a chunk's dot needs N >= 16 (the interpreter, which
    # the tests use with 8 lanes, does not)
    lanes = max(next_pow2(opt.lanes), KP, 16 if compiled else 1)
    cap = max(2, next_pow2(opt.cap))
    consts = dict(
        H=H, G=G, GP=GP, D=D, BD=max(16, next_pow2(D)), BS=block_size, S=block_count, KP=KP, SINK=sink_blocks,
        LOCAL=local_blocks, BT=max(1, opt.rows // GP), BN=next_pow2(opt.blocks), LANES=lanes, CAP=cap,
        ROW=max(cap, lanes), INTERIOR=GP >= opt.interior_min_group if opt.interior == "auto" else opt.interior,
        SKIP=opt.skip_chunks, MASKS=opt.survivor_masks, WL=min(lanes, 32), CC=8,
        MASK_MIN=opt.mask_min_chunks,
        RUNNING=opt.running_bound and next_pow2(opt.blocks) >= lanes, LONGEST_FIRST=opt.longest_first,
        HAS_DOCS=has_docs, DOT_PREC=dot_precision(dtype),
    )  # fmt: skip
    launch = dict(num_warps=opt.warps, num_stages=opt.stages)
    if opt.max_registers is not None:
        launch["maxnreg"] = opt.max_registers
    return consts, launch


@torch.no_grad()
def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 16,
    block_count: int = 16,
    sink_blocks: int = 0,
    local_blocks: int = 1,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
    options: KernelOptions | None = None,
    skip_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """SSA block selection (no gradient). q [B, T, HQ, D], k [B, TK, H, D] -> [B, T, H, block_count] int32.

    Per query and KV head: the `sink_blocks` first blocks, the `local_blocks` blocks ending with the query's own
    block, and the best other complete blocks by I(j) = sum over the group of softmax_j(scale * q . mean(k_j)),
    `block_count` in all, ascending, -1 padded. doc_start [B, T] (or None) restarts block numbering per document.
    options: kernel variants and tunables (`KernelOptions.select`, `.poison`); None for the defaults.
    skip_stats: with `SelectOptions(skip_chunks=True)`, an int32 [2] tensor on q's device to which the kernel adds
    (pass 3's chunks, of them skipped) (benchmarks and tests read the skip rate from it).
    """
    options = options or DEFAULT_OPTIONS
    opt = options.select
    B, T, TK, HQ, H, D = check_qkv(q, k)
    if skip_stats is not None and not (
        opt.skip_chunks
        and skip_stats.dtype == torch.int32
        and skip_stats.shape == (2,)
        and skip_stats.device == q.device
    ):
        raise ValueError(
            "skip_stats must be an int32 [2] tensor on q's device, with SelectOptions(skip_chunks=True); got "
            f"{skip_stats.dtype} {tuple(skip_stats.shape)} on {skip_stats.device}, skip_chunks={opt.skip_chunks}."
        )
    check_block_size(block_size)
    if sink_blocks < 0 or local_blocks < 0 or block_count < 1 or sink_blocks + local_blocks > block_count:
        raise ValueError(
            f"sink_blocks={sink_blocks}, local_blocks={local_blocks}, block_count={block_count}: the kernels need "
            "0 <= sink_blocks + local_blocks <= block_count (use backend='reference' otherwise)."
        )
    scale = D**-0.5 if scale is None else scale
    ds = check_doc_start(doc_start, B, T, q.device)
    q, k = q.contiguous(), k.contiguous()
    out = utils.new_empty((B, T, H, block_count), torch.int32, q.device, options.poison)
    if out.numel() == 0:
        return out
    # the means carry the logit scale (log2 domain): one rounding to float16, as the plain means had
    kbar = block_means(k, block_size, ds, T, options, multiplier=scale * math.log2(math.e))
    consts, launch = select_kernel_config(H, HQ // H, D, block_size, block_count, sink_blocks, local_blocks,
                                          ds is not None, q.dtype, opt, compiled=q.is_cuda)  # fmt: skip
    scratch = torch.empty((B, T, H, consts["ROW"] + consts["CAP"]), dtype=torch.float32, device=q.device)
    # pass 2's chunks per tile start at the tile's first candidate slot: at most cdiv(NSLOT, LANES) + 1 of them
    nch = cdiv(kbar.shape[2], consts["LANES"]) + 1 if consts["SKIP"] else 1
    grid = (cdiv(T, consts["BT"]), B * H)
    chunk_max = torch.empty((B, T, H, nch) if consts["SKIP"] else (1,), dtype=torch.bfloat16, device=q.device)
    chunk_list = torch.empty((B * H, grid[0], nch) if consts["SKIP"] else (1,), dtype=torch.int32, device=q.device)
    _select_kernel[grid](
        q, kbar, ds, scratch, chunk_max, chunk_list, skip_stats, out, T, TK, kbar.shape[2], nch, **consts, **launch
    )
    return out
