"""The long-context retrofit study's report (`recipes/retrofit_long_context.py report`): from the summaries of its
trainings and evaluations (`ssa_adapt.eval.stages` results, one per model) to the targets with their verdicts, the
tables, three plots and one JSON of every number.

Rows are (model, setup): each model in full mode and in every sparse budget. Perplexity cells carry the paired
bootstrap interval of their difference from Full-Full's full mode at the same length (same windows); needle cells
pool the kinds asked (values found / values asked) with a Wilson interval; needle targets compare the same prompts
(every model and setup got the same needles) with a paired bootstrap interval of the difference of the rates.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

from .niah import binomial_interval, plot_niah_grid
from .report import BENCHMARK_COLUMNS, _fmt, _k, draw_budget_curves, sparsity_at
from .setups import parse_setup
from .targets import above_target, below_target, paired_interval, rate_target, verdict_row, within_target

__all__ = [
    "ppl_of",
    "needle_prompts",
    "needle_rate",
    "long_context_targets",
    "lora_gain",
    "plot_ppl_vs_context",
    "plot_ppl_vs_budget",
    "long_context_report",
]


def _niah_key(kind: str) -> str:
    return "niah" if kind == "magic" else f"niah-{kind}"


def ppl_of(evals: dict, model: str, setup: str, length: int, field: str = "ppl"):
    """`field` ("ppl", "window_nll", "rope_factor", ...) of a model's perplexity at `length` in `setup`, or None."""
    entry = ((evals.get(model) or {}).get("setups", {}).get(setup) or {}).get("ppl", {}).get(str(length))
    return (entry or {}).get(field)


def needle_prompts(entry: dict | None, kinds: Sequence[str], length: int) -> dict[tuple, tuple[float, int]]:
    """{(kind, depth, answers): (values found, values asked)} of every needle prompt of one setup's result `entry`
    at `length` (the key names the prompt: the same prompts on every model and setup)."""
    out = {}
    for kind in kinds:
        for s in ((entry or {}).get(_niah_key(kind)) or {}).get("samples", []):
            if s["context_len"] == length:
                answers = tuple(s.get("answers") or [s["answer"]])
                out[(kind, float(s["depth"]), answers)] = (s["score"] * len(answers), len(answers))
    return out


def needle_rate(entry: dict | None, kinds: Sequence[str], length: int) -> dict | None:
    """{"rate", "ci95" (Wilson), "trials"} at `length`, pooled over `kinds` and depths; None when not measured."""
    hits = trials = 0
    for kind in kinds:
        r = (entry or {}).get(_niah_key(kind)) or {}
        for cell, score in r.get("scores", {}).items():
            if cell.split("@")[0] == str(length):
                n = r.get("trials", {}).get(cell, 0)
                hits, trials = hits + score * n, trials + n
    if not trials:
        return None
    return {"rate": hits / trials, "ci95": list(binomial_interval(hits, trials)), "trials": trials}


def _paired(value: dict, ref: dict) -> tuple[list, list]:
    keys = sorted(set(value) & set(ref), key=str)
    return [value[k] for k in keys], [ref[k] for k in keys]


def long_context_targets(
    evals: dict[str, dict | None],
    *,
    setup: str,
    short: int,
    long: int,
    needle_lengths: Sequence[int],
    kinds: Sequence[str],
) -> list[dict]:
    """The issue's targets for models "full" (Full-Full), "sparse" (Sparse-Sparse) and "ssa", with `setup` the
    trained sparse budget: SSA sparse at `long` below Full->Sparse and Sparse->Sparse; SSA sparse needle retrieval at
    each of `needle_lengths` at least Full-Full full's; SSA full within 1% and SSA sparse within 3% of Full-Full full
    at `short`; SSA's AttnSparsity above Full-Full's at `short` and `long`. Each row: value, reference, margin,
    paired 95% interval, met (None: not measured)."""

    def ppl(a: tuple[str, str], b: tuple[str, str], n: int) -> tuple:
        """(PPL of a, PPL of b, (their per-window cross-entropies)) at n; a, b: (model, setup)."""
        return ppl_of(evals, *a, n), ppl_of(evals, *b, n), tuple(ppl_of(evals, *m, n, "window_nll") for m in (a, b))

    def entry(model, s):
        return ((evals.get(model) or {}).get("setups") or {}).get(s)

    budget = parse_setup(setup).budget
    rf, ssa, ff = f"{budget.block_size}x{budget.block_count}", ("ssa", setup), ("full", "full")
    rows = [
        below_target(f"SSA sparse {rf} PPL at {_k(long)} below Full->Sparse", *ppl(ssa, ("full", setup), long)),
        below_target(f"SSA sparse {rf} PPL at {_k(long)} below Sparse->Sparse", *ppl(ssa, ("sparse", setup), long)),
    ]
    for n in needle_lengths:
        value, ref = _paired(needle_prompts(entry(*ssa), kinds, n), needle_prompts(entry(*ff), kinds, n))
        rows.append(rate_target(f"SSA sparse {rf} needle retrieval at {_k(n)} at least Full-Full full's", value, ref))
    value, ref, nll = ppl(("ssa", "full"), ff, short)
    rows.append(within_target(f"SSA full PPL at {_k(short)} within 1% of Full-Full full", value, ref, 0.01, nll))
    value, ref, nll = ppl(ssa, ff, short)
    rows.append(
        within_target(f"SSA sparse {rf} PPL at {_k(short)} within 3% of Full-Full full", value, ref, 0.03, nll)
    )
    for n in (short, long):
        value, ref = (sparsity_at(entry(m, setup) or {}, n) for m in ("ssa", "full"))
        rows.append(above_target(f"SSA AttnSparsity {rf} at {_k(n)} above Full-Full's", value, ref))
    return rows


def lora_gain(evals: dict, lora: str, reference: str, setups: Sequence[str], lengths: Sequence[int]) -> list[dict]:
    """How much of `reference`'s perplexity gain over the original model `lora` keeps, per (setup, length):
    (PPL original - PPL lora) / (PPL original - PPL reference); None where a number is missing or there is no gain."""
    rows = []
    for s in setups:
        for n in lengths:
            o, lo, ref = (ppl_of(evals, m, s, n) for m in ("original", lora, reference))
            kept = (o - lo) / (o - ref) if None not in (o, lo, ref) and o != ref else None
            rows.append({"setup": s, "length": n, "original": o, "lora": lo, "reference": ref, "kept": kept})
    return rows


def plot_ppl_vs_context(evals, labels, setups, lengths, trained_context, path: Path) -> Path:
    """Perplexity against context length, one line per (model, setup): colour the model, line style the setup;
    a dotted line at the trained context (RoPE scaling beyond)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    styles = ["-", "--", ":", "-."]
    for i, (model, label) in enumerate(labels.items()):
        for j, s in enumerate(setups):
            points = [(n, ppl_of(evals, model, s, n)) for n in lengths]
            points = [p for p in points if p[1] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{i}", linestyle=styles[j % 4],
                        label=f"{label}, {parse_setup(s).label}")  # fmt: skip
    ax.axvline(trained_context, color="grey", linestyle=":", linewidth=1)
    ax.annotate(" trained context; RoPE scaled beyond", (trained_context, ax.get_ylim()[1]), va="top", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [_k(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Perplexity vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_ppl_vs_budget(evals, labels, setups, lengths, path: Path) -> Path:
    """Perplexity against the receptive field (full = the context), one panel per context length in `lengths`,
    one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(6.0 * len(lengths), 4.2), squeeze=False)
    budgets = {parse_setup(s).budget.receptive_field: s.split("-")[1] for s in setups if s != "full"}
    for ax, n in zip(axes[0], lengths):
        curves = {
            label: [
                (n if s == "full" else parse_setup(s).budget.receptive_field, ppl_of(evals, m, s, n)) for s in setups
            ]
            for m, label in labels.items()
        }
        draw_budget_curves(ax, curves, n, budgets)
        ax.set_title(f"Perplexity vs sparse budget at {_k(n)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _without_samples(result: dict) -> dict:
    out = copy.deepcopy(result)
    for entry in out.get("setups", {}).values():
        for key in [k for k in entry if k == "niah" or k.startswith("niah-")]:
            entry[key].pop("samples", None)
    return out


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _row_label(labels: dict, model: str, setup: str) -> str:
    return f"{labels[model]}, {parse_setup(setup).label}"


def _ppl_section(evals, found, labels, lengths, trained_context) -> list[str]:
    """Perplexity per (model, setup) and length, with its difference from Full-Full full (paired 95% CI)."""
    rows = []
    for m, e in found.items():
        for s in e["setups"]:
            cells = []
            for n in lengths:
                value, ref = ppl_of(evals, m, s, n), ppl_of(evals, "full", "full", n)
                cell = _fmt(value)
                if value is not None and ref and (m, s) != ("full", "full"):
                    ci = paired_interval(*(ppl_of(evals, *x, n, "window_nll") for x in ((m, s), ("full", "full"))))
                    cell += f" ({100 * (value / ref - 1):+.1f}%" + (
                        f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}])" if ci else ")"
                    )
                cells.append(cell)
            rows.append([_row_label(labels, m, s), *cells])
    head = ["model, mode", *(_k(n) + (" (RoPE x)" if n > trained_context else "") for n in lengths)]
    return ["", "Held-out perplexity (Austen); in brackets: vs Full-Full full at the same length, paired 95% CI:", "",
            *_table(head, rows)]  # fmt: skip


def _needle_section(found, labels, kinds, lengths) -> list[str]:
    """Retrieval per (model, setup) and length: the kinds pooled (Wilson 95% CI), then each kind."""
    pooled, per_kind = [], []
    for m, e in found.items():
        for s, entry in e["setups"].items():
            rates = [needle_rate(entry, kinds, n) for n in lengths]
            if any(rates):
                cells = (f"{r['rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r else "—" for r in rates)
                pooled.append([_row_label(labels, m, s), *cells])
            for k in kinds:
                by = (entry.get(_niah_key(k)) or {}).get("by_length") or {}
                if by:
                    per_kind.append([_row_label(labels, m, s), k, *(_fmt(by.get(str(n))) for n in lengths)])
    if not pooled:
        return []
    return ["", f"Needle retrieval, {' + '.join(kinds)} pooled (values found / asked, Wilson 95% CI):", "",
            *_table(["model, mode", *map(_k, lengths)], pooled), "", "Per kind:", "",
            *_table(["model, mode", "kind", *map(_k, lengths)], per_kind)]  # fmt: skip


def _other_sections(found, trains, labels, stat_lengths) -> list[str]:
    """AttnSparsity per (model, budget) and length; the benchmarks of each model's full mode; the trainings."""
    md = []
    rows = [[_row_label(labels, m, s), *(_fmt(sparsity_at(entry, n), 3) for n in stat_lengths)]
            for m, e in found.items() for s, entry in e["setups"].items() if entry.get("sparsity")]  # fmt: skip
    if rows:
        md += ["", "AttnSparsity (full-attention mass inside the selected blocks, on each model's own full attention):",
               "", *_table(["model, budget", *map(_k, stat_lengths)], rows)]  # fmt: skip
    scored = {t for e in found.values() for s in e["setups"].values() for t in s.get("benchmarks", {})}
    columns = [c for c in BENCHMARK_COLUMNS if c[1] in scored]
    if columns:
        rows = [[labels[m], *(_fmt((e["setups"]["full"].get("benchmarks", {}).get(t) or {}).get(metric), pct=True)
                              for _, t, metric in columns)] for m, e in found.items() if "full" in e["setups"]]  # fmt: skip
        md += ["", "Benchmarks, full mode (every request fits the receptive field, so sparse = full):", "",
               *_table(["model", *(f"{title} ({metric})" for title, _, metric in columns)], rows)]  # fmt: skip
    rows = []
    for m, t in trains.items():
        if t is None:
            rows.append([labels[m], "not run", "", "", "", "", ""])
            continue
        peak, segments = (t.get("peak_memory_gib") or {}).get("allocated"), t.get("segments", [])
        rows.append([labels[m], str(t["steps"]), f"{t['tokens']:,}", _fmt(t.get("final_lm_loss"), 3),
                     f"{t.get('trainable_parameters', 0):,}", _fmt(peak),
                     f"{sum(s['seconds'] for s in segments):.0f} ({len(segments)})"])  # fmt: skip
    head = ["model", "steps", "tokens", "final CE", "trainable params", "peak GiB", "seconds (calls)"]
    return md + ["", "Training (one config, data order, seed and schedule; each model's flags alone differ):", "",
                 *_table(head, rows)]  # fmt: skip


def _runs_section(found, trains) -> list[str]:
    md = ["", "Runs:", ""]
    for m, t in trains.items():
        md += [f"- train {m} to step {seg['to_step']} ({seg['seconds']:.0f} s): {seg['device']}, {seg['date']}, "
               f"commit {seg.get('commit')}, `{seg['command']}`" for seg in (t or {}).get("segments", [])]  # fmt: skip
    for m, e in found.items():
        md += [f"- eval {m}: {', '.join(r['stages'])}: {r['device']}, {r['date']}, commit {r.get('commit')}, "
               f"`{r['command']}`" for r in e["runs"]]  # fmt: skip
    return md


def long_context_report(
    evals: dict[str, dict | None],
    trains: dict[str, dict | None],
    labels: dict[str, str],
    *,
    setup: str,
    short: int,
    long: int,
    needle_lengths: Sequence[int],
    kinds: Sequence[str],
    lora: str | None,
    trained_context: int,
    pngs: dict[str, Path],
    out: Path,
    pending: dict[str, list[str]] | None = None,
) -> tuple[dict, str]:
    """The study's report -> (JSON-ready dict, markdown); writes the plots `pngs["context"]`, `pngs["budget"]`,
    `pngs["niah"]`. `evals` {model: eval result or None} for the models of `labels` ({"original": "Original", "full":
    "Full-Full", ...}); `trains` {model: training summary or None}; `setup` the trained sparse budget; `lora` the
    LoRA model (its gain is measured against "ssa"); `out` where the JSON and markdown go (the markdown links the
    plots relative to it); `pending` {model: units not measured yet}. The JSON keeps every number; the needles'
    generations stay in the summaries."""
    found = {m: e for m, e in evals.items() if e is not None}
    if not found:
        raise ValueError("No evaluation summary: run the study's eval stages first.")
    entries = [(m, s, entry) for m, e in found.items() for s, entry in e["setups"].items()]
    setups = list(dict.fromkeys(s for _, s, _ in entries))
    lengths = sorted({int(n) for *_, entry in entries for n in entry.get("ppl", {})})
    stat_lengths = sorted({int(n) for *_, entry in entries for n in entry.get("sparsity", {})})
    niah_lengths = sorted({int(c.split("@")[0]) for *_, entry in entries for k in kinds
                           for c in (entry.get(_niah_key(k)) or {}).get("scores", {})})  # fmt: skip
    targets = long_context_targets(
        evals, setup=setup, short=short, long=long, needle_lengths=needle_lengths, kinds=kinds
    )
    lora_rows = lora_gain(evals, lora, "ssa", ["full", setup], [short, long]) if lora else []
    shown = {m: labels[m] for m in labels if m in found}
    plot_ppl_vs_context(evals, shown, ["full", setup], lengths, trained_context, pngs["context"])
    plot_ppl_vs_budget(evals, shown, setups, [n for n in (short, long) if n in lengths], pngs["budget"])
    panels = {k: {_row_label(labels, m, s): entry[_niah_key(k)] for m, s, entry in entries if _niah_key(k) in entry}
              for k in kinds}  # fmt: skip
    panels = {k: v for k, v in panels.items() if v}
    if panels:
        plot_niah_grid(panels, pngs["niah"], title="Needle retrieval (rows: needle kind; panels: model, mode)")
    plots = [("perplexity vs context", "context"), ("perplexity vs budget", "budget")] + [("needles", "niah")] * bool(
        panels
    )

    md = [f"Targets; sparse = `{setup}`, trained at {_k(trained_context)}, llama3 RoPE "
          "scaling beyond:", "", "| target | SSA | reference | margin | verdict |", "|---|---|---|---|---|",
          *map(verdict_row, targets)]  # fmt: skip
    for alt, key in plots:
        md += ["", f"![{alt}]({os.path.relpath(pngs[key], out.parent)})"]
    md += _ppl_section(evals, found, labels, lengths, trained_context)
    md += _needle_section(found, labels, kinds, niah_lengths)
    md += _other_sections(found, trains, labels, stat_lengths)
    if lora_rows:
        md += ["", f"{labels.get(lora, lora)}: the share of SSA's perplexity gain over the original it keeps:", ""]
        md += _table(["mode", "length", "original", labels.get(lora, lora), "SSA", "gain kept"],
                     [[parse_setup(r["setup"]).label, _k(r["length"]), _fmt(r["original"]), _fmt(r["lora"]),
                       _fmt(r["reference"]), _fmt(r["kept"], pct=True) + ("%" if r["kept"] is not None else "")]
                      for r in lora_rows])  # fmt: skip
    commits = sorted({r.get("commit", "not recorded") for e in found.values() for r in e["runs"]}
                     | {s.get("commit", "not recorded") for t in trains.values() if t for s in t.get("segments", [])})  # fmt: skip
    md += ["", f"Code: commit(s) {', '.join(commits)}.", *_runs_section(found, trains)]
    missing = [f"eval {m}" for m, e in evals.items() if e is None] + [f"train {m}" for m, t in trains.items() if not t]
    if missing:
        md += ["", f"Not run yet: {', '.join(missing)}."]
    md += [f"- eval {m}: not measured yet: {', '.join(units)}" for m, units in (pending or {}).items() if units]
    result = {
        "targets": targets,
        "all_targets_met": all(t["met"] for t in targets) if all(t["met"] is not None for t in targets) else None,
        "settings": {
            "setup": setup,
            "short": short,
            "long": long,
            "needle_lengths": list(needle_lengths),
            "kinds": list(kinds),
            "trained_context": trained_context,
        },  # fmt: skip
        "needles": {
            m: {s: {str(n): needle_rate(entry, kinds, n) for n in niah_lengths} for s, entry in e["setups"].items()}
            for m, e in found.items()
        },  # fmt: skip
        "lora_gain": lora_rows,
        "training": trains,
        "models": {m: _without_samples(e) if e else None for m, e in evals.items()},
        "commits": commits,
        "missing": missing,
        "pending": pending or {},
        "png": {k: str(v) for k, v in pngs.items()},
    }
    return result, "\n".join(md) + "\n"
