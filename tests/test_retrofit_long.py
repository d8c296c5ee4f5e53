"""recipes/retrofit_long_context.py end to end on the CPU: a tiny random Llama (trained context 64 tokens) trained
2 real TRL steps as Full-Full, Sparse-Sparse, SSA and SSA with LoRA (its lease stopped by the time budget twice and
resumed), every model and the original evaluated phase by phase (perplexity to 2x the trained context with llama3
RoPE scaling beyond it, AttnSparsity at two lengths, three needle kinds, benchmarks once) on small stand-ins for the
Austen novels, the essays and the benchmarks, then the report: targets recomputed from the summaries' numbers,
tables, plots; plus a fresh machine that resumes from the committed summaries."""

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("lm_eval")
pytest.importorskip("peft")
pytest.importorskip("wonderwords")

from test_retrofit_study import _original_and_corpus, _prose, _tasks  # noqa: E402

from ssa_adapt import assets  # noqa: E402
from ssa_adapt.eval import load_model, perplexity  # noqa: E402
from ssa_adapt.eval.long_context import needle_prompts  # noqa: E402
from ssa_adapt.eval.perplexity import austen_windows, rope_scaled  # noqa: E402
from ssa_adapt.eval.setups import apply_setup, parse_setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("original", "full", "sparse", "ssa", "ssa-lora")
TRAINED = ("full", "sparse", "ssa", "ssa-lora")
SETUPS = ["full", "sparse-4x4-sink1", "sparse-4x8-sink1"]
KINDS = ["single", "multikey", "multivalue"]
CONTEXT = 64  # the tiny model's max_position_embeddings: its "8k"
LORA = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--lora_target_modules"]


def _recipe_module():
    spec = importlib.util.spec_from_file_location(
        "retrofit_long_context", ROOT / "recipes" / "retrofit_long_context.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = _recipe_module()


def _study_config(root: Path, recipe: Path, task_dir: Path) -> dict:
    return {
        "train_config": str(recipe),
        "models": {
            "original": {"label": "Original"},
            "full": {"label": "Full-Full", "train": ["--train_mode", "full"]},
            "sparse": {"label": "Sparse-Sparse", "train": ["--train_mode", "sparse"]},
            "ssa": {"label": "SSA", "train": ["--train_mode", "ssa"]},
            "ssa-lora": {
                "label": "SSA LoRA",
                "train": [
                    "--train_mode",
                    "ssa",
                    *LORA,
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "--learning_rate",
                    "3e-3",
                ],
            },
        },  # fmt: skip
        "eval": {
            "device": "cpu",
            "dtype": "float32",
            "setups": SETUPS,
            "ppl_lengths": [32, 64, 128],
            "ppl_span": 128,
            "long_rope_factor": 4,
            "sparsity_lengths": [64, 128],
            "niah_kinds": KINDS,
            "niah_depths": [0, 1],
            "niah_samples": 2,
            "niah_batch": 2,
            "niah_setups": ["full", "sparse-4x4-sink1"],
            "benchmark_setups": ["full"],
            "include_path": str(task_dir),
            "limit": 6,
            "batch_size": 8,
        },
        "phases": [
            {"stages": ["ppl"]},
            {"stages": ["niah"], "niah_lengths": [192]},
            {"stages": ["sparsity"]},
            {"stages": ["niah"], "niah_lengths": [128]},
            {"stages": ["benchmarks"]},
        ],
        "report": {
            "setup": "sparse-4x4-sink1",
            "short": 64,
            "long": 128,
            "needle_lengths": [128, 192],
            "trained_context": CONTEXT,
            "lora": "ssa-lora",
            "summaries": str(root / "committed"),
            "out": str(root / "results" / "long.json"),
            "png": str(root / "docs" / "long"),
        },
    }


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """Every lease of the study on the CPU, then the report; returns (root, run_dir, exit codes)."""

    root = tmp_path_factory.mktemp("long")
    original, corpus = _original_and_corpus(root, max_position_embeddings=CONTEXT)
    recipe = {"model_name_or_path": str(original), "dataset_name": str(corpus), "max_length": CONTEXT, "packing": True,
              "packing_strategy": "wrapped", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
              "max_steps": 2, "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "use_cpu": True, "bf16": False,
              "seed": 42, "block_size": 4, "block_count": 4, "sink_blocks": 1, "logging_steps": 1, "save_steps": 1,
              "report_to": "none", "disable_tqdm": True}  # fmt: skip
    (root / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    (root / "study.yaml").write_text(json.dumps(_study_config(root, root / "recipe.yaml", _tasks(root / "tasks"))))
    novels = {f"Novel {i}": _prose(random.Random(10 + i), 60) for i in range(3)}
    essays = [_prose(random.Random(20 + i), 40) for i in range(3)]
    run_dir, codes = root / "runs", {}

    def call(name, *argv, run_dir=run_dir):
        base = ["--study", str(root / "study.yaml"), "--run_dir", str(run_dir)]
        codes[name] = study.main([*base, *argv])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assets, "austen_texts", lambda: novels)
        mp.setattr(assets, "paul_graham_essays", lambda: essays)
        call("lease full", "--mirror", str(root / "out"), "lease", "--model", "full")
        orig = ("--model", "original", "--original", str(original))
        call("lease original, budget 0", "lease", *orig, "--time_budget_s", "0")
        call("lease original", "lease", *orig)
        for model in ("sparse", "ssa"):
            call(f"lease {model}", "lease", "--model", model)
        # budget 0: the first call trains one step (checkpoint), the second resumes and finishes training but starts
        # no evaluation, the third evaluates one unit; without a budget the fourth finishes
        for i in range(3):
            call(f"lease ssa-lora, budget 0, call {i + 1}", "lease", "--model", "ssa-lora", "--time_budget_s", "0")
        call("lease ssa-lora", "lease", "--model", "ssa-lora")
        call("lease ssa again", "--mirror", str(root / "out-again"), "lease", "--model", "ssa")
        # step 3 of the runbook: the summaries brought back are committed; a fresh machine then has nothing to do
        shutil.copytree(run_dir / "summary", root / "committed")
        call("fresh machine, lease full", "lease", "--model", "full", run_dir=root / "fresh")
        # a model whose committed evaluation lacks a unit, on a machine without the model: trained again, and its
        # evaluation starts anew (the old one belongs to another training)
        partial = json.loads((root / "committed" / "eval-sparse.json").read_text())
        partial["setups"]["full"].pop("benchmarks")
        (root / "committed" / "eval-sparse.json").write_text(json.dumps(partial))
        call("fresh machine, lease sparse", "lease", "--model", "sparse", run_dir=root / "fresh2")
        for kind in ("train", "eval"):  # brought back and committed
            shutil.copyfile(
                root / "fresh2" / "summary" / f"{kind}-sparse.json", root / "committed" / f"{kind}-sparse.json"
            )
        call("report", "report")
    return root, run_dir, codes


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_leases_train_every_model_and_resume(study_run):
    root, run_dir, codes = study_run
    assert codes == {
        "lease full": 0, "lease original, budget 0": 75, "lease original": 0, "lease sparse": 0, "lease ssa": 0,
        "lease ssa-lora, budget 0, call 1": 75, "lease ssa-lora, budget 0, call 2": 75,
        "lease ssa-lora, budget 0, call 3": 75, "lease ssa-lora": 0, "lease ssa again": 0,
        "fresh machine, lease full": 0, "fresh machine, lease sparse": 0, "report": 0,
    }  # fmt: skip
    trains = {m: _json(run_dir / "summary" / f"train-{m}.json") for m in TRAINED}
    for model, t in trains.items():
        assert t["steps"] == 2 and t["tokens"] == 2 * 2 * CONTEXT
        assert [h["step"] for h in t["log_history"] if "loss" in h] == [1, 2]
        align = [h.get("align_loss", 0) for h in t["log_history"] if "loss" in h]
        assert all(a > 0 for a in align) if model.startswith("ssa") else not any(align)
    assert [s["to_step"] for s in trains["ssa-lora"]["segments"]] == [1, 2]  # stopped at step 1, resumed
    # LoRA r 4 on q, k, v, o of 2 layers (hidden 32, 4 query / 2 KV heads of 8): r x (in + out) per projection
    lora = 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))
    assert trains["ssa-lora"]["trainable_parameters"] == lora
    assert trains["ssa"]["trainable_parameters"] == trains["ssa"]["parameters"] > 10 * lora
    assert (run_dir / "ssa-lora" / "adapter_config.json").is_file() and not (
        run_dir / "ssa-lora" / "config.json"
    ).exists()
    assert json.dumps(_json(run_dir / "sparse" / "config.json")).count('"train_mode": "sparse"') == 1
    assert sorted(p.name for p in (root / "out").iterdir()) == ["eval-full.json", "train-full.json"]  # --mirror
    # a call with nothing left to do still sends the model's whole state
    assert sorted(p.name for p in (root / "out-again").iterdir()) == ["eval-ssa.json", "train-ssa.json"]
    assert not (root / "fresh" / "full").exists()  # nothing retrained where the committed summaries were complete
    fresh = {k: _json(root / "fresh2" / "summary" / f"{k}-sparse.json") for k in ("train", "eval")}
    assert (root / "fresh2" / "sparse" / "config.json").is_file() and fresh["train"]["finished_at"] != trains[
        "sparse"
    ]["finished_at"]
    assert fresh["eval"]["trained_by"] == fresh["train"]["finished_at"] and len(fresh["eval"]["runs"]) == 1
    assert "benchmarks" in fresh["eval"]["setups"]["full"]


def test_evaluation_runs_its_phases_with_rope_scaling_beyond_the_trained_context(study_run):
    root, run_dir, _ = study_run
    for model in MODELS:
        result = _json(run_dir / "summary" / f"eval-{model}.json")
        setups = result["setups"]
        assert list(setups) == SETUPS
        for name, entry in setups.items():
            assert {n: p["rope_factor"] for n, p in entry["ppl"].items()} == {"32": None, "64": None, "128": 4.0}
            assert ("sparsity" in entry) == (name != "full")
            needles = name in ("full", "sparse-4x4-sink1")
            for kind in KINDS:
                assert (f"niah-{kind}" in entry) == needles
                if needles:
                    niah = entry[f"niah-{kind}"]
                    assert niah["context_lengths"] == [128, 192] and len(niah["samples"]) == 2 * 2 * 2
                    asked = {"single": 1, "multikey": 1, "multivalue": 4}[kind]
                    assert set(niah["trials"].values()) == {2 * asked}
            assert ("benchmarks" in entry) == (name == "full")
        for name in ("sparse-4x4-sink1", "sparse-4x8-sink1"):
            assert set(setups[name]["sparsity"]) == {"64", "128"}
        assert (
            0
            < setups["sparse-4x4-sink1"]["sparsity"]["128"]["sparsity"]
            < setups["sparse-4x8-sink1"]["sparsity"]["128"]["sparsity"]
        )
        assert result["settings"]["long_rope"]["original_max_position_embeddings"] == CONTEXT
        stages = [s for run in result["runs"] for s in run["stages"]]
        first = [s.split(" ")[0] for s in stages]
        assert first == ["ppl"] * 9 + ["niah"] * 6 + ["sparsity"] * 2 + ["niah"] * 6 + ["benchmarks"], stages
        assert "@ 192" in stages[9] and "@ 128" in stages[17] and stages[-1].startswith("benchmarks")
    original = _json(run_dir / "summary" / "eval-original.json")
    assert len(original["runs"]) == 2 and len(original["runs"][0]["stages"]) == 1  # budget 0: one unit, then the rest


def test_stage_perplexities_are_the_scaled_and_unscaled_models_own(study_run):
    """The summary's 128-token perplexity is the RoPE-scaled model's, and a unit after it is unscaled again."""
    root, run_dir, _ = study_run
    novels = {f"Novel {i}": _prose(random.Random(10 + i), 60) for i in range(3)}
    setups = _json(run_dir / "summary" / "eval-ssa.json")["setups"]
    model, tok = load_model(str(run_dir / "ssa"), device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assets, "austen_texts", lambda: novels)
        w128, w32 = austen_windows(tok, 128, span=128), austen_windows(tok, 32, span=128)
    apply_setup(model, parse_setup("sparse-4x8-sink1"))
    plain = perplexity(model, w128, progress=False).ppl
    with rope_scaled(model, 4.0, original_max_position_embeddings=CONTEXT):
        scaled = perplexity(model, w128, progress=False).ppl
    assert model.config.max_position_embeddings == CONTEXT and abs(scaled - plain) > 1e-4 * plain
    assert setups["sparse-4x8-sink1"]["ppl"]["128"]["ppl"] == pytest.approx(scaled, rel=1e-6)
    assert setups["sparse-4x8-sink1"]["ppl"]["32"]["ppl"] == pytest.approx(
        perplexity(model, w32, progress=False).ppl, rel=1e-5
    )


def test_lora_model_is_evaluated_with_its_adapter_merged(study_run):
    from peft import PeftModel

    from ssa_adapt.modeling import load_causal_lm

    _, run_dir, _ = study_run
    merged, _ = load_model(str(run_dir / "ssa-lora"), device="cpu")
    base_path = _json(run_dir / "ssa-lora" / "adapter_config.json")["base_model_name_or_path"]
    unmerged = PeftModel.from_pretrained(load_causal_lm(base_path), str(run_dir / "ssa-lora")).eval()
    ids = torch.randint(4, 50, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(ids).logits, unmerged(ids).logits
        plain = load_causal_lm(base_path).eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, plain, atol=1e-4)


def test_report_targets_tables_and_plots(study_run):
    root, run_dir, _ = study_run
    report = _json(root / "results" / "long.json")
    md = (root / "results" / "long.md").read_text()
    evals = {m: _json(root / "committed" / f"eval-{m}.json") for m in MODELS}  # what the report read
    ppl = lambda m, s, n: evals[m]["setups"][s]["ppl"][str(n)]["ppl"]  # noqa: E731
    sparsity = lambda m, n: evals[m]["setups"]["sparse-4x4-sink1"]["sparsity"][str(n)]["sparsity"]  # noqa: E731

    def rate(model, setup, n):
        prompts = needle_prompts(evals[model]["setups"][setup], KINDS, n)
        return sum(f for f, _ in prompts.values()) / sum(a for _, a in prompts.values())

    s = "sparse-4x4-sink1"
    expected = [  # (value, reference, met) of each target, from the models' own numbers
        (ppl("ssa", s, 128), ppl("full", s, 128), lambda v, r: v < r),
        (ppl("ssa", s, 128), ppl("sparse", s, 128), lambda v, r: v < r),
        (rate("ssa", s, 128), rate("full", "full", 128), lambda v, r: v >= r),
        (rate("ssa", s, 192), rate("full", "full", 192), lambda v, r: v >= r),
        (ppl("ssa", "full", 64), ppl("full", "full", 64), lambda v, r: v / r - 1 <= 0.01),
        (ppl("ssa", s, 64), ppl("full", "full", 64), lambda v, r: v / r - 1 <= 0.03),
        (sparsity("ssa", 64), sparsity("full", 64), lambda v, r: v > r),
        (sparsity("ssa", 128), sparsity("full", 128), lambda v, r: v > r),
    ]
    assert len(report["targets"]) == len(expected)
    for target, (value, reference, met) in zip(report["targets"], expected):
        assert (target["value"], target["reference"]) == pytest.approx((value, reference))
        assert target["met"] == met(value, reference), target
    needle = report["targets"][2]
    assert needle["trials"] == 2 * 2 * (1 + 1 + 4)  # the same 12 prompts on both sides, paired
    assert needle["ci95"] is None or needle["ci95"][0] <= needle["difference"] <= needle["ci95"][1]
    assert md.count("| met |") + md.count("| MISSED |") == len(expected)
    for gain in report["lora_gain"]:
        o, lo, r = (ppl(m, gain["setup"], gain["length"]) for m in ("original", "ssa-lora", "ssa"))
        assert gain["kept"] == pytest.approx((o - lo) / (o - r))
    assert not any("samples" in v for e in report["models"].values() for st in e["setups"].values() for v in st.values()
                   if isinstance(v, dict))  # fmt: skip
    assert report["training"]["ssa-lora"]["trainable_parameters"] < report["training"]["ssa"]["trainable_parameters"]
    assert report["pending"] == {m: [] for m in MODELS} and report["missing"] == []
    for label in ("Full-Full, full", "SSA, sparse 4x4, 1 sink", "SSA LoRA, sparse 4x8, 1 sink", "Original, full"):
        assert f"| {label} |" in md
    assert (
        "128 (RoPE x)" in md
        and "HellaSwag (acc_norm)" in md
        and "Needle retrieval" in md
        and "AttnSparsity" in md
        and "gain kept" in md
    )
    for kind in ("context", "budget", "niah"):
        png = root / "docs" / f"long-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"](../docs/long-{kind}.png)" in md
