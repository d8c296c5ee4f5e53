"""The long-context retrofit study: SmolLM2-135M-Instruct continued at 8k for 50M tokens as Full-Full,
Sparse-Sparse, SSA and SSA + LoRA r 64, each model evaluated in full mode and at sparse budgets 16x16 / 16x32 / 16x64
up to 32k (llama3 RoPE x4 beyond 8k) -> benchmarks/results/retrofit-long-context.{json,md} and docs/ plots. What is
trained and evaluated: recipes/configs/retrofit-long-context-study.yaml. MODEL: full, sparse, ssa, ssa-lora, original.

    python recipes/retrofit_long_context.py [--run_dir D --mirror M] lease --model MODEL [--time_budget_s S]
    python recipes/retrofit_long_context.py report         # here: the committed summaries -> JSON, markdown, plots

`lease` trains the model (resuming from its newest checkpoint), then evaluates it phase by phase (the targets' units
first), skipping what its summaries hold, and exits 75 while work is left (`train` / `eval` do one half). Summaries
go to <run_dir>/summary, and the model's into --mirror; a fresh run_dir starts from the committed ones.

Runbook (docs/retrofit-long-context.md: the minutes): one device lease per model, checkpoints never leave the machine.
Here, once: `python benchmarks/bundle_offline.py bundle --part_mib 48`. There, each call starting with `export
PYTHONPATH=/tmp/site:$PWD SSA_ADAPT_CACHE=/tmp/ssa-cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
SSA_ADAPT_COMMIT=<git rev-parse --short HEAD, here>;`:
  1. per part, carrying .stage/offline/part-NN: python benchmarks/bundle_offline.py unbundle    (75 until the last)
  2. the last part's call goes on: && python recipes/retrofit_long_context.py --run_dir /tmp/lc --mirror $OUT \
         lease --model MODEL --time_budget_s 390
  3. at once, the lease command alone with --time_budget_s 450, repeated until it exits 0
  4. here: the last call's train-MODEL.json, eval-MODEL.json -> benchmarks/results/retrofit-long-context/, commit.
Leases: full (then `lease --model original` in the time left), sparse, ssa, ssa-lora; then `report`.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from trl import ModelConfig, ScriptArguments, TrlParser

from ssa_adapt.eval import load_model
from ssa_adapt.eval.long_context import long_context_report
from ssa_adapt.eval.report import read_json, run_info, write_json
from ssa_adapt.eval.stages import EvalPlan, new_result, pending_units, run_phases
from ssa_adapt.trainer import SSATrainingConfig
from ssa_adapt.trainer.runs import StudyRuns, train_resumably

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import continue_pt  # noqa: E402  (the training recipe itself, run in-process)

UNFINISHED = 75  # exit code while work is left (EX_TEMPFAIL): run the same command again


def plans(study: dict) -> list[EvalPlan]:
    """The evaluation's phases, each an EvalPlan: the study's `eval` fields, then the phase's."""
    return [EvalPlan(**{**study["eval"], **phase}) for phase in study["phases"]]


def eval_pending(study: dict, runs: StudyRuns, model: str) -> bool:
    """Whether the model's evaluation (of its latest training) has units left."""
    result = runs.read("eval", model)
    if result is None or result.get("trained_by") != runs.trained_at(model):
        return True
    return any(pending_units(p, copy.deepcopy(result)) for p in plans(study))


def train(study: dict, runs: StudyRuns, model: str, time_budget_s, start, flags) -> int:
    """The model's training, resumed from its newest checkpoint; 0 when finished, UNFINISHED when stopped."""
    if model == "original" or runs.trained_here(model):
        return 0
    own, out = study["models"][model]["train"], runs.run_dir / model
    argv = ["--config", str(ROOT / study["train_config"]), *own, "--output_dir", str(out)]
    args = TrlParser((ScriptArguments, SSATrainingConfig, ModelConfig)).parse_args_and_config(
        args=[*argv, "--resume_from_checkpoint", "last", *flags]
    )
    extra = {"model": model, "flags": [*own, *flags], "config": study["train_config"], "output_dir": str(out)}
    done = train_resumably(continue_pt.main, args, runs.path("train", model), time_budget_s=time_budget_s,
                           start=start, extra=extra, mirror=runs.mirror)  # fmt: skip
    print(f"train {model}: " + ("finished" if done else "stopped by the time budget; run it again to resume"))
    return 0 if done else UNFINISHED


def evaluate(study: dict, runs: StudyRuns, model: str, original: str | None, time_budget_s) -> int:
    """Every phase of the model's evaluation into its eval summary, skipping what that holds."""
    if model != "original" and runs.trained_at(model) is None:
        raise SystemExit(f"eval {model}: its training has not finished; run `lease --model {model}` or `train`.")
    phases, trained_at = plans(study), runs.trained_at(model)
    result = runs.read("eval", model)
    if result is None or result.get("trained_by") != trained_at:  # a new training: its evaluation starts anew
        result = {**new_result(study["models"][model]["label"], phases[0]), "trained_by": trained_at}
    earlier = list(result["runs"])

    def save(result: dict, finished: list[str]) -> None:
        runs.write("eval", model, {**result, "runs": earlier + [run_info(finished, phases[0].device)]})

    path = original if model == "original" else str(runs.run_dir / model)
    load = lambda: load_model(path, dtype=phases[0].dtype, device=phases[0].device)  # noqa: E731
    done = run_phases(phases, result, load, save, time_budget_s)
    print(f"eval {model}: {'done' if done else 'units left after the time budget; run it again'}")
    return 0 if done else UNFINISHED


def lease(study: dict, runs: StudyRuns, model: str, original: str | None, time_budget_s, flags) -> int:
    """Train (unless the model is trained on this machine), then evaluate, in one time budget: a call that trained
    starts evaluating only while time is left, one that did not evaluates at least one unit."""
    start = time.monotonic()
    if not eval_pending(study, runs, model):
        print(f"lease {model}: trained and evaluated; nothing left.")
        return 0
    if model != "original" and not runs.trained_here(model):
        if train(study, runs, model, time_budget_s, start, flags):
            return UNFINISHED
        if time_budget_s is not None and time.monotonic() - start >= time_budget_s:
            return UNFINISHED
    left = None if time_budget_s is None else time_budget_s - (time.monotonic() - start)
    return evaluate(study, runs, model, original, left)


def report(study: dict, folder: Path) -> int:
    """The committed summaries -> the study's JSON and markdown (targets checked) and its plots."""
    cfg, models = study["report"], study["models"]
    evals = {m: read_json(folder / f"eval-{m}.json") for m in models}
    trains = {m: read_json(folder / f"train-{m}.json") for m in models if m != "original"}
    out, png = ROOT / cfg["out"], ROOT / cfg["png"]
    pngs = {k: png.with_name(f"{png.name}-{k}.png") for k in ("context", "budget", "niah")}
    given = {k: cfg[k] for k in ("setup", "short", "long", "needle_lengths", "lora", "trained_context")}
    labels = {m: v["label"] for m, v in models.items()}
    kinds = study["eval"]["niah_kinds"]
    pending = {
        m: [str(u) for p in plans(study) for u in pending_units(p, copy.deepcopy(e))] for m, e in evals.items() if e
    }
    result, md = long_context_report(evals, trains, labels, kinds=kinds, pngs=pngs, out=out, pending=pending, **given)
    write_json(
        out, {"study": "retrofit-long-context", "runs": [run_info(["report"], "cpu")], "config": study, **result}
    )
    out.with_suffix(".md").write_text("# Long-context retrofit study: SmolLM2-135M-Instruct\n\n" + md)
    print(md.split("\n\n")[1])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=ROOT / "recipes" / "configs" / "retrofit-long-context-study.yaml")
    p.add_argument("--run_dir", type=Path, default=Path("runs/retrofit-long-context"), help="Models and summaries.")
    p.add_argument("--mirror", type=Path, default=None, help="Also copy every summary written into this folder.")
    sub = p.add_subparsers(dest="stage", required=True)
    for name in ("lease", "train", "eval"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--time_budget_s", type=float, default=None, help="Start nothing new after this (exit 75).")
        s.add_argument("--original", default=None, help="The original model's folder (default: the SmolLM2 asset).")
    sub.add_parser("report").add_argument("--summaries", type=Path, default=None, help="Default: the study's.")
    args, flags = p.parse_known_args(argv)
    study = yaml.safe_load(args.study.read_text())
    if args.stage == "report":
        return report(study, args.summaries or ROOT / study["report"]["summaries"])
    if args.model not in study["models"]:
        raise SystemExit(f"--model {args.model}: choose among {list(study['models'])}.")
    runs = StudyRuns(args.run_dir, ROOT / study["report"]["summaries"], args.mirror)
    runs.send(args.model)  # each call's mirror holds the model's whole state, whatever this call adds
    if args.stage == "train":
        return train(study, runs, args.model, args.time_budget_s, None, flags)
    if args.stage == "eval" and flags:
        raise SystemExit(f"eval: unknown arguments {flags}")
    if args.stage == "eval":
        return evaluate(study, runs, args.model, args.original, args.time_budget_s)
    return lease(study, runs, args.model, args.original, args.time_budget_s, flags)


if __name__ == "__main__":
    sys.exit(main())
