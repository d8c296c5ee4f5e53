"""Keyed needles (RULER-style single / multi-key / multi-value), their scoring, Wilson intervals, and batched runs."""

from __future__ import annotations

import random
import re

import pytest
import torch

pytest.importorskip("wonderwords")

from tiny_models import tiny_config  # noqa: E402

import ssa_adapt  # noqa: E402
from ssa_adapt import SSAConfig  # noqa: E402
from ssa_adapt.eval.niah import (  # noqa: E402
    binomial_interval,
    build_keyed_sample,
    random_keys,
    run_niah,
    score_answers,
)

HAYSTACK = " ".join(
    f"The {c} sun was {h} on day {i % 10}. They said it could be {c} water."
    for i, (c, h) in enumerate(zip(["red", "blue", "green", "white"] * 10, ["hot", "cold", "wet", "dry"] * 10))
)
NEEDLE = re.compile(r"One special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.")


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained here on the haystack (round-trips any text, so keys survive)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([HAYSTACK, "One special magic number for is: What are all the numbers"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def hay(tokenizer):
    return tokenizer(HAYSTACK, add_special_tokens=False).input_ids


@pytest.mark.parametrize("kind", ["single", "multikey", "multivalue"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_keyed_sample_holds_its_needles_and_asks_for_the_first_key(tokenizer, hay, kind, depth):
    sample = build_keyed_sample(tokenizer, hay, 400, depth, kind, random.Random(7))
    assert len(sample.input_ids) == 400 and sample.input_ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(sample.input_ids, skip_special_tokens=True)
    needles = NEEDLE.findall(text)
    assert len(needles) == (1 if kind == "single" else 4)
    keys = [k for k, _ in needles]
    # the needle asked for starts at needle_start, at the requested depth of the haystack
    first = tokenizer.decode(sample.input_ids[sample.needle_start :], skip_special_tokens=True)
    asked_key, asked_value = NEEDLE.search(first).groups()
    assert first.lstrip().startswith("One special magic number for") and asked_value == sample.answer
    assert abs(sample.actual_depth - depth) <= 0.1
    question = text.rsplit("\n\n", 1)[1]
    assert f"for {asked_key}" in question and question.endswith(" is" if kind != "multivalue" else " are")
    if kind == "multikey":  # four different keys, each with its own value; only the asked one is the answer
        assert len(set(keys)) == 4 and sample.answers == [asked_value]
    if kind == "multivalue":  # one key, four different values, all of them asked for
        assert set(keys) == {asked_key} and sorted(sample.answers) == sorted(v for _, v in needles)
        assert len(set(sample.answers)) == 4
    assert build_keyed_sample(tokenizer, hay, 400, depth, kind, random.Random(7)).input_ids == sample.input_ids


def test_keyed_sample_refuses_bad_input(tokenizer, hay):
    with pytest.raises(ValueError, match="kind='needle'"):
        build_keyed_sample(tokenizer, hay, 400, 0.5, "needle", random.Random(0))
    with pytest.raises(ValueError, match="depth=1.5"):
        build_keyed_sample(tokenizer, hay, 400, 1.5, "single", random.Random(0))
    with pytest.raises(ValueError, match="context_len=20"):
        build_keyed_sample(tokenizer, hay, 20, 0.5, "multivalue", random.Random(0))


def test_random_keys_are_distinct_adjective_noun_pairs():
    keys = random_keys(random.Random(3), 50)
    assert len(set(keys)) == 50 and all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)


def test_score_answers_counts_whole_numbers_only():
    assert score_answers("1234567, 7654321 and 12345678", ["1234567", "7654321", "2345678", "1111111"]) == 2


@pytest.mark.parametrize("hits,n", [(0, 40), (3, 40), (20, 40), (40, 40), (7, 9)])
def test_wilson_interval_is_where_the_score_test_accepts(hits, n):
    """The Wilson interval is the set of p with |hits/n - p| <= z sqrt(p (1 - p) / n): its ends solve that
    equation, found here by bisection, and it holds the observed rate."""
    low, high = binomial_interval(hits, n)
    phat, z = hits / n, 1.96

    def accepted(p):
        return abs(phat - p) <= z * (p * (1 - p) / n) ** 0.5

    def edge(inside, outside):
        for _ in range(60):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if accepted(mid) else (inside, mid)
        return inside

    assert low <= phat <= high
    assert low == pytest.approx(0.0 if hits == 0 else edge(phat, 0.0), abs=1e-9)
    assert high == pytest.approx(1.0 if hits == n else edge(phat, 1.0), abs=1e-9)


def _model(tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", group=2, layers=2, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1,
                         pad_token_id=2)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return ssa_adapt.convert(model, SSAConfig(block_size=4, block_count=4, sink_blocks=1))


@pytest.mark.parametrize("kind", ["magic", "multikey", "multivalue"])
def test_batched_run_generates_what_one_prompt_at_a_time_does(tokenizer, hay, kind):
    """Batches of prompts (no padding: a cell's prompts have one length) give every sample the same greedy text,
    in sparse mode, as one prompt per call; cells hold the rate and a Wilson interval over the asked values."""
    model = _model(tokenizer)
    args = dict(context_lengths=(336, 400), depths=(0.0, 1.0), samples_per_cell=5, kind=kind, haystack_ids=hay,
                max_new_tokens=6, progress=False)  # fmt: skip
    one = run_niah(model, tokenizer, batch_size=1, **args)
    batched = run_niah(model, tokenizer, batch_size=3, **args)
    assert [s["generated"] for s in batched.samples] == [s["generated"] for s in one.samples]
    assert [s["answers"] for s in batched.samples] == [s["answers"] for s in one.samples]
    values = 4 if kind == "multivalue" else 1
    assert batched.trials == {f"{c}@{d:g}": 5 * values for c in (336, 400) for d in (0.0, 1.0)}
    for key, (low, high) in batched.intervals.items():
        assert low <= batched.scores[key] <= high and high - low > 0.1


def test_multikey_rewards_retrieval_by_key_not_by_position(tokenizer, hay, monkeypatch):
    """A reader that answers with the value next to the asked key scores 1 everywhere; one that answers with the
    first number of the prompt scores 1 only where the asked needle comes first (so below 1 on multikey)."""
    model = _model(tokenizer)

    def reader(by_key):
        def generate(ids, **kwargs):
            rows = []
            for row in ids:
                text = tokenizer.decode(row, skip_special_tokens=True)
                key = re.search(r"for ([a-z]+-[a-z]+) is\s*$", text).group(1)
                needles = NEEDLE.findall(text)
                value = next(v for k, v in needles if k == key) if by_key else needles[0][1]
                rows.append(torch.tensor(tokenizer(" " + value, add_special_tokens=False).input_ids))
            width = max(len(r) for r in rows)
            tail = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=2) for r in rows])
            return torch.cat([ids, tail.to(ids.device)], 1)

        return generate

    args = dict(context_lengths=(480,), depths=(0.0, 0.5, 1.0), samples_per_cell=6, kind="multikey",
                haystack_ids=hay, batch_size=4, progress=False)  # fmt: skip
    monkeypatch.setattr(model, "generate", reader(by_key=True))
    assert set(run_niah(model, tokenizer, **args).scores.values()) == {1.0}
    monkeypatch.setattr(model, "generate", reader(by_key=False))
    by_position = run_niah(model, tokenizer, **args)
    assert by_position.scores["480@0"] > by_position.scores["480@1"]
    assert by_position.scores["480@1"] < 0.5  # the asked needle is last unless all four land at the end
