"""The NSA baseline mode: each branch against a direct per-query computation, and the gated sum in a model."""

import torch
from tiny_models import tiny_model, token_batch

import ssa_adapt
from ssa_adapt import SSAConfig
from ssa_adapt.ops import compressed_attention, full_attention, sparse_attention
from ssa_adapt.patching.attention import ssa_attention_forward


def _qkv(T=37, HQ=6, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, T, HQ, D, generator=g, dtype=torch.float64),
        torch.randn(1, T, H, D, generator=g, dtype=torch.float64),
        torch.randn(1, T, H, D, generator=g, dtype=torch.float64),
    )


def test_compressed_branch_equals_direct_computation():
    q, k, v = _qkv()
    BS, G = 4, 3
    out = compressed_attention(q, k, v, block_size=BS)
    scale = 8**-0.5
    for t in range(q.shape[1]):
        n = (t + 1) // BS  # complete blocks
        for h in range(6):
            if n == 0:
                assert torch.all(out[0, t, h] == 0)
                continue
            kv = h // G
            kbar = torch.stack([k[0, j * BS : (j + 1) * BS, kv].mean(0) for j in range(n)])
            vbar = torch.stack([v[0, j * BS : (j + 1) * BS, kv].mean(0) for j in range(n)])
            p = torch.softmax(kbar @ q[0, t, h] * scale, 0)
            torch.testing.assert_close(out[0, t, h], p @ vbar)


def test_window_branch_equals_direct_computation():
    q, k, v = _qkv()
    W, G = 5, 3
    out = full_attention(q, k, v, sliding_window=W, doc_start=torch.zeros(1, 37, dtype=torch.long))
    out_ref = full_attention(q, k, v, sliding_window=W, backend="reference")
    torch.testing.assert_close(out, out_ref)
    for t in range(37):
        for h in range(6):
            lo = max(0, t - W + 1)
            keys, vals = k[0, lo : t + 1, h // G], v[0, lo : t + 1, h // G]
            p = torch.softmax(keys @ q[0, t, h] * 8**-0.5, 0)
            torch.testing.assert_close(out[0, t, h], p @ vals)


def test_nsa_layer_is_gated_sum_of_three_branches():
    model = ssa_adapt.convert(
        tiny_model("llama", 3), SSAConfig(block_size=4, block_count=4, train_mode="nsa", nsa_window=8)
    )
    attn = model.model.layers[0].self_attn
    assert attn.ssa_gate.out_features == 3 * 6
    torch.nn.init.normal_(attn.ssa_gate.weight, std=0.5)
    hidden = torch.randn(1, 40, 48)
    q, k, v = (torch.randn(1, h, 40, 8) for h in (6, 2, 2))
    attn.train()
    out, _ = ssa_attention_forward(attn, q, k, v, None, scaling=8**-0.5, ssa_hidden=hidden)
    gamma = torch.sigmoid(attn.ssa_gate(hidden)).view(1, 40, 3, 6, 1)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    expected = (
        gamma[:, :, 0] * compressed_attention(qt, kt, vt, block_size=4)
        + gamma[:, :, 1] * sparse_attention(qt, kt, vt, block_size=4, block_count=4, sink_blocks=1)
        + gamma[:, :, 2] * full_attention(qt, kt, vt, sliding_window=8, backend="reference")
    )
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_nsa_mode_trains():
    model = ssa_adapt.convert(tiny_model("qwen3", 2), SSAConfig(block_size=4, block_count=4, train_mode="nsa"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = token_batch(2, 48)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        assert ssa_adapt.alignment_loss(model) is None  # NSA has no alignment term
        loss.backward()
        assert model.model.layers[0].self_attn.ssa_gate.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
