"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture
def poisoned():
    """Kernel options whose fresh outputs are filled with NaN / a huge sentinel, so unwritten elements fail."""
    from ssa_adapt.ops.triton.options import KernelOptions

    return KernelOptions(poison=True)
