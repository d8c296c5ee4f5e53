"""The selection kernel, and the sparse attention's forward and dq kernels, compiled ahead of time for sm_90 (no
GPU needed): registers, spill instructions, shared memory, programs per SM and the instructions of each loop body,
per group size and register cap (selection) and per warps and keys per step (attention).

    python benchmarks/kernel_sass.py [--G 1 2 3 4 8 16] [--D 64] [--max-registers none 128 96] [--interior off on]
        [--skip-chunks off] [--survivor-masks off] [--running-bound off] [--attend-warps 1 2 4] [--attend-keys 32 64]
        # -> benchmarks/results/kernel-sass-sm90.{json,md}

Compiled as the JIT compiles a launch (pointers 16-byte aligned; without that hint the block means' loads come out
as 16-bit scalar loads and every count below doubles), with `SelectOptions()` and no documents. The counts come
from the SASS of Triton's bundled `nvdisasm` and `cuobjdump`: a loop is a backward branch to a label, its size the
instructions from the label to the branch; `STL` / `LDL` are register spills. Loops in program order, with
interior chunks off: pass 1 (statistics, `blocks` = 64 per step), pass 2 (lower bound, `lanes` = 32), the bound's
rank loop, pass 3 (survivors, 32), then the exact fallback's loops and the survivors' ranking; with them on, pass 1
and pass 2 are three loops each (pass 1: masked chunks before the interior, interior, masked after; pass 2:
interior, then the masked ones before and after). Instructions per thread and step; with 4 warps a step of pass 1
holds 32 (row, block) elements per thread and one of passes 2 and 3 16.
The attention kernels (one program per (token, KV head), the group padded to 16 rows, so every G <= 16 compiles the
same loop) have one loop, a step of `keys` gathered keys: its instructions times the warps, per key, is the issued
work per (token, KV head) and key. Which Triton compiled them matters (the GPU machine's is named in its results);
this file records its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_info import run_record  # noqa: E402  (benchmarks/ is on the path of its scripts)

from ssa_adapt.ops.triton import attend as att  # noqa: E402
from ssa_adapt.ops.triton import select as sel  # noqa: E402
from ssa_adapt.ops.triton.options import SelectOptions  # noqa: E402
from ssa_adapt.ops.triton.utils import compile_ahead  # noqa: E402

REGISTERS_PER_SM = 65536
SHARED_PER_SM = 227 * 1024  # usable per SM on sm_90 (1 KB of the 228 is reserved per program)


def tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


SELECT_TYPES = dict(
    q="*bf16", kbar="*fp16", doc_start="*i64", scratch="*fp32", chunk_max="*bf16", chunk_list="*i32", out="*i32"
)
ATTEND_TYPES = dict(
    {n: "*bf16" for n in ("q", "k", "v", "o", "do", "dq")},
    block_indices="*i32", doc_start="*i64", lse="*fp32", delta="*fp32", scale_log2="fp32", scale="fp32",
)  # fmt: skip


def compile_select(G: int, D: int, max_registers: int | None, interior: bool | str = "auto", skip: bool = False,
                   masks: bool = False, running: bool = False):  # fmt: skip
    """The selection kernel for (G, D) (bf16, 16 x 16 blocks, one sink and one local block, no documents) as
    `select_blocks` launches it on a GPU: the same constexprs and launch options (`select_kernel_config`); skip:
    `SelectOptions.skip_chunks` (without the skip counter); masks / running: `SelectOptions.survivor_masks` /
    `.running_bound`."""
    opt = SelectOptions(interior=interior, max_registers=max_registers, skip_chunks=skip, survivor_masks=masks,
                        running_bound=running)  # fmt: skip
    consts, launch = sel.select_kernel_config(2 if G > 1 else 1, G, D, 16, 16, 1, 1, False, torch.bfloat16, opt)
    return compile_ahead(sel._select_kernel, dict(consts, skip_stats=None), SELECT_TYPES, launch)


def compile_attend(kind: str, D: int, warps: int, keys: int, stages: int = 3):
    """The forward ("fwd") or dq ("dq") kernel of the sparse attention as `attend_fwd` / `attend_bwd` launch it
    (G = 3: the group padded to 16 rows; 16 x 16 blocks)."""
    fn = att._attend_fwd_kernel if kind == "fwd" else att._attend_bwd_dq_kernel
    consts = dict(H=3, G=3, GR=16, D=D, BD=max(16, D), BS=16, S=16, NB=keys // 16, HAS_DOCS=False, DOT_PREC="tf32")
    return compile_ahead(fn, consts, ATTEND_TYPES, dict(num_warps=warps, num_stages=stages))


def attend_row(kind: str, D: int, warps: int, keys: int) -> dict:
    compiled = compile_attend(kind, D, warps, keys)
    regs, sass = sass_of(compiled)
    ins, bodies = loops(sass)
    body = max(bodies, key=len)
    shared = compiled.metadata.shared
    per_sm = min(REGISTERS_PER_SM // (32 * warps * ((regs + 7) // 8 * 8)), SHARED_PER_SM // (shared + 1024), 32)
    return dict(
        kernel=kind, D=D, warps=warps, keys=keys, registers=regs, shared_bytes=shared, programs_per_sm=per_sm,
        warps_per_sm=per_sm * warps, loop=len(body), warp_instructions_per_key=len(body) * warps / keys,
        barriers_per_step=sum(1 for x in body if "BAR.SYNC" in x), spill_instructions=spills(ins),
    )  # fmt: skip


def sass_of(compiled) -> tuple[int, str]:
    """(registers per thread, the SASS) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([tool("nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), sass


def loops(sass: str) -> tuple[list[str], list[list[str]]]:
    """(every instruction, the body of each loop: a backward branch to a label, from the label to the branch)."""
    ins, labels, bodies = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ins)
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1))
    for i, text in enumerate(ins):
        branch = re.search(r"BRA\s.*?`\((\.L_x_\d+)\)", text)
        if branch and labels.get(branch.group(1), i + 1) <= i:
            bodies.append(ins[labels[branch.group(1)] : i + 1])
    return ins, bodies


def spills(instructions: list[str]) -> int:
    return sum(1 for x in instructions if re.search(r"\b(STL|LDL)\b", x))


def row(G: int, D: int, max_registers: int | None, interior: bool | str, skip: bool = False,
        masks: bool = False, running: bool = False) -> dict:  # fmt: skip
    compiled = compile_select(G, D, max_registers, interior, skip, masks, running)
    regs, sass = sass_of(compiled)
    ins, bodies = loops(sass)
    shared = compiled.metadata.shared
    threads = 32 * SelectOptions().warps
    per_sm = min(REGISTERS_PER_SM // (threads * ((regs + 7) // 8 * 8)), SHARED_PER_SM // (shared + 1024), 32)
    return dict(
        G=G, D=D, max_registers=max_registers, interior=interior, skip_chunks=skip, survivor_masks=masks,
        running_bound=running,
        registers=regs, shared_bytes=shared,
        programs_per_sm=per_sm, spill_instructions=spills(ins), loops=[len(b) for b in bodies],
        loop_spills=[spills(b) for b in bodies],
    )  # fmt: skip


def markdown(result: dict) -> str:
    out = [
        "# The selection and sparse attention kernels compiled for sm_90 (ahead of time, no GPU)",
        "",
        f"{result['date']}, commit {result['commit']}, triton {result['triton']}, `SelectOptions()` defaults, 4 warps.",
        "",
        f"Command: `{result['command']}`",
        "",
        "## Selection",
        "",
        "Instructions per thread and step of each loop in program order (interior chunks off: pass 1 (64 blocks), "
        "pass 2 (32), the bound's rank loop, pass 3 (32), the fallback's, the ranking's; on: pass 1 as masked / "
        "interior / masked loops, pass 2 as interior / masked / masked, then the same); spill instructions (STL / "
        "LDL) in the whole kernel and inside loops; programs per SM from registers (65536 per SM, 128 threads per "
        "program) and shared memory. With pass 3's chunk skipping (`skip_chunks`) the listing of the tile's hot "
        "chunks is one more loop (32 chunks per step) before pass 3. With survivor masks (`survivor_masks`) pass 3 "
        "is three loops over a segment's chunks (masked, interior, masked) inside a loop over segments, followed by the "
        "masks' decoding (one step per extracted bit), and the plain pass 3 stays for short tiles; the survivors' importances are recomputed "
        "in one more loop (16 survivors per step) before the ranking.",
        "",
        "| G | D | interior | skip chunks | survivor masks | running bound | register cap | registers | programs / SM "
        "| shared KB | loops | spills: all / in loops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cap = "-" if r["max_registers"] is None else r["max_registers"]
        out.append(
            f"| {r['G']} | {r['D']} | {r['interior']} | {r['skip_chunks']} | {r.get('survivor_masks', False)} | "
            f"{r.get('running_bound', False)} | "
            f"{cap} | {r['registers']} | "
            f"{r['programs_per_sm']} | "
            f"{r['shared_bytes'] / 1024:.1f} | {' / '.join(map(str, r['loops']))} | "
            f"{r['spill_instructions']} / {sum(r['loop_spills'])} |"
        )
    if result.get("attend_rows"):
        out += [
            "",
            "## Sparse attention forward and dq (one program per (token, KV head), 16 rows, 16 x 16 blocks, 3 stages)",
            "",
            "Loop: instructions per thread (so per warp) and step of `keys` keys; warp-instructions per key: the "
            "loop times the warps over the keys, the issued work per (token, KV head) and key.",
            "",
            "| kernel | D | warps | keys / step | registers | shared KB | programs (warps) / SM | loop | warp-instr. / key "
            "| barriers / step | spills |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["attend_rows"]:
            out.append(
                f"| {r['kernel']} | {r['D']} | {r['warps']} | {r['keys']} | {r['registers']} | "
                f"{r['shared_bytes'] / 1024:.1f} | {r['programs_per_sm']} ({r['warps_per_sm']}) | {r['loop']} | "
                f"{r['warp_instructions_per_key']:.1f} | {r['barriers_per_step']} | {r['spill_instructions']} |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--G", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    p.add_argument("--D", type=int, nargs="+", default=[64])
    p.add_argument("--max-registers", nargs="+", default=["none", "128", "96"])
    p.add_argument("--interior", nargs="+", default=["off", "on"], choices=["auto", "on", "off"])
    p.add_argument("--skip-chunks", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--survivor-masks", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--running-bound", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--attend-warps", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--attend-keys", type=int, nargs="*", default=[32, 64])
    p.add_argument("--out", default="benchmarks/results/kernel-sass-sm90.json")
    p.add_argument("--md", default="benchmarks/results/kernel-sass-sm90.md")
    p.add_argument("--commit", default=None)
    a = p.parse_args()
    caps = [None if c.lower() == "none" else int(c) for c in a.max_registers]
    interiors = [{"auto": "auto", "on": True, "off": False}[x] for x in a.interior]
    result = run_record(
        "selection and sparse attention kernels, compiled ahead of time for sm_90",
        a.commit,
        triton=triton.__version__,
        rows=[],
        attend_rows=[],
    )
    for D in a.D:
        for G in a.G:
            variants = [
                (k == "on", m == "on", b == "on")
                for k in a.skip_chunks
                for m in a.survivor_masks
                for b in a.running_bound
            ]
            variants = [v for v in variants if not (v[0] and (v[1] or v[2]))]  # skipping excludes the other two
            for cap, interior, (skip, masks, running) in (
                (c, i, v) for v in variants for i in interiors for c in caps
            ):
                r = row(G, D, cap, interior, skip, masks, running)
                print(json.dumps(r), flush=True)
                result["rows"].append(r)
    for D in a.D:
        for kind in ("fwd", "dq"):
            for warps in a.attend_warps:
                for keys in a.attend_keys:
                    r = attend_row(kind, D, warps, keys)
                    print(json.dumps(r), flush=True)
                    result["attend_rows"].append(r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(a.md).write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
