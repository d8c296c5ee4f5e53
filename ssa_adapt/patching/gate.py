"""The per-head output gates a converted layer may have (`ssa_gate`): SSA's gate (`SSAConfig.gate`, one per query
head) and the NSA baseline's branch gates (three per query head)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["gate_values", "gated"]


def gate_values(module: nn.Module, hidden: torch.Tensor, branches: int, dtype: torch.dtype) -> torch.Tensor:
    """gamma = sigmoid(ssa_gate(hidden)) -> [B, T, branches, HQ, 1] in `dtype` (hidden [B, T, hidden_size]: the
    attention module's input, handed over by the pre-hook as `ssa_hidden`).

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


def gated(module: nn.Module, hidden: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out [B, T, HQ, D] times SSA's per-head gate when the layer has one, else out."""
    if getattr(module, "ssa_gate", None) is None:
        return out
    return out * gate_values(module, hidden, 1, out.dtype)[:, :, 0]
