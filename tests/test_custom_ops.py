"""The Triton host functions as custom ops (ssa_adapt/ops/triton/library.py): torch.compile traces the kernel
backend without a graph break and the compiled results equal the eager kernels'; `torch.library.opcheck` checks
each op's schema, fake implementation and autograd registration.

CPU (CI): the kernels run under TRITON_INTERPRET=1 in subprocesses (`python tests/test_custom_ops.py OUT.json
CASE_ID...`, see tests/interpreted.py), float32, compiled with the aot_eager backend (dynamo, fake tensors, AOT
autograd: the whole tracing path, without inductor's code generation).
"""

from __future__ import annotations

import sys

import pytest
import torch
from interpreted import run_interpreted, write_interpreted

pytest.importorskip("triton")

BS = 16
CASES = (
    "compiled-prefill",
    "compiled-decode",
    "static-sparse",
    "static-full",
    "static_generate-sparse",
    "static_generate-full",
    "opcheck-select",
    "opcheck-attend",
    "opcheck-decode",
    "opcheck-align",
)


def _inputs(T=40, TK=40, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, 4, 16, generator=g)
    k, v = (torch.randn(1, TK, 2, 16, generator=g) for _ in range(2))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def _doc_start():
    ds = torch.zeros(1, 40, dtype=torch.long)
    ds[0, 20:] = 20  # two packed documents
    return ds


def _compiled_prefill() -> dict:
    from ssa_adapt import ops

    q, k, v = _inputs(requires_grad=True)
    ds = _doc_start()
    cfg = dict(block_size=BS, block_count=2, sink_blocks=1, local_blocks=1, backend="triton")

    def fn(q, k, v):
        o, idx = ops.sparse_attention(q, k, v, doc_start=ds, return_indices=True, **cfg)
        full = ops.full_attention(q, k, v, doc_start=ds, backend="reference")
        return o, idx, ops.alignment_loss(full, o, backend="triton")

    def run(f):
        for x in (q, k, v):
            x.grad = None
        o, idx, align = f(q, k, v)
        (o.square().sum() + 3 * align).backward()
        return o.detach(), idx, align.detach(), [x.grad.clone() for x in (q, k, v)]

    eager = run(fn)
    explained = torch._dynamo.explain(fn)(q, k, v)
    torch._dynamo.reset()
    compiled = run(torch.compile(fn, backend="aot_eager", fullgraph=True))
    return {
        "breaks": explained.graph_break_count,
        "indices_equal": torch.equal(eager[1], compiled[1]),
        "o_err": (eager[0] - compiled[0]).abs().max().item(),
        "align_err": (eager[2] - compiled[2]).abs().item(),
        "grad_err": max((a - b).abs().max().item() for a, b in zip(eager[3], compiled[3])),
        "grads_nonzero": all(g.abs().sum().item() > 0 for g in compiled[3]),
    }


def _compiled_decode() -> dict:
    from ssa_adapt import ops

    q, k, v = _inputs(T=1, TK=70)
    means = ops.block_means(k, torch.zeros(1, dtype=torch.long), BS, 70 // BS)
    cfg = dict(block_size=BS, block_count=2, sink_blocks=1, local_blocks=1, backend="triton")

    def fn(q, k, v):
        idx = ops.select_blocks(q, k, block_means=means, **cfg)
        return ops.attend_blocks(q, k, v, idx, block_size=BS, backend="triton"), idx

    with torch.no_grad():
        eager = fn(q, k, v)
        explained = torch._dynamo.explain(fn)(q, k, v)
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v)
    return {
        "breaks": explained.graph_break_count,
        "indices_equal": torch.equal(eager[1], compiled[1]),
        "o_err": (eager[0] - compiled[0]).abs().max().item(),
    }


def _static_generate(mode: str) -> dict:
    """transformers' compiled static-cache decode step on the kernels (block means beside the cache, positions on
    the device), fullgraph: the tokens of eager dynamic-cache decoding; eager static beam search (the means follow
    the beams) equals dynamic beam search."""
    from tiny_models import tiny_model, token_batch
    from transformers import CompileConfig

    import ssa_adapt
    from ssa_adapt.patching import static_cache

    def reference_used(*args, **kwargs):
        raise AssertionError("the compiled step took the reference path, not the kernels")

    static_cache.static_cache_attention = reference_used
    config = ssa_adapt.SSAConfig(block_size=BS, block_count=2, backend="triton", gate=True)
    model = ssa_adapt.convert(tiny_model("llama", 2, layers=1, head_dim=16), config)
    torch.nn.init.normal_(model.model.layers[0].self_attn.ssa_gate.weight, std=0.5)
    ssa_adapt.set_inference(model, mode)
    ids = token_batch(2, 40)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # 40 + 6 tokens: beyond the 32-token receptive field
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    compile_config = CompileConfig(backend="aot_eager", fullgraph=True)
    compile_config._compile_all_devices = True
    eager = model.generate(ids, **kwargs)
    compiled = model.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    out = {"equal": torch.equal(eager, compiled), "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}
    if mode == "sparse":
        beams = model.generate(ids, num_beams=2, **kwargs)
        out["beams_equal"] = torch.equal(
            beams, model.generate(ids, num_beams=2, cache_implementation="static", **kwargs)
        )
        ssa_adapt.set_inference(model, "full")
        out["differs_from_full"] = not torch.equal(eager, model.generate(ids, **kwargs))
    return out


def _static_generate_kernels(mode: str) -> dict:
    """`static_generate` on the kernels (backend='triton', interpreted; no CUDA graph on the CPU): every decode step
    through `StaticSSACache.attend`'s device-position path (what the graph replays on CUDA), the tokens of eager
    dynamic-cache decoding, for a left-padded batch. Also the host syncs of the decode steps, which CUDA-graph capture
    refuses: calls of `item`, `bool`, `int`, `float`, `tolist` or `__index__` on a tensor from our code or
    transformers' between a step's `begin_step` and the end of its forward (syncs inside torch ops, such as
    `nonzero`, are not seen here)."""
    import sys

    from tiny_models import tiny_model, token_batch

    import ssa_adapt
    from ssa_adapt.decoding import static

    calls, syncs, stepping = [], [], [False]
    decode, begin = static.static_cache_decode, static.StaticSSACache.begin_step
    static.static_cache_decode = lambda *a, **kw: calls.append(kw["mode"]) or decode(*a, **kw)

    def begin_step(self):
        begin(self)
        stepping[0] = True

    def probe(name, method):
        def f(self, *args, **kwargs):
            where = sys._getframe(1).f_code.co_filename
            if stepping[0] and ("ssa_adapt" in where or "transformers" in where):
                syncs.append(f"{name} in {where.split('site-packages/')[-1]}:{sys._getframe(1).f_lineno}")
            return method(self, *args, **kwargs)

        return f

    methods = {
        n: getattr(torch.Tensor, n) for n in ("item", "__bool__", "__int__", "__float__", "tolist", "__index__")
    }
    static.StaticSSACache.begin_step = begin_step
    for name, method in methods.items():
        setattr(torch.Tensor, name, probe(name, method))
    try:
        config = ssa_adapt.SSAConfig(block_size=BS, block_count=3, backend="triton")  # one of the middle blocks
        model = ssa_adapt.convert(tiny_model("llama", 2, layers=2, head_dim=16), config)
        model.register_forward_hook(lambda *args: stepping.__setitem__(0, False))
        ssa_adapt.set_inference(model, mode)
        ids = token_batch(2, 80)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0  # 80 + 6 tokens: beyond the 48-token receptive field
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        eos = model.generation_config.eos_token_id  # generate stops a row there (and pads it): the same here
        got = ssa_adapt.static_generate(model, ids, mask, max_new_tokens=6, cuda_graph=False, eos_token_id=eos,
                                        pad_token_id=0)  # fmt: skip
    finally:
        static.static_cache_decode, static.StaticSSACache.begin_step = decode, begin
        for name, method in methods.items():
            setattr(torch.Tensor, name, method)
    return {"equal": torch.equal(eager, got), "calls": calls, "syncs": sorted(set(syncs))}


def _opcheck(name: str) -> dict:
    from ssa_adapt.ops.triton import library as L

    q, k, v = _inputs(requires_grad=True)
    ds = _doc_start()
    idx = L.select_blocks(q.detach(), k.detach(), ds, BS, 2, 1, 1, None, "")
    if name == "select":
        op, args = L.select_blocks, (q.detach(), k.detach(), ds, BS, 2, 1, 1, None, "")
    elif name == "attend":
        op, args = L.attend_fwd, (q, k, v, idx, ds, BS, 0.25, "")
    elif name == "decode":
        q1 = q.detach()[:, -1:]
        means = torch.randn(1, 2, 2, 16)
        L.decode_select(q1, means, None, None, 40, BS, 2, 1, 1, None, "")
        torch.library.opcheck(L.decode_select, (q1, means, None, None, 40, BS, 2, 1, 1, None, ""))
        op, args = L.decode_attend, (q1, k.detach(), v.detach(), idx[:, -1:], None, None, BS, None, "")
    else:
        a, b = (torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in (0, 1))
        op, args = L.alignment_loss, (a, b, "smooth_l1", 1.0, False)
    result = torch.library.opcheck(op, args)
    return {"failures": [test for test, outcome in result.items() if outcome != "SUCCESS"]}


def run_one(case: str) -> dict:
    if case == "compiled-prefill":
        return _compiled_prefill()
    if case == "compiled-decode":
        return _compiled_decode()
    if case.startswith("static-"):
        return _static_generate(case.removeprefix("static-"))
    if case.startswith("static_generate-"):
        return _static_generate_kernels(case.removeprefix("static_generate-"))
    return _opcheck(case.removeprefix("opcheck-"))


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__, list(CASES), timeout_s=600)


@pytest.mark.parametrize("case", CASES)
def test_custom_ops_interpreted(interpreted, case):
    r = interpreted[case]
    assert "error" not in r, r.get("error")
    if case.startswith("opcheck"):
        assert r["failures"] == []
        return
    if case.startswith("static_generate-"):  # 5 steps after the first token, 2 layers, all on the kernels
        assert r["equal"] and r["calls"] == [case.removeprefix("static_generate-")] * 10, r
        assert r["syncs"] == [], r["syncs"]
        return
    if case.startswith("static-"):
        assert r["equal"] and r["graphs"] > 0
        assert case == "static-full" or (r["beams_equal"] and r["differs_from_full"])
        return
    assert r["breaks"] == 0
    assert r["indices_equal"]
    assert r["o_err"] < 1e-5
    if case == "compiled-prefill":
        assert r["align_err"] < 1e-6 and r["grad_err"] < 1e-5 and r["grads_nonzero"]


def test_kernel_options_travel_as_a_string():
    from ssa_adapt.ops.triton.library import decode_options, encode_options
    from ssa_adapt.ops.triton.options import DecodeOptions, KernelOptions, SelectOptions

    options = KernelOptions(poison=True, select=SelectOptions(cap=1), decode=DecodeOptions(stats_chunk=4))
    assert decode_options(encode_options(options)) == options
    assert encode_options(None) == "" and decode_options("") is None


if __name__ == "__main__":
    write_interpreted(sys.argv[1], sys.argv[2:], run_one)
