"""`CompiledLaunch` (ssa_adapt/ops/triton/compiled_launch.py): which launches reuse a compiled kernel and which go
through Triton's launcher.

On the CPU, Triton's launcher (JITFunction.run) cannot produce a compiled kernel (no driver; the interpreter
returns none), so these tests stand a small recorder in for the jit function and its compiled kernel: it records
what Triton's launcher and the compiled kernel's runner would be given. That the reused kernel computes what
Triton's launcher would is a GPU test (tests/test_decode_kernels.py, `..._cached_launch_gpu`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ssa_adapt.ops.triton.compiled_launch import CompiledLaunch, specialization_key


class FakeCompiled:
    """What `CompiledKernel[grid](*args)` would launch: recorded. Its runner reads grid[0], grid[1] and grid[2], as
    Triton's does (3.6-3.9)."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("compiled", (grid[0], grid[1], grid[2]), args))


class FakeJit:
    """A jit function's parameters and its launcher `fn[grid](*args, **kwargs)`, which returns a compiled kernel."""

    __name__ = "fake_kernel"

    def __init__(self, names, constexpr):
        self.params = [SimpleNamespace(name=n, is_constexpr=n in constexpr) for n in names]
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.log)

        return run


def test_a_key_seen_once_launches_the_compiled_kernel_with_every_argument_in_order():
    fn = FakeJit(["x", "n", "A", "B"], constexpr={"A", "B"})
    launch = CompiledLaunch(fn)
    x = torch.zeros(4)
    key = ("config", specialization_key((x,), (5,)))
    launch.launch((3, 1), (x, 5), key, dict(B=2, A=1), dict(num_warps=4))
    assert fn.log == [("triton", (3, 1), (x, 5), dict(B=2, A=1, num_warps=4))]
    launch.launch((7, 2), (x, 6), key, dict(B=2, A=1), dict(num_warps=4))
    # three grid sizes (Triton's own launcher pads them, its compiled kernel's runner does not); the constexprs in the
    # signature's order, after the runtime arguments
    assert fn.log[1] == ("compiled", (7, 2, 1), (x, 6, 1, 2))
    assert len(fn.log) == 2 and len(launch) == 1


def test_new_keys_and_misaligned_tensors_go_through_triton():
    fn = FakeJit(["x", "n", "A"], constexpr={"A"})
    launch = CompiledLaunch(fn)
    x = torch.zeros(64)
    for n in (5, 16, 1, 17):  # each a different specialisation of n
        launch.launch((1,), (x, n), specialization_key((x,), (n,)), dict(A=0), {})
    assert [e[0] for e in fn.log] == ["triton"] * 4 and len(launch) == 4
    launch.launch((1,), (x, 33), specialization_key((x,), (33,)), dict(A=0), {})  # 33 specialises as 17 does
    assert fn.log[-1][0] == "compiled"
    view = x[1:]  # 4 bytes past an aligned address
    assert specialization_key((view,), (5,)) is None
    for _ in range(2):
        launch.launch((1,), (view, 5), specialization_key((view,), (5,)), dict(A=0), {})
    assert [e[0] for e in fn.log[-2:]] == ["triton", "triton"] and len(launch) == 4


def test_specialization_key_tells_apart_what_triton_specialises():
    x, y = torch.zeros(8), torch.zeros(8)
    assert specialization_key((x, None), (1,)) != specialization_key((x, y), (1,))  # None is a constant
    assert specialization_key((x,), (1,)) != specialization_key((x,), (2,))  # 1 is a constant
    assert specialization_key((x,), (32,)) != specialization_key((x,), (33,))  # divisibility by 16
    assert specialization_key((x,), (32,)) == specialization_key((x,), (48,))
    assert specialization_key((x,), (2**31 + 16,)) != specialization_key((x,), (32,))  # int64
    assert specialization_key((x,), (7,)) != specialization_key((x,), (23,))  # below 16: kept exactly


def test_constexpr_parameters_must_follow_the_runtime_ones():
    with pytest.raises(ValueError, match="constexpr parameters must follow"):
        CompiledLaunch(FakeJit(["A", "x"], constexpr={"A"}))
    launch = CompiledLaunch(FakeJit(["x", "A"], constexpr={"A"}))
    with pytest.raises(ValueError, match="2 runtime arguments, expected 1"):
        launch.launch((1,), (torch.zeros(4), 3), None, dict(A=0), {})
