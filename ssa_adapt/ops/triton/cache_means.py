"""One decode step's update of `SSACache`'s block means in a single launch (the PyTorch path takes ~12 ops).

After a decode step appended one key per row, row b holds n_b = TK - start[b] keys of its document. When n_b is a
positive multiple of the block size, that key completed block n_b / BS - 1, whose mean is written to
means[b, n_b / BS - 1]; other rows are left alone. One program per (row, KV head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import next_pow2

__all__ = ["append_block_means"]


@triton.jit
def _write_completed_block_mean(
    k,
    means,
    b,
    h,
    first_key,
    n,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_mb,
    stride_mn,
    stride_mh,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
):
    """If row b's n keys from its document start `first_key` end a block (n a positive multiple of BS), the mean of
    that block's keys of KV head h (float32) goes to means[b, n / BS - 1, h]; otherwise nothing. Shared by
    `_append_block_means_kernel` and the one-launch decode step (`decode/step.py`)."""
    if (n > 0) & (n % BS == 0):
        target = n // BS
        r = tl.arange(0, BSP)
        d = tl.arange(0, BD)
        t = (first_key + (target - 1) * BS + r).to(tl.int64)
        ptr = k + b.to(tl.int64) * stride_kb + t[:, None] * stride_kt + h * stride_kh + d[None, :]
        block = tl.load(ptr, mask=(r[:, None] < BS) & (d[None, :] < D), other=0.0).to(tl.float32)  # [BSP, BD]
        mean = tl.sum(block, axis=0) / BS
        out = means + b.to(tl.int64) * stride_mb + (target - 1).to(tl.int64) * stride_mn + h * stride_mh + d
        tl.store(out, mean, mask=d < D)


@triton.jit(do_not_specialize=["TK"])
def _append_block_means_kernel(
    k,  # [B, TK, H, D], any strides
    means,  # [B, CAP, H, D] float32, last dim contiguous (in-out)
    start,  # [B] int64: first key of each row's document
    key_len,  # [1] int64 or None: the key count, read on the device (static caches), else TK
    TK,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_mb,
    stride_mn,
    stride_mh,
    H: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,  # BS rounded up to a power of two
    HAS_LEN: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    first_key = tl.load(start + b)
    if HAS_LEN:
        n = tl.load(key_len) - first_key
    else:
        n = TK - first_key  # the row's keys, the new one included
    _write_completed_block_mean(k, means, b, h, first_key, n, stride_kb, stride_kt, stride_kh, stride_mb, stride_mn,
                                stride_mh, D, BD, BS, BSP)  # fmt: skip


def append_block_means(
    means: torch.Tensor,
    start: torch.Tensor,
    keys: torch.Tensor,
    block_size: int,
    key_len: torch.Tensor | None = None,
) -> None:
    """In place: means [B, CAP, H, D] float32 (any strides with a contiguous last dim) gets the block each row's newest key completed (rows whose newest key
    completed none keep theirs). keys [B, TK, H, D] (any strides), start [B] int64 each row's document start.
    key_len [1] int64 (static caches, whose key buffer is longer than the keys written): the key count, read on
    the device, so that a CUDA graph can replay the update as the cache grows; default TK."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: need a positive int.")
    B, TK, H, D = keys.shape
    if means.shape[0] != B or means.shape[2:] != (H, D) or means.dtype != torch.float32 or means.stride(3) != 1:
        raise ValueError(
            f"means {tuple(means.shape)} {means.dtype} strides {means.stride()}: need a float32 [B={B}, CAP, H={H}, "
            f"D={D}] tensor with a contiguous last dim (it is written in place, so it cannot be copied)."
        )
    if key_len is not None and (key_len.shape != (1,) or key_len.dtype != torch.int64):
        raise ValueError(f"key_len {tuple(key_len.shape)} {key_len.dtype}: need a [1] int64 tensor.")
    if TK // block_size > means.shape[1]:
        raise ValueError(f"means hold {means.shape[1]} blocks, the keys complete {TK // block_size}: grow them first.")
    if start.shape != (B,) or start.dtype != torch.int64:
        raise ValueError(f"start {tuple(start.shape)} {start.dtype}: need a [B={B}] int64 tensor.")
    if keys.stride(3) != 1:
        keys = keys.contiguous()
    _append_block_means_kernel[(B, H)](
        keys,
        means,
        start,
        key_len,
        TK,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        means.stride(0),
        means.stride(1),
        means.stride(2),
        H=H,
        D=D,
        BD=next_pow2(D),
        BS=block_size,
        BSP=next_pow2(block_size),
        HAS_LEN=key_len is not None,
    )
