"""SSA attention ops on tensors (no model in sight): block selection, block-sparse and full attention, the NSA
baseline's compressed branch, AttnSparsity, the alignment loss, and the block means a KV cache keeps.

`dispatch.py` picks the implementation of each call: the Triton kernels (`triton/`) on CUDA, FlexAttention
(`flex.py`) or fla-core (`fla_nsa.py`) where they serve, the PyTorch reference (`reference.py`, the truth the
kernels are tested against) elsewhere. `documents.py` turns packing and padding into document starts.
"""

from . import dispatch
from .dispatch import *  # noqa: F403  (the ops and the backend choice, listed in dispatch.__all__)

__all__ = list(dispatch.__all__)
