"""KV-cache decoding in sparse mode: cached block means, teacher forcing, chunked prefill, padding, beams."""

import pytest
import torch
from tiny_models import cache_kwargs, tiny_model, token_batch
from transformers import DynamicCache

import ssa_adapt
from ssa_adapt import SSACache, SSAConfig

CONFIG = SSAConfig(block_size=4, block_count=4)


@pytest.fixture
def model():
    return ssa_adapt.convert(tiny_model("llama", 3, layers=2), CONFIG)


def _decode_logits(model, ids, prefill, cache_class=SSACache):
    """Prefill `prefill` tokens, then feed the rest one by one through a `cache_class` -> logits [B, T, V]."""
    cache = cache_class()
    with torch.no_grad():
        out = [model(ids[:, :prefill], **cache_kwargs(cache), use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits)
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("cache_class", [SSACache, DynamicCache])
@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_teacher_forced_cached_decoding_equals_no_cache_forward(model, mode, cache_class):
    """An SSACache (block means) and a plain DynamicCache (selection from the keys) both decode what the no-cache
    forward computes."""
    ssa_adapt.set_inference(model, mode)
    ids = token_batch(2, 75)
    with torch.no_grad():
        reference = model(ids).logits
    logits, cache = _decode_logits(model, ids, prefill=9, cache_class=cache_class)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert type(cache) is cache_class  # used as given, never changed into another class
    if mode == "sparse" and cache_class is SSACache:
        assert all(cache.layer_means(layer) is not None for layer in (0, 1))


def test_cached_block_means_equal_means_of_cached_keys(model):
    ids = token_batch(2, 58)
    _, cache = _decode_logits(model, ids, prefill=5)
    for layer in (0, 1):
        keys = cache.layers[layer].keys.transpose(1, 2)  # [B, TK, H, D]
        n = keys.shape[1] // 4
        expected = keys[:, : n * 4].reshape(2, n, 4, *keys.shape[2:]).mean(2)
        state = cache.layer_means(layer)
        assert state.key_len == keys.shape[1]
        torch.testing.assert_close(state.means[:, :n], expected, atol=1e-6, rtol=0)


def test_steps_that_complete_no_block_update_nothing(model, monkeypatch):
    """Left-padded rows complete their blocks at different steps: a step updates the means only when some row's
    newest key completes a block (its start known on the host), and the means equal those of the cached keys. The
    cache leaves that update to the sparse stream (`SSACache.block_means_before_append`), whose split path (the
    reference here) calls the dispatcher's append_block_means; the one-launch step does it in its kernel."""
    from ssa_adapt.ops import dispatch

    calls = []
    real = dispatch.append_block_means
    monkeypatch.setattr(dispatch, "append_block_means", lambda *a, **k: calls.append(a[2].shape[1]) or real(*a, **k))
    ids = token_batch(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 starts at key 3
    cache = SSACache()
    with torch.no_grad():
        model(ids[:, :9], attention_mask=mask[:, :9], **cache_kwargs(cache), use_cache=True)
        for t in range(9, 40):
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(cache), use_cache=True)
    # per layer, the key counts whose newest key completed a block of row 0 (TK % 4 == 0) or row 1 ((TK - 3) % 4)
    expected = [tk for tk in range(11, 41) if tk % 4 == 0 or (tk - 3) % 4 == 0]
    assert calls == [tk for tk in expected for _ in (0, 1)]
    for layer in (0, 1):
        keys = cache.layers[layer].keys.transpose(1, 2)
        for row, start in ((0, 0), (1, 3)):
            n = (40 - start) // 4
            want = keys[row, start : start + 4 * n].reshape(n, 4, *keys.shape[2:]).mean(1)
            torch.testing.assert_close(cache.layer_means(layer).means[row, :n], want, atol=1e-6, rtol=0)


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
def test_beam_search_and_sampling_match_selection_from_keys(model, kwargs):
    """generate() builds an SSACache, whose means follow beam reordering: the same output as selecting from the
    keys at every step (a plain DynamicCache passed in)."""
    prompt = token_batch(2, 37)

    def run(**cache):
        torch.manual_seed(0)
        mask = torch.ones_like(prompt)
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=14, pad_token_id=0,
                             return_dict_in_generate=True, **cache, **kwargs)  # fmt: skip
        return out.sequences, getattr(out, "cache", getattr(out, "past_key_values", None))

    with_cache_means, built = run()
    from_keys, given = run(**cache_kwargs(DynamicCache()))
    assert isinstance(built, SSACache) and type(given) is DynamicCache
    assert torch.equal(with_cache_means, from_keys)


def test_unload_restores_transformers_cache():
    """generate() of an unloaded model builds transformers' own DynamicCache again."""
    model = ssa_adapt.unload(ssa_adapt.convert(tiny_model("llama", 3, layers=2), CONFIG))
    out = model.generate(token_batch(1, 10), max_new_tokens=2, pad_token_id=0, return_dict_in_generate=True)
    assert type(getattr(out, "cache", getattr(out, "past_key_values", None))) is DynamicCache


@pytest.mark.parametrize("G", [1, 3])
def test_full_attention_decode_step_with_document_starts(G, monkeypatch):
    """One query per row with its document's start (a left-padded decode step) takes SDPA over the row's keys
    (`masked_decode_attention`), not the document-mask path (the reference here, FlexAttention on CUDA, which
    built a block mask for every key length); equal to the reference."""
    from ssa_adapt import ops
    from ssa_adapt.ops import dispatch, reference

    g = torch.Generator().manual_seed(G)
    B, TK, H, D = 3, 37, 2, 16
    q = torch.randn(B, 1, H * G, D, generator=g)
    k, v = torch.randn(B, TK, H, D, generator=g), torch.randn(B, TK, H, D, generator=g)
    doc_start = torch.tensor([[0], [5], [36]])  # no padding, some, all but the query's own key
    want = reference.full_attention(q, k, v, doc_start=doc_start)
    monkeypatch.setattr(dispatch.reference, "full_attention", lambda *a, **kw: pytest.fail("document-mask path"))
    out = ops.full_attention(q, k, v, doc_start=doc_start)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], v[2, 36:].repeat_interleave(G, 1), atol=1e-6, rtol=0)  # attends to itself
