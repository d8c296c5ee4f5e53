"""transformers' own static cache on converted models: generate(cache_implementation="static") equals generate()
with the default dynamic cache token for token (greedy in both modes, a left-padded batch, beam search, seeded
sampling), also with transformers' compiled decode step, which a generation compiles once; sliding-window layers are
refused with the fix."""

import pytest
import torch
from tiny_models import tiny_model, token_batch
from torch._dynamo.backends.debugging import aot_eager
from transformers import CompileConfig

import ssa_adapt
from ssa_adapt import SSAConfig

SMALL = SSAConfig(block_size=4, block_count=4)  # receptive field 16 tokens: 40-token prompts decode sparse


def _left_padded():
    ids = token_batch(3, 40)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :13] = 0
    return ids, mask


def _both(model, ids, mask, **kwargs):
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=16, **kwargs)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=16, cache_implementation="static", **kwargs)
    return dynamic, static


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_static_cache_greedy_equals_dynamic_on_a_left_padded_batch(arch, mode):
    model = ssa_adapt.convert(tiny_model(arch, 2), SMALL)
    ssa_adapt.set_inference(model, mode)
    ids, mask = _left_padded()
    dynamic, static = _both(model, ids, mask, do_sample=False)
    assert torch.equal(static, dynamic)
    if mode == "sparse":  # the sparse stream decoded: full attention picks other tokens
        ssa_adapt.set_inference(model, "full")
        assert not torch.equal(_both(model, ids, mask, do_sample=False)[0], dynamic)


def test_static_cache_beam_search_and_sampling_equal_dynamic():
    model = ssa_adapt.convert(tiny_model("llama", 2), SMALL)
    ids, mask = _left_padded()
    dynamic, static = _both(model, ids, mask, do_sample=False, num_beams=3)
    assert torch.equal(static, dynamic)
    torch.manual_seed(0)
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, top_k=20)
    torch.manual_seed(0)
    static = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=True, top_k=20, cache_implementation="static"
    )
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_compiled_static_decode_equals_eager(mode):
    """transformers compiles the static-cache decode step (compile_config; on the CPU only when asked for all
    devices): one graph without breaks (fullgraph), the same tokens as eager decoding."""
    model = ssa_adapt.convert(tiny_model("llama", 2, layers=1), SMALL.replace(gate=True))
    torch.nn.init.normal_(model.model.layers[0].self_attn.ssa_gate.weight, std=0.5)
    ssa_adapt.set_inference(model, mode)
    ids, mask = _left_padded()
    compiled = _compiled_static_generate(model, ids, mask, 8, CompileConfig(backend="aot_eager", fullgraph=True))
    assert torch.equal(compiled, model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))


def _compiled_static_generate(model, ids, mask, new_tokens: int, config):
    """Greedy generate() on transformers' static cache with its decode step compiled under `config` (on every
    device, the CPU too), dynamo's caches cleared before and after."""
    config._compile_all_devices = True
    torch._dynamo.reset()
    try:
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              cache_implementation="static", compile_config=config)  # fmt: skip
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_compiled_static_decode_compiles_once_per_generation(mode):
    """A 40-token generation compiles transformers' decode step once, with static shapes, as it does for the
    unconverted model: every step's inputs keep their shapes (the mask the step gets is padded to the cache's
    buffer). A mask that grew by one column per token made dynamo compile three graphs, one of them with a dynamic
    length, for which CUDA graphs (compile_config's mode="reduce-overhead") record a new graph at every length."""
    model = ssa_adapt.convert(tiny_model("llama", 2), SSAConfig(block_size=16, block_count=2))
    ssa_adapt.set_inference(model, mode)  # 80 keys against a receptive field of 32: the sparse stream selects
    ids, mask = _left_padded()
    graphs = []

    def counting_backend(gm, example_inputs, **kwargs):  # a function: CompileConfig.to_dict deep-copies objects
        graphs.append([x for x in example_inputs if isinstance(x, torch.SymInt) or not _static_shape(x)])
        return aot_eager(gm, example_inputs)

    compiled = _compiled_static_generate(
        model, ids, mask, 40, CompileConfig(backend=counting_backend, fullgraph=True, mode=None)
    )
    assert len(graphs) == 1, f"{len(graphs)} compilations of the decode step"
    assert not graphs[0], f"the decode step's graph has dynamic shapes: {graphs[0]}"
    assert torch.equal(compiled, model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False))


def _static_shape(x) -> bool:
    return not isinstance(x, torch.Tensor) or not any(isinstance(s, torch.SymInt) for s in x.shape)


def test_static_cache_on_sliding_window_layers_is_refused_with_the_fix():
    extra = dict(
        layers=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"],
    )
    model = ssa_adapt.convert(tiny_model("qwen3", 2, **extra), SMALL)
    ids = token_batch(1, 20)
    with pytest.raises(ValueError, match=r"Layer 1 keeps sliding-window attention.*cache_implementation=None"):
        model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 24)


def test_eager_static_decoding_reads_the_written_length_once_per_step(monkeypatch):
    """Eagerly over transformers' StaticCache the written length is a device count: it is read on the host (a wait
    for the GPU) once per forward pass for all layers, which also share one padding computation; the tokens stay
    those of the dynamic cache."""
    import sys

    from ssa_adapt.patching import attention

    model = ssa_adapt.convert(tiny_model("llama", 2, layers=3), SMALL)
    ids, mask = _left_padded()
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    reads, starts, forwards = [], [], []
    read = torch.Tensor.__int__

    def spy_int(self):
        if sys._getframe(1).f_code.co_filename.endswith("static_cache.py"):
            reads.append(1)
        return read(self)

    document_starts = attention.document_starts
    monkeypatch.setattr(torch.Tensor, "__int__", spy_int)
    monkeypatch.setattr(attention, "document_starts", lambda *a, **k: starts.append(1) or document_starts(*a, **k))
    model.register_forward_pre_hook(lambda *args: forwards.append(1))
    static = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)
    assert len(forwards) == 8 and 0 < len(reads) <= len(forwards) and len(starts) == len(forwards), (reads, starts)
