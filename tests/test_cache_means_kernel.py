"""The Triton update of `SSACache`'s block means (ops/triton/cache_means.py) against the cache's PyTorch path and
against means recomputed from the keys, over a run of decode steps: rows with different document starts (left
padding), keys as the transposed view of the cache's [B, H, TK, D] tensor, head_dim not a power of two.

CPU (CI): interpreted in subprocesses (`python tests/test_cache_means_kernel.py OUT.json CASE_ID...`, see
tests/interpreted.py). GPU (`-m gpu`): compiled, and `SSACache.block_means` on CUDA going through the kernel.
"""

from __future__ import annotations

import sys

import pytest
import torch
from interpreted import run_interpreted, write_interpreted

pytest.importorskip("triton")

from ssa_adapt import ops  # noqa: E402
from ssa_adapt.ops import cached_means as reference  # noqa: E402  (the PyTorch path)

HAS_CUDA = torch.cuda.is_available()
# (B, H, D, block size, document starts, first key length, decode steps)
CASES = {
    "bs4-d40": (3, 2, 40, 4, [0, 3, 6], 9, 11),
    "bs5-d64": (2, 2, 64, 5, [0, 2], 7, 12),  # a block size that is not a power of two
    "bs16-d64": (2, 3, 64, 16, [0, 5], 20, 34),
    "bs16-short": (2, 1, 64, 16, [0, 3], 4, 20),  # rows whose first block completes during the run
}


def _steps(case, device, use_kernel: bool) -> dict:
    """Prefill means from the cache, then decode steps one key at a time -> the means after each step, compared."""
    from ssa_adapt.ops.triton.cache_means import append_block_means

    B, H, D, BS, starts, t0, steps = case
    g = torch.Generator().manual_seed(0)
    cache_keys = torch.randn(B, H, t0 + steps, D, generator=g).to(device)  # the cache's layout
    start = torch.tensor(starts, device=device)
    cap = (t0 + steps) // BS
    # the means as a view of a longer buffer (strided over the rows), as a decode step passes them
    means = reference.block_means(cache_keys[:, :, :t0].transpose(1, 2), start, BS, cap + 3)[:, :cap]
    worst_path, worst_keys, complete = 0.0, 0.0, 0
    for TK in range(t0 + 1, t0 + steps + 1):
        keys = cache_keys[:, :, :TK].transpose(1, 2)  # [B, TK, H, D], not contiguous
        ref = means.to("cpu", copy=True)  # the PyTorch path, on the CPU
        reference.append_block_means(ref, start.cpu(), keys.cpu(), BS)
        if use_kernel:
            append_block_means(means, start, keys, BS)
        else:  # the dispatcher, what SSACache calls: the kernel on CUDA, the reference elsewhere
            ops.append_block_means(means, start, keys, BS)
        worst_path = max(worst_path, (means - ref.to(device)).abs().max().item())
        for b, s in enumerate(starts):  # every complete block of every row against its keys
            n = (TK - s) // BS
            if n > 0:
                want = keys[b, s : s + n * BS].reshape(n, BS, H, D).float().mean(1)
                worst_keys = max(worst_keys, (means[b, :n] - want).abs().max().item())
                complete += n
    return {"vs_torch_path": worst_path, "vs_keys": worst_keys, "complete_blocks_checked": complete}


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__, list(CASES), timeout_s=600)


@pytest.mark.parametrize("case", list(CASES))
def test_cache_means_kernel_interpreted(interpreted, case):
    r = interpreted[case]
    assert "error" not in r, r.get("error")
    assert r["complete_blocks_checked"] > 0
    assert r["vs_torch_path"] < 1e-6, r
    assert r["vs_keys"] < 1e-5, r


def test_torch_path_matches_keys():
    r = _steps(CASES["bs4-d40"], "cpu", use_kernel=False)
    assert r["complete_blocks_checked"] > 0 and r["vs_keys"] < 1e-5, r


def test_kernel_checks_inputs():
    from ssa_adapt.ops.triton.cache_means import append_block_means

    keys, start = torch.randn(2, 32, 3, 8), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="grow them first"):
        append_block_means(torch.zeros(2, 1, 3, 8), start, keys, 16)
    with pytest.raises(ValueError, match="float32"):
        append_block_means(torch.zeros(2, 4, 3, 8, dtype=torch.float16), start, keys, 16)
    with pytest.raises(ValueError, match="int64"):
        append_block_means(torch.zeros(2, 4, 3, 8), start.int(), keys, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_cache_means_kernel_gpu(case):
    r = _steps(CASES[case], "cuda", use_kernel=True)
    assert r["vs_torch_path"] < 1e-6 and r["vs_keys"] < 1e-5, r
    r = _steps(CASES[case], "cuda", use_kernel=False)  # the dispatcher's CUDA path is the kernel
    assert r["vs_keys"] < 1e-5, r


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile the kernel for the device itself")
def test_cache_means_kernel_compiles_for_sm90():
    """The interpreter accepts code the compiler rejects: compile the kernel ahead of time for sm_90 with bfloat16
    keys (down to a cubin through ptxas; no GPU needed)."""
    import inspect

    import triton
    from triton.compiler import ASTSource

    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        pytest.skip("this triton has no GPUTarget for ahead-of-time compilation")
    from ssa_adapt.ops.triton import cache_means

    fn = cache_means._append_block_means_kernel
    consts = dict(H=8, D=64, BD=64, BS=16, BSP=16, HAS_LEN=True)  # HAS_LEN: static caches' device key count
    types = dict(k="*bf16", means="*fp32", start="*i64", key_len="*i64", TK="i32")
    types.update({f"stride_{n}": "i64" for n in ("kb", "kt", "kh", "mb", "mn", "mh")})
    sig = {n: "constexpr" if n in consts else types[n] for n in inspect.signature(fn.fn).parameters}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


def _main(out: str, ids: list[str]) -> None:
    write_interpreted(out, ids, lambda i: _steps(CASES[i], "cpu", use_kernel=True))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2:])
