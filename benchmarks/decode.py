"""Sparse decoding on one GPU: per-layer decode attention latency (selection + attention from an SSACache's block
means) against SDPA full attention over the whole cache, and `generate` tokens/s of tiny random models.

    python benchmarks/decode.py      # -> benchmarks/results/decode-<card>.json
    python benchmarks/decode.py --out $OUT/decode.json --contexts 131072 --batch 1 --skip-generate  # quick

Shapes (HQ, H, D): SmolLM2-135M (9, 3, 64) and Llama-3.2-1B (32, 8, 64); contexts 8k / 32k / 128k; batch 1 and 8;
bf16, block 16 x 16, sink 1, local 1; one query per row (a decode step), random normal q / K / V in HF's cache
layout ([B, H, TK, D], handed to the ops transposed, as the attention module does).

Per layer (`kind: layer`), medians of triton.testing.do_bench in ms:
- `sdpa`: `ops.full_attention` (SDPA, GQA through enable_gqa, what a converted model runs in full mode), and
  `sdpa_flash` / `sdpa_efficient` / `sdpa_cudnn` forced where they take the shape;
- `ssa_select` (decode_select: 2 launches), `ssa_attend` (decode_attend: 1-2 launches), `ssa_sparse`
  (`ops.sparse_attention` with block_means: the whole sparse step as an eager layer runs it, dispatcher included:
  one launch, `decode_sparse_step`), `ssa_sparse_split` (the same with `DecodeOptions.fused_step=False`: the
  select and attend launches);
- `*_graph`: the same replayed from a CUDA graph, i.e. GPU time without Python launch overhead (decode is
  launch-bound at short contexts; `generate` pays the eager launch cost).
`speedup` rows divide the sdpa time by ssa_sparse (eager) and by ssa_sparse_split_graph (graph: what the
static-cache paths replay).

`generate` (`kind: generate`): a random Llama of the shape (`--layers` layers, hidden = HQ * D, vocab 32000), or
with `--model FOLDER` the real model for the rows of its shape (SmolLM2: all 30 layers, RoPE run past 8k; a folder
with only its config.json: that architecture with random weights, the same speed),
converted with SSAConfig(16, 16, sink 1), greedy decoding of `--new-tokens` tokens after a random prompt of the
context length, sparse and full mode; decode tokens/s = B / the median decode step, timed between the calls of a
logits processor (`StepClock`: once per new token, after the step's forward; `generate` waits for the GPU each step),
so the prefill is left out. Eager rows: after a short warm-up call each, the variants (sparse with either step
launch, full; the unconverted model on its own) take turns for `--rounds` calls, and the row's median pools the
steps of all its calls (`step_ms_p10_p90` and the per-call medians give the spread): the eager steps are bound by
the host, whose drift between calls exceeded the modes' difference when each mode ran its calls back to back
(rows before 2026-12-08: the faster of two such calls; before 2026-12-07 19:00 UTC: B * (N - 1) / (t(N tokens) -
t(1 token)), which the prefill's run-to-run noise reaches). `static_generate` rows
(`--generate-impls`): the same decoding with a static cache, each step replayed from one CUDA graph; tokens/s =
B * (N - 3) / (t(N) - t(3)) (the graph is captured at step 2). `--baseline` adds mode `unconverted` (the model
before conversion: SDPA and transformers' own caches, its own compiled step for `hf_static`), which tells
transformers' per-token cost apart from ours. `hf_static` rows (transformers' compiled static-cache step): the median
step as for `generate` (ends-based: B * (N - 4) / (t(N) - t(4)), since every call builds a fresh cache whose new
addresses may make its first decode steps record CUDA graphs again). Every row carries command, device and date;
the file is rewritten after every row.

Eager sparse `generate` runs with the default step launch and with `DecodeOptions.cached_launch` flipped (the kept
compiled kernel against Triton's launcher, through `ssa_adapt.set_kernel_options`; rows' `cached_launch`). `hf_static`
rows keep every step's time of their call (`step_gaps_ms`), so that slow steps show.

`--step-sweep` only times the one-launch eager step's variants (STEP_VARIANTS: `DecodeOptions` changes to the
defaults) over the shapes, contexts and batches, GPU time (CUDA graph) and eager, as rows of kind `step_sweep`.

`--sweep` first times SWEEP_VARIANTS (`DecodeOptions` changes to SWEEP_BASE, passed as `KernelOptions`) at 128k
(`kind: sweep` rows, each with its options as a dict) and runs the layer rows and profiles with the fastest; the
rows' `decode_options` records the options they ran with (`generate` runs the defaults: the model passes none).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_info import git_commit, head_shape, result_path  # noqa: E402  (benchmarks/ is on the path of its scripts)

from ssa_adapt import ops  # noqa: E402
from ssa_adapt.ops.triton import decode as triton_decode  # noqa: E402
from ssa_adapt.ops.triton.options import DEFAULT_OPTIONS, DecodeOptions, KernelOptions  # noqa: E402

SHAPES = [(9, 3, 64), (32, 8, 64)]  # SmolLM2-135M, Llama-3.2-1B
CONTEXTS = [8192, 32768, 131072]
BATCHES = [1, 8]
SEL = dict(block_size=16, block_count=16, sink_blocks=1, local_blocks=1)


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graphed(fn):
    """fn captured in a CUDA graph -> a replay function (GPU time without launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class Recorder:
    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.rows = out, meta, []

    def add(self, **row):
        row = dict(**row, **self.meta)
        self.rows.append(row)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.rows, indent=1))
        shown = {k: v for k, v in row.items() if k not in self.meta}
        print(json.dumps(shown), flush=True)


def layer_inputs(B, TK, HQ, H, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=dt, generator=g).transpose(1, 2)
    k = torch.randn(B, H, TK, D, device="cuda", dtype=dt, generator=g).transpose(1, 2)
    v = torch.randn(B, H, TK, D, device="cuda", dtype=dt, generator=g).transpose(1, 2)
    nb = TK // SEL["block_size"]
    means = k[:, : nb * SEL["block_size"]].float().reshape(B, nb, SEL["block_size"], H, D).mean(2)
    return q, k, v, means


def sdpa(backend=None):
    def f(q, k, v):
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if backend is None:
            return ops.full_attention(q, k, v)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(*args, enable_gqa=True).transpose(1, 2)

    return f


def bench_layer(rec: Recorder, B, TK, HQ, H, D, options: KernelOptions = DEFAULT_OPTIONS):
    meta = dict(kind="layer", HQ=HQ, H=H, D=D, context=TK, batch=B)
    q, k, v, means = layer_inputs(B, TK, HQ, H, D)
    one = KernelOptions(decode=dataclasses.replace(options.decode, fused_step=True))
    unsplit = KernelOptions(decode=dataclasses.replace(options.decode, fused_step=True, step_split_blocks=None))
    split = KernelOptions(decode=dataclasses.replace(options.decode, fused_step=False))
    sparse = partial(ops.sparse_attention, block_means=means, backend="triton", kernel_options=one, **SEL)
    with torch.no_grad():
        idx = triton_decode.decode_select(q, means, key_len=TK, options=options, **SEL)
    impls = {
        "sdpa": sdpa(),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "ssa_select": lambda q, k, v: triton_decode.decode_select(q, means, key_len=TK, options=options, **SEL),
        "ssa_attend": lambda q, k, v: triton_decode.decode_attend(
            q, k, v, idx, block_size=SEL["block_size"], options=options
        ),
        "ssa_sparse": sparse,
        "ssa_sparse_split": partial(
            ops.sparse_attention, block_means=means, backend="triton", kernel_options=split, **SEL
        ),
        # the one launch with one program per row (no split scoring), as before step_split_blocks
        "ssa_sparse_one_program": partial(
            ops.sparse_attention, block_means=means, backend="triton", kernel_options=unsplit, **SEL
        ),
    }
    times = {}
    for name, fn in impls.items():
        for graph in (False, True):
            label = name + ("_graph" if graph else "")
            try:
                with torch.no_grad():
                    call = (lambda fn=fn: fn(q, k, v)) if not graph else graphed(lambda fn=fn: fn(q, k, v))
                    times[label] = timed(call)
                rec.add(impl=label, ms=times[label], **meta)
            except Exception as e:  # a backend that refuses the shape: say why and go on
                rec.add(impl=label, ms=None, note=f"{type(e).__name__}: {str(e)[:160]}", **meta)
    with torch.no_grad():  # the sparse step as measured is the reference's (sanity, not a test)
        o = sparse(q, k, v)
        o_ref = ops.reference.attend_blocks(q, k, v, idx, block_size=SEL["block_size"])
        err = ((o.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
    # eager: the one-launch step (what an eager layer runs); graph: the split launches (what the static-cache
    # paths replay from CUDA graphs)
    for suffix, ssa in (("", "ssa_sparse"), ("_graph", "ssa_sparse_split_graph")):
        full = [
            times[n + suffix] for n in ("sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn") if n + suffix in times
        ]
        if ssa in times and full:
            rec.add(
                impl="speedup" + suffix,
                ssa_impl=ssa,
                sdpa_ms=times.get("sdpa" + suffix),
                best_sdpa_ms=min(full),
                ssa_ms=times[ssa],
                vs_sdpa=None if "sdpa" + suffix not in times else times["sdpa" + suffix] / times[ssa],
                vs_best_sdpa=min(full) / times[ssa],
                rel_err_vs_reference=err,
                **meta,
            )


# Decode-kernel options tried by --sweep at 128k (`DecodeOptions` fields). Swept on 2026-11-30
# (decode-h200-sweep.json, in git history): programs_per_sm 8 beat 2, the split finishing lost; on 2026-12-02
# (decode-h200-sweep-tf32x3.json, in git history): tf32x3 scoring and finish_blocks 1024 won (223.8 us summed); later that day
# (decode-h200-chunks.json, in git history) the chunked finishing of 1024 blocks tied one program per row (222.9 / 223.6), winning
# at batch 1, and narrower chunks (512, 256) lost; then (decode-h200-chunks-auto.json) chunks of 2048 with a
# 32-wide ranking won (190.3 us summed; row 223.8). This round: 4096-block chunks. (The split finishing was removed
# after it lost everywhere: README.md section 6.)
SWEEP_BASE = DecodeOptions(programs_per_sm=8, finish="auto", score_precision="tf32x3", score_blocks=64,
                           finish_blocks=1024, finish_warps=8, chunk_blocks=2048, chunk_small=32,
                           chunk_programs_per_sm=2, fused_step=False)  # fmt: skip
SWEEP_VARIANTS = [
    {},
    dict(chunk_blocks=4096),
    dict(chunk_blocks=4096, finish_warps=16),
    dict(finish="row"),
]


def sweep_settings(args, variants=SWEEP_VARIANTS) -> tuple[list[dict], KernelOptions]:
    """Time the whole sparse step of the split launches (CUDA graph, as the static-cache paths run it) for each variant (SWEEP_BASE with its changes) over the shapes and
    batches at 128k -> (every (variant, shape, batch) time, so that a per-shape choice can be read off later; the
    options of the variant with the lowest total, which the layer rows and profiles of the run then use)."""
    shapes = args.shapes
    totals, rows = [], []
    for change in variants:
        options = KernelOptions(decode=dataclasses.replace(SWEEP_BASE, **change))
        total = 0.0
        for HQ, H, D in shapes:
            for B in args.batch:
                q, k, v, means = layer_inputs(B, 131072, HQ, H, D)
                with torch.no_grad():
                    step = partial(ops.sparse_attention, q, k, v, block_means=means, backend="triton",
                                   kernel_options=options, **SEL)  # fmt: skip
                    ms = timed(graphed(step))
                    select = partial(triton_decode.decode_select, q, means, key_len=131072, options=options, **SEL)
                    sel_ms = timed(graphed(select))
                total += ms
                rows.append(dict(kind="sweep", variant=change, options=dataclasses.asdict(options.decode), HQ=HQ,
                                 H=H, D=D, batch=B, context=131072, ms=ms, select_ms=sel_ms))  # fmt: skip
                print(f"sweep ({HQ}, {H}, {D}) B={B} {change}: step {ms * 1e3:.1f} us, select {sel_ms * 1e3:.1f} us")
        totals.append((total, options))
        print(f"sweep {change}: {total * 1e3:.1f} us summed", flush=True)
    best = min(totals, key=lambda t: t[0])[1]
    print(f"sweep: keeping {dataclasses.asdict(best.decode)}", flush=True)
    torch.cuda.empty_cache()
    return rows, best


# One-launch step variants timed by --step-sweep (`DecodeOptions` changes to the defaults): the GPU time of the
# eager step at short contexts is its phases' latency chain in one program (finishing, then the attention's
# `attend_keys`-wide steps), at long ones the split scoring and the one-program finishing.
STEP_VARIANTS = [
    {},
    dict(attend_keys=64),
    dict(attend_keys=128),
    dict(finish_blocks=256),
    dict(step_warps=4),
    dict(step_split_blocks=256),
    dict(step_split_blocks=1024),
    dict(score_blocks=128),
]


def step_sweep(args, rec: Recorder) -> None:
    """Time the one-launch decode step (`decode_sparse_step`, through the dispatcher) for each of STEP_VARIANTS over
    the shapes, batches and contexts: GPU time (CUDA graph) and eager; rows of kind "step_sweep", and the summed GPU
    time per variant printed."""
    for change in STEP_VARIANTS:
        options = KernelOptions(decode=dataclasses.replace(DEFAULT_OPTIONS.decode, fused_step=True, **change))
        total = 0.0
        for HQ, H, D in args.shapes:
            for TK in args.contexts:
                for B in args.batch:
                    meta = dict(kind="step_sweep", variant=change, HQ=HQ, H=H, D=D, context=TK, batch=B)
                    q, k, v, means = layer_inputs(B, TK, HQ, H, D)
                    step = partial(ops.sparse_attention, q, k, v, block_means=means, backend="triton",
                                   kernel_options=options, **SEL)  # fmt: skip
                    try:
                        with torch.no_grad():
                            gpu, eager = timed(graphed(step)), timed(step)
                    except Exception as e:  # a variant that does not compile for this shape: say why, go on
                        rec.add(note=f"{type(e).__name__}: {str(e)[:160]}", **meta)
                        continue
                    total += gpu
                    rec.add(graph_ms=gpu, eager_ms=eager, **meta)
                    print(
                        f"step {change} ({HQ}, {H}, {D}) {TK} x {B}: graph {gpu * 1e3:.1f} us, eager {eager * 1e3:.1f} us"
                    )
        print(f"step sweep {change}: {total * 1e3:.1f} us of GPU time summed", flush=True)


def profile_layer(B, TK, HQ, H, D, steps=20, options: KernelOptions = DEFAULT_OPTIONS) -> list[dict]:
    """GPU time per kernel of the sparse decode step (selection + attention from block means), torch.profiler."""
    from profiling import kernel_times

    q, k, v, means = layer_inputs(B, TK, HQ, H, D)
    step = partial(ops.sparse_attention, q, k, v, block_means=means, backend="triton", kernel_options=options, **SEL)
    with torch.no_grad():
        step()
        torch.cuda.synchronize()
        rows = kernel_times(step, steps)
    print(f"profile B={B} TK={TK} (HQ, H, D)=({HQ}, {H}, {D}):")
    for r in rows[:8]:
        print(f"  {r['us_per_step']:8.1f} us  x{r['calls_per_step']:.0f}  {r['kernel']}")
    return rows


def bench_generate(
    rec: Recorder,
    B,
    TK,
    HQ,
    H,
    D,
    layers,
    new_tokens,
    model_path=None,
    cprofile=False,
    impls=("generate",),
    baseline=False,
    rounds=3,
):
    """baseline: also time the unconverted model (mode "unconverted": SDPA and transformers' own caches) in each
    impl but static_generate, before converting it. `model_path`: a real model of this (HQ, H, D) shape (all its layers) instead of the random `layers`-layer one
    (a folder with config.json alone: that architecture with random weights). cprofile: print the host profile of
    one sparse and one full call instead of timing. impls: "generate" (eager, an SSACache), "hf_static"
    (`generate(cache_implementation="static")`: HF's static cache with the block means beside it, the decode step
    compiled by transformers) and / or "static_generate" (our static cache, each step replayed from a CUDA graph)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessorList

    import ssa_adapt

    weights = model_path and any(Path(model_path).glob("*.safetensors"))
    if model_path:
        config = AutoConfig.from_pretrained(model_path)
        config.max_position_embeddings = max(config.max_position_embeddings, TK + new_tokens + 16)
        layers = config.num_hidden_layers
        if weights:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, config=config, attn_implementation="sdpa", dtype=torch.bfloat16
            )
        else:  # a folder with config.json alone: the real architecture with random weights (same speed)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    else:
        model = random_model(TK + new_tokens + 16, HQ, H, D, layers)
    model = model.cuda().eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (B, TK), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    mask = torch.ones_like(prompt)
    name = Path(model_path).name if model_path else f"random Llama, {layers} layers"
    if model_path and not weights:
        name += " (its config, random weights)"

    def run(n, **kwargs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                **kwargs,
            )  # fmt: skip
        torch.cuda.synchronize()
        assert out.shape[1] == TK + n
        return time.perf_counter() - t0

    if cprofile:  # host time of a sparse and a full generate call by function (decode is launch-bound)
        import cProfile
        import pstats

        model = ssa_adapt.convert(model, ssa_adapt.SSAConfig(**SEL))
        for mode in ("sparse", "full"):
            ssa_adapt.set_inference(model, mode)
            run(2)
            prof = cProfile.Profile()
            # the profile starts at the first token's logits processor call, so the prefill (whose GPU time the
            # first host sync would absorb) stays out of it; the decode steps after it are all in
            run(new_tokens, logits_processor=LogitsProcessorList([ProfileFromFirstStep(prof)]))
            prof.disable()
            print(f"cProfile generate {mode} B={B} TK={TK} ({HQ}, {H}, {D}), {new_tokens - 1} decode steps:")
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return

    def run_static(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = ssa_adapt.static_generate(model, prompt, mask, max_new_tokens=n)
        torch.cuda.synchronize()
        assert out.shape[1] == TK + n
        return time.perf_counter() - t0

    def eager_rows(variants):
        """Eager `generate` of each variant (meta, setup) in turn, `rounds` times over (so that the host's drift
        reaches every variant alike), after a short warm-up call each (Triton compiles at the first steps): one
        row per variant, its steps pooled over the rounds."""
        for _, setup in variants:
            setup()
            run(4)
        gaps = [[] for _ in variants]
        calls = [[] for _ in variants]
        for _ in range(rounds):
            for i, (_, setup) in enumerate(variants):
                setup()
                clock = StepClock()
                seconds = run(new_tokens, logits_processor=LogitsProcessorList([clock]))
                gaps[i] += clock.gaps_ms()
                calls[i].append((clock.median_step_ms(), seconds))
        for (meta, _), g, c in zip(variants, gaps, calls):
            g = sorted(g)
            step = statistics.median(g)
            rec.add(impl="generate", new_tokens=new_tokens, rounds=rounds, step_ms=step,
                    decode_tokens_per_s=B * 1e3 / step, step_ms_p10_p90=[g[len(g) // 10], g[-1 - len(g) // 10]],
                    step_ms_per_call=[m for m, _ in c], seconds_per_call=[t for _, t in c], **meta)  # fmt: skip

    def setter(mode, kernel_options):
        def setup():
            ssa_adapt.set_inference(model, mode)
            ssa_adapt.set_kernel_options(model, kernel_options)

        return setup

    def meta_of(mode, **extra):
        return dict(
            kind="generate", mode=mode, model=name, HQ=HQ, H=H, D=D, context=TK, batch=B, layers=layers, **extra
        )

    # the unconverted model first (SDPA, transformers' own caches): the baseline of each generate path
    modes = (["unconverted"] if baseline else []) + ["sparse", "full"]
    for mode in modes:
        if mode == "sparse":
            torch._dynamo.reset()  # transformers keeps its compiled step on the model: compile the converted one anew
            if hasattr(model, "_compiled_call"):
                del model._compiled_call
            model = ssa_adapt.convert(model, ssa_adapt.SSAConfig(**SEL))
        if "generate" in impls and mode != "full":  # full mode's eager rows run interleaved with sparse mode's
            if mode == "unconverted":
                variants = [(meta_of(mode), lambda: None)]
            else:
                # sparse with both step launches (kept compiled kernel / Triton's launcher), and full mode
                other = KernelOptions(decode=dataclasses.replace(
                    DEFAULT_OPTIONS.decode, cached_launch=not DEFAULT_OPTIONS.decode.cached_launch))  # fmt: skip
                variants = [
                    (meta_of("sparse", cached_launch=o.decode.cached_launch), setter("sparse", o))
                    for o in (DEFAULT_OPTIONS, other)
                ] + [(meta_of("full", cached_launch=DEFAULT_OPTIONS.decode.cached_launch), setter("full", None))]
            try:
                eager_rows(variants)
            except Exception as e:
                rec.add(impl="generate", note=f"{type(e).__name__}: {str(e)[:160]}", **meta_of(mode))
            torch.cuda.empty_cache()
        for impl in impls:
            if impl == "generate" or (mode == "unconverted" and impl == "static_generate"):
                continue  # eager rows above; static_generate needs a converted model
            meta = meta_of(mode)
            try:
                if mode != "unconverted":
                    ssa_adapt.set_inference(model, mode)
                    ssa_adapt.set_kernel_options(model, None)
                    meta["cached_launch"] = DEFAULT_OPTIONS.decode.cached_launch
                if impl == "hf_static":  # the longest call first: the shorter ones reuse its cache (no recompile)
                    # Each call builds a fresh static cache (transformers does, for the unconverted model too), so
                    # its first decode steps may record CUDA graphs again: the base is t(4), as static_generate's t(3)
                    t_compile = run(new_tokens, cache_implementation="static")
                    t1 = min(run(4, cache_implementation="static") for _ in range(2))
                    clocks = [StepClock(), StepClock()]
                    tn = min(run(new_tokens, cache_implementation="static", logits_processor=LogitsProcessorList([c]))
                             for c in clocks)  # fmt: skip
                    meta["decode_tokens_per_s_ends"] = B * (new_tokens - 4) / max(tn - t1, 1e-9)
                    fast = min(clocks, key=StepClock.median_step_ms)
                    meta["step_ms"] = fast.median_step_ms()
                    meta["step_gaps_ms"] = fast.gaps_ms()  # every step of that call, in order (slow steps show)
                    rate = B * 1e3 / meta["step_ms"]
                    meta["first_call_s"] = t_compile
                else:  # static_generate: steps 2.. replay the graph captured at step 2; t(3) holds the capture
                    run_static(4)
                    t1 = min(run_static(3) for _ in range(2))
                    tn = min(run_static(new_tokens) for _ in range(2))
                    rate = B * (new_tokens - 3) / max(tn - t1, 1e-9)
                rec.add(impl=impl, new_tokens=new_tokens, seconds_1=t1, seconds_n=tn, decode_tokens_per_s=rate, **meta)
            except Exception as e:
                rec.add(impl=impl, note=f"{type(e).__name__}: {str(e)[:160]}", **meta)
            torch.cuda.empty_cache()


class ProfileFromFirstStep:
    """A logits processor that enables a cProfile.Profile at its first call (the end of the prefill)."""

    def __init__(self, prof):
        self.prof, self.started = prof, False

    def __call__(self, input_ids, scores):
        if not self.started:
            self.started = True
            self.prof.enable()
        return scores


class StepClock:
    """A logits processor that only notes the time: `generate` calls it once per new token, after that step's
    forward, and waits for the GPU every step (its stopping check), so the gaps between calls are decode steps
    (prefill excluded)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores

    def gaps_ms(self) -> list[float]:
        """The decode steps' times in order, ms."""
        return [(b - a) * 1e3 for a, b in zip(self.times, self.times[1:])]

    def median_step_ms(self) -> float:
        gaps = sorted(self.gaps_ms())
        return gaps[len(gaps) // 2] if gaps else float("nan")


def random_model(max_positions, HQ, H, D, layers):
    """A random bf16 Llama of the shape: hidden HQ * D, MLP 4x, vocab 32000, tied embeddings."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=HQ * D,
        intermediate_size=4 * HQ * D,
        num_hidden_layers=layers,
        num_attention_heads=HQ,
        num_key_value_heads=H,
        head_dim=D,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)


def model_for(path, shape):
    """`path` if the model there has attention of this (HQ, H, D) shape, else None."""
    if not path:
        return None
    cfg = json.loads((Path(path) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    own = (heads, cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // heads)
    return path if own == tuple(shape) else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="default: benchmarks/results/decode-<card>.json")
    p.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    p.add_argument("--batch", type=int, nargs="+", default=BATCHES)
    p.add_argument("--shapes", nargs="+", type=head_shape, default=list(SHAPES), help="HQ,H,D ...")
    p.add_argument("--layers", type=int, default=4, help="layers of the random generate models")
    p.add_argument(
        "--model", default=None, help="a real model folder (e.g. SmolLM2) for the generate rows of its shape"
    )
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument(
        "--rounds", type=int, default=3, help="eager generate: calls per variant, the variants taking turns"
    )
    p.add_argument(
        "--generate-impls",
        nargs="+",
        default=["generate", "hf_static", "static_generate"],
        choices=["generate", "hf_static", "static_generate"],
    )
    p.add_argument(
        "--baseline", action="store_true", help="also time the unconverted model's generate / HF static cache paths"
    )
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no new size after this")
    p.add_argument("--profile", action="store_true", help="only print per-kernel GPU times of the decode step")
    p.add_argument("--commit", default=None, help="the commit measured (default: $SSA_ADAPT_COMMIT, else git here)")
    p.add_argument(
        "--cprofile",
        action="store_true",
        help="only print host profiles of generate's decode steps (first shape, context, batch)",
    )
    p.add_argument(
        "--sweep", action="store_true", help="first pick the decode kernel settings at 128k (SWEEP_VARIANTS)"
    )
    p.add_argument(
        "--step-sweep", action="store_true", help="only time the one-launch step's variants (STEP_VARIANTS)"
    )
    args = p.parse_args()
    args.out = result_path("decode", args.out)
    sweep_rows, options = sweep_settings(args) if args.sweep else ([], DEFAULT_OPTIONS)
    if args.profile:
        shapes = args.shapes
        out = {f"B{B}-TK{TK}-{HQ},{H},{D}": profile_layer(B, TK, HQ, H, D, options=options) for HQ, H, D in shapes
               for TK in args.contexts for B in args.batch}  # fmt: skip
        Path(args.out).write_text(json.dumps(out, indent=1))
        return
    if args.cprofile:
        shape = args.shapes[0]
        model = model_for(args.model, shape)
        bench_generate(None, args.batch[0], args.contexts[0], *shape, args.layers, args.new_tokens, model, True)
        return
    t0 = time.time()
    meta = dict(
        command="python " + " ".join(sys.argv),
        commit=git_commit(args.commit),
        device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        decode_options=dataclasses.asdict(options.decode),  # the layer rows'; generate runs the defaults
    )
    rec = Recorder(Path(args.out), meta)
    for row in sweep_rows:
        rec.add(**row)
    if args.step_sweep:
        step_sweep(args, rec)
        return
    shapes = args.shapes
    jobs = []
    if not args.skip_layer:
        jobs += [
            (bench_layer, (B, TK, *shape, options)) for shape in shapes for TK in args.contexts for B in args.batch
        ]
    if not args.skip_generate:
        jobs += [
            (
                bench_generate,
                (
                    B,
                    TK,
                    *shape,
                    args.layers,
                    args.new_tokens,
                    model_for(args.model, shape),
                    False,
                    tuple(args.generate_impls),
                    args.baseline,
                    args.rounds,
                ),
            )  # fmt: skip
            for shape in shapes
            for TK in args.contexts
            for B in args.batch
        ]
    for fn, a in jobs:
        if time.time() - t0 > args.budget_s:
            print(f"budget reached: {fn.__name__}{a} not run", flush=True)
            continue
        try:
            fn(rec, *a)  # its tensors and model are freed on return
        except torch.cuda.OutOfMemoryError:
            rec.add(kind=fn.__name__, args=list(a), note="out of memory")
        torch.cuda.empty_cache()
    print(f"total {time.time() - t0:.0f} s, {len(rec.rows)} rows in {args.out}", flush=True)


if __name__ == "__main__":
    main()
