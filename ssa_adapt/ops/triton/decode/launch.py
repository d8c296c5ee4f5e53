"""Host-side helpers shared by the decode kernels' launchers (`select.py`, `attend.py`)."""

from __future__ import annotations

import torch

from .. import utils
from ..utils import cdiv, num_programs

__all__ = ["PER_STEP", "last_dim_contiguous", "workspace", "split_count"]


# The key length grows by one every decode step: left unspecialised (Triton would otherwise compile each kernel again
# for key lengths divisible by 16, in the middle of a `generate` call)
PER_STEP = ["TK"]


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def workspace(device: torch.device, poison: bool, *words: int) -> list[torch.Tensor]:
    """Flat float32 scratch buffers of the given sizes, carved from one allocation (16-byte aligned)."""
    sizes = [-(-w // 4) * 4 for w in words]
    buf = utils.new_empty((max(sum(sizes), 4),), torch.float32, device, poison)
    out, start = [], 0
    for w, n in zip(words, sizes):
        out.append(buf[start : start + w])
        start += n
    return out


def split_count(units: int, pieces: int, device: torch.device, splits: int | None, per_sm: int) -> int:
    """How many programs share one (query, KV head): enough for `per_sm` per SM, at most `pieces`."""
    if splits is None:
        splits = cdiv(num_programs(device, per_sm), max(units, 1))
    return max(1, min(splits, pieces))
