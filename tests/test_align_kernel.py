"""The Triton alignment loss against the PyTorch reference (ssa_adapt.ops.reference.alignment_loss): value, the
gradient into each input, the stop-gradient halves, sizes that are not a multiple of the kernel's block.

CPU (CI): the kernel runs under TRITON_INTERPRET=1 in subprocesses (`python tests/test_align_kernel.py OUT.json
CASE_ID...`, see tests/interpreted.py), in float32 and float16 (the interpreter has no bfloat16 arithmetic), with
poisoned fresh outputs. GPU (`-m gpu`): compiled, bfloat16, an attention-output-sized tensor, and the dispatch.
"""

from __future__ import annotations

import sys
from functools import partial

import pytest
import torch
from interpreted import run_interpreted, write_interpreted

pytest.importorskip("triton")

from ssa_adapt import ops  # noqa: E402
from ssa_adapt.ops import reference as R  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# (shape, dtype, kind, which inputs need a gradient); 4096 elements per program: 2 x 37 x 3 x 40 = 8880 is 2 full
# programs and a partial one
CASES = {
    "f32-smooth-both": ((2, 37, 3, 40), "float32", "smooth_l1", "ab"),
    "f32-l2-both": ((2, 37, 3, 40), "float32", "l2", "ab"),
    "f16-smooth-a": ((1, 50, 4, 16), "float16", "smooth_l1", "a"),
    "f16-smooth-b": ((1, 50, 4, 16), "float16", "smooth_l1", "b"),
    "f32-tiny": ((3,), "float32", "smooth_l1", "ab"),
}


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = 1.5 * torch.randn(shape, generator=g)  # differences on both sides of SmoothL1's beta = 1
    b = torch.randn(shape, generator=g)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def compare(shape, dtype: str, kind: str, needs: str, device: str, options=None) -> dict:
    """Triton loss and gradients against the reference's on the same inputs -> relative errors. options: the
    kernel's `KernelOptions` (interpreted: poisoned)."""
    from ssa_adapt.ops.triton import alignment_loss as triton_alignment_loss

    a, b = _inputs(shape, getattr(torch, dtype), device)
    out = {}
    grads = {}
    triton_fn = partial(triton_alignment_loss, options=options)
    for name, fn in [("triton", triton_fn), ("reference", R.alignment_loss)]:
        x = a.clone().requires_grad_("a" in needs)
        y = b.clone().requires_grad_("b" in needs)
        loss = fn(x, y, kind)
        upstream = torch.tensor(0.7, device=device)  # a weighted loss, as in CE + alpha * L_align
        (loss * upstream).backward()
        out[name] = loss.item()
        grads[name] = (x.grad, y.grad)
    err = {"loss_rel": abs(out["triton"] - out["reference"]) / abs(out["reference"]), "loss": out["triton"]}
    for i, n in enumerate("ab"):
        t, r = grads["triton"][i], grads["reference"][i]
        if n not in needs:
            err[f"d{n}_none"] = t is None and r is None
            continue
        err[f"d{n}_dtype_ok"] = t.dtype == r.dtype == getattr(torch, dtype)
        err[f"d{n}_rel"] = ((t.float() - r.float()).norm() / r.float().norm()).item()
    return err


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__, list(CASES), timeout_s=600)


@pytest.mark.parametrize("case", list(CASES))
def test_alignment_kernel_interpreted(interpreted, case):
    r = interpreted[case]
    assert "error" not in r, r.get("error")
    shape, dtype, kind, needs = CASES[case]
    tol = 1e-5 if dtype == "float32" else 2e-3
    assert r["loss_rel"] < 1e-5, r
    for n in "ab":
        if n in needs:
            assert r[f"d{n}_dtype_ok"], r
            assert r[f"d{n}_rel"] < tol, r
        else:
            assert r[f"d{n}_none"], r  # the stop-gradient half: no gradient computed or returned


def test_dispatch_checks_inputs():
    a, b = torch.randn(2, 3), torch.randn(2, 4)
    for backend in ("auto", "triton"):  # both paths check before any kernel runs
        with pytest.raises(ValueError, match=r"must have the same shape"):
            ops.alignment_loss(a, b, backend=backend)
    with pytest.raises(ValueError, match="kind='l1'"):
        ops.alignment_loss(a, a, kind="l1")
    assert ops.alignment_loss(a, a + 0.5, backend="reference").item() == pytest.approx(2 * 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_alignment_kernel_gpu(kind):
    """bf16 attention outputs of one SSA-1B layer's micro-batch slice ([1, 8192, 32, 64]) and an odd size."""
    for shape in [(1, 8192, 32, 64), (3, 1001, 7, 64)]:
        r = compare(shape, "bfloat16", kind, "ab", "cuda")
        assert r["loss_rel"] < 1e-4, r
        assert r["da_rel"] < 1e-2 and r["db_rel"] < 1e-2, r  # bf16 rounding of the gradients
        assert r["da_dtype_ok"] and r["db_dtype_ok"], r
    a, b = _inputs((2, 64, 4, 64), torch.bfloat16, "cuda")
    assert ops.alignment_loss(a, b, kind).item() == pytest.approx(R.alignment_loss(a, b, kind).item(), rel=1e-4)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile the kernels for the device itself")
@pytest.mark.parametrize("smooth", [True, False])
def test_alignment_kernels_compile_for_sm90(smooth):
    """The interpreter accepts code the compiler rejects: compile both kernels ahead of time for sm_90 in bfloat16
    (down to a cubin through ptxas; no GPU needed)."""
    from ssa_adapt.ops.triton import align
    from ssa_adapt.ops.triton.utils import compile_ahead

    common = dict(BLOCK=align.ALIGN_BLOCK, SMOOTH=smooth)
    for fn, types, consts in [
        (align._align_fwd_kernel, dict(a="*bf16", b="*bf16", partial="*fp32", N="i64", beta="fp32"), common),
        (
            align._align_bwd_kernel,
            dict(a="*bf16", b="*bf16", grad="*fp32", ga="*bf16", gb="*bf16", N="i64", inv_n="fp32", beta="fp32"),
            dict(common, HAS_GA=True, HAS_GB=False),
        ),
    ]:
        try:
            compiled = compile_ahead(fn, consts, types, dict(num_warps=align.ALIGN_WARPS))
        except ImportError:
            pytest.skip("this triton cannot compile ahead of time (no GPUTarget)")
        assert compiled.asm["cubin"], fn


def _main(out: str, ids: list[str]) -> None:
    from interpreted import POISONED

    write_interpreted(out, ids, lambda i: compare(*CASES[i], "cpu", POISONED))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2:])
