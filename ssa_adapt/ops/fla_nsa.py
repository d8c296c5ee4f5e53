"""backend='fla': fla-core's NSA selected-attention kernel on SSA's block indices, for comparison.

fla's kernel tiles the whole GQA group as the tensor-core M dimension, so it runs only where G = HQ / H is a power
of two >= 16 (SSA-1B's 32 / 2), with T == TK, and packed documents only as one row (flash-style cu_seqlens).
"""

from __future__ import annotations

import torch

from .reference import check_qkv
from .triton.utils import check_doc_start

__all__ = ["attend_blocks", "cu_seqlens_from_doc_start"]


def cu_seqlens_from_doc_start(doc_start: torch.Tensor) -> torch.Tensor:
    """doc_start [1, T] of contiguous documents -> cu_seqlens [N + 1] int64 (the inverse of
    `doc_start_from_cu_seqlens`)."""
    T = doc_start.shape[1]
    starts = torch.unique_consecutive(doc_start[0])
    cu = torch.cat([starts, starts.new_tensor([T])])
    if int(cu[0]) != 0 or not bool((doc_start[0] == torch.repeat_interleave(starts, cu.diff())).all()):
        raise ValueError("backend='fla' needs contiguous documents starting at key 0 (doc_start_from_cu_seqlens).")
    return cu


def attend_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int = 16,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """fla's ParallelNSAFunction on our indices: q [B, T, HQ, D], k, v [B, T, H, D] -> o [B, T, HQ, D]."""
    B, T, TK, HQ, H, D = check_qkv(q, k, v)
    G = HQ // H
    if G < 16 or G & (G - 1):
        raise ValueError(
            f"backend='fla': fla-core's NSA kernel needs the GQA group HQ / H to be a power of two >= 16; "
            f"got HQ={HQ}, H={H} (G={G}). Use backend='triton', which runs any G."
        )
    if T != TK:
        raise ValueError(f"backend='fla' needs T == TK (no KV cache); got T={T}, TK={TK}. Use backend='triton'.")
    try:
        from fla.ops.nsa.parallel import ParallelNSAFunction
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("backend='fla' needs fla-core: pip install 'ssa_adapt[fla]'.") from e
    ds = check_doc_start(doc_start, B, T, q.device)
    cu_seqlens = None
    if ds is not None:
        if B != 1:
            raise ValueError(f"backend='fla' takes packed documents as one row (B=1, cu_seqlens); got B={B}.")
        cu_seqlens = cu_seqlens_from_doc_start(ds)
    scale = D**-0.5 if scale is None else scale
    S = block_indices.shape[-1]
    idx = block_indices.to(device=q.device, dtype=torch.int32).contiguous()
    return ParallelNSAFunction.apply(q, k, v, idx, S, block_size, scale, cu_seqlens)
