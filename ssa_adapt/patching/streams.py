"""What a converted layer computes, path by path, once `attention.py` has its q, k, v and document starts:

- `single_stream`: the full or the sparse stream alone (eval, and training in train_mode full / sparse);
- `ssa_training`: both streams, the alignment loss between them recorded, the residual continuing with the stream
  drawn for this forward pass (train_mode ssa);
- `nsa_attention`: the NSA baseline's gated sum of compressed, selected and sliding-window attention;
- `record_sparsity`: AttnSparsity of the selection, while `record_attention_sparsity` is active.

Each returns (output [B, T, HQ, D], the sparse stream's block indices [B, T, H, S] or None).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import SSAConfig
from ..ops import (
    alignment_loss,
    attend_blocks,
    attention_sparsity,
    compressed_attention,
    full_attention,
    select_blocks,
    sparse_attention,
)
from .controller import SSAController, SSALayerState
from .gate import gate_values
from .padding import masked_full_attention

__all__ = ["LayerCall", "single_stream", "ssa_training", "nsa_attention", "record_sparsity"]


@dataclass
class LayerCall:
    """One call of a converted layer's attention: q [B, T, HQ, D], k, v [B, TK, H, D] of one dtype, doc_start
    [B, T] or None, key_mask [B, TK] (a padding mask with holes, full stream only) or None, hidden [B, T, hidden]
    the attention module's input (gates), cache the KV cache or None."""

    module: nn.Module
    state: SSALayerState
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None
    doc_start: torch.Tensor | None
    key_mask: torch.Tensor | None
    hidden: torch.Tensor | None
    cache: object
    _gamma: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def ctrl(self) -> SSAController:
        return self.state.controller

    @property
    def config(self) -> SSAConfig:
        return self.state.controller.config

    def selection(self) -> dict:
        """The keyword arguments of the selection ops for this call."""
        cfg = self.config
        return dict(cfg.selection_kwargs(), scale=self.scale, doc_start=self.doc_start, backend=cfg.backend,
                    kernel_options=self.ctrl.kernel_options)  # fmt: skip

    def gated(self, out: torch.Tensor) -> torch.Tensor:
        """out [B, T, HQ, D] times SSA's per-head gate [B, T, HQ, 1] when the layer has one: computed at the first
        call and shared by both streams."""
        if getattr(self.module, "ssa_gate", None) is None:
            return out
        if self._gamma is None:
            self._gamma = gate_values(self.module, self.hidden, 1, out.dtype)[:, :, 0]
        return out * self._gamma

    def full(self) -> torch.Tensor:
        """The full stream (ungated)."""
        if self.key_mask is not None:
            return masked_full_attention(self.q, self.k, self.v, self.scale, self.key_mask)
        return full_attention(self.q, self.k, self.v, scale=self.scale, doc_start=self.doc_start,
                              backend=self.config.backend)  # fmt: skip

    def sparse(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sparse stream (ungated) -> (o, block indices). A decode step selects from the cache's block means;
        a training step may reuse the selection of its forward pass (see SSAController.training_indices)."""
        q, k, v = self.q, self.k, self.v
        selection = self.selection()
        means, pending = self._cached_means()
        if means is None and self.module.training and torch.is_grad_enabled():
            indices = self.ctrl.training_indices(self.state.layer_idx, q, k, selection)
            attend = {n: selection[n] for n in ("block_size", "scale", "doc_start", "backend", "kernel_options")}
            return attend_blocks(q, k, v, indices, **attend), indices
        return sparse_attention(q, k, v, return_indices=True, block_means=means, means_start=pending, **selection)

    def _cached_means(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(block means [B, TK // BS, H, D], pending) from a cache that keeps them, for decode steps (one query per
        row; compiled code selects from the keys: no host state), else (None, None). pending [B]: the rows'
        document starts when the newest key completed a block that the sparse stream must still add to the means
        (`SSACache.block_means_before_append`: the one-launch decode step does it in its launch); None when the
        means are complete."""
        if self.q.shape[1] != 1 or torch.compiler.is_compiling():
            return None, None
        row_start = self.doc_start[:, -1] if self.doc_start is not None else None  # None: every row starts at 0
        layer, bs = self.state.layer_idx, self.config.block_size
        if (before_append := getattr(self.cache, "block_means_before_append", None)) is not None:
            return before_append(layer, self.k, row_start, bs)
        if (cache_means := getattr(self.cache, "block_means", None)) is not None:
            return cache_means(layer, self.k, row_start, bs), None
        return None, None


def single_stream(call: LayerCall, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `mode` stream ("full" or "sparse") alone, gated."""
    if mode == "full":
        return call.gated(call.full()), None
    out, indices = call.sparse()
    return call.gated(out), indices


def ssa_training(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Both streams (gated); their alignment loss goes to the controller; the output is the drawn stream's."""
    cfg, ctrl = call.config, call.ctrl
    o_full = call.gated(call.full())
    o_sparse, indices = call.sparse()
    o_sparse = call.gated(o_sparse)
    ctrl.align_losses[call.state.layer_idx] = alignment_loss(o_full, o_sparse, cfg.align_loss, backend=cfg.backend,
                                                             kernel_options=ctrl.kernel_options)  # fmt: skip
    return (o_full if ctrl.training_stream() == "full" else o_sparse), indices


def nsa_attention(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA baseline: gates [B, T, 3, HQ, 1] weigh compressed attention over the block means, the selected blocks'
    attention and a sliding window of `nsa_window` keys."""
    cfg, q, k, v = call.config, call.q, call.k, call.v
    gammas = gate_values(call.module, call.hidden, 3, q.dtype)
    o_cmp = compressed_attention(q, k, v, block_size=cfg.block_size, scale=call.scale, doc_start=call.doc_start)
    o_slc, indices = call.sparse()
    o_win = full_attention(q, k, v, scale=call.scale, doc_start=call.doc_start, sliding_window=cfg.nsa_window)
    return gammas[:, :, 0] * o_cmp + gammas[:, :, 1] * o_slc + gammas[:, :, 2] * o_win, indices


@torch.no_grad()
def record_sparsity(call: LayerCall, indices: torch.Tensor | None) -> None:
    """The layer's mean AttnSparsity (full attention mass inside the selected blocks) into the controller; when
    only the full stream ran, the selection is made for the statistic alone."""
    if indices is None:
        indices = select_blocks(call.q, call.k, **call.selection())
    mass = attention_sparsity(call.q, call.k, indices, block_size=call.config.block_size, scale=call.scale,
                              doc_start=call.doc_start)  # fmt: skip
    call.ctrl.sparsity[call.state.layer_idx] = mass.mean()
