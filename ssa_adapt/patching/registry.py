"""Supported architectures: one entry per HF `model_type`, naming its attention class and its sliding-window rule.

SSA attention plugs into transformers' `AttentionInterface`, so each model keeps its own attention forward
(projections, qkv bias, q_norm / k_norm, RoPE, KV cache); the registry only says which modules are attention
layers and which of them use a sliding window (those keep ordinary attention: they are local already).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

__all__ = ["ArchitectureSpec", "ARCHITECTURES", "get_architecture", "find_attention_layers", "layer_sliding_window"]


@dataclass(frozen=True)
class ArchitectureSpec:
    model_type: str
    attention_class: str  # "transformers.models.llama.modeling_llama.LlamaAttention"
    window_from_config: bool = False  # Mistral: config.sliding_window applies to every layer

    def attention_cls(self) -> type[nn.Module]:
        module_name, _, cls_name = self.attention_class.rpartition(".")
        return getattr(importlib.import_module(module_name), cls_name)


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.model_type: spec
    for spec in (
        ArchitectureSpec("llama", "transformers.models.llama.modeling_llama.LlamaAttention"),
        ArchitectureSpec("mistral", "transformers.models.mistral.modeling_mistral.MistralAttention", True),
        ArchitectureSpec("qwen2", "transformers.models.qwen2.modeling_qwen2.Qwen2Attention"),
        ArchitectureSpec("qwen3", "transformers.models.qwen3.modeling_qwen3.Qwen3Attention"),
    )
}


def get_architecture(model_type: str) -> ArchitectureSpec:
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type={model_type!r} is not supported by ssa_adapt; supported: {sorted(ARCHITECTURES)}. "
            "Llama-shaped models (same attention module) can be added as a registry entry in ssa_adapt/patching/registry.py."
        )
    return ARCHITECTURES[model_type]


def find_attention_layers(model: nn.Module, spec: ArchitectureSpec) -> dict[int, nn.Module]:
    """{layer_idx: attention module} for every attention layer of the model."""
    cls = spec.attention_cls()
    layers = {}
    for module in model.modules():
        if isinstance(module, cls):
            layers[int(module.layer_idx)] = module
    return dict(sorted(layers.items()))


def layer_sliding_window(module: nn.Module, spec: ArchitectureSpec) -> int | None:
    """The sliding window of an attention layer, None for full attention."""
    window = getattr(module, "sliding_window", None)
    if window is None and spec.window_from_config:
        window = getattr(module.config, "sliding_window", None)
    return window
