"""Fixtures and markers shared by the test modules.

Markers (pyproject.toml): `gpu` tests need a CUDA device and are skipped here when there is none; `slow` tests load
the real SmolLM2 (fetched once into the asset cache). The fast loop is `pytest -m "not slow and not gpu"`.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip the `gpu` tests on a machine without CUDA (the one place that decides it)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: the kernels run compiled there (run with -m gpu on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned():
    """Kernel options whose fresh outputs are filled with NaN / a huge sentinel, so unwritten elements fail."""
    from ssa_adapt.ops.triton.options import KernelOptions

    return KernelOptions(poison=True)
