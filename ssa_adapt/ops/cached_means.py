"""The mean key of every complete block of each row, counted from the row's document start: what a KV cache keeps
so that a sparse decode step scores T/BS block means instead of every key (`ssa_adapt.decoding`). PyTorch; the
Triton update of one decode step is `triton/cache_means.py`, chosen by `dispatch.append_block_means`."""

from __future__ import annotations

import torch

__all__ = ["block_means", "append_block_means"]


def block_means(keys: torch.Tensor, start: torch.Tensor, block_size: int, capacity: int) -> torch.Tensor:
    """The mean key of every complete block of each row, counted from the row's document start: keys [B, TK, H, D],
    start [B] int64 -> means [B, capacity, H, D] float32 (capacity >= TK // block_size). Row b's first
    (TK - start[b]) // block_size entries are its complete blocks; the entries after them are garbage that selection
    never reads (what a KV cache keeps for decoding: `ssa_adapt.decoding`)."""
    B, TK, H, D = keys.shape
    n = TK // block_size  # the most complete blocks any row can have (a row starting at key 0)
    if capacity < n:
        raise ValueError(f"capacity={capacity}: the keys complete up to {n} blocks.")
    means = keys.new_zeros(B, capacity, H, D, dtype=torch.float32)
    if n:
        index = (start[:, None] + torch.arange(n * block_size, device=keys.device)[None]).clamp(max=TK - 1)
        rows = keys.gather(1, index[:, :, None, None].expand(B, n * block_size, H, D)).float()
        means[:, :n] = rows.view(B, n, block_size, H, D).mean(2)
    return means


def append_block_means(means: torch.Tensor, start: torch.Tensor, keys: torch.Tensor, block_size: int) -> None:
    """In place, after one new key per row: a row whose key count from its document start (TK - start[b]) became a
    multiple of the block size gets the mean of the block that key completed. means [B, CAP, H, D] float32
    (CAP >= TK // block_size), start [B] int64, keys [B, TK, H, D]."""
    B, TK, H, D = keys.shape
    n = TK - start
    grown = (n > 0) & (n % block_size == 0)
    slot = (n // block_size - 1).clamp(min=0)  # the newly complete block of each growing row
    first = (start + slot * block_size).clamp(min=0, max=max(TK - block_size, 0))
    index = first[:, None] + torch.arange(min(block_size, TK), device=keys.device)[None]
    block = keys.gather(1, index[:, :, None, None].expand(B, index.shape[1], H, D)).float().mean(1)  # [B, H, D]
    rows = torch.arange(B, device=keys.device)
    means[rows, slot] = torch.where(grown[:, None, None], block, means[rows, slot])
