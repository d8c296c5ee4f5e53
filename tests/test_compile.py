"""torch.compile of converted tiny Llama / Qwen3 models: no graph break inside SSA attention, and the compiled
forward and backward equal eager's (eval and training, sparse and full, a left-padded batch).

The compiled runs use the `aot_eager` backend (dynamo and AOT autograd, the whole tracing path, without
inductor's code generation, which takes a minute per model on two CPU cores)."""

import pytest
import torch
from tiny_models import tiny_model, token_batch

import ssa_adapt
from ssa_adapt import SSAConfig
from ssa_adapt.ops import reference as R
from ssa_adapt.ops.cached_means import block_means

SMALL = SSAConfig(block_size=4, block_count=4)  # receptive field 16 tokens: 40-token inputs go sparse


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _padded(batch: int = 2, length: int = 40):
    ids = token_batch(batch, length)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # row 0 left-padded
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("phase", ["eval", "train"])
def test_explain_reports_no_graph_break(arch, phase):
    model = ssa_adapt.convert(tiny_model(arch, 2), SMALL)
    ids, mask = _padded()
    if phase == "train":  # SSA training, the stream drawn per forward pass (no set_stream)
        model.train()
        explained = torch._dynamo.explain(lambda x: model(x, attention_mask=mask, labels=x).loss)(ids)
    else:
        explained = torch._dynamo.explain(lambda x: model(x, attention_mask=mask).logits)(ids)
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_compiled_forward_equals_eager(arch, mode):
    model = ssa_adapt.convert(tiny_model(arch, 2), SMALL)
    ssa_adapt.set_inference(model, mode)
    ids, mask = _padded()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        plain = model(ids).logits
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled(ids).logits, plain, atol=1e-5, rtol=0)
    if mode == "sparse":  # the sparse stream ran: rows beyond the receptive field differ from full attention
        ssa_adapt.set_inference(model, "full")
        with torch.no_grad():
            assert (model(ids).logits[:, 32:] - plain[:, 32:]).abs().max() > 1e-3


def _loss_and_grads(model, forward, ids, mask):
    model.zero_grad()
    loss = ssa_adapt.ssa_loss(model, forward(ids, attention_mask=mask, labels=ids, use_cache=False).loss)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "train_mode,stream,checkpointing",
    [("ssa", "sparse", False), ("ssa", "full", True), ("sparse", None, True), ("full", None, False)],
)
def test_compiled_training_equals_eager(train_mode, stream, checkpointing):
    model = ssa_adapt.convert(tiny_model("llama", 2), SMALL.replace(train_mode=train_mode, gate=True)).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if stream is not None:
        ssa_adapt.set_stream(model, stream)
    ids, mask = _padded()
    loss, grads = _loss_and_grads(model, model, ids, mask)
    fullgraph = True
    if checkpointing:
        # transformers' own checkpointed layers may break the graph (from 5.2x the `kernels` layer wrapper sets a
        # context variable inside torch.utils.checkpoint, unconverted models alike; 5.17 traces them whole): none of
        # the breaks may come from ssa_adapt, and without any the compiled model must be one graph
        explained = torch._dynamo.explain(lambda x: model(x, attention_mask=mask, labels=x, use_cache=False).loss)(ids)
        assert not [b for b in explained.break_reasons if any("ssa_adapt" in f.filename for f in b.user_stack)]
        fullgraph = explained.graph_break_count == 0
        torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    loss_c, grads_c = _loss_and_grads(model, compiled, ids, mask)
    assert grads.keys() == grads_c.keys() and any(".ssa_gate." in n for n in grads)
    torch.testing.assert_close(loss_c, loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    if train_mode == "ssa":
        assert ssa_adapt.alignment_loss(model) is not None  # recorded by the compiled forward


def test_compiled_training_draws_the_eager_streams():
    """Without set_stream each forward pass draws its stream from the seed given to convert: the same sequence
    compiled and eager."""

    def draws(compile_it: bool) -> list[str]:
        model = ssa_adapt.convert(tiny_model("llama", 2, layers=1), SMALL, seed=0).train()
        ctrl = ssa_adapt.get_controller(model)
        run = torch.compile(model, backend="aot_eager") if compile_it else model
        ids = token_batch(1, 24)
        out = []
        for _ in range(8):
            run(ids, labels=ids)
            out.append(ctrl.drawn)
        return out

    eager = draws(False)
    assert set(eager) == {"full", "sparse"}
    assert draws(True) == eager


def test_compiled_attention_refuses_padding_between_real_tokens():
    model = ssa_adapt.convert(tiny_model("llama", 2), SMALL)
    ids = token_batch(2, 40)
    mask = torch.ones_like(ids)
    mask[1, 10:14] = 0  # a hole: later tokens would attend across it
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="padding after a real token.*padding_side='left'"):
        compiled(ids, attention_mask=mask)


def test_traced_reference_equals_segments(monkeypatch):
    """The reference's host-sync-free doc_start path (what dynamo traces) equals its per-segment path: packing,
    left padding, a sliding window, and selection from cached block means."""
    g = torch.Generator().manual_seed(0)
    B, T, TK, HQ, H, D = 3, 37, 45, 6, 2, 8
    q = torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, TK, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    doc_start = torch.zeros(B, T, dtype=torch.long)
    doc_start[0] = 5  # left padding
    doc_start[1, 10:], doc_start[1, 25:] = 18, 30  # packed documents
    doc_start[2] = torch.minimum(torch.arange(T) + 8, torch.tensor(13))  # padding queries, then a document at 13
    cfg = dict(block_size=4, block_count=4, sink_blocks=1, local_blocks=1)
    row_start = torch.tensor([[0], [7], [13]])
    means = block_means(k, row_start[:, 0], 4, TK // 4)

    def run():
        idx = R.select_blocks(q, k, doc_start=doc_start, **cfg)
        return (
            idx,
            R.attend_blocks(q, k, v, idx, block_size=4, doc_start=doc_start),
            R.full_attention(q, k, v, doc_start=doc_start),
            R.full_attention(q, k, v, doc_start=doc_start, sliding_window=7),
            R.select_blocks(q[:, -1:], k, doc_start=row_start, block_means=means, **cfg),
        )

    segments = run()
    monkeypatch.setattr(R, "_traced", lambda doc_start: doc_start is not None)
    traced = run()
    assert torch.equal(traced[0], segments[0]) and torch.equal(traced[4], segments[4])
    for a, b in zip(traced[1:4], segments[1:4]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_flex_full_stream_traces_without_a_break():
    """The CUDA full stream with document starts (FlexAttention block masks built from doc_start, what compiled
    code takes on GPUs since doc_start is then always a tensor) traces as one graph, calling FlexAttention itself
    (not the eager path's cached compiled wrapper, which dynamo traces through with a warning); checked on the CPU."""
    import warnings

    from ssa_adapt.ops import flex

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 40, 4, 16, generator=g)
    k, v = (torch.randn(1, 40, 2, 16, generator=g) for _ in range(2))
    doc_start = torch.zeros(1, 40, dtype=torch.long)
    doc_start[0, 20:] = 20
    compiled = torch.compile(
        lambda q, k, v: flex.full_attention(q, k, v, doc_start=doc_start), backend="aot_eager", fullgraph=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(q, k, v)
    assert not [w for w in caught if "cache" in str(w.message) and "wrapped function" in str(w.message)]
    torch.testing.assert_close(out, R.full_attention(q, k, v, doc_start=doc_start), atol=1e-5, rtol=0)
