"""`recipes/continue_pt.py` on one GPU and on several (DDP, FSDP2 through accelerate): same data, same global
batch, same steps; the loss curves side by side and the throughput scaling.

    python benchmarks/multi_gpu.py --model PATH --data FILE.jsonl   # -> benchmarks/results/multi-gpu-<N>x<card>.json

Each run is `accelerate launch --config_file recipes/accelerate/{single_gpu,multi_gpu,fsdp2}.yaml` of the recipe
with `--config` (default: the SmolLM2-135M 8k SSA config) for `--steps` optimizer steps; the global batch stays
`--global_batch` sequences (per-device batch 4, accumulation = global / (4 x GPUs)). The single-GPU run and the
multi-GPU runs see the same sequences in each optimizer step, but the SSA stream is drawn per micro-batch, so their
losses agree only up to that draw. Throughput = trained tokens / the trainer's `train_runtime` (the loop, first
steps' compilation included), read with the losses from the final checkpoint's `trainer_state.json`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = {"single": ("single_gpu.yaml", 1), "ddp": ("multi_gpu.yaml", None), "fsdp2": ("fsdp2.yaml", None)}


def launch(kind: str, gpus: int, a: argparse.Namespace, out: Path) -> dict:
    config_file, fixed = LAUNCH[kind]
    n = fixed or gpus
    accum = a.global_batch // (4 * n)
    cmd = [
        "accelerate", "launch", "--config_file", str(REPO / "recipes/accelerate" / config_file),
        "--num_processes", str(n), str(REPO / "recipes/continue_pt.py"), "--config", a.config,
        "--model_name_or_path", a.model, "--dataset_name", a.data, "--max_steps", str(a.steps),
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", str(accum),
        "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", str(a.steps), "--logging_steps", "1",
        "--attn_sparsity_steps", "0", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    print(f"== {kind} on {n} GPU(s): {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    env = dict(os.environ)
    if n == 1:  # one process with several visible GPUs would make the Trainer wrap the model in nn.DataParallel
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout_s, env=env)
    wall = time.perf_counter() - started
    row = {"kind": kind, "gpus": n, "accumulation": accum, "wall_s": wall, "returncode": proc.returncode}
    state = out / f"checkpoint-{a.steps}" / "trainer_state.json"
    if proc.returncode != 0 or not state.is_file():
        row["error"] = (proc.stderr or proc.stdout)[-3000:]
        print(row["error"], flush=True)
        return row
    history = json.loads(state.read_text())["log_history"]
    row["losses"] = [
        {k: h[k] for k in ("step", "loss", "lm_loss", "align_loss", "full_stream_fraction") if k in h}
        for h in history
        if "loss" in h
    ]
    # the trainer prints its final metrics after the last checkpoint was written
    found = re.findall(r"'train_runtime': '?([0-9.]+)", proc.stdout + proc.stderr)
    row["train_runtime_s"] = float(found[-1]) if found else wall
    row["tokens_per_s"] = a.steps * a.global_batch * a.seq / row["train_runtime_s"]
    return row


def _identity(data: str) -> dict:
    """{path, bytes, sha256} of a local data file (a hub name: just the name), so that a one-GPU run made apart
    from the multi-GPU ones can be checked to have trained on the same text."""
    path = Path(data)
    if not path.is_file():
        return {"name": data}
    return {"path": data, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder or Hub id")
    p.add_argument("--data", required=True, help="dataset for --dataset_name (a local .jsonl works offline)")
    p.add_argument("--config", default=str(REPO / "recipes/configs/smollm2-135m.yaml"))
    p.add_argument("--kinds", nargs="+", default=["single", "ddp", "fsdp2"], choices=sorted(LAUNCH))
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global_batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--seq", type=int, default=8192, help="the config's max_length (for tokens/s)")
    p.add_argument("--timeout_s", type=int, default=600)
    p.add_argument("--out", default=None, help="default: benchmarks/results/multi-gpu-<card>.json")
    a = p.parse_args()
    import torch
    from run_info import result_path

    a.out = result_path("multi-gpu", a.out, gpus=max(torch.cuda.device_count(), 1))

    result = {
        "benchmark": "continue_pt.py on 1 GPU vs DDP vs FSDP2 (accelerate)",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
        if torch.cuda.is_available()
        else "cpu",
        "setup": f"{a.config}, {a.global_batch} x {a.seq} tokens per optimizer step, {a.steps} steps",
        "data": _identity(a.data),  # runs of separate invocations compare only on the same file
        "runs": [],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.kinds:
            result["runs"].append(launch(kind, a.gpus, a, Path(tmp) / kind))
            out.write_text(json.dumps(result, indent=1))
    single = next((r for r in result["runs"] if r["kind"] == "single" and "tokens_per_s" in r), None)
    print(f"\n{result['device']}, {result['date']}, {result['setup']}")
    for r in result["runs"]:
        if "tokens_per_s" not in r:
            print(f"{r['kind']:<7} failed (rc {r['returncode']})")
            continue
        if single:
            r["scaling_vs_single"] = r["tokens_per_s"] / single["tokens_per_s"]
            ref = {x["step"]: x["loss"] for x in single["losses"]}
            diffs = [abs(x["loss"] - ref[x["step"]]) for x in r["losses"] if x["step"] in ref]
            r["max_abs_loss_diff_vs_single"] = max(diffs) if diffs else None
        ls = [x["loss"] for x in r["losses"]]
        print(
            f"{r['kind']:<7} {r['gpus']} GPU  {r['tokens_per_s']:>9.0f} tok/s  x{r.get('scaling_vs_single', 1.0):.2f}  "
            f"loss {ls[0]:.3f} -> {ls[-1]:.3f}  max |diff| vs single {r.get('max_abs_loss_diff_vs_single')}"
        )
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
