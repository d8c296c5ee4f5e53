"""Triton kernels for SSA attention (CUDA; the CPU interpreter runs them under TRITON_INTERPRET=1)."""

from .attend import attend_blocks
from .select import select_blocks

__all__ = ["select_blocks", "attend_blocks"]
