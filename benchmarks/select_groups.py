"""Selection alone at one length for many group sizes, with pass 1's unmasked interior chunks on, off and "auto"
(`SelectOptions.interior`).

    python benchmarks/select_groups.py      # -> benchmarks/results/select-groups-<card>.{json,md}

`ssa_adapt.ops.triton.select.select_blocks` (16 x 16 blocks, one sink, one local block) on bf16 random normal q / k,
B = 1, milliseconds as the median of triton.testing.do_bench; `equal` says whether interior on and off chose the
same blocks bit for bit. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_info import git_commit, markdown_header, result_path  # noqa: E402  (benchmarks/ is on the path of its scripts)

from ssa_adapt.ops.triton import select  # noqa: E402
from ssa_adapt.ops.triton.options import KernelOptions, SelectOptions  # noqa: E402

SHAPES = [(32, 32, 64), (32, 16, 64), (32, 8, 64), (9, 3, 64), (14, 2, 64), (32, 4, 64), (32, 2, 64), (16, 8, 128)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--out", default=None, help="default: benchmarks/results/select-groups-<card>.json")
    p.add_argument("--md", default=None, help="default: benchmarks/results/select-groups-<card>.md")
    p.add_argument("--commit", default=None, help="The commit measured (a copy of the tree without .git).")
    a = p.parse_args()
    a.out, a.md = result_path("select-groups", a.out), result_path("select-groups", a.md, ".md")
    if not torch.cuda.is_available():
        sys.exit("select_groups.py needs a CUDA device (the kernels run compiled).")
    result = {
        "benchmark": f"selection alone at T={a.T}, SelectOptions.interior True / False / 'auto'",
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(a.commit),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "rows": [],
    }
    for HQ, H, D in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, a.T, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, a.T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        row, chosen = {"HQ": HQ, "H": H, "D": D, "G": HQ // H}, {}
        for mode in (True, False, "auto"):
            options = KernelOptions(select=SelectOptions(interior=mode))

            def run(q=q, k=k, options=options):
                return select.select_blocks(
                    q, k, block_size=16, block_count=16, sink_blocks=1, local_blocks=1, options=options
                )

            chosen[mode] = run()
            row[str(mode)] = triton.testing.do_bench(run, warmup=50, rep=300)
        row["equal"] = bool(torch.equal(chosen[True], chosen[False]))
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(a.md).write_text(markdown(result))


def markdown(result: dict) -> str:
    """The report: one row per shape, milliseconds with interior chunks on / off / auto, and whether on and off
    selected the same blocks."""
    rows = [f"| ({r['HQ']}, {r['H']}, {r['D']}) | {r['G']} | {r['True']:.2f} | {r['False']:.2f} | {r['auto']:.2f} | "
            f"{'yes' if r['equal'] else 'no'} |" for r in result["rows"]]  # fmt: skip
    table = ["| (HQ, H, D) | G | interior on | off | auto | equal |", "|---|---|---|---|---|---|", *rows]
    head = markdown_header("Selection alone: unmasked interior chunks on / off, by group size", result)
    notes = "".join(f"\n{result[k]}\n" for k in ("finding", "note") if result.get(k))
    return head + f"\n{result['benchmark']}; ms, median of do_bench.\n\n" + "\n".join(table) + "\n" + notes


if __name__ == "__main__":
    main()
