"""Attention on one GPU, side by side: SDPA full attention (cuDNN, flash) against SSA's Triton kernels (selection
alone, block-sparse attention alone, the whole sparse stream) and fla-core's NSA kernel on the same indices.

    python benchmarks/attention.py      # -> benchmarks/results/attention-<card>.{json,md}, e.g. attention-h100
    python benchmarks/attention.py --profile --T 8192 32768 --shapes 9,3,64 --out PROFILE.json   # where the time goes

bf16, B = 1, random normal inputs, block 16 x 16 (sink 1, local 1). Times are medians of triton.testing.do_bench;
forward runs under no_grad, forward+backward through torch.autograd.grad. peak_gib is the peak allocated memory of
one forward+backward (forward only for the selection, which has no backward), inputs included.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_info import git_commit, head_shape, markdown_header, result_path  # noqa: E402  (benchmarks/ is on the path of its scripts)

from ssa_adapt import ops  # noqa: E402
from ssa_adapt.ops import triton as triton_ops  # noqa: E402
from ssa_adapt.ops.triton.options import AttendOptions, KernelOptions, SelectOptions  # noqa: E402

SHAPES = [(32, 2, 64), (32, 8, 64), (9, 3, 64), (14, 2, 64), (16, 8, 128)]  # SSA-1B, Llama-3.2-1B, SmolLM2, ...
TS = [8192, 16384, 32768, 65536, 131072]
IMPLS = ["sdpa_cudnn", "sdpa_flash", "ssa_select", "ssa_attend", "ssa_sparse_stream", "fla_nsa"]
SEL = dict(block_size=16, block_count=16, sink_blocks=1, local_blocks=1)
GIB = 2**30


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def sdpa(backend, expand=False):
    """Causal SDPA on one backend; GQA through enable_gqa (no K/V copy) unless `expand` repeats K/V."""

    def f(q, k, v):
        G = q.shape[2] // k.shape[2]
        if expand:
            k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=not expand
            )
        return o.transpose(1, 2)

    return f


def limit_fla_autotune():
    """fla autotunes ~40 configs per shape; keep the 4 likeliest per kernel to bound compile time on the lease."""
    from fla.ops.nsa import parallel as nsa

    def tuner(obj):
        while not hasattr(obj, "configs") and hasattr(obj, "fn"):
            obj = obj.fn
        return obj

    for name, keep in [
        ("parallel_nsa_fwd_kernel", lambda c: c.num_warps in (2, 4) and c.num_stages in (1, 2)),
        ("parallel_nsa_bwd_kernel_dq", lambda c: c.num_warps in (2, 4) and c.num_stages in (1, 2)),
        ("parallel_nsa_bwd_kernel_dkv", lambda c: c.num_warps == 4 and c.kwargs.get("BQ") in (4, 8)),
    ]:
        t = tuner(getattr(nsa, name))
        t.configs = [c for c in t.configs if keep(c)] or t.configs


def measure(impl, fwd, fwd_bwd, rows, meta, note=""):
    row = dict(impl=impl, **meta, fwd_ms=None, fwd_bwd_ms=None, peak_gib=None, note=note)
    try:
        with torch.no_grad():
            row["fwd_ms"] = timed(fwd)
        if fwd_bwd is not None:
            row["fwd_bwd_ms"] = timed(fwd_bwd)
            row["peak_gib"] = peak(fwd_bwd)
        else:
            with torch.no_grad():
                row["peak_gib"] = peak(fwd)
    except torch.cuda.OutOfMemoryError:
        row["note"] = (note + "; " if note else "") + "out of memory"
    except Exception as e:  # keep the table going; the note says what broke
        row["note"] = (note + "; " if note else "") + f"{type(e).__name__}: {str(e)[:160]}"
    torch.cuda.empty_cache()
    rows.append(row)
    f = lambda x: "-" if x is None else f"{x:8.3f}"  # noqa: E731
    print(
        f"{impl:18s} T={meta['T']:6d} {meta['HQ']:2d}/{meta['H']}/{meta['D']:3d} fwd {f(row['fwd_ms'])} ms  "
        f"fwd+bwd {f(row['fwd_bwd_ms'])} ms  peak {f(row['peak_gib'])} GiB {row['note']}",
        flush=True,
    )
    return row


def run_shape(T, HQ, H, D, impls, rows, options=None):
    g = torch.Generator(device="cuda").manual_seed(T + HQ)
    q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    do = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    meta = dict(T=T, HQ=HQ, H=H, D=D)

    def select(q, k):
        return triton_ops.select_blocks(q, k, options=options, **SEL)

    with torch.no_grad():
        idx = select(q, k)

    def fb(f):
        return lambda: torch.autograd.grad(f(q, k, v), (q, k, v), do)

    def attend(q, k, v):
        return triton_ops.attend_blocks(q, k, v, idx, block_size=16, options=options)

    def stream(q, k, v):  # what ops.sparse_attention runs on CUDA
        return triton_ops.attend_blocks(q, k, v, select(q, k), block_size=16, options=options)

    for name, backend in [("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)]:
        if name in impls:
            f, note = sdpa(backend), "enable_gqa, no K/V copy"
            try:
                with torch.no_grad():
                    f(q[:, :256], k[:, :256], v[:, :256])
            except RuntimeError:  # this backend has no GQA: repeat K/V (counts in time and memory)
                f, note = sdpa(backend, expand=True), "K/V repeated to HQ heads (backend lacks enable_gqa)"
            measure(name, lambda f=f: f(q, k, v), fb(f), rows, meta, note)
    if "ssa_select" in impls:
        measure("ssa_select", lambda: select(q, k), None, rows, meta)
    if "ssa_attend" in impls:
        measure("ssa_attend", lambda: attend(q, k, v), fb(attend), rows, meta, "given indices")
    if "ssa_sparse_stream" in impls:
        measure("ssa_sparse_stream", lambda: stream(q, k, v), fb(stream), rows, meta)
    if "fla_nsa" in impls and HQ // H >= 16 and (HQ // H) & (HQ // H - 1) == 0:

        def fla(q, k, v):
            return ops.attend_blocks(q, k, v, idx, block_size=16, backend="fla")

        with torch.no_grad():
            err = (fla(q, k, v).float() - attend(q, k, v).float()).norm() / attend(q, k, v).float().norm()
        measure("fla_nsa", lambda: fla(q, k, v), fb(fla), rows, meta, f"given indices; vs ours {err:.1e}")


# Kernel variants (`KernelOptions` fields) timed at 32k on SWEEP_SHAPES by --sweep (--sweep-all adds the
# attention's). Earlier sweeps on the H200: (rows, warps, lanes, blocks) = (64, 4, 32, 64) won among the three-pass
# selections (2026-11-29); the removed two-pass selection lost (2026-11-30: 17.5-29.2 ms against 10.8 summed), and
# so did the removed "logits" bound (2026-12-02: 14.6-28.8 against 10.8); unmasked interior chunks won at G = 16 and
# lost at G = 4 (2026-12-03), hence interior="auto". The attention's (64, 4, 3) forward and (64, 4, 1) dk/dv won on
# 2026-11-29. On the H100 (2026-12-07) the selection's pass-1 lanes lost 2-3.4x and were removed, as were the
# union-walking attention tiles; rows 32 / 128, lanes 64 and blocks 128 lost too; later that day the selection with
# 8 warps (1.6-2.6x slower) and the attention with 2-8 tokens per program (12-34% slower) lost on every shape and
# were dropped. The kernel README keeps the figures.
SWEEP = {
    "select": [
        SelectOptions(),
        SelectOptions(interior=False),
        SelectOptions(rows=128),
        SelectOptions(rows=32),  # 16 tokens per program at G = 2: no spill (kernel README)
        SelectOptions(rows=128, warps=8),
        SelectOptions(lanes=64),
        SelectOptions(blocks=128),
        # a register cap: more programs per SM, the passes still free of spills (kernel README section 1)
        SelectOptions(max_registers=128),
        SelectOptions(max_registers=96),
        # interior chunks in loops of their own (passes 1 and 2) at every group size, with and without a cap
        SelectOptions(interior=True),
        SelectOptions(interior=True, max_registers=128),
        SelectOptions(max_registers=128, stages=2),  # at D = 128: 4 programs per SM instead of 3 (shared memory)
        # pass 3 skipping chunks without a survivor: on random inputs it skips none, so this times its overhead
        # (`attention_real.py` times it where it skips)
        SelectOptions(skip_chunks=True),
        # pass 3 storing one word of survivor bits per token and 32 blocks, the survivors' importances recomputed
        # (tiles of at least 16 / 32 chunks; kernel README section 1); pass 1's running bound; and the tiles in
        # launch order (ascending), against the default's longest first
        SelectOptions(survivor_masks=True),
        SelectOptions(survivor_masks=True, mask_min_chunks=32),
        # pass 1's running bound instead of pass 2 (pass 2 and 3 again where it lets too many through)
        SelectOptions(survivor_masks=True, running_bound=True),
        SelectOptions(running_bound=True),
        SelectOptions(longest_first=False),
    ],
    "fwd": [
        AttendOptions(fwd_keys=k, fwd_warps=w, fwd_stages=s)
        # 1-2 warps: the 16-row tile without cross-warp reductions, 36-40% fewer instructions issued per key
        # (kernel README section 2)
        for k, w, s in [
            (64, 4, 3),
            (64, 8, 3),
            (32, 4, 3),
            (128, 8, 2),
            (64, 2, 3),
            (64, 2, 2),
            (32, 2, 3),
            (32, 1, 3),
        ]
    ],
    "dkv": [
        AttendOptions(dkv_rows=r, dkv_warps=w, dkv_stages=s)
        for r, w, s in [(64, 4, 1), (64, 8, 1), (64, 8, 3), (128, 8, 1)]
    ],
}


SWEEP_SHAPES = [(32, 8, 64), (9, 3, 64), (14, 2, 64), (16, 8, 128)]  # the small groups the selection must serve


def sweep(rows, T=32768, parts=("select",)) -> KernelOptions:
    """Kernel variants at 32k on SWEEP_SHAPES (selection tiles, warps, lanes, chunks; keys, warps and
    stages of the forward / dq kernels; rows, warps and stages of the dk/dv kernel) -> the options with the lowest
    summed time over those shapes, used for the rest of the run (the defaults in options.py are the past winners)."""
    data = [_inputs(T, HQ, H, D) for HQ, H, D in SWEEP_SHAPES]
    best_options = KernelOptions()
    for part in parts:
        best = None
        for var in SWEEP[part]:
            field = "select" if part == "select" else "attend"
            if part == "dkv":  # keep the forward's winner
                var = dataclasses.replace(
                    best_options.attend, **{n: getattr(var, n) for n in ("dkv_rows", "dkv_warps", "dkv_stages")}
                )
            opts = dataclasses.replace(best_options, **{field: var})
            total = 0.0
            for q, k, v, do, idx in data:
                if part == "select":
                    ms = timed(lambda q=q, k=k, opts=opts: triton_ops.select_blocks(q, k, options=opts, **SEL))
                else:
                    o = triton_ops.attend_blocks(q, k, v, idx, options=opts)
                    ms = timed(
                        lambda o=o, q=q, k=k, v=v, do=do: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
                    )
                    if part == "fwd":
                        with torch.no_grad():
                            ms += timed(
                                lambda q=q, k=k, v=v, idx=idx, opts=opts: triton_ops.attend_blocks(
                                    q, k, v, idx, options=opts
                                )
                            )
                rows.append(dict(part=part, variant=dataclasses.asdict(var), HQ=q.shape[2], H=k.shape[2], T=T, ms=ms))
                total += ms
            print(f"sweep {part} {var}: {total:.3f} ms (summed over the shapes)", flush=True)
            if best is None or total < best[0]:
                best = (total, opts)
        best_options = best[1]
        print(f"sweep {part}: keeping {best_options}", flush=True)
    torch.cuda.empty_cache()
    return best_options


def profile_stream(T, HQ, H, D, reps=10) -> dict:
    """GPU time per kernel of one sparse-stream forward+backward (selection included) under torch.profiler, and
    the wall time of the same calls by CUDA events: the difference is time the GPU waited for the host."""
    from profiling import kernel_times

    q, k, v, do, _ = _inputs(T, HQ, H, D)

    def step():
        torch.autograd.grad(ops.sparse_attention(q, k, v, backend="triton", **SEL), (q, k, v), do)

    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / reps
    rows = [dict(kernel=r["kernel"], ms_per_step=r["us_per_step"] / 1e3, calls_per_step=r["calls_per_step"])
            for r in kernel_times(step, reps)]  # fmt: skip
    busy = sum(r["ms_per_step"] for r in rows)
    print(
        f"profile T={T} ({HQ}, {H}, {D}): wall {wall_ms:.3f} ms, kernels {busy:.3f} ms, host gaps {wall_ms - busy:.3f} ms"
    )
    for r in rows[:12]:
        print(f"  {r['ms_per_step']:8.3f} ms  x{r['calls_per_step']:.0f}  {r['kernel']}", flush=True)
    return dict(T=T, HQ=HQ, H=H, D=D, wall_ms=wall_ms, kernels_ms=busy, kernels=rows)


def _inputs(T, HQ, H, D):
    q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    with torch.no_grad():
        idx = ops.select_blocks(q, k, backend="triton", **SEL)
    return q, k, v, torch.randn_like(q), idx


def kernel_config(options: KernelOptions) -> dict:
    return dataclasses.asdict(options)


def markdown(rows, meta) -> str:
    out = [
        f"# Attention benchmark ({meta['device']})",
        "",
        f"{meta['device']}, {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}, "
        "bf16, B=1, "
        "block 16 x 16, sink 1, local 1, random normal inputs.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Milliseconds (median of triton.testing.do_bench), forward / forward+backward; peak GiB of a forward+backward.",
        "Speedup = SDPA cuDNN time / SSA sparse stream time.",
        "",
    ]
    key = lambda r: (r["HQ"], r["H"], r["D"])  # noqa: E731
    by = {}
    for r in rows:
        by.setdefault((key(r), r["T"]), {})[r["impl"]] = r
    impls = IMPLS

    def cell(r):
        if r is None:
            return "-"
        return "/".join("-" if x is None else f"{x:.2f}" for x in (r["fwd_ms"], r["fwd_bwd_ms"]))

    for shape in sorted({s for s, _ in by}, key=lambda s: SHAPES.index(s) if s in SHAPES else 99):
        out += [f"## (HQ, H, D) = {shape}", ""]
        out.append("| T | " + " | ".join(impls) + " | speedup fwd / fwd+bwd | peak GiB cuDNN / SSA |")
        out.append("|---" * (len(impls) + 3) + "|")
        for T in sorted(t for s, t in by if s == shape):
            d = by[(shape, T)]
            cu, ss = d.get("sdpa_cudnn"), d.get("ssa_sparse_stream")
            sp = "-"
            if cu and ss and None not in (cu["fwd_ms"], ss["fwd_ms"], cu["fwd_bwd_ms"], ss["fwd_bwd_ms"]):
                sp = f"{cu['fwd_ms'] / ss['fwd_ms']:.1f}x / {cu['fwd_bwd_ms'] / ss['fwd_bwd_ms']:.1f}x"
            pk = "-"
            if cu and ss and None not in (cu["peak_gib"], ss["peak_gib"]):
                pk = f"{cu['peak_gib']:.2f} / {ss['peak_gib']:.2f}"
            out.append(f"| {T // 1024}k | " + " | ".join(cell(d.get(i)) for i in impls) + f" | {sp} | {pk} |")
        out.append("")
    notes = sorted({f"{r['impl']}: {r['note']}" for r in rows if r.get("note")})
    if notes:
        out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=TS)
    p.add_argument("--shapes", nargs="+", type=head_shape, default=list(SHAPES), help="HQ,H,D ...")
    p.add_argument(
        "--impls",
        nargs="+",
        default=IMPLS,
    )
    p.add_argument("--out", default=None, help="default: benchmarks/results/attention-<card>.json")
    p.add_argument("--md", default=None, help="default: benchmarks/results/attention-<card>.md")
    p.add_argument("--sweep", action="store_true", help="time selection-kernel variants at 32k first")
    p.add_argument("--sweep-all", action="store_true", help="also the attention kernels' variants")
    p.add_argument(
        "--sweep-parts", nargs="+", choices=["select", "fwd", "dkv"], default=None,
        help="the variants to sweep (default: select, or all three with --sweep-all); implies --sweep",
    )  # fmt: skip
    p.add_argument(
        "--sweep-only", action="store_true",
        help="sweep, then write benchmarks/results/attention-sweep-<card>.{json,md} instead of the table",
    )  # fmt: skip
    p.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting new sizes after this")
    p.add_argument("--profile", action="store_true", help="only the per-kernel GPU times of the sparse stream")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse here)")
    args = p.parse_args()
    args.out, args.md = result_path("attention", args.out), result_path("attention", args.md, ".md")
    if args.profile:
        shapes = args.shapes
        rows = [profile_stream(T, *shape) for T in args.T for shape in shapes]
        command = "python " + " ".join(sys.argv)
        if args.out == p.get_default("out"):  # never over the benchmark's own results
            args.out = str(Path(args.out).with_name("attention-profile-h200.json"))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        meta = dict(command=command, device=torch.cuda.get_device_name(), date=date, triton=triton.__version__)
        Path(args.out).write_text(json.dumps(dict(**meta, rows=rows), indent=1))
        return
    t0 = time.time()
    meta = dict(
        device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        command="python " + " ".join(sys.argv),
        commit=git_commit(args.commit),
    )
    if "fla_nsa" in args.impls:
        try:
            limit_fla_autotune()
        except ImportError:
            args.impls.remove("fla_nsa")
            print("fla-core not installed: fla_nsa skipped", flush=True)
    rows, sweep_rows, options = [], [], KernelOptions()
    parts = args.sweep_parts or (("select", "fwd", "dkv") if args.sweep_all else ("select",))
    if args.sweep or args.sweep_parts or args.sweep_only:
        try:
            options = sweep(sweep_rows, parts=tuple(parts))
        except Exception as e:  # keep the defaults and go on to the table
            print(f"sweep failed ({type(e).__name__}: {e}); using the default options", flush=True)
    if args.sweep_only:
        out = result_path("attention-sweep", None if args.out == result_path("attention") else args.out)
        md_path = Path(out).with_suffix(".md")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(
            json.dumps(dict(meta, parts=list(parts), kept=kernel_config(options), rows=sweep_rows), indent=1)
        )
        md = markdown_header("Kernel variants at 32k (the sum over the sweep's shapes picks the winner)", meta)
        md += f"\nParts: {', '.join(parts)}. Kept: `{json.dumps(kernel_config(options))}`\n\n"
        md += "\n".join(f"- {json.dumps(r)}" for r in sweep_rows) + "\n"
        md_path.write_text(md)
        print(md)
        return
    shapes = args.shapes
    for T in args.T:
        for HQ, H, D in shapes:
            if time.time() - t0 > args.budget_s:
                print(f"budget reached: T={T} {HQ}/{H}/{D} not run", flush=True)
                continue
            run_shape(T, HQ, H, D, args.impls, rows, options)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
    Path(args.out).write_text(json.dumps(rows, indent=1))
    md = markdown(rows, meta) + f"\nKernel options: `{json.dumps(kernel_config(options))}`\n"
    if sweep_rows:
        md += "\n## Kernel variants at 32k (the sum over the sweep's shapes picks the winner)\n\n"
        md += "\n".join(f"- {json.dumps(r)}" for r in sweep_rows) + "\n"
    Path(args.md).write_text(md)
    print(md)
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
