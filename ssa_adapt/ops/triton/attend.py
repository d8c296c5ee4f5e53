"""Block-sparse attention over selected blocks in Triton: forward, and a backward in two halves (dq per query,
dk/dv per key block through a reverse index). README.md beside this file derives each piece.

q [B, T, HQ, D], k, v [B, TK, H, D], block_indices [B, T, H, S] int32 (relative to each query's document start,
-1 unused; unique per row, as `select_blocks` gives), doc_start [B, T] or None -> o [B, T, HQ, D].
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference import check_qkv
from . import utils
from .options import DEFAULT_OPTIONS, KernelOptions
from .utils import (
    cdiv,
    check_block_size,
    check_doc_start,
    dot_precision,
    dq_rows,
    dq_step,
    gather_selected_kv,
    group_pad,
    next_pow2,
    num_programs,
    online_softmax_step,
    softmax_output,
)

__all__ = ["attend_blocks", "attend_fwd", "attend_bwd"]


@triton.jit(do_not_specialize=["T", "TK"])
def _attend_fwd_kernel(
    q,  # [B, T, HQ, D]
    k,  # [B, TK, H, D]
    v,  # [B, TK, H, D]
    block_indices,  # [B, T, H, S] int32
    doc_start,  # [B, T] int64 or None
    o,  # [B, T, HQ, D] out
    lse,  # [B, T, HQ] fp32 out, log2 domain
    scale_log2,
    T,
    TK,
    H: tl.constexpr,
    G: tl.constexpr,
    GR: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    S: tl.constexpr,
    NB: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # one program per (token, KV head): the G query heads of the token, padded to GR >= 16 rows
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    HQ: tl.constexpr = H * G
    BK: tl.constexpr = NB * BS
    o_g = tl.arange(0, GR)
    o_d = tl.arange(0, BD)
    m_g = o_g < G
    m_d = o_d < D
    row = (i_b * T + i_t) * HQ + i_h * G + o_g
    # [GR, BD]
    b_q = tl.load(q + row[:, None] * D + o_d[None, :], mask=m_g[:, None] & m_d[None, :], other=0.0)
    p_t = (i_t + TK - T).to(tl.int32)  # the query's key index
    if HAS_DOCS:
        ds = tl.load(doc_start + i_b * T + i_t).to(tl.int32)
    else:
        ds = 0
    p_k = k + i_b * TK * H * D + i_h * D
    p_v = v + i_b * TK * H * D + i_h * D
    p_i = block_indices + ((i_b * T + i_t) * H + i_h) * S
    o_k = tl.arange(0, BK)
    b_m = tl.full([GR], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([GR], dtype=tl.float32)
    b_acc = tl.zeros([GR, BD], dtype=tl.float32)
    for s0 in range(0, S, NB):
        # NB selected blocks side by side: [BK, BD] keys and values
        b_k, b_v, m_k = gather_selected_kv(p_k, p_v, p_i, S, s0, ds, p_t, o_k, o_d, m_d, H, D, BS)
        # [GR, BK]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * scale_log2
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_s, b_m, b_l, b_acc, b_v, DOT_PREC)
    b_o, b_lse = softmax_output(b_acc, b_m, b_l)
    tl.store(o + row[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_g[:, None] & m_d[None, :])
    tl.store(lse + row, b_lse, mask=m_g)


@triton.jit(do_not_specialize=["T", "TK"])
def _attend_bwd_dq_kernel(
    q,
    k,
    v,
    o,
    do,
    lse,  # [B, T, HQ] fp32, log2 domain
    delta,  # [B, T, HQ] fp32 out: rowsum(do * o)
    dq,  # [B, T, HQ, D] out
    block_indices,
    doc_start,
    scale_log2,
    scale,
    T,
    TK,
    H: tl.constexpr,
    G: tl.constexpr,
    GR: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    S: tl.constexpr,
    NB: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    HQ: tl.constexpr = H * G
    BK: tl.constexpr = NB * BS
    o_g = tl.arange(0, GR)
    o_d = tl.arange(0, BD)
    m_g = o_g < G
    m_d = o_d < D
    m_qd = m_g[:, None] & m_d[None, :]
    row = (i_b * T + i_t) * HQ + i_h * G + o_g
    # [GR, BD] q, dO; [GR] lse, delta = rowsum(dO * O) (stored for the dk/dv kernel)
    b_q, b_do, b_lse, b_delta = dq_rows(q, do, o, lse, delta, row, m_g, D, BD)
    p_t = (i_t + TK - T).to(tl.int32)
    if HAS_DOCS:
        ds = tl.load(doc_start + i_b * T + i_t).to(tl.int32)
    else:
        ds = 0
    p_k = k + i_b * TK * H * D + i_h * D
    p_v = v + i_b * TK * H * D + i_h * D
    p_i = block_indices + ((i_b * T + i_t) * H + i_h) * S
    o_k = tl.arange(0, BK)
    b_dq = tl.zeros([GR, BD], dtype=tl.float32)
    for s0 in range(0, S, NB):
        b_k, b_v, m_k = gather_selected_kv(p_k, p_v, p_i, S, s0, ds, p_t, o_k, o_d, m_d, H, D, BS)
        b_dq = dq_step(b_q, b_do, b_lse, b_delta, b_k, b_v, m_k[None, :], b_dq, scale_log2, DOT_PREC)
    tl.store(dq + row[:, None] * D + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty), mask=m_qd)


@triton.jit(do_not_specialize=["T", "TK"])
def _reverse_index_kernel(
    block_indices,  # [B, T, H, S] int32
    doc_start,
    cursor,  # [B * H * TK] int32: counts (FILL=False) or next free position per key block (FILL=True)
    lists,  # [N] int32 out (FILL=True): selecting tokens grouped by key block
    T,
    TK,
    H: tl.constexpr,
    S: tl.constexpr,
    SP: tl.constexpr,
    BS: tl.constexpr,
    BT: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    FILL: tl.constexpr,
):
    # key block id = (b * H + h) * TK + first key of the block: unique across documents, no host sync needed
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_s = tl.arange(0, SP)
    p_i = block_indices + ((i_b * T + o_t) * H + i_h)[:, None] * S + o_s[None, :]
    b_j = tl.load(p_i, mask=m_t[:, None] & (o_s < S)[None, :], other=-1)
    if HAS_DOCS:
        ds = tl.load(doc_start + i_b * T + o_t, mask=m_t, other=0)
    else:
        ds = tl.zeros([BT], dtype=tl.int64)
    ks = ds[:, None] + b_j.to(tl.int64) * BS
    m = (b_j >= 0) & (ks <= (o_t + TK - T)[:, None])
    bid = i_bh * TK + ks
    if FILL:
        dst = tl.atomic_add(cursor + bid, 1, mask=m, sem="relaxed")
        tl.store(lists + dst, tl.broadcast_to(o_t[:, None], [BT, SP]), mask=m)
    else:
        tl.atomic_add(cursor + bid, 1, mask=m, sem="relaxed")


@triton.jit(do_not_specialize=["T", "TK", "NID", "NPROG"])
def _attend_bwd_dkv_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,  # [B, TK, H, D] fp32, zero-initialised
    dv,  # [B, TK, H, D] fp32, zero-initialised
    lists,  # [N] int32 selecting tokens grouped by key block
    counts,  # [NID] int32 tokens per key block
    starts,  # [NID] int32 first entry of each key block in `lists`
    wend,  # [NID] int32 inclusive cumulative work items
    work,  # [>= total] int32 key block id of each work item
    scale_log2,
    scale,
    T,
    TK,
    NID,
    NPROG,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    C: tl.constexpr,
    BQ: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # persistent: work item = up to C selecting tokens of one key block (BS keys of one KV head)
    HQ: tl.constexpr = H * G
    M: tl.constexpr = BQ * GP
    total = tl.load(wend + NID - 1)
    o_r = tl.arange(0, M)
    r_q = o_r // GP
    r_g = o_r % GP
    o_k = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    for w in range(tl.program_id(0), total, NPROG):
        bid = tl.load(work + w).to(tl.int64)
        i_bh = bid // TK
        ks = (bid % TK).to(tl.int32)
        i_b = i_bh // H
        i_h = i_bh % H
        cnt = tl.load(counts + bid)
        e_base = tl.load(starts + bid).to(tl.int64)
        n_items = (cnt + C - 1) // C
        e0 = (w - (tl.load(wend + bid) - n_items)) * C
        e1 = tl.minimum(e0 + C, cnt)
        kpos = ks + o_k
        m_k = kpos < TK
        # int64 scalar bases, int32 offsets inside one sequence (fewer registers per gathered element)
        kv_base = (i_b * TK * H + i_h) * D
        p_kv = (kpos * (H * D))[:, None] + o_d[None, :]
        m_kv = m_k[:, None] & m_d[None, :]
        # [BS, BD]
        b_k = tl.load(k + kv_base + p_kv, mask=m_kv, other=0.0)
        b_v = tl.load(v + kv_base + p_kv, mask=m_kv, other=0.0)
        b_dk = tl.zeros([BS, BD], dtype=tl.float32)
        b_dv = tl.zeros([BS, BD], dtype=tl.float32)
        p_max = tl.full([M], -1, dtype=tl.int32)  # latest selecting query: keys after it belong to no one here
        q_base = (i_b * T * HQ + i_h * G).to(tl.int64)
        for e in range(e0, e1, BQ):
            # BQ tokens x GP heads packed into M rows: the block is shared, so no row is padding but the group's
            ent = e + r_q
            m_e = ent < e1
            t = tl.load(lists + e_base + ent, mask=m_e, other=0)
            m_row = m_e & (r_g < G)
            row = t * HQ + r_g
            m_qd = m_row[:, None] & m_d[None, :]
            # [M, BD]
            b_q = tl.load(q + q_base * D + (row * D)[:, None] + o_d[None, :], mask=m_qd, other=0.0)
            b_do = tl.load(do + q_base * D + (row * D)[:, None] + o_d[None, :], mask=m_qd, other=0.0)
            row = q_base + row
            b_lse = tl.load(lse + row, mask=m_row, other=float("inf"))
            b_delta = tl.load(delta + row, mask=m_row, other=0.0)
            # [BS, M] transposed scores: keys on the tensor-core M side, tokens x heads on N
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC) * scale_log2
            p_max = tl.maximum(p_max, tl.where(m_e, t + (TK - T), -1))
            m_st = m_row[None, :] & (kpos[:, None] <= (t + TK - T)[None, :])
            b_pt = tl.where(m_st, tl.exp2(b_st - b_lse[None, :]), 0.0)
            b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PREC)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=DOT_PREC)
        b_dk = b_dk * scale
        # a partial block's tail may be the next document's keys (owned by another work item): leave them alone
        m_kv = m_kv & (kpos <= tl.max(p_max, 0))[:, None]
        if n_items == 1:
            tl.store(dk + kv_base + p_kv, b_dk, mask=m_kv)
            tl.store(dv + kv_base + p_kv, b_dv, mask=m_kv)
        else:
            tl.atomic_add(dk + kv_base + p_kv, b_dk, mask=m_kv, sem="relaxed")
            tl.atomic_add(dv + kv_base + p_kv, b_dv, mask=m_kv, sem="relaxed")


def _geometry(q, k, block_indices, block_size):
    B, T, TK, HQ, H, D = check_qkv(q, k)
    G = HQ // H
    S = block_indices.shape[-1]
    if block_indices.shape != (B, T, H, S):
        raise ValueError(
            f"block_indices must be [B, T, H, S] with (B, T, H) = {(B, T, H)}; got {tuple(block_indices.shape)}."
        )
    return B, T, TK, HQ, H, D, G, S, max(16, next_pow2(D))


def attend_fwd(q, k, v, block_indices, block_size, scale, doc_start, options: KernelOptions | None = None):
    """-> o [B, T, HQ, D] (q's dtype), lse [B, T, HQ] float32 (log2 domain)."""
    options = options or DEFAULT_OPTIONS
    opt = options.attend
    B, T, TK, HQ, H, D, G, S, BD = _geometry(q, k, block_indices, block_size)
    keys, warps, stages = opt.fwd_launch(D)
    o = utils.new_empty(q.shape, q.dtype, q.device, options.poison)
    lse = utils.new_empty((B, T, HQ), torch.float32, q.device, options.poison)
    if o.numel() == 0:
        return o, lse
    _attend_fwd_kernel[(T, B * H)](
        q,
        k,
        v,
        block_indices,
        doc_start,
        o,
        lse,
        scale * math.log2(math.e),
        T,
        TK,
        H=H,
        G=G,
        GR=max(16, group_pad(G)),
        D=D,
        BD=BD,
        BS=block_size,
        S=S,
        NB=max(1, keys // block_size),
        HAS_DOCS=doc_start is not None,
        DOT_PREC=dot_precision(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse


def attend_bwd(q, k, v, o, lse, do, block_indices, block_size, scale, doc_start, options: KernelOptions | None = None):
    """-> dq, dk, dv in the dtypes of q, k, v."""
    options = options or DEFAULT_OPTIONS
    opt = options.attend
    B, T, TK, HQ, H, D, G, S, BD = _geometry(q, k, block_indices, block_size)
    dev = q.device
    has_docs = doc_start is not None
    prec = dot_precision(q.dtype)
    scale_log2 = scale * math.log2(math.e)
    keys, warps, stages = opt.fwd_launch(D)
    dq = utils.new_empty(q.shape, q.dtype, dev, options.poison)
    delta = utils.new_empty((B, T, HQ), torch.float32, dev, options.poison)
    _attend_bwd_dq_kernel[(T, B * H)](
        q,
        k,
        v,
        o,
        do,
        lse,
        delta,
        dq,
        block_indices,
        doc_start,
        scale_log2,
        scale,
        T,
        TK,
        H=H,
        G=G,
        GR=max(16, group_pad(G)),
        D=D,
        BD=BD,
        BS=block_size,
        S=S,
        NB=max(1, keys // block_size),
        HAS_DOCS=has_docs,
        DOT_PREC=prec,
        num_warps=warps,
        num_stages=stages,
    )

    # reverse index: for every key block (b, h, first key), the tokens that selected it
    nid = B * H * TK
    n_max = B * T * H * S
    if n_max >= 2**31 or nid >= 2**31:
        raise ValueError(f"B*T*H*S={n_max} and B*H*TK={nid} must stay below 2**31 for the int32 reverse index.")
    BT = 32
    SP = next_pow2(S)
    counts = torch.zeros(nid, dtype=torch.int32, device=dev)
    grid = (cdiv(T, BT), B * H)
    _reverse_index_kernel[grid](
        block_indices,
        doc_start,
        counts,
        None,
        T,
        TK,
        H=H,
        S=S,
        SP=SP,
        BS=block_size,
        BT=BT,
        HAS_DOCS=has_docs,
        FILL=False,
    )
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    starts = ends - counts
    cursor = starts.clone()
    lists = torch.empty(max(n_max, 1), dtype=torch.int32, device=dev)
    _reverse_index_kernel[grid](
        block_indices,
        doc_start,
        cursor,
        lists,
        T,
        TK,
        H=H,
        S=S,
        SP=SP,
        BS=block_size,
        BT=BT,
        HAS_DOCS=has_docs,
        FILL=True,
    )
    del cursor, ends

    # work items: up to C tokens of one key block; searchsorted maps item -> block without a host sync
    GP = group_pad(G)
    BQ = max(1, opt.dkv_rows // GP)
    C = max(BQ, (opt.dkv_item_rows // GP) // BQ * BQ)
    items = (counts + (C - 1)) // C
    wend = torch.cumsum(items, 0, dtype=torch.int32)
    blocks_bound = B * H * (cdiv(TK, block_size) + (T + 1 if has_docs else 0))
    w_max = max(1, min(n_max, cdiv(n_max, C) + blocks_bound))
    work = torch.searchsorted(wend, torch.arange(w_max, dtype=torch.int32, device=dev), right=True, out_int32=True)
    nprog = max(1, min(w_max, num_programs(dev, 8)))
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=dev)
    dv32 = torch.zeros(v.shape, dtype=torch.float32, device=dev)
    _attend_bwd_dkv_kernel[(nprog,)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk32,
        dv32,
        lists,
        counts,
        starts,
        wend,
        work,
        scale_log2,
        scale,
        T,
        TK,
        nid,
        nprog,
        H=H,
        G=G,
        GP=GP,
        D=D,
        BD=BD,
        BS=block_size,
        C=C,
        BQ=BQ,
        DOT_PREC=prec,
        num_warps=opt.dkv_warps,
        num_stages=opt.dkv_stages,
    )
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)


class AttendBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale, doc_start, options):
        o, lse = attend_fwd(q, k, v, block_indices, block_size, scale, doc_start, options)
        ctx.save_for_backward(q, k, v, o, lse, block_indices, doc_start)
        ctx.block_size, ctx.scale, ctx.options = block_size, scale, options
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, block_indices, doc_start = ctx.saved_tensors
        dq, dk, dv = attend_bwd(
            q, k, v, o, lse, do.contiguous(), block_indices, ctx.block_size, ctx.scale, doc_start, ctx.options
        )
        return dq, dk, dv, None, None, None, None, None


def attend_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int = 16,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention over the selected blocks; differentiable in q, k, v.

    q [B, T, HQ, D], k, v [B, TK, H, D] (TK >= T), block_indices [B, T, H, S] int32 -> o [B, T, HQ, D].
    Query t (key index t + TK - T) attends to keys doc_start[b, t] + j * BS + i (i < BS, key <= query) for each
    selected block j. The dk/dv reduction order depends on atomics, so dk/dv are reproducible to fp32 rounding.
    options: kernel tunables (`KernelOptions.attend`, `.poison`); None for the defaults.
    """
    B, T, TK, HQ, H, D = check_qkv(q, k, v)
    check_block_size(block_size)
    if block_indices.shape[:3] != (B, T, H):
        raise ValueError(
            f"block_indices must be [B, T, H, S] with (B, T, H) = {(B, T, H)}; got {tuple(block_indices.shape)}."
        )
    scale = D**-0.5 if scale is None else scale
    ds = check_doc_start(doc_start, B, T, q.device)
    idx = block_indices.to(device=q.device, dtype=torch.int32).contiguous()
    return AttendBlocksFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), idx, block_size, scale, ds, options
    )
