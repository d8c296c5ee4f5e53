"""Tiny random HF models of every supported architecture, for CPU tests."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from ssa_adapt.compat import cache_kwargs

__all__ = ["ARCHS", "GROUPS", "tiny_config", "tiny_model", "token_batch", "cache_kwargs"]

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
GROUPS = (1, 2, 3, 4, 7)


def tiny_config(arch: str, group: int = 2, kv_heads: int = 2, layers: int = 2, head_dim: int = 8, **overrides):
    heads = group * kv_heads
    common = dict(
        vocab_size=97,
        hidden_size=heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=common.pop("sliding_window", None), **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", group: int = 2, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, group, **overrides), attn_implementation="sdpa")
    return model.eval()


def token_batch(batch: int = 2, length: int = 80, vocab: int = 97, seed: int = 1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
