"""The real model: SmolLM2-135M converts, and sparse attention with a sink block keeps its perplexity on held-out
prose (pretrained models park attention on the first tokens)."""

import math

import pytest
import torch

import ssa_adapt
from ssa_adapt import SSAConfig

assets = pytest.importorskip("ssa_adapt.assets")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_and_text():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = assets.smollm2_path()
        novels = assets.austen_texts()
    except assets.AssetUnavailable as err:
        pytest.skip(f"SmolLM2 or the Austen text cannot be had here: {err}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = novels["Persuasion"]
    ids = tokenizer(text[len(text) // 3 :], return_tensors="pt").input_ids[:, :1024]  # held-out prose, mid-novel
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, ids


def _ppl(model, ids):
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def test_smollm2_sparse_perplexity_close_to_full_and_sink_matters(smollm2_and_text):
    model, ids = smollm2_and_text
    original = _ppl(model, ids)
    ssa_adapt.convert(model, SSAConfig(block_size=16, block_count=16, sink_blocks=1))
    try:
        assert ssa_adapt.get_controller(model).layers == list(range(30))
        ssa_adapt.set_inference(model, "full")
        full = _ppl(model, ids)
        ssa_adapt.set_inference(model, "sparse")
        sparse = _ppl(model, ids)
        ssa_adapt.set_inference(model, sink_blocks=0)
        no_sink = _ppl(model, ids)
    finally:
        ssa_adapt.unload(model)
    print(
        f"SmolLM2 1024 Austen tokens: original {original:.3f} full {full:.3f} sparse {sparse:.3f} no-sink {no_sink:.3f}"
    )
    assert abs(full - original) / original < 1e-4
    assert abs(sparse - full) / full < 0.05
    assert no_sink > sparse * 1.01
