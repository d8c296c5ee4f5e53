"""`SSACache`: transformers' `DynamicCache` plus, per layer, the mean key of every complete block.

A sparse decode step scores T/BS block means instead of re-reading every cached key. The means are kept per row
relative to the row's document start (left padding shifts it), grow by at most one block per row per decode
step, and follow the cache through beam reordering, batch expansion and selection. A plain `DynamicCache`
that reaches a converted layer is upgraded to an `SSACache` in place, so `generate()` needs nothing special.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

__all__ = ["SSACache", "as_ssa_cache"]


class _LayerMeans:
    """Block means of one layer: means [B, cap, H, D] (float32), blocks done per row [B], doc start per row [B]."""

    def __init__(self, means: torch.Tensor, done: torch.Tensor, start: torch.Tensor):
        self.means, self.done, self.start = means, done, start

    def index(self, rows: torch.Tensor) -> _LayerMeans:
        return _LayerMeans(self.means[rows], self.done[rows], self.start[rows])


class SSACache(DynamicCache):
    """DynamicCache that also keeps the complete-block key means SSA's sparse decoding selects from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ssa_means: dict[int, _LayerMeans] = {}

    def block_means(
        self, layer_idx: int, keys: torch.Tensor, doc_start: torch.Tensor, block_size: int
    ) -> torch.Tensor:
        """Means of the complete blocks of every row, updated for the cached `keys` [B, TK, H, D] whose documents
        start at `doc_start` [B] -> [B, NB, H, D] (NB = the most complete blocks of any row; rows with fewer
        have garbage after their last complete block, which selection never reads)."""
        B, TK, H, D = keys.shape
        target = (TK - doc_start) // block_size  # complete blocks per row [B]
        state = self._ssa_means.get(layer_idx)
        if state is None or state.means.shape[0] != B or not torch.equal(state.start, doc_start):
            state = self._recompute(keys, doc_start, target, block_size)
        else:
            fresh = target - state.done
            if bool((fresh < 0).any()) or bool((fresh > 1).any()):
                state = self._recompute(keys, doc_start, target, block_size)  # cropped, or several new blocks
            elif bool(fresh.any()):
                state = self._append_last_block(state, keys, target, block_size)
        self._ssa_means[layer_idx] = state
        return state.means[:, : int(target.max())]

    @staticmethod
    def _recompute(keys, doc_start, target, block_size) -> _LayerMeans:
        B, TK, H, D = keys.shape
        n = int(target.max())
        cap = max(16, 2 * n)
        means = keys.new_zeros(B, cap, H, D, dtype=torch.float32)
        if n:
            index = (doc_start[:, None] + torch.arange(n * block_size, device=keys.device)[None]).clamp(max=TK - 1)
            rows = keys.gather(1, index[:, :, None, None].expand(B, n * block_size, H, D)).float()
            means[:, :n] = rows.view(B, n, block_size, H, D).mean(2)
        return _LayerMeans(means, target.clone(), doc_start.clone())

    @staticmethod
    def _append_last_block(state, keys, target, block_size) -> _LayerMeans:
        """At most one new complete block per row (a decode step): compute just those blocks' means."""
        B, TK, H, D = keys.shape
        grown = target > state.done
        if int(target.max()) > state.means.shape[1]:
            state.means = torch.cat([state.means, torch.zeros_like(state.means)], 1)
        slot = (target - 1).clamp(min=0)  # the newly complete block of each growing row
        first = (state.start + slot * block_size).clamp(max=TK - block_size)
        index = first[:, None] + torch.arange(block_size, device=keys.device)[None]
        block = keys.gather(1, index[:, :, None, None].expand(B, block_size, H, D)).float().mean(1)  # [B, H, D]
        rows = torch.arange(B, device=keys.device)
        state.means[rows, slot] = torch.where(grown[:, None, None], block, state.means[rows, slot])
        state.done = target.clone()
        return state

    # structural changes of the cache carry the means along ------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._ssa_means = {i: s.index(beam_idx.to(s.means.device)) for i, s in self._ssa_means.items()}

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._ssa_means = {i: s.index(indices.to(s.means.device)) for i, s in self._ssa_means.items()}

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._ssa_means = {
            i: _LayerMeans(*(x.repeat_interleave(repeats, dim=0) for x in (s.means, s.done, s.start)))
            for i, s in self._ssa_means.items()
        }

    def crop(self, *args, **kwargs):
        super().crop(*args, **kwargs)
        self._ssa_means = {}  # recomputed from the remaining keys on the next step

    def reset(self):
        super().reset()
        self._ssa_means = {}


def as_ssa_cache(cache) -> SSACache | None:
    """The cache as an SSACache: an SSACache as is, a plain DynamicCache upgraded in place, else None."""
    if isinstance(cache, SSACache):
        return cache
    if type(cache) is DynamicCache:
        cache.__class__ = SSACache
        cache._ssa_means = {}
        return cache
    return None
