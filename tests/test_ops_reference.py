"""The PyTorch reference of SSA attention against the paper's definitions, by construction and by hand-checked cases."""

import pytest
import torch

from ssa_adapt.ops import (
    alignment_loss,
    attend_blocks,
    attention_sparsity,
    doc_start_from_cu_seqlens,
    doc_start_from_position_ids,
    full_attention,
    select_blocks,
    sparse_attention,
)
from ssa_adapt.ops import reference as R


def _qkv(B, T, HQ, H, D, TK=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    TK = TK or T
    q = torch.randn(B, T, HQ, D, generator=g, dtype=dtype)
    k = torch.randn(B, TK, H, D, generator=g, dtype=dtype)
    v = torch.randn(B, TK, H, D, generator=g, dtype=dtype)
    return q, k, v


def _sparse(q, k, v, **kw):
    cfg = dict(block_size=4, block_count=4, sink_blocks=1, local_blocks=1)
    cfg.update(kw)
    return sparse_attention(q, k, v, backend="reference", **cfg)


@pytest.mark.parametrize("G", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("T,TK", [(37, 37), (5, 41), (48, 48)])
def test_sparse_equals_full_within_budget(G, T, TK):
    q, k, v = _qkv(2, T, 2 * G, 2, 8, TK=TK)
    block_size, block_count = 4, 12  # budget 48 tokens >= TK
    sparse = _sparse(q, k, v, block_size=block_size, block_count=block_count)
    full = R.full_attention(q, k, v)
    torch.testing.assert_close(sparse, full, atol=1e-6, rtol=1e-5)


def test_sparse_differs_from_full_beyond_budget():
    q, k, v = _qkv(1, 64, 4, 2, 8)
    sparse = _sparse(q, k, v)
    full = R.full_attention(q, k, v)
    assert torch.allclose(sparse[:, :16], full[:, :16], atol=1e-6)  # first 16 tokens fit 4 blocks of 4
    assert (sparse[:, 40:] - full[:, 40:]).abs().max() > 1e-2


def _one_hot_blocks(T, hot_block, block_size=4, D=4):
    """Keys zero except block `hot_block`, whose keys point along the query: that block has the top importance."""
    q = torch.zeros(1, T, 1, D)
    q[..., 0] = 5.0
    k = torch.zeros(1, T, 1, D)
    k[:, hot_block * block_size : (hot_block + 1) * block_size, :, 0] = 1.0
    return q, k


def test_selection_sink_local_and_top_block():
    q, k = _one_hot_blocks(40, hot_block=5)
    idx = select_blocks(q, k, block_size=4, block_count=3, sink_blocks=1, local_blocks=1, backend="reference")
    assert idx[0, 39, 0].tolist() == [0, 5, 9]  # sink, best scored, own (complete) block
    assert idx[0, 38, 0].tolist() == [0, 5, 9]  # own block 9 is partial for t=38 but always selected
    # t=22: block 5 is its own (partial) block; the complete blocks 1..4 tie at zero and the lowest wins
    assert idx[0, 22, 0].tolist() == [0, 1, 5]


def test_selection_ties_prefer_lower_index_and_local_blocks():
    q = torch.zeros(1, 40, 1, 4)
    k = torch.zeros(1, 40, 1, 4)  # every block mean is zero: all importances tie
    idx = select_blocks(q, k, block_size=4, block_count=4, sink_blocks=1, local_blocks=1, backend="reference")
    assert idx[0, 39, 0].tolist() == [0, 1, 2, 9]
    idx = select_blocks(q, k, block_size=4, block_count=4, sink_blocks=0, local_blocks=2, backend="reference")
    assert idx[0, 39, 0].tolist() == [0, 1, 8, 9]
    assert idx[0, 37, 0].tolist() == [0, 1, 8, 9]


def test_selection_fewer_candidates_than_budget():
    q, k = _one_hot_blocks(40, hot_block=1)
    idx = select_blocks(q, k, block_size=4, block_count=8, sink_blocks=1, local_blocks=1, backend="reference")
    assert idx[0, 10, 0].tolist() == [0, 1, 2, -1, -1, -1, -1, -1]  # blocks 0, 1 complete; 2 is its own
    assert idx[0, 2, 0].tolist() == [0, -1, -1, -1, -1, -1, -1, -1]  # t=2: only its own block (also the sink)


def test_selection_shared_by_group_uses_summed_importance():
    # head 0 of the group prefers block 2 strongly, head 1 prefers block 5 weakly: the sum picks block 2
    D = 4
    q = torch.zeros(1, 40, 2, D)
    q[..., 0, 0] = 8.0
    q[..., 1, 1] = 1.0
    k = torch.zeros(1, 40, 1, D)
    k[:, 8:12, 0, 0] = 1.0
    k[:, 20:24, 0, 1] = 1.0
    idx = select_blocks(q, k, block_size=4, block_count=3, sink_blocks=1, local_blocks=1, backend="reference")
    assert idx[0, 39, 0].tolist() == [0, 2, 9]


@pytest.mark.parametrize("stream", ["sparse", "full"])
def test_causality(stream):
    q, k, v = _qkv(1, 50, 6, 2, 8)
    fn = _sparse if stream == "sparse" else R.full_attention
    base = fn(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, 30:] += 3.0
    k2[:, 30:] -= 2.0
    v2[:, 30:] *= -1.0
    moved = fn(q2, k2, v2)
    torch.testing.assert_close(moved[:, :30], base[:, :30], atol=0, rtol=0)
    assert (moved[:, 30:] - base[:, 30:]).abs().max() > 1e-3


def test_packed_sequences_equal_separate_runs():
    lengths = [23, 41, 9]
    q, k, v = _qkv(1, sum(lengths), 6, 3, 8, seed=3)
    cu = torch.tensor([0, 23, 64, 73])
    doc_start = doc_start_from_cu_seqlens(cu, sum(lengths))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    assert torch.equal(doc_start, doc_start_from_position_ids(position_ids, 1, sum(lengths), sum(lengths)))
    for fn in (_sparse, R.full_attention):
        packed = fn(q, k, v, doc_start=doc_start)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = fn(q[:, a:b], k[:, a:b], v[:, a:b])
            torch.testing.assert_close(packed[:, a:b], alone, atol=1e-6, rtol=1e-5)


def test_left_padded_batch_equals_unpadded_rows():
    lengths = [30, 19]
    T = max(lengths)
    q, k, v = _qkv(2, T, 4, 2, 8, seed=5)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    doc_start = doc_start_from_position_ids(position_ids, 2, T, T, attention_mask=mask)
    assert doc_start[1, 11:].tolist() == [11] * 19  # pad queries before it only see themselves
    for fn in (_sparse, R.full_attention):
        padded = fn(q, k, v, doc_start=doc_start)
        for b, n in enumerate(lengths):
            alone = fn(q[b : b + 1, T - n :], k[b : b + 1, T - n :], v[b : b + 1, T - n :])
            torch.testing.assert_close(padded[b : b + 1, T - n :], alone, atol=1e-6, rtol=1e-5)
    # the padding mask alone (no position_ids) gives the same starts
    assert torch.equal(doc_start_from_position_ids(None, 2, T, T, attention_mask=mask), doc_start)


def test_queries_as_tail_of_longer_keys_match_full_run():
    q, k, v = _qkv(1, 45, 4, 2, 8, seed=7)
    for fn in (_sparse, R.full_attention):
        whole = fn(q, k, v)
        tail = fn(q[:, -6:], k, v)
        torch.testing.assert_close(tail, whole[:, -6:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_theorem1_error_bound(seed):
    """||o_full - o_sparse|| <= delta * (max over unselected visible keys ||v_j|| + ||o_sparse||), per token and head."""
    q, k, v = _qkv(1, 64, 6, 2, 8, seed=seed, dtype=torch.float64)
    q = q * (1 + seed)  # sharper and flatter distributions
    o_sparse, idx = sparse_attention(
        q, k, v, block_size=4, block_count=4, sink_blocks=1, backend="reference", return_indices=True
    )
    o_full = R.full_attention(q, k, v)
    delta = 1 - attention_sparsity(q, k, idx, block_size=4)  # [B, T, HQ]
    selected = R._key_mask(torch.arange(64), 64, idx, 4, None)  # [1, T, H, L]
    causal = R._key_mask(torch.arange(64), 64, None, 4, None)
    dropped = (causal & ~selected).repeat_interleave(3, dim=2)  # per query head [1, T, HQ, L]
    vnorm = v.norm(dim=-1).repeat_interleave(3, dim=2).transpose(1, 2)[:, None]  # [1, 1, HQ, L]
    max_dropped_v = torch.where(dropped, vnorm, torch.zeros(())).amax(-1)
    lhs = (o_full - o_sparse).norm(dim=-1)
    rhs = delta * (max_dropped_v + o_sparse.norm(dim=-1))
    assert (delta > 1e-3).any()  # the bound is exercised, not trivially zero
    assert bool((lhs <= rhs + 1e-10).all())


def test_gradcheck_float64():
    q, k, v = _qkv(1, 13, 4, 2, 3, dtype=torch.float64, seed=11)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    idx = select_blocks(q, k, block_size=2, block_count=3, sink_blocks=1, backend="reference")
    assert torch.autograd.gradcheck(
        lambda a, b, c: attend_blocks(a, b, c, idx, block_size=2, backend="reference"), (q, k, v)
    )
    assert torch.autograd.gradcheck(lambda a, b, c: R.full_attention(a, b, c), (q, k, v))


def test_attention_sparsity_is_one_when_every_block_selected():
    q, k, v = _qkv(1, 30, 4, 2, 8)
    _, idx = sparse_attention(q, k, v, block_size=4, block_count=8, backend="reference", return_indices=True)
    torch.testing.assert_close(attention_sparsity(q, k, idx, block_size=4), torch.ones(1, 30, 4))


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alignment_loss_value_and_stop_gradients(kind, dtype):
    """The fused loss equals the two-term definition d(a, sg(b)) + d(sg(a), b) computed in float32 with torch's own
    losses, in value and in each input's gradient (differences both below and above SmoothL1's beta = 1)."""
    d = torch.nn.functional.smooth_l1_loss if kind == "smooth_l1" else torch.nn.functional.mse_loss
    a = (3 * torch.randn(2, 5, 3, 4)).to(dtype).requires_grad_()
    b = torch.randn(2, 5, 3, 4).to(dtype).requires_grad_()
    loss = alignment_loss(a, b, kind=kind)
    af, bf = a.float(), b.float()
    reference = d(af, bf.detach()) + d(af.detach(), bf)
    torch.testing.assert_close(loss, reference)
    ga, gb = torch.autograd.grad(loss, (a, b))
    ref_a, ref_b = torch.autograd.grad(reference, (a, b))
    assert ga.dtype == gb.dtype == dtype
    torch.testing.assert_close(ga, ref_a)
    torch.testing.assert_close(gb, ref_b)
    only_a = torch.autograd.grad(alignment_loss(a, b.detach(), kind=kind), a)[0]
    torch.testing.assert_close(only_a, ref_a)
    with pytest.raises(ValueError, match="kind='l1'"):
        alignment_loss(a, b, kind="l1")


def test_bad_inputs_name_the_problem():
    q, k, v = _qkv(1, 8, 5, 2, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        full_attention(q, k, v, backend="reference", doc_start=torch.zeros(1, 8, dtype=torch.long))
    q, k, v = _qkv(1, 8, 4, 2, 4)
    with pytest.raises(ValueError, match=r"\[B, T, HQ, D\]"):
        select_blocks(q[0], k[0])
    with pytest.raises(ValueError, match="shorter than query length"):
        select_blocks(q, k[:, :4])
    with pytest.raises(ValueError, match="doc_start must be"):
        select_blocks(q, k, doc_start=torch.zeros(2, 8, dtype=torch.long))
