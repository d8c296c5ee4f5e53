"""Triton kernels for SSA attention on CUDA (the CPU runs them only under TRITON_INTERPRET=1, in tests).

select_blocks / attend_blocks follow `ssa_adapt.ops.reference`; full_attention is the document-masked full stream
(FlexAttention); decode_select / decode_attend serve decode steps (T <= MAX_DECODE_T queries per row,
inference only); alignment_loss is SSA's training loss between the two streams. README.md beside this file holds the derivations and design choices.
"""

from .align import alignment_loss
from .attend import attend_blocks
from .decode import MAX_DECODE_T, decode_attend, decode_select
from .flex import full_attention
from .select import select_blocks

__all__ = [
    "select_blocks",
    "attend_blocks",
    "full_attention",
    "decode_select",
    "decode_attend",
    "alignment_loss",
    "MAX_DECODE_T",
]
