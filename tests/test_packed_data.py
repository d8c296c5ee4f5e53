"""The packed token cache for pretraining: round trip, exact lengths, document positions, resume."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssa_adapt.packed_data import PackedTokenDataset, build_token_cache

DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(40)]
EOS = 0


def _tokenize(texts):
    return [[ord(c) for c in t] for t in texts]


def _build(folder, docs=DOCS, **kw):
    return build_token_cache(docs, _tokenize, folder, vocab_size=256, eos_token_id=EOS, chunk_docs=6, **kw)


def test_round_trip_lengths_and_positions(tmp_path):
    folder = _build(tmp_path / "cache")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["complete"] and meta["n_docs"] == 40 and meta["dtype"] == "uint16"
    stream = np.fromfile(folder / "tokens.bin", dtype=np.uint16)
    texts = "".join(chr(t) if t != EOS else "\0" for t in stream).split("\0")[:-1]
    assert texts == DOCS
    data = PackedTokenDataset(folder, seq_len=50)
    assert len(data) == meta["n_tokens"] // 50
    for i in range(len(data)):
        item = data[i]
        assert item["input_ids"].shape == (50,) and item["position_ids"].shape == (50,)
        assert item["input_ids"].tolist() == stream[i * 50 : (i + 1) * 50].tolist()
        # positions restart at 0 right after every EOS and at the sequence start
        ids, pos = item["input_ids"].tolist(), item["position_ids"].tolist()
        expected, p = [], 0
        for j in range(50):
            expected.append(p)
            p = 0 if ids[j] == EOS else p + 1
        assert pos == expected
    with pytest.raises(IndexError):
        data[len(data)]


def test_resume_after_interruption_gives_identical_files(tmp_path):
    def interrupted(limit):
        for i, doc in enumerate(DOCS):
            if i == limit:
                raise KeyboardInterrupt
            yield doc

    whole = _build(tmp_path / "whole")
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        _build(part, docs=interrupted(17))
    meta = json.loads((part / "meta.json").read_text())
    assert not meta["complete"] and meta["docs_consumed"] == 12  # two chunks of 6 were written
    with open(part / "tokens.bin", "ab") as f:  # a crash in the middle of a write leaves a torn tail
        f.write(b"\x07" * 11)
    _build(part)
    for name in ("tokens.bin", "doc_starts.bin"):
        assert (part / name).read_bytes() == (whole / name).read_bytes()


@pytest.mark.slow
def test_cache_data_script_with_real_tokenizer(tmp_path):
    assets = pytest.importorskip("ssa_adapt.assets")
    try:
        assets.smollm2_path()
    except assets.AssetUnavailable as err:
        pytest.skip(f"SmolLM2 tokenizer cannot be had here: {err}")
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path / "cache"
    script = Path(__file__).parents[1] / "recipes" / "cache_data.py"
    cmd = [
        sys.executable,
        str(script),
        "--dataset_name",
        str(corpus),
        "--tokenizer",
        "asset:smollm2-135m",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
    stream = np.fromfile(out / "tokens.bin", dtype=np.uint16).tolist()
    decoded = tokenizer.decode(stream).split(tokenizer.eos_token)[:-1]
    assert decoded == DOCS
