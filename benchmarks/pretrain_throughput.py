"""From-scratch pretraining cost of the paper's four models (SSA-1B config) on one GPU, side by side.

    # here (CPU): pack the first ~1.3M tokens of the Debian docs corpus (SmolLM2 tokenizer) into .stage/pt
    python benchmarks/pretrain_throughput.py prepare --out .stage/pt
    # on the GPU machine (trl and datasets travel as wheels):
    python benchmarks/pretrain_throughput.py run --token_cache .stage/pt --tokenizer .stage/pt \\
        --out $OUT/pretrain.json

Each mode (`full` = FullAttn, `sparse` = MoBA / Sparse-Sparse, `nsa`, `ssa`) runs `recipes/pretrain.py` itself
with `recipes/configs/ssa-1b.yaml` (fresh random weights from the same seed, gate on, 16 x 16 blocks, no sink,
gradient checkpointing, fp32 master weights under bf16 autocast, AdamW) for `--steps` optimizer steps of
`--batch` x 8192 tokens (no accumulation; the config's 12-step accumulation and 8 GPUs only scale the batch), with
`--warmup_steps` of learning-rate warm-up so that the first losses move. Reported per mode: tokens/s (median step
after `--skip` steps), model FLOPs utilisation against the H200's dense bf16 peak (989 TFLOP/s), peak memory, the
first losses, and the cost relative to FullAttn (the paper: SSA 1008 / FullAttn 792 GPU hours = 1.27x). MFU
counts the same model FLOPs for every mode, those of the dense model: 6 N per token for the weights plus causal
attention's 6 T D HQ per token and layer (forward and backward), without the recomputation of checkpointing; so
it is an effective rate that compares the modes' wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "recipes"))
sys.path.insert(0, str(REPO / "benchmarks"))

H200_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of an H200 SXM
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def prepare(out: Path, tokens: int) -> None:
    """Pack the first documents of the Debian docs corpus (at least `tokens` tokens) and copy the tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    from ssa_adapt.assets import debian_docs_corpus, smollm2_path
    from ssa_adapt.packed_data import build_token_cache

    model_dir = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)

    def documents():
        seen = 0
        for line in debian_docs_corpus().open(encoding="utf-8"):
            text = json.loads(line)["text"]
            yield text
            seen += len(text) // 3  # ~3 characters per token: stop a little past the target
            if seen >= tokens:
                return

    build_token_cache(
        documents(),
        lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"],
        out,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        tokenizer_name="SmolLM2-135M",
    )
    print(json.loads((out / "meta.json").read_text()))


def model_flops_per_token(model, seq: int) -> float:
    """6 N (weights, forward + backward) + 6 T D HQ per layer (causal attention, forward + backward)."""
    cfg = model.config
    n = sum(p.numel() for n_, p in model.named_parameters() if "embed_tokens" not in n_ or cfg.tie_word_embeddings)
    attn = 6 * seq * cfg.head_dim * cfg.num_attention_heads * cfg.num_hidden_layers
    return 6 * n + attn


class StepProfiler:
    """A TrainerCallback that runs torch.profiler over the `steps` optimizer steps after the first `skip` and
    keeps the operators and kernels that took the most device time, per step."""

    def __init__(self, skip: int, steps: int, top: int = 30):
        from transformers import TrainerCallback

        self.skip, self.steps, self.top, self.rows = skip, steps, top, []
        self.session = None
        prof = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if prof.steps and state.global_step == prof.skip:
                    acts = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        acts.append(torch.profiler.ProfilerActivity.CUDA)
                    prof.session = torch.profiler.profile(activities=acts)
                    prof.session.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if prof.steps and state.global_step == prof.skip + prof.steps:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    prof.session.__exit__(None, None, None)
                    prof.rows = prof.table(prof.session)

        self.callback = Callback()

    def table(self, session) -> list[dict]:
        """[{name, device_ms_per_step, calls_per_step}] for the `top` entries by device time."""
        from profiling import event_rows

        rows = [
            {"name": r["kernel"], "device_ms_per_step": r["us_per_step"] / 1e3, "calls_per_step": r["calls_per_step"]}
            for r in event_rows(session, self.steps)[: self.top]
        ]
        for r in rows:
            print(f"  {r['device_ms_per_step']:9.2f} ms {r['calls_per_step']:7.1f} x  {r['name']}", flush=True)
        return rows


def train_mode(mode: str, a: argparse.Namespace) -> dict:
    import pretrain
    from train_throughput import StepTimer
    from trl import TrlParser

    from ssa_adapt.trainer import SSATrainingConfig

    with tempfile.TemporaryDirectory() as out:
        argv = [
            "--config", a.config, "--train_mode", mode, "--token_cache", a.token_cache, "--tokenizer", a.tokenizer,
            "--max_steps", str(a.steps), "--per_device_train_batch_size", str(a.batch),
            "--gradient_accumulation_steps", "1", "--warmup_steps", str(a.warmup_steps), "--output_dir", out,
            "--save_strategy", "no", "--logging_steps", "1", "--attn_sparsity_steps", "0", "--report_to", "none",
            "--disable_tqdm", "true", "--dataloader_num_workers", "2",
        ]  # fmt: skip
        script_args, training_args = TrlParser((pretrain.PretrainArguments, SSATrainingConfig)).parse_args_and_config(
            args=argv
        )
        timer = StepTimer()
        profiler = StepProfiler(a.steps - a.profile_steps, a.profile_steps)  # the last steps, not timed
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = pretrain.main(script_args, training_args, callbacks=[timer.callback, profiler.callback])
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        flops = model_flops_per_token(trainer.model, script_args.seq_len)
        params = sum(p.numel() for p in trainer.model.parameters())
    measured = timer.times[a.skip : a.steps - a.profile_steps]
    tokens_per_step = a.batch * script_args.seq_len
    median = statistics.median(measured)
    losses = [
        {k: h[k] for k in ("step", "loss", "lm_loss", "align_loss", "full_stream_fraction") if k in h}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    del trainer
    torch.cuda.empty_cache()
    return {
        "train_mode": mode,
        "params": params,
        "steps": a.steps,
        "tokens_per_step": tokens_per_step,
        "step_s_median": median,
        "tokens_per_s": tokens_per_step / median,
        "mfu": flops * tokens_per_step / median / H200_BF16_PEAK,
        "model_flops_per_token": flops,
        "peak_gib": peak,
        "first_steps_s": timer.times[: a.skip],
        "losses": losses,
        **({"profile": profiler.rows} if profiler.rows else {}),
    }


def run(a: argparse.Namespace) -> None:
    import transformers
    import triton
    import trl

    result = {
        "benchmark": "from-scratch pretraining cost, SSA-1B config, modes full / sparse / nsa / ssa",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "host": platform.node(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "triton": triton.__version__,
        },  # fmt: skip
        "setup": f"{a.config}, {a.batch} x 8192 tokens per step, {a.steps} steps, warm-up {a.warmup_steps} steps, "
        f"median over steps after the first {a.skip}",
        "runs": [],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for mode in a.modes:
        if time.perf_counter() - started > a.budget_s:
            print(f"skipped {mode}: past the {a.budget_s} s budget", flush=True)
            continue
        print(f"== {mode}", flush=True)
        result["runs"].append(train_mode(mode, a))
        out.write_text(json.dumps(result, indent=1))
    full = next((r for r in result["runs"] if r["train_mode"] == "full"), None)
    for r in result["runs"]:
        if full:
            r["cost_vs_full"] = full["tokens_per_s"] / r["tokens_per_s"]
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, {result['date']}, {result['setup']}")
    print(f"{'mode':<7} {'tok/s':>8} {'MFU':>6} {'cost vs full':>12} {'peak GiB':>8}  losses (steps 1, 5, 10, last)")
    for r in result["runs"]:
        ls = [x["loss"] for x in r["losses"]]
        pick = [ls[i] for i in (0, 4, 9) if i < len(ls)] + ls[-1:]
        print(
            f"{r['train_mode']:<7} {r['tokens_per_s']:>8.0f} {r['mfu']:>6.3f} {r.get('cost_vs_full', 1.0):>12.3f} "
            f"{r['peak_gib']:>8.1f}  {' '.join(f'{x:.3f}' for x in pick)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", default=".stage/pt")
    p.add_argument("--tokens", type=int, default=1_300_000)
    r = sub.add_parser("run")
    r.add_argument("--config", default=str(REPO / "recipes/configs/ssa-1b.yaml"))
    r.add_argument("--token_cache", default=".stage/pt")
    r.add_argument("--tokenizer", default=".stage/pt")
    r.add_argument("--out", default=None, help="default: benchmarks/results/pretrain-<card>.json")
    r.add_argument("--modes", nargs="+", default=["full", "sparse", "nsa", "ssa"])
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--warmup_steps", type=int, default=5)
    r.add_argument("--skip", type=int, default=5, help="first steps left out of the median (compilation)")
    r.add_argument("--budget_s", type=float, default=1e9, help="start no further mode after this many seconds")
    r.add_argument("--profile_steps", type=int, default=0, help="profile the last N steps (left out of the timing)")
    a = parser.parse_args()
    if a.command == "prepare":
        prepare(Path(a.out), a.tokens)
    else:
        from run_info import result_path

        a.out = result_path("pretrain", a.out)
        run(a)


if __name__ == "__main__":
    main()
