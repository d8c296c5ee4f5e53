"""convert / unload / set_inference / streams over tiny random llama, mistral, qwen2, qwen3 models with G in 1..7."""

import copy
import re
import warnings

import pytest
import torch
from tiny_models import ARCHS, GROUPS, tiny_model, token_batch

import ssa_adapt
from ssa_adapt import SSAConfig
from ssa_adapt.patching.registry import ARCHITECTURES, find_attention_layers

SMALL = SSAConfig(block_size=4, block_count=4)  # receptive field 16 tokens: 80-token inputs go sparse


@pytest.fixture(params=[(a, g) for a in ARCHS for g in GROUPS], ids=lambda p: f"{p[0]}-G{p[1]}")
def arch_group(request):
    return request.param


def test_full_mode_equals_original_and_sparse_only_short(arch_group):
    arch, group = arch_group
    model = tiny_model(arch, group)
    ids = token_batch()
    with torch.no_grad():
        reference = model(ids).logits
        ssa_adapt.convert(model, SMALL)
        ssa_adapt.set_inference(model, "full")
        full = model(ids).logits
        ssa_adapt.set_inference(model, "sparse")
        sparse = model(ids).logits
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(sparse[:, :16], reference[:, :16], atol=1e-5, rtol=0)
    assert (sparse[:, 32:] - reference[:, 32:]).abs().max() > 1e-3


def test_unload_restores_original(arch_group):
    arch, group = arch_group
    model = tiny_model(arch, group)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    config = model.config.to_dict()
    ssa_adapt.convert(model, SMALL.replace(gate=True))
    assert any(".ssa_gate." in k for k in model.state_dict())
    ssa_adapt.unload(model)
    assert not ssa_adapt.is_converted(model)
    assert model.config._attn_implementation == "sdpa"
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(modules[name] is module for name, module in model.named_modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config.to_dict() == config


def test_registry_agrees_with_transformers():
    for arch, spec in ARCHITECTURES.items():
        model = tiny_model(arch, 2, layers=3)
        assert model.config.model_type == arch
        assert sorted(find_attention_layers(model, spec)) == [0, 1, 2]


def test_unsupported_and_double_conversion_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*supported: \['llama', 'mistral', 'qwen2', 'qwen3'\]"):
        ssa_adapt.convert(gpt2, SMALL)
    model = ssa_adapt.convert(tiny_model(), SMALL)
    with pytest.raises(ValueError, match="already converted"):
        ssa_adapt.convert(model, SMALL)
    with pytest.raises(ValueError, match="do not exist"):
        ssa_adapt.convert(tiny_model(), SMALL.replace(layers=[0, 5]))


def test_config_validation_messages():
    with pytest.raises(ValueError, match="block_size=0"):
        SSAConfig(block_size=0)
    with pytest.raises(ValueError, match="exceed block_count"):
        SSAConfig(block_count=2, sink_blocks=2, local_blocks=1)
    with pytest.raises(ValueError, match="inference_mode='dense'"):
        SSAConfig(inference_mode="dense")
    with pytest.raises(ValueError, match="full_prob=1.5"):
        SSAConfig(full_prob=1.5)
    with pytest.raises(ValueError, match="Unknown SSAConfig fields"):
        SSAConfig.from_dict({"block_sise": 4})
    model = ssa_adapt.convert(tiny_model(), SMALL)
    with pytest.raises(ValueError, match="exceed block_count"):
        ssa_adapt.set_inference(model, block_count=1)


def test_set_inference_changes_budget_without_retraining():
    model = ssa_adapt.convert(tiny_model(), SMALL)
    ids = token_batch(length=64)
    with torch.no_grad():
        narrow = model(ids).logits
        ssa_adapt.set_inference(model, block_count=16)  # 16 x 4 = 64 tokens: everything fits
        wide = model(ids).logits
        ssa_adapt.set_inference(model, "full")
        full = model(ids).logits
    torch.testing.assert_close(wide, full, atol=1e-5, rtol=0)
    assert (narrow - full).abs().max() > 1e-3
    assert model.config.ssa_config["block_count"] == 16


def test_set_inference_budget_also_trains_and_says_so():
    model = ssa_adapt.convert(tiny_model(), SMALL)  # 4 blocks of 4: 64-token inputs go sparse
    ids = token_batch(length=64)
    model.train()
    ssa_adapt.set_stream(model, "sparse")

    def align(expect_warning: str | None = None) -> float:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(ids, labels=ids)
        messages = [str(w.message) for w in caught if "set_inference" in str(w.message)]
        assert len(messages) == (expect_warning is not None), messages
        if expect_warning:
            assert re.search(expect_warning, messages[0]), messages[0]
        return ssa_adapt.alignment_loss(model).item()

    assert align() > 1e-4
    ssa_adapt.set_inference(model, "full", block_count=16)  # 16 x 4 = 64 tokens: both streams see everything
    assert align(r"block_count=16 \(was 4\).*set_inference\(model, block_count=4\)") < 1e-8
    assert align() < 1e-8  # warned once
    ssa_adapt.set_inference(model, "sparse", block_count=4)
    assert align(r"block_count=4 \(was 16\)") > 1e-4
    ssa_adapt.set_inference(model, block_count=16)  # changed and set back before training: nothing to say
    ssa_adapt.set_inference(model, block_count=4)
    assert align() > 1e-4


def test_only_requested_and_full_attention_layers_convert():
    model = ssa_adapt.convert(tiny_model("llama", 2, layers=3), SMALL.replace(layers=[1]))
    assert ssa_adapt.get_controller(model).layers == [1]
    assert [hasattr(layer.self_attn, "ssa_state") for layer in model.model.layers] == [False, True, False]
    ids = token_batch()
    with torch.no_grad():
        model.train()  # SSA training records an alignment loss for the converted layer only
        model(ids)
        assert list(ssa_adapt.get_controller(model).align_losses) == [1]
    qwen = tiny_model(
        "qwen3",
        2,
        layers=4,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    original = copy.deepcopy(qwen)
    ssa_adapt.convert(qwen, SMALL)
    assert ssa_adapt.get_controller(qwen).layers == [0, 2]
    ssa_adapt.set_inference(qwen, "full")
    with torch.no_grad():  # sliding layers keep their window through our full path
        torch.testing.assert_close(qwen(ids).logits, original(ids).logits, atol=1e-5, rtol=0)
    mistral = tiny_model("mistral", 2, sliding_window=8)
    with pytest.raises(ValueError, match="nothing for SSA to convert"):
        ssa_adapt.convert(mistral, SMALL)


def test_packed_sequences_in_a_model_equal_separate_runs():
    model = ssa_adapt.convert(tiny_model("qwen3", 3), SMALL)
    ids = token_batch(1, 90)
    lengths = [37, 53]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    for mode in ("sparse", "full"):
        ssa_adapt.set_inference(model, mode)
        with torch.no_grad():
            packed = model(ids, position_ids=position_ids).logits
            first = model(ids[:, :37]).logits
            second = model(ids[:, 37:]).logits
        torch.testing.assert_close(packed, torch.cat([first, second], 1), atol=1e-5, rtol=0)


def test_left_padded_batch_equals_unpadded_rows():
    model = ssa_adapt.convert(tiny_model("llama", 3), SMALL)
    ids = token_batch(2, 70)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :25] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=position_ids).logits
        alone = model(ids[1:, 25:]).logits
    torch.testing.assert_close(padded[1:, 25:], alone, atol=1e-5, rtol=0)


def _ssa_train_step(model, ids, stream):
    model.train()
    ssa_adapt.set_stream(model, stream)
    out = model(ids, labels=ids)
    loss = ssa_adapt.ssa_loss(model, out.loss)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss.detach(), grads


def test_ssa_training_records_alignment_and_follows_the_stream():
    model = ssa_adapt.convert(tiny_model("qwen2", 2), SMALL)
    ids = token_batch()
    model.train()
    ssa_adapt.set_stream(model, "full")
    full_logits = model(ids).logits
    align = ssa_adapt.alignment_loss(model)
    assert sorted(ssa_adapt.get_controller(model).align_losses) == [0, 1]
    assert align.item() > 0 and align.requires_grad
    ssa_adapt.set_stream(model, "sparse")
    sparse_logits = model(ids).logits
    model.eval()
    with torch.no_grad():
        ssa_adapt.set_inference(model, "full")
        torch.testing.assert_close(full_logits, model(ids).logits, atol=1e-5, rtol=0)
        ssa_adapt.set_inference(model, "sparse")
        torch.testing.assert_close(sparse_logits, model(ids).logits, atol=1e-5, rtol=0)
    for mode in ("full", "sparse"):  # the baselines' training modes run one stream, no alignment
        baseline = ssa_adapt.convert(tiny_model("qwen2", 2), SMALL.replace(train_mode=mode)).train()
        logits = baseline(ids).logits
        assert ssa_adapt.alignment_loss(baseline) is None
        expected = full_logits if mode == "full" else sparse_logits
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_stream_draw_once_per_forward_and_reproducible():
    draws = []
    for _ in range(2):
        model = ssa_adapt.convert(tiny_model(), SMALL, seed=123).train()
        ctrl = ssa_adapt.get_controller(model)
        seen = []
        for _ in range(40):
            model(token_batch(1, 20))
            seen.append(ctrl.drawn)
        draws.append(seen)
    assert draws[0] == draws[1]
    assert 5 < draws[0].count("full") < 35


def test_gradient_checkpointing_gives_same_gradients():
    ids = token_batch()
    plain = ssa_adapt.convert(tiny_model("llama", 4), SMALL.replace(gate=True))
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for stream in ("full", "sparse"):
        loss_a, grads_a = _ssa_train_step(plain, ids, stream)
        loss_b, grads_b = _ssa_train_step(checkpointed, ids, stream)
        torch.testing.assert_close(loss_a, loss_b)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_checkpoint_recomputation_reuses_the_selection(monkeypatch):
    """Under gradient checkpointing the backward pass runs each layer's forward again; its selection comes from the
    forward pass (one selection per layer and step), unless the recomputed queries differ from those of the last
    forward pass (two forward passes before one backward), where it selects again and the gradients stay right."""
    import ssa_adapt.patching.controller as controller

    calls = []
    select = controller.select_blocks
    monkeypatch.setattr(controller, "select_blocks", lambda *a, **kw: calls.append(1) or select(*a, **kw))
    ids, other = token_batch(), token_batch(seed=7)
    for mode in ("ssa", "nsa"):
        plain = ssa_adapt.convert(tiny_model("llama", 4), SMALL.replace(gate=True, train_mode=mode))
        checkpointed = copy.deepcopy(plain)
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss_a, grads_a = _ssa_train_step(plain, ids, "sparse")
        calls.clear()
        loss_b, grads_b = _ssa_train_step(checkpointed, ids, "sparse")
        assert len(calls) == 2, f"{mode}: {len(calls)} selections for 2 layers"
        torch.testing.assert_close(loss_a, loss_b)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        # forward on ids, forward on other, then the backward of the first: selects again, same gradients
        checkpointed.train()
        ssa_adapt.set_stream(checkpointed, "sparse")
        params = [p for p in checkpointed.parameters() if p.requires_grad]
        out = checkpointed(ids, labels=ids)
        loss = ssa_adapt.ssa_loss(checkpointed, out.loss)
        checkpointed(other, labels=other)
        calls.clear()
        grads_c = torch.autograd.grad(loss, params)
        assert len(calls) == 2
        for a, c in zip(grads_a, grads_c):
            torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-4)


def test_gate_is_trainable_and_prefixed():
    model = ssa_adapt.convert(tiny_model("mistral", 2), SMALL.replace(gate=True))
    names = [n for n, _ in model.named_parameters() if "ssa_" in n]
    assert len(names) == 2 and all(n.endswith("self_attn.ssa_gate.weight") for n in names)
    _, grads = _ssa_train_step(model, token_batch(), "sparse")
    named = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], grads))
    assert all(named[n].abs().sum() > 0 for n in names)


@pytest.mark.parametrize("stream, tolerance", [("full", 0.03), ("sparse", 0.2)])
def test_bf16_training_step_follows_float32(stream, tolerance):
    """An SSA training step in bf16 (both streams, the alignment loss, G = 7) gives the loss and gradients of the
    same weights in float32 up to bf16 rounding. The sparse stream's tolerance is wider: on a random model many
    blocks are near-tied, and bf16 activations flip some selections."""
    plain = tiny_model("qwen3", 7).to(torch.bfloat16)
    half = ssa_adapt.convert(copy.deepcopy(plain), SMALL)
    exact = ssa_adapt.convert(copy.deepcopy(plain).float(), SMALL)
    ids = token_batch()
    loss32, grads32 = _ssa_train_step(exact, ids, stream)
    loss16, grads16 = _ssa_train_step(half, ids, stream)
    assert abs(loss16.float().item() / loss32.item() - 1) < 1e-3
    assert all(g.dtype == torch.bfloat16 for g in grads16)
    flat32 = torch.cat([g.flatten() for g in grads32])
    flat16 = torch.cat([g.float().flatten() for g in grads16])
    assert ((flat16 - flat32).norm() / flat32.norm()).item() < tolerance / 2
    assert max(((b.float() - a).norm() / a.norm()).item() for a, b in zip(grads32, grads16)) < tolerance


def test_generate_in_both_modes():
    model = ssa_adapt.convert(tiny_model("llama", 3), SMALL)
    prompt = token_batch(1, 40)
    for mode in ("sparse", "full"):
        ssa_adapt.set_inference(model, mode)
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        # greedy decoding with the cache equals the argmax of full forwards, token by token
        ids = prompt
        for _ in range(6):
            with torch.no_grad():
                nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
        assert torch.equal(out, ids)


def test_record_attention_sparsity():
    model = ssa_adapt.convert(tiny_model(), SMALL)
    with ssa_adapt.record_attention_sparsity(model) as stats, torch.no_grad():
        model(token_batch(1, 16))
        short = {k: v.item() for k, v in stats.items()}
        model(token_batch(1, 80))
        long = {k: v.item() for k, v in stats.items()}
    assert sorted(short) == [0, 1] and all(abs(v - 1) < 1e-6 for v in short.values())
    assert all(0 < v < 1 for v in long.values())
    ssa_adapt.set_inference(model, "full")  # the full stream runs: the selection is made for the statistics alone
    with ssa_adapt.record_attention_sparsity(model) as stats, torch.no_grad():
        model(token_batch(1, 80))
    assert abs(stats[0].item() - long[0]) < 1e-6  # layer 0 sees the same input in both modes


def test_mixed_dtypes_under_autocast_attend_in_autocast_dtype():
    from ssa_adapt.patching.attention import ssa_attention_forward

    model = ssa_adapt.convert(tiny_model("llama", 2), SMALL)
    attn = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    v = torch.randn(1, 2, 40, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ssa_attention_forward(attn, q, k, v, None, scaling=8**-0.5)
    assert out.dtype == torch.bfloat16
    expected = ssa_attention_forward(attn, q.bfloat16(), k.bfloat16(), v, None, scaling=8**-0.5)[0]
    torch.testing.assert_close(out, expected)


def test_gate_runs_once_per_layer_in_the_autocast_dtype():
    """SSA training computes both streams: the gate (fp32 master weights) is evaluated once per layer and shared,
    in bf16 under autocast like the other linear layers, and its weights still get gradients."""
    model = ssa_adapt.convert(tiny_model("llama", 2), SSAConfig(block_size=4, block_count=4, gate=True))
    calls = []
    for layer in model.model.layers:
        layer.self_attn.ssa_gate.register_forward_hook(lambda module, args, out: calls.append(out.dtype))
    model.train()
    ids = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
        loss = ssa_adapt.ssa_loss(model, out.loss)
    loss.backward()
    assert calls == [torch.bfloat16] * model.config.num_hidden_layers
    gates = [layer.self_attn.ssa_gate.weight for layer in model.model.layers]
    assert all(w.dtype == torch.float32 and w.grad is not None and w.grad.abs().sum() > 0 for w in gates)


def test_set_kernel_options_reaches_the_ops_and_is_not_saved(monkeypatch):
    """`set_kernel_options` hands its KernelOptions to every op call of SSA attention (the sparse stream in eval,
    the selection, attention and alignment loss in SSA training), None again once cleared; it is not in the
    saved config. The ops are spied on where the layers call them (the reference backend runs underneath)."""
    pytest.importorskip("triton")
    from ssa_adapt.ops.triton.options import DecodeOptions, KernelOptions
    from ssa_adapt.patching import streams

    seen = []

    def spy(name):
        original = getattr(streams, name)
        return lambda *a, **kw: seen.append((name, kw.get("kernel_options"))) or original(*a, **kw)

    for name in ("sparse_attention", "attend_blocks", "alignment_loss"):
        monkeypatch.setattr(streams, name, spy(name))
    model = ssa_adapt.convert(tiny_model(), SMALL)
    options = KernelOptions(decode=DecodeOptions(fused_step=False))
    ssa_adapt.set_kernel_options(model, options)
    ids = token_batch(length=64)
    with torch.no_grad():
        model(ids)  # eval: the sparse stream
    _ssa_train_step(model, ids, "sparse")  # training: selection, attention, alignment
    assert {name for name, _ in seen} == {"sparse_attention", "attend_blocks", "alignment_loss"}
    assert all(got is options for _, got in seen), seen
    assert "kernel_options" not in model.config.ssa_config
    seen.clear()
    ssa_adapt.set_kernel_options(model, None)
    model.eval()
    with torch.no_grad():
        model(ids)
    assert seen and all(got is None for _, got in seen)
    with pytest.raises(TypeError, match="must be a KernelOptions or None; got dict"):
        ssa_adapt.set_kernel_options(model, {"decode": {"cached_launch": True}})
