"""recipes/eval_suite.py on a tiny random Llama with stand-in text: perplexity and NIAH of two setups into the
report JSON, its markdown table and the heatmap; a time budget leaves units for a later call; two partial reports
merge into one."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from test_eval import WORDS, _tokenizer
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM, HfArgumentParser

from ssa_adapt import assets
from ssa_adapt.eval.stages import EvalPlan, new_result, pending_units

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("eval_suite", ROOT / "recipes" / "eval_suite.py")
suite = sys.modules["eval_suite"] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up
spec.loader.exec_module(suite)


def _prose(seed: int, sentences: int) -> str:
    rng = random.Random(seed)
    return " ".join(" ".join(rng.choice(WORDS[:60]) for _ in range(8)) + " ." for _ in range(sentences))


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    tok = _tokenizer()
    torch.manual_seed(0)
    config = tiny_config("llama", 2, layers=2, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=3)
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(assets, "austen_texts", lambda: {f"Novel {i}": _prose(10 + i, 60) for i in range(2)})
    monkeypatch.setattr(assets, "paul_graham_essays", lambda: [_prose(20 + i, 40) for i in range(2)])
    return tmp_path


def _run(folder: Path, out: Path, *flags: str) -> None:
    argv = ["--model", str(folder / "model"), "--out", str(out), "--png", str(out.with_suffix(".png")), "--device"]
    argv += ["cpu", "--setups", "original", "sparse-4x4-sink1", "--ppl_lengths", "32", "64", "--ppl_span", "64"]
    argv += ["--niah_lengths", "48", "--niah_depths", "0", "1", *flags]
    suite.main(*HfArgumentParser((suite.SuiteArgs, EvalPlan)).parse_args_into_dataclasses(args=argv))


def test_suite_reports_every_setup_and_merges(tiny):
    _run(tiny, tiny / "ppl.json", "--stages", "ppl")
    _run(tiny, tiny / "niah.json", "--stages", "niah")
    ppl, niah = (json.loads((tiny / f"{n}.json").read_text()) for n in ("ppl", "niah"))
    assert [s["label"] for s in ppl["setups"].values()] == ["original", "sparse 4x4, 1 sink"]
    for name in ("original", "sparse-4x4-sink1"):
        assert set(ppl["setups"][name]["ppl"]) == {"32", "64"} and "niah" not in ppl["setups"][name]
        assert niah["setups"][name]["niah"]["context_lengths"] == [48]
    # 32 tokens exceed the receptive field of 16: the sparse stream gives another perplexity
    assert ppl["setups"]["sparse-4x4-sink1"]["ppl"]["32"]["ppl"] != pytest.approx(
        ppl["setups"]["original"]["ppl"]["32"]["ppl"], rel=1e-6
    )
    assert ppl["runs"][0]["stages"][0].startswith("ppl original @ 32")
    assert (tiny / "niah.png").read_bytes()[:4] == b"\x89PNG"
    merged = tiny / "merged.json"
    suite.main(suite.SuiteArgs(out=str(merged), merge=[str(tiny / "ppl.json"), str(tiny / "niah.json")]), EvalPlan())
    report = json.loads(merged.read_text())
    assert {"ppl", "niah"} <= set(report["setups"]["sparse-4x4-sink1"]) and len(report["runs"]) == 2
    md = merged.with_suffix(".md").read_text()
    assert "| sparse 4x4, 1 sink |" in md and "PPL 64" in md and "NIAH 48" in md


def test_time_budget_leaves_units_for_the_next_call(tiny):
    plan = EvalPlan(setups=["original"], stages=["ppl"], ppl_lengths=[32, 64], ppl_span=64, time_budget_s=0)
    result = new_result("tiny", plan)
    assert [str(u) for u in pending_units(plan, result)] == ["ppl original @ 32", "ppl original @ 64"]
    from ssa_adapt.eval import load_model
    from ssa_adapt.eval.stages import run_evaluation

    saved = []
    load = lambda: load_model(str(tiny / "model"), device="cpu")  # noqa: E731
    assert not run_evaluation(plan, result, load, lambda r, finished: saved.append(list(finished)))
    assert saved == [[saved[0][0]]] and saved[0][0].startswith("ppl original @ 32")
    assert run_evaluation(plan, result, load, lambda r, finished: saved.append(list(finished)))
    assert set(result["setups"]["original"]["ppl"]) == {"32", "64"} and pending_units(plan, result) == []


def test_niah_kinds_are_units_of_their_own(tiny):
    """Each needle kind is its own unit and result entry ("niah" for the magic number, "niah-<kind>" else), with
    Wilson intervals per cell; saved kinds are skipped and `redo niah` forgets every kind."""
    _run(tiny, tiny / "kinds.json", "--stages", "niah", "--niah_lengths", "160", "--niah_kinds", "magic",
         "multikey", "--niah_samples", "3", "--niah_batch", "2")  # fmt: skip
    result = json.loads((tiny / "kinds.json").read_text())
    for name in ("original", "sparse-4x4-sink1"):
        entry = result["setups"][name]
        assert entry["niah"]["kind"] == "magic" and entry["niah-multikey"]["kind"] == "multikey"
        cells = entry["niah-multikey"]["trials"]
        assert cells == {"160@0": 3, "160@1": 3} and set(entry["niah-multikey"]["intervals"]) == set(cells)
        assert len(entry["niah-multikey"]["samples"]) == 6
    plan = EvalPlan(setups=["original", "sparse-4x4-sink1"], stages=["niah"], niah_lengths=[160],
                    niah_kinds=["magic", "multikey"])  # fmt: skip
    assert pending_units(plan, result) == []
    redo = EvalPlan(**{**plan.__dict__, "redo": ["niah"]})
    assert [str(u) for u in pending_units(redo, result)] == [
        f"niah {kind} {name} @ 160" for kind in ("magic", "multikey") for name in ("original", "sparse-4x4-sink1")
    ]
    with pytest.raises(ValueError, match="niah_kinds"):
        EvalPlan(niah_kinds=["haystack"])
