"""The retrofit studies' quality targets checked on held-out perplexities, AttnSparsity and needle
retrieval, with paired-bootstrap intervals: perplexity over the per-window cross-entropies of the same windows,
needle retrieval over the same prompts (every model and setup gets the same needles)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "TOLERANCE",
    "paired_interval",
    "paired_rate_interval",
    "within_target",
    "below_target",
    "above_target",
    "rate_target",
    "check_targets",
    "verdict_row",
]

TOLERANCE = 0.01  # "within 1%"


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


def paired_rate_interval(
    value: Sequence[tuple[float, int]] | None,
    ref: Sequence[tuple[float, int]] | None,
    resamples: int = 5000,
    seed: int = 0,
) -> list[float] | None:
    """95% paired-bootstrap interval of rate(value) - rate(ref), where each list holds (values found, values asked)
    per prompt, the same prompts in the same order on both sides, and rate = sum(found) / sum(asked); None without
    two or more paired prompts."""
    import numpy as np

    if value is None or ref is None or len(value) != len(ref) or len(value) < 2:
        return None
    v, r = np.asarray(value, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    diff = v[idx, 0].sum(1) / v[idx, 1].sum(1) - r[idx, 0].sum(1) / r[idx, 1].sum(1)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return [float(lo), float(hi)]


def _unmeasured(name: str, value, reference) -> dict:
    return {"target": name, "value": value, "reference": reference, "margin": None, "met": None}


def within_target(name: str, value, reference, tolerance: float = TOLERANCE, nll=(None, None)) -> dict:
    """Perplexity `value` at most `tolerance` (relative) above `reference`; `nll`: their per-window cross-entropies
    (for `ci95`, the paired interval of the relative difference). Margin: the room left to the threshold."""
    if value is None or reference is None:
        return _unmeasured(name, value, reference)
    rel = value / reference - 1
    return {"target": name, "value": value, "reference": reference, "relative": rel,
            "ci95": paired_interval(*nll), "margin": tolerance - rel, "met": rel <= tolerance}  # fmt: skip


def below_target(name: str, value, reference, nll=(None, None)) -> dict:
    """Perplexity `value` below `reference` (margin: how far below, relative)."""
    if value is None or reference is None:
        return _unmeasured(name, value, reference)
    rel = value / reference - 1
    return {"target": name, "value": value, "reference": reference, "relative": rel,
            "ci95": paired_interval(*nll), "margin": -rel, "met": value < reference}  # fmt: skip


def above_target(name: str, value, reference) -> dict:
    """`value` (AttnSparsity) above `reference` (margin: the absolute difference)."""
    if value is None or reference is None:
        return _unmeasured(name, value, reference)
    return {"target": name, "value": value, "reference": reference, "margin": value - reference,
            "met": value > reference}  # fmt: skip


def rate_target(name: str, value: Sequence[tuple[float, int]] | None, reference: Sequence[tuple[float, int]] | None):
    """Retrieval rate of `value` at least that of `reference`; each a list of (found, asked) per prompt, the same
    prompts in the same order (`ci95`: the paired interval of the difference of the rates)."""
    if not value or not reference:
        return _unmeasured(name, None, None)
    rate = lambda pairs: sum(f for f, _ in pairs) / max(sum(n for _, n in pairs), 1)  # noqa: E731
    v, r = rate(value), rate(reference)
    return {"target": name, "value": v, "reference": r, "difference": v - r, "trials": sum(n for _, n in value),
            "ci95": paired_rate_interval(value, reference), "margin": v - r, "met": v >= r}  # fmt: skip


def check_targets(
    ppl: dict[str, dict[str, float | None]],
    sparsity: dict[str, float | None],
    tolerance: float = TOLERANCE,
    windows: dict[str, dict[str, list[float] | None]] | None = None,
) -> list[dict]:
    """The first retrofit study's targets, each with value, reference, margin and verdict (met True / False, None =
    not measured).

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

    def nll(a: tuple[str, str], b: tuple[str, str]) -> tuple:
        return tuple((windows or {}).get(m, {}).get(k) for m, k in (a, b))

    ssa_s, ssa_f, ff_f = ("ssa", "sparse"), ("ssa", "full"), ("full", "full")
    return [
        within_target("SSA sparse-mode PPL within 1% of Full-Full full-mode PPL", get(*ssa_s), get(*ff_f),
                      tolerance, nll(ssa_s, ff_f)),
        below_target("SSA sparse-mode PPL below Full->Sparse", get(*ssa_s), get("full", "sparse"),
                     nll(ssa_s, ("full", "sparse"))),
        below_target("SSA sparse-mode PPL below Sparse->Sparse", get(*ssa_s), get("sparse", "sparse"),
                     nll(ssa_s, ("sparse", "sparse"))),
        within_target("SSA full-mode PPL within 1% of Full-Full full-mode PPL", get(*ssa_f), get(*ff_f), tolerance,
                      nll(ssa_f, ff_f)),
        above_target("SSA AttnSparsity above Full-Full's", sparsity.get("ssa"), sparsity.get("full")),
    ]  # fmt: skip


def verdict_row(t: dict) -> str:
    """One markdown row: target | SSA | reference | margin (and 95% interval) | verdict."""
    if t["met"] is None:
        return f"| {t['target']} | — | — | — | not measured |"
    if "relative" in t:
        value, ref = f"{t['value']:.3f}", f"{t['reference']:.3f}"
        margin = f"{100 * t['margin']:+.2f}% (SSA {100 * t['relative']:+.2f}% vs reference"
        if t.get("ci95"):
            margin += f"; 95% CI {100 * t['ci95'][0]:+.2f}% .. {100 * t['ci95'][1]:+.2f}%"
        margin += ")"
    elif "difference" in t:
        value, ref = f"{t['value']:.3f}", f"{t['reference']:.3f}"
        margin = f"{t['difference']:+.3f} over {t['trials']} values"
        if t.get("ci95"):
            margin += f" (paired 95% CI {t['ci95'][0]:+.3f} .. {t['ci95'][1]:+.3f})"
    else:
        value, ref, margin = f"{t['value']:.4f}", f"{t['reference']:.4f}", f"{t['margin']:+.4f}"
    return f"| {t['target']} | {value} | {ref} | {margin} | {'met' if t['met'] else 'MISSED'} |"
