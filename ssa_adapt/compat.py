"""Differences between the transformers / TRL versions ssa_adapt supports (transformers >= 5.17, TRL >= 1.16), in one
place: each shim says which versions differ and how."""

from __future__ import annotations

import inspect

from transformers import LlamaForCausalLM

__all__ = ["CACHE_KEYWORD", "cache_kwargs", "checkpointing_prefix", "hand_over_checkpointing", "end_training"]

# The forward keyword of the KV cache: `cache` in transformers >= 5.2x, `past_key_values` before (5.17).
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """{the forward keyword of the KV cache: cache}, for model(..., **cache_kwargs(cache))."""
    return {CACHE_KEYWORD: cache}


def checkpointing_prefix(args) -> str:
    """The prefix of the training arguments' checkpointing fields: `activation` (transformers >= 5.24 names them
    activation_checkpointing[_kwargs], gradient_checkpointing mirrors them) or `gradient` (before)."""
    return "activation" if hasattr(args, "activation_checkpointing_kwargs") else "gradient"


def hand_over_checkpointing(args) -> None:
    """Before `TrainingArguments.__post_init__`: TRL sets gradient_checkpointing (True by default); transformers >= 5.24
    warns about the old name whenever only that one is set, even when nobody set it: hand it over to the new one."""
    if getattr(args, "activation_checkpointing", False) is None and args.gradient_checkpointing is not None:
        args.activation_checkpointing = args.gradient_checkpointing
        if args.activation_checkpointing_kwargs is None:
            args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs


def end_training(trainer) -> None:
    """Close the trainer's trackers and process group: `Trainer.end()` in transformers >= 5.18, nothing before."""
    if hasattr(trainer, "end"):
        trainer.end()
