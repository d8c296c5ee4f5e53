"""Launching a Triton kernel again through the compiled kernel that Triton returned for the same specialisation:
`CompiledLaunch`.

Every `kernel[grid](...)` call runs Triton's launcher in Python: it binds the arguments to the signature,
specialises each one (types, 16-byte alignment of pointers, integers equal to 1 or divisible by 16), hashes that
list with the compile options into a cache key, checks the kernel's globals, then calls the compiled kernel's
launcher. For the one-launch decode step (28 runtime and 28 compile-time arguments) this was the largest part of an
eager sparse layer's host time, and eager decoding is bound by the host (README.md of this folder, section 6).

`CompiledLaunch` keeps, per key of its own, the `CompiledKernel` that Triton's launcher returned, and launches it
directly (`CompiledKernel[grid](*args)`, the API Triton's own ahead-of-time users call) until the key changes.
The caller's key must tell apart every two calls that Triton would specialise differently: its compile-time
arguments and launch options, and `specialization_key` of the runtime arguments (which tensors are None, and no
key unless all are 16-byte aligned; per integer its value below 17, else its residue mod 16; dtypes the caller
fixes or adds). Two calls with one key therefore select the same compiled kernel of Triton's own cache; a key seen
for the first time goes through Triton's launcher (which compiles if needed), and what it returned is kept.

Under `TRITON_INTERPRET=1` Triton's launcher returns nothing: every call goes through it, as without this class.
"""

from __future__ import annotations

__all__ = ["CompiledLaunch", "specialization_key"]

_INT32 = 2**31


def specialization_key(tensors: tuple, ints: tuple) -> tuple | None:
    """What Triton specialises on for these runtime arguments, cheaply (a key finer than Triton's own: equal keys,
    equal specialisations), or None when some tensor's address is not 16-byte aligned (a view at an odd offset:
    left to Triton's launcher). tensors (or None; the first one a tensor) -> its device and which are None;
    ints (non-negative, those Triton specialises) -> each value below 17, else its residue mod 16 (tagged), and
    whether all fit in int32."""
    ptrs, absent = 0, 0
    for t in tensors:
        absent <<= 1
        if t is None:
            absent |= 1
        else:
            ptrs |= t.data_ptr()
    if ptrs & 15:
        return None
    ints_key = tuple([x if x < 17 else (x & 15) | 32 for x in ints])
    return tensors[0].device.index, absent, ints_key, max(ints) < _INT32


class CompiledLaunch:
    """Launches the @triton.jit function `fn`, whose compile-time (constexpr) parameters all follow its runtime
    ones, through the compiled kernels its launcher returned before.

    `launch(grid, args, key, constants, options)`: args the runtime arguments in order; key hashable (see the
    module docstring: `specialization_key` of the args plus whatever fixes constants, options and dtypes);
    constants the compile-time arguments by name (all of them); options Triton's launch options (num_warps, ...).
    A key None (`specialization_key` of misaligned tensors) always goes through Triton's launcher.
    """

    def __init__(self, fn):
        params = list(getattr(fn, "params", ()))  # none under the interpreter (whose launches return nothing)
        first = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
        if any(not p.is_constexpr for p in params[first:]):
            raise ValueError(f"CompiledLaunch({fn.__name__}): its constexpr parameters must follow the runtime ones.")
        self.fn = fn
        self.n_runtime = first
        self.constexpr_names = tuple(p.name for p in params[first:])
        self._kernels: dict = {}

    def launch(self, grid: tuple, args: tuple, key, constants: dict, options: dict) -> None:
        entry = self._kernels.get(key) if key is not None else None
        if entry is not None:
            kernel, values = entry
            kernel[(*grid, 1, 1)[:3]](*args, *values)  # the compiled kernel's runner reads three grid sizes
            return
        if self.constexpr_names and len(args) != self.n_runtime:
            raise ValueError(f"CompiledLaunch({self.fn.__name__}): {len(args)} runtime arguments, expected "
                             f"{self.n_runtime}.")  # fmt: skip
        kernel = self.fn[grid](*args, **constants, **options)
        if hasattr(kernel, "result"):  # an asynchronous compile's future
            kernel = kernel.result()
        if key is not None and kernel is not None and hasattr(kernel, "__getitem__"):  # None: the interpreter
            self._kernels[key] = (kernel, tuple(constants[name] for name in self.constexpr_names))

    def __len__(self) -> int:
        """Compiled kernels held (one per key seen)."""
        return len(self._kernels)
