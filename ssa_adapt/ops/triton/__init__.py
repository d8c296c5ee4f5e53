"""Triton kernels for SSA attention on CUDA (the CPU runs them only under TRITON_INTERPRET=1, in tests).

select_blocks / attend_blocks follow `ssa_adapt.ops.reference`; decode_select / decode_attend serve decode steps
(few queries per row, inference only; `ssa_adapt.ops.dispatch.MAX_DECODE_T`), decode_sparse_step both in one launch; alignment_loss is SSA's training
loss between the two streams. README.md beside this file holds the derivations and design choices.
"""

from .align import alignment_loss
from .attend import attend_blocks
from .decode import decode_attend, decode_select, decode_sparse_step
from .select import select_blocks

__all__ = [
    "select_blocks",
    "attend_blocks",
    "decode_select",
    "decode_attend",
    "decode_sparse_step",
    "alignment_loss",
]
