"""Evaluate one model under several attention setups: held-out perplexity, attention sparsity, benchmarks and
needle in a haystack -> one JSON and a markdown table (and a NIAH heatmap PNG).

    python recipes/eval_suite.py                       # SmolLM2-135M, the issue's report, every stage
    python recipes/eval_suite.py --model PATH --setups original,sparse-16x16-sink1 --stages ppl,niah \\
        --out benchmarks/results/eval-mine.json --png docs/niah-mine.png
    python recipes/eval_suite.py --merge a.json b.json --out benchmarks/results/eval-smollm2.json

Setups: `original` (no SSA), `full` (converted, full stream), `sparse-<BS>x<BC>[-sink<n>][-local<n>]`.
Stages (--stages, comma-separated):
  ppl         held-out Jane Austen, the same first --ppl_span tokens of each novel cut into --ppl_lengths windows
  sparsity    AttnSparsity, dropped mass and Theorem 1 per layer and head, on the original model's activations
              (what the converted model computes in full mode) under each sparse setup's budget
  benchmarks  lm-eval on the offline tasks of ssa_adapt.assets.benchmark_tasks(). A sparse setup whose receptive
              field holds every request of a task scores it exactly as full attention does (SPEC section 1): it
              reuses the full-attention scores (marked *) and --benchmark_check items per task re-run to confirm
  niah        needle in the Paul Graham essays at --niah_lengths x --niah_depths, greedy decoding, heatmap PNG
  ruler       lm-eval's RULER niah_single_1 at --ruler_lengths (4096 and up), --ruler_limit prompts per length
Partial runs (say long-context stages on a GPU, benchmarks on a CPU) merge with --merge into one report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from ssa_adapt.assets import austen_texts
from ssa_adapt.eval import (
    Budget,
    apply_setup,
    attention_statistics,
    austen_windows,
    load_model,
    parse_setups,
    perplexity,
    plot_niah_heatmaps,
    run_niah,
)
from ssa_adapt.eval.niah import NIAHResult, essay_haystack_ids
from ssa_adapt.eval.report import merge_results, run_info, write_report

REPORT_SETUPS = "original,sparse-16x16-sink1,sparse-16x16-sink0,sparse-16x64-sink1"
REPORT_TASKS = "ssa_hellaswag,ssa_piqa,ssa_arc_easy,ssa_arc_challenge"


@dataclass
class SuiteArgs:
    model: str | None = field(default=None, metadata={"help": "Checkpoint folder or Hub id; default SmolLM2-135M."})
    setups: str = field(default=REPORT_SETUPS, metadata={"help": "Comma-separated setups, evaluated in order."})
    stages: str = field(default="ppl,sparsity,benchmarks,niah", metadata={"help": "Comma-separated stages."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16, float16."})
    backend: str = field(default="auto", metadata={"help": "SSA kernels: auto, reference, triton, fla."})
    rope_scaling_factor: float | None = field(default=None, metadata={"help": "llama3 RoPE scaling factor."})
    ppl_lengths: str = field(default="2048,8192", metadata={"help": "Perplexity context lengths."})
    ppl_span: int = field(default=8192, metadata={"help": "Tokens scored per novel (multiple of every length)."})
    ppl_novels: str = field(default="", metadata={"help": "Comma-separated Austen titles; empty = all six."})
    sparsity_len: int = field(default=8192, metadata={"help": "Window length of the attention statistics."})
    sparsity_windows: int = field(default=2, metadata={"help": "Windows (one per novel) for the statistics."})
    tasks: str = field(default=REPORT_TASKS, metadata={"help": "lm-eval tasks (local ssa_* or any name)."})
    limit: int | None = field(default=None, metadata={"help": "Items per benchmark task; None = all."})
    task_limits: str = field(default="", metadata={"help": "Per-task items, e.g. ssa_hellaswag=1000 (overrides)."})
    batch_size: int = field(default=16, metadata={"help": "lm-eval batch size."})
    benchmark_check: int = field(default=50, metadata={"help": "Items per task re-run to confirm a reuse."})
    niah_lengths: str = field(default="2048,4096,8192", metadata={"help": "NIAH context lengths."})
    niah_depths: str = field(default="0,0.25,0.5,0.75,1", metadata={"help": "NIAH needle depths."})
    niah_samples: int = field(default=1, metadata={"help": "Prompts per (length, depth) cell."})
    ruler_lengths: str = field(default="4096,8192", metadata={"help": "RULER lengths (>= 4096)."})
    ruler_limit: int = field(default=20, metadata={"help": "RULER prompts per length."})
    time_budget_s: float | None = field(default=None, metadata={"help": "Skip what would start after this."})
    out: str = field(default="benchmarks/results/eval-smollm2.json", metadata={"help": "Report JSON (.md beside)."})
    png: str = field(default="docs/niah-smollm2.png", metadata={"help": "NIAH heatmap PNG."})
    merge: list[str] = field(default_factory=list, metadata={"help": "Merge these report JSONs into --out."})
    note: list[str] = field(default_factory=list, metadata={"help": "Notes to add to the report (with --merge)."})


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(args: SuiteArgs) -> None:
    out_md = str(Path(args.out).with_suffix(".md"))
    if args.merge:
        result = merge_results(*[json.loads(Path(p).read_text()) for p in args.merge])
        result["notes"] += [n for n in args.note if n not in result["notes"]]
        print(write_report(result, args.out, out_md))
        return
    setups, stages = parse_setups(args.setups), [s for s in args.stages.split(",") if s]
    t_start = time.monotonic()
    late = lambda: args.time_budget_s is not None and time.monotonic() - t_start > args.time_budget_s  # noqa: E731
    model, tok = load_model(
        args.model, dtype=args.dtype, device=args.device, rope_scaling_factor=args.rope_scaling_factor
    )
    name = args.model or "SmolLM2-135M-Instruct"
    done: list[str] = []
    result = {
        "model": name,
        "runs": [],
        "settings": {"dtype": args.dtype, "backend": args.backend, "rope_scaling_factor": args.rope_scaling_factor},
        "setups": {s.name: {"label": s.label, "mode": s.mode} for s in setups},
        "notes": [],
    }

    def save(stage: str, seconds: float) -> None:
        done.append(f"{stage} ({seconds:.0f} s)")
        result["runs"] = [run_info(done, args.device)]
        print(write_report(result, args.out, out_md))

    if "ppl" in stages and not late():
        t0 = time.monotonic()
        novels = [n for n in args.ppl_novels.split(",") if n] or None
        windows = {n: austen_windows(tok, n, span=args.ppl_span, novels=novels) for n in _ints(args.ppl_lengths)}
        result["settings"]["ppl"] = {"span": args.ppl_span, "novels": novels or "all six"}
        for s in setups:
            apply_setup(model, s, backend=args.backend)
            for n, w in windows.items():
                if late():
                    break
                r = perplexity(model, w.to(args.device), desc=f"ppl {s.name} @ {n}")
                result["setups"][s.name].setdefault("ppl", {})[str(n)] = r.to_dict()
        save("ppl", time.monotonic() - t0)

    sparse = [s for s in setups if s.mode == "sparse"]
    if "sparsity" in stages and sparse and not late():
        t0 = time.monotonic()
        apply_setup(model, parse_setups("original")[0])
        novels = sorted(austen_texts())[: args.sparsity_windows]
        windows = austen_windows(tok, args.sparsity_len, span=args.sparsity_len, novels=novels)
        budgets: list[Budget] = list(dict.fromkeys(s.budget for s in sparse))
        stats = attention_statistics(model, windows, budgets, backend=args.backend)
        for s in sparse:
            result["setups"][s.name]["sparsity"] = stats[s.budget.name]
        result["settings"]["sparsity"] = {"context_len": args.sparsity_len, "novels": novels}
        save("sparsity", time.monotonic() - t0)

    if "benchmarks" in stages and not late():
        from ssa_adapt.assets import benchmark_tasks
        from ssa_adapt.eval.harness import record_benchmarks, task_limits

        t0 = time.monotonic()
        tasks = [t for t in args.tasks.split(",") if t]
        record_benchmarks(
            result,
            model,
            tok,
            setups,
            tasks,
            task_limits(tasks, args.limit, args.task_limits),
            include_path=benchmark_tasks(),
            batch_size=args.batch_size,
            check_items=args.benchmark_check,
            backend=args.backend,
        )
        save("benchmarks", time.monotonic() - t0)

    if "niah" in stages and not late():
        t0 = time.monotonic()
        hay = essay_haystack_ids(tok)
        depths = [float(d) for d in args.niah_depths.split(",")]
        for s in setups:
            apply_setup(model, s, backend=args.backend)
            merged = NIAHResult([], depths)
            for n in _ints(args.niah_lengths):
                if late():
                    break
                r = run_niah(
                    model,
                    tok,
                    [n],
                    depths,
                    samples_per_cell=args.niah_samples,
                    haystack_ids=hay,
                    desc=f"niah {s.name} @ {n}",
                )
                merged.context_lengths.append(n)
                merged.scores.update(r.scores)
                merged.samples += r.samples
            result["setups"][s.name]["niah"] = merged.to_dict()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        panels = {s.label: result["setups"][s.name]["niah"] for s in setups}
        plot_niah_heatmaps(panels, args.png, title=f"Needle in a haystack: {Path(name).name}")
        result["settings"]["niah"] = {"png": args.png, "samples_per_cell": args.niah_samples, "max_new_tokens": 12}
        save("niah", time.monotonic() - t0)

    if "ruler" in stages and not late():
        from ssa_adapt.assets import smollm2_path
        from ssa_adapt.eval.harness import ruler_niah
        from ssa_adapt.eval.lm_eval_model import HFLM

        t0 = time.monotonic()
        for s in setups:
            apply_setup(model, s, backend=args.backend)
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
            tokenizer_path = args.model or str(smollm2_path())
            scores = ruler_niah(lm, tokenizer_path, _ints(args.ruler_lengths), limit=args.ruler_limit)
            result["setups"][s.name]["ruler"] = scores
        save("ruler", time.monotonic() - t0)


if __name__ == "__main__":
    (suite_args,) = HfArgumentParser(SuiteArgs).parse_args_into_dataclasses()
    main(suite_args)
