"""A training run made in several calls, each under a time budget (a machine lent for minutes at a time):
`TimeBudgetCallback` stops a call at a step boundary with a checkpoint, the next call resumes from it
(`resume_from_checkpoint="last"`), `train_resumably` makes one such call and records it, and `run_summary`
describes the finished run. `StudyRuns` keeps the models and summaries of a study made lease by lease."""

from __future__ import annotations

import datetime
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..eval.report import read_json, run_info, write_json

__all__ = ["TimeBudgetCallback", "run_summary", "train_resumably", "peak_memory_gib", "StudyRuns"]


class TimeBudgetCallback(TrainerCallback):
    """Saves a checkpoint and stops training at the first step end `budget_s` seconds after `start` (a
    `time.monotonic()` reading; default: when the callback is made, so loading and tokenizing count too). `stopped`
    says whether it did; None as the budget never stops."""

    def __init__(self, budget_s: float | None, start: float | None = None):
        self.budget_s = budget_s
        self.start = time.monotonic() if start is None else start
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        late = self.budget_s is not None and time.monotonic() - self.start > self.budget_s
        if late and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True


def peak_memory_gib() -> dict | None:
    """This process's peak CUDA memory so far, GiB: {"allocated": tensors, "reserved": the caching allocator's
    pool}; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return {
        "allocated": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "reserved": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


def run_summary(trainer: Trainer, *, tail: int = 5) -> dict:
    """The finished run of `trainer`: steps, tokens (per device batch x accumulation x max_length x processes),
    the mean loss and language-model loss of the last `tail` logged steps, parameters (all, trainable: LoRA trains a
    few), and the log history of losses and AttnSparsity."""
    state, args = trainer.state, trainer.args
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens_per_step *= getattr(args, "max_length", None) or 0
    last = [h for h in state.log_history if "loss" in h][-tail:]
    params = list(trainer.model.parameters())
    return {
        "steps": state.global_step,
        "tokens_per_step": tokens_per_step,
        "tokens": tokens_per_step * state.global_step,
        "final_loss": sum(h["loss"] for h in last) / len(last) if last else None,
        "final_lm_loss": sum(h.get("lm_loss", h["loss"]) for h in last) / len(last) if last else None,
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "log_history": [h for h in state.log_history if "loss" in h or "attn_sparsity" in h],
        "ssa": args.ssa_overrides() if hasattr(args, "ssa_overrides") else None,
    }


def train_resumably(
    main: Callable[..., Trainer],
    args: Sequence,
    summary_path: Path,
    *,
    time_budget_s: float | None = None,
    start: float | None = None,
    extra: dict | None = None,
    mirror: Path | None = None,
) -> dict | None:
    """One call of a run made in several. `main(*args, callbacks=[...])` trains (`args`: the recipe's parsed
    arguments, resuming from the newest checkpoint of their output_dir) under a `TimeBudgetCallback(time_budget_s,
    start)` and returns its trainer; this call is appended to `<output_dir>/segments.json` (device, date, command,
    commit, last step, seconds, peak memory). Finished: the summary (`extra`, `run_summary`, the segments, the peak
    memory over them and `finished_at`, the time to the microsecond) is written to `summary_path` (and a copy into
    `mirror`) and returned; stopped by the time budget: None (call again to resume)."""
    stop = TimeBudgetCallback(time_budget_s, start)
    began = time.monotonic()
    trainer = main(*args, callbacks=[stop])
    out = Path(trainer.args.output_dir)
    segments = (read_json(out / "segments.json") or {"segments": []})["segments"]
    segments.append({**run_info([f"train {out.name}"], trainer.args.device), "to_step": trainer.state.global_step,
                     "seconds": round(time.monotonic() - began, 1), "peak_memory_gib": peak_memory_gib()})  # fmt: skip
    write_json(out / "segments.json", {"segments": segments})
    if stop.stopped or trainer.state.global_step < trainer.args.max_steps:
        return None
    peaks = [s["peak_memory_gib"] for s in segments if s.get("peak_memory_gib")]
    peak = {k: max(p[k] for p in peaks) for k in ("allocated", "reserved")} if peaks else None
    finished_at = datetime.datetime.now(datetime.timezone.utc).isoformat()  # names this training (to the microsecond)
    summary = {**(extra or {}), **run_summary(trainer), "segments": segments, "peak_memory_gib": peak,
               "finished_at": finished_at}  # fmt: skip
    write_json(summary_path, summary, mirror=mirror)
    return summary


class StudyRuns:
    """The models and summaries of a study run in several calls on machines that go away between leases: model
    `name` trains into `<run_dir>/<name>`, its summaries are `<run_dir>/summary/{train,eval}-<name>.json`. A fresh
    run_dir starts with the summaries of `committed` (those earlier leases brought back); every summary written is
    also copied into `mirror` (say the folder whose files come back from the machine), and `send(name)` copies the
    model's summaries there at once, so that each call's folder holds the model's whole state."""

    def __init__(self, run_dir: Path, committed: Path | None = None, mirror: Path | None = None):
        self.run_dir, self.mirror = Path(run_dir), mirror
        folder = self.run_dir / "summary"
        for f in sorted(Path(committed).glob("*.json")) if committed else []:
            if not (folder / f.name).is_file():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, folder / f.name)

    def path(self, kind: str, name: str) -> Path:
        """The summary `kind` ("train" or "eval") of model `name`."""
        return self.run_dir / "summary" / f"{kind}-{name}.json"

    def read(self, kind: str, name: str) -> dict | None:
        return read_json(self.path(kind, name))

    def write(self, kind: str, name: str, data: dict) -> None:
        write_json(self.path(kind, name), data, mirror=self.mirror)

    def send(self, name: str) -> None:
        """Copy model `name`'s summaries, those there are, into `mirror`."""
        for kind in ("train", "eval"):
            if self.mirror is not None and self.path(kind, name).is_file():
                Path(self.mirror).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.path(kind, name), Path(self.mirror) / self.path(kind, name).name)

    def trained_here(self, name: str) -> bool:
        """Whether model `name` finished training on this machine (its summary alone may come from another)."""
        out = self.run_dir / name
        saved = (out / "config.json").is_file() or (out / "adapter_config.json").is_file()  # written at the end
        return saved and self.path("train", name).is_file()

    def trained_at(self, name: str) -> str | None:
        """When model `name`'s training finished (`finished_at` of its summary), None if it has not: what names the
        training its evaluation belongs to."""
        summary = self.read("train", name)
        return summary["finished_at"] if summary else None
