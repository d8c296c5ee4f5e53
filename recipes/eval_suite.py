"""Evaluate one model under several attention setups: held-out perplexity, attention sparsity, benchmarks and
needle in a haystack -> one JSON and a markdown table (and a NIAH heatmap PNG).

    python recipes/eval_suite.py                       # SmolLM2-135M-Instruct (the Q4_1 asset), every stage
    python recipes/eval_suite.py --model PATH --setups original sparse-16x16-sink1 --stages ppl niah \\
        --out benchmarks/results/eval-mine.json --png docs/niah-mine.png
    python recipes/eval_suite.py --merge a.json b.json --out benchmarks/results/eval-smollm2.json

Setups: `original` (no SSA), `full` (converted, full stream), `sparse-<BS>x<BC>[-sink<n>][-local<n>]`.
Stages (`ssa_adapt.eval.stages`): ppl (held-out Jane Austen windows), sparsity (AttnSparsity, dropped mass and
Theorem 1 per layer and head under each sparse budget, on the model's own full attention), benchmarks (lm-eval on
the offline tasks; a sparse setup whose receptive field holds every request reuses the full scores, marked *),
niah (needle in the Paul Graham essays, heatmap PNG), ruler (lm-eval's RULER niah_single_1). Partial runs (say
long-context stages on a GPU, benchmarks on a CPU) merge with --merge into one report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ssa_adapt.eval import load_model, plot_niah_heatmaps
from ssa_adapt.eval.report import merge_results, run_info, write_report
from ssa_adapt.eval.stages import EvalPlan, new_result, run_evaluation


@dataclass
class SuiteArgs:
    model: str | None = field(
        default=None, metadata={"help": "Checkpoint or Hub id; default SmolLM2-135M-Instruct (Q4_1 asset)."}
    )
    rope_scaling_factor: float | None = field(default=None, metadata={"help": "llama3 RoPE scaling factor."})
    out: str = field(default="benchmarks/results/eval-smollm2.json", metadata={"help": "Report JSON (.md beside)."})
    png: str = field(default="docs/niah-smollm2.png", metadata={"help": "NIAH heatmap PNG."})
    merge: list[str] = field(default_factory=list, metadata={"help": "Merge these report JSONs into --out."})
    note: list[str] = field(default_factory=list, metadata={"help": "Notes to add to the report (with --merge)."})


def main(args: SuiteArgs, plan: EvalPlan) -> None:
    md = str(Path(args.out).with_suffix(".md"))
    if args.merge:
        result = merge_results(*[json.loads(Path(p).read_text()) for p in args.merge])
        result["notes"] += [n for n in args.note if n not in result["notes"]]
        print(write_report(result, args.out, md))
        return
    name = args.model or "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)"
    result = new_result(name, plan)
    result["settings"]["rope_scaling_factor"] = args.rope_scaling_factor

    def load():
        return load_model(
            args.model, dtype=plan.dtype, device=plan.device, rope_scaling_factor=args.rope_scaling_factor
        )

    done: list[str] = []  # the units finished, with their seconds

    def save(result: dict, finished: list[str]) -> None:
        done[:] = finished
        print(write_report({**result, "runs": [run_info(done, plan.device)]}, args.out, md))

    run_evaluation(plan, result, load, save)
    if "niah" in plan.stages:
        panels = {s["label"]: s["niah"] for s in result["setups"].values() if "niah" in s}
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        plot_niah_heatmaps(panels, args.png, title=f"Needle in a haystack: {Path(name).name}")
        result["settings"]["niah"]["png"] = args.png
        save(result, done)


if __name__ == "__main__":
    main(*HfArgumentParser((SuiteArgs, EvalPlan)).parse_args_into_dataclasses())
