"""Held-out perplexity (Jane Austen) at several context lengths, for each setup, with optional RoPE scaling.

    python recipes/eval_perplexity.py --lengths 2048 8192 --setups original sparse-16x16-sink1
    python recipes/eval_perplexity.py --model PATH --lengths 16384 32768 --span 32768 \\
        --rope_scaling_factor 4 --setups full sparse-16x16-sink1 --device cuda

Every length scores the same first --span tokens of each novel (non-overlapping windows from an empty context).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from ssa_adapt.eval import apply_setup, austen_windows, load_model, parse_setups, perplexity


@dataclass
class Args:
    model: str | None = field(
        default=None, metadata={"help": "Checkpoint; default SmolLM2-135M-Instruct (Q4_1 asset)."}
    )
    setups: list[str] = field(
        default_factory=lambda: ["original", "sparse-16x16-sink1"], metadata={"help": "Setups, in order."}
    )
    lengths: list[int] = field(default_factory=lambda: [2048, 8192], metadata={"help": "Context lengths."})
    span: int = field(default=8192, metadata={"help": "Tokens scored per novel; a multiple of every length."})
    novels: list[str] = field(default_factory=list, metadata={"help": "Austen titles; none given: all six."})
    rope_scaling_factor: float | None = field(default=None, metadata={"help": "llama3 RoPE scaling factor."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype."})
    out: str | None = field(default=None, metadata={"help": "Write the results JSON here."})


def main(args: Args) -> None:
    model, tok = load_model(
        args.model, dtype=args.dtype, device=args.device, rope_scaling_factor=args.rope_scaling_factor
    )
    windows = {n: austen_windows(tok, n, span=args.span, novels=args.novels or None) for n in args.lengths}
    results = {}
    for setup in parse_setups(args.setups):
        apply_setup(model, setup)
        for n in args.lengths:
            r = perplexity(model, windows[n].to(args.device), desc=f"{setup.name} @ {n}")
            results.setdefault(setup.name, {})[str(n)] = r.to_dict()
            print(f"{setup.label:28s} {n:6d} tokens: PPL {r.ppl:8.3f} ({r.windows} windows, {r.tokens} predictions)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
