"""KV-cache decoding in sparse mode: cached block means, teacher forcing, chunked prefill, padding, beams."""

import pytest
import torch
from tiny_models import cache_kwargs, tiny_model, token_batch
from transformers import DynamicCache

import ssa_adapt
import ssa_adapt.patching.attention as attention_module
from ssa_adapt import SSAConfig
from ssa_adapt.cache import SSACache

CONFIG = SSAConfig(block_size=4, block_count=4)


@pytest.fixture
def model():
    return ssa_adapt.convert(tiny_model("llama", 3, layers=2), CONFIG)


def _decode_logits(model, ids, prefill):
    """Prefill `prefill` tokens, then feed the rest one by one through the cache -> logits [B, T, V]."""
    cache = DynamicCache()
    with torch.no_grad():
        out = [model(ids[:, :prefill], **cache_kwargs(cache), use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits)
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_teacher_forced_cached_decoding_equals_no_cache_forward(model, mode):
    ssa_adapt.set_inference(model, mode)
    ids = token_batch(2, 75)
    with torch.no_grad():
        reference = model(ids).logits
    logits, cache = _decode_logits(model, ids, prefill=9)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    if mode == "sparse":
        assert isinstance(cache, SSACache) and sorted(cache._ssa_means) == [0, 1]


def test_cached_block_means_equal_means_of_cached_keys(model):
    ids = token_batch(2, 58)
    _, cache = _decode_logits(model, ids, prefill=5)
    for layer in (0, 1):
        keys = cache.layers[layer].keys.transpose(1, 2)  # [B, TK, H, D]
        n = keys.shape[1] // 4
        expected = keys[:, : n * 4].reshape(2, n, 4, *keys.shape[2:]).mean(2)
        state = cache._ssa_means[layer]
        assert state.key_len == keys.shape[1]
        torch.testing.assert_close(state.means[:, :n], expected, atol=1e-6, rtol=0)


def test_chunked_prefill_equals_one_pass(model):
    ids = token_batch(1, 70)
    cache = DynamicCache()
    with torch.no_grad():
        reference = model(ids).logits
        first = model(ids[:, :33], **cache_kwargs(cache), use_cache=True).logits
        second = model(ids[:, 33:], **cache_kwargs(cache), use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], 1), reference, atol=1e-5, rtol=0)


def test_left_padded_batch_generates_like_each_row_alone(model):
    prompts = [token_batch(1, 45, seed=3)[0], token_batch(1, 30, seed=4)[0]]
    ids = torch.zeros(2, 45, dtype=torch.long)
    mask = torch.zeros(2, 45, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 45 - len(p) :] = p
        mask[b, 45 - len(p) :] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for b, p in enumerate(prompts):
        alone = model.generate(
            p[None],
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )
        assert batch[b, 45:].tolist() == alone[0, len(p) :].tolist()


@pytest.mark.parametrize("kwargs", [dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=20)])
def test_beam_search_and_sampling_match_selection_from_keys(model, kwargs, monkeypatch):
    """The cached means follow beam reordering: same output as selecting from the keys at every step."""
    prompt = token_batch(2, 37)

    def run():
        torch.manual_seed(0)
        mask = torch.ones_like(prompt)
        return model.generate(prompt, attention_mask=mask, max_new_tokens=14, pad_token_id=0, **kwargs)

    with_cache_means = run()
    monkeypatch.setattr(attention_module, "as_ssa_cache", lambda cache: None)
    from_keys = run()
    assert torch.equal(with_cache_means, from_keys)
