"""Where each query's document starts: the one description of packing and padding the attention ops take.

`doc_start [B, T]` (int64) holds, for every query, the key index at which its document begins; keys before it
are invisible and blocks are counted from it. It covers packed sequences (position_ids resets or cu_seqlens),
left padding (HF's `attention_mask` plus position_ids from `cumsum(mask) - 1`) and KV caches (TK >= T, queries
are the last T keys). `None` means every document starts at key 0, the fast path. Under torch.compile the
functions return the tensor even when it is all zeros (deciding would need the values on the host: a graph break),
and skip the checks that read values.
"""

from __future__ import annotations

import torch

__all__ = ["doc_start_from_position_ids", "doc_start_from_cu_seqlens"]


def doc_start_from_position_ids(
    position_ids: torch.Tensor | None,
    batch_size: int,
    q_len: int,
    kv_len: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """doc_start [B, T] from position_ids [B or 1, T] (positions inside each document) and an optional 2D
    padding mask [B, TK] (1 = real token, left padding). Returns None when every document starts at key 0."""
    device = (
        position_ids.device
        if position_ids is not None
        else (attention_mask.device if attention_mask is not None else None)
    )
    key_index = torch.arange(q_len, device=device) + (kv_len - q_len)  # [T], the queries' key positions
    start = None
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[-1] != q_len:
            raise ValueError(f"position_ids must be [B, T] with T={q_len}; got {tuple(position_ids.shape)}.")
        pos = position_ids.to(torch.int64).expand(batch_size, q_len)
        start = (key_index[None, :] - pos).clamp(min=0)
        start = torch.minimum(start, key_index[None, :].expand_as(start))
    traced = torch.compiler.is_compiling()
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask[:, -kv_len:].to(torch.bool)
        if traced or not bool(mask.all()):
            # first real key of each row: everything before it is left padding
            first = torch.where(mask.any(-1), mask.int().argmax(-1), 0).to(torch.int64)
            first = torch.minimum(first[:, None], key_index[None, :])
            start = first.expand(batch_size, q_len) if start is None else torch.maximum(start, first)
    if start is None or (not traced and not bool(start.any())):
        return None
    return start.contiguous()


def doc_start_from_cu_seqlens(cu_seqlens: torch.Tensor, q_len: int) -> torch.Tensor | None:
    """doc_start [1, T] for a packed batch of one row described by cumulative lengths [N + 1] (flash-attn varlen)."""
    cu = cu_seqlens.to(torch.int64)
    if torch.compiler.is_compiling():
        return torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=q_len)[None, :]
    if cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != q_len or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be a non-decreasing [N + 1] tensor from 0 to T={q_len}; got {cu.tolist()}.")
    lengths = cu[1:] - cu[:-1]
    start = torch.repeat_interleave(cu[:-1], lengths)[None, :]
    return None if not bool(start.any()) else start
