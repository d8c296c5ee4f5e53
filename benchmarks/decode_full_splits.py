"""Full attention for `static_generate`'s full mode: one decode step of one layer, replayed from a CUDA graph.

SDPA over exactly TK keys (what eager decoding runs, GQA through enable_gqa) against `decode_attend` over every
block of a static buffer of TK + 32 keys (the query position read on the device, as the static cache runs it),
with its default split count and with 16 / 64 / 256 blocks per split. bf16, shapes (9, 3, 64) and (32, 8, 64),
TK 8k / 32k / 128k, batch 1 and 8; ms (median of do_bench) and each variant's relative RMS error against SDPA.

    python benchmarks/decode_full_splits.py      # -> benchmarks/results/decode-full-splits-<card>.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import graphed  # noqa: E402
from run_info import git_commit, markdown_header, result_path  # noqa: E402

from ssa_adapt import ops  # noqa: E402
from ssa_adapt.ops.triton import decode_attend  # noqa: E402
from ssa_adapt.ops.triton.options import DEFAULT_OPTIONS  # noqa: E402


def bench(HQ: int, H: int, D: int, TK: int, B: int) -> dict:
    L = TK + 32
    k = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)  # the cache's layout [B, H, L, D]
    v = torch.randn_like(k)
    q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
    start = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    q_pos = torch.full((B, 1), TK - 1, device="cuda")
    n = L // 16 + 1
    every = torch.arange(n, dtype=torch.int32, device="cuda").expand(B, 1, H, n).contiguous()
    k_exact, v_exact = k[:, :, :TK].transpose(1, 2), v[:, :, :TK].transpose(1, 2)
    row = dict(HQ=HQ, H=H, D=D, TK=TK, B=B)
    ref = ops.full_attention(q, k_exact, v_exact).float()
    sdpa = graphed(lambda: ops.full_attention(q, k_exact, v_exact))
    row["sdpa"] = triton.testing.do_bench(sdpa, return_mode="median")
    for name, splits in [("default", None), ("s16", -(-n // 16)), ("s64", -(-n // 64)), ("s256", -(-n // 256))]:

        def step(splits=splits):
            kt, vt = k.transpose(1, 2), v.transpose(1, 2)
            return decode_attend(q, kt, vt, every, doc_start=start, q_pos=q_pos, num_splits=splits)

        out = step().float()
        row[name] = triton.testing.do_bench(graphed(step), return_mode="median")
        row[name + "_err"] = ((out - ref).norm() / ref.norm()).item()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="default: benchmarks/results/decode-full-splits-<card>.json")
    p.add_argument("--md", default=None, help="default: benchmarks/results/decode-full-splits-<card>.md")
    p.add_argument("--commit", default=None, help="The commit measured (a copy of the tree without .git).")
    args = p.parse_args()
    args.out = result_path("decode-full-splits", args.out)
    args.md = result_path("decode-full-splits", args.md, ".md")
    result = {
        "benchmark": __doc__.split("\n\n")[1].replace("\n", " "),
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(args.commit),
        "decode_options": dataclasses.asdict(DEFAULT_OPTIONS.decode),  # decode_attend's (the defaults)
        "rows": [],
    }
    for HQ, H, D in [(9, 3, 64), (32, 8, 64)]:
        for TK in [8192, 32768, 131072]:
            for B in [1, 8]:
                result["rows"].append(bench(HQ, H, D, TK, B))
                print(
                    json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in result["rows"][-1].items()})
                )
                Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.md).write_text(markdown(result))


def markdown(result: dict) -> str:
    """The report: SDPA and every decode_attend variant in microseconds, one row per (shape, TK, batch)."""
    keys = [k for k in result["rows"][0] if k not in ("HQ", "H", "D", "TK", "B", "sdpa") and not k.endswith("_err")]
    table = ["| (HQ, H, D) | TK | batch | SDPA | " + " | ".join(f"decode_attend {k}" for k in keys) + " |"]
    table.append("|" + "---|" * (4 + len(keys)))
    for r in result["rows"]:
        cells = [f"({r['HQ']}, {r['H']}, {r['D']})", str(r["TK"]), str(r["B"])] + [
            f"{r[k] * 1000:.1f}" for k in ["sdpa", *keys]
        ]
        table.append("| " + " | ".join(cells) + " |")
    worst = max(v for r in result["rows"] for k, v in r.items() if k.endswith("_err"))
    head = markdown_header("Full-mode decode step over a static buffer: SDPA against the split-KV kernel", result)
    text = (
        f"\n{result['benchmark']}\n\nMicroseconds; the kernel's relative RMS against SDPA is at most {worst:.1e}.\n\n"
    )
    return head + text + "\n".join(table) + "\n"


if __name__ == "__main__":
    main()
