"""SSA attention as a transformers `AttentionInterface` function, and the per-model state it reads.

A converted model runs with `config._attn_implementation = "ssa"`. Each model's own attention forward computes
q, k, v (bias, q_norm / k_norm, RoPE, KV cache) and calls `ssa_attention_forward`, which decides per layer:

- eval: the `inference_mode` stream (sparse or full);
- training, `train_mode` full / sparse: that stream only;
- training, `train_mode` ssa: both streams; the residual continues with the stream drawn once per forward pass
  (the same for every layer), and the per-layer alignment loss between the two (after the gate) is recorded in
  the model's `SSAController` for the loss.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import as_ssa_cache
from ..config import SSAConfig
from ..ops import (
    alignment_loss,
    attend_blocks,
    attention_sparsity,
    compressed_attention,
    doc_start_from_cu_seqlens,
    doc_start_from_position_ids,
    full_attention,
    select_blocks,
    sparse_attention,
)
from ..static_decoding import StaticSSACache
from .static_cache import compiled_static_attention, refresh_block_means, static_layer, traceable, written

__all__ = ["SSAController", "SSALayerState", "ssa_attention_forward", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "ssa"
SELECTION_FIELDS = ("block_size", "block_count", "sink_blocks", "local_blocks")


class SSAController:
    """Per-model SSA state shared by all converted layers: the config, the stream of the current forward pass,
    and what the layers recorded (alignment losses, attention statistics)."""

    def __init__(self, config: SSAConfig, base_attn_implementation: str | None, layers: list[int], seed: int = 0):
        self.config = config
        self.base_attn_implementation = base_attn_implementation
        self.layers = layers
        self.stream: str | None = None  # fixed by set_stream(); None draws one per forward pass
        self.drawn: str | None = None  # the stream drawn for the current forward pass
        self.generator = torch.Generator().manual_seed(seed)
        self.align_losses: dict[int, torch.Tensor] = {}
        self.sparsity: dict[int, torch.Tensor] | None = None  # filled while recording statistics
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._doc_start: tuple | None = None  # (key, (doc_start, key_mask)) once per forward pass for all layers
        self._indices: dict[int, tuple] = {}  # layer -> (query probe, block indices) of this forward pass
        self._trained_selection = self.selection()  # the selection of conversion or of the last training pass
        self._set_for_inference: dict[str, int] = {}  # selection fields set_inference changed since then

    def selection(self) -> dict[str, int]:
        """{block_size, block_count, sink_blocks, local_blocks} of the current config."""
        return {name: getattr(self.config, name) for name in SELECTION_FIELDS}

    def note_inference_selection(self) -> None:
        """Called by `set_inference`: remember the selection fields it set."""
        for name, value in self.selection().items():
            if value != self._trained_selection[name]:
                self._set_for_inference[name] = value

    def begin_forward(self, training: bool = False) -> None:
        """Called once per top-level forward pass: forget the last pass's records; draw its stream when SSA training
        has none fixed (here, before any layer, so that compiled code breaks the graph at most once, outside the
        attention). A training pass whose selection differs from the last training pass's because `set_inference`
        changed it warns, once."""
        if training:
            now = self.selection()
            before, self._trained_selection = self._trained_selection, now
            changed = [k for k, v in self._set_for_inference.items() if now[k] == v != before[k]]
            self._set_for_inference = {}
            if changed:
                what = ", ".join(f"{k}={now[k]} (was {before[k]})" for k in changed)
                back = ", ".join(f"{k}={before[k]}" for k in changed)
                warnings.warn(
                    f"ssa_adapt: training with the selection set by set_inference: {what}. Inference and training "
                    f"share one selection; to train with the earlier one, call ssa_adapt.set_inference(model, {back}) "
                    "first.",
                    UserWarning,
                    stacklevel=2,
                )
        self.drawn = None
        if training and self.stream is None and self.config.train_mode == "ssa":
            self.drawn = self._draw()
        self.align_losses = {}
        self._doc_start = None
        self._indices = {}

    def training_indices(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, selection: dict) -> torch.Tensor:
        """Block indices [B, T, H, S] of a layer in training. Gradient checkpointing runs a layer's forward again
        during the backward pass: that recomputation reuses the indices of the forward pass instead of selecting
        again (the selection needs no gradient), after checking that it sees the same queries (a strided sample of
        q, compared exactly: a recomputation reproduces q bit for bit)."""
        if torch.compiler.is_compiling():  # the compiled backward recomputes the (deterministic) selection itself
            return select_blocks(q, k, **selection)
        probe = q.detach()[:, :: max(1, q.shape[1] // 64)].float()  # [B, <= 64 + 1, HQ, D]
        cached = self._indices.get(layer_idx)
        recomputing = torch._C._current_graph_task_id() != -1  # inside a backward pass
        if recomputing and cached is not None and cached[0].shape == probe.shape and torch.equal(cached[0], probe):
            return cached[1]
        indices = select_blocks(q, k, **selection)
        self._indices[layer_idx] = (probe, indices)
        return indices

    def padding(self, query, key, attention_mask, kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`_padding` for this forward pass, computed by the first layer and reused by the others (compiled: by
        every layer, no state kept, so that checkpointed layers have no side effect)."""
        if torch.compiler.is_compiling():
            return _padding(query, key, attention_mask, kwargs)
        position_ids, cu_seqlens = kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")
        cache_key = (query.shape[0], query.shape[2], key.shape[2], position_ids, attention_mask, cu_seqlens)
        cached = self._doc_start
        if (
            cached is None
            or cached[0][:3] != cache_key[:3]
            or any(a is not b for a, b in zip(cached[0][3:], cache_key[3:]))
        ):
            self._doc_start = (cache_key, _padding(query, key, attention_mask, kwargs))
        return self._doc_start[1]

    def training_stream(self) -> str:
        """The stream the residual continues with in SSA training, drawn once per forward pass."""
        if self.stream is not None:
            return self.stream
        if self.drawn is None:  # a layer trained outside the model's forward (begin_forward draws otherwise)
            self.drawn = self._draw()
        return self.drawn

    @torch.compiler.disable
    def _draw(self) -> str:
        """One draw from the controller's generator (a host value: compiled code calls it outside the graph; the
        trainer fixes the stream with set_stream instead, which compiles without a break)."""
        draw = torch.rand((), generator=self.generator).item()
        return "full" if draw < self.config.full_prob else "sparse"


class SSALayerState:
    """What a converted attention module carries: its controller and its layer index."""

    def __init__(self, controller: SSAController, layer_idx: int):
        self.controller = controller
        self.layer_idx = layer_idx


def _padding(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs) -> tuple:
    """(doc_start [B, T] or None, key_mask [B, TK] bool or None) of query [B, HQ, T, D], key [B, H, TK, D].

    Left padding (a row's zeros all before its first real token), packing and caches become `doc_start`;
    `key_mask` is the 2D padding mask itself when a real query could see a padding key otherwise (zeros between
    real tokens, or right padding followed by cached decoding), which only the full stream honours (see
    `_masked_full_attention`); doc_start is then None."""
    B, T, TK = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"SSA attention takes a 2D padding mask [B, TK] (or none); got a {attention_mask.dim()}D mask. "
            "Pass document boundaries through position_ids (packing) or attention_mask (padding) instead of a custom 4D mask."
        )
    if attention_mask is not None:
        mask = attention_mask[:, -TK:].to(torch.bool)
        ends = mask[:, :-1] & ~mask[:, 1:]  # [B, TK - 1] a real token followed by padding
        if torch.compiler.is_compiling():  # no host sync: the mask must describe document starts (checked async)
            starts = ~mask[:, :-1] & mask[:, 1:]
            misplaced = ends if T != TK else starts & ends.int().cummax(-1).values.bool()
            torch._assert_async(
                ~misplaced.any(),
                "attention_mask has padding after a real token that later tokens would attend to; compiled SSA "
                "attention takes left padding, and right padding without a KV cache: pad on the left "
                "(tokenizer.padding_side='left') or run this batch without torch.compile.",
            )
            return _doc_start(B, T, TK, attention_mask, kwargs), None
        if bool(ends.any()):
            starts = ~mask[:, :-1] & mask[:, 1:]
            holes = bool((starts & ends.int().cummax(-1).values.bool()).any())
            # Right padding without cached keys is left alone: causality hides the trailing padding from every
            # real query (the padding positions' own outputs are unspecified, as with flash attention).
            if holes or T != TK:
                return None, mask  # as transformers' SDPA: the mask alone (position_ids then only place RoPE)
    return _doc_start(B, T, TK, attention_mask, kwargs), None


def _doc_start(B: int, T: int, TK: int, attention_mask, kwargs) -> torch.Tensor | None:
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None and B == 1 and T == TK:
        return doc_start_from_cu_seqlens(cu_seqlens, T)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.dim() == 1:
        position_ids = position_ids[None]
    return doc_start_from_position_ids(position_ids, B, T, TK, attention_mask=attention_mask)


def _gate_values(module: nn.Module, hidden: torch.Tensor, branches: int, dtype: torch.dtype) -> torch.Tensor:
    """gamma = sigmoid(ssa_gate(hidden)) -> [B, T, branches, HQ, 1] in `dtype` (hidden: the attention module's
    input, handed over by the pre-hook as `ssa_hidden`).

    The gate module itself is called (PEFT wrappers and LoRA on it apply). When its weights are wider than the
    attention's half-precision dtype (fp32 master weights under autocast, which the attention switched off), it
    runs under autocast to `dtype` again, as the model's other linear layers do."""
    gate = module.ssa_gate
    weight = getattr(gate, "weight", None)
    if dtype in (torch.float16, torch.bfloat16) and weight is not None and weight.dtype != dtype:
        with torch.autocast(hidden.device.type, dtype=dtype):
            gamma = torch.sigmoid(gate(hidden))
    else:
        gamma = torch.sigmoid(gate(hidden.to(weight.dtype if weight is not None else dtype)))
    return gamma.to(dtype).unflatten(-1, (branches, -1))[..., None]


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
    layer = static_layer(module, cache)
    if layer is not None:  # transformers' StaticCache: see static_cache.py
        if torch.compiler.is_compiling():  # the written length is a device value
            if traceable(module, cache, query):
                return compiled_static_attention(module, layer, query, key, value, attention_mask, scaling, kwargs)
            return _eager_attention_forward(module, query, key, value, attention_mask, dropout, scaling,
                                            sliding_window, **kwargs)  # fmt: skip
        key, value, attention_mask = written(layer, key, value, attention_mask)
        refresh_block_means(module, cache, layer, key, attention_mask)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    device = q.device.type
    if torch.is_autocast_enabled(device):
        # under autocast RoPE leaves q, k in fp32 while v is bf16: attend in the autocast dtype, as SDPA would,
        # and let the ops keep their own precision (the reference accumulates in fp32)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _attend(
                module,
                q.to(dtype),
                k.to(dtype),
                v.to(dtype),
                query,
                key,
                attention_mask,
                scaling,
                sliding_window,
                kwargs,
            )
    if not (q.dtype == k.dtype == v.dtype):
        q, k = q.to(v.dtype), k.to(v.dtype)
    return _attend(module, q, k, v, query, key, attention_mask, scaling, sliding_window, kwargs)


def _attend(module, q, k, v, query, key, attention_mask, scaling, sliding_window, kwargs):
    """ssa_attention_forward's body on q [B, T, HQ, D], k, v [B, TK, H, D] of one dtype."""
    state: SSALayerState | None = getattr(module, "ssa_state", None)
    if state is None:  # a layer left unconverted (sliding window, or not in config.layers)
        doc_start, key_mask = _padding(query, key, attention_mask, kwargs)
        if key_mask is not None:
            return _masked_full_attention(q, k, v, scaling, key_mask, sliding_window), None
        return full_attention(q, k, v, scale=scaling, doc_start=doc_start, sliding_window=sliding_window), None

    ctrl = state.controller
    cfg = ctrl.config
    cache, hidden = kwargs.get("ssa_cache"), kwargs.get("ssa_hidden")
    if isinstance(cache, StaticSSACache):  # static_generate's decode steps (positions live on the device)
        if module.training:
            raise ValueError("StaticSSACache decodes in eval mode only: call model.eval().")
        selection = dict(block_size=cfg.block_size, block_count=cfg.block_count, sink_blocks=cfg.sink_blocks,
                         local_blocks=cfg.local_blocks, scale=scaling)  # fmt: skip
        out = cache.attend(state.layer_idx, q, k, v, mode=cfg.inference_mode, scale=scaling, selection=selection)
        if getattr(module, "ssa_gate", None) is not None:
            out = out * _gate_values(module, hidden, 1, out.dtype)[:, :, 0]
        return out, None
    doc_start, key_mask = ctrl.padding(query, key, attention_mask, kwargs)
    if key_mask is not None:
        _require_left_padding(module, cfg, key_mask, recording=ctrl.sparsity is not None)
    selection = dict(
        block_size=cfg.block_size,
        block_count=cfg.block_count,
        sink_blocks=cfg.sink_blocks,
        local_blocks=cfg.local_blocks,
        scale=scaling,
        doc_start=doc_start,
        backend=cfg.backend,
    )

    gamma = None

    def gated(out: torch.Tensor) -> torch.Tensor:
        """out [B, T, HQ, D] times the per-head gate when the layer has one (SSAConfig.gate); computed once per
        call and shared by both streams."""
        nonlocal gamma
        if getattr(module, "ssa_gate", None) is None:
            return out
        if gamma is None:
            gamma = _gate_values(module, hidden, 1, out.dtype)[:, :, 0]
        return out * gamma

    def full():
        if key_mask is not None:
            return gated(_masked_full_attention(q, k, v, scaling, key_mask))
        return gated(full_attention(q, k, v, scale=scaling, doc_start=doc_start, backend=cfg.backend))

    indices = None

    def select_and_attend():
        """The sparse stream -> (o, indices); in training the selection may come from the forward pass (see
        SSAController.training_indices)."""
        means = _cached_means()
        if means is None and module.training and torch.is_grad_enabled():
            idx = ctrl.training_indices(state.layer_idx, q, k, selection)
            attend = {n: selection[n] for n in ("block_size", "scale", "doc_start", "backend")}
            return attend_blocks(q, k, v, idx, **attend), idx
        return sparse_attention(q, k, v, return_indices=True, block_means=means, **selection)

    def sparse():
        nonlocal indices
        out, indices = select_and_attend()
        return gated(out)

    def _cached_means():
        """Decode steps (one query per row) select from the cache's block means instead of all keys."""
        if q.shape[1] != 1 or torch.compiler.is_compiling():  # compiled: selection from the keys (no host state)
            return None
        cache = as_ssa_cache(kwargs.get("ssa_cache"))
        if cache is None:
            return None
        row_start = doc_start[:, -1] if doc_start is not None else q.new_zeros(q.shape[0], dtype=torch.long)
        return cache.block_means(state.layer_idx, k, row_start, cfg.block_size)

    if cfg.train_mode == "nsa" and (module.training or cfg.inference_mode == "sparse"):
        # NSA baseline: gated sum of compressed (block means), selected (sparse) and sliding-window attention
        gammas = _gate_values(module, hidden, 3, q.dtype)  # [B, T, 3, HQ, 1]
        o_cmp = compressed_attention(q, k, v, block_size=cfg.block_size, scale=scaling, doc_start=doc_start)
        o_slc, indices = select_and_attend()
        o_win = full_attention(q, k, v, scale=scaling, doc_start=doc_start, sliding_window=cfg.nsa_window)
        out = gammas[:, :, 0] * o_cmp + gammas[:, :, 1] * o_slc + gammas[:, :, 2] * o_win
    elif module.training and cfg.train_mode == "ssa":
        o_full, o_sparse = full(), sparse()
        ctrl.align_losses[state.layer_idx] = alignment_loss(o_full, o_sparse, cfg.align_loss, backend=cfg.backend)
        out = o_full if ctrl.training_stream() == "full" else o_sparse
    else:
        mode = cfg.train_mode if module.training else cfg.inference_mode
        out = full() if mode == "full" else sparse()

    if ctrl.sparsity is not None:
        with torch.no_grad():
            if indices is None:  # the full stream ran: the selection alone is needed, not the sparse attention
                indices = select_blocks(q, k, **selection)
            mass = attention_sparsity(q, k, indices, block_size=cfg.block_size, scale=scaling, doc_start=doc_start)
            ctrl.sparsity[state.layer_idx] = mass.mean()
    return out, None


def _require_left_padding(module: nn.Module, cfg: SSAConfig, key_mask: torch.Tensor, recording: bool) -> None:
    """Refuse a padding mask with holes (see `_padding`) where the sparse stream or its selection runs: they know
    document starts only (see ops/documents.py), not padding keys between real ones."""
    mode = cfg.train_mode if module.training else cfg.inference_mode
    if mode == "full" and not recording:
        return
    rows = torch.nonzero((key_mask[:, :-1] & ~key_mask[:, 1:]).any(-1)).flatten().tolist()
    raise ValueError(
        f"attention_mask rows {rows[:8]} have padding after a real token that later tokens would attend to (zeros "
        f"between real tokens, or right padding followed by cached decoding); SSA's sparse stream "
        f"({'train_mode' if module.training else 'inference_mode'}={mode!r}{', recording AttnSparsity' * recording}) "
        "supports left padding, and right padding without a KV cache. Pad on the left "
        "(tokenizer.padding_side='left'), pack documents with position_ids (packing / padding_free), or use the "
        "full stream (set_inference(model, 'full')), which honours any padding mask."
    )


def _masked_full_attention(q, k, v, scale, key_mask, sliding_window=None) -> torch.Tensor:
    """Causal attention of q [B, T, HQ, D] over the keys k, v [B, TK, H, D] that key_mask [B, TK] keeps (and that
    lie in the query's window) -> [B, T, HQ, D]: SDPA with a boolean mask, like transformers' own SDPA path. A
    query with no key left (a padding position before any real token) attends to itself."""
    T, TK, device = q.shape[1], k.shape[1], q.device
    q_pos = torch.arange(TK - T, TK, device=device)[:, None]  # [T, 1] the queries' key positions
    k_pos = torch.arange(TK, device=device)[None, :]  # [1, TK]
    allowed = (k_pos <= q_pos)[None] & key_mask[:, None, :]  # [B, T, TK]
    if sliding_window is not None:
        allowed &= (k_pos > q_pos - sliding_window)[None]
    allowed |= (~allowed.any(-1, keepdim=True)) & (k_pos == q_pos)[None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=allowed[:, None],
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


# A compiled step (transformers compiles static-cache decoding) runs the attention of static cache layers eagerly:
# the keys written so far are known on the device only. (The compiled decode step through SSA's own static path is
# GPU work still to do; static_generate keeps its CUDA graphs meanwhile.)
_eager_attention_forward = torch.compiler.disable(ssa_attention_forward)
