"""KV caches that keep, beside the keys, the mean key of every complete block, so that a sparse decode step scores
T/BS block means instead of re-reading every cached key.

- `SSACache`: transformers' `DynamicCache` plus the block means (what `generate()` builds for a converted model).
- `SSAStaticCache`: transformers' `StaticCache` plus, for the sparse layers on SSA's kernels, block means at static
  addresses that compiled decode steps update in place (`generate(cache_implementation="static")`).

A converted model's `generate()` builds these instead of transformers' own (`build_ssa_caches`, installed by
`convert`); a cache passed in by hand is used as given (a plain `DynamicCache` then decodes by selecting from the
keys: the same tokens, without the cached means).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from ..compat import CACHE_KEYWORD
from ..ops import append_block_means, block_means

__all__ = ["SSACache", "SSAStaticCache", "LayerMeans", "build_ssa_caches"]


@dataclass
class LayerMeans:
    """Block means of one layer: means [B, capacity, H, D] float32 (relative to each row's document start),
    start [B] int64 each row's document start, key_len the key count they were computed for (a host int, so decode
    steps need no device-to-host sync); start_host the starts as host ints when known (then a step that completes
    no row's block launches nothing), None after a reordering by a device index."""

    means: torch.Tensor
    start: torch.Tensor
    key_len: int
    start_host: tuple[int, ...] | None = None

    def rows(self, index: torch.Tensor) -> LayerMeans:
        """The means of rows `index` [B'] (beam reordering, batch selection)."""
        index = index.to(self.means.device)
        return LayerMeans(self.means[index], self.start[index], self.key_len)

    def repeated(self, repeats: int) -> LayerMeans:
        """Every row `repeats` times in a row (batch expansion)."""
        means, start = (x.repeat_interleave(repeats, dim=0) for x in (self.means, self.start))
        host = None if self.start_host is None else tuple(s for s in self.start_host for _ in range(repeats))
        return LayerMeans(means, start, self.key_len, host)

    def completes_block(self, key_len: int, block_size: int) -> bool:
        """Whether the newest of `key_len` keys completes a block in some row (True when the starts are unknown)."""
        if self.start_host is None:
            return True
        return any(key_len > s and (key_len - s) % block_size == 0 for s in self.start_host)


class SSACache(DynamicCache):
    """DynamicCache that also keeps the complete-block key means SSA's sparse decoding selects from. The means
    follow the cache through beam reordering, batch expansion and selection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ssa_means: dict[int, LayerMeans] = {}

    def layer_means(self, layer_idx: int) -> LayerMeans | None:
        """The block means kept for layer `layer_idx`, or None before its first decode step."""
        return self._ssa_means.get(layer_idx)

    def block_means(
        self, layer_idx: int, keys: torch.Tensor, doc_start: torch.Tensor | None, block_size: int
    ) -> torch.Tensor:
        """Means of the complete blocks of every row, updated for the cached `keys` [B, TK, H, D] whose documents
        start at `doc_start` [B] (None: key 0) -> [B, TK // block_size, H, D]. Row b's first (TK - doc_start[b]) // block_size
        entries are its complete blocks; entries after them are garbage that selection never reads.

        A decode step (one new key per row) computes only the blocks that key completed, without a host sync, and
        launches nothing when it completed none; anything else (the first step after a prefill, several new keys)
        recomputes every mean from the keys.
        """
        means, pending = self.block_means_before_append(layer_idx, keys, doc_start, block_size)
        if pending is not None:
            append_block_means(means, pending, keys, block_size)
        return means

    def block_means_before_append(
        self, layer_idx: int, keys: torch.Tensor, doc_start: torch.Tensor | None, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`block_means`, less the block the newest key completed: -> (means [B, TK // block_size, H, D], pending),
        pending [B] int64 the rows' document starts when some row's newest key completed a block whose mean the
        caller must still write (`append_block_means(means, pending, keys, block_size)`, or the one-launch decode
        step, which does it in its own launch), else None. The sparse decode path calls this one."""
        B, TK = keys.shape[:2]
        n = TK // block_size
        state = self._ssa_means.get(layer_idx)
        pending = None
        if state is None or state.means.shape[0] != B or TK != state.key_len + 1:
            if doc_start is None:
                start = torch.zeros(B, dtype=torch.int64, device=keys.device)
            else:
                start = doc_start.to(torch.int64, copy=True)
            # the starts on the host (one sync per layer and prefill): most steps then complete no block
            state = LayerMeans(block_means(keys, start, block_size, max(16, 2 * n)), start, TK, tuple(start.tolist()))
        else:
            if n > state.means.shape[1]:  # room for twice as many blocks
                state.means = torch.cat([state.means, torch.zeros_like(state.means)], 1)
            if state.completes_block(TK, block_size):
                pending = state.start
            state.key_len = TK
        self._ssa_means[layer_idx] = state
        return state.means[:, :n], pending

    # structural changes of the cache carry the means along ------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._ssa_means = {i: s.rows(beam_idx) for i, s in self._ssa_means.items()}

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._ssa_means = {i: s.rows(indices) for i, s in self._ssa_means.items()}

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._ssa_means = {i: s.repeated(repeats) for i, s in self._ssa_means.items()}

    def crop(self, *args, **kwargs):
        super().crop(*args, **kwargs)
        self._ssa_means = {}  # recomputed from the remaining keys on the next step

    def reset(self):
        super().reset()
        self._ssa_means = {}


class SSAStaticCache(StaticCache):
    """transformers' StaticCache plus, for the sparse layers on SSA's kernels, the block means each compiled decode
    step selects from: `ssa_means[layer] = (means [B, max_cache_len // BS + 1, H, D] float32, start [B] int64)`,
    built by the eager prefill and updated in place by the steps (see patching/static_cache.py). Beam reordering
    reorders them in place; other structural changes drop them (the layer then runs eagerly, which rebuilds them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ssa_means: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

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


def _ssa_counterpart(cache, config):
    """The SSA cache to build where `generate()` built transformers' `cache` (fresh, for this call), or None."""
    if cache is None or getattr(cache, "_is_user_defined", False) or cache.offloading:
        return None
    if type(cache) is DynamicCache:
        return SSACache(config=config)
    if type(cache) is StaticCache:
        built = SSAStaticCache(config=config, max_cache_len=max(layer.max_cache_len for layer in cache.layers))
        if cache.is_initialized:  # generate's chunked prefill initialises the buffers up front: the same here
            keys = cache.layers[0].keys
            built.early_initialization(
                batch_size=keys.shape[0], num_heads=keys.shape[1], head_dim=keys.shape[3], dtype=keys.dtype,
                device=keys.device,
            )  # fmt: skip
        return built
    return None


class _GenerationCaches:
    """Wraps one model's `_prepare_cache_for_generation` so that `generate()` builds SSA caches; `remove()` puts
    the model's own method back."""

    def __init__(self, model: nn.Module):
        self.model = model
        prepare = type(model)._prepare_cache_for_generation

        def prepare_ssa_cache(generation_config, model_kwargs, *args, **kwargs):
            out = prepare(model, generation_config, model_kwargs, *args, **kwargs)
            config = model.config.get_text_config(decoder=True)
            built = _ssa_counterpart(model_kwargs.get(CACHE_KEYWORD), config)
            if built is not None:
                model_kwargs[CACHE_KEYWORD] = built
            return out

        model._prepare_cache_for_generation = prepare_ssa_cache

    def remove(self) -> None:
        self.model.__dict__.pop("_prepare_cache_for_generation", None)


def build_ssa_caches(model: nn.Module) -> _GenerationCaches:
    """Make `model.generate()` build an `SSACache` where it would build a `DynamicCache`, and an `SSAStaticCache`
    where it would build a `StaticCache` (caches passed in by hand are left alone). Returns a handle whose
    `remove()` undoes it (`unload` calls it)."""
    return _GenerationCaches(model)
