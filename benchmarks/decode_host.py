"""Host time of a sparse decode step's attention, per layer, with the Triton kernels' launches left out: the Python
that a decode step runs around its kernels (dispatch, checks, cache bookkeeping, allocations), measurable on any
machine.

    python benchmarks/decode_host.py [--steps 200]

A tiny Llama (4 layers, 3 query heads on 1 KV head) is converted with backend="triton"; under Triton's CPU
interpreter the kernels' host functions run as on CUDA, and their launches are replaced here by no-ops, so a decode
step measures the host code alone (its outputs are meaningless). Full mode runs SDPA for real, on a few hundred
keys: its time is the reference the sparse layers' overhead is compared with. Prints the microseconds of a whole
decode step (embedding, MLPs and head included) in both modes and their difference per layer.

    python benchmarks/decode_host.py --cuda [--context 256]

On a GPU instead: host microseconds per call of one layer's decode attention, launches included, on a short cache
(so that the GPU is never the limit): SDPA (`ops.full_attention`, full mode) against the sparse stream's one-launch
step (`ops.sparse_attention` from block means) through its cached compiled kernel (`DecodeOptions.cached_launch`)
and through Triton's launcher, for SmolLM2's and Llama-3.2-1B's heads at batch 1 and 8, written to
benchmarks/results/decode-host-<card>.{json,md} (`--out`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

if "--cuda" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels' host functions run on the CPU

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402, F401  (CPU mode: its launches are replaced)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ssa_adapt  # noqa: E402
from ssa_adapt.compat import cache_kwargs  # noqa: E402
from ssa_adapt.decoding import SSACache  # noqa: E402


def tiny_model(layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=32, max_position_embeddings=8192)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    return ssa_adapt.convert(model, ssa_adapt.SSAConfig(block_size=16, block_count=4, sink_blocks=1, backend="triton"))


def step_us(model, mode: str, prompt: int, steps: int, batch: int = 1, runs: int = 3) -> float:
    """Microseconds per decode step (the fastest of `runs` runs of `steps` steps after a prefill of `prompt`
    tokens: the host noise only adds). With `batch > 1` row i is left-padded by 7 i tokens (generate's mask)."""
    ssa_adapt.set_inference(model, mode)
    ids = torch.randint(0, 256, (batch, prompt))
    pad = torch.arange(prompt)[None] < 7 * torch.arange(batch)[:, None]
    times = []
    for _ in range(runs):
        cache, mask = SSACache(), (~pad).long()
        with torch.no_grad():
            out = model(ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
                out = model(tok, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
                tok = torch.zeros_like(tok)  # the logits are meaningless with the launches left out
            times.append((time.perf_counter() - t0) / steps * 1e6)
    return min(times)


def cuda_launch_us(context: int, out: str | None, commit: str | None, calls: int = 2000) -> None:
    """Per-call host microseconds (the fastest of 5 loops of `calls` calls without a wait; with a short cache the
    GPU keeps up, so the loop runs at the host's pace) of full and sparse decode attention, one layer; the rows go
    to `out` (default benchmarks/results/decode-host-<card>.json) and a markdown beside it."""
    import dataclasses
    import datetime

    import triton
    from run_info import git_commit, result_path

    from ssa_adapt import ops
    from ssa_adapt.ops.triton.options import DEFAULT_OPTIONS

    def per_call(fn) -> float:
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        return best

    def launched(cached: bool):
        return dataclasses.replace(DEFAULT_OPTIONS, decode=dataclasses.replace(DEFAULT_OPTIONS.decode,
                                                                               cached_launch=cached))  # fmt: skip

    rows = []
    for HQ, H, D in ((9, 3, 64), (32, 8, 64)):
        for B in (1, 8):
            g = torch.Generator("cuda").manual_seed(0)
            q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(B, context, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "kv")
            means = k[:, : context // 16 * 16].float().unflatten(1, (-1, 16)).mean(2)
            sel = dict(block_size=16, block_count=16, sink_blocks=1, local_blocks=1, block_means=means)
            full = partial(ops.full_attention, q, k, v)
            sparse = partial(ops.sparse_attention, q, k, v, **sel)
            with torch.no_grad():
                sdpa = per_call(full)
                cached = per_call(partial(sparse, kernel_options=launched(True)))
                plain = per_call(partial(sparse, kernel_options=launched(False)))
            print(f"({HQ}, {H}, {D}) batch {B}, {context} keys, host us per call: SDPA {sdpa:.1f}, sparse step "
                  f"cached launch {cached:.1f}, sparse step Triton's launcher {plain:.1f}", flush=True)  # fmt: skip
            rows.append(dict(HQ=HQ, H=H, D=D, batch=B, context=context, sdpa_us=sdpa, step_kept_kernel_us=cached,
                             step_triton_launcher_us=plain))  # fmt: skip
    result = dict(command="python " + " ".join(sys.argv), device=torch.cuda.get_device_name(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  commit=git_commit(commit), torch=torch.__version__, triton=triton.__version__, rows=rows)  # fmt: skip
    write_launch_results(Path(result_path("decode-host", out)), result, context, calls)


def write_launch_results(path: Path, result: dict, context: int, calls: int) -> None:
    """`result` (command, device, date, commit, rows) as JSON at `path` and its table as markdown beside it."""
    import json

    from run_info import markdown_header

    rows = result["rows"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    table = "\n".join(f"| ({r['HQ']}, {r['H']}, {r['D']}) | {r['batch']} | {r['sdpa_us']:.1f} | "
                      f"{r['step_kept_kernel_us']:.1f} | {r['step_triton_launcher_us']:.1f} |" for r in rows)  # fmt: skip
    path.with_suffix(".md").write_text(
        markdown_header("Host time of one layer's decode attention per call (us)", result)
        + f"\n{context} cached keys, bf16, 16 x 16 blocks, sink 1; the fastest of 5 loops of {calls} calls without a "
        "wait (a call whose GPU time exceeded its host time would show the former).\n\n"
        "| (HQ, H, D) | batch | SDPA | sparse step, kept compiled kernel | sparse step, Triton's launcher |\n"
        "|---|---|---|---|---|\n" + table + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="rows; past the first, left-padded as generate pads them")
    p.add_argument("--cuda", action="store_true", help="time one layer's launches on the GPU (see above)")
    p.add_argument("--context", type=int, default=256, help="--cuda: cached keys")
    p.add_argument("--out", default=None, help="--cuda: default benchmarks/results/decode-host-<card>.json")
    p.add_argument("--commit", default=None, help="--cuda: the commit measured (default: git here)")
    a = p.parse_args()
    if a.cuda:
        cuda_launch_us(a.context, a.out, a.commit)
        return
    model = tiny_model(a.layers)
    run = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None  # launches left out
    full = sparse = float("inf")
    try:  # the two modes alternate, so that a slow phase of the machine hits both
        for _ in range(5):
            full = min(full, step_us(model, "full", a.prompt, a.steps, a.batch))
            sparse = min(sparse, step_us(model, "sparse", a.prompt, a.steps, a.batch))
    finally:
        interpreter.InterpretedFunction.run = run
    per_layer = (sparse - full) / a.layers
    print(f"decode step, batch {a.batch}, {a.layers} layers, {a.prompt}+ keys: full {full:.0f} us, sparse (launches left out) "
          f"{sparse:.0f} us: the sparse layers' host code costs {per_layer:.0f} us per layer more than SDPA")  # fmt: skip


if __name__ == "__main__":
    main()
