"""Needle in a haystack (Paul Graham essays) for each setup, with a heatmap PNG; optionally lm-eval's RULER niah.

    python recipes/eval_niah.py --lengths 2048 4096 8192 --depths 0 0.25 0.5 0.75 1 \\
        --setups original sparse-16x16-sink1 sparse-16x16-sink0 --png docs/niah-smollm2.png
    python recipes/eval_niah.py --kinds single multikey multivalue --samples 40 --batch_size 8 \
        --lengths 4096 8192 16384 32768 --out niah.json           # keyed needles with Wilson intervals
    python recipes/eval_niah.py --ruler_lengths 4096 8192 --ruler_limit 20      # adds RULER niah_single_1
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from ssa_adapt.eval import apply_setup, load_model, parse_setups, plot_niah_heatmaps, run_niah
from ssa_adapt.eval.niah import essay_haystack_ids


@dataclass
class Args:
    model: str | None = field(
        default=None, metadata={"help": "Checkpoint; default SmolLM2-135M-Instruct (Q4_1 asset)."}
    )
    setups: list[str] = field(
        default_factory=lambda: ["original", "sparse-16x16-sink1"], metadata={"help": "Setups, in order."}
    )
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192], metadata={"help": "Context lengths."})
    depths: list[float] = field(default_factory=lambda: [0, 0.25, 0.5, 0.75, 1], metadata={"help": "Needle depths."})
    samples: int = field(default=1, metadata={"help": "Prompts per cell."})
    kinds: list[str] = field(
        default_factory=lambda: ["magic"],
        metadata={
            "help": "Needle kinds: magic (one unkeyed number), single, multikey, multivalue (keyed, RULER-style)."
        },
    )
    batch_size: int = field(default=1, metadata={"help": "Prompts per generate call."})
    ruler_lengths: list[int] = field(default_factory=list, metadata={"help": "RULER niah_single_1 at these too."})
    ruler_limit: int = field(default=20, metadata={"help": "RULER prompts per length."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype."})
    png: str = field(default="niah.png", metadata={"help": "Heatmap PNG."})
    out: str | None = field(default=None, metadata={"help": "Write the results JSON here."})


def main(args: Args) -> None:
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    hay = essay_haystack_ids(tok)
    setups, results = parse_setups(args.setups), {}
    for s in setups:
        apply_setup(model, s)
        results[s.name] = {}
        for kind in args.kinds:
            r = run_niah(model, tok, args.lengths, args.depths, samples_per_cell=args.samples, kind=kind,
                         batch_size=args.batch_size, haystack_ids=hay, desc=f"{s.name} {kind}")  # fmt: skip
            results[s.name][kind] = r.to_dict()
            print(s.label, kind, {k: round(v, 2) for k, v in r.by_length().items()})
        if args.ruler_lengths:
            from lm_eval.models.huggingface import HFLM

            from ssa_adapt.assets import smollm2_path
            from ssa_adapt.eval.harness import ruler_niah

            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
            results[s.name]["ruler"] = ruler_niah(
                lm, args.model or str(smollm2_path()), args.ruler_lengths, limit=args.ruler_limit
            )
            print("  RULER", results[s.name]["ruler"])
    panels = {f"{s.label}, {kind}" if len(args.kinds) > 1 else s.label: results[s.name][kind]
              for kind in args.kinds for s in setups}  # fmt: skip
    plot_niah_heatmaps(panels, args.png)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
