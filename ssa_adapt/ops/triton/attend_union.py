"""Sparse attention forward over query tiles that walk the union of their tokens' selected blocks (an option:
`AttendOptions.union_tile`; README.md section 2).

One program per (tile of BTQ consecutive tokens, KV head) holds the tile's BTQ x G query heads as M rows and loads
each key block that any token of the tile selected once, in ascending order, with a per-row membership mask (a
token attends only to the blocks it selected, causally). K/V bytes then scale with the union's size instead of
BTQ x S blocks: on SmolLM2's own activations at 32k a 16-token tile selects 37-74 distinct blocks per KV head out
of 256 (`benchmarks/results/attention-real-h100.md`); on random inputs tokens share only their sink and local blocks.

The unions are built with a few torch ops (sort, run starts, segment sums of token bits); no host sync.
Outputs and lse are those of `attend.attend_fwd`; dq walks the same unions, and dk / dv stay with the reverse-index
kernel (already one program per key block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cdiv, dq_rows, dq_step, group_pad, next_pow2, online_softmax_step, softmax_output

__all__ = ["tile_unions", "union_tiles", "union_tile_tokens", "attend_fwd_union", "attend_bwd_dq_union"]

_NONE = 2**31 - 1  # an absent block's start: sorts after every real one


def union_tiles(opt, G: int, block_size: int) -> tuple[int, int] | None:
    """(tokens per tile, blocks per step) when `AttendOptions.union_tile` asks for union-walking tiles, else None;
    the forward and dq kernels take the same."""
    if not opt.union_tile:
        return None
    return union_tile_tokens(opt.union_tile, group_pad(G)), max(1, opt.fwd_keys // block_size)


def union_tile_tokens(tile: int, GP: int) -> int:
    """Tokens per tile for `AttendOptions.union_tile`: a power of two with at least 16 and at most 128 rows
    (tokens x padded group), and at most 16 tokens (the membership bits are an int32)."""
    btq = next_pow2(tile)
    return max(max(1, 16 // GP), min(btq, max(1, 128 // GP), 16))


def tile_unions(
    block_indices: torch.Tensor, doc_start: torch.Tensor | None, block_size: int, btq: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sorted union of the blocks selected by each tile of `btq` consecutive tokens, per KV head.

    block_indices [B, T, H, S] int32 (relative to each token's document start, -1 unused), doc_start [B, T] or None
    -> (starts [B, NT, H, U] int32: the first key of each union block, ascending, 2^31 - 1 past the end;
        members [B, NT, H, U] int32: bit i set when the tile's token i selected that block;
        count [B, NT, H] int32: blocks in each union), NT = ceil(T / btq), U = btq * S.
    Blocks are identified by their first key, so documents packed in one row never share one."""
    B, T, H, S = block_indices.shape
    nt = cdiv(T, btq)
    idx = block_indices.to(torch.int64)
    ds = torch.zeros(B, T, dtype=torch.int64, device=idx.device) if doc_start is None else doc_start.to(torch.int64)
    starts = torch.where(idx >= 0, ds[:, :, None, None] + idx * block_size, _NONE)
    if nt * btq != T:
        starts = torch.nn.functional.pad(starts, (0, 0, 0, 0, 0, nt * btq - T), value=_NONE)
    # [B, NT, H, BTQ * S]: a tile's selections, each token's S entries together
    starts = starts.view(B, nt, btq, H, S).permute(0, 1, 3, 2, 4).reshape(B, nt, H, btq * S)
    bits = (1 << torch.arange(btq, device=idx.device, dtype=torch.int64)).repeat_interleave(S)
    vals, order = starts.sort(-1)
    bits = bits.expand_as(starts).gather(-1, order)
    first = torch.ones_like(vals, dtype=torch.bool)
    first[..., 1:] = vals[..., 1:] != vals[..., :-1]
    run = first.cumsum(-1) - 1  # the union slot of each sorted entry
    u_start = torch.full_like(vals, _NONE).scatter_(-1, run, vals)
    # a token selects a block at most once, so summing its bit over the block's entries is an OR
    u_bits = torch.zeros_like(vals).scatter_add_(-1, run, torch.where(vals != _NONE, bits, 0))
    count = (first & (vals != _NONE)).sum(-1)
    return u_start.to(torch.int32), u_bits.to(torch.int32), count.to(torch.int32)


@triton.jit
def _union_keys(p_k, p_v, p_start, p_bits, u0, n_u, r_l, r_pos, TK, H: tl.constexpr, D: tl.constexpr,
                BD: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr):  # fmt: skip
    """The NB union blocks from slot u0, side by side: K and V [NB * BS, BD] and which rows see which key [M, NB *
    BS]: a row's token selected the key's block (its membership bit r_l) and the key is not in its future."""
    o_k = tl.arange(0, NB * BS)
    o_d = tl.arange(0, BD)
    slot = u0 + o_k // BS
    m_s = slot < n_u
    b_start = tl.load(p_start + slot, mask=m_s, other=0)
    b_bits = tl.load(p_bits + slot, mask=m_s, other=0)
    kpos = b_start + o_k % BS
    m_k = m_s & (kpos < TK)
    m_kd = m_k[:, None] & (o_d < D)[None, :]
    b_k = tl.load(p_k + kpos[:, None] * (H * D) + o_d[None, :], mask=m_kd, other=0.0)
    b_v = tl.load(p_v + kpos[:, None] * (H * D) + o_d[None, :], mask=m_kd, other=0.0)
    member = ((b_bits[None, :] >> r_l[:, None]) & 1) != 0
    return b_k, b_v, member & m_k[None, :] & (kpos[None, :] <= r_pos[:, None])


@triton.jit
def _tile(k, v, u_count, T, TK, NT, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
          U: tl.constexpr, BTQ: tl.constexpr):  # fmt: skip
    """This program's tile and KV head: rows (token of the tile, head of the group) [M] -> (each row's membership
    bit r_l, valid rows, their index into q / o rows, their query's key index; K and V of the KV head; the offset of
    the tile's union and its length)."""
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_r = tl.arange(0, BTQ * GP)
    r_l = o_r // GP  # the token's place in the tile: its membership bit
    r_t = i_t * BTQ + r_l
    r_g = o_r % GP
    m_r = (r_t < T) & (r_g < G)
    row = (i_b * T + r_t) * (H * G) + i_h * G + r_g
    r_pos = (r_t + TK - T).to(tl.int32)
    p_k = k + i_b * TK * H * D + i_h * D
    p_v = v + i_b * TK * H * D + i_h * D
    p_u = ((i_b * NT + i_t) * H + i_h) * U
    n_u = tl.load(u_count + (i_b * NT + i_t) * H + i_h)
    return r_l, m_r, row, r_pos, p_k, p_v, p_u, n_u


@triton.jit(do_not_specialize=["T", "TK"])
def _attend_fwd_union_kernel(
    q,  # [B, T, HQ, D]
    k,  # [B, TK, H, D]
    v,  # [B, TK, H, D]
    u_start,  # [B, NT, H, U] int32
    u_bits,  # [B, NT, H, U] int32
    u_count,  # [B, NT, H] int32
    o,  # [B, T, HQ, D] out
    lse,  # [B, T, HQ] fp32 out, log2 domain
    scale_log2,
    T,
    TK,
    NT,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    U: tl.constexpr,
    BTQ: tl.constexpr,
    NB: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    r_l, m_r, row, r_pos, p_k, p_v, p_u, n_u = _tile(k, v, u_count, T, TK, NT, H, G, GP, D, U, BTQ)
    M: tl.constexpr = BTQ * GP
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # [M, BD]
    b_q = tl.load(q + row[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
    b_m = tl.full([M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([M], dtype=tl.float32)
    b_acc = tl.zeros([M, BD], dtype=tl.float32)
    for u0 in range(0, n_u, NB):
        b_k, b_v, m_sk = _union_keys(p_k, p_v, u_start + p_u, u_bits + p_u, u0, n_u, r_l, r_pos, TK, H, D, BD, BS, NB)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * scale_log2
        b_s = tl.where(m_sk, b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_s, b_m, b_l, b_acc, b_v, DOT_PREC)
    b_o, b_lse = softmax_output(b_acc, b_m, b_l)
    tl.store(o + row[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
    tl.store(lse + row, b_lse, mask=m_r)


@triton.jit(do_not_specialize=["T", "TK"])
def _attend_bwd_dq_union_kernel(
    q,
    k,
    v,
    o,
    do,
    lse,  # [B, T, HQ] fp32, log2 domain
    delta,  # [B, T, HQ] fp32 out: rowsum(do * o)
    dq,  # [B, T, HQ, D] out
    u_start,
    u_bits,
    u_count,
    scale_log2,
    scale,
    T,
    TK,
    NT,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    U: tl.constexpr,
    BTQ: tl.constexpr,
    NB: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dq (and delta for the dk/dv kernel) over the same tiles and unions as the forward."""
    r_l, m_r, row, r_pos, p_k, p_v, p_u, n_u = _tile(k, v, u_count, T, TK, NT, H, G, GP, D, U, BTQ)
    M: tl.constexpr = BTQ * GP
    o_d = tl.arange(0, BD)
    m_qd = m_r[:, None] & (o_d < D)[None, :]
    b_q, b_do, b_lse, b_delta = dq_rows(q, do, o, lse, delta, row, m_r, D, BD)
    b_dq = tl.zeros([M, BD], dtype=tl.float32)
    for u0 in range(0, n_u, NB):
        b_k, b_v, m_sk = _union_keys(p_k, p_v, u_start + p_u, u_bits + p_u, u0, n_u, r_l, r_pos, TK, H, D, BD, BS, NB)
        b_dq = dq_step(b_q, b_do, b_lse, b_delta, b_k, b_v, m_sk, b_dq, scale_log2, DOT_PREC)
    tl.store(dq + row[:, None] * D + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty), mask=m_qd)


def _launch_args(q, k, block_indices, block_size, doc_start, btq):
    """The unions of the tiles and the launch constants shared by the forward and dq kernels."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    u_start, u_bits, u_count = tile_unions(block_indices, doc_start, block_size, btq)
    consts = dict(
        H=H,
        G=G,
        GP=group_pad(G),
        D=D,
        BD=max(16, next_pow2(D)),
        BS=block_size,
        U=u_start.shape[3],
        BTQ=btq,
    )
    return (u_start, u_bits, u_count), consts, (u_start.shape[1], B * H)


def attend_bwd_dq_union(q, k, v, o, do, lse, delta, dq, block_indices, block_size, scale_log2, scale, doc_start,
                        btq, nb, precision, opt):  # fmt: skip
    """Fill dq [B, T, HQ, D] and delta [B, T, HQ] over the forward's tiles and unions (`attend.attend_bwd` calls
    this when `AttendOptions.union_tile` is set; dk / dv stay with the reverse-index kernel)."""
    unions, consts, grid = _launch_args(q, k, block_indices, block_size, doc_start, btq)
    _attend_bwd_dq_union_kernel[grid](
        q, k, v, o, do, lse, delta, dq, *unions, scale_log2, scale, q.shape[1], k.shape[1], grid[0],
        **consts, NB=nb, DOT_PREC=precision, num_warps=opt.union_warps, num_stages=opt.fwd_stages,
    )  # fmt: skip


def attend_fwd_union(q, k, v, block_indices, block_size, scale_log2, doc_start, o, lse, btq, nb, precision, opt):
    """Fill o [B, T, HQ, D] and lse [B, T, HQ] (log2 domain) with tiles of `btq` tokens walking their unions, `nb`
    blocks per step. Shapes and arguments as `attend.attend_fwd`, which calls this."""
    unions, consts, grid = _launch_args(q, k, block_indices, block_size, doc_start, btq)
    _attend_fwd_union_kernel[grid](
        q, k, v, *unions, o, lse, scale_log2, q.shape[1], k.shape[1], grid[0],
        **consts, NB=nb, DOT_PREC=precision, num_warps=opt.union_warps, num_stages=opt.fwd_stages,
    )  # fmt: skip
