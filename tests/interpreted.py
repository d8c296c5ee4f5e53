"""Running Triton kernels under TRITON_INTERPRET=1 from a test module without leaking the flag.

Triton reads the flag when a kernel is defined, so a test module runs its CPU cases in two subprocesses (one per
core): `python <test file> OUT.json CASE_ID...`. The parent collects the JSON each child writes; the tests assert
on those numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_interpreted(test_file: str | Path, ids: list[str], timeout_s: int = 1200) -> dict:
    """Parent side: run the case `ids` of `test_file` interpreted, split over two processes -> {case id: result}."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, part in enumerate([ids[0::2], ids[1::2]]):
            out = Path(tmp) / f"part{i}.json"
            cmd = [sys.executable, str(Path(test_file).resolve()), str(out), *part]
            procs.append((subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True), out))
        for proc, out in procs:
            _, err = proc.communicate(timeout=timeout_s)
            if proc.returncode != 0 or not out.exists():
                pytest.fail(f"interpreted kernel run failed (rc {proc.returncode}):\n{err[-4000:]}")
            results.update(json.loads(out.read_text()))
    return results


def write_interpreted(out: str, ids: list[str], run_one: Callable[[str], dict]) -> None:
    """Child side: run each case, recording errors per case, JSON after each. The cases pass
    `KernelOptions(poison=True)` (see `POISONED`) so that unwritten outputs fail."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    results = {}
    for i in ids:
        try:
            results[i] = run_one(i)
        except Exception:  # reported by the test of this case
            results[i] = {"error": traceback.format_exc()[-3000:]}
        Path(out).write_text(json.dumps(results, indent=1))


def __getattr__(name: str):
    """`POISONED`: `KernelOptions(poison=True)`, the options the interpreted cases pass so that unwritten outputs
    fail (`from interpreted import POISONED` in the child; built on first use, so importing this module needs no
    triton)."""
    if name == "POISONED":
        from ssa_adapt.ops.triton.options import KernelOptions

        return KernelOptions(poison=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
