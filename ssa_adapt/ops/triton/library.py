"""The Triton host functions as PyTorch custom ops (`torch.ops.ssa_adapt.*`), which torch.compile traces as single
nodes (no graph break, no tracing into host code) and CUDA graphs capture like any other op.

Each op has a fake (meta) implementation that gives its outputs' shapes and dtypes, and the differentiable ones
(`attend_fwd`, `alignment_loss`) register their backward ops with `register_autograd`. The dispatcher
(`ssa_adapt/ops/__init__.py`) calls them while dynamo traces and the host functions directly otherwise (eager
calls skip the custom-op dispatch). `KernelOptions` travel as a JSON string (`encode_options`); "" is the defaults.

    select_blocks(q [B, T, HQ, D], k [B, TK, H, D], doc_start [B, T]?, ...) -> [B, T, H, S] int32
    attend_fwd(q, k, v, block_indices, doc_start?, ...) -> (o [B, T, HQ, D], lse [B, T, HQ] float32)
    attend_bwd(q, k, v, o, lse, do, block_indices, doc_start?, ...) -> (dq, dk, dv)
    decode_select(q, block_means [B, NB, H, D], q_pos [B, T]?, doc_start?, ...) -> [B, T, H, S] int32
    decode_attend(q, k, v, block_indices, doc_start?, q_pos?, ...) -> [B, T, HQ, D]
    append_block_means(means [B, CAP, H, D], start [B], keys [B, TK, H, D], ...) -> None (means in place)
    alignment_loss(a, b, kind, beta, poison) -> [] float32; alignment_loss_bwd(a, b, grad, ...) -> (ga, gb)
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch
from torch import Tensor

from .options import DEFAULT_OPTIONS, KernelOptions

__all__ = ["encode_options", "decode_options", "sparse_attend"]


@torch._dynamo.assume_constant_result  # traced code sees the string, not json
def encode_options(options: KernelOptions | None) -> str:
    """KernelOptions -> the string the ops take ("" for None, the defaults)."""
    return "" if options is None else json.dumps(dataclasses.asdict(options), sort_keys=True)


@functools.lru_cache(maxsize=32)
def decode_options(text: str) -> KernelOptions | None:
    """The inverse of `encode_options`."""
    if not text:
        return None
    values = {}
    for name, value in json.loads(text).items():  # each sub-options dataclass rebuilt from its dict
        default = getattr(DEFAULT_OPTIONS, name)
        values[name] = type(default)(**value) if dataclasses.is_dataclass(default) else value
    return KernelOptions(**values)


# -- selection ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("ssa_adapt::select_blocks", mutates_args=())
def select_blocks(
    q: Tensor,
    k: Tensor,
    doc_start: Tensor | None,
    block_size: int,
    block_count: int,
    sink_blocks: int,
    local_blocks: int,
    scale: float | None,
    options: str,
) -> Tensor:
    from .select import select_blocks as host

    return host(q, k, block_size=block_size, block_count=block_count, sink_blocks=sink_blocks,
                local_blocks=local_blocks, scale=scale, doc_start=doc_start, options=decode_options(options))  # fmt: skip


@select_blocks.register_fake
def _(q, k, doc_start, block_size, block_count, sink_blocks, local_blocks, scale, options):
    return q.new_empty((q.shape[0], q.shape[1], k.shape[2], block_count), dtype=torch.int32)


# -- sparse attention, forward and backward ------------------------------------------------------------------------


@torch.library.custom_op("ssa_adapt::attend_fwd", mutates_args=())
def attend_fwd(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, doc_start: Tensor | None, block_size: int, scale: float,
    options: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    from .attend import attend_fwd as host

    return host(q, k, v, block_indices, block_size, scale, doc_start, decode_options(options))


@attend_fwd.register_fake
def _(q, k, v, block_indices, doc_start, block_size, scale, options):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("ssa_adapt::attend_bwd", mutates_args=())
def attend_bwd(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, block_indices: Tensor,
    doc_start: Tensor | None, block_size: int, scale: float, options: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    from .attend import attend_bwd as host

    return host(q, k, v, o, lse, do, block_indices, block_size, scale, doc_start, decode_options(options))


@attend_bwd.register_fake
def _(q, k, v, o, lse, do, block_indices, doc_start, block_size, scale, options):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def sparse_attend(q, k, v, block_indices, *, block_size, scale, doc_start, options: KernelOptions | None) -> Tensor:
    """`attend.attend_blocks` through the ops: q [B, T, HQ, D], k, v [B, TK, H, D] -> o [B, T, HQ, D]."""
    from ..reference import check_qkv
    from .utils import check_block_size, check_doc_start

    B, T, TK, HQ, H, D = check_qkv(q, k, v)
    check_block_size(block_size)
    scale = D**-0.5 if scale is None else scale
    ds = check_doc_start(doc_start, B, T, q.device)
    idx = block_indices.to(device=q.device, dtype=torch.int32).contiguous()
    return attend_fwd(q.contiguous(), k.contiguous(), v.contiguous(), idx, ds, block_size, scale,
                      encode_options(options))[0]  # fmt: skip


def _attend_setup(ctx, inputs, output):
    q, k, v, block_indices, doc_start, block_size, scale, options = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, block_indices, doc_start)
    ctx.block_size, ctx.scale, ctx.options = block_size, scale, options
    ctx.mark_non_differentiable(lse)


def _attend_backward(ctx, do, dlse):
    q, k, v, o, lse, block_indices, doc_start = ctx.saved_tensors
    dq, dk, dv = attend_bwd(q, k, v, o, lse, do.contiguous(), block_indices, doc_start, ctx.block_size, ctx.scale,
                            ctx.options)  # fmt: skip
    return dq, dk, dv, None, None, None, None, None


attend_fwd.register_autograd(_attend_backward, setup_context=_attend_setup)


# -- decode steps --------------------------------------------------------------------------------------------------


@torch.library.custom_op("ssa_adapt::decode_select", mutates_args=())
def decode_select(
    q: Tensor, block_means: Tensor, q_pos: Tensor | None, doc_start: Tensor | None, key_len: int | None,
    block_size: int, block_count: int, sink_blocks: int, local_blocks: int, scale: float | None, options: str,
) -> Tensor:  # fmt: skip
    from .decode import decode_select as host

    return host(q, block_means, q_pos, block_size=block_size, block_count=block_count, sink_blocks=sink_blocks,
                local_blocks=local_blocks, scale=scale, key_len=key_len, doc_start=doc_start,
                options=decode_options(options))  # fmt: skip


@decode_select.register_fake
def _(q, block_means, q_pos, doc_start, key_len, block_size, block_count, sink_blocks, local_blocks, scale, options):
    return q.new_empty((q.shape[0], q.shape[1], block_means.shape[2], block_count), dtype=torch.int32)


@torch.library.custom_op("ssa_adapt::decode_attend", mutates_args=())
def decode_attend(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, doc_start: Tensor | None, q_pos: Tensor | None,
    block_size: int, scale: float | None, options: str,
) -> Tensor:  # fmt: skip
    from .decode import decode_attend as host

    return host(q, k, v, block_indices, block_size=block_size, scale=scale, doc_start=doc_start, q_pos=q_pos,
                options=decode_options(options))  # fmt: skip


@decode_attend.register_fake
def _(q, k, v, block_indices, doc_start, q_pos, block_size, scale, options):
    return q.new_empty(q.shape)


@torch.library.custom_op("ssa_adapt::append_block_means", mutates_args=("means",))
def append_block_means(means: Tensor, start: Tensor, keys: Tensor, block_size: int, key_len: Tensor | None) -> None:
    from .cache_means import append_block_means as host

    host(means, start, keys, block_size, key_len=key_len)


@append_block_means.register_fake
def _(means, start, keys, block_size, key_len):
    return None


# -- the alignment loss --------------------------------------------------------------------------------------------


@torch.library.custom_op("ssa_adapt::alignment_loss", mutates_args=())
def alignment_loss(a: Tensor, b: Tensor, kind: str, beta: float, poison: bool) -> Tensor:
    from .align import align_fwd

    return align_fwd(a, b, kind, beta, poison)


@alignment_loss.register_fake
def _(a, b, kind, beta, poison):
    return a.new_empty((), dtype=torch.float32)


@torch.library.custom_op("ssa_adapt::alignment_loss_bwd", mutates_args=())
def alignment_loss_bwd(
    a: Tensor, b: Tensor, grad: Tensor, kind: str, beta: float, poison: bool
) -> tuple[Tensor, Tensor]:
    from .align import align_bwd

    return align_bwd(a, b, grad, kind, beta, poison)


@alignment_loss_bwd.register_fake
def _(a, b, grad, kind, beta, poison):
    return torch.empty_like(a), torch.empty_like(b)


def _align_setup(ctx, inputs, output):
    a, b, kind, beta, poison = inputs
    ctx.save_for_backward(a, b)
    ctx.kind, ctx.beta, ctx.poison = kind, beta, poison


def _align_backward(ctx, grad):
    a, b = ctx.saved_tensors
    ga, gb = alignment_loss_bwd(a, b, grad, ctx.kind, ctx.beta, ctx.poison)
    return ga, gb, None, None, None


alignment_loss.register_autograd(_align_backward, setup_context=_align_setup)
