"""A whole sparse decode step in one launch, for eager decoding: `decode_sparse_step`.

An eager `generate()` is bound by the host: each Triton launch costs tens of microseconds of Python (argument
binding and specialisation in Triton's launcher) while the GPU work of a decode step's selection and attention
is a few microseconds. `decode_select` + `decode_attend` take four launches per layer (scoring, finishing,
attention, combine), split for occupancy, which is what a CUDA graph wants (launches are free there, idle SMs
are not). `_decode_step_kernel` runs the same three phases in one launch, grid (B * T * H, splits):

1. the scoring of `select.py` (`_score_split`), each program over its split of the row's complete blocks
   (`DecodeOptions.step_split_blocks`; one split up to that many): logits to a scratch row, the softmax
   statistics per head and split beside them; the row's last program to finish (an atomic count) goes on:
2. the row finishing of `select.py` (`_finish_row`): the block indices, written to the output row;
3. the attention of `attend.py` (`_attend_split`) over those blocks, one split, into the output.

Phases hand over through global memory inside the program (a barrier between them). The code is the split
launches', with one split each: the statistics and outputs are not merged from partial ones, so they round
differently (a near-tied selection may go the other way). `DecodeOptions.fused_step` chooses this path for eager
decode steps (`ssa_adapt/ops/dispatch.py`); the static-cache paths keep the split kernels. Measured: the kernel
README, section 6.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ...reference import check_qkv
from .. import utils
from ..cache_means import _write_completed_block_mean
from ..compiled_launch import CompiledLaunch, specialization_key
from ..options import DEFAULT_OPTIONS, KernelOptions
from ..utils import cdiv, check_block_size, check_doc_start, next_pow2
from .attend import _attend_split
from .launch import PER_STEP, last_dim_contiguous
from .select import _finish_row, _row_counts, _score_split, _stats_chunk, check_selection

__all__ = ["decode_sparse_step"]


@triton.jit(do_not_specialize=PER_STEP)
def _decode_step_kernel(
    q,  # [B, T, HQ, D] (strided)
    k,  # [B, TK, H, D] (strided)
    v,  # [B, TK, H, D] (strided)
    kbar,  # [B, NB, H, D] float32 block means (strided, last dim contiguous; in-out with APPEND)
    doc_start,  # [B, T] int64 or None
    means_start,  # [B] int64 or None: each row's document start, for APPEND
    count,  # [>= B * T * H] int32, zero between calls (SPLIT: the splits of a row that have finished scoring)
    scratch,  # float32 [SCRATCH words]: logits, statistics, importance bits and survivors (see decode_sparse_step)
    indices,  # [B, T, H, S] int32 out
    o,  # [B, T, HQ, D] out
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
    stride_mb,
    stride_mn,
    stride_mh,
    T,
    TK,
    NB,
    NSPLIT,  # programs per row (the grid's second axis), each scoring BPS blocks
    BPS,
    H: tl.constexpr,
    G: tl.constexpr,
    GF: tl.constexpr,  # the finishing's group rows: next power of two >= G (>= 2)
    GS: tl.constexpr,  # the scoring's and the attention's group rows (>= 16, the tensor-core tile)
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    S: tl.constexpr,
    SP: tl.constexpr,
    FP: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    BN_SCORE: tl.constexpr,
    BN_FINISH: tl.constexpr,
    LG: tl.constexpr,
    CAP: tl.constexpr,
    FAST: tl.constexpr,
    NBK: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    APPEND: tl.constexpr,  # T == 1: first write the mean of the block the newest key completed (if it did)
    BSP: tl.constexpr,  # BS rounded up to a power of two (APPEND)
    SPLIT: tl.constexpr,  # NSPLIT > 1: the row's last program to finish scoring finishes and attends
    NSP: tl.constexpr,  # splits whose statistics the finishing reads in one load
):
    i_bth = tl.program_id(0).to(tl.int64)
    i_sp = tl.program_id(1)
    if APPEND:  # what `append_block_means` would launch, for this program's (row, KV head); T == 1, so i_bth // H = b.
        # The block is the row's last complete one, which only the split holding it scores: that split writes it.
        first_key = tl.load(means_start + i_bth // H)
        n = TK - first_key
        if i_sp == tl.maximum(n // BS - 1, 0) // BPS:
            _write_completed_block_mean(k, kbar, i_bth // H, i_bth % H, first_key, n, stride_kb, stride_kt,
                                        stride_kh, stride_mb, stride_mn, stride_mh, D, BD, BS, BSP)  # fmt: skip
        tl.debug_barrier()  # the scoring below reads that mean back (other threads of this program)
    # the scratch's pieces, all rows': logits [units, G, nb], statistics [units, NSPLIT, 2, GS], importance bits
    # [units, nb] int32, survivors [units, CAP] int64 (at an even word: 8-byte aligned)
    units = tl.num_programs(0).to(tl.int64)
    nb = tl.maximum(NB, 1)
    logits = scratch
    stats = logits + units * G * nb
    imp = (stats + units * NSPLIT * 2 * GS).to(tl.pointer_type(tl.int32), bitcast=True)
    comp = (scratch + (units * (G * nb + NSPLIT * 2 * GS + nb) + 1) // 2 * 2).to(tl.pointer_type(tl.int64),
                                                                                 bitcast=True)  # fmt: skip
    _score_split(q, kbar, None, doc_start, logits, stats, scale_log2, stride_qb, stride_qt, stride_qh, stride_mb,
                 stride_mn, stride_mh, T, TK, NB, NSPLIT, BPS, i_bth, i_sp, H, G, GS, D, BD, BS, BN_SCORE, PRECISION,
                 False, HAS_DOCS)  # fmt: skip
    tl.debug_barrier()  # the logits and statistics are read back by other threads (and, split, other programs)
    if SPLIT:  # the row's last split to finish goes on (acq_rel: the others' logits are visible to it)
        last = tl.atomic_add(count + i_bth, 1, sem="acq_rel") == NSPLIT - 1
    else:
        last = True
    if last:
        _finish_row(logits, stats, imp, comp, None, doc_start, indices, T, TK, NB, NSPLIT, i_bth, H, G, GF, GS, NSP,
                    BS, S, SP, FP, SINK, LOCAL, BN_FINISH, LG, CAP, FAST, False, HAS_DOCS)  # fmt: skip
        tl.debug_barrier()  # likewise the block indices
        _attend_split(q, k, v, indices, doc_start, None, o, None, None, scale_log2, stride_qb, stride_qt,
                      stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, T, TK, 1, S,
                      i_bth, 0, H, G, GS, D, BD, BS, S, NBK, HAS_DOCS, False, True, DOT_PREC)  # fmt: skip
        if SPLIT:
            tl.atomic_xchg(count + i_bth, 0)  # zero for the next call


def _splits(nb: int, opt) -> tuple[int, int]:
    """(programs per row, blocks each scores): splits of `DecodeOptions.step_split_blocks` blocks, or one program
    per row (None)."""
    if opt.step_split_blocks is None or nb <= opt.step_split_blocks:
        return 1, nb
    return cdiv(nb, opt.step_split_blocks), opt.step_split_blocks


@functools.lru_cache(maxsize=256)
def _launch_constants(H, G, D, block_size, S, sink, local, opt, f32: bool, has_docs: bool, append: bool,
                      nsplit: int) -> tuple[dict, dict]:  # fmt: skip
    """The step kernel's compile-time arguments and launch options for one configuration (built once: a decode
    step's host time is the limit of eager decoding)."""
    constants = dict(
        H=H, G=G, GF=max(2, next_pow2(G)), GS=max(16, next_pow2(G)), D=D, BD=max(16, next_pow2(D)), BS=block_size,
        S=S, SP=max(2, next_pow2(S)), FP=max(2, next_pow2(sink + local)), SINK=sink, LOCAL=local,
        BN_SCORE=opt.score_blocks, BN_FINISH=opt.finish_blocks, LG=min(opt.finish_groups, opt.finish_blocks),
        CAP=opt.finish_cap, FAST=opt.finish_fast, NBK=max(1, opt.attend_keys // block_size),
        PRECISION=opt.score_precision, DOT_PREC="ieee" if f32 else "tf32", HAS_DOCS=has_docs, APPEND=append,
        BSP=next_pow2(block_size), SPLIT=nsplit > 1, NSP=_stats_chunk(nsplit, G, opt.stats_chunk),
    )  # fmt: skip
    return constants, dict(num_warps=opt.step_warps)


_STEP = CompiledLaunch(_decode_step_kernel)


def decode_sparse_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_means: torch.Tensor,
    *,
    block_size: int = 16,
    block_count: int = 16,
    sink_blocks: int = 0,
    local_blocks: int = 1,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
    means_start: torch.Tensor | None = None,
    options: KernelOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSA's sparse stream for few queries per row (T <= 4) from a KV cache's block means, in one launch
    (inference only: no autograd).

    q [B, T, HQ, D], k, v [B, TK, H, D] (any strides with a contiguous last dim; query t is key TK - T + t),
    block_means [B, NB, H, D] float32 (each row's complete blocks from its document start, as `decode_select`
    takes them), doc_start [B, T] or None -> (o [B, T, HQ, D], block_indices [B, T, H, block_count] int32), equal
    to `decode_select(..., key_len=TK, doc_start=doc_start)` followed by `decode_attend`.
    means_start [B] int64 (T == 1): the means may still lack the block that the newest key completed (rows whose
    TK - means_start[b] keys from their document start end a block); the kernel writes it into block_means first,
    in place, as `append_block_means(block_means, means_start, k, block_size)` would (one launch fewer: the cache
    leaves that update to this call).
    options: `KernelOptions` (None: the defaults); reads `options.decode` and `options.poison`.
    """
    B, T, TK, HQ, H, D = check_qkv(q, k, v)
    if block_means.dim() != 4 or block_means.shape[0] != B or block_means.shape[2:] != (H, D):
        raise ValueError(f"block_means must be [B, NB, H, D] = [{B}, NB, {H}, {D}]; got {tuple(block_means.shape)}.")
    check_block_size(block_size)
    check_selection(block_count, sink_blocks, local_blocks)
    if means_start is not None:
        if T != 1 or means_start.shape != (B,) or means_start.dtype != torch.int64:
            raise ValueError(
                f"means_start {tuple(means_start.shape)} {means_start.dtype} with {T} queries per row: the in-place "
                f"update of the block means needs one query per row and a [B={B}] int64 tensor."
            )
        if block_means.dtype != torch.float32 or block_means.stride(3) != 1:
            raise ValueError(
                f"block_means {block_means.dtype} strides {block_means.stride()}: updated in place (means_start), "
                "they must be float32 with a contiguous last dim."
            )
    options = DEFAULT_OPTIONS if options is None else options
    opt, poison = options.decode, options.poison
    scale = D**-0.5 if scale is None else scale
    ds = check_doc_start(doc_start, B, T, q.device)
    G, S, NB = HQ // H, block_count, block_means.shape[1]
    units, nb = B * T * H, max(NB, 1)
    GS = max(16, next_pow2(G))
    nsplit, bps = _splits(nb, opt)
    out = utils.new_empty((B, T, HQ, D), q.dtype, q.device, poison)
    indices = utils.new_empty((B, T, H, S), torch.int32, q.device, poison)
    # the kernel's scratch (its layout: _decode_step_kernel), one allocation
    words = -(-units * (G * nb + nsplit * 2 * GS + nb) // 2) * 2 + 2 * units * opt.finish_cap
    scratch = utils.new_empty((words,), torch.float32, q.device, poison)
    if out.numel() == 0:
        return out, indices
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    kbar = last_dim_contiguous(block_means if block_means.dtype == torch.float32 else block_means.float())
    config = (H, G, D, block_size, S, sink_blocks, local_blocks, opt, q.dtype == torch.float32, ds is not None,
              means_start is not None, nsplit)  # fmt: skip
    constants, launch_options = _launch_constants(*config)
    count = _row_counts(q.device, units) if nsplit > 1 else None
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *kbar.stride()[:3])
    tensors = (q, k, v, kbar, ds, means_start, count, scratch, indices, out)
    args = (*tensors, scale * math.log2(math.e), *strides, T, TK, NB, nsplit, bps)
    if opt.cached_launch:  # TK: left unspecialised (PER_STEP), only its width counts
        spec = specialization_key(tensors, (*strides, T, NB, nsplit, bps))
        key = None if spec is None else (config, q.dtype, k.dtype, v.dtype, spec, TK < 2**31)
        _STEP.launch((units, nsplit), args, key, constants, launch_options)
    else:
        _decode_step_kernel[(units, nsplit)](*args, **constants, **launch_options)
    return out, indices
