"""`static_generate`: a static KV cache and CUDA-graph decode steps (ssa_adapt/decoding/static.py).

CPU (CI): the static cache's eager path (PyTorch reference) against `generate()`, token for token; the kernels'
device-side positions (decode_attend's q_pos, the block-mean update's key_len) interpreted in subprocesses
(`python tests/test_static_decoding.py OUT.json CASE_ID...`, see tests/interpreted.py). GPU (`-m gpu`): CUDA-graph
replay against the same steps run eagerly, and against `generate()`.
"""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import tiny_model, token_batch

import ssa_adapt
from ssa_adapt import SSAConfig

CONFIG = SSAConfig(block_size=4, block_count=4)


def left_padded(lengths, width, seed=3, vocab=97, device="cpu"):
    """Prompts of the given lengths, left-padded to `width` -> (ids [B, width], mask [B, width])."""
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = token_batch(1, n, vocab=vocab, seed=seed + b)[0]
        mask[b, width - n :] = 1
    return ids.to(device), mask.to(device)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_static_generate_equals_generate_token_for_token(arch, mode):
    """Left-padded batch, greedy: the static cache (positions on the device, SDPA over the written keys in full
    mode, the cache's block means in sparse mode) decodes exactly what generate() with an SSACache decodes."""
    model = ssa_adapt.convert(tiny_model(arch, 3, layers=2), CONFIG)
    ssa_adapt.set_inference(model, mode)
    ids, mask = left_padded([45, 30, 38], 45)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    got = ssa_adapt.static_generate(model, ids, mask, max_new_tokens=24)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_sparse_and_full_static_decoding_differ_and_eos_pads_finished_rows():
    model = ssa_adapt.convert(tiny_model("llama", 3, layers=2), CONFIG)
    ids, mask = left_padded([45, 30], 45)
    ssa_adapt.set_inference(model, "full")
    full = ssa_adapt.static_generate(model, ids, mask, max_new_tokens=20)
    ssa_adapt.set_inference(model, "sparse")
    sparse = ssa_adapt.static_generate(model, ids, mask, max_new_tokens=20)
    assert not torch.equal(full, sparse), "a 4-block budget over 45+ keys must change some tokens"
    eos = int(sparse[0, 50])  # row 0's sixth new token
    first = (sparse[0, 45:] == eos).nonzero()[0].item()
    stopped = ssa_adapt.static_generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert stopped[0, 45 : 46 + first].tolist() == sparse[0, 45 : 46 + first].tolist()
    assert (stopped[0, 46 + first :] == 0).all(), "tokens after eos are padding"
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert stopped[:, : hf.shape[1]].tolist() == hf.tolist()


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = ssa_adapt.convert(tiny_model("llama", 2, layers=2), CONFIG)
    ids, mask = left_padded([33, 40], 40)
    greedy = ssa_adapt.static_generate(model, ids, mask, max_new_tokens=16)

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return ssa_adapt.static_generate(model, ids, mask, max_new_tokens=16, do_sample=True, generator=g, **kw)

    assert torch.equal(sample(5), sample(5))
    assert not torch.equal(sample(5), greedy)
    assert torch.equal(sample(7, top_k=1), greedy)


def test_static_generate_input_errors():
    model = ssa_adapt.convert(tiny_model("llama", 2, layers=2), CONFIG)
    ids, mask = left_padded([20, 12], 20)
    with pytest.raises(ValueError, match="left padding only"):
        ssa_adapt.static_generate(model, ids, mask.flip(1), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        ssa_adapt.static_generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature=0"):
        ssa_adapt.static_generate(model, ids, mask, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        ssa_adapt.static_generate(model, ids, mask, cuda_graph=True)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        ssa_adapt.static_generate(model, ids, mask)
    with pytest.raises(ValueError, match="convert it first"):
        ssa_adapt.static_generate(tiny_model("llama", 2), ids, mask)
    partial = ssa_adapt.convert(tiny_model("llama", 2, layers=2), SSAConfig(block_size=4, block_count=4, layers=[1]))
    with pytest.raises(ValueError, match=r"layers \[0\] keep ordinary"):
        ssa_adapt.static_generate(partial, ids, mask)


# ------------------------------------------------------------------------------------------------------------
# the kernels' device-side positions, interpreted on the CPU
# ------------------------------------------------------------------------------------------------------------

KERNEL_CASES = {  # (B, HQ, H, D, block size, row starts, written keys, buffer length)
    "G3-d64": (3, 9, 3, 64, 16, [0, 5, 17], 70, 96),
    "G2-d32-full-block": (2, 4, 2, 32, 16, [0, 10], 64, 80),  # row 0's newest key completes a block
}


def run_kernel_case(name: str) -> dict:
    """decode_attend with q_pos over a longer buffer, and append_block_means with a device key count, against the
    same calls on the buffer cut to the written keys (where TK says where the query is); poisoned outputs."""
    from interpreted import POISONED

    from ssa_adapt.ops.triton import decode_attend
    from ssa_adapt.ops.triton.cache_means import append_block_means

    B, HQ, H, D, BS, starts, n, L = KERNEL_CASES[name]
    g = torch.Generator().manual_seed(0)
    buf_k = torch.randn(B, H, L, D, generator=g).half()  # the cache's layout [B, H, L, D]
    buf_v = torch.randn(B, H, L, D, generator=g).half()
    buf_k[:, :, n:] = 1e3  # unwritten positions: any read of them would show
    q = torch.randn(B, 1, HQ, D, generator=g).half()
    start = torch.tensor(starts)
    nb = (n - start.max().item()) // BS  # blocks every row has complete
    idx = torch.stack([torch.randperm(nb, generator=g)[:3] for _ in range(B * H)]).view(B, 1, H, 3)
    cur = (n - 1 - start) // BS  # the query's own (partial or just completed) block
    idx = torch.cat([idx, cur.view(B, 1, 1, 1).expand(B, 1, H, 1)], -1).int()
    q_pos = (n - 1 - start)[:, None]
    cut = dict(doc_start=start[:, None], block_size=BS, options=POISONED)
    want = decode_attend(q, buf_k[:, :, :n].transpose(1, 2), buf_v[:, :, :n].transpose(1, 2), idx, **cut)
    got = decode_attend(q, buf_k.transpose(1, 2), buf_v.transpose(1, 2), idx, q_pos=q_pos, **cut)
    means_cut = torch.zeros(B, L // BS + 1, H, D)
    means_buf = means_cut.clone()
    append_block_means(means_cut, start, buf_k[:, :, :n].transpose(1, 2), BS)
    append_block_means(means_buf, start, buf_k.transpose(1, 2), BS, key_len=torch.tensor([n]))
    return {
        "attend_max_diff": (got.float() - want.float()).abs().max().item(),
        "attend_finite": bool(torch.isfinite(got).all()),
        "means_max_diff": (means_buf - means_cut).abs().max().item(),
        "blocks_written": int((means_cut.abs().sum((2, 3)) > 0).sum()),
    }


@pytest.fixture(scope="module")
def interpreted_kernels():
    pytest.importorskip("triton")
    from interpreted import run_interpreted

    return run_interpreted(__file__, list(KERNEL_CASES))


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_device_positions_equal_cut_buffers_interpreted(interpreted_kernels, name):
    r = interpreted_kernels[name]
    assert "error" not in r, r.get("error")
    assert r["attend_finite"] and r["attend_max_diff"] == 0.0
    assert r["means_max_diff"] == 0.0
    # row 0 of the second case holds 64 = 4 x 16 keys, every other row a partial block
    assert r["blocks_written"] == (1 if name == "G2-d32-full-block" else 0)


# ------------------------------------------------------------------------------------------------------------
# GPU: graph replay
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_graph_replay_equals_eager_steps_and_generate_gpu(mode):
    """16 x 16 blocks over 700-token prompts: replaying one captured step gives the same tokens as running the
    same kernels eagerly (bf16); in float32 with a budget covering every block, sparse decoding equals generate()'s
    (full mode: always)."""
    torch.manual_seed(0)
    for budget, dtype in ((16, torch.bfloat16), (64, torch.float32)):
        model = tiny_model("llama", 3, layers=3, head_dim=64, max_position_embeddings=2048).cuda().to(dtype)
        ssa_adapt.convert(model, SSAConfig(block_size=16, block_count=budget, sink_blocks=1))
        ssa_adapt.set_inference(model, mode)
        ids, mask = left_padded([700, 650, 520], 700, device="cuda")
        graphed = ssa_adapt.static_generate(model, ids, mask, max_new_tokens=40)
        eager = ssa_adapt.static_generate(model, ids, mask, max_new_tokens=40, cuda_graph=False)
        assert torch.equal(graphed, eager)
        if dtype == torch.float32:  # every block fits: no selection can differ between the two caches
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
            assert torch.equal(ref, graphed)


if __name__ == "__main__":
    from interpreted import write_interpreted

    write_interpreted(sys.argv[1], sys.argv[2:], run_kernel_case)
