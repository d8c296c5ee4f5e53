"""Attention statistics per layer and head on real activations: AttnSparsity, dropped mass, Theorem 1.

    python recipes/eval_sparsity.py --budgets 16x16-sink1 16x16-sink0 16x64-sink1 --length 8192 --windows 2

The model runs as loaded (a plain model, or a converted one in --mode full / sparse); each budget's selection is
applied to the captured q, k, v. Prints per-layer means and writes every per-head number to --out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from ssa_adapt import get_controller, set_inference
from ssa_adapt.assets import austen_texts
from ssa_adapt.eval import attention_statistics, austen_windows, load_model, parse_setups


@dataclass
class Args:
    model: str | None = field(
        default=None, metadata={"help": "Checkpoint; default SmolLM2-135M-Instruct (Q4_1 asset)."}
    )
    budgets: list[str] = field(
        default_factory=lambda: ["16x16-sink1", "16x16-sink0", "16x64-sink1"],
        metadata={"help": "BSxBC[-sinkN][-localN]."},
    )
    length: int = field(default=8192, metadata={"help": "Window length."})
    windows: int = field(default=2, metadata={"help": "Windows, one per Austen novel."})
    layers: list[int] = field(default_factory=list, metadata={"help": "Layer indices to measure; none given: all."})
    mode: str = field(default="full", metadata={"help": "For a converted model: the stream it runs (full, sparse)."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype."})
    out: str | None = field(default=None, metadata={"help": "Write the statistics JSON here."})


def main(args: Args) -> None:
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if get_controller(model) is not None:
        set_inference(model, args.mode)
    budgets = [s.budget for s in parse_setups([f"sparse-{b}" for b in args.budgets])]
    novels = sorted(austen_texts())[: args.windows]
    windows = austen_windows(tok, args.length, span=args.length, novels=novels)
    stats = attention_statistics(model, windows, budgets, layers=args.layers or None)
    for name, s in stats.items():
        beyond = s["sparsity_beyond_rf"]
        print(
            f"{name}: AttnSparsity {s['sparsity']:.4f} (beyond the receptive field "
            f"{'n/a' if beyond is None else f'{beyond:.4f}'}), Theorem 1 violated {s['bound_violations']} / "
            f"{s['bound_checks']}, max err/bound {s['bound_max_ratio']:.3f}, max err - bound "
            f"{s['bound_max_excess']:.2e} ({s['bound_max_excess_rel']:.2e} of ||o_full|| + ||o_sparse||)"
        )
        print(
            "  per layer: " + " ".join(f"{sum(r['sparsity']) / len(r['sparsity']):.2f}" for r in s["layers"].values())
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(stats, f, indent=1)


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
