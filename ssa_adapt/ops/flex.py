"""The full stream with document boundaries (packed sequences, left padding), a sliding window or TK > T, on CUDA:
FlexAttention with a block mask built directly from doc_start (no [T, TK] mask is ever materialised).

q [B, T, HQ, D], k, v [B, TK, H, D], doc_start [B, T] or None -> o [B, T, HQ, D]. Query t (key index
t + TK - T) sees keys in [lower(t), t + TK - T] with lower(t) = max(doc_start, key index - sliding_window + 1).
"""

from __future__ import annotations

import functools

import torch

from .reference import check_qkv
from .triton.utils import check_doc_start

__all__ = ["full_attention", "visible_block_mask"]

FLEX_BLOCK = 128


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once (its eager form materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex():
    """FlexAttention to call here: inside a compiled region the plain function, which the enclosing compilation
    traces (dynamo would trace through the cached compiled wrapper anyway, ignoring the cache, with a warning);
    eagerly the cached compiled one."""
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention
    return _compiled_flex()


def _block_lists(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """visible [B, NQ, NK] bool -> (count [B, 1, NQ] int32, indices [B, 1, NQ, NK] int32, visible ids first)."""
    order = torch.argsort((~visible).to(torch.int8), dim=-1, stable=True)  # visible blocks first, ascending
    return visible.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]


def visible_block_mask(lower: torch.Tensor, upper: torch.Tensor, TK: int, block_size: int = FLEX_BLOCK):
    """BlockMask for per-query key intervals [lower, upper] ([B, T] int64 each) in blocks of `block_size` queries
    and keys: full blocks (every query of the query block sees every key) skip the mask_mod; partial ones apply it."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T = lower.shape
    BS = block_size
    nq, nk = -(-T // BS), -(-TK // BS)
    pad = nq * BS - T
    lo = torch.nn.functional.pad(lower, (0, pad), value=TK)  # padded queries see nothing
    hi = torch.nn.functional.pad(upper, (0, pad), value=-1)
    lo_b, hi_b = lo.view(B, nq, BS), hi.view(B, nq, BS)
    k0 = torch.arange(nk, device=lower.device) * BS  # first key of each key block
    k1 = torch.clamp(k0 + BS - 1, max=TK - 1)
    # any query of the block may see some key of the key block (intervals of one query block overlap or touch)
    any_ = (k0[None, None, :] <= hi_b.amax(-1)[..., None]) & (k1[None, None, :] >= lo_b.amin(-1)[..., None])
    valid_q = lo_b <= hi_b
    lo_max = torch.where(valid_q, lo_b, -1).amax(-1)
    hi_min = torch.where(valid_q, hi_b, TK).amin(-1)
    full = (
        (k0[None, None, :] >= lo_max[..., None])
        & (k1[None, None, :] <= hi_min[..., None])
        & valid_q.all(-1)[..., None]
    )
    full &= k0[None, None, :] + BS <= TK  # a ragged last key block goes through the mask
    partial = any_ & ~full
    kv_num, kv_idx = _block_lists(partial)
    full_num, full_idx = _block_lists(full)
    lower_c, upper_c = lower.contiguous(), upper.contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lower_c[b, q_idx]) & (kv_idx <= upper_c[b, q_idx])

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BS, mask_mod=mask_mod, seq_lengths=(T, TK)
    )


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention inside each document (optionally sliding-window) through FlexAttention -> [B, T, HQ, D]."""
    B, T, TK, HQ, H, D = check_qkv(q, k, v)
    ds = check_doc_start(doc_start, B, T, q.device)
    upper = (torch.arange(T, device=q.device, dtype=torch.int64) + (TK - T)).expand(B, T)
    lower = torch.zeros_like(upper) if ds is None else ds
    if sliding_window is not None:
        lower = torch.maximum(lower, upper - sliding_window + 1)
    block_mask = visible_block_mask(lower, upper, TK)
    out = _flex()(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale, enable_gqa=HQ != H
    )
    return out.transpose(1, 2)
