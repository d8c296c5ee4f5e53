"""Host-side helpers shared by the SSA Triton kernels: argument checks, dtypes and the document layout.

Shapes follow `ssa_adapt.ops.reference`: q [B, T, HQ, D], k, v [B, TK, H, D], doc_start [B, T] int64 or None,
block_indices [B, T, H, S] int32. README.md beside this file derives the slot numbering used below.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = [
    "cdiv",
    "compile_ahead",
    "next_pow2",
    "new_empty",
    "dq_rows",
    "dq_step",
    "online_softmax_step",
    "softmax_output",
    "check_block_size",
    "check_doc_start",
    "dot_precision",
    "group_pad",
    "kbar_dtype",
    "num_programs",
    "slot_starts",
]


def new_empty(shape, dtype: torch.dtype, device: torch.device, poison: bool = False) -> torch.Tensor:
    """torch.empty, or (poison, `KernelOptions.poison`: tests) a tensor filled with NaN (integers: a huge sentinel)
    so that elements a kernel leaves unwritten fail."""
    if not poison:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else 2**30 - 7, dtype=dtype, device=device)


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(
            f"block_size={block_size}: the Triton kernels need a power of two in [16, 256] (the tensor-core tile); "
            "use backend='reference' for other sizes."
        )


def check_doc_start(doc_start: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor | None:
    """doc_start as a contiguous int64 [B, T] tensor on `device`, or None (every document starts at key 0).

    The kernels assume what `doc_start_from_position_ids` / `doc_start_from_cu_seqlens` produce: documents are
    contiguous key ranges, so along T each value either repeats the previous one or is the query's own key index.
    """
    if doc_start is None:
        return None
    if doc_start.shape != (B, T):
        raise ValueError(
            f"doc_start must be [B, T] = {(B, T)}; got {tuple(doc_start.shape)}. "
            "Build it with ssa_adapt.ops.doc_start_from_position_ids or doc_start_from_cu_seqlens."
        )
    return doc_start.to(device=device, dtype=torch.int64).contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact float32 products for float32 inputs (the tests' tight tolerance)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def kbar_dtype(dtype: torch.dtype) -> torch.dtype:
    """Block means are scored on the tensor cores in float16 (10-bit mantissa, 4x finer than bfloat16; bf16 queries
    convert exactly); float32 inputs keep float32."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints. Host code uses this, not triton.cdiv: Triton's constexpr functions cost ~2 us a call
    from Python, which adds up in a decode step's launch-bound host path."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1); plain Python, see `cdiv`."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def group_pad(G: int) -> int:
    """Rows reserved per token for its G query heads: the next power of two (Triton tiles are powers of two)."""
    return next_pow2(G)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, per_sm: int) -> int:
    """Size of a persistent grid: `per_sm` programs per multiprocessor (4 in all on the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm


def slot_starts(doc_start: torch.Tensor, TK: int, block_size: int) -> torch.Tensor:
    """Key index where each block-mean slot starts: int32 [B, NSLOT], -1 where no complete block lives.

    Block j of the document starting at key s owns slot ceil(s / BS) + j; complete blocks of different
    documents never share a slot (README.md). A slot is marked by the query that completes its block, and
    for the keys before the first query (TK > T) by the first query's document.
    """
    B, T = doc_start.shape
    BS = block_size
    nslot = cdiv(TK, BS) + 1
    off = TK - T
    ds = doc_start
    pos = torch.arange(T, device=ds.device) + off - ds  # [B, T] position inside the document
    j = pos // BS
    done = pos % BS == BS - 1  # this query completes block j
    out = torch.full((B, nslot + 1), -1, dtype=torch.int32, device=ds.device)  # last column: discarded writes
    slot = torch.where(done, (ds + BS - 1) // BS + j, nslot)
    out.scatter_(1, slot, (ds + j * BS).to(torch.int32))
    if off > 0:
        ds0 = ds[:, :1]
        jj = torch.arange(off // BS + 1, device=ds.device)[None, :]
        start = ds0 + jj * BS
        slot = torch.where(start + BS <= off, (ds0 + BS - 1) // BS + jj, nslot)
        out.scatter_(1, slot, start.to(torch.int32))
    return out[:, :nslot].contiguous()


@triton.jit
def online_softmax_step(b_s, b_m, b_l, b_acc, b_v, DOT_PREC: tl.constexpr):
    """One step of the online softmax in the log2 domain: scores b_s [M, N] (-inf where masked), running max b_m [M]
    and sum b_l [M], accumulator b_acc [M, BD], values b_v [N, BD] -> the updated (b_m, b_l, b_acc)."""
    m_new = tl.maximum(b_m, tl.max(b_s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(b_m - m_use)
    b_p = tl.exp2(b_s - m_use[:, None])
    b_l = b_l * alpha + tl.sum(b_p, 1)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
    return m_new, b_l, b_acc


@triton.jit
def softmax_output(b_acc, b_m, b_l):
    """-> (o [M, BD], lse [M] in the log2 domain); rows that saw no key get o = 0 and lse = +inf (their
    probabilities are 0 in the backward)."""
    has = b_l > 0
    b_o = b_acc / tl.where(has, b_l, 1.0)[:, None]
    return b_o, tl.where(has, b_m + tl.log2(tl.where(has, b_l, 1.0)), float("inf"))


@triton.jit
def gather_selected_kv(p_k, p_v, p_i, n_slots, s0, ds, p_t, o_k, o_d, m_d, H: tl.constexpr, D: tl.constexpr,
                       BS: tl.constexpr):  # fmt: skip
    """Keys and values of one step's selected blocks side by side: slots s0 .. s0 + len(o_k) / BS of the row's
    index list p_i (slots >= n_slots read as unused), key indices relative to the document start ds, causal at
    the query's key index p_t. Returns b_k, b_v [BK, BD] (zero where masked) and the key mask m_k [BK]."""
    slot = s0 + o_k // BS
    b_j = tl.load(p_i + slot, mask=slot < n_slots, other=-1)
    kpos = ds + b_j * BS + o_k % BS  # int32: offsets inside one sequence fit
    m_k = (b_j >= 0) & (kpos <= p_t)
    m_kd = m_k[:, None] & m_d[None, :]
    b_k = tl.load(p_k + kpos[:, None] * (H * D) + o_d[None, :], mask=m_kd, other=0.0)
    b_v = tl.load(p_v + kpos[:, None] * (H * D) + o_d[None, :], mask=m_kd, other=0.0)
    return b_k, b_v, m_k


@triton.jit
def dq_rows(q, do, o, lse, delta, row, m_row, D: tl.constexpr, BD: tl.constexpr):
    """The backward's query rows: q, dO [R, BD] and lse [R] loaded, delta = rowsum(dO * O) [R] computed and stored
    for the dk/dv kernel. row [R]: indices of the rows in q / o / lse, m_row [R]: the valid ones."""
    o_d = tl.arange(0, BD)
    m_qd = m_row[:, None] & (o_d < D)[None, :]
    b_q = tl.load(q + row[:, None] * D + o_d[None, :], mask=m_qd, other=0.0)
    b_do = tl.load(do + row[:, None] * D + o_d[None, :], mask=m_qd, other=0.0)
    b_o = tl.load(o + row[:, None] * D + o_d[None, :], mask=m_qd, other=0.0)
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)
    tl.store(delta + row, b_delta, mask=m_row)
    b_lse = tl.load(lse + row, mask=m_row, other=float("inf"))
    return b_q, b_do, b_lse, b_delta


@triton.jit
def dq_step(b_q, b_do, b_lse, b_delta, b_k, b_v, m_s, b_dq, scale_log2, DOT_PREC: tl.constexpr):
    """dq [R, BD] += dS K over one step of keys b_k, b_v [N, BD]; m_s [R, N] (or [1, N]) the keys each row sees:
    P = exp2(s - lse), dS = P (dO V^T - delta)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * scale_log2
    b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=DOT_PREC)


def compile_ahead(fn, constexprs: dict, types: dict, launch: dict, arch: int = 90):
    """A `@triton.jit` kernel compiled for an NVIDIA target without a GPU (down to a cubin through Triton's bundled
    ptxas), as a launch on that GPU would compile it: `constexprs` by name, `types` of the other arguments by name
    (Triton's signature strings, "i32" where unnamed), `launch` the compile options (num_warps, num_stages,
    maxnreg), pointers marked 16-byte aligned as the launcher specialises aligned tensors (without that the loads
    compile to scalar ones). ImportError where this Triton cannot compile ahead of time."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    constexprs = {n: v for n, v in constexprs.items() if n in names}
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch)
