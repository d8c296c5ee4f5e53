"""Perplexity over long held-out documents, in any attention mode, with optional RoPE scaling for extrapolation.

A document's tokens are cut into non-overlapping windows of `context_len` tokens; each window is one forward pass
from an empty context, and every token after the first of its window is predicted:

    PPL = exp( sum over windows and positions t >= 1 of -log p(x_t | x_<t) / number of predicted tokens )

Scoring the same token span at 2k and at 8k isolates what a longer context buys. The logits are never
materialised for a whole window (at 32k they would take 6 GB in float32): the decoder's last hidden states go
through the output head `chunk` positions at a time.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "perplexity", "token_windows", "austen_windows", "apply_rope_scaling", "rope_scaled"]


@dataclass
class PerplexityResult:
    """exp(mean cross-entropy) over `tokens` predicted tokens in `windows` windows of `context_len` tokens."""

    ppl: float
    nll: float  # mean cross-entropy, nats per predicted token
    tokens: int
    windows: int
    context_len: int
    window_nll: list[float] | None = None  # each window's mean cross-entropy, in window order (paired comparisons)

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(
    docs: Sequence[Sequence[int] | torch.Tensor],
    context_len: int,
    *,
    span: int | None = None,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Non-overlapping windows [N, context_len] (int64) cut from each document's first `span` tokens.

    `span` (default: the whole document) should be a multiple of every context length compared, so that each
    length scores the same tokens. Documents shorter than one window give none; a trailing partial window is
    dropped. `max_windows` keeps the first N windows.
    """
    if context_len < 2:
        raise ValueError(f"context_len={context_len}: a window needs at least 2 tokens (one is predicted).")
    if span is not None and span % context_len:
        raise ValueError(
            f"span={span} is not a multiple of context_len={context_len}; pick a span that every compared "
            "length divides (e.g. the largest length) so each length scores the same tokens."
        )
    windows = []
    for doc in docs:
        ids = torch.as_tensor(doc, dtype=torch.int64).flatten()
        if span is not None:
            ids = ids[:span]
        n = ids.numel() // context_len
        if n:
            windows.append(ids[: n * context_len].view(n, context_len))
    if not windows:
        raise ValueError(f"No document has {context_len} tokens; use shorter windows or longer documents.")
    out = torch.cat(windows)
    return out[:max_windows] if max_windows is not None else out


def austen_windows(tokenizer, context_len: int, *, span: int = 8192, novels: Sequence[str] | None = None):
    """Held-out Jane Austen windows [N, context_len]: the first `span` tokens of each novel (all six by default).

    The novels come from ``ssa_adapt.assets.austen_texts`` (Debian ``r-cran-janeaustenr``); it raises
    ``AssetUnavailable`` when they cannot be had. No BOS token is added: a window is plain running text.
    """
    from ..assets import austen_texts

    texts = austen_texts()
    titles = list(novels) if novels is not None else list(texts)
    unknown = sorted(set(titles) - set(texts))
    if unknown:
        raise ValueError(f"novels={unknown} are not among the Austen novels {sorted(texts)}.")
    # Tokenize a prefix only: ~4 characters per token leaves a wide margin for `span` tokens.
    docs = [tokenizer(texts[t][: span * 8], add_special_tokens=False).input_ids for t in titles]
    short = [t for t, d in zip(titles, docs) if len(d) < span]
    if short:
        raise ValueError(f"{short} have fewer than span={span} tokens; lower span.")
    return token_windows(docs, context_len, span=span)


def _decoder_and_head(model):
    """The decoder stack (returns last hidden states) and the output head of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if decoder is None or head is None or decoder is base:
        raise TypeError(
            f"{type(base).__name__} does not expose its decoder and output head (get_decoder / get_output_embeddings);"
            " perplexity() needs a transformers causal LM."
        )
    return base, decoder, head


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    chunk: int = 4096,
    progress: bool = True,
    desc: str | None = None,
) -> PerplexityResult:
    """Perplexity of `model` (in whatever mode it is set to) on `windows` [N, L] of token ids.

    Each row is one forward pass from an empty context; the N * (L - 1) next-token predictions are pooled.
    `chunk` positions at a time go through the output head, bounding memory at long contexts.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, L] token ids with L >= 2; got {tuple(windows.shape)}.")
    base, decoder, head = _decoder_and_head(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    N, L = windows.shape
    sums = []  # per window: summed cross-entropy over its L - 1 predictions
    try:
        for i in tqdm(range(0, N, batch_size), desc=desc or f"perplexity @ {L}", unit="batch", disable=not progress):
            ids = windows[i : i + batch_size].to(device)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [b, L, hidden]
            row = torch.zeros(ids.shape[0], dtype=torch.float64, device=device)
            for s in range(0, L - 1, chunk):
                e = min(s + chunk, L - 1)
                logits = head(hidden[:, s:e]).float()  # predicts tokens s+1 .. e
                ce = F.cross_entropy(logits.flatten(0, 1), ids[:, s + 1 : e + 1].flatten(), reduction="none")
                row += ce.view(ids.shape[0], -1).sum(1, dtype=torch.float64)
            sums += row.tolist()
    finally:
        model.train(was_training)
    count = N * (L - 1)
    nll = math.fsum(sums) / count
    window_nll = [x / (L - 1) for x in sums]
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=N, context_len=L, window_nll=window_nll)


def apply_rope_scaling(
    model: torch.nn.Module,
    factor: float,
    *,
    original_max_position_embeddings: int | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> dict:
    """Give `model` llama3-type RoPE scaling by `factor`, in place (length extrapolation); returns the new
    `rope_parameters`.

    `original_max_position_embeddings` defaults to the model's current `max_position_embeddings` (the context it
    was trained at), which then becomes `factor` times larger. SSA-1B's 32k continuation used factor 4 over 8192.
    The model's rotary embedding modules are rebuilt from the new config; `factor=1` leaves the function unchanged.
    Only models whose RoPE is `default` or `llama3` are supported.
    """
    if factor < 1:
        raise ValueError(f"factor={factor}: llama3 RoPE scaling stretches positions, use factor >= 1.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"This model uses rope_type={rope_type!r}; apply_rope_scaling handles 'default' and 'llama3' RoPE only."
        )
    original = int(original_max_position_embeddings or config.max_position_embeddings)
    params.update(
        rope_type="llama3",
        factor=float(factor),
        low_freq_factor=float(low_freq_factor),
        high_freq_factor=float(high_freq_factor),
        original_max_position_embeddings=original,
    )
    rotary = _rotary_modules(base)
    if not rotary:
        raise TypeError(f"No rotary embedding module found in {type(base).__name__}; cannot apply RoPE scaling.")
    config.rope_parameters = params
    config.max_position_embeddings = int(round(original * factor))
    for parent, name, child in rotary:
        setattr(parent, name, type(child)(config=config).to(child.inv_freq.device))
    return params


def _rotary_modules(base: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) of every rotary embedding module of `base`."""
    return [
        (parent, name, child)
        for parent in base.modules()
        for name, child in list(parent.named_children())
        if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "inv_freq")
    ]


@contextlib.contextmanager
def rope_scaled(model: torch.nn.Module, factor: float, **kwargs) -> Iterator[dict]:
    """`apply_rope_scaling(model, factor, **kwargs)` for the duration of the block (yields its `rope_parameters`);
    the model's own RoPE (config and rotary modules) comes back afterwards, also after an error."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    saved = copy.deepcopy(getattr(config, "rope_parameters", None)), config.max_position_embeddings
    rotary = _rotary_modules(base)
    try:
        yield apply_rope_scaling(model, factor, **kwargs)
    finally:
        config.rope_parameters, config.max_position_embeddings = saved
        for parent, name, child in rotary:
            setattr(parent, name, child)
