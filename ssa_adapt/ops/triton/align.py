"""SSA's alignment loss in Triton: d(a, sg(b)) + d(sg(a), b) = 2 mean(h(a - b)) for SmoothL1 (beta) or the
squared error, one read of both inputs forward and one read plus one write of each gradient backward.

a, b: any equal shape and dtype (the attention outputs [B, T, HQ, D]); the loss is a float32 scalar. Same value and
gradients as `ssa_adapt.ops.reference.alignment_loss` (per-block partial sums in float32, then one torch.sum, so
the result is deterministic); the backward reads the incoming gradient from device memory (no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import DEFAULT_OPTIONS, KernelOptions
from .utils import cdiv, new_empty

__all__ = ["alignment_loss"]

ALIGN_BLOCK = 4096  # elements per program
ALIGN_WARPS = 8


@triton.jit
def _block_difference(a, b, N, BLOCK: tl.constexpr):
    """This program's BLOCK elements: (offsets, in-range mask, a - b in float32, 0 outside the range)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    d = tl.load(a + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(b + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, d


@triton.jit
def _align_fwd_kernel(
    a,  # [N] any float dtype
    b,  # [N] same dtype
    partial,  # [cdiv(N, BLOCK)] float32 out: sum of h(a - b) over the program's elements
    N,
    beta,
    BLOCK: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    _, mask, d = _block_difference(a, b, N, BLOCK)
    if SMOOTH:
        ad = tl.abs(d)
        per = tl.where(ad < beta, (0.5 / beta) * d * d, ad - 0.5 * beta)
    else:
        per = d * d
    tl.store(partial + tl.program_id(0), tl.sum(tl.where(mask, per, 0.0), axis=0))


@triton.jit
def _align_bwd_kernel(
    a,  # [N]
    b,  # [N]
    grad,  # [] float32: d(total loss) / d(alignment loss)
    ga,  # [N] out (a's dtype) or unused
    gb,  # [N] out (b's dtype) or unused
    N,
    inv_n,  # 1 / N
    beta,
    BLOCK: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_GA: tl.constexpr,
    HAS_GB: tl.constexpr,
):
    offs, mask, d = _block_difference(a, b, N, BLOCK)
    if SMOOTH:
        g = tl.minimum(tl.maximum(d / beta, -1.0), 1.0)
    else:
        g = 2.0 * d
    g = g * (tl.load(grad).to(tl.float32) * inv_n)
    if HAS_GA:
        tl.store(ga + offs, g.to(ga.dtype.element_ty), mask=mask)
    if HAS_GB:
        tl.store(gb + offs, (-g).to(gb.dtype.element_ty), mask=mask)


def align_fwd(a: torch.Tensor, b: torch.Tensor, kind: str, beta: float, poison: bool) -> torch.Tensor:
    """The loss of a, b (any equal shape and dtype) -> float32 scalar."""
    a_flat, b_flat = a.contiguous().view(-1), b.contiguous().view(-1)
    n = a_flat.numel()
    partial = new_empty((max(cdiv(n, ALIGN_BLOCK), 1),), torch.float32, a.device, poison)
    if n == 0:
        partial.zero_()
    else:
        _align_fwd_kernel[(cdiv(n, ALIGN_BLOCK),)](
            a_flat, b_flat, partial, n, float(beta), BLOCK=ALIGN_BLOCK, SMOOTH=kind == "smooth_l1",
            num_warps=ALIGN_WARPS,
        )  # fmt: skip
    return partial.sum() * (2.0 / max(n, 1))


def align_bwd(a, b, grad, kind: str, beta: float, poison: bool, need_a: bool = True, need_b: bool = True):
    """Gradients (ga, gb) of the loss into a and b (None where not needed), given the loss's gradient grad []."""
    a_flat, b_flat = a.contiguous().view(-1), b.contiguous().view(-1)
    n = a_flat.numel()
    ga = new_empty((n,), a_flat.dtype, a_flat.device, poison) if need_a else None
    gb = new_empty((n,), b_flat.dtype, b_flat.device, poison) if need_b else None
    if n and (need_a or need_b):
        _align_bwd_kernel[(cdiv(n, ALIGN_BLOCK),)](
            a_flat, b_flat, grad.float().contiguous(), ga if need_a else a_flat, gb if need_b else b_flat, n,
            1.0 / n, float(beta), BLOCK=ALIGN_BLOCK, SMOOTH=kind == "smooth_l1", HAS_GA=need_a, HAS_GB=need_b,
            num_warps=ALIGN_WARPS,
        )  # fmt: skip
    return (ga.view(a.shape) if need_a else None), (gb.view(b.shape) if need_b else None)


class _AlignmentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, kind: str, beta: float, poison: bool) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.kind, ctx.beta, ctx.poison = kind, float(beta), poison
        return align_fwd(a, b, kind, beta, poison)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        ga, gb = align_bwd(a, b, grad, ctx.kind, ctx.beta, ctx.poison, *ctx.needs_input_grad[:2])
        return ga, gb, None, None, None


def alignment_loss(
    o_full: torch.Tensor,
    o_sparse: torch.Tensor,
    kind: str = "smooth_l1",
    beta: float = 1.0,
    options: KernelOptions | None = None,
):
    """d(o_full, sg(o_sparse)) + d(sg(o_full), o_sparse), mean over all elements -> float32 scalar. Inputs of one
    shape and dtype on a CUDA device (or the CPU under TRITON_INTERPRET=1); checked by the dispatcher. options:
    `KernelOptions` (None: the defaults); only `options.poison` applies here."""
    if o_full.dtype != o_sparse.dtype:
        o_sparse = o_sparse.to(o_full.dtype)
    poison = (DEFAULT_OPTIONS if options is None else options).poison
    return _AlignmentFunction.apply(o_full, o_sparse, kind, beta, poison)
