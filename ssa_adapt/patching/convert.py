"""`convert`, `unload`, `set_inference`, `set_stream`, `set_kernel_options`, `reconfigure` and the loss helpers:
the lifecycle of a converted model."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..config import STRUCTURAL_FIELDS, SSAConfig
from ..decoding.cache import build_ssa_caches
from .attention import ATTN_IMPLEMENTATION, ssa_attention_forward
from .controller import (
    CONFIG_KEY,
    SSAController,
    SSALayerState,
    controller_owner,
    get_controller,
    require_controller,
)
from .registry import find_attention_layers, get_architecture, layer_sliding_window

__all__ = [
    "convert",
    "unload",
    "set_inference",
    "set_stream",
    "set_kernel_options",
    "reconfigure",
    "get_controller",
    "is_converted",
    "alignment_loss",
    "ssa_loss",
    "record_attention_sparsity",
]

logger = logging.getLogger(__name__)


def ssa_attention_mask(
    batch_size: int, q_length: int, kv_length: int, *args, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor | None:
    """The mask "ssa" attention gets: the padding-only 2D mask [B, TK] (or None), as flash attention does (SSA works
    on document starts, not 4D masks). Under torch.compile a mask without padding stays a mask (finding that it has
    none would read its values on the host); the attention treats both alike.

    A static cache's TK is its whole buffer, while generate's mask covers the tokens so far and grows by one column
    per token: it is padded with zeros (keys not written yet) to the buffer's length, so that the compiled decode step
    gets one shape every step (a growing mask made dynamo recompile it, the second time with a dynamic length whose
    CUDA graph is recorded anew for every length); the attention takes the written length from the cache layer."""
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] < kv_length:
        return F.pad(attention_mask, (0, kv_length - attention_mask.shape[-1]))
    if attention_mask is not None and torch.compiler.is_compiling():
        return attention_mask[:, -kv_length:]
    return flash_attention_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, ssa_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ssa_attention_mask)


def is_converted(model: nn.Module) -> bool:
    return get_controller(model) is not None


def _pass_inputs(module, args, kwargs):
    """Hand the attention function what the attention module gets but does not pass on: the layer input (gates)
    and the KV cache, as the keyword arguments `ssa_hidden` and `ssa_cache`, which the module's forward forwards
    to it (no state on the module: compiled code and activation checkpointing see no side effect)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return args, {**kwargs, "ssa_hidden": hidden, "ssa_cache": cache}


def convert(model: nn.Module, config: SSAConfig | None = None, *, seed: int = 0) -> nn.Module:
    """Give a pretrained Llama / Mistral / Qwen2 / Qwen3 causal LM SSA attention, in place; returns the model.

    Every full-attention layer (or `config.layers`) gets SSA attention; sliding-window layers keep ordinary
    attention. With `gate=False` the model's function in full mode is unchanged. The config is stored in
    `model.config.ssa_config`, so `save_pretrained` keeps it and `AutoSSAModelForCausalLM` rebuilds the model.
    `seed` seeds the per-forward stream draw when no trainer fixes it with `set_stream`.
    """
    config = config or SSAConfig()
    if not isinstance(config, SSAConfig):
        raise TypeError(f"config must be an SSAConfig, got {type(config).__name__}.")
    if is_converted(model):
        raise ValueError(
            "This model is already converted to SSA; call ssa_adapt.unload(model) before converting again, "
            "or ssa_adapt.set_inference(model, ...) to change the inference setup."
        )
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "model_type"):
        raise TypeError(f"convert() takes a transformers PreTrainedModel; got {type(model).__name__}.")
    spec = get_architecture(hf_config.model_type)
    layers = find_attention_layers(model, spec)
    if not layers:
        raise ValueError(
            f"No {spec.attention_class.rsplit('.', 1)[-1]} modules found in this {hf_config.model_type} model."
        )
    requested = config.layers if config.layers is not None else list(layers)
    unknown = [i for i in requested if i not in layers]
    if unknown:
        raise ValueError(
            f"SSAConfig.layers names layers {unknown} that do not exist; this model has layers 0..{max(layers)}."
        )
    windowed = [i for i in requested if layer_sliding_window(layers[i], spec) is not None]
    if windowed and config.layers is not None:
        raise ValueError(
            f"Layers {windowed} use sliding-window attention and cannot be converted; leave them out of SSAConfig.layers."
        )
    targets = [i for i in requested if i not in windowed]
    if windowed:
        logger.info("ssa_adapt: layers %s use a sliding window and keep ordinary attention.", windowed)
    if not targets:
        raise ValueError(
            "Every attention layer of this model uses a sliding window; there is nothing for SSA to convert."
        )

    ctrl = SSAController(config, getattr(hf_config, "_attn_implementation", None), targets, seed=seed)
    for i in targets:
        attn = layers[i]
        attn.ssa_state = SSALayerState(ctrl, i)
        if config.gate or config.train_mode == "nsa":
            # SSA's per-head output gate, or NSA's three branch gates (compressed, selected, window) per head
            weight = attn.q_proj.weight
            heads = hf_config.num_attention_heads * (3 if config.train_mode == "nsa" else 1)
            attn.ssa_gate = nn.Linear(
                attn.q_proj.in_features, heads, bias=False, device=weight.device, dtype=weight.dtype
            )
            nn.init.zeros_(attn.ssa_gate.weight)  # gamma = 0.5 at start
    for attn in layers.values():  # every layer: the unconverted ones also need the cache (see static_cache.written)
        ctrl.handles.append(attn.register_forward_pre_hook(_pass_inputs, with_kwargs=True))
    ctrl.handles.append(model.register_forward_pre_hook(lambda module, args: ctrl.begin_forward(module.training)))
    ctrl.handles.append(build_ssa_caches(model))  # generate() builds SSACache / SSAStaticCache
    model.ssa_controller = ctrl
    hf_config.ssa_config = config.to_dict()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove SSA from a converted model, in place: the original attention, state dict and config come back."""
    ctrl = require_controller(model)
    owner = controller_owner(model, ctrl)
    for handle in ctrl.handles:
        handle.remove()
    for module in owner.modules():
        if isinstance(module.__dict__.get("ssa_state"), SSALayerState):
            del module.ssa_state
            if "ssa_gate" in module._modules:
                del module.ssa_gate
    del owner.ssa_controller
    hf_config = owner.config
    if hasattr(hf_config, CONFIG_KEY):
        delattr(hf_config, CONFIG_KEY)
    owner.set_attn_implementation(ctrl.base_attn_implementation or "sdpa")
    return owner


def set_inference(
    model: nn.Module,
    mode: str | None = None,
    *,
    block_size: int | None = None,
    block_count: int | None = None,
    sink_blocks: int | None = None,
    local_blocks: int | None = None,
    backend: str | None = None,
) -> SSAConfig:
    """Change how a converted model attends (no retraining); returns the new SSAConfig.

    `mode` ('sparse' or 'full') is the stream of eval mode only. The selection (`block_size`, `block_count`,
    `sink_blocks`, `local_blocks`) and `backend` are the model's one SSAConfig: they also apply to the next
    training forward passes (which warn once that the budget came from here), and `save_pretrained` saves them.
    To train with the budget the model was trained with, set it back first, e.g.
    `set_inference(model, block_count=16)`.
    """
    changes = dict(
        inference_mode=mode,
        block_size=block_size,
        block_count=block_count,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        backend=backend,
    )
    return _apply(model, {k: v for k, v in changes.items() if v is not None}, for_inference=True)


def reconfigure(model: nn.Module, **changes) -> SSAConfig:
    """Change any field of a converted model's SSAConfig but those that decide which weights and layers exist
    (`gate`, `layers`: convert the plain model again for those); returns the new, validated SSAConfig, which
    `save_pretrained` saves. For inference-time changes, `set_inference`."""
    ctrl = require_controller(model)
    structural = [k for k in STRUCTURAL_FIELDS if k in changes and changes[k] != getattr(ctrl.config, k)]
    if structural:
        what = ", ".join(f"{k}={changes[k]!r} (converted with {getattr(ctrl.config, k)!r})" for k in structural)
        raise ValueError(
            f"reconfigure: {what} would change which weights and layers exist. Leave them as converted, or "
            "ssa_adapt.unload(model) and convert it again."
        )
    return _apply(model, changes)


def _apply(model: nn.Module, changes: dict, for_inference: bool = False) -> SSAConfig:
    ctrl = require_controller(model)
    ctrl.reconfigure(ctrl.config.replace(**changes), for_inference=for_inference)
    setattr(controller_owner(model, ctrl).config, CONFIG_KEY, ctrl.config.to_dict())
    return ctrl.config


def set_kernel_options(model: nn.Module, options=None) -> None:
    """Pass `ssa_adapt.ops.triton.options.KernelOptions` to every Triton kernel the converted model's SSA attention
    calls (selection, sparse attention, decode steps, alignment loss), or None for the kernels' defaults. Runtime
    tuning only: not part of the SSAConfig, not saved; the PyTorch reference ignores it."""
    if options is not None:
        from ..ops.triton.options import KernelOptions  # the kernels' package (needs triton)

        if not isinstance(options, KernelOptions):
            raise TypeError(
                f"set_kernel_options: options must be a KernelOptions or None; got {type(options).__name__}. "
                "Build one with ssa_adapt.ops.triton.options.KernelOptions(decode=DecodeOptions(...))."
            )
    require_controller(model).kernel_options = options


def set_stream(model: nn.Module, stream: str | None) -> None:
    """Fix the stream SSA training continues with ('full' or 'sparse') for the following forward passes, or None
    to draw one per forward pass with probability `full_prob` (from the seed given to `convert`)."""
    if stream not in (None, "full", "sparse"):
        raise ValueError(f"stream={stream!r}: use 'full', 'sparse' or None (draw per forward pass).")
    require_controller(model).stream = stream


def alignment_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean over converted layers of the alignment loss recorded by the last SSA-training forward pass, or None."""
    losses = require_controller(model).align_losses
    if not losses:
        return None
    values = list(losses.values())
    loss = torch.stack([x.to(values[0].device) for x in values]).mean()
    if (
        model.training
        and torch.is_grad_enabled()
        and not loss.requires_grad
        and any(p.requires_grad for p in model.parameters())
    ):
        raise RuntimeError(
            "The alignment loss carries no gradient: gradient checkpointing with use_reentrant=True runs the forward "
            "without grad. Enable it with model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False})."
        )
    return loss


def ssa_loss(model: nn.Module, lm_loss: torch.Tensor) -> torch.Tensor:
    """The SSA training loss of the last forward pass: lm_loss + align_weight * alignment_loss (the paper's objective)."""
    align = alignment_loss(model)
    if align is None:
        return lm_loss
    return lm_loss + require_controller(model).config.align_weight * align.to(lm_loss.device)


@contextlib.contextmanager
def record_attention_sparsity(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every forward pass records per converted layer the mean AttnSparsity (full attention
    mass inside the selected blocks) into the yielded dict {layer_idx: scalar tensor}."""
    ctrl = require_controller(model)
    ctrl.sparsity = {}
    try:
        yield ctrl.sparsity
    finally:
        ctrl.sparsity = None
