"""SSA attention over transformers' `StaticCache` (generate(cache_implementation="static")).

A static cache layer hands the attention its whole buffers [B, H, max_cache_len, D], of which the first n
positions hold keys. Eagerly the attention takes the written keys (`written`). A compiled decode step cannot
(n is a device value there), so it attends over the whole buffers with the queries' positions as tensors
(`compiled_static_attention`): the PyTorch reference on the CPU; on CUDA the decode kernels (custom ops), the
sparse stream selecting from block means kept beside the cache (`SSAStaticCache`, which a converted model's
`generate()` builds: filled by the eager prefill and updated in place by each compiled step). transformers' own
`StaticCache`, passed in by hand, works too: its sparse layers on the kernels then run eagerly inside the compiled
step. Every input of the compiled step keeps its shape from step to step (generate's 2D padding mask reaches it
padded to the buffer's length: `convert.ssa_attention_mask`), so a generation compiles it once, as it does for an
unconverted model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from ..ops import block_means, kernels_run, static_cache_decode
from ..ops.reference import static_cache_attention
from .gate import gated

__all__ = ["static_layer", "written", "refresh_block_means", "traceable", "compiled_static_attention"]


def static_layer(module: nn.Module, cache) -> StaticLayer | None:
    """The module's layer of a static cache, else None; a sliding-window one is refused with the fix."""
    layers = getattr(cache, "layers", None)
    layer = layers[module.layer_idx] if layers is not None and module.layer_idx < len(layers) else None
    if isinstance(layer, StaticSlidingWindowLayer):
        raise ValueError(
            f"Layer {module.layer_idx} keeps sliding-window attention, whose static cache layer rolls its buffer; "
            "SSA attention takes transformers' StaticCache on full-attention layers only. Use generate() with "
            "the default dynamic cache (cache_implementation=None) for this model."
        )
    return layer if isinstance(layer, StaticLayer) else None


def written(layer: StaticLayer, key, value, attention_mask, ctrl=None) -> tuple:
    """(keys, values [B, H, n, D], mask [B, n] or None) written so far; n is the 2D padding mask's length when it
    is shorter than the buffer (a mask of the tokens so far), else the layer's count (`ssa_attention_mask` pads
    generate's mask to the buffer's length, zeros after the tokens so far). Reading the count waits for the GPU:
    with the controller `ctrl`, once per forward pass for all layers (every layer has written as many keys), and the
    cut mask is then one object for all of them (their padding computation is shared through it)."""
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] < key.shape[2]:
        n = attention_mask.shape[-1]
        return key[:, :, :n], value[:, :, :n], attention_mask

    def count() -> tuple:
        n = int(layer.cumulative_length)
        cut = attention_mask[:, :n] if attention_mask is not None and attention_mask.dim() == 2 else attention_mask
        return n, cut

    if ctrl is not None and attention_mask is not None:
        n, mask = ctrl.once_per_forward("written", (key.shape[2], attention_mask), count, sizes=1)
    else:
        n, mask = count()
    return key[:, :, :n], value[:, :, :n], mask


def _kernels(module: nn.Module, query: torch.Tensor) -> bool:
    state = getattr(module, "ssa_state", None)
    return state is not None and kernels_run(state.controller.config.backend, query)


def _first_real_key(attention_mask, B: int, device) -> torch.Tensor:
    """[B] int64: each row's first real key (left padding), 0 without a mask."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.zeros(B, dtype=torch.int64, device=device)
    real = attention_mask.to(torch.bool)
    return torch.where(real.any(-1), real.int().argmax(-1), 0).to(torch.int64)


def refresh_block_means(module: nn.Module, cache, layer: StaticLayer, key, attention_mask) -> None:
    """Eager calls of a sparse layer on the kernels: (re)compute the block means of the written keys key
    [B, H, n, D] into the cache's buffer for this layer, which compiled decode steps then update in place."""
    state = getattr(module, "ssa_state", None)
    if state is None or module.training or state.controller.config.inference_mode != "sparse":
        return
    if not _kernels(module, key) or not hasattr(cache, "ssa_means"):  # an SSAStaticCache keeps them
        return
    bs = state.controller.config.block_size
    start = _first_real_key(attention_mask, key.shape[0], key.device)
    means = block_means(key.transpose(1, 2), start, bs, layer.max_cache_len // bs + 1)
    for buffer in (means, start):  # as transformers does for the cache's own buffers: CUDA graphs keep them
        torch._dynamo.mark_static_address(buffer)
    cache.ssa_means[module.layer_idx] = (means, start)


def traceable(module: nn.Module, cache, query: torch.Tensor) -> bool:
    """Whether a compiled step can trace this layer (`compiled_static_attention`): eval mode, SSA's full or
    sparse stream, no statistics recorded; on the kernels one query per row and, for the sparse
    stream, block means from the prefill. Otherwise the layer runs eagerly inside the compiled step."""
    state = getattr(module, "ssa_state", None)
    if module.training or torch.is_autocast_enabled(query.device.type):
        return False
    if state is None:
        return not query.is_cuda
    cfg = state.controller.config
    if cfg.train_mode == "nsa" or state.controller.sparsity is not None:
        return False
    if not _kernels(module, query):
        return not query.is_cuda
    if query.shape[2] != 1:  # decode steps: one new key per row (the block means' update)
        return False
    found = getattr(cache, "ssa_means", {}).get(module.layer_idx)
    return cfg.inference_mode == "full" or (found is not None and found[0].shape[0] == query.shape[0])


def compiled_static_attention(module, layer, query, key, value, attention_mask, scaling, kwargs):
    """A compiled decode step over a static cache layer's whole buffers key / value [B, H, L, D]: the queries
    are the last T of the n keys written (n: the 2D mask's length when shorter than the buffer, else the layer's
    count, a device value: generate's mask comes padded to the buffer's length, so that every step has one shape),
    each row's document begins at its first real key (left padding) -> ([B, T, HQ, D], None)."""
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if not (q.dtype == k.dtype == v.dtype):
        q, k = q.to(v.dtype), k.to(v.dtype)
    B, T = q.shape[:2]
    masked = attention_mask is not None and attention_mask.dim() == 2
    n = attention_mask.shape[-1] if masked and attention_mask.shape[-1] < k.shape[1] else layer.cumulative_length
    first = _first_real_key(attention_mask, B, q.device)
    q_abs = torch.arange(T, device=q.device) + (n - T)  # [T] the queries' key positions
    start = torch.minimum(first[:, None], q_abs[None, :])  # [B, T] (a padding query attends to itself)
    q_pos = q_abs[None, :] - start
    state = getattr(module, "ssa_state", None)
    cfg = state.controller.config if state is not None else None
    mode = cfg.inference_mode if cfg is not None else "full"
    selection = {} if cfg is None else cfg.selection_kwargs()
    if not _kernels(module, q):
        out = static_cache_attention(q, k, v, start, q_pos, mode=mode, scale=scaling, **selection)
    elif mode == "full":
        out = static_cache_decode(q, k, v, start, q_pos, mode="full", scale=scaling, **selection)
    else:
        means, row_start = kwargs.get("ssa_cache").ssa_means[module.layer_idx]
        key_len = layer.cumulative_length.reshape(1).to(torch.int64)
        out = static_cache_decode(q, k, v, start, q_pos, mode="sparse", scale=scaling, block_means=means,
                                  row_start=row_start, key_len=key_len, **selection)  # fmt: skip
    return gated(module, kwargs.get("ssa_hidden"), out), None
