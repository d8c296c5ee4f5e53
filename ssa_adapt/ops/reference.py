"""PyTorch reference of SSA attention: block selection, block-sparse attention, full attention, statistics.

This file is the truth the Triton kernels are tested against, and the CPU path. It favours clarity over speed,
but keeps memory bounded: queries are processed in chunks, so no [T, TK] tensor exists for all heads at once.

Shapes:
    q            [B, T, HQ, D]   queries after RoPE; they are the last T of the TK key positions
    k, v         [B, TK, H, D]   keys after RoPE, values; HQ = G * H for any group size G >= 1
    doc_start    [B, T] int64    key index where each query's document starts (packed sequences, left padding);
                                 None means every document starts at key 0. Keys before it are invisible, and
                                 blocks are counted from it.
    block_indices [B, T, H, S]   int32, the selected block numbers (relative to the document start), ascending,
                                 -1 in unused slots; S = block_count.

Everything is computed in float32 (float64 when the inputs are float64) and returned in the input dtype.
"""

from __future__ import annotations

import torch

__all__ = [
    "select_blocks",
    "attend_blocks",
    "full_attention",
    "attention_sparsity",
    "compressed_attention",
    "alignment_loss",
    "check_qkv",
]

# Elements of the largest per-chunk score tensor [B, Tc, HQ, L]; bounds the reference's memory.
_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------------------------
# input checks and document segmentation
# ----------------------------------------------------------------------------------------------------------------


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> tuple[int, int, int, int, int, int]:
    """Validate shapes and return (B, T, TK, HQ, H, D)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q must be [B, T, HQ, D] and k [B, TK, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}. "
            "Transpose HF's [B, heads, T, D] layout with .transpose(1, 2)."
        )
    B, T, HQ, D = q.shape
    Bk, TK, H, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch size or head_dim.")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have k's shape {tuple(k.shape)}.")
    if HQ % H != 0:
        raise ValueError(f"query heads HQ={HQ} must be a multiple of key/value heads H={H} (GQA).")
    if TK < T:
        raise ValueError(
            f"key length TK={TK} is shorter than query length T={T}; queries are the last T key positions."
        )
    return B, T, TK, HQ, H, D


def _segments(doc_start: torch.Tensor | None, B: int, T: int, TK: int):
    """Yield (b, q0, q1, s): queries [q0, q1) of row b (b=None: all rows) whose document starts at key s."""
    if doc_start is None:
        yield None, 0, T, 0
        return
    if doc_start.shape != (B, T):
        raise ValueError(f"doc_start must be [B, T] = {(B, T)}; got {tuple(doc_start.shape)}.")
    ds = doc_start.detach().to("cpu", torch.int64)
    off = TK - T
    if bool((ds < 0).any()) or bool((ds > torch.arange(T) + off).any()):
        raise ValueError(
            "doc_start must satisfy 0 <= doc_start[b, t] <= t + (TK - T): a document starts at or before its query."
        )
    if bool((ds == 0).all()):
        yield None, 0, T, 0
        return
    for b in range(B):
        values, counts = torch.unique_consecutive(ds[b], return_counts=True)
        q0 = 0
        for s, n in zip(values.tolist(), counts.tolist()):
            yield b, q0, q0 + n, s
            q0 += n


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_len(B: int, HQ: int, L: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, B * HQ * L))


# ----------------------------------------------------------------------------------------------------------------
# per-segment cores: keys 0..L-1 of one document, queries at positions q_pos (all rows share the segmentation)
# ----------------------------------------------------------------------------------------------------------------


def _select_segment(q, k, q_pos, block_size, block_count, sink_blocks, local_blocks, scale, kbar=None):
    """q [B, Tq, HQ, D], k [B, L, H, D], q_pos [Tq] -> block indices [B, Tq, H, S] (int32, -1 padded).
    kbar [B, >= L // BS, H, D]: precomputed block means (a decode cache), else computed from k."""
    B, Tq, HQ, D = q.shape
    L, H = k.shape[1], k.shape[2]
    G = HQ // H
    BS, S = block_size, block_count
    NB = -(-L // BS)  # blocks, the last one possibly partial
    NBc = L // BS  # complete blocks of the whole segment
    cdt = _compute_dtype(q)
    if kbar is None:
        kbar = k[:, : NBc * BS].to(cdt).reshape(B, NBc, BS, H, D).mean(2)  # [B, NBc, H, D]
    else:
        if kbar.shape[1] < NBc:
            raise ValueError(f"block_means holds {kbar.shape[1]} blocks; the keys have {NBc} complete blocks.")
        kbar = kbar[:, :NBc].to(cdt)
    blocks = torch.arange(NB, device=q.device)
    out = torch.full((B, Tq, H, S), -1, dtype=torch.int32, device=q.device)
    step = _chunk_len(B, HQ, max(NB, 1))
    for t0 in range(0, Tq, step):
        pos = q_pos[t0 : t0 + step]  # [Tc]
        Tc = pos.numel()
        complete, forced, candidate, budget = _block_masks(pos, blocks, BS, sink_blocks, local_blocks, block_count)

        importance = torch.zeros(B, Tc, H, NB, dtype=cdt, device=q.device)
        if NBc > 0:
            qg = q[:, t0 : t0 + Tc].to(cdt).reshape(B, Tc, H, G, D)
            logits = torch.einsum("bthgd,bnhd->bthgn", qg, kbar) * scale
            logits = logits.masked_fill(~complete[None, :, None, None, :NBc], float("-inf"))
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows without complete blocks -> 0
            importance[..., :NBc] = probs.sum(3)  # I(j) = sum over the group's heads
        ordered = _choose(importance, candidate[None, :, None], forced[None, :, None], budget[None, :, None, None], S)
        out[:, t0 : t0 + Tc, :, : ordered.shape[-1]] = ordered
    return out


def _block_masks(pos, blocks, block_size, sink_blocks, local_blocks, block_count):
    """For queries at document positions pos [..., Tc] and blocks [NB]: (complete, forced, candidate) [..., Tc, NB]
    bool and the budget of top-scored blocks [..., Tc]."""
    cur = pos // block_size  # the query's own block
    complete = blocks < ((pos + 1) // block_size)[..., None]
    forced = ((blocks < sink_blocks) | (blocks > (cur - local_blocks)[..., None])) & (blocks <= cur[..., None])
    candidate = complete & ~forced
    budget = (block_count - forced.sum(-1)).clamp(min=0)
    return complete, forced, candidate, budget


def _choose(importance, candidate, forced, budget, S):
    """importance [B, Tc, H, NB]; candidate, forced broadcastable to it, budget to [B, Tc, H, 1] -> the selected
    blocks [B, Tc, H, min(S, NB)] int32, ascending, -1 padded: the forced blocks and the top `budget` candidates."""
    NB = importance.shape[-1]
    blocks = torch.arange(NB, device=importance.device)
    score = importance.masked_fill(~candidate, float("-inf"))
    # stable descending sort: among equal scores the lower block index wins (deterministic ties)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, blocks.expand_as(order))
    selected = (candidate & (rank < budget)) | forced
    keyed = torch.where(selected, blocks, NB)  # unselected blocks sort to the end
    ordered = torch.sort(keyed, dim=-1).values[..., :S]
    return torch.where(ordered == NB, -1, ordered).to(torch.int32)


def _key_mask(q_pos, L, block_indices, block_size, sliding_window, start=None):
    """Visible keys [B or 1, Tc, H or 1, L]: causal, inside the selected blocks and the sliding window if given.
    q_pos [Tc] (or [B, Tc]) are positions inside the document; start [B, Tc] (None: 0) the key where it begins,
    keys before it invisible."""
    keys = torch.arange(L, device=q_pos.device)
    pos = q_pos.reshape(-1, q_pos.shape[-1])[..., None]  # [1 or B, Tc, 1]
    rel = keys if start is None else keys - start[..., None]  # key positions inside the document
    mask = rel <= pos if start is None else (rel >= 0) & (rel <= pos)
    if sliding_window is not None:
        mask = mask & (rel > pos - sliding_window)
    mask = mask[:, :, None, :]  # [1 or B, Tc, 1, L]
    if block_indices is not None:
        NB = -(-L // block_size)
        idx = block_indices.long()
        idx = torch.where(idx < 0, NB, idx)  # unused slots -> a dropped extra column
        Bi, Tc, H, _ = idx.shape
        in_block = torch.zeros(Bi, Tc, H, NB + 1, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)
        mask = mask & in_block[..., :NB].repeat_interleave(block_size, dim=-1)[..., :L]
    return mask


def _attend_segment(q, k, v, q_pos, scale, block_indices=None, block_size=16, sliding_window=None, start=None):
    """Masked softmax attention of q [B, Tq, HQ, D] over k, v [B, L, H, D] -> [B, Tq, HQ, D] (compute dtype).
    With block_indices the keys of the selected blocks are gathered first: O(Tq * S * BS), not O(Tq * L).
    start [B, Tq] (None: 0): the key where each query's document begins, q_pos [Tq] or [B, Tq] positions in it."""
    if block_indices is not None:
        return _attend_selected(q, k, v, q_pos, scale, block_indices, block_size, start)
    B, Tq, HQ, D = q.shape
    L, H = k.shape[1], k.shape[2]
    G = HQ // H
    cdt = _compute_dtype(q)
    kf, vf = k.to(cdt), v.to(cdt)
    outs = []
    step = _chunk_len(B, HQ, L)
    for t0 in range(0, Tq, step):
        pos = q_pos[..., t0 : t0 + step]
        Tc = pos.shape[-1]
        qg = q[:, t0 : t0 + Tc].to(cdt).reshape(B, Tc, H, G, D)
        rows = None if start is None else start[:, t0 : t0 + Tc]
        mask = _key_mask(pos, L, None, block_size, sliding_window, rows)  # [1 or B, Tc, 1, L]
        logits = torch.einsum("bthgd,blhd->bthgl", qg, kf) * scale
        logits = logits.masked_fill(~mask[:, :, :, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        outs.append(torch.einsum("bthgl,blhd->bthgd", probs, vf).reshape(B, Tc, HQ, D))
    return torch.cat(outs, dim=1)


def _attend_selected(q, k, v, q_pos, scale, block_indices, block_size, start=None):
    """Attention of q [B, Tq, HQ, D] over the keys of its selected blocks only (gathered, causal inside the own
    block; -1 slots and keys past L masked) -> [B, Tq, HQ, D] (compute dtype). Block numbers count from start
    [B, Tq] (None: key 0), q_pos [Tq] or [B, Tq] are the positions from there."""
    B, Tq, HQ, D = q.shape
    L, H = k.shape[1], k.shape[2]
    G, S = HQ // H, block_indices.shape[-1]
    cdt = _compute_dtype(q)
    kh, vh = k.to(cdt).transpose(1, 2), v.to(cdt).transpose(1, 2)  # [B, H, L, D]
    offsets = torch.arange(block_size, device=q.device)
    outs = []
    step = max(1, _CHUNK_ELEMENTS // max(1, B * H * S * block_size * max(D, G)))
    for t0 in range(0, Tq, step):
        pos = q_pos[..., t0 : t0 + step]
        Tc = pos.shape[-1]
        idx = block_indices[:, t0 : t0 + Tc].long()  # [B, Tc, H, S]
        keys = (idx.clamp(min=0)[..., None] * block_size + offsets).flatten(-2)  # [B, Tc, H, S * BS]
        if start is not None:
            keys = keys + start[:, t0 : t0 + Tc, None, None]  # absolute key positions
            pos = pos + start[:, t0 : t0 + Tc]
        pos = pos.reshape(-1, Tc)[:, :, None, None]  # [1 or B, Tc, 1, 1]
        visible = (idx >= 0).repeat_interleave(block_size, -1) & (keys <= pos) & (keys < L)
        gather = keys.clamp(max=L - 1).permute(0, 2, 1, 3).reshape(B, H, -1, 1).expand(-1, -1, -1, D)
        k_sel = kh.gather(2, gather).view(B, H, Tc, -1, D)  # [B, H, Tc, S * BS, D]
        v_sel = vh.gather(2, gather).view(B, H, Tc, -1, D)
        qg = q[:, t0 : t0 + Tc].to(cdt).reshape(B, Tc, H, G, D)
        logits = torch.einsum("bthgd,bhtjd->bthgj", qg, k_sel) * scale
        logits = logits.masked_fill(~visible[:, :, :, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        outs.append(torch.einsum("bthgj,bhtjd->bthgd", probs, v_sel).reshape(B, Tc, HQ, D))
    return torch.cat(outs, dim=1)


def _full_probs_mass(q, k, q_pos, scale, block_indices, block_size):
    """Full causal attention mass inside the selected blocks: [B, Tq, HQ] (compute dtype)."""
    B, Tq, HQ, D = q.shape
    L, H = k.shape[1], k.shape[2]
    G = HQ // H
    cdt = _compute_dtype(q)
    kf = k.to(cdt)
    outs = []
    step = _chunk_len(B, HQ, L)
    for t0 in range(0, Tq, step):
        pos = q_pos[t0 : t0 + step]
        Tc = pos.numel()
        qg = q[:, t0 : t0 + Tc].to(cdt).reshape(B, Tc, H, G, D)
        causal = _key_mask(pos, L, None, block_size, None)
        selected = _key_mask(pos, L, block_indices[:, t0 : t0 + Tc], block_size, None)
        logits = torch.einsum("bthgd,blhd->bthgl", qg, kf) * scale
        probs = torch.softmax(logits.masked_fill(~causal[:, :, :, None, :], float("-inf")), dim=-1)
        outs.append((probs * selected[:, :, :, None, :]).sum(-1).reshape(B, Tc, HQ))
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# public reference functions
# ----------------------------------------------------------------------------------------------------------------


def _select_dense(q, k, start, q_pos, block_size, block_count, sink_blocks, local_blocks, scale, block_means=None):
    """`select_blocks` without host syncs (what torch.compile traces), for queries whose documents begin at keys
    start [B, T] and which sit at positions q_pos [B, T] inside them: every query scores the blocks of its own
    document, whose means are gathered per query (O(T * TK) memory traffic, chunked) or taken from block_means
    [B, NB, H, D] (one document per row)."""
    B, T, HQ, D = q.shape
    TK, H = k.shape[1], k.shape[2]
    G, BS = HQ // H, block_size
    NB = -(-TK // BS)  # the most blocks a document can have
    cdt = _compute_dtype(q)
    blocks = torch.arange(NB, device=q.device)
    if block_means is not None:
        kbar = block_means[:, None, :NB].to(cdt)
        kbar = torch.cat([kbar, kbar.new_zeros(B, 1, NB - kbar.shape[2], H, D)], 2)  # [B, 1, NB, H, D]
    outs = []
    step = max(1, min(_chunk_len(B, HQ, NB), _CHUNK_ELEMENTS // max(1, B * NB * BS * H * D)))
    for t0 in range(0, T, step):
        pos = q_pos[:, t0 : t0 + step]  # [B, Tc]
        Tc = pos.shape[1]
        complete, forced, candidate, budget = _block_masks(pos, blocks, BS, sink_blocks, local_blocks, block_count)
        if block_means is None:  # the means of every block of each query's document: [B, Tc, NB, H, D]
            index = (start[:, t0 : t0 + Tc, None] + torch.arange(NB * BS, device=q.device)).clamp(max=TK - 1)
            rows = k.gather(1, index.reshape(B, -1, 1, 1).expand(-1, -1, H, D)).to(cdt)
            kbar = rows.reshape(B, Tc, NB, BS, H, D).mean(3)
        qg = q[:, t0 : t0 + Tc].to(cdt).reshape(B, Tc, H, G, D)
        logits = torch.einsum("bthgd,btnhd->bthgn", qg, kbar.expand(B, Tc, NB, H, D)) * scale
        logits = logits.masked_fill(~complete[:, :, None, None, :], float("-inf"))
        importance = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(3)  # [B, Tc, H, NB]
        ordered = _choose(importance, candidate[:, :, None], forced[:, :, None], budget[:, :, None, None], block_count)
        outs.append(torch.nn.functional.pad(ordered, (0, block_count - ordered.shape[-1]), value=-1))
    return torch.cat(outs, 1)


def _dense_positions(doc_start: torch.Tensor, T: int, TK: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start [B, T] int64, q_pos [B, T]): each query's document start and its position inside the document."""
    start = doc_start.to(torch.int64)
    return start, torch.arange(TK - T, TK, device=start.device) - start


def _traced(doc_start) -> bool:
    """True where document starts must be handled without host syncs: under torch.compile (dynamo) tracing."""
    return doc_start is not None and torch.compiler.is_compiling()


def _run_segments(q, k, doc_start, fn, out):
    """Apply fn(q_seg, k_seg_slice, q_pos, b, q0, q1, s) per document segment and write into out[:, q0:q1]."""
    B, T, TK = q.shape[0], q.shape[1], k.shape[1]
    off = TK - T
    for b, q0, q1, s in _segments(doc_start, B, T, TK):
        rows = slice(None) if b is None else slice(b, b + 1)
        q_pos = torch.arange(q0, q1, device=q.device) + off - s  # positions inside the document
        result = fn(rows, q0, q1, s, q1 + off, q_pos)
        out[rows, q0:q1] = result.to(out.dtype)
    return out


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 16,
    block_count: int = 16,
    sink_blocks: int = 0,
    local_blocks: int = 1,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
    block_means: torch.Tensor | None = None,
) -> torch.Tensor:
    """SSA block selection (no gradient). q [B, T, HQ, D], k [B, TK, H, D] -> block_indices [B, T, H, S] int32.

    Per query and KV head: the sink blocks, the `local_blocks` blocks ending with the query's own block, and the
    top-scoring other complete blocks by I(j) = sum over the group's heads of softmax_j(scale * q . mean(k_j)),
    up to `block_count` blocks in all. Ties go to the lower block index. `block_means` [B, NB, H, D] (from an
    `SSACache`, relative to each row's document start) replaces computing the means from k; every query of a
    row must then belong to the same document.
    """
    B, T, TK, HQ, H, D = check_qkv(q, k)
    scale = D**-0.5 if scale is None else scale
    if _traced(doc_start):
        with torch.no_grad():
            return _select_dense(
                q,
                k,
                *_dense_positions(doc_start, T, TK),
                block_size,
                block_count,
                sink_blocks,
                local_blocks,
                scale,
                block_means,
            )
    out = torch.full((B, T, H, block_count), -1, dtype=torch.int32, device=q.device)
    if block_means is not None and doc_start is not None and bool((doc_start != doc_start[:, -1:]).any()):
        raise ValueError("block_means needs one document per row (decode steps); got several document starts.")
    with torch.no_grad():

        def fn(rows, q0, q1, s, end, q_pos):
            kbar = None if block_means is None else block_means[rows]
            return _select_segment(
                q[rows, q0:q1], k[rows, s:end], q_pos, block_size, block_count, sink_blocks, local_blocks, scale, kbar
            )

        _run_segments(q, k, doc_start, fn, out)
    return out


def attend_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int = 16,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention over the selected blocks; differentiable in q, k, v.

    q [B, T, HQ, D], k, v [B, TK, H, D], block_indices [B, T, H, S] -> o [B, T, HQ, D].
    """
    B, T, TK, HQ, H, D = check_qkv(q, k, v)
    if block_indices.shape[:3] != (B, T, H):
        raise ValueError(
            f"block_indices must be [B, T, H, S] with (B, T, H) = {(B, T, H)}; got {tuple(block_indices.shape)}."
        )
    scale = D**-0.5 if scale is None else scale
    if _traced(doc_start):
        start, q_pos = _dense_positions(doc_start, T, TK)
        return _attend_selected(q, k, v, q_pos, scale, block_indices, block_size, start).to(q.dtype)
    out = q.new_empty(B, T, HQ, D, dtype=_compute_dtype(q))

    def fn(rows, q0, q1, s, end, q_pos):
        return _attend_segment(
            q[rows, q0:q1], k[rows, s:end], v[rows, s:end], q_pos, scale, block_indices[rows, q0:q1], block_size
        )

    return _run_segments(q, k, doc_start, fn, out).to(q.dtype)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Ordinary causal attention inside each document (optionally sliding-window). -> o [B, T, HQ, D]."""
    B, T, TK, HQ, H, D = check_qkv(q, k, v)
    scale = D**-0.5 if scale is None else scale
    if _traced(doc_start):
        start, q_pos = _dense_positions(doc_start, T, TK)
        return _attend_segment(q, k, v, q_pos, scale, sliding_window=sliding_window, start=start).to(q.dtype)
    out = q.new_empty(B, T, HQ, D, dtype=_compute_dtype(q))

    def fn(rows, q0, q1, s, end, q_pos):
        return _attend_segment(
            q[rows, q0:q1], k[rows, s:end], v[rows, s:end], q_pos, scale, sliding_window=sliding_window
        )

    return _run_segments(q, k, doc_start, fn, out).to(q.dtype)


def attention_sparsity(
    q: torch.Tensor,
    k: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int = 16,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """AttnSparsity: the full attention mass that falls inside the selected blocks. -> [B, T, HQ] float32.

    The dropped mass of the paper's Theorem 1 is `1 - attention_sparsity(...)`.
    """
    B, T, TK, HQ, H, D = check_qkv(q, k)
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(B, T, HQ, dtype=_compute_dtype(q), device=q.device)
    with torch.no_grad():

        def fn(rows, q0, q1, s, end, q_pos):
            return _full_probs_mass(
                q[rows, q0:q1], k[rows, s:end], q_pos, scale, block_indices[rows, q0:q1], block_size
            )

        _run_segments(q, k, doc_start, fn, out)
    return out


def _compressed_segment(q, k, v, q_pos, scale, block_size):
    """Attention of q [B, Tq, HQ, D] over the means of the complete blocks of k, v [B, L, H, D] (with gradient)."""
    B, Tq, HQ, D = q.shape
    L, H = k.shape[1], k.shape[2]
    G = HQ // H
    NBc = L // block_size
    cdt = _compute_dtype(q)
    if NBc == 0:
        return q.new_zeros(B, Tq, HQ, D, dtype=cdt)
    kbar = k[:, : NBc * block_size].to(cdt).reshape(B, NBc, block_size, H, D).mean(2)  # [B, NBc, H, D]
    vbar = v[:, : NBc * block_size].to(cdt).reshape(B, NBc, block_size, H, D).mean(2)
    complete = torch.arange(NBc, device=q.device)[None, :] < ((q_pos + 1) // block_size)[:, None]  # [Tq, NBc]
    logits = torch.einsum("bthgd,bnhd->bthgn", q.to(cdt).reshape(B, Tq, H, G, D), kbar) * scale
    logits = logits.masked_fill(~complete[None, :, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # no complete block yet: the branch gives zeros
    return torch.einsum("bthgn,bnhd->bthgd", probs, vbar).reshape(B, Tq, HQ, D)


def static_cache_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    mode: str,
    block_size: int = 16,
    block_count: int = 16,
    sink_blocks: int = 0,
    local_blocks: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q [B, T, HQ, D] over a static cache's buffers k, v [B, L, H, D], of which only the keys up to
    each query are written: query t of row b sits at key start[b, t] + q_pos[b, t], its document beginning at key
    start[b, t] (both [B, T] int64). mode "full" (causal attention inside the document) or "sparse" (SSA's
    selection and block-sparse attention) -> o [B, T, HQ, D]. No host sync and static shapes: what a compiled
    decode step traces (the written length is a device value)."""
    B, T, L, HQ, H, D = check_qkv(q, k, v)
    scale = D**-0.5 if scale is None else scale
    if mode == "full":
        return _attend_segment(q, k, v, q_pos, scale, start=start).to(q.dtype)
    with torch.no_grad():
        idx = _select_dense(q, k, start, q_pos, block_size, block_count, sink_blocks, local_blocks, scale)
    return _attend_selected(q, k, v, q_pos, scale, idx, block_size, start).to(q.dtype)


def compressed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 16,
    scale: float | None = None,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """NSA's compressed branch: attention over the mean key / value of every complete block (differentiable).

    q [B, T, HQ, D], k, v [B, TK, H, D] -> [B, T, HQ, D]; zeros for queries with no complete block yet.
    """
    B, T, TK, HQ, H, D = check_qkv(q, k, v)
    scale = D**-0.5 if scale is None else scale
    out = q.new_empty(B, T, HQ, D, dtype=_compute_dtype(q))

    def fn(rows, q0, q1, s, end, q_pos):
        return _compressed_segment(q[rows, q0:q1], k[rows, s:end], v[rows, s:end], q_pos, scale, block_size)

    return _run_segments(q, k, doc_start, fn, out).to(q.dtype)


class _SymmetricAlignment(torch.autograd.Function):
    """d(a, sg(b)) + d(sg(a), b) for an elementwise d(x, y) = h(x - y) in one pass: the two terms have the same
    value, 2 mean(h(a - b)), and their gradients are h'(a - b) / N into a and -h'(a - b) / N into b. Saves a and b
    in their own dtype (not two float32 copies per term) and recomputes a - b in float32 for the backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
        d = a.float() - b.float()
        if kind == "smooth_l1":
            ad = d.abs()
            per = torch.where(ad < beta, (0.5 / beta) * d * d, ad - 0.5 * beta)
        else:
            per = d * d
        ctx.save_for_backward(a, b)
        ctx.kind, ctx.beta = kind, beta
        return 2 * per.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        d = a.float() - b.float()
        g = (d / ctx.beta).clamp(-1.0, 1.0) if ctx.kind == "smooth_l1" else 2 * d
        g = g * (grad / d.numel())
        ga = g.to(a.dtype) if ctx.needs_input_grad[0] else None
        gb = (-g).to(b.dtype) if ctx.needs_input_grad[1] else None
        return ga, gb, None, None


def alignment_loss(o_full: torch.Tensor, o_sparse: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """SSA's bidirectional alignment: d(o_full, sg(o_sparse)) + d(sg(o_full), o_sparse), mean over all elements.

    The first term pulls full attention toward sparse (gradient into the full stream only), the second keeps
    sparse attention near full (gradient into the sparse stream only). Shapes: any, equal; returns a float32
    scalar. `kind`: "smooth_l1" (beta 1) or "l2" (mean squared error); computed in float32 in one fused pass.
    """
    check_alignment(o_full, o_sparse, kind)
    return _SymmetricAlignment.apply(o_full, o_sparse, kind, 1.0)


def check_alignment(o_full: torch.Tensor, o_sparse: torch.Tensor, kind: str) -> None:
    """The alignment loss's arguments (shared with the Triton path): equal shapes, a known kind."""
    if o_full.shape != o_sparse.shape:
        raise ValueError(
            f"o_full {tuple(o_full.shape)} and o_sparse {tuple(o_sparse.shape)} must have the same shape."
        )
    if kind not in ("smooth_l1", "l2"):
        raise ValueError(f"alignment loss kind={kind!r}: use 'smooth_l1' or 'l2'.")
