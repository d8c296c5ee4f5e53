"""Evaluation of SSA models on real data: long-context perplexity, attention statistics (AttnSparsity, dropped mass,
Theorem 1 on real activations), lm-eval benchmarks through the registered `ssa` model, needle in a haystack (ours
over the Paul Graham essays, and lm-eval's RULER niah), and LongBench.

==========================  =================================================================================
module                      what
==========================  =================================================================================
``perplexity``              `perplexity`, `austen_windows`, `token_windows`, `apply_rope_scaling` (llama3 type)
``attention_stats``         `attention_statistics`, `measure_attention`, `Budget`, `theorem1_terms`
``niah``                    `run_niah`, `build_niah_sample`, `score_niah`, `plot_niah_heatmaps`
``lm_eval_model``           `SSALM`, lm-eval's model type ``ssa`` (needs lm-eval)
``lm_eval_cli``             ``python -m ssa_adapt.eval.lm_eval_cli --model ssa ...`` (lm-eval's CLI)
``harness``                 `evaluate_tasks`, `benchmark_scores`, `ruler_niah`, `longbench`
``setups``                  `EvalSetup`: "original", "full", "sparse-16x16-sink1", ... and applying one
``stages``                  `EvalPlan`, `run_evaluation`, `run_phases`: the unit runner the eval recipes share
``long_context``            the long-context retrofit study's report: targets, tables, plots
==========================  =================================================================================

Importing this package registers ``ssa`` with lm-eval's model registry (lazily: lm-eval's HF model code is only
imported when ``ssa`` is first used), so ``lm_eval.simple_evaluate(model="ssa", ...)`` works after
``import ssa_adapt.eval``. `recipes/eval_suite.py` runs everything for one model and writes one JSON and a
markdown table.
"""

from __future__ import annotations

import importlib.util

from .attention_stats import Budget, attention_statistics, measure_attention, theorem1_terms
from .niah import build_niah_sample, plot_niah_heatmaps, run_niah, score_niah
from .perplexity import PerplexityResult, apply_rope_scaling, austen_windows, perplexity, token_windows
from .setups import EvalSetup, apply_setup, load_model, parse_setups

__all__ = [
    "Budget",
    "EvalSetup",
    "PerplexityResult",
    "apply_rope_scaling",
    "apply_setup",
    "attention_statistics",
    "austen_windows",
    "build_niah_sample",
    "load_model",
    "measure_attention",
    "parse_setups",
    "perplexity",
    "plot_niah_heatmaps",
    "register_lm_eval_model",
    "run_niah",
    "score_niah",
    "theorem1_terms",
    "token_windows",
]

LM_EVAL_MODEL = "ssa_adapt.eval.lm_eval_model:SSALM"


def register_lm_eval_model() -> bool:
    """Register ``ssa`` in lm-eval's model registry as a lazy reference; False when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        return False
    import lm_eval.models  # noqa: F401  (lm-eval fills its built-in models only into an empty registry)
    from lm_eval.api.registry import model_registry

    if "ssa" not in model_registry:
        model_registry.register("ssa", target=LM_EVAL_MODEL)
    return True


register_lm_eval_model()
