"""Decode kernels for the sparse stream when each row has few queries (T <= 4; a decode step has T == 1), inference
only: selection from an `SSACache`'s block means (`select.py`), split-KV attention over the selected blocks
(`attend.py`), and both in one launch for eager decoding (`step.py`). The dispatcher (`ssa_adapt/ops/dispatch.py`)
routes calls that need gradients to the prefill kernels."""

from .attend import decode_attend
from .select import decode_select
from .step import decode_sparse_step

__all__ = ["decode_select", "decode_attend", "decode_sparse_step"]
