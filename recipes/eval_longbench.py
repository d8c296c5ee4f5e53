"""LongBench through lm-eval's own tasks, greedy decoding, for one setup. Needs the Hugging Face Hub (its data is
the dataset Xnhyacinth/LongBench); offline it stops at once with LongBenchUnavailable and what to do.

    python recipes/eval_longbench.py --model PATH --setup sparse-16x16-sink1 --tasks longbench --max_length 32768
    python recipes/eval_longbench.py --tasks longbench_qasper,longbench_hotpotqa --limit 50

The same from lm-eval's CLI: python -m ssa_adapt.eval.lm_eval_cli --model ssa \\
    --model_args pretrained=PATH,inference_mode=sparse,max_length=32768 --tasks longbench --gen_kwargs do_sample=False
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from ssa_adapt.eval import apply_setup, load_model
from ssa_adapt.eval.harness import check_longbench_available, longbench
from ssa_adapt.eval.setups import parse_setup


@dataclass
class Args:
    model: str | None = field(
        default=None, metadata={"help": "Checkpoint; default SmolLM2-135M-Instruct (Q4_1 asset)."}
    )
    setup: str = field(default="sparse-16x16-sink1", metadata={"help": "One setup."})
    tasks: list[str] = field(default_factory=lambda: ["longbench"], metadata={"help": "LongBench group or tasks."})
    limit: int | None = field(default=None, metadata={"help": "Items per task."})
    max_length: int = field(default=32768, metadata={"help": "Prompt length lm-eval truncates to (left)."})
    rope_scaling_factor: float | None = field(default=None, metadata={"help": "llama3 RoPE scaling factor."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="bfloat16", metadata={"help": "Model dtype."})
    out: str | None = field(default=None, metadata={"help": "Write lm-eval's results JSON here."})


def main(args: Args) -> None:
    check_longbench_available()  # before loading anything
    from ssa_adapt.eval.lm_eval_model import SSALM

    model, tok = load_model(
        args.model, dtype=args.dtype, device=args.device, rope_scaling_factor=args.rope_scaling_factor
    )
    apply_setup(model, parse_setup(args.setup))
    lm = SSALM(pretrained=model, tokenizer=tok, batch_size=1, max_length=args.max_length)
    results = longbench(lm, args.tasks, limit=args.limit)
    for task, metrics in results.items():
        print(task, {k: v for k, v in metrics.items() if isinstance(v, float)})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
