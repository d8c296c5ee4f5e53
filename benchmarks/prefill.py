"""Model-level prefill: a converted model in sparse mode against the unconverted model on SDPA cuDNN.

    python benchmarks/prefill.py      # -> benchmarks/results/prefill-<card>.{json,md}

A random-weight bf16 Llama of Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads, 8 KV heads, head_dim 64,
MLP 8192, vocab 128256, tied embeddings, rope_theta 5e5) prefills one row of T tokens with a KV cache, keeping only
the last position's logits (`logits_to_keep=1`), as a serving prefill does: `unconverted` is the model as loaded
(SDPA forced to cuDNN), `ssa_sparse` the same weights after `ssa_adapt.convert` (16 x 16 blocks, one sink; the cache
is an `SSACache`, so the block means for decoding are built too). Milliseconds per prefill: CUDA events, the median
of `--reps` runs after one warm-up; peak memory of one prefill.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_info import git_commit, result_path  # noqa: E402  (benchmarks/ is on the path of its scripts)

import ssa_adapt  # noqa: E402

GIB = 2**30


def llama_1b_shape(max_positions: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=max_positions,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).cuda().eval()


def time_prefill(model, ids: torch.Tensor, reps: int) -> tuple[float, float]:
    """-> (median ms, peak GiB) of model(ids, use_cache=True, logits_to_keep=1)."""

    def once():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

    once()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="default: benchmarks/results/prefill-<card>.json")
    p.add_argument("--md", default=None, help="default: benchmarks/results/prefill-<card>.md")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse here)")
    a = p.parse_args()
    a.out, a.md = result_path("prefill", a.out), result_path("prefill", a.md, ".md")
    if not torch.cuda.is_available():
        sys.exit("prefill.py needs a CUDA device.")
    commit = git_commit(a.commit)
    result = dict(
        benchmark="model-level prefill, Llama-3.2-1B shape (random weights)",
        command="python " + " ".join(sys.argv),
        device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
        torch=torch.__version__,
        rows=[],
    )
    model = llama_1b_shape(max(a.T) + 16)
    for mode in ("unconverted", "ssa_sparse"):
        if mode == "ssa_sparse":
            model = ssa_adapt.convert(model, ssa_adapt.SSAConfig(block_size=16, block_count=16, sink_blocks=1))
            ssa_adapt.set_inference(model, "sparse")
        for T in a.T:
            ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda", generator=None)
            row = dict(impl=mode, T=T)
            try:
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    row["ms"], row["peak_gib"] = time_prefill(model, ids, a.reps)
            except torch.cuda.OutOfMemoryError:
                row["note"] = "out of memory"
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    by = {(r["impl"], r["T"]): r for r in result["rows"]}
    lines = [
        "# Prefill, Llama-3.2-1B shape (random weights)",
        "",
        f"{result['device']}, {result['date']}, commit {commit}, torch {result['torch']}, bf16, batch 1, "
        "KV cache on, last-position logits only.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| T | unconverted, SDPA cuDNN: ms / peak GiB | converted, sparse 16 x 16: ms / peak GiB | speedup |",
        "|---|---|---|---|",
    ]
    for T in a.T:
        u, s = by.get(("unconverted", T), {}), by.get(("ssa_sparse", T), {})
        cell = lambda r: f"{r['ms']:.1f} / {r['peak_gib']:.1f}" if "ms" in r else r.get("note", "-")  # noqa: E731
        speed = f"{u['ms'] / s['ms']:.2f}x" if "ms" in u and "ms" in s else "-"
        lines.append(f"| {T // 1024}k | {cell(u)} | {cell(s)} | {speed} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(a.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
