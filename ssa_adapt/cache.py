"""`SSACache`: transformers' `DynamicCache` plus, per layer, the mean key of every complete block.

A sparse decode step scores T/BS block means instead of re-reading every cached key. The means are kept per row
relative to the row's document start (left padding shifts it), grow by at most one block per row per decode
step, and follow the cache through beam reordering, batch expansion and selection. A plain `DynamicCache`
that reaches a converted layer is upgraded to an `SSACache` in place, so `generate()` needs nothing special.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache, StaticCache

__all__ = ["SSACache", "as_ssa_cache", "SSAStaticCache", "as_ssa_static_cache"]


class _LayerMeans:
    """Block means of one layer: means [B, cap, H, D] (float32), doc start per row [B] (int64), and the key length
    they were computed for (a host int, so decode steps need no device-to-host sync)."""

    def __init__(self, means: torch.Tensor, start: torch.Tensor, key_len: int):
        self.means, self.start, self.key_len = means, start, key_len

    def index(self, rows: torch.Tensor) -> _LayerMeans:
        return _LayerMeans(self.means[rows], self.start[rows], self.key_len)


class SSACache(DynamicCache):
    """DynamicCache that also keeps the complete-block key means SSA's sparse decoding selects from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ssa_means: dict[int, _LayerMeans] = {}

    def block_means(
        self, layer_idx: int, keys: torch.Tensor, doc_start: torch.Tensor, block_size: int
    ) -> torch.Tensor:
        """Means of the complete blocks of every row, updated for the cached `keys` [B, TK, H, D] whose documents
        start at `doc_start` [B] -> [B, TK // block_size, H, D]. Row b's first (TK - doc_start[b]) // block_size
        entries are its complete blocks; entries after them are garbage that selection never reads.

        A decode step (one new key per row) computes only the blocks that key completed, without a host sync;
        anything else (the first step after a prefill, several new keys) recomputes every mean from the keys.
        """
        B, TK = keys.shape[:2]
        state = self._ssa_means.get(layer_idx)
        if state is None or state.means.shape[0] != B or TK != state.key_len + 1:
            state = self._recompute(keys, doc_start, block_size)
        else:
            state = self._append(state, keys, block_size)
        self._ssa_means[layer_idx] = state
        return state.means[:, : TK // block_size]

    @staticmethod
    def _recompute(keys, doc_start, block_size) -> _LayerMeans:
        B, TK, H, D = keys.shape
        n = TK // block_size  # the most complete blocks any row can have (a row starting at key 0)
        means = keys.new_zeros(B, max(16, 2 * n), H, D, dtype=torch.float32)
        if n:
            index = (doc_start[:, None] + torch.arange(n * block_size, device=keys.device)[None]).clamp(max=TK - 1)
            rows = keys.gather(1, index[:, :, None, None].expand(B, n * block_size, H, D)).float()
            means[:, :n] = rows.view(B, n, block_size, H, D).mean(2)
        return _LayerMeans(means, doc_start.to(torch.int64, copy=True), TK)

    @staticmethod
    def _append(state, keys, block_size) -> _LayerMeans:
        """One new key per row: a row whose key count (from its document start) became a multiple of the block
        size gets the mean of the block that key completed. CUDA: one kernel launch (ops/triton/cache_means.py)."""
        B, TK, H, D = keys.shape
        if TK // block_size > state.means.shape[1]:
            state.means = torch.cat([state.means, torch.zeros_like(state.means)], 1)
        state.key_len = TK
        kernel = _append_kernel() if keys.is_cuda else None
        if kernel is not None:
            kernel(state.means, state.start, keys, block_size)
            return state
        n = TK - state.start
        grown = (n > 0) & (n % block_size == 0)
        slot = (n // block_size - 1).clamp(min=0)  # the newly complete block of each growing row
        first = (state.start + slot * block_size).clamp(min=0, max=max(TK - block_size, 0))
        index = first[:, None] + torch.arange(min(block_size, TK), device=keys.device)[None]
        block = keys.gather(1, index[:, :, None, None].expand(B, index.shape[1], H, D)).float().mean(1)  # [B, H, D]
        rows = torch.arange(B, device=keys.device)
        state.means[rows, slot] = torch.where(grown[:, None, None], block, state.means[rows, slot])
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
            i: _LayerMeans(*(x.repeat_interleave(repeats, dim=0) for x in (s.means, s.start)), s.key_len)
            for i, s in self._ssa_means.items()
        }

    def crop(self, *args, **kwargs):
        super().crop(*args, **kwargs)
        self._ssa_means = {}  # recomputed from the remaining keys on the next step

    def reset(self):
        super().reset()
        self._ssa_means = {}


@functools.cache
def _append_kernel():
    """`append_block_means` from the Triton kernels, or None where they cannot run (looked up once)."""
    from .ops import _triton_ops

    ops = _triton_ops()
    if ops is None:
        return None
    from .ops.triton.cache_means import append_block_means

    return append_block_means


def as_ssa_cache(cache) -> SSACache | None:
    """The cache as an SSACache: an SSACache as is, a plain DynamicCache upgraded in place, else None."""
    if isinstance(cache, SSACache):
        return cache
    if type(cache) is DynamicCache:
        cache.__class__ = SSACache
        cache._ssa_means = {}
        return cache
    return None


class SSAStaticCache(StaticCache):
    """transformers' StaticCache plus, for the sparse layers on SSA's kernels, the block means each compiled decode
    step selects from: `ssa_means[layer] = (means [B, max_cache_len // BS + 1, H, D] float32, start [B] int64)`,
    built by the eager prefill and updated in place by the steps (see patching/static_cache.py). Beam reordering
    reorders them in place; other structural changes drop them (the layer then runs eagerly, which rebuilds them)."""

    ssa_means: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        for means, start in self.ssa_means.values():
            rows = beam_idx.to(means.device)
            means.copy_(means[rows])
            start.copy_(start[rows])

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.ssa_means = {}

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.ssa_means = {}

    def crop(self, *args, **kwargs):
        super().crop(*args, **kwargs)
        self.ssa_means = {}

    def reset(self):
        super().reset()
        self.ssa_means = {}


def as_ssa_static_cache(cache) -> SSAStaticCache:
    """The static cache as an SSAStaticCache: as is, or transformers' StaticCache upgraded in place."""
    if not isinstance(cache, SSAStaticCache):
        cache.__class__ = SSAStaticCache
        cache.ssa_means = {}
    return cache
