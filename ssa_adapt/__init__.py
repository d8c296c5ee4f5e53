"""ssa_adapt: trainable block-sparse attention (SSA, arXiv 2511.20102) for pretrained HuggingFace causal LMs."""

from .config import SSAConfig
from .decoding import SSACache, static_generate
from .modeling import AutoSSAModelForCausalLM
from .patching.controller import get_controller
from .patching.convert import (
    alignment_loss,
    convert,
    is_converted,
    reconfigure,
    record_attention_sparsity,
    set_inference,
    set_kernel_options,
    set_stream,
    ssa_loss,
    unload,
)
from .patching.registry import ARCHITECTURES

__version__ = "0.1.0"

_TRAINER_EXPORTS = ("SSATrainer", "SSATrainingConfig")


def __getattr__(name: str):
    """SSATrainer and SSATrainingConfig import TRL: load them on first use (pip install 'ssa_adapt[train]')."""
    if name in _TRAINER_EXPORTS:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'ssa_adapt' has no attribute {name!r}")


__all__ = [
    "SSAConfig",
    "AutoSSAModelForCausalLM",
    "SSATrainer",
    "SSATrainingConfig",
    "ARCHITECTURES",
    "convert",
    "unload",
    "set_inference",
    "set_stream",
    "set_kernel_options",
    "reconfigure",
    "alignment_loss",
    "ssa_loss",
    "record_attention_sparsity",
    "get_controller",
    "is_converted",
    "static_generate",
    "SSACache",
]
