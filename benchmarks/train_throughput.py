"""Training throughput of `SSATrainer` on one GPU: train_mode full (Full-Full) against ssa, same data, same steps.

    # here (CPU): tokenize the Debian docs corpus to uint16 and stage SmolLM2's config and tokenizer (no weights)
    python benchmarks/train_throughput.py prepare --stage .stage/train
    # on the GPU machine (trl and datasets travel as wheels in .stage/train/whl):
    python benchmarks/train_throughput.py run --stage .stage/train --out $OUT/train.json

The model is SmolLM2-135M (30 layers, 9 heads, 3 KV heads, head_dim 64): its weights with `--model FOLDER`, else
its architecture (config.json) with random weights from a fixed seed (throughput does not depend on the weights;
the loss curves then start from ~10.8 instead of ~3). bf16 weights (`--dtype float32`: fp32
master weights under bf16 autocast, the recipes' setting, which needs ssa_adapt >= 399e332 on the GPU), AdamW
(lr 1e-3, cosine, 10 warm-up steps), 4 x 8192 tokens per step in 8192-token rows of the token stream (wrapped
packing), SSA 16 x 16 blocks with one sink block. The full stream runs on SDPA with the first backend that takes
the shape among cuDNN, flash, efficient (named in the output). tokens/s = tokens per step / median step time
over the steps after `--warmup`, leaving out the steps that also measure AttnSparsity. With `--docs_steps`, short
extra runs pack whole documents (padding-free, `bfd_split`): the attention then has document boundaries.
With `--torch_compile on` (or `both`: eager and compiled runs, `vs_eager` their ratio) the trainer compiles the
model (`SSATrainingConfig(torch_compile=True)`); compilation falls in the warm-up steps, which the rate leaves out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WHEELS = ("trl-", "datasets-", "dill-", "multiprocess-", "xxhash-")


def prepare(stage: Path, tokens: int, wheels: Path) -> None:
    """Write stage/tokens.npy (uint16, documents joined by EOS), SmolLM2's config and tokenizer, and the wheels."""
    import random

    from transformers import AutoTokenizer

    from ssa_adapt.assets import debian_docs_corpus, smollm2_path

    stage.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_path()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, stage / name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = [json.loads(line)["text"] for line in debian_docs_corpus().open(encoding="utf-8")]
    random.Random(0).shuffle(docs)
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= tokens:
            break
    np.save(stage / "tokens.npy", np.asarray(ids[:tokens], dtype=np.uint16))
    (stage / "whl").mkdir(exist_ok=True)
    for wheel in wheels.glob("*.whl"):
        if wheel.name.startswith(WHEELS):
            shutil.copy(wheel, stage / "whl" / wheel.name)
    print(f"{stage}: {tokens} tokens, wheels {sorted(p.name for p in (stage / 'whl').iterdir())}")


def sdpa_backend(heads: int, kv_heads: int, head_dim: int, seq: int) -> tuple[list, str]:
    """The SDPA backends in priority order (cuDNN first) and the name of the first that runs the full stream's shape
    (causal, GQA through enable_gqa, bf16)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    # the layout SSA's full stream hands to SDPA: [B, T, H, D] transposed to [B, H, T, D] (not contiguous)
    q = torch.randn(1, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, seq, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    for backend in order:
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
            return order, backend.name
        except RuntimeError:
            continue
    return order, "math"


class StepTimer:
    """Wall time of every optimizer step, the GPU synchronized at both ends."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.times.append(time.perf_counter() - timer.start)

        self.times: list[float] = []
        self.callback = Callback()


def train_once(
    stage: Path, mode: str, rows, steps: int, a: argparse.Namespace, docs: bool, compiled: bool = False
) -> dict:
    from datasets import Dataset
    from torch.nn.attention import sdpa_kernel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ssa_adapt.trainer import SSATrainer, SSATrainingConfig

    torch.manual_seed(0)
    if a.model:  # the pretrained weights
        model = AutoModelForCausalLM.from_pretrained(
            a.model, dtype=getattr(torch, a.dtype), attn_implementation="sdpa"
        )
    else:
        config = AutoConfig.from_pretrained(stage)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, a.dtype), attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(stage)
    packing = (
        dict(packing=True, packing_strategy="bfd_split")
        if docs
        else dict(dataset_kwargs={"skip_prepare_dataset": True})
    )
    with tempfile.TemporaryDirectory() as out:
        args = SSATrainingConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=a.batch,
            max_length=a.seq,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_steps=10,
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            bf16=True,
            gradient_checkpointing=False,
            logging_steps=a.log_every,
            attn_sparsity_steps=a.sparsity_every,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
            train_mode=mode,
            torch_compile=compiled,
            block_size=16,
            block_count=16,
            sink_blocks=1,
            local_blocks=1,
            **packing,
        )
        timer = StepTimer()
        trainer = SSATrainer(
            model,
            args,
            train_dataset=Dataset.from_dict({"input_ids": rows}),
            processing_class=tokenizer,
            callbacks=[timer.callback],
        )
        torch.cuda.reset_peak_memory_stats()
        with sdpa_kernel(a.sdpa_order, set_priority=True):
            trainer.train()
        peak = torch.cuda.max_memory_allocated() / 2**30
    measured = [
        t for i, t in enumerate(timer.times) if i >= a.warmup and not (a.sparsity_every and i % a.sparsity_every == 0)
    ]
    tokens_per_step = trainer._total_train_tokens / max(len(timer.times), 1)
    median = statistics.median(measured)
    keys = ("loss", "lm_loss", "align_loss", "full_stream_fraction", "attn_sparsity", "grad_norm")
    curve = [
        {"step": h["step"], **{k: h[k] for k in keys if k in h}} for h in trainer.state.log_history if "loss" in h
    ]
    return {
        "train_mode": mode,
        "torch_compile": compiled,
        "packing": "bfd_split (padding-free, documents)" if docs else "wrapped (8192-token rows)",
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "step_s_median": median,
        "step_s_mean": statistics.fmean(measured),
        "tokens_per_s": tokens_per_step / median,
        "peak_gib": peak,
        "first_steps_s": timer.times[: a.warmup],
        "loss_curve": curve,
    }


def run(a: argparse.Namespace) -> None:
    import transformers
    import triton
    import trl

    from ssa_adapt.ops import resolve_backend

    stage = Path(a.stage)
    config = json.loads((stage / "config.json").read_text())
    a.sdpa_order, backend = sdpa_backend(
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["hidden_size"] // config["num_attention_heads"],
        a.seq,
    )
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(stage).eos_token_id
    tokens = np.load(stage / "tokens.npy").astype(np.int64)
    per_run = a.steps * a.batch * a.seq
    rows = tokens[:per_run].reshape(-1, a.seq).tolist()
    result = {
        "benchmark": "SSATrainer training throughput, train_mode full vs ssa",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "host": platform.node(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "triton": triton.__version__,
        },
        "ssa_backend": resolve_backend("auto", torch.empty(1, device="cuda")),
        "sdpa_backend": backend,
        "model": (
            f"SmolLM2-135M from {a.model}" if a.model else "SmolLM2-135M architecture (config.json), random weights"
        )
        + f", {a.dtype} weights + bf16 autocast",
        "data": f"Debian docs corpus, SmolLM2 tokenizer, {a.batch} x {a.seq} tokens per step",
        "ssa": "block 16 x 16, sink 1, local 1, full_prob 0.5, align_weight 10",
        "runs": [],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    compile_runs = {"off": [False], "on": [True], "both": [False, True]}[a.torch_compile]
    plan = [(mode, False, a.steps, c) for c in compile_runs for mode in a.modes]
    if a.docs_steps:
        plan += [(mode, True, a.docs_steps, c) for c in compile_runs for mode in a.modes]
    for mode, docs, steps, compiled in plan:
        if time.perf_counter() - started > a.budget_s:
            print(f"skipped {mode} docs={docs} torch_compile={compiled}: past the {a.budget_s} s budget", flush=True)
            continue
        data = rows
        if docs:  # whole documents (split at EOS) from the start of the stream, packed by TRL
            cut = np.flatnonzero(tokens[: steps * a.batch * a.seq * 2] == eos) + 1
            data = [d.tolist() for d in np.split(tokens[: cut[-1]], cut[:-1]) if len(d) > 1]
        print(f"== {mode} docs={docs} steps={steps} torch_compile={compiled}", flush=True)
        result["runs"].append(train_once(stage, mode, data, steps, a, docs, compiled))
        out.write_text(json.dumps(result, indent=1))
        torch.cuda.empty_cache()
    # vs_full: against train_mode full with the same packing and compilation; vs_eager: a compiled run against the
    # eager run of its mode and packing
    speed = {(r["train_mode"], r["packing"], r["torch_compile"]): r["tokens_per_s"] for r in result["runs"]}
    for r in result["runs"]:
        full = speed.get(("full", r["packing"], r["torch_compile"]))
        if r["train_mode"] != "full" and full:
            r["vs_full"] = r["tokens_per_s"] / full
        eager = speed.get((r["train_mode"], r["packing"], False))
        if r["torch_compile"] and eager:
            r["vs_eager"] = r["tokens_per_s"] / eager
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, SDPA {backend}, SSA kernels {result['ssa_backend']}, {result['date']}")
    print(f"{'train_mode':<10} {'compile':<7} {'packing':<36} {'tok/s':>9} {'step ms':>8} {'vs full':>7} "
          f"{'vs eager':>8} {'peak GiB':>8} {'loss':>6}")  # fmt: skip
    for r in result["runs"]:
        last = r["loss_curve"][-1]["loss"] if r["loss_curve"] else float("nan")
        print(
            f"{r['train_mode']:<10} {str(r['torch_compile']):<7} {r['packing']:<36} {r['tokens_per_s']:>9.0f} "
            f"{r['step_s_median'] * 1e3:>8.1f} {r.get('vs_full', 1.0):>7.3f} {r.get('vs_eager', 1.0):>8.3f} "
            f"{r['peak_gib']:>8.1f} {last:>6.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--stage", default=".stage/train")
    p.add_argument("--tokens", type=int, default=150 * 4 * 8192)
    p.add_argument("--wheels", default=".whl", help="folder of wheels to pick trl, datasets and their needs from")
    r = sub.add_parser("run")
    r.add_argument("--stage", default=".stage/train")
    r.add_argument("--out", default=None, help="default: benchmarks/results/train-<card>.json")
    r.add_argument("--modes", nargs="+", default=["full", "ssa"])
    r.add_argument("--model", default=None, help="a model folder: train its weights (default: random weights)")
    r.add_argument("--steps", type=int, default=150)
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--seq", type=int, default=8192)
    r.add_argument("--warmup", type=int, default=10)
    r.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights (bf16 autocast on top)"
    )
    r.add_argument("--log_every", type=int, default=10)
    r.add_argument("--sparsity_every", type=int, default=50)
    r.add_argument("--docs_steps", type=int, default=0, help="steps of the extra padding-free document runs (0: none)")
    r.add_argument(
        "--torch_compile", choices=["off", "on", "both"], default="off",
        help="SSATrainingConfig(torch_compile=...): eager runs, compiled runs, or both (vs_eager compares them)",
    )  # fmt: skip
    r.add_argument("--budget_s", type=float, default=1e9, help="start no further run after this many seconds")
    a = parser.parse_args()
    if a.command == "prepare":
        prepare(Path(a.stage), a.tokens, Path(a.wheels))
    else:
        from run_info import result_path

        a.out = result_path("train", a.out)
        run(a)


if __name__ == "__main__":
    main()
