"""The evaluation runner both eval recipes use (`recipes/eval_suite.py`, `recipes/retrofit_study.py eval`): one
model under several setups, unit by unit, into one result dict.

Units, in the order of `EvalPlan.stages`: perplexity per (setup, length), AttnSparsity per length (every sparse
budget at once, on the model's own full attention), the lm-eval benchmarks (every benchmark setup at once), needle
in a haystack per (kind, setup, length), RULER per setup. A unit already in the result is skipped, so a run
interrupted (or stopped by its time budget) continues where it stopped when handed its saved result again;
`run_phases` runs several plans in turn on one result (the order of a study's priorities). A unit longer than the
model's trained context (`max_position_embeddings`) runs with llama3 RoPE scaling when `long_rope_factor` is set.
`EvalPlan`'s fields are also the recipes' flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .setups import EvalSetup, apply_setup, parse_setups

__all__ = ["EvalPlan", "Unit", "pending_units", "run_evaluation", "run_phases", "new_result", "STAGES"]

STAGES = ("ppl", "sparsity", "benchmarks", "niah", "ruler")
REPORT_TASKS = ["ssa_hellaswag", "ssa_piqa", "ssa_arc_easy", "ssa_arc_challenge"]


@dataclass
class EvalPlan:
    """What to evaluate, and how (every field is a command-line flag of the eval recipes)."""

    setups: list[str] = field(
        default_factory=lambda: ["original", "sparse-16x16-sink1", "sparse-16x16-sink0", "sparse-16x64-sink1"],
        metadata={"help": "Setups, evaluated in order: original, full, sparse-<BS>x<BC>[-sink<n>][-local<n>]."},
    )
    stages: list[str] = field(
        default_factory=lambda: ["ppl", "sparsity", "benchmarks", "niah"], metadata={"help": f"Among {STAGES}."}
    )
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16, float16."})
    backend: str = field(default="auto", metadata={"help": "SSA kernels: auto, reference, triton, fla."})
    ppl_lengths: list[int] = field(default_factory=lambda: [2048, 8192], metadata={"help": "Perplexity lengths."})
    ppl_span: int = field(default=8192, metadata={"help": "Tokens scored per novel (a multiple of every length)."})
    ppl_novels: list[str] = field(default_factory=list, metadata={"help": "Austen titles; none given: all six."})
    sparsity_lengths: list[int] = field(
        default_factory=lambda: [8192], metadata={"help": "Window lengths of the attention statistics (a unit each)."}
    )
    sparsity_windows: int = field(default=2, metadata={"help": "Windows per length (one per novel)."})
    long_rope_factor: float | None = field(
        default=None,
        metadata={"help": "llama3 RoPE scaling factor for units longer than the model's max_position_embeddings "
                  "(its trained context; shorter units run unscaled). None: never scaled."},
    )  # fmt: skip
    tasks: list[str] = field(default_factory=lambda: list(REPORT_TASKS), metadata={"help": "lm-eval tasks."})
    include_path: str | None = field(default=None, metadata={"help": "lm-eval task folder; default the assets'."})
    limit: int | None = field(default=None, metadata={"help": "Items per benchmark task; default all."})
    task_limits: list[str] = field(default_factory=list, metadata={"help": "Per-task items: ssa_hellaswag=2000 ..."})
    batch_size: int = field(default=16, metadata={"help": "lm-eval batch size."})
    benchmark_check: int = field(default=50, metadata={"help": "Items re-run sparse to confirm a reused score."})
    benchmark_setups: list[str] = field(default_factory=list, metadata={"help": "Setups scored; none given: all."})
    niah_lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192], metadata={"help": "NIAH lengths."})
    niah_depths: list[float] = field(default_factory=lambda: [0, 0.25, 0.5, 0.75, 1], metadata={"help": "Depths."})
    niah_samples: int = field(default=1, metadata={"help": "Prompts per (length, depth) cell."})
    niah_kinds: list[str] = field(
        default_factory=lambda: ["magic"], metadata={"help": "Needle kinds: magic, single, multikey, multivalue."}
    )
    niah_batch: int = field(default=1, metadata={"help": "NIAH prompts per generate call."})
    niah_setups: list[str] = field(default_factory=list, metadata={"help": "Setups the needles use; none given: all."})
    ruler_lengths: list[int] = field(default_factory=lambda: [4096, 8192], metadata={"help": "RULER lengths."})
    ruler_limit: int = field(default=20, metadata={"help": "RULER prompts per length."})
    time_budget_s: float | None = field(default=None, metadata={"help": "Start no unit after this many seconds."})
    redo: list[str] = field(default_factory=list, metadata={"help": "Stages to compute again although saved."})

    def __post_init__(self):
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise ValueError(f"stages {unknown}: choose among {list(STAGES)}.")
        from .niah import KINDS

        unknown = sorted(set(self.niah_kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"niah_kinds {unknown}: choose among {list(KINDS)}.")

    def parsed_setups(self) -> list[EvalSetup]:
        return parse_setups(self.setups)

    def scored_setups(self) -> list[EvalSetup]:
        """The setups the benchmarks score."""
        return [s for s in self.parsed_setups() if not self.benchmark_setups or s.name in self.benchmark_setups]

    def needle_setups(self) -> list[EvalSetup]:
        """The setups the needle units use."""
        return [s for s in self.parsed_setups() if not self.niah_setups or s.name in self.niah_setups]

    def items_per_task(self) -> dict[str, int | None]:
        """{task: items}: `limit` for every task, then the `task_limits` entries (task=N)."""
        limits: dict[str, int | None] = {t: self.limit for t in self.tasks}
        for entry in self.task_limits:
            task, _, n = entry.partition("=")
            if not n.isdigit():
                raise ValueError(f"task_limits entry {entry!r}: write task=N, e.g. ssa_hellaswag=2000.")
            limits[task] = int(n)
        return limits


@dataclass(frozen=True)
class Unit:
    """One step of an evaluation: `stage` for `setup` (None: every setup at once) at `length` (None: none); NIAH
    units also name their needle `kind`."""

    stage: str
    setup: EvalSetup | None = None
    length: int | None = None
    kind: str | None = None

    def __str__(self) -> str:
        kind = f" {self.kind}" if self.kind else ""
        return f"{self.stage}{kind}{' ' + self.setup.name if self.setup else ''}{' @ ' + str(self.length) if self.length else ''}"

    @property
    def key(self) -> str:
        """The entry of a setup's result that holds this unit: "niah" for the magic needle, "niah-<kind>" else."""
        return self.stage if self.kind in (None, "magic") else f"{self.stage}-{self.kind}"


def new_result(model: str, plan: EvalPlan) -> dict:
    """An empty result of `model` for `plan`: one entry per setup."""
    result = {"model": model, "runs": [], "settings": {}, "setups": {}, "notes": []}
    return _with_setups(result, plan)


def _with_setups(result: dict, plan: EvalPlan) -> dict:
    for key, empty in (("runs", []), ("settings", {}), ("setups", {}), ("notes", [])):
        result.setdefault(key, empty)
    for s in plan.parsed_setups():
        result["setups"].setdefault(s.name, {}).update(label=s.label, mode=s.mode)
    return result


def _units(plan: EvalPlan) -> list[Unit]:
    setups = plan.parsed_setups()
    sparse = any(s.mode == "sparse" for s in setups)
    units = {
        "ppl": [Unit("ppl", s, n) for s in setups for n in plan.ppl_lengths],
        "sparsity": [Unit("sparsity", None, n) for n in plan.sparsity_lengths] if sparse else [],
        "benchmarks": [Unit("benchmarks")],
        "niah": [
            Unit("niah", s, n, k) for k in plan.niah_kinds for s in plan.needle_setups() for n in plan.niah_lengths
        ],
        "ruler": [Unit("ruler", s) for s in setups],
    }
    return [u for stage in dict.fromkeys(plan.stages) for u in units[stage]]


def _done(unit: Unit, plan: EvalPlan, entries: dict) -> bool:
    if unit.stage == "ppl":
        return str(unit.length) in entries[unit.setup.name].get("ppl", {})
    if unit.stage == "sparsity":
        sparse = [s for s in plan.parsed_setups() if s.mode == "sparse"]
        return all(str(unit.length) in entries[s.name].get("sparsity", {}) for s in sparse)
    if unit.stage == "benchmarks":
        return all("benchmarks" in entries[s.name] for s in plan.scored_setups())
    if unit.stage == "niah":
        return unit.length in entries[unit.setup.name].get(unit.key, {}).get("context_lengths", [])
    return "ruler" in entries[unit.setup.name]


def pending_units(plan: EvalPlan, result: dict) -> list[Unit]:
    """The units of `plan` that `result` does not hold yet (after forgetting the stages in `plan.redo`)."""
    _with_setups(result, plan)
    for entry in result["setups"].values():
        for stage in plan.redo:
            for key in [k for k in entry if k == stage or k.startswith(f"{stage}-")]:
                entry.pop(key)
    return [u for u in _units(plan) if not _done(u, plan, result["setups"])]


def run_evaluation(
    plan: EvalPlan, result: dict, load: Callable[[], tuple], save: Callable[[dict, list[str]], None]
) -> bool:
    """Run the pending units of `plan` into `result`; `load()` -> (model, tokenizer) is called only if some are
    pending; `save(result, finished)` after every unit (finished: the labels and seconds of this call's units).
    Every call finishes at least one unit, so a short time budget still makes progress. Returns whether every unit
    is done."""
    todo = pending_units(plan, result)
    if not todo:
        return True
    start, finished = time.monotonic(), []
    model, tokenizer = load()
    context = _Context(plan, model, tokenizer)
    for unit in todo:
        if finished and plan.time_budget_s is not None and time.monotonic() - start > plan.time_budget_s:
            break
        t0 = time.monotonic()
        with context.positions(unit.length) as rope:
            _RUNNERS[unit.stage](context, unit, result)
        result["settings"].update(dtype=plan.dtype, backend=plan.backend)
        if rope:
            result["settings"]["long_rope"] = rope
        finished.append(f"{unit} ({time.monotonic() - t0:.0f} s)")
        save(result, finished)
    return not pending_units(plan, result)


def run_phases(
    plans: Sequence[EvalPlan],
    result: dict,
    load: Callable[[], tuple],
    save: Callable[[dict, list[str]], None],
    time_budget_s: float | None = None,
) -> bool:
    """`run_evaluation` of each plan in turn on one result (a study's priorities: say perplexity first, then the
    needles its targets need, then the rest), sharing one `time_budget_s` (seconds from now; None: no limit) and one
    loaded model. Like `run_evaluation`, a call finishes at least one unit; after it, a phase starts only while time
    is left. `plans[0].redo` alone applies (the later phases must not forget what the earlier ones computed).
    `save(result, finished)` gets every unit finished so far in this call. Returns whether every phase is done."""
    start, loaded, finished = time.monotonic(), [], []

    def load_once():
        if not loaded:
            loaded.append(load())
        return loaded[0]

    for i, plan in enumerate(plans):
        left = None if time_budget_s is None else time_budget_s - (time.monotonic() - start)
        if finished and left is not None and left <= 0:  # (a call always finishes one unit, as run_evaluation does)
            return not any(pending_units(dataclasses.replace(p, redo=[]), result) for p in plans[i:])
        phase = dataclasses.replace(plan, time_budget_s=left, redo=plan.redo if i == 0 else [])
        before = len(finished)

        def save_phase(r: dict, done: list[str], before=before) -> None:
            finished[before:] = done
            save(r, list(finished))

        if not run_evaluation(phase, result, load_once, save_phase):
            return False
    return True


class _Context:
    """What the units share: the plan, the model and tokenizer, and the NIAH haystack (tokenized once)."""

    def __init__(self, plan: EvalPlan, model, tokenizer):
        self.plan, self.model, self.tokenizer = plan, model, tokenizer
        self._haystack = None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.trained_context = getattr(base.config, "max_position_embeddings", None)

    def setup(self, setup: EvalSetup):
        return apply_setup(self.model, setup, backend=self.plan.backend)

    def positions(self, length: int | None):
        """The model's RoPE for a unit of `length` tokens: llama3-scaled by `long_rope_factor` beyond the trained
        context (yields the scaling, recorded in the result's settings), else unchanged (yields None)."""
        factor, trained = self.plan.long_rope_factor, self.trained_context
        if not factor or length is None or trained is None or length <= trained:
            return contextlib.nullcontext()
        from .perplexity import rope_scaled

        return rope_scaled(self.model, factor, original_max_position_embeddings=trained)

    def haystack(self) -> list[int]:
        if self._haystack is None:
            from .niah import essay_haystack_ids

            self._haystack = essay_haystack_ids(self.tokenizer)
        return self._haystack


def _ppl(c: _Context, unit: Unit, result: dict) -> None:
    from .perplexity import austen_windows, perplexity

    plan = c.plan
    windows = austen_windows(c.tokenizer, unit.length, span=plan.ppl_span, novels=plan.ppl_novels or None)
    r = perplexity(c.setup(unit.setup), windows.to(plan.device), desc=f"ppl {unit.setup.name} @ {unit.length}")
    rope = getattr(c.model.config, "rope_parameters", None) or {}
    entry = {**r.to_dict(), "rope_factor": rope.get("factor") if rope.get("rope_type") == "llama3" else None}
    result["setups"][unit.setup.name].setdefault("ppl", {})[str(unit.length)] = entry
    result["settings"]["ppl"] = {"span": plan.ppl_span, "novels": plan.ppl_novels or "all six"}


def _sparsity(c: _Context, unit: Unit, result: dict) -> None:
    from ..assets import austen_texts
    from .attention_stats import attention_statistics
    from .perplexity import austen_windows

    plan, n = c.plan, unit.length
    sparse = [s for s in plan.parsed_setups() if s.mode == "sparse"]
    titles = sorted(austen_texts())[: plan.sparsity_windows]
    windows = austen_windows(c.tokenizer, n, span=n, novels=titles)
    budgets = list(dict.fromkeys(s.budget for s in sparse))
    stats = attention_statistics(c.setup(EvalSetup("full", "full")), windows, budgets, backend=plan.backend)
    for s in sparse:
        result["setups"][s.name].setdefault("sparsity", {})[str(n)] = stats[s.budget.name]
    result["settings"]["sparsity"] = {
        "context_lens": sorted({*result["settings"].get("sparsity", {}).get("context_lens", []), n}),
        "novels": titles,
        "measured_on": "the model's own full attention (converted, full mode)",
    }


def _benchmarks(c: _Context, unit: Unit, result: dict) -> None:
    from ..assets import benchmark_tasks
    from .harness import record_benchmarks

    plan = c.plan
    record_benchmarks(result, c.model, c.tokenizer, plan.scored_setups(), plan.tasks, plan.items_per_task(),
                      include_path=plan.include_path or benchmark_tasks(), batch_size=plan.batch_size,
                      check_items=plan.benchmark_check, backend=plan.backend)  # fmt: skip


def _niah(c: _Context, unit: Unit, result: dict) -> None:
    from .niah import MAX_NEW_TOKENS, NIAHResult, run_niah

    plan, name, kind = c.plan, unit.setup.name, unit.kind or "magic"
    r = run_niah(c.setup(unit.setup), c.tokenizer, [unit.length], plan.niah_depths, samples_per_cell=plan.niah_samples,
                 kind=kind, batch_size=plan.niah_batch, haystack_ids=c.haystack(), desc=str(unit))  # fmt: skip
    old = result["setups"][name].get(unit.key) or {"context_lengths": [], "scores": {}, "samples": []}
    merged = NIAHResult(sorted(old["context_lengths"] + [unit.length]), plan.niah_depths, {**old["scores"], **r.scores},
                        old["samples"] + r.samples, kind, {**old.get("intervals", {}), **r.intervals},
                        {**old.get("trials", {}), **r.trials})  # fmt: skip
    result["setups"][name][unit.key] = merged.to_dict()
    result["settings"]["niah"] = {"samples_per_cell": plan.niah_samples, "depths": plan.niah_depths,
                                  "kinds": plan.niah_kinds, "max_new_tokens": MAX_NEW_TOKENS}  # fmt: skip


def _ruler(c: _Context, unit: Unit, result: dict) -> None:
    from lm_eval.models.huggingface import HFLM

    from .harness import ruler_niah

    lm = HFLM(pretrained=c.setup(unit.setup), tokenizer=c.tokenizer, batch_size=1)
    scores = ruler_niah(lm, c.tokenizer.name_or_path, c.plan.ruler_lengths, limit=c.plan.ruler_limit)
    result["setups"][unit.setup.name]["ruler"] = scores


_RUNNERS = {"ppl": _ppl, "sparsity": _sparsity, "benchmarks": _benchmarks, "niah": _niah, "ruler": _ruler}
