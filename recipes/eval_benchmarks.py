"""Benchmarks through lm-eval for each setup of one loaded model (local offline tasks by default).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python recipes/eval_benchmarks.py \\
        --setups original sparse-16x16-sink1 --tasks ssa_hellaswag ssa_piqa ssa_arc_easy ssa_arc_challenge

A sparse setup whose receptive field holds every request of a task reuses the full-attention scores (equal by
construction) after re-running --check items sparse. The same from lm-eval's CLI, one setup per run:

    python -m ssa_adapt.eval.lm_eval_cli --model ssa \\
        --model_args pretrained=PATH,inference_mode=sparse,block_size=16,block_count=16,sink_blocks=1 \\
        --include_path "$(python -c 'from ssa_adapt.assets import benchmark_tasks; print(benchmark_tasks())')" \\
        --tasks ssa_hellaswag,ssa_piqa --batch_size 16
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from ssa_adapt.assets import benchmark_tasks
from ssa_adapt.eval import load_model, parse_setups
from ssa_adapt.eval.harness import benchmarks_for_setups
from ssa_adapt.eval.stages import REPORT_TASKS


@dataclass
class Args:
    model: str | None = field(
        default=None, metadata={"help": "Checkpoint; default SmolLM2-135M-Instruct (Q4_1 asset)."}
    )
    setups: list[str] = field(
        default_factory=lambda: ["original", "sparse-16x16-sink1"], metadata={"help": "Setups, in order."}
    )
    tasks: list[str] = field(default_factory=lambda: list(REPORT_TASKS), metadata={"help": "lm-eval tasks."})
    limit: int | None = field(default=None, metadata={"help": "Items per task; None = all."})
    batch_size: int = field(default=16, metadata={"help": "lm-eval batch size."})
    check: int = field(default=50, metadata={"help": "Items re-run sparse before reusing full scores."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype."})
    out: str | None = field(default=None, metadata={"help": "Write the scores JSON here."})


def main(args: Args) -> None:
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    scores = benchmarks_for_setups(
        model,
        tok,
        parse_setups(args.setups),
        args.tasks,
        include_path=benchmark_tasks(),
        limit=args.limit,
        batch_size=args.batch_size,
        check_items=args.check,
    )
    for setup, per_task in scores.items():
        print(setup, {t: round(s.get("acc_norm", s.get("acc", float("nan"))), 4) for t, s in per_task.items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(scores, f, indent=1)


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
