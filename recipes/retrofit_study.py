"""The retrofit study: SmolLM2-135M-Instruct continued at 8k context with train_mode
full, sparse and ssa on the same data, steps, seed and schedule, every final model and the original evaluated
alike -> benchmarks/results/retrofit-smollm2.{json,md} and docs/retrofit-smollm2.png. Every stage resumes: run
the same command again after an interruption or a time budget (exit code 75) and it continues where it stopped.

    python recipes/retrofit_study.py train --mode full|sparse|ssa [--time_budget_s S] [continue_pt flags]
    python recipes/retrofit_study.py eval --model original|full|sparse|ssa [EvalPlan flags, e.g. --task_limits ...]
    python recipes/retrofit_study.py report

docs/retrofit-smollm2.md gives the measured run; benchmarks/bundle_offline.py carries what a GPU machine without
network needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers import HfArgumentParser
from trl import ModelConfig, ScriptArguments, TrlParser

from ssa_adapt.eval import load_model
from ssa_adapt.eval.report import read_json, run_info, study_report, write_json
from ssa_adapt.eval.stages import EvalPlan, new_result, run_evaluation
from ssa_adapt.trainer import SSATrainingConfig
from ssa_adapt.trainer.runs import train_resumably

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import continue_pt  # noqa: E402  (the training recipe itself, run in-process)

CONFIG = ROOT / "recipes" / "configs" / "retrofit-smollm2-135m.yaml"
MODES = ("full", "sparse", "ssa")
MODELS = {"original": "Original", "full": "Full-Full", "sparse": "Sparse-Sparse", "ssa": "SSA"}
UNFINISHED = 75  # exit code of a stage stopped by its time budget (EX_TEMPFAIL): run the same command again
# the study's evaluation (EvalPlan flags; later flags on the command line win)
STUDY_PLAN = ["--setups", "full", "sparse-16x16-sink1", "sparse-16x64-sink1", "--stages", "ppl", "sparsity",
              "benchmarks", "niah", "--ppl_span", "32768", "--batch_size", "64", "--benchmark_setups", "full",
              "sparse-16x16-sink1", "--niah_lengths", "4096", "8192", "--niah_samples", "3"]  # fmt: skip


def train(mode: str, run_dir: Path, config: Path, time_budget_s: float | None, flags: Sequence[str]) -> int:
    """continue_pt.py in-process with the study's config, resuming; 0 when finished, UNFINISHED when stopped."""
    summary_path = run_dir / "summary" / f"train-{mode}.json"
    if summary_path.is_file():
        print(f"train {mode}: already finished ({summary_path}); delete it to train again.")
        return 0
    out = run_dir / mode
    argv = ["--config", str(config), "--train_mode", mode, "--output_dir", str(out)]
    args = TrlParser((ScriptArguments, SSATrainingConfig, ModelConfig)).parse_args_and_config(
        args=[*argv, "--resume_from_checkpoint", "last", *flags]
    )
    extra = {"mode": mode, "config": str(config), "output_dir": str(out)}
    summary = train_resumably(continue_pt.main, args, summary_path, time_budget_s=time_budget_s, extra=extra)
    if summary is None:
        print(f"train {mode}: stopped by the time budget; run it again to resume.")
        return UNFINISHED
    print(f"train {mode}: finished, {summary['tokens']:,} tokens -> {out}; summary {summary_path}")
    return 0


def evaluate(name: str, run_dir: Path, original: str | None, plan: EvalPlan) -> int:
    """Every unit of the study's evaluation of one model into <run_dir>/summary/eval-<name>.json."""
    path = original if name == "original" else str(run_dir / name)
    if name != "original" and not (run_dir / "summary" / f"train-{name}.json").is_file():
        raise SystemExit(f"eval {name}: its training has not finished; run `retrofit_study.py train --mode {name}`.")
    out = run_dir / "summary" / f"eval-{name}.json"
    result = read_json(out) or new_result(MODELS[name], plan)
    earlier = list(result["runs"])

    def save(result: dict, finished: list[str]) -> None:
        write_json(out, {**result, "runs": earlier + [run_info(finished, plan.device)]})

    done = run_evaluation(plan, result, lambda: load_model(path, dtype=plan.dtype, device=plan.device), save)
    print(f"eval {name}: {'done' if done else 'units left after the time budget; run it again'} -> {out}")
    return 0 if done else UNFINISHED


def report(run_dir: Path, out: Path, png: Path) -> int:
    """The summaries -> the study's JSON, markdown (targets checked as met / missed) and plot."""
    evals = {m: read_json(run_dir / "summary" / f"eval-{m}.json") for m in MODELS}
    trains = {m: read_json(run_dir / "summary" / f"train-{m}.json") for m in MODES}
    if all(e is None for e in evals.values()):
        raise SystemExit(f"report: no eval summary under {run_dir / 'summary'}; run the train and eval stages first.")
    result, md = study_report(evals, trains, MODELS, png, out)
    result = {"study": "retrofit-smollm2", "runs": [run_info(["report"], "cpu")], "config": str(CONFIG.relative_to(ROOT)),
              **result}  # fmt: skip
    write_json(out, result)
    out.with_suffix(".md").write_text(
        "# Retrofit study: SmolLM2-135M-Instruct (dequantized Q4_1 GGUF), train_mode full / sparse / ssa\n\n" + md
    )
    print(md.split("\n\n")[0])
    return 0


def parser() -> argparse.ArgumentParser:
    """One sub-command per stage; flags a stage does not know go to continue_pt (train) or EvalPlan (eval)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", type=Path, default=Path("runs/retrofit-smollm2"), help="Runs and summaries.")
    sub = p.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("train", help="Continued pretraining of one mode (resumes).")
    t.add_argument("--mode", required=True, choices=MODES)
    t.add_argument("--config", type=Path, default=CONFIG, help="The study's recipe config.")
    t.add_argument("--time_budget_s", type=float, default=None, help="Checkpoint and stop after this (exit 75).")
    e = sub.add_parser("eval", help="Every unit of one model's evaluation, skipping what is done.")
    e.add_argument("--model", required=True, choices=list(MODELS))
    e.add_argument("--original", default=None, help="The original model's folder (default: the SmolLM2 asset).")
    r = sub.add_parser("report", help="Summaries -> JSON, markdown with target verdicts, plot.")
    r.add_argument("--out", type=Path, default=Path("benchmarks/results/retrofit-smollm2.json"))
    r.add_argument("--png", type=Path, default=Path("docs/retrofit-smollm2.png"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, flags = parser().parse_known_args(argv)
    if args.stage == "train":
        return train(args.mode, args.run_dir, args.config, args.time_budget_s, flags)
    if args.stage == "eval":
        (plan,) = HfArgumentParser(EvalPlan).parse_args_into_dataclasses(args=[*STUDY_PLAN, *flags])
        return evaluate(args.model, args.run_dir, args.original, plan)
    if flags:
        raise SystemExit(f"report: unknown arguments {flags}")
    return report(args.run_dir, args.out, args.png)


if __name__ == "__main__":
    sys.exit(main())
