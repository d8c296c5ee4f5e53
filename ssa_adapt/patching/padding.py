"""What SSA attention makes of a padding mask, packed documents and a KV cache: each query's document start, or
(a mask with holes) the mask itself, which only the full stream honours."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import doc_start_from_cu_seqlens, doc_start_from_position_ids

__all__ = ["document_starts", "require_left_padding", "masked_full_attention"]


def document_starts(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict) -> tuple:
    """(doc_start [B, T] or None, key_mask [B, TK] bool or None) of query [B, HQ, T, D], key [B, H, TK, D].

    Left padding (a row's zeros all before its first real token), packing (`position_ids`, `cu_seq_lens_q` in
    `kwargs`) and caches become `doc_start`; `key_mask` is the 2D padding mask itself when a real query could see a
    padding key otherwise (zeros between real tokens, or right padding followed by cached decoding), which only the
    full stream honours (see `masked_full_attention`); doc_start is then None."""
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


def require_left_padding(key_mask: torch.Tensor, what: str) -> None:
    """Refuse a padding mask with holes (see `document_starts`) where the sparse stream or its selection runs
    (`what` names it): they know document starts only (see ops/documents.py), not padding keys between real ones."""
    rows = torch.nonzero((key_mask[:, :-1] & ~key_mask[:, 1:]).any(-1)).flatten().tolist()
    raise ValueError(
        f"attention_mask rows {rows[:8]} have padding after a real token that later tokens would attend to (zeros "
        f"between real tokens, or right padding followed by cached decoding); SSA's sparse stream ({what}) "
        "supports left padding, and right padding without a KV cache. Pad on the left "
        "(tokenizer.padding_side='left'), pack documents with position_ids (packing / padding_free), or use the "
        "full stream (set_inference(model, 'full')), which honours any padding mask."
    )


def masked_full_attention(q, k, v, scale, key_mask, sliding_window=None) -> torch.Tensor:
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
