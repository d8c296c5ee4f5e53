"""The evaluation report: one JSON per model (every number, per-layer and per-head detail included) and a
markdown table of the headline figures. Partial runs of the same model (say long-context stages on a GPU,
benchmarks on a CPU) merge into one report; each run keeps its own device, date and command."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

import torch

__all__ = ["run_info", "merge_results", "markdown_table", "write_report", "BENCHMARK_COLUMNS"]

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
    """Where, when and how a run was made."""
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
        "stages": list(stages),
        "host_cpus": os.cpu_count(),
        "versions": versions,
    }


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


def markdown_table(result: dict) -> str:
    """The headline table: PPL per length, AttnSparsity, benchmarks, NIAH per length, one row per setup."""
    setups = result["setups"]
    lengths = sorted({int(n) for s in setups.values() for n in s.get("ppl", {})})
    niah_lengths = sorted({int(n) for s in setups.values() for n in s.get("niah", {}).get("by_length", {})})
    bench = [c for c in BENCHMARK_COLUMNS if any(c[1] in s.get("benchmarks", {}) for s in setups.values())]
    stats_len = result.get("settings", {}).get("sparsity", {}).get("context_len")
    has_sparsity = any("sparsity" in s for s in setups.values())
    head = ["setup"] + [f"PPL {_k(n)}" for n in lengths]
    if has_sparsity:
        head.append("AttnSparsity" + (f" @{_k(stats_len)}" if stats_len else ""))
    head += [f"{title} ({metric})" for title, _, metric in bench]
    head += [f"NIAH {_k(n)}" for n in niah_lengths]
    rows = []
    for s in setups.values():
        row = [s.get("label", "?")]
        row += [_fmt(s.get("ppl", {}).get(str(n), {}).get("ppl")) for n in lengths]
        if has_sparsity:
            sp = s.get("sparsity")
            row.append(_fmt(sp["sparsity"], 3) if sp else ("1 (all)" if s.get("mode") != "sparse" else "—"))
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
        md.append(f"- {', '.join(r['stages'])}: {r['device']}, {r['date']}, `{r['command']}`")
    text = "\n".join(md) + "\n"
    if md_path is not None:
        Path(md_path).write_text(text)
    return text
