"""ssa_adapt.eval on CPU: perplexity by hand, sparse == full within the budget, attention statistics and Theorem 1
on real activations, the NIAH builder and scorer, and the `ssa` lm-eval model end to end on a 20-item local task.

The model is a tiny random Llama with a word-level tokenizer built here (no download), so nothing is skipped.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_config

import ssa_adapt
from ssa_adapt import SSAConfig
from ssa_adapt.eval import (
    Budget,
    apply_rope_scaling,
    apply_setup,
    attention_statistics,
    build_niah_sample,
    parse_setups,
    perplexity,
    plot_niah_heatmaps,
    run_niah,
    score_niah,
    token_windows,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a an of to and in is was it that he she they we you i his her their my on for with as at by from this "
    "be have had not but what all were when there can said which do one about out up so if no time into them "
    "could would more some then than like other people these two may first water long day sky sun sea grass "
    "snow fire coal blood milk night red blue green white black yellow hot cold wet dry color what question "
    "answer special magic number hidden text remember mentioned above following"
).split()


def _tokenizer():
    """A word-level tokenizer (words above, digits one by one, punctuation), built offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)) + list("0123456789") + list(".,?!:;\n"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=512,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def _model(tokenizer, seed=0, layers=2, group=3):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(
        "llama", group=group, layers=layers, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _windows(n, length, vocab, seed=0):
    return torch.randint(4, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------------------------------------------


def test_perplexity_is_exp_of_mean_cross_entropy_by_hand(tokenizer):
    model = _model(tokenizer)
    windows = _windows(3, 40, len(tokenizer))
    with torch.no_grad():
        logits = model(windows).logits.float()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    result = perplexity(model, windows, batch_size=2, chunk=7, progress=False)
    assert result.tokens == 3 * 39 and result.windows == 3 and result.context_len == 40
    assert result.nll == pytest.approx(ce.item(), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(ce.item()), rel=1e-5)
    per_window = F.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
    assert result.window_nll == pytest.approx(per_window.tolist(), rel=1e-5)  # window order, batches of 2 + 1


def test_token_windows_score_the_same_span_at_every_length():
    docs = [list(range(100)), list(range(1000, 1050)), list(range(5))]
    w16 = token_windows(docs, 16, span=32)
    w32 = token_windows(docs, 32, span=32)
    assert w16.shape == (4, 16) and w32.shape == (2, 32)
    assert torch.equal(w16.reshape(-1), w32.reshape(-1))
    with pytest.raises(ValueError, match="multiple of context_len"):
        token_windows(docs, 24, span=32)


def test_sparse_equals_full_perplexity_when_the_context_fits_the_budget(tokenizer):
    model = _model(tokenizer)
    ssa_adapt.convert(model, SSAConfig(block_size=4, block_count=4, sink_blocks=1))  # receptive field 16 tokens
    fits, longer = _windows(4, 16, len(tokenizer)), _windows(2, 96, len(tokenizer))
    ppl = {}
    for mode in ("full", "sparse"):
        ssa_adapt.set_inference(model, mode)
        ppl[mode] = (perplexity(model, fits, progress=False).ppl, perplexity(model, longer, progress=False).ppl)
    assert ppl["sparse"][0] == pytest.approx(ppl["full"][0], rel=1e-6)
    assert abs(ppl["sparse"][1] - ppl["full"][1]) > 1e-6  # beyond the budget the sparse stream really drops blocks


def test_rope_scaling_factor_one_keeps_the_function_and_four_stretches_it(tokenizer):
    model = _model(tokenizer)
    ids = _windows(1, 64, len(tokenizer))
    with torch.no_grad():
        before = model(ids).logits
        params = apply_rope_scaling(model, 1.0)
        same = model(ids).logits
        apply_rope_scaling(model, 4.0, original_max_position_embeddings=32)
        stretched = model(ids).logits
    assert params["rope_type"] == "llama3"
    assert torch.allclose(before, same, atol=1e-5)
    assert model.config.max_position_embeddings == 128
    assert not torch.allclose(before, stretched, atol=1e-3)
    with pytest.raises(ValueError, match="factor >= 1"):
        apply_rope_scaling(model, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# attention statistics
# ---------------------------------------------------------------------------------------------------------------


def test_attn_sparsity_is_one_when_every_block_is_selected(tokenizer):
    model = _model(tokenizer)
    budget = Budget(block_size=4, block_count=8, sink_blocks=1)  # 32 tokens
    stats = attention_statistics(model, _windows(2, 30, len(tokenizer)), budget, progress=False)[budget.name]
    assert set(stats["layers"]) == {0, 1}
    for layer in stats["layers"].values():
        assert layer["sparsity"] == pytest.approx([1.0] * 6, abs=1e-6)
        assert max(layer["error_mean"]) < 1e-5
    assert stats["sparsity"] == pytest.approx(1.0, abs=1e-6) and stats["dropped"] == pytest.approx(0.0, abs=1e-6)


def test_theorem1_bound_holds_on_real_activations_and_matches_recorded_sparsity(tokenizer):
    model = _model(tokenizer, layers=3)
    windows = _windows(2, 80, len(tokenizer))
    budgets = [Budget(4, 4, 1), Budget(4, 4, 0), Budget(8, 3, 1, 2)]
    stats = attention_statistics(model, windows, budgets, progress=False)
    for b in budgets:
        s = stats[b.name]
        assert s["bound_checks"] == 3 * 2 * 80 * 6
        assert s["bound_violations"] == 0, s
        assert 0 < s["sparsity"] < 1 and s["bound_max_ratio"] <= 1.001
        assert s["sparsity_beyond_rf"] < s["sparsity"]  # tokens past the receptive field lose mass
        assert s["bound_max_excess_rel"] < 1e-6
    # the converted model's own recorder (full mode: the same activations) agrees, budget 4x4 with a sink
    ssa_adapt.convert(model, SSAConfig(block_size=4, block_count=4, sink_blocks=1, inference_mode="full"))
    with torch.no_grad(), ssa_adapt.record_attention_sparsity(model) as recorded:
        per_window = []
        for row in windows:
            model(row[None])
            per_window.append(torch.stack(list(recorded.values())).mean())
    assert stats[budgets[0].name]["sparsity"] == pytest.approx(torch.stack(per_window).mean().item(), abs=1e-5)


def test_setups_convert_switch_and_unload(tokenizer):
    model = _model(tokenizer)
    original, full, sparse = parse_setups(["original", "full", "sparse-4x4-sink1"])
    ids = _windows(1, 48, len(tokenizer))
    with torch.no_grad():
        ref = model(ids).logits
        apply_setup(model, sparse)
        assert ssa_adapt.get_controller(model).config.block_count == 4
        out_sparse = model(ids).logits
        apply_setup(model, full)
        out_full = model(ids).logits
        apply_setup(model, original)
        assert not ssa_adapt.is_converted(model)
        out_orig = model(ids).logits
    assert torch.allclose(out_full, ref, atol=1e-5) and torch.allclose(out_orig, ref, atol=1e-6)
    assert not torch.allclose(out_sparse, ref, atol=1e-4)
    assert sparse.label == "sparse 4x4, 1 sink"
    with pytest.raises(ValueError, match="sparse-<block_size>"):
        parse_setups(["sparse-16"])


# ---------------------------------------------------------------------------------------------------------------
# needle in a haystack
# ---------------------------------------------------------------------------------------------------------------

HAYSTACK = " ".join(
    f"the {c} sun was {h} on day {i % 10} . they said it could be {c} water ."
    for i, (c, h) in enumerate(zip(["red", "blue", "green", "white"] * 10, ["hot", "cold", "wet", "dry"] * 10))
)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_niah_builder_places_the_needle_at_the_requested_depth(tokenizer, depth):
    hay = tokenizer(HAYSTACK, add_special_tokens=False).input_ids
    sample = build_niah_sample(tokenizer, hay, 300, depth, 4817263)
    ids = sample.input_ids
    assert len(ids) == 300 and ids[0] == tokenizer.bos_token_id
    needle = tokenizer(" The special magic number is 4817263.", add_special_tokens=False).input_ids
    assert ids[sample.needle_start : sample.needle_start + len(needle)] == needle
    assert abs(sample.actual_depth - depth) <= 0.05  # sentences here are ~15 tokens of a ~270-token haystack
    before = tokenizer.decode(ids[sample.haystack_start : sample.needle_start]).strip()
    at_end = sample.needle_start == sample.haystack_start + sample.haystack_len
    assert before == "" or at_end or before.endswith(".")  # cut at a sentence boundary (or after the haystack)
    assert tokenizer.decode(ids[-12:]).endswith("the special magic number is")


def test_niah_scorer_gives_known_good_one_and_wrong_zero():
    assert score_niah(" 4817263. It was hidden in the text.", "4817263") == 1.0
    assert score_niah("4817263", "4817263") == 1.0
    assert score_niah(" 4817236.", "4817263") == 0.0
    assert score_niah(" 48172631", "4817263") == 0.0  # inside a longer number does not count
    assert score_niah("", "4817263") == 0.0


def test_run_niah_scores_what_the_model_retrieves(tokenizer, tmp_path, monkeypatch):
    """Each cell scores whether the greedy answer holds the needle's number: a model that answers with the first
    seven-digit number in the first half of its prompt finds the needle at depth 0 and misses it at depth 1, at
    every length, and the grid, the per-length means and the samples say so."""
    model = _model(tokenizer)
    ssa_adapt.convert(model, SSAConfig(block_size=4, block_count=4, sink_blocks=1))
    spaced = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: spaced(ids, **kw).replace(" ", ""))  # "1234567"

    def first_half_reader(ids, **kwargs):
        head = " ".join(tokenizer.convert_ids_to_tokens(ids[0, : ids.shape[1] // 2].tolist()))
        found = re.search(r"(?:\d ){6}\d", head)
        answer = tokenizer(found.group(0) if found else "no", add_special_tokens=False, return_tensors="pt")
        return torch.cat([ids, answer.input_ids], 1)

    monkeypatch.setattr(model, "generate", first_half_reader)
    hay = tokenizer(HAYSTACK, add_special_tokens=False).input_ids
    result = run_niah(model, tokenizer, (64, 96), (0.0, 1.0), haystack_ids=hay, max_new_tokens=4, progress=False)
    assert result.grid() == [[1.0, 1.0], [0.0, 0.0]]  # [depth][length]
    assert result.by_length() == {64: 0.5, 96: 0.5}
    assert [(s["depth"], s["answer"] in s["generated"]) for s in result.samples] == [(0.0, True), (1.0, False)] * 2
    png = plot_niah_heatmaps({"first half": result, "again": result.to_dict()}, tmp_path / "niah.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------------------
# lm-eval: the registered `ssa` model on a 20-item local task
# ---------------------------------------------------------------------------------------------------------------

COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}


@pytest.fixture(scope="module")
def lm_eval_setup(tokenizer, tmp_path_factory):
    pytest.importorskip("lm_eval")
    root = tmp_path_factory.mktemp("lm_eval")
    plain = root / "plain"
    model = _model(tokenizer)
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    converted = root / "converted"
    ssa_adapt.convert(model, SSAConfig(block_size=4, block_count=2, sink_blocks=1, inference_mode="sparse"))
    model.save_pretrained(converted)
    tokenizer.save_pretrained(converted)
    tasks = root / "tasks"
    tasks.mkdir()
    things = list(COLORS)
    rows = []
    for i in range(20):
        thing = things[i % len(things)]
        rows.append(
            {"question": f"what color is the {thing} ? the {thing} was {'hot' if i % 2 else 'cold'} .", "label": i % 4}
        )
    choices = ["blue", "green", "white", "red"]
    (tasks / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {tasks / 'tiny_mc.jsonl'}\nvalidation_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: 'question: {{question}} answer:'\ndoc_to_target: label\n"
        f"doc_to_choice: {json.dumps(choices)}\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
    (tasks / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {tasks / 'tiny_mc.jsonl'}\nvalidation_split: validation\noutput_type: generate_until\n"
        "doc_to_text: 'question: {{question}} answer:'\ndoc_to_target: 'blue'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return plain, converted, tasks


def test_ssa_lm_eval_model_cli_runs_a_20_item_local_task(lm_eval_setup, tmp_path):
    plain, _, tasks = lm_eval_setup
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "ssa_adapt.eval.lm_eval_cli",
        "--model",
        "ssa",
        "--model_args",
        f"pretrained={plain},inference_mode=sparse,block_size=4,block_count=2,sink_blocks=1,dtype=float32",
        "--include_path",
        str(tasks),
        "--tasks",
        "tiny_mc",
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output_path",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(result_file.read_text())
    assert results["n-samples"]["tiny_mc"]["effective"] == 20
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert results["config"]["model"] == "ssa"
    assert results["config"]["model_args"]["block_count"] == 2
    ssa_config = results["config"]["ssa_config"]  # SSALM.get_model_info: what the loaded model really ran
    assert ssa_config["block_count"] == 2 and ssa_config["inference_mode"] == "sparse"


def test_ssa_lm_eval_model_from_python_converted_checkpoint_and_overrides(lm_eval_setup):
    from ssa_adapt.eval.harness import evaluate_tasks
    from ssa_adapt.eval.lm_eval_model import SSALM

    plain, converted, tasks = lm_eval_setup
    lm = SSALM(pretrained=str(converted), device="cpu", dtype="float32", batch_size=4)
    config = ssa_adapt.get_controller(lm.model).config
    assert (config.block_size, config.block_count, config.inference_mode) == (4, 2, "sparse")  # from the checkpoint
    sparse = evaluate_tasks(lm, ["tiny_mc", "tiny_gen"], include_path=tasks, limit=20, log_samples=True)
    assert sparse["n-samples"]["tiny_gen"]["effective"] == 20  # greedy generation through the sparse KV-cache path

    lm_full = SSALM(pretrained=str(plain), inference_mode="full", device="cpu", dtype="float32", batch_size=4)
    assert ssa_adapt.get_controller(lm_full.model).config.inference_mode == "full"
    full = evaluate_tasks(lm_full, ["tiny_mc"], include_path=tasks, limit=20, log_samples=True)

    def loglik(out):
        return [r[0][0] for s in out["samples"]["tiny_mc"] for r in s["resps"]]

    a, b = loglik(sparse), loglik(full)
    assert len(a) == len(b) == 80
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-4  # prompts exceed the 8-token budget: sparse differs

    lm_fits = SSALM(pretrained=str(plain), block_size=16, block_count=16, device="cpu", dtype="float32", batch_size=4)
    fits = evaluate_tasks(lm_fits, ["tiny_mc"], include_path=tasks, limit=20, log_samples=True)
    assert max(abs(x - y) for x, y in zip(loglik(fits), b)) < 1e-4  # 256-token budget: sparse == full


def test_benchmarks_for_setups_reuses_full_scores_only_when_every_request_fits(tokenizer, lm_eval_setup):
    from ssa_adapt.eval.harness import benchmarks_for_setups

    _, _, tasks = lm_eval_setup
    model = _model(tokenizer)
    setups = parse_setups(["original", "sparse-4x2-sink1", "sparse-16x16-sink1"])
    scores = benchmarks_for_setups(
        model, tokenizer, setups, ["tiny_mc"], include_path=tasks, limit={"tiny_mc": 12}, check_items=4, batch_size=4
    )
    assert scores["original"]["tiny_mc"]["n"] == 12
    assert "reused_from" not in scores["sparse-4x2-sink1"]["tiny_mc"]  # 8-token field: run sparse
    reused = scores["sparse-16x16-sink1"]["tiny_mc"]
    assert reused["reused_from"] == "original" and reused["acc"] == scores["original"]["tiny_mc"]["acc"]
    assert reused["check_items"] == 4 and reused["check_max_abs_loglik_diff"] < 1e-4


def test_ruler_niah_runs_offline_through_the_ssa_model(lm_eval_setup, tmp_path):
    pytest.importorskip("wonderwords")
    pytest.importorskip("nltk")
    from ssa_adapt.eval.harness import ruler_niah
    from ssa_adapt.eval.lm_eval_model import SSALM

    plain, _, _ = lm_eval_setup
    lm = SSALM(pretrained=str(plain), block_size=16, block_count=16, device="cpu", dtype="float32", max_length=4200)
    scores = ruler_niah(lm, str(plain), [4096], limit=1)
    assert set(scores) == {"niah_single_1"} and scores["niah_single_1"]["4096"] in (0.0, 1.0)
    with pytest.raises(ValueError, match="4096 and up"):
        ruler_niah(lm, str(plain), [2048])


def test_longbench_fails_offline_with_a_clear_message(monkeypatch):
    from ssa_adapt.eval.harness import LongBenchUnavailable, check_longbench_available

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LongBenchUnavailable, match="Xnhyacinth/LongBench.*huggingface.co"):
        check_longbench_available()
