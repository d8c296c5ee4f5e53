"""The evaluation report: one JSON per model (every number, per-layer and per-head detail included) and a
markdown table of the headline figures. Partial runs of the same model (say long-context stages on a GPU,
benchmarks on a CPU) merge into one report; each run keeps its own device, date and command."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from ..provenance import git_commit

__all__ = [
    "run_info",
    "merge_results",
    "markdown_table",
    "write_report",
    "plot_budget_curves",
    "draw_budget_curves",
    "study_report",
    "sparsity_at",
    "read_json",
    "write_json",
    "BENCHMARK_COLUMNS",
]

# (column title, task, metric): lm-eval's usual headline metric of each benchmark
BENCHMARK_COLUMNS = (
    ("HellaSwag", "ssa_hellaswag", "acc_norm"),
    ("PIQA", "ssa_piqa", "acc"),
    ("ARC-E", "ssa_arc_easy", "acc"),
    ("ARC-C", "ssa_arc_challenge", "acc_norm"),
    ("WinoGrande", "ssa_winogrande", "acc"),
    ("LAMBADA", "ssa_lambada", "acc"),
)


def run_info(stages, device: str | torch.device) -> dict:
    """Where, when and how a run was made: device, date, command, commit, stages, versions."""
    device = torch.device(device)
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    import transformers

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import lm_eval

        versions["lm_eval"] = lm_eval.__version__
    except ImportError:
        pass
    return {
        "device": hardware,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": git_commit(),
        "stages": list(stages),
        "host_cpus": os.cpu_count(),
        "versions": versions,
    }


def read_json(path: Path) -> dict | None:
    """The JSON object at `path`, None when there is no file."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def write_json(path: Path, data: dict, *, mirror: Path | None = None) -> None:
    """Write `data` to `path` atomically (an interrupted write never leaves half a file), and a copy into the folder
    `mirror` if given (say the folder whose files come back from a machine that is about to go away)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(data, indent=1, default=float) + "\n")
    path.with_suffix(".tmp").replace(path)
    if mirror is not None:
        Path(mirror).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(mirror) / path.name)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_results(*results: dict) -> dict:
    """Merge partial reports of one model: setups and settings deep-merged, runs and notes concatenated."""
    merged: dict = {"model": None, "runs": [], "settings": {}, "setups": {}, "notes": []}
    for r in results:
        merged["model"] = merged["model"] or r.get("model")
        merged["runs"] += r.get("runs", [])
        merged["settings"] = _deep_merge(merged["settings"], r.get("settings", {}))
        merged["setups"] = _deep_merge(merged["setups"], r.get("setups", {}))
        merged["notes"] += [n for n in r.get("notes", []) if n not in merged["notes"]]
    return merged


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _fmt(value, digits=2, pct=False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}" if pct else f"{value:.{digits}f}"


def sparsity_at(entry: dict, length: int | None = None) -> float | None:
    """Mean AttnSparsity of one setup's result entry at `length` tokens (None: the shortest length measured)."""
    by_length = entry.get("sparsity") or {}
    if not by_length:
        return None
    key = str(length) if length is not None else str(min(int(n) for n in by_length))
    return (by_length.get(key) or {}).get("sparsity")


def markdown_table(result: dict) -> str:
    """The headline table: PPL per length, AttnSparsity per length, benchmarks, NIAH per length, one row per setup."""
    setups = result["setups"]
    lengths = sorted({int(n) for s in setups.values() for n in s.get("ppl", {})})
    niah_lengths = sorted({int(n) for s in setups.values() for n in s.get("niah", {}).get("by_length", {})})
    bench = [c for c in BENCHMARK_COLUMNS if any(c[1] in s.get("benchmarks", {}) for s in setups.values())]
    stats_lengths = sorted({int(n) for s in setups.values() for n in s.get("sparsity", {})})
    head = ["setup"] + [f"PPL {_k(n)}" for n in lengths]
    head += [f"AttnSparsity @{_k(n)}" for n in stats_lengths]
    head += [f"{title} ({metric})" for title, _, metric in bench]
    head += [f"NIAH {_k(n)}" for n in niah_lengths]
    rows = []
    for s in setups.values():
        row = [s.get("label", "?")]
        row += [_fmt(s.get("ppl", {}).get(str(n), {}).get("ppl")) for n in lengths]
        for n in stats_lengths:
            value = sparsity_at(s, n)
            row.append(_fmt(value, 3) if value is not None else ("1 (all)" if s.get("mode") != "sparse" else "—"))
        for _, task, metric in bench:
            b = s.get("benchmarks", {}).get(task)
            mark = "*" if b and b.get("reused_from") else ""
            row.append(_fmt(b.get(metric), pct=True) + mark if b else "—")
        row += [_fmt(s.get("niah", {}).get("by_length", {}).get(str(n)), 2) for n in niah_lengths]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(result: dict, json_path: str | Path, md_path: str | Path | None = None, title: str | None = None):
    """Write the JSON and (if asked) the markdown report; returns the markdown text."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    md = [f"# {title or 'Evaluation: ' + str(result.get('model'))}", "", markdown_table(result), ""]
    for note in result.get("notes", []):
        md.append(f"- {note}")
    md += ["", "Runs:", ""]
    for r in result.get("runs", []):
        md.append(
            f"- {', '.join(r['stages'])}: {r['device']}, {r['date']}, commit {r.get('commit', 'not recorded')}, `{r['command']}`"
        )
    text = "\n".join(md) + "\n"
    if md_path is not None:
        Path(md_path).write_text(text)
    return text


def plot_budget_curves(
    curves: dict[str, list[tuple[int, float]]], context_len: int, path: Path, budgets: dict[int, str] | None = None
) -> Path:
    """Perplexity at `context_len` against the receptive field (block_size x block_count; full = context_len),
    one line per model, log2 x axis; `budgets` names the sparse ticks ({256: "16x16"})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    draw_budget_curves(ax, curves, context_len, budgets)
    ax.set_title("SmolLM2-135M retrofit: perplexity vs sparse budget")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_budget_curves(
    ax, curves: dict[str, list[tuple[int, float | None]]], context_len: int, budgets: dict[int, str] | None = None
) -> None:
    """`plot_budget_curves`' lines on a matplotlib axis `ax` ({label: [(receptive field, PPL)]})."""
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
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _ppl(entry: dict | None, setup: str | None, length: int) -> float | None:
    if entry is None or setup is None:
        return None
    return entry["setups"].get(setup, {}).get("ppl", {}).get(str(length), {}).get("ppl")


def _window_nll(entry: dict | None, setup: str | None, length: int) -> list[float] | None:
    if entry is None or setup is None:
        return None
    return entry["setups"].get(setup, {}).get("ppl", {}).get(str(length), {}).get("window_nll")


def study_report(
    evals: dict[str, dict | None],
    trains: dict[str, dict | None],
    names: dict[str, str],
    png: Path,
    out: Path,
    *,
    target_length: int | None = None,
    target_setup: str | None = None,
) -> tuple[dict, str]:
    """The retrofit study's report from its summaries -> (JSON-ready dict, markdown); writes the plot to `png`.

    evals: {model: eval result or None} for the models of `names` ({"original": "Original", "full": "Full-Full",
    "sparse": "Sparse-Sparse", "ssa": "SSA"}); trains: {mode: `run_summary` (+ "segments") or None}; out: where
    the JSON and markdown go (the markdown links the plot relative to it). The targets
    are checked at `target_length` (default: the longest perplexity length) in `target_setup` (default: the first
    sparse setup, the trained budget)."""
    from .setups import parse_setup
    from .targets import check_targets, verdict_row

    missing = [f"eval-{m}" for m, e in evals.items() if e is None] + [
        f"train-{m}" for m, t in trains.items() if t is None
    ]
    found = {m: e for m, e in evals.items() if e is not None}
    setups = list(dict.fromkeys(s for e in found.values() for s in e["setups"]))
    sparse_setups = [s for s in setups if parse_setup(s).mode == "sparse"]
    trained = target_setup or sparse_setups[0]
    lengths = sorted({int(n) for e in found.values() for s in e["setups"].values() for n in s.get("ppl", {})})
    length = target_length or lengths[-1]
    ppl = {m: {"full": _ppl(e, "full", length), "sparse": _ppl(e, trained, length)} for m, e in evals.items()}
    sparsity = {m: sparsity_at(e["setups"].get(trained, {})) for m, e in found.items()}
    windows = {
        m: {"full": _window_nll(e, "full", length), "sparse": _window_nll(e, trained, length)}
        for m, e in evals.items()
    }
    targets = check_targets(ppl, sparsity, windows=windows)
    rows, curves = {}, {}
    for m, e in found.items():
        curves[names[m]] = [
            (length if s == "full" else parse_setup(s).budget.receptive_field, _ppl(e, s, length)) for s in setups
        ]
        for s, entry in e["setups"].items():
            rows[f"{m}/{s}"] = {**entry, "label": f"{names[m]}, {entry.get('label', s)}"}
    settings = next(iter(found.values()))["settings"]
    budgets = {parse_setup(s).budget.receptive_field: s.split("-")[1] for s in sparse_setups}
    plot_budget_curves(curves, length, png, budgets)
    result = {
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
    md = [f"Targets, held-out Austen perplexity at {length} tokens, sparse = `{trained}`:", ""]
    md += ["| target | SSA | reference | margin | verdict |", "|---|---|---|---|---|"]
    md += [verdict_row(t) for t in targets]
    md += [
        "",
        f"![perplexity vs sparse budget]({os.path.relpath(png, out.parent)})",
        "",
        markdown_table({"setups": rows, "settings": settings}),
    ]
    md += ["", "Training (same config, data, steps, seed and schedule; `--train_mode` alone differs):", ""]
    md += ["| mode | steps | tokens | final loss (CE) | calls |", "|---|---|---|---|---|"]
    for m, t in trains.items():
        ce = f"{t['final_lm_loss']:.3f}" if t and t.get("final_lm_loss") is not None else "—"
        md.append(
            f"| {m} | {t['steps']} | {t['tokens']:,} | {ce} | {len(t['segments'])} |"
            if t
            else f"| {m} | not run | | | |"
        )
    notes = list(dict.fromkeys(n for e in found.values() for n in e.get("notes", [])))
    md += ["", *[f"- {n}" for n in notes]]
    md.append("- Rows: model, evaluation mode. Full->Sparse = the Full-Full model evaluated sparse; other sparse budgets "
              "are evaluated without retraining.")  # fmt: skip
    md.append(f"- AttnSparsity: full-attention mass inside the selected blocks, on each model's own full attention "
              f"({settings.get('sparsity', {}).get('novels')}).")  # fmt: skip
    md += [
        f"- Settings: {json.dumps({k: v for k, v in settings.items() if k != 'niah'}, default=str)}",
        "",
        "Runs:",
        "",
    ]
    for m, e in found.items():
        md += [
            f"- eval {m}: {', '.join(r['stages'])}: {r['device']}, {r['date']}, `{r['command']}`" for r in e["runs"]
        ]
    for m, t in trains.items():
        for seg in (t or {}).get("segments", []):
            md.append(f"- train {m} to step {seg['to_step']} ({seg['seconds']:.0f} s): {seg['device']}, {seg['date']}, "
                      f"commit {seg.get('commit', 'not recorded')}, `{seg['command']}`")  # fmt: skip
    return result, "\n".join(md) + "\n"
