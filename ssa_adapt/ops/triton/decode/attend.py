"""Attention for decode steps (T <= 4 queries per row, inference only: no autograd; `attend_blocks` in
`../attend.py` is the differentiable version): `decode_attend`.

`decode_attend` is split-KV attention ("flash-decoding") over the selected blocks: programs over (query, KV head,
split of the selected blocks) compute the partial softmax statistics and un-normalised outputs of the G heads of
the group (padded to 16 rows for the tensor cores), and a combine kernel merges the splits (one split: the
partial kernel writes the output itself and the combine is skipped). Only the selected blocks' keys are read, and
k, v may be strided views (HF's cache is [B, H, TK, D]; transposing it costs no copy here). The program's body is
a jit function (`_attend_split`) that `step.py`'s one-launch decode step runs last.

The tunables are `options.DecodeOptions` (`KernelOptions.decode`), passed to the host functions as `options`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...reference import check_qkv
from .. import utils
from ..options import DEFAULT_OPTIONS, KernelOptions
from ..utils import cdiv, check_block_size, check_doc_start, next_pow2, online_softmax_step
from .launch import PER_STEP, last_dim_contiguous, split_count, workspace

__all__ = ["decode_attend"]


@triton.jit(do_not_specialize=PER_STEP)
def _decode_attend_kernel(
    q,  # [B, T, HQ, D] (strided)
    k,  # [B, TK, H, D] (strided)
    v,  # [B, TK, H, D] (strided)
    block_indices,  # [B, T, H, S] int32, contiguous
    doc_start,  # [B, T] int64 or None
    q_pos,  # [B, T] int64 or None: each query's position inside its document (else from TK)
    o,  # [B, T, HQ, D] out (ONE_SPLIT)
    part_o,  # [B * T * H, NSPLIT, G, D] float32 out: un-normalised outputs per split
    part_ml,  # [B * T * H, NSPLIT, 2, G] float32 out: max (log2 domain), normaliser
    scale_log2,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    T,
    TK,
    NSPLIT,
    SPB,  # selected slots per split (a multiple of NBK)
    H: tl.constexpr,
    G: tl.constexpr,
    GR: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    S: tl.constexpr,
    NBK: tl.constexpr,  # blocks side by side per step
    HAS_DOCS: tl.constexpr,
    HAS_POS: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    _attend_split(q, k, v, block_indices, doc_start, q_pos, o, part_o, part_ml, scale_log2, stride_qb, stride_qt,
                  stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, T, TK, NSPLIT, SPB,
                  tl.program_id(0).to(tl.int64), tl.program_id(1), H, G, GR, D, BD, BS, S, NBK, HAS_DOCS, HAS_POS,
                  ONE_SPLIT, DOT_PREC)  # fmt: skip


@triton.jit
def _attend_split(q, k, v, block_indices, doc_start, q_pos, o, part_o, part_ml, scale_log2, stride_qb, stride_qt,
                  stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, T, TK, NSPLIT, SPB,
                  i_bth, i_sp, H: tl.constexpr, G: tl.constexpr, GR: tl.constexpr, D: tl.constexpr,
                  BD: tl.constexpr, BS: tl.constexpr, S: tl.constexpr, NBK: tl.constexpr, HAS_DOCS: tl.constexpr,
                  HAS_POS: tl.constexpr, ONE_SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """`_decode_attend_kernel`'s program (i_bth, i_sp): row i_bth = (b * T + t) * H + h's attention over split
    i_sp's selected blocks (also the last phase of `step.py`'s `_decode_step_kernel`, one split)."""
    i_bt = i_bth // H
    i_h = i_bth % H
    i_b = i_bt // T
    i_t = i_bt % T
    HQ: tl.constexpr = H * G
    BK: tl.constexpr = NBK * BS
    o_g = tl.arange(0, GR)
    o_d = tl.arange(0, BD)
    m_g = o_g < G
    m_d = o_d < D
    p_q = q + i_b * stride_qb + i_t * stride_qt + (i_h * G + o_g)[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0)
    if HAS_DOCS:
        ds = tl.load(doc_start + i_bt).to(tl.int32)
    else:
        ds = 0
    if HAS_POS:  # static caches: the key buffer is longer than the keys written so far
        p_t = ds + tl.load(q_pos + i_bt).to(tl.int32)  # the query's key index
    else:
        p_t = (i_t + TK - T).to(tl.int32)
    p_k = k + i_b * stride_kb + i_h * stride_kh
    p_v = v + i_b * stride_vb + i_h * stride_vh
    p_i = block_indices + i_bth * S
    o_k = tl.arange(0, BK)
    b_m = tl.full([GR], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([GR], dtype=tl.float32)
    b_acc = tl.zeros([GR, BD], dtype=tl.float32)
    lo = i_sp * SPB
    hi = tl.minimum(lo + SPB, S)
    for s0 in range(lo, hi, NBK):
        slot = s0 + o_k // BS
        b_j = tl.load(p_i + slot, mask=slot < hi, other=-1)
        kpos = ds + b_j * BS + o_k % BS
        m_k = (b_j >= 0) & (kpos <= p_t)  # causal inside the query's own block
        kpos = tl.where(m_k, kpos, 0).to(tl.int64)
        m_kd = m_k[:, None] & m_d[None, :]
        # [BK, BD]
        b_k = tl.load(p_k + kpos[:, None] * stride_kt + o_d[None, :], mask=m_kd, other=0.0)
        b_v = tl.load(p_v + kpos[:, None] * stride_vt + o_d[None, :], mask=m_kd, other=0.0)
        # [GR, BK]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * scale_log2
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_s, b_m, b_l, b_acc, b_v, DOT_PREC)
    m_od = m_g[:, None] & m_d[None, :]
    if ONE_SPLIT:
        # rows that see no key get 0, like the prefill kernel
        b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
        row = i_bt * HQ + i_h * G + o_g
        tl.store(o + row[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_od)
    else:
        base = i_bth * NSPLIT + i_sp
        tl.store(part_o + (base * G + o_g)[:, None] * D + o_d[None, :], b_acc, mask=m_od)
        tl.store(part_ml + base * 2 * G + o_g, b_m, mask=m_g)
        tl.store(part_ml + base * 2 * G + G + o_g, b_l, mask=m_g)


@triton.jit
def _decode_combine_kernel(
    part_o,  # [B * T * H, NSPLIT, G, D] float32
    part_ml,  # [B * T * H, NSPLIT, 2, G] float32
    o,  # [B, T, HQ, D] out
    NSPLIT,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
):
    i_bth = tl.program_id(0).to(tl.int64)  # == (b * T + t) * H + h, and o's rows are ((b * T + t) * H + h) * G + g
    o_g = tl.arange(0, GP)
    o_d = tl.arange(0, BD)
    m_g = o_g < G
    m_od = m_g[:, None] & (o_d < D)[None, :]
    b_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    for i in range(0, NSPLIT):
        b_m = tl.maximum(b_m, tl.load(part_ml + (i_bth * NSPLIT + i) * 2 * G + o_g, mask=m_g, other=float("-inf")))
    b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_l = tl.zeros([GP], dtype=tl.float32)
    b_acc = tl.zeros([GP, BD], dtype=tl.float32)
    for i in range(0, NSPLIT):
        base = i_bth * NSPLIT + i
        m_i = tl.load(part_ml + base * 2 * G + o_g, mask=m_g, other=float("-inf"))
        l_i = tl.load(part_ml + base * 2 * G + G + o_g, mask=m_g, other=0.0)
        w = tl.where(l_i > 0, tl.exp2(m_i - b_m), 0.0)
        b_l += l_i * w
        b_acc += tl.load(part_o + (base * G + o_g)[:, None] * D + o_d[None, :], mask=m_od, other=0.0) * w[:, None]
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    tl.store(o + (i_bth * G + o_g)[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_od)


@torch.no_grad()
def decode_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int = 16,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
    num_splits: int | None = None,
    q_pos: torch.Tensor | None = None,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """Block-sparse attention for few queries per row, split over the selected blocks (inference only: no
    autograd; `attend_blocks` in `attend.py` is the differentiable version).

    q [B, T, HQ, D], k, v [B, TK, H, D] (any strides with a contiguous last dim), block_indices [B, T, H, S]
    int32 (relative to each query's document start, -1 unused), doc_start [B, T] or None -> o [B, T, HQ, D].
    Query t (key index TK - T + t) attends to keys doc_start[b, t] + j * BS + i (i < BS, key <= query) of each
    selected block j. num_splits: programs per (query, KV head) (default: fill the GPU; 1 skips the combine).
    q_pos [B, T] int64 (static caches, whose key buffer is longer than the keys written): query t sits at key
    doc_start[b, t] + q_pos[b, t] instead, read on the device (a CUDA graph can replay the call as keys grow).
    options: `KernelOptions` (None: the defaults); reads `options.decode` and `options.poison`.
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
    if q_pos is not None:
        if q_pos.shape != (B, T):
            raise ValueError(f"q_pos must be [B, T] = {(B, T)}; got {tuple(q_pos.shape)}.")
        q_pos = q_pos.to(device=q.device, dtype=torch.int64).contiguous()
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    S = idx.shape[3]
    G = HQ // H
    options = DEFAULT_OPTIONS if options is None else options
    opt = options.decode
    out = utils.new_empty((B, T, HQ, D), q.dtype, q.device, options.poison)
    if out.numel() == 0:
        return out
    if S == 0:
        return out.zero_()
    nbk = max(1, opt.attend_keys // block_size)
    units = B * T * H
    nsplit = split_count(units, cdiv(S, nbk), q.device, num_splits, opt.programs_per_sm)
    spb = cdiv(cdiv(S, nsplit), nbk) * nbk
    nsplit = cdiv(S, spb)
    one = nsplit == 1
    part_o = part_ml = None
    if not one:  # partial outputs [units, nsplit, G, D] and statistics [units, nsplit, 2, G], one allocation
        part_o, part_ml = workspace(q.device, options.poison, units * nsplit * G * D, units * nsplit * 2 * G)
    BD = max(16, next_pow2(D))
    _decode_attend_kernel[(units, nsplit)](
        q,
        k,
        v,
        idx,
        ds,
        q_pos,
        out,
        part_o,
        part_ml,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        T,
        TK,
        nsplit,
        spb,
        H=H,
        G=G,
        GR=max(16, next_pow2(G)),
        D=D,
        BD=BD,
        BS=block_size,
        S=S,
        NBK=nbk,
        HAS_DOCS=ds is not None,
        HAS_POS=q_pos is not None,
        ONE_SPLIT=one,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=opt.attend_warps,
    )
    if not one:
        _decode_combine_kernel[(units,)](part_o, part_ml, out, nsplit, G=G, GP=max(2, next_pow2(G)), D=D, BD=BD)
    return out
