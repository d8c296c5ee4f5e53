"""SSA attention as a transformers `AttentionInterface` function: which path a layer's call takes.

A converted model runs with `config._attn_implementation = "ssa"`. Each model's own attention forward computes
q, k, v (bias, q_norm / k_norm, RoPE, KV cache) and calls `ssa_attention_forward`, which decides per call:

- a transformers static cache layer: its written keys (eager) or the traced path (compiled), `static_cache.py`;
- a layer left unconverted: ordinary attention;
- a cache that attends itself (`StaticSSACache`, static_generate's steps): the cache's answer;
- otherwise the paths of `streams.py`: eval, the `inference_mode` stream; training, the `train_mode` stream, or in
  train_mode ssa both streams and their alignment loss (recorded in the model's `SSAController`); NSA's gated sum.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import full_attention
from .controller import SSALayerState
from .gate import gated
from .padding import document_starts, masked_full_attention, require_left_padding
from .static_cache import compiled_static_attention, refresh_block_means, static_layer, traceable, written
from .streams import LayerCall, nsa_attention, record_sparsity, single_stream, ssa_training

__all__ = ["ssa_attention_forward", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "ssa"


def ssa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, HQ, T, D], key/value [B, H, TK, D] (HF layout) -> (attn_output [B, T, HQ, D], None)."""
    cache = kwargs.get("ssa_cache")
    # transformers' StaticCache (see static_cache.py), unless the cache attends itself with positions on the device
    # (static_generate's StaticSSACache, in `_attend`)
    layer = static_layer(module, cache) if getattr(cache, "attend", None) is None else None
    if layer is not None:
        if torch.compiler.is_compiling():  # the written length is a device value
            if traceable(module, cache, query):
                return compiled_static_attention(module, layer, query, key, value, attention_mask, scaling, kwargs)
            return _eager_attention_forward(module, query, key, value, attention_mask, dropout, scaling,
                                            sliding_window, **kwargs)  # fmt: skip
        state = getattr(module, "ssa_state", None)
        ctrl = state.controller if state is not None else None
        key, value, attention_mask = written(layer, key, value, attention_mask, ctrl)
        refresh_block_means(module, cache, layer, key, attention_mask)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    device = q.device.type
    if torch.is_autocast_enabled(device):
        # under autocast RoPE leaves q, k in fp32 while v is bf16: attend in the autocast dtype, as SDPA would,
        # and let the ops keep their own precision (the reference accumulates in fp32)
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        with torch.autocast(device, enabled=False):
            return _attend(module, q, k, v, query, key, attention_mask, scaling, sliding_window, kwargs)
    if not (q.dtype == k.dtype == v.dtype):
        q, k = q.to(v.dtype), k.to(v.dtype)
    return _attend(module, q, k, v, query, key, attention_mask, scaling, sliding_window, kwargs)


def _attend(module, q, k, v, query, key, attention_mask, scaling, sliding_window, kwargs):
    """ssa_attention_forward's body on q [B, T, HQ, D], k, v [B, TK, H, D] of one dtype -> (out, None)."""
    state: SSALayerState | None = getattr(module, "ssa_state", None)
    if state is None:  # a layer left unconverted (sliding window, or not in config.layers)
        doc_start, key_mask = document_starts(query, key, attention_mask, kwargs)
        if key_mask is not None:
            return masked_full_attention(q, k, v, scaling, key_mask, sliding_window), None
        return full_attention(q, k, v, scale=scaling, doc_start=doc_start, sliding_window=sliding_window), None

    ctrl, cfg = state.controller, state.controller.config
    cache, hidden = kwargs.get("ssa_cache"), kwargs.get("ssa_hidden")
    cache_attend = getattr(cache, "attend", None)
    if cache_attend is not None:  # the cache attends itself (static_generate's decode steps: positions on the device)
        if module.training:
            raise ValueError(f"{type(cache).__name__} decodes in eval mode only: call model.eval().")
        return gated(module, hidden, cache_attend(state.layer_idx, q, k, v, config=cfg, scale=scaling)), None

    position_ids, cu_seqlens = kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")
    padding_key = (query.shape[0], query.shape[2], key.shape[2], position_ids, attention_mask, cu_seqlens)
    doc_start, key_mask = ctrl.padding(padding_key, lambda: document_starts(query, key, attention_mask, kwargs))
    mode = cfg.train_mode if module.training else cfg.inference_mode
    recording = ctrl.sparsity is not None
    if key_mask is not None and (mode != "full" or recording):
        what = f"{'train_mode' if module.training else 'inference_mode'}={mode!r}"
        require_left_padding(key_mask, what + ", recording AttnSparsity" * recording)
    call = LayerCall(module, state, q, k, v, scaling, doc_start, key_mask, hidden, cache)

    if cfg.train_mode == "nsa" and (module.training or cfg.inference_mode == "sparse"):
        out, indices = nsa_attention(call)
    elif module.training and cfg.train_mode == "ssa":
        out, indices = ssa_training(call)
    else:
        out, indices = single_stream(call, mode)
    if recording:
        record_sparsity(call, indices)
    return out, None


# A compiled step (transformers compiles static-cache decoding) runs the layers it cannot trace eagerly (see
# static_cache.traceable).
_eager_attention_forward = torch.compiler.disable(ssa_attention_forward)
