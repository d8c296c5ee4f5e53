"""recipes/retrofit_study.py end to end on the CPU: a tiny random Llama trained 3 steps in each mode (one run stopped
by its time budget and resumed), every model evaluated with tiny settings (Austen novels, essays and the four
benchmarks replaced by small local stand-ins), the report written; plus the target verdicts on hand-made numbers."""

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
from test_eval import WORDS, _tokenizer
from tiny_models import tiny_config

pytest.importorskip("trl")
pytest.importorskip("lm_eval")

from ssa_adapt import assets  # noqa: E402
from ssa_adapt.eval.targets import check_targets, paired_interval, verdict_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ["full", "sparse-4x4-sink1", "sparse-4x8-sink1"]  # trained budget 4x4 (receptive field 16), 4x8 untrained
TASKS = ("ssa_hellaswag", "ssa_piqa", "ssa_arc_easy", "ssa_arc_challenge")


def _study_module():
    spec = importlib.util.spec_from_file_location("retrofit_study", ROOT / "recipes" / "retrofit_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = _study_module()


def _prose(rng: random.Random, sentences: int) -> str:
    return " ".join(
        " ".join(rng.choice(WORDS[:60]) for _ in range(rng.randint(4, 12))) + " ." for _ in range(sentences)
    )


def _tasks(folder: Path) -> Path:
    """Four 8-item multiple-choice tasks under the benchmark names, with lm-eval's acc and acc_norm."""
    folder.mkdir()
    rng = random.Random(0)
    for task in TASKS:
        rows = [{"question": _prose(rng, 1), "label": i % 3} for i in range(8)]
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
            "validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: '{{question}} answer:'\n"
            "doc_to_target: label\ndoc_to_choice: ['red', 'blue', 'green']\nmetric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
        )
    return folder


def _original_and_corpus(root: Path, **config) -> tuple[Path, Path]:
    """A tiny random Llama with the word-level tokenizer saved as <root>/original, and a 40-document corpus of
    stand-in prose as <root>/corpus.jsonl; `config`: tiny_config overrides."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    config = tiny_config("llama", group=2, layers=2, vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, **config)  # fmt: skip
    original = root / "original"
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").save_pretrained(original)
    tok.save_pretrained(original)
    rng = random.Random(1)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": _prose(rng, 6)}) + "\n" for _ in range(40)))
    return original, corpus


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Train (3 modes), eval (4 models) and report; returns (run_dir, report JSON path, return codes)."""

    root = tmp_path_factory.mktemp("retrofit")
    original, corpus = _original_and_corpus(root)
    recipe = {
        "model_name_or_path": str(original),
        "dataset_name": str(corpus),
        "max_length": 64,
        "packing": True,
        "packing_strategy": "wrapped",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "seed": 42,
        "block_size": 4,
        "block_count": 4,
        "sink_blocks": 1,
        "logging_steps": 1,
        "save_steps": 2,
        "report_to": "none",
        "disable_tqdm": True,
    }
    config_path = root / "recipe.yaml"
    config_path.write_text(json.dumps(recipe))  # JSON is YAML
    run_dir = root / "runs"
    novels = {f"Novel {i}": _prose(random.Random(10 + i), 60) for i in range(3)}
    essays = [_prose(random.Random(20 + i), 40) for i in range(3)]
    task_dir = _tasks(root / "tasks")
    codes = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assets, "austen_texts", lambda: novels)
        mp.setattr(assets, "paul_graham_essays", lambda: essays)
        base = ["--run_dir", str(run_dir)]
        for mode in ("full", "sparse"):
            codes[f"train {mode}"] = study.main([*base, "train", "--mode", mode, "--config", str(config_path)])
        # a budget of 0 s stops after the first step with a checkpoint; the same command then resumes to the end
        budget0 = [*base, "train", "--mode", "ssa", "--config", str(config_path), "--time_budget_s", "0"]
        codes["train ssa, budget 0"] = study.main(budget0)
        codes["train ssa"] = study.main([*base, "train", "--mode", "ssa", "--config", str(config_path)])
        codes["train ssa again"] = study.main([*base, "train", "--mode", "ssa", "--config", str(config_path)])
        tiny = [
            *("--original", str(original), "--device", "cpu", "--setups", *SETUPS, "--ppl_lengths", "32", "128"),
            *("--ppl_span", "128", "--sparsity_lengths", "128", "--include_path", str(task_dir), "--limit", "6"),
            *("--batch_size", "8", "--benchmark_check", "3", "--benchmark_setups", "full", "sparse-4x4-sink1"),
            *("--niah_lengths", "64", "128", "--niah_depths", "0", "1", "--niah_samples", "2"),
        ]
        codes["eval original, budget 0"] = study.main(
            [*base, "eval", "--model", "original", *tiny, "--time_budget_s", "0"]
        )
        for model in study.MODELS:
            codes[f"eval {model}"] = study.main([*base, "eval", "--model", model, *tiny])
        out = root / "results" / "retrofit.json"
        png = root / "docs" / "retrofit.png"
        codes["report"] = study.main([*base, "report", "--out", str(out), "--png", str(png)])
    return run_dir, out, png, codes


def test_pipeline_trains_every_mode_and_resumes(pipeline):
    run_dir, _, _, codes = pipeline
    assert codes["train ssa, budget 0"] == study.UNFINISHED
    assert {k: v for k, v in codes.items() if k.startswith("train") and "budget" not in k} == {
        "train full": 0,
        "train sparse": 0,
        "train ssa": 0,
        "train ssa again": 0,
    }
    for mode in study.MODES:
        summary = json.loads((run_dir / "summary" / f"train-{mode}.json").read_text())
        assert summary["steps"] == 3 and summary["tokens"] == 3 * 2 * 64
        assert [h["step"] for h in summary["log_history"] if "loss" in h] == [1, 2, 3]
        align = [h.get("align_loss", 0) for h in summary["log_history"] if "loss" in h]
        assert all(a > 0 for a in align) if mode == "ssa" else not any(align)
        config = json.loads((run_dir / mode / "config.json").read_text())
        assert json.dumps(config).count(f'"train_mode": "{mode}"') == 1
    ssa = json.loads((run_dir / "summary" / "train-ssa.json").read_text())
    assert [s["to_step"] for s in ssa["segments"]] == [1, 3]  # stopped at step 1, resumed from its checkpoint


def test_pipeline_evaluates_every_model_and_metric(pipeline):
    run_dir, _, _, codes = pipeline
    assert codes["eval original, budget 0"] == study.UNFINISHED  # one unit done, the rest left for the next call
    assert all(codes[f"eval {m}"] == 0 for m in study.MODELS)
    first = json.loads((run_dir / "summary" / "eval-original.json").read_text())["runs"][0]
    assert first["stages"][0].startswith("ppl full @ 32") and len(first["stages"]) == 1
    for model in study.MODELS:
        result = json.loads((run_dir / "summary" / f"eval-{model}.json").read_text())
        setups = result["setups"]
        assert list(setups) == SETUPS
        for name, entry in setups.items():
            assert set(entry["ppl"]) == {"32", "128"} and all(p["ppl"] > 1 for p in entry["ppl"].values())
            assert all(len(p["window_nll"]) == p["windows"] for p in entry["ppl"].values())  # for paired intervals
            assert entry["niah"]["context_lengths"] == [64, 128]
            assert ("sparsity" in entry) == (name != "full")
        assert (
            0
            < setups["sparse-4x4-sink1"]["sparsity"]["128"]["sparsity"]
            < setups["sparse-4x8-sink1"]["sparsity"]["128"]["sparsity"]
        )
        for name in ("full", "sparse-4x4-sink1"):
            assert set(setups[name]["benchmarks"]) == set(TASKS)
            assert all(b["n"] == 6 and 0 <= b["acc_norm"] <= 1 for b in setups[name]["benchmarks"].values())
        assert "benchmarks" not in setups["sparse-4x8-sink1"]
        assert result["settings"]["niah"]["samples_per_cell"] == 2


def test_report_json_table_plot_and_verdicts(pipeline):
    run_dir, out, png, codes = pipeline
    assert codes["report"] == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == set(study.MODELS) and set(report["training"]) == set(study.MODES)
    assert report["missing"] == [] and report["target_length"] == 128 and report["target_setup"] == "sparse-4x4-sink1"
    assert {"device", "date", "command"} <= set(report["runs"][0])
    ppl = {m: {s: e["ppl"]["128"]["ppl"] for s, e in report["models"][m]["setups"].items()} for m in study.MODELS}
    sparsity = {
        m: report["models"][m]["setups"]["sparse-4x4-sink1"]["sparsity"]["128"]["sparsity"] for m in study.MODELS
    }
    # each verdict follows from the models' own numbers: (value, reference, met) of the five targets
    expected = [
        (ppl["ssa"]["sparse-4x4-sink1"], ppl["full"]["full"], lambda v, r: v / r - 1 <= 0.01),
        (ppl["ssa"]["sparse-4x4-sink1"], ppl["full"]["sparse-4x4-sink1"], lambda v, r: v < r),
        (ppl["ssa"]["sparse-4x4-sink1"], ppl["sparse"]["sparse-4x4-sink1"], lambda v, r: v < r),
        (ppl["ssa"]["full"], ppl["full"]["full"], lambda v, r: v / r - 1 <= 0.01),
        (sparsity["ssa"], sparsity["full"], lambda v, r: v > r),
    ]
    assert len(report["targets"]) == 5
    for target, (value, reference, met) in zip(report["targets"], expected):
        assert (target["value"], target["reference"], target["met"]) == (value, reference, met(value, reference))
    first = report["targets"][0]
    windows = report["models"]["ssa"]["setups"]["sparse-4x4-sink1"]["ppl"]["128"]["windows"]
    if windows >= 2:  # the paired interval over the shared windows brackets the point estimate
        lo, hi = first["ci95"]
        assert lo <= first["relative"] <= hi and "95% CI" in out.with_suffix(".md").read_text()
    else:
        assert first["ci95"] is None
    curve = report["ppl_vs_budget"]["SSA"]
    assert [p["receptive_field"] for p in curve] == [128, 16, 32]
    md = out.with_suffix(".md").read_text()
    for label in ("Original, full", "Full-Full, sparse 4x4, 1 sink", "Sparse-Sparse, full", "SSA, sparse 4x8, 1 sink"):
        assert f"| {label} |" in md
    assert (
        "| target | SSA | reference | margin | verdict |" in md and md.count("| met |") + md.count("| MISSED |") == 5
    )
    assert "HellaSwag (acc_norm)" in md and "NIAH 128" in md and "PPL 128" in md
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_target_verdicts_met_and_missed():
    met = check_targets(
        {
            "full": {"full": 20.0, "sparse": 22.0},
            "sparse": {"full": 23.0, "sparse": 21.0},
            "ssa": {"full": 20.1, "sparse": 20.15},
        },
        {"full": 0.75, "ssa": 0.90},
    )
    assert [t["met"] for t in met] == [True] * 5
    assert met[0]["relative"] == pytest.approx(0.0075) and met[0]["margin"] == pytest.approx(0.0025)
    assert met[1]["margin"] == pytest.approx(1 - 20.15 / 22.0) and met[4]["margin"] == pytest.approx(0.15)
    missed = check_targets(
        {
            "full": {"full": 20.0, "sparse": 22.0},
            "sparse": {"full": 23.0, "sparse": 20.2},
            "ssa": {"full": 19.0, "sparse": 20.3},
        },
        {"full": 0.75, "ssa": 0.70},
    )
    assert [t["met"] for t in missed] == [False, True, False, True, False]
    assert missed[0]["margin"] == pytest.approx(-0.005)  # 1.5% above: 0.5 points past the 1% threshold
    assert missed[3]["met"] and missed[3]["relative"] == pytest.approx(-0.05)  # lower than Full-Full meets it
    assert "MISSED" in verdict_row(missed[0]) and "| met |" in verdict_row(missed[1])
    unmeasured = check_targets({"full": {"full": 20.0, "sparse": None}, "ssa": {"full": 20.0, "sparse": 20.0}}, {})
    assert [t["met"] for t in unmeasured] == [True, None, None, True, None]
    assert "not measured" in verdict_row(unmeasured[1])


def test_paired_interval_separates_a_consistent_gap_from_noise():
    """Per-window NLLs of the same windows: a gap every window shows is significant however small; a gap of the
    same mean that flips sign from window to window is not; the interval rides on the targets and their rows."""
    rng = random.Random(0)
    ref = [3.0 + rng.uniform(-0.3, 0.3) for _ in range(24)]  # windows differ a lot from each other
    consistent = [x + 0.01 for x in ref]  # +1% perplexity on every window
    noisy = [x + 0.01 + (0.2 if i % 2 else -0.2) for i, x in enumerate(ref)]
    lo, hi = paired_interval(consistent, ref)
    assert lo == pytest.approx(math.exp(0.01) - 1, rel=1e-6) and hi == pytest.approx(lo, rel=1e-6)
    lo, hi = paired_interval(noisy, ref)
    assert lo < 0 < hi
    assert paired_interval(ref[:1], ref[:1]) is None and paired_interval(ref, ref[:5]) is None
    targets = check_targets(
        {"full": {"full": 20.0, "sparse": 22.0}, "sparse": {"sparse": 21.0}, "ssa": {"full": 20.1, "sparse": 20.2}},
        {"full": 0.7, "ssa": 0.8},
        windows={"full": {"full": ref}, "ssa": {"full": consistent, "sparse": noisy}},
    )
    assert targets[3]["ci95"][0] > 0 and targets[1]["ci95"] is None  # Full->Sparse has no windows here
    assert "95% CI +1.01% .. +1.01%" in verdict_row(targets[3])
