"""Where an eager decode step's time goes, sparse against full mode: SmolLM2-135M's architecture (random weights,
bf16) converted to SSA, a prompt of `--context` tokens prefilled into an `SSACache`, then greedy single-token steps
of `model(...)` (what `generate()` runs per token, without its bookkeeping).

    python benchmarks/decode_profile.py --context 131072 --batch 1

Prints milliseconds per step (the median of `--repeats` runs, the modes alternating) with and without the
growing attention mask (`--timing-only`: nothing else), then
torch.profiler tables (CUDA and CPU time per op) and cProfile's view of the Python (our host code and Triton's
launcher). It writes no results file:
it is a profile, and its figures go into the README's prose with card, date and commit.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ssa_adapt  # noqa: E402
from ssa_adapt.compat import cache_kwargs  # noqa: E402
from ssa_adapt.decoding import SSACache  # noqa: E402

VOCAB = 49152


def smollm2_shaped(context: int, device: str):
    """A converted model of SmolLM2-135M's shape (30 layers, 9 / 3 heads of 64) with random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      max_position_embeddings=context + 256, rope_theta=100000.0, tie_word_embeddings=True,
                      rms_norm_eps=1e-5)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    model = model.to(device).eval()
    return ssa_adapt.convert(model, ssa_adapt.SSAConfig(block_size=16, block_count=16, sink_blocks=1))


def steps(model, prompt, mode: str, n: int, use_mask: bool = True, profiler=None, pad_step: int = 0) -> float:
    """Prefill `prompt` [B, TK], then time n decode steps -> ms per step (the profiler, if any, wraps the steps).
    pad_step: row i's first `i * pad_step` tokens are left padding (a batch of prompts of different lengths, as
    `generate()` pads them; their rows then complete their key blocks at different steps)."""
    ssa_adapt.set_inference(model, mode)
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    cache = SSACache(config=model.config)
    B = prompt.shape[0]
    pad = (
        torch.arange(prompt.shape[1], device=prompt.device)[None]
        < pad_step * torch.arange(B, device=prompt.device)[:, None]
    )
    mask = (~pad).long()
    with torch.no_grad():
        out = model(prompt, attention_mask=mask if use_mask else None, **cache_kwargs(cache), use_cache=True,
                    logits_to_keep=1)  # fmt: skip
        tok = out.logits[:, -1:].argmax(-1)
        sync()
        with profiler if profiler is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            for _ in range(n):
                if use_mask:
                    mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
                out = model(tok, attention_mask=mask if use_mask else None, **cache_kwargs(cache), use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            sync()
    return (time.perf_counter() - t0) / n * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=131072, help="prompt tokens per row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per configuration")
    p.add_argument("--timing-only", action="store_true", help="print the milliseconds per step, no profiles")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode and mask setting (median printed)")
    p.add_argument(
        "--pad-step", type=int, default=0, help="row i is left-padded by i * PAD_STEP tokens (needs the mask)"
    )
    args = p.parse_args()
    if args.context < 32 or args.batch < 1 or args.steps < 1 or args.repeats < 1:
        raise SystemExit(
            f"--context >= 32, --batch >= 1, --steps >= 1, --repeats >= 1; got {args.context}, {args.batch}, "
            f"{args.steps}, {args.repeats}"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = smollm2_shaped(args.context, device)
    prompt = torch.randint(0, VOCAB, (args.batch, args.context), device=device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, context {args.context}, batch {args.batch}, left padding {args.pad_step} x row", flush=True)
    pad = dict(pad_step=args.pad_step)
    for mode in ("sparse", "full"):
        # warm-up as long as a timed run: compilation, and the allocator's pool for the growing KV cache (a 4-step
        # warm-up left the first timed run 1.5-5x slower than the second on the H100, 2026-12-07)
        steps(model, prompt, mode, args.steps, **pad)
    # the modes alternate within each repeat, so that a slow phase of the machine hits both; single runs on the H100
    # host varied by up to 1.5x between settings that cost the same (2026-12-07)
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):
        for mode in ("sparse", "full"):
            for use_mask in (False, True) if not args.pad_step else (True,):
                times.setdefault((mode, use_mask), []).append(steps(model, prompt, mode, args.steps, use_mask, **pad))
    for (mode, use_mask), ms in times.items():
        runs = " ".join(f"{t:.2f}" for t in ms)
        print(f"{mode}, attention_mask={use_mask}: {statistics.median(ms):.2f} ms per step (median; runs {runs})")
    if args.timing_only:
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for mode in ("sparse", "full"):
        prof = profile(activities=activities)
        ms = steps(model, prompt, mode, 8, profiler=prof, **pad)
        table = prof.key_averages()
        print(f"\n== torch.profiler, {mode}: {ms:.2f} ms per step (profiled, mask on)")
        if device == "cuda":
            print(table.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
        print(table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
    for mode in ("sparse", "full"):
        pr = cProfile.Profile()
        pr.enable()
        ms = steps(model, prompt, mode, 16, **pad)
        pr.disable()
        print(f"\n== cProfile, {mode}: {ms:.2f} ms per step under cProfile (prefill included in the profile)")
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        pstats.Stats(pr).sort_stats("cumulative").print_stats("ssa_adapt|triton/runtime", 30)


if __name__ == "__main__":
    main()
