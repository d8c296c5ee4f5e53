"""Which implementation runs each SSA op: the Triton kernels on CUDA (their custom ops while torch.compile traces),
FlexAttention for the document-masked full stream on CUDA, fla-core's NSA kernel for `backend="fla"`, and the
PyTorch reference elsewhere.

Shapes: q [B, T, HQ, D], k, v [B, TK, H, D] (TK >= T, queries are the last T keys), doc_start [B, T] or None
(see `documents.py`), block_indices [B, T, H, block_count] int32 (-1 = unused slot).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from . import cached_means, reference
from .documents import doc_start_from_cu_seqlens, doc_start_from_position_ids
from .reference import attention_sparsity, check_qkv, compressed_attention

__all__ = [
    "select_blocks",
    "attend_blocks",
    "sparse_attention",
    "full_attention",
    "masked_decode_attention",
    "attention_sparsity",
    "compressed_attention",
    "alignment_loss",
    "doc_start_from_position_ids",
    "doc_start_from_cu_seqlens",
    "resolve_backend",
    "kernels_run",
    "block_means",
    "append_block_means",
    "static_cache_decode",
    "MAX_DECODE_T",
]

# Calls with at most this many queries per row (decode steps, no autograd) run the decode kernels
# (ssa_adapt/ops/triton/decode_select.py, decode_attend.py)
MAX_DECODE_T = 4


@functools.cache
def _triton_ops():
    """The Triton kernel module, or None where it cannot run (no triton, or no kernels in this build); looked up
    once (every kernel call asks, and a decode step's host path is launch-bound)."""
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("ssa_adapt.ops.triton") is None:
        return None
    from . import triton as triton_ops

    return triton_ops


@torch._dynamo.assume_constant_result  # traced code sees a constant, not the lookup
def _has_kernels() -> bool:
    return _triton_ops() is not None


def _library():
    """The kernels' custom ops (`ssa_adapt/ops/triton/library.py`) while dynamo traces, else None: compiled code
    calls the ops (single graph nodes), eager code the host functions (no custom-op dispatch per call)."""
    if not torch.compiler.is_compiling():
        return None
    from .triton import library

    return library


def kernels_run(backend: str, x: torch.Tensor) -> bool:
    """Whether SSA's Triton kernels serve `backend` for tensor x (`fla` has no selection or decode kernels of its
    own: ours serve it)."""
    return resolve_backend("auto" if backend == "fla" else backend, x) == "triton"


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Map 'auto' to the backend that runs for tensor x: 'triton' for CUDA tensors when the kernels exist,
    'reference' otherwise. An explicit 'triton' or 'fla' on a non-CUDA tensor warns and runs the reference (unless
    Triton's CPU interpreter is on, TRITON_INTERPRET=1, as in the kernel tests); one without its package raises with
    the fix."""
    if backend == "auto":
        return "triton" if x.is_cuda and _has_kernels() else "reference"
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if backend in ("triton", "fla") and not x.is_cuda and not interpreted:  # e.g. a checkpoint from a GPU machine
        import warnings

        warnings.warn(
            f"backend={backend!r} runs on CUDA tensors only; these are on {x.device.type}: using the PyTorch "
            "reference. set_inference(model, backend='auto') picks the backend by device.",
            stacklevel=3,
        )
        return "reference"
    if backend == "triton" and not _has_kernels():
        raise RuntimeError(
            "backend='triton' needs the `triton` package and ssa_adapt's kernels: pip install 'ssa_adapt[kernels]'."
        )
    if backend == "fla" and importlib.util.find_spec("fla") is None:
        raise RuntimeError("backend='fla' needs fla-core: pip install 'ssa_adapt[fla]'.")
    if backend not in ("reference", "triton", "fla"):
        raise ValueError(f"backend={backend!r}: use one of 'auto', 'reference', 'triton', 'fla'.")
    return backend


def select_blocks(
    q,
    k,
    *,
    block_size=16,
    block_count=16,
    sink_blocks=0,
    local_blocks=1,
    scale=None,
    doc_start=None,
    backend="auto",
    block_means=None,
    kernel_options=None,
) -> torch.Tensor:
    """Block selection (no gradient): q [B, T, HQ, D], k [B, TK, H, D] -> [B, T, H, block_count] int32.

    block_means [B, NB, H, D]: the complete-block key means of an `SSACache` (decode steps); the selection then
    scores them instead of re-reading the keys: the decode kernels on CUDA for T <= 4, the reference elsewhere.
    kernel_options: `ssa_adapt.ops.triton.options.KernelOptions` for the Triton kernels (None: their defaults)."""
    kwargs = dict(
        block_size=block_size,
        block_count=block_count,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        scale=scale,
        doc_start=doc_start,
    )
    if block_means is not None:
        if q.shape[1] <= MAX_DECODE_T and kernels_run(backend, q):
            check_qkv(q, k)
            kwargs.pop("doc_start")
            if (lib := _library()) is not None:
                return lib.decode_select(q, block_means, None, doc_start, k.shape[1], block_size, block_count,
                                         sink_blocks, local_blocks, scale, lib.encode_options(kernel_options))  # fmt: skip
            return _triton_ops().decode_select(
                q, block_means, key_len=k.shape[1], doc_start=doc_start, options=kernel_options, **kwargs
            )
        return reference.select_blocks(q, k, block_means=block_means, **kwargs)
    resolved = resolve_backend(backend, q)
    if resolved == "fla":  # fla-core has no SSA selection: ours (kernels on CUDA, the reference elsewhere)
        resolved = resolve_backend("auto", q)
    if resolved == "triton":
        if (lib := _library()) is not None:
            return lib.select_blocks(q, k, doc_start, block_size, block_count, sink_blocks, local_blocks, scale,
                                     lib.encode_options(kernel_options))  # fmt: skip
        return _triton_ops().select_blocks(q, k, options=kernel_options, **kwargs)
    return reference.select_blocks(q, k, **kwargs)


def attend_blocks(
    q, k, v, block_indices, *, block_size=16, scale=None, doc_start=None, backend="auto", kernel_options=None
) -> torch.Tensor:
    """Attention over the selected blocks, differentiable in q, k, v -> o [B, T, HQ, D]. kernel_options:
    `KernelOptions` for the Triton kernels (None: their defaults)."""
    kwargs = dict(block_size=block_size, scale=scale, doc_start=doc_start)
    resolved = resolve_backend(backend, q)
    if resolved == "fla":  # fla-core's NSA kernel, where its constraints hold (G a power of two >= 16)
        from .fla_nsa import attend_blocks as fla_attend_blocks

        return fla_attend_blocks(q, k, v, block_indices, **kwargs)
    if resolved == "triton":
        if q.shape[1] <= MAX_DECODE_T and not (
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        ):
            # decode steps, no autograd
            if (lib := _library()) is not None:
                return lib.decode_attend(q, k, v, block_indices.to(torch.int32), doc_start, None, block_size, scale,
                                         lib.encode_options(kernel_options))  # fmt: skip
            return _triton_ops().decode_attend(q, k, v, block_indices, options=kernel_options, **kwargs)
        if (lib := _library()) is not None:
            return lib.sparse_attend(q, k, v, block_indices, options=kernel_options, **kwargs)
        return _triton_ops().attend_blocks(q, k, v, block_indices, options=kernel_options, **kwargs)
    return reference.attend_blocks(q, k, v, block_indices, **kwargs)


def sparse_attention(
    q,
    k,
    v,
    *,
    block_size=16,
    block_count=16,
    sink_blocks=0,
    local_blocks=1,
    scale=None,
    doc_start=None,
    backend="auto",
    return_indices=False,
    block_means=None,
    means_start=None,
    kernel_options=None,
):
    """The sparse stream: selection then attention. -> o [B, T, HQ, D] (and block_indices if asked).
    kernel_options: `KernelOptions` for the Triton kernels of both (None: their defaults). An eager decode step
    from block_means on the kernels runs both in one launch (`DecodeOptions.fused_step`, on by default).
    means_start [B] int64 (one query per row): block_means [B, NB, H, D] float32 may still lack the block that k's
    newest key completed in some row (rows' documents start at means_start); it is written into them, in place,
    before the selection (by the one-launch step itself, else by `append_block_means`)."""
    if block_means is not None and _fused_decode_step(q, k, v, backend, kernel_options):
        selection = dict(block_count=block_count, sink_blocks=sink_blocks, local_blocks=local_blocks)
        step = _triton_ops().decode_sparse_step
        out, indices = step(q, k, v, block_means, block_size=block_size, scale=scale, doc_start=doc_start,
                            means_start=means_start, options=kernel_options, **selection)  # fmt: skip
        return (out, indices) if return_indices else out
    if means_start is not None:
        if block_means is None or q.shape[1] != 1:
            raise ValueError("means_start updates cached block means for one query per row: pass block_means too.")
        append_block_means(block_means, means_start, k, block_size)
    indices = select_blocks(
        q,
        k,
        block_size=block_size,
        block_count=block_count,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        scale=scale,
        doc_start=doc_start,
        backend=backend,
        block_means=block_means,
        kernel_options=kernel_options,
    )
    out = attend_blocks(
        q,
        k,
        v,
        indices,
        block_size=block_size,
        scale=scale,
        doc_start=doc_start,
        backend=backend,
        kernel_options=kernel_options,
    )
    return (out, indices) if return_indices else out


def _fused_decode_step(q, k, v, backend, kernel_options) -> bool:
    """Whether a sparse-stream call from cached block means is an eager decode step for the one-launch kernel: few
    queries, no autograd, not traced, the kernels serving `backend`, `DecodeOptions.fused_step` on."""
    if q.shape[1] > MAX_DECODE_T or torch.compiler.is_compiling():
        return False
    if kernel_options is not None and not kernel_options.decode.fused_step:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return kernels_run(backend, q)


def alignment_loss(
    o_full: torch.Tensor, o_sparse: torch.Tensor, kind: str = "smooth_l1", backend: str = "auto", kernel_options=None
) -> torch.Tensor:
    """SSA's bidirectional alignment d(o_full, sg(o_sparse)) + d(sg(o_full), o_sparse), mean over all elements
    (`kind` "smooth_l1", beta 1, or "l2") -> float32 scalar; o_full, o_sparse: any equal shape ([B, T, HQ, D] in
    the attention layers). One Triton pass each way on CUDA, the PyTorch reference elsewhere (same values).
    kernel_options: `KernelOptions` for the Triton kernel (None: its defaults)."""
    if kernels_run(backend, o_full):
        reference.check_alignment(o_full, o_sparse, kind)
        if (lib := _library()) is not None:
            poison = kernel_options is not None and kernel_options.poison
            return lib.alignment_loss(o_full, o_sparse.to(o_full.dtype), kind, 1.0, poison)
        return _triton_ops().alignment_loss(o_full, o_sparse, kind, options=kernel_options)
    return reference.alignment_loss(o_full, o_sparse, kind)


def full_attention(q, k, v, *, scale=None, doc_start=None, sliding_window=None, backend="auto") -> torch.Tensor:
    """The full stream: causal attention inside each document -> o [B, T, HQ, D].

    Uses SDPA (GQA without copying K/V) when there are no document boundaries and no window, and for one query per
    row (a decode step) with its document's keys as a boolean mask (`masked_decode_attention`: FlexAttention built
    a block mask for every new key length; SmolLM2's architecture on the H100, 4k keys, a left-padded batch of 8:
    121 ms per eager step in full mode against 37 without padding, 2026-12-07); the reference otherwise on CPU,
    FlexAttention document masks on CUDA when the kernels provide them.
    """
    B, T, TK, HQ, H, D = check_qkv(q, k, v)
    if doc_start is None and sliding_window is None and (T == TK or T == 1):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=T > 1, scale=scale, enable_gqa=HQ != H
        )
        return out.transpose(1, 2)
    if T == 1 and sliding_window is None:  # a decode step of a left-padded row: its keys from its document start
        keep = torch.arange(TK, device=q.device)[None, :] >= doc_start.to(q.device)[:, :1]  # [B, TK]
        return masked_decode_attention(q, k, v, keep, scale)
    if q.is_cuda and backend in ("auto", "triton") and _has_kernels():
        from .flex import full_attention as flex_full_attention

        return flex_full_attention(q, k, v, scale=scale, doc_start=doc_start, sliding_window=sliding_window)
    return reference.full_attention(q, k, v, scale=scale, doc_start=doc_start, sliding_window=sliding_window)


def masked_decode_attention(q, k, v, key_mask, scale=None) -> torch.Tensor:
    """One query per row, q [B, 1, HQ, D], over the keys k, v [B, TK, H, D] that key_mask [B, TK] (bool) keeps ->
    [B, 1, HQ, D]. The G query heads of each KV head are G query rows of one SDPA call with a [B, 1, 1, TK] mask:
    no copy of K / V for GQA (which SDPA's own GQA support would make under a mask) and no causal mask to build."""
    B, _, HQ, D = q.shape
    H = k.shape[2]
    qg = q.reshape(B, H, HQ // H, D)
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask[:, None, None, :],
                                         scale=scale)  # fmt: skip
    return out.reshape(B, 1, HQ, D)


def block_means(keys: torch.Tensor, start: torch.Tensor, block_size: int, capacity: int) -> torch.Tensor:
    """The mean key of every complete block of each row from its document start, what a KV cache keeps for sparse
    decoding: keys [B, TK, H, D], start [B] int64 -> [B, capacity, H, D] float32 (see `ops/cached_means.py`)."""
    return cached_means.block_means(keys, start, block_size, capacity)


def append_block_means(
    means: torch.Tensor, start: torch.Tensor, keys: torch.Tensor, block_size: int, key_len: torch.Tensor | None = None
) -> None:
    """In place, after one new key per row: the mean of the block each row's newest key completed goes to means
    [B, CAP, H, D] float32 (start [B] int64, keys [B, TK, H, D]). key_len [1] int64 (static caches, whose buffer is
    longer than the keys written): the key count as a device value, read by the kernels only; default TK. One kernel
    launch on CUDA (`ops/triton/cache_means.py`), the reference elsewhere."""
    if key_len is not None or (keys.is_cuda and _has_kernels()):
        if (lib := _library()) is not None:
            return lib.append_block_means(means, start, keys, block_size, key_len)
        from .triton.cache_means import append_block_means as kernel

        return kernel(means, start, keys, block_size, key_len=key_len)
    cached_means.append_block_means(means, start, keys, block_size)


def static_cache_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_start: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    mode: str,
    block_size: int = 16,
    block_count: int = 16,
    sink_blocks: int = 0,
    local_blocks: int = 1,
    scale: float | None = None,
    block_means: torch.Tensor | None = None,
    row_start: torch.Tensor | None = None,
    key_len: torch.Tensor | None = None,
    all_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decode step on the kernels over a static cache's buffers k, v [B, L, H, D], the queries' positions on the
    device (a CUDA graph or a compiled step replays the call as the cache grows): query t of row b sits at key
    doc_start[b, t] + q_pos[b, t] (both [B, T] int64), only the keys up to it written -> o [B, T, HQ, D].

    mode "full": attention over every block of the row (`all_blocks` [B, T, H, L // BS + 1] int32, to reuse one).
    mode "sparse": the block the newest key completed goes to block_means [B, L // BS + 1, H, D] float32 (each row's
    first key at row_start [B] int64, key_len [1] int64 the keys written), then SSA's selection from the means.
    The custom ops while torch.compile traces, the host functions otherwise."""
    lib = _library()
    B, T, H = q.shape[0], q.shape[1], k.shape[2]
    if mode == "full":
        if all_blocks is None:
            n = k.shape[1] // block_size + 1
            all_blocks = torch.arange(n, dtype=torch.int32, device=q.device).expand(B, T, H, n).contiguous()
        if lib is not None:
            return lib.decode_attend(q, k, v, all_blocks, doc_start, q_pos, block_size, scale, "")
        return _triton_ops().decode_attend(
            q, k, v, all_blocks, block_size=block_size, scale=scale, doc_start=doc_start, q_pos=q_pos
        )
    append_block_means(block_means, row_start, k, block_size, key_len=key_len)
    if lib is not None:
        indices = lib.decode_select(q, block_means, q_pos, None, None, block_size, block_count, sink_blocks,
                                    local_blocks, scale, "")  # fmt: skip
        return lib.decode_attend(q, k, v, indices, doc_start, q_pos, block_size, scale, "")
    kernels = _triton_ops()
    selection = dict(block_count=block_count, sink_blocks=sink_blocks, local_blocks=local_blocks, scale=scale)
    indices = kernels.decode_select(q, block_means, q_pos, block_size=block_size, **selection)
    return kernels.decode_attend(
        q, k, v, indices, block_size=block_size, scale=scale, doc_start=doc_start, q_pos=q_pos
    )
