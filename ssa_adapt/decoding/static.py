"""Decoding with a static KV cache, replayed from one CUDA graph per step: `static_generate`.

An eager `generate()` step runs the model's Python and every kernel launch again for each new token; for a small
model that host time (~1 ms per layer) hides what sparse attention saves on the GPU. Here the prompt is prefilled
as usual (an `SSACache`, the prefill kernels), its keys, values and block means are copied into buffers sized for
the whole generation (`StaticSSACache`: the same storage as `SSAStaticCache`, transformers' StaticCache with the
block means beside it, which `generate(cache_implementation="static")` builds), and one decode step of the whole
model is captured in a CUDA graph:

- the cache writes each new key at a position held in a device tensor (transformers' static layers count it) and
  hands the attention the whole buffer;
- the sparse stream reads the query's position on the device (`decode_select` / `decode_attend` with `q_pos`,
  the block-mean update with a device key count), so the same launches serve every step;
- the full stream is split-KV attention over every block of the row (the decode attention kernel, all blocks
  selected; on the CPU SDPA over the buffer with a mask of the row's written keys).

Rows are left-padded prompts (attention_mask zeros first), as `generate()` takes them. Without CUDA (or with
`cuda_graph=False`) the same static cache runs eagerly: on the CPU through the PyTorch reference (what the tests
compare with `generate()`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..compat import CACHE_KEYWORD
from ..config import SSAConfig
from ..ops import (
    append_block_means,
    block_means,
    kernels_run,
    masked_decode_attention,
    sparse_attention,
    static_cache_decode,
)
from ..patching.controller import require_controller
from .cache import SSACache, SSAStaticCache

__all__ = ["StaticSSACache", "static_generate"]


class StaticSSACache(SSAStaticCache):
    """`SSAStaticCache` (transformers' StaticCache plus block means, what `generate(cache_implementation="static")`
    builds) filled from a prefilled cache and decoded with every position on the device, so that one CUDA graph
    serves every step: keys / values [B, H, L, D] in transformers' static layers (their `cumulative_length` is the
    position the next key goes to, the same for every row: prompts are left-padded), block means
    `ssa_means[layer] = (means [B, L // BS + 1, H, D] float32, start)` relative to each row's first real key
    `start` [B] int64. Takes one token per row per forward pass; the attention of each converted layer asks it
    (`attend`) instead of reading the written length on the host."""

    def __init__(self, prefilled: DynamicCache, length: int, start: torch.Tensor, block_size: int, sparse_layers,
                 config):  # fmt: skip
        """A static cache of `length` positions holding the keys and values of the prefilled cache (its keys
        [B, H, P, D] per layer); block means are computed for the layers in `sparse_layers`. config: the model's
        (text) config, which sizes transformers' static layers."""
        super().__init__(config=config, max_cache_len=length)
        keys = prefilled.layers[0].keys
        B, H, prompt, D = keys.shape
        if length <= prompt:
            raise ValueError(f"static cache length {length} must exceed the prompt's {prompt} tokens.")
        if len(self.layers) != len(prefilled.layers) or any(layer.is_sliding for layer in self.layers):
            raise ValueError("StaticSSACache takes models whose layers all attend globally (no sliding windows).")
        self.early_initialization(batch_size=B, num_heads=H, head_dim=D, dtype=keys.dtype, device=keys.device)
        self.block_size = block_size
        self.start = start.to(torch.int64)
        for i, (layer, done) in enumerate(zip(self.layers, prefilled.layers)):
            layer.keys[:, :, :prompt] = done.keys
            layer.values[:, :, :prompt] = done.values
            layer.cumulative_length = torch.tensor(prompt, dtype=torch.int64, device=keys.device)
            if i in sparse_layers:
                means = block_means(done.keys.transpose(1, 2), self.start, block_size, length // block_size + 1)
                self.ssa_means[i] = (means, self.start)
        self.length = length
        self._all_blocks = None
        self.begin_step()

    @property
    def index(self) -> torch.Tensor:
        """The buffer position the next key goes to (0-dim int64 on the device; the first layer's count)."""
        return self.layers[0].cumulative_length

    def begin_step(self) -> None:
        """Per-step tensors every layer reads, derived on the device from `index` before the step's keys are
        written (captured with the step)."""
        pos = self.index.reshape(1)  # the new key's buffer position
        self.key_len = pos + 1
        self.q_pos = (pos - self.start)[:, None]  # [B, 1] the query's position inside its row
        keys = torch.arange(self.length, device=pos.device)
        self.key_mask = (keys[None, :] >= self.start[:, None]) & (keys[None, :] <= pos)  # [B, L]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states / value_states [B, H, 1, D] go to the layer's next position; -> the whole buffers
        [B, H, L, D] (transformers' static layer, which counts the position on the device)."""
        if key_states.shape[2] != 1:
            raise ValueError(
                f"StaticSSACache takes one token per row per step, got {key_states.shape[2]}; prefill with an "
                "SSACache and build the static cache from it (static_generate does)."
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def attend(self, layer_idx: int, q, k, v, *, config: SSAConfig, scale: float | None) -> torch.Tensor:
        """One decode step of layer `layer_idx` in the model's inference mode: q [B, 1, HQ, D], k, v [B, L, H, D]
        (the buffers, transposed views) -> o [B, 1, HQ, D]; full (every written key) or sparse (SSA's selection
        from the cache's block means)."""
        bs, doc_start = self.block_size, self.start[:, None]
        if kernels_run(config.backend, q):  # the positions on the device: one CUDA graph serves every step
            if config.inference_mode == "full":
                # every block of the row: split-KV attention over the written keys (the query's position masks the
                # rest); SDPA with a mask over the whole buffer does not split the keys and is ~20x slower at 128k
                B, H = q.shape[0], k.shape[2]
                if self._all_blocks is None or self._all_blocks.shape[2] != H:
                    n = self.length // bs + 1
                    every = torch.arange(n, dtype=torch.int32, device=q.device)
                    self._all_blocks = every.expand(B, 1, H, n).contiguous()
                return static_cache_decode(q, k, v, doc_start, self.q_pos, mode="full", block_size=bs, scale=scale,
                                           all_blocks=self._all_blocks)  # fmt: skip
            means = self.ssa_means[layer_idx][0]
            return static_cache_decode(q, k, v, doc_start, self.q_pos, mode="sparse", scale=scale, block_means=means,
                                       row_start=self.start, key_len=self.key_len, **config.selection_kwargs())  # fmt: skip
        if config.inference_mode == "full":
            return masked_decode_attention(q, k, v, self.key_mask, scale)
        # eager path (CPU reference): the written keys, known on the host
        n, means = int(self.key_len), self.ssa_means[layer_idx][0]
        append_block_means(means, self.start, k[:, :n], bs)  # in place: means holds every block
        return sparse_attention(q, k[:, :n], v[:, :n], block_means=means[:, : n // bs], doc_start=doc_start,
                                scale=scale, backend="reference", **config.selection_kwargs())  # fmt: skip

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("StaticSSACache does not take beam search: use generate() with an SSACache.")


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, generator) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]: argmax, or a draw from softmax(logits / temperature) over the top_k."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def static_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    cuda_graph: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy or sampled decoding of a converted model with a static cache -> token ids [B, P + max_new_tokens].

    input_ids [B, P], attention_mask [B, P] (left padding: zeros before each row's prompt; None: no padding).
    The model decodes in its inference mode (`set_inference`): sparse or full. cuda_graph: replay each step from a
    CUDA graph (default: on CUDA). Rows that produced `eos_token_id` continue with `pad_token_id` (default: eos);
    decoding stops early once every row has. Beam search and other `generate()` options: use `generate()`.
    """
    ctrl = require_controller(model)
    if model.training:
        raise ValueError("static_generate decodes in eval mode: call model.eval() first.")
    cfg = ctrl.config
    if cfg.train_mode == "nsa":
        raise ValueError("static_generate does not take NSA models (train_mode='nsa'): use generate().")
    n_layers = model.config.num_hidden_layers
    if sorted(ctrl.layers) != list(range(n_layers)):
        missing = sorted(set(range(n_layers)) - set(ctrl.layers))
        raise ValueError(
            f"static_generate needs every attention layer converted; layers {missing} keep ordinary (e.g. "
            "sliding-window) attention. Use generate() for this model."
        )
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, P] with P >= 1; got {tuple(input_ids.shape)}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: need at least 1.")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature}: need > 0 when sampling.")
    B, P = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}."
        )
    mask = attention_mask.to(torch.long)
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
        raise ValueError("static_generate takes left padding only (zeros before each prompt, ones to the end).")
    start = (mask == 0).sum(1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    pad = eos_token_id if pad_token_id is None else pad_token_id

    prefilled = SSACache()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   **{CACHE_KEYWORD: prefilled}).logits[:, -1]  # fmt: skip
    config = model.config.get_text_config(decoder=True)
    cache = StaticSSACache(prefilled, P + max_new_tokens, start, cfg.block_size, set(ctrl.layers), config)
    ids = torch.empty(B, 1, dtype=torch.long, device=device)
    tokens = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=device)

    def step() -> torch.Tensor:
        cache.begin_step()
        return model(input_ids=ids, position_ids=cache.q_pos, use_cache=True, **{CACHE_KEYWORD: cache}).logits[:, -1]

    graph = static_logits = None
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    if use_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device.")
    for i in range(max_new_tokens):
        nxt = _sample(logits, do_sample, temperature, top_k, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done |= nxt == eos_token_id
        tokens.append(nxt[:, None])
        if i == max_new_tokens - 1 or (eos_token_id is not None and i % 8 == 7 and bool(done.all())):
            break
        ids.copy_(nxt[:, None])
        if graph is not None:
            graph.replay()
            logits = static_logits
        elif use_graph and i >= 1:  # one eager step first: the kernels compile and the allocator warms up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_logits = step()
            graph.replay()
            logits = static_logits
        else:
            logits = step()
    out = torch.cat(tokens, 1)
    if out.shape[1] < P + max_new_tokens:  # stopped early: every row ended
        out = F.pad(out, (0, P + max_new_tokens - out.shape[1]), value=pad)
    return out
