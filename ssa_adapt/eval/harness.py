"""lm-eval from Python with an `ssa` model: the local benchmark tasks, RULER's niah tasks and LongBench.

- Benchmarks: the offline task folder of ``ssa_adapt.assets.benchmark_tasks()`` (ssa_hellaswag, ssa_piqa,
  ssa_arc_easy, ssa_arc_challenge, ssa_winogrande, ssa_lambada), or any lm-eval task name.
- RULER niah (lm-eval's `niah_single_1`, ...): synthetic, generated from the model's tokenizer; `niah_single_1`
  (repeated-sentence haystack) runs offline once `wonderwords` and `nltk` are installed. RULER reports one metric
  per context length; lengths below 4096 are not in its metric list, so use 4096 and up.
- LongBench (lm-eval's `longbench` group, data `Xnhyacinth/LongBench` on the Hub) with greedy decoding. It needs the
  Hugging Face Hub (or a datasets cache that holds it); offline, `longbench` raises `LongBenchUnavailable` at once
  with what to do instead of failing deep inside `datasets`. On a machine that reaches the Hub:

      python -m ssa_adapt.eval.lm_eval_cli --model ssa --model_args pretrained=PATH,max_length=32768 \\
          --tasks longbench --gen_kwargs do_sample=False --batch_size 1 --apply_chat_template

  (`recipes/eval_longbench.py` runs the same from Python.)
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "LONGBENCH_DATASET",
    "LongBenchUnavailable",
    "task_manager",
    "evaluate_tasks",
    "benchmark_scores",
    "max_request_tokens",
    "loglikelihoods",
    "benchmarks_for_setups",
    "ruler_niah",
    "check_longbench_available",
    "longbench",
]

LONGBENCH_DATASET = "Xnhyacinth/LongBench"  # what lm-eval 0.4.x's longbench task YAMLs load


class LongBenchUnavailable(RuntimeError):
    """LongBench's data cannot be had here (no Hub access and no local cache)."""


def task_manager(include_path: str | Path | None = None, metadata: dict | None = None):
    """lm-eval's TaskManager for `include_path` and `metadata`, made once per process: making one indexes every task
    YAML lm-eval ships (~10k files, seconds), and an evaluation of several setups asks for the same one each time."""
    return _task_manager(str(include_path) if include_path else None, json.dumps(metadata, sort_keys=True))


@functools.cache
def _task_manager(include_path: str | None, metadata: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, metadata=json.loads(metadata))


def evaluate_tasks(
    lm,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    metadata: dict | None = None,
    gen_kwargs: dict | None = None,
    batch_size: int | None = None,
    log_samples: bool = False,
    **kwargs,
) -> dict:
    """lm_eval.simple_evaluate on `lm` (an lm-eval LM, e.g. `SSALM(...)`); returns lm-eval's full results dict."""
    import lm_eval

    from . import lm_eval_model  # noqa: F401  (registers "ssa" for string model names)

    manager = task_manager(include_path, metadata)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        task_manager=manager,
        gen_kwargs=gen_kwargs,
        batch_size=batch_size,
        log_samples=log_samples,
        metadata=metadata,
        **kwargs,
    )


def benchmark_scores(lm, tasks: Sequence[str], *, include_path=None, limit=None, batch_size=None) -> dict:
    """{task: {metric: value, ..., "n": items}} for multiple-choice / loglikelihood tasks."""
    out = evaluate_tasks(lm, tasks, include_path=include_path, limit=limit, batch_size=batch_size)
    scores = {}
    for task in tasks:
        metrics = out["results"].get(task, {})
        row = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and "stderr" not in k}
        row.update({f"{k.split(',')[0]}_stderr": v for k, v in metrics.items() if "_stderr," in k})
        row["n"] = out.get("n-samples", {}).get(task, {}).get("effective")
        scores[task] = row
    return scores


def max_request_tokens(
    tasks: Sequence[str], tokenizer, *, include_path=None, limit: int | float | None = None
) -> dict[str, int | None]:
    """{task: the longest model input its requests need, in tokens}, None for tasks that generate.

    A loglikelihood request is scored in one forward pass over context + continuation (lm-eval's HF model encodes
    them separately), so when every request of a task fits in a sparse setup's receptive field
    (block_size x block_count) every block is selected and the sparse model scores it exactly as full attention
    does: that setup's scores on the task are the full model's.
    """
    from lm_eval.tasks import get_task_dict

    manager = task_manager(include_path)
    out: dict[str, int | None] = {}
    for name, task in get_task_dict(list(tasks), manager).items():
        name = getattr(name, "group_name", name)
        if task.OUTPUT_TYPE not in ("loglikelihood", "multiple_choice"):
            out[name] = None
            continue
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        longest = 0
        for inst in task.instances:
            context, continuation = inst.args[0], inst.args[1]
            n = len(tokenizer(context, add_special_tokens=False).input_ids) if context else 1
            longest = max(longest, n + len(tokenizer(continuation, add_special_tokens=False).input_ids))
        out[name] = longest
    return out


def loglikelihoods(results: dict, task: str) -> dict[tuple[int, int], float]:
    """{(doc_id, choice): log-likelihood} from lm-eval results run with log_samples=True."""
    out = {}
    for sample in results["samples"][task]:
        for i, resp in enumerate(sample["resps"]):
            out[(sample["doc_id"], i)] = float(resp[0][0])
    return out


def _scores(results: dict, tasks: Sequence[str]) -> dict[str, dict]:
    scores = {}
    for task in tasks:
        metrics = results["results"].get(task, {})
        row = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
        row["n"] = results.get("n-samples", {}).get(task, {}).get("effective")
        scores[task] = row
    return scores


def _by_limit(tasks: Sequence[str], limits: dict) -> list[tuple[int | float | None, list[str]]]:
    groups: dict = {}
    for t in tasks:
        groups.setdefault(limits.get(t), []).append(t)
    return list(groups.items())


def benchmarks_for_setups(
    model,
    tokenizer,
    setups,
    tasks: Sequence[str],
    *,
    include_path=None,
    limit: int | float | None | dict[str, int | float | None] = None,
    batch_size: int = 16,
    check_items: int = 50,
    backend: str | None = None,
) -> dict[str, dict[str, dict]]:
    """Benchmark scores of one loaded model under each setup (`EvalSetup`s, applied in place, in order).

    `limit` is items per task (all tasks, or a {task: limit} dict; None = the whole set). Once an `original` or
    `full` setup has run, a sparse setup whose receptive field holds every request of a task reuses those scores:
    every block is selected, so it computes full attention. The first `check_items` items of each
    reused task are still run sparse and their log-likelihoods compared with the full run's
    (`check_max_abs_loglik_diff`). -> {setup name: {task: {metric: value, "n": items, ...}}}
    """
    from .lm_eval_model import HFLM, SSALM
    from .setups import apply_setup

    tasks = list(tasks)
    limits = dict(limit) if isinstance(limit, dict) else {t: limit for t in tasks}
    longest: dict[str, int | None] = {}
    for lim, group in _by_limit(tasks, limits):
        longest.update(max_request_tokens(group, tokenizer, include_path=include_path, limit=lim))
    out: dict[str, dict[str, dict]] = {}
    reference: str | None = None
    reference_ll: dict[str, dict] = {}
    for setup in setups:
        apply_setup(model, setup, backend=backend)
        cls = HFLM if setup.mode == "original" else SSALM
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        reusable = []
        if setup.mode == "sparse" and reference is not None:
            rf = setup.budget.receptive_field
            reusable = [t for t in tasks if t in reference_ll and longest.get(t) is not None and longest[t] <= rf]
        run = [t for t in tasks if t not in reusable]
        scores: dict[str, dict] = {}
        keep = reference is None and setup.mode in ("original", "full")
        for lim, group in _by_limit(run, limits):
            results = evaluate_tasks(lm, group, include_path=include_path, limit=lim, log_samples=keep)
            scores.update(_scores(results, group))
            if keep:
                reference_ll.update({t: loglikelihoods(results, t) for t in group if longest.get(t) is not None})
        if keep and run:
            reference = setup.name
        if reusable:
            check = evaluate_tasks(lm, reusable, include_path=include_path, limit=check_items, log_samples=True)
            for task in reusable:
                ref, new = reference_ll[task], loglikelihoods(check, task)
                scores[task] = {
                    **out[reference][task],
                    "reused_from": reference,
                    "reason": f"every request fits: {longest[task]} tokens <= receptive field {setup.budget.receptive_field}",
                    "check_items": check.get("n-samples", {}).get(task, {}).get("effective"),
                    "check_max_abs_loglik_diff": max(abs(new[k] - ref[k]) for k in new),
                }
        out[setup.name] = {t: scores[t] for t in tasks}
    return out


def ruler_niah(
    lm,
    tokenizer: str,
    seq_lengths: Sequence[int] = (4096, 8192),
    *,
    tasks: Sequence[str] = ("niah_single_1",),
    limit: int | None = 20,
) -> dict[str, dict[str, float]]:
    """lm-eval's RULER niah tasks, `limit` prompts per length (one evaluation per length, so the limit applies to
    each). `tokenizer` names the tokenizer RULER sizes the prompts with (a path or Hub id). -> {task: {length: score}}
    """
    small = [n for n in seq_lengths if n < 4096]
    if small:
        raise ValueError(f"RULER reports lengths 4096 and up only; drop {small} (our own NIAH covers shorter ones).")
    scores: dict[str, dict[str, float]] = {t: {} for t in tasks}
    for n in seq_lengths:
        meta = {"max_seq_lengths": [int(n)], "tokenizer": str(tokenizer)}
        out = evaluate_tasks(lm, tasks, limit=limit, metadata=meta)
        for task in tasks:
            metrics = out["results"].get(task, {})
            scores[task][str(n)] = metrics.get(f"{n},none")
    return scores


def check_longbench_available(timeout: float = 10.0) -> None:
    """Raise LongBenchUnavailable, saying what to do, unless LongBench's data is cached or the Hub answers."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        snapshot_download(LONGBENCH_DATASET, repo_type="dataset", local_files_only=True)
        return
    except Exception:  # not cached: try the Hub
        pass
    hint = (
        f"LongBench needs its data, the Hugging Face dataset {LONGBENCH_DATASET!r}, which is not in the local cache "
        "and cannot be downloaded here"
    )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
        "0",
        "",
    ):
        raise LongBenchUnavailable(
            f"{hint} (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set). Run it on a machine that reaches huggingface.co "
            f"(or first `huggingface-cli download --repo-type dataset {LONGBENCH_DATASET}` there and copy the cache)."
        )
    try:
        HfApi().dataset_info(LONGBENCH_DATASET, timeout=timeout)
    except Exception as err:
        raise LongBenchUnavailable(
            f"{hint}: the Hub did not answer ({type(err).__name__}: {str(err).splitlines()[0][:200]}). Run it on a "
            f"machine that reaches huggingface.co, or pre-download it with "
            f"`huggingface-cli download --repo-type dataset {LONGBENCH_DATASET}`."
        ) from err


def longbench(
    lm,
    tasks: Sequence[str] = ("longbench",),
    *,
    limit: int | None = None,
    max_gen_toks: int | None = None,
) -> dict:
    """LongBench through lm-eval's own tasks with greedy decoding; returns lm-eval's `results` per task.

    Fails at once with LongBenchUnavailable when the data cannot be had.
    """
    check_longbench_available()
    gen = {"do_sample": False, "temperature": 0.0}
    if max_gen_toks is not None:
        gen["max_gen_toks"] = int(max_gen_toks)
    return evaluate_tasks(lm, tasks, limit=limit, gen_kwargs=gen)["results"]


def record_benchmarks(result: dict, model, tokenizer, setups, tasks: Sequence[str], limits: dict, **kwargs) -> None:
    """`benchmarks_for_setups(model, tokenizer, setups, tasks, limit=limits, **kwargs)` filed into an eval-suite
    result: result["setups"][name]["benchmarks"], result["settings"]["benchmarks"], and a note in result["notes"]
    when a sparse setup reused the full-attention scores (replacing an earlier such note)."""
    scores = benchmarks_for_setups(model, tokenizer, setups, tasks, limit=limits, **kwargs)
    for s in setups:
        result["setups"][s.name]["benchmarks"] = scores[s.name]
    result["settings"]["benchmarks"] = {
        "tasks": list(tasks),
        "items": {t: limits[t] or "full validation set" for t in tasks},
    }
    if any(b.get("reused_from") for sc in scores.values() for b in sc.values()):
        note = (
            "* sparse score equal to the full-attention one by construction: every request of the task fits in the "
            "setup's receptive field, so all blocks are selected; the first "
            f"{kwargs.get('check_items', 50)} items were re-run sparse to confirm (check_max_abs_loglik_diff in the JSON)."
        )
        result["notes"] = [n for n in result["notes"] if not n.startswith("* sparse score")] + [note]
