"""Every GPU measurement of the project in one call: the jobs run side by side, one queue per GPU, each a subprocess
pinned to its GPU, with a time limit; logs and result files go to --out; a summary of each job's last lines ends
the output.

    python benchmarks/gpu_suite.py --out $OUT --jobs tests attention decode pretrain \\
        [--stage .stage/train --model PATH --data FILE.jsonl]      # for the train / multi jobs

Jobs (first GPU first, in the order given; `multi` waits for the others and takes every GPU):
  tests      pytest -m gpu tests/ (every GPU test, or those --tests-k selects; SmolLM2's only with --model's assets
             in the cache)
  attention  benchmarks/attention.py --sweep over the five head shapes and 8k-128k
  decode     benchmarks/decode.py --sweep (per-layer rows), then --profile at 128k
  eager      benchmarks/decode_profile.py --timing-only (eager steps, sparse vs full, medians of 3 runs) at 128k x 1,
             32k x 8, 4k x 1 and 4k x 8, then decode.py's generate rows (eager, static_generate, HF's compiled static
             cache, and the unconverted model's: --baseline) on SmolLM2's architecture (--stage's config.json) at
             128k, batch 1
  profile    benchmarks/attention.py --profile: per-kernel times of the sparse stream at 8k and 32k, three shapes
  real       benchmarks/attention_real.py: SmolLM2's own q/k/v at 32k (needs the SmolLM2 asset and --tokens)
  prefill    benchmarks/prefill.py: the Llama-3.2-1B shape, converted sparse against unconverted, 32k / 128k
  pretrain   benchmarks/pretrain_throughput.py run (SSA-1B, the four modes) on --token_cache
  train      benchmarks/train_throughput.py run --stage STAGE [--model PATH] (SmolLM2, full vs ssa; --train-compile
             both adds the torch_compile=True runs)
  multi      benchmarks/multi_gpu.py --model PATH --data FILE (one GPU, DDP, FSDP2)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def job_commands(a: argparse.Namespace) -> dict[str, list[list[str]]]:
    """Job name -> its commands (run one after the other on the job's GPU)."""
    import torch
    from run_info import card_slug

    py, out = sys.executable, Path(a.out)
    card, multi = card_slug(), card_slug(max(torch.cuda.device_count(), 1))  # result files are named per card
    bench = lambda name: str(REPO / "benchmarks" / name)  # noqa: E731
    jobs = {
        "tests": [[py, "-m", "pytest", "-q", "-s", "-m", "gpu", str(REPO / "tests")]
                  + (["-k", a.tests_k] if a.tests_k else [])],
        "attention": [[py, bench("attention.py"), "--sweep", "--T", "32768", "65536", "8192", "16384", "131072",
                       "--out", str(out / f"attention-{card}.json"), "--md", str(out / f"attention-{card}.md"),
                       "--budget-s", str(a.attention_budget_s)]],
        "decode": [[py, bench("decode.py"), "--sweep", "--skip-generate", "--out", str(out / "decode-layer.json")],
                   [py, bench("decode.py"), "--profile", "--contexts", "131072", "--out",
                    str(out / "decode-profile.json")]],
        "eager": [[py, bench("decode_profile.py"), "--timing-only", "--context", str(c), "--batch", str(b), "--steps",
                   "24", "--repeats", "3"] for c, b in ((131072, 1), (32768, 8), (4096, 1), (4096, 8))]
                 + [[py, bench("decode.py"), "--skip-layer", "--model", a.stage, "--shapes", "9,3,64", "--contexts",
                     "131072", "--batch", "1", "--generate-impls", "generate", "static_generate", "hf_static", "--baseline",
                     "--new-tokens", "32", "--out", str(out / "decode-generate.json")]],
        "profile": [[py, bench("attention.py"), "--profile", "--T", "8192", "32768", "--shapes", "32,2,64", "32,8,64",
                     "9,3,64", "--out", str(out / "attention-profile.json")]],
        "real": [[py, bench("attention_real.py"), "--out", str(out / f"attention-real-{card}.json"), "--md",
                  str(out / f"attention-real-{card}.md")] + (["--tokens", a.tokens] if a.tokens else [])],
        "prefill": [[py, bench("prefill.py"), "--out", str(out / f"prefill-{card}.json"), "--md", str(out / f"prefill-{card}.md")]],
        "pretrain": [[py, bench("pretrain_throughput.py"), "run", "--token_cache", a.token_cache, "--tokenizer",
                      a.token_cache, "--out", str(out / f"pretrain-{card}.json")]],
        "train": [[py, bench("train_throughput.py"), "run", "--stage", a.stage, "--dtype", "float32", "--steps",
                   str(a.train_steps), "--torch_compile", a.train_compile, "--out", str(out / f"train-{card}.json")]
                  + (["--model", a.model] if a.model else [])],
        "multi": [[py, bench("multi_gpu.py"), "--model", str(a.model), "--data", str(a.data), "--out",
                   str(out / f"multi-gpu-{multi}.json")]],
    }  # fmt: skip
    return {name: jobs[name] for name in a.jobs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", nargs="+", default=["tests", "attention", "decode", "pretrain"])
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    p.add_argument("--budget-s", type=float, default=540, help="kill what still runs after this many seconds")
    p.add_argument("--attention-budget-s", type=float, default=300)
    p.add_argument("--token_cache", default=".stage/pt")
    p.add_argument("--stage", default=".stage/train")
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--tokens", default=None, help="token ids (.npy, uint16) of the real-activation window")
    p.add_argument("--tests-k", default=None, help="the tests job's pytest -k expression (default: every GPU test)")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument(
        "--train-compile", choices=["off", "on", "both"], default="off", help="train_throughput's --torch_compile"
    )
    a = p.parse_args()
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = a.gpus or max(torch.cuda.device_count(), 1)
    jobs = job_commands(a)
    if "multi" in jobs and not (a.model and a.data):
        raise SystemExit("the multi job needs --model and --data")
    single = [(n, c) for n, c in jobs.items() if n != "multi"]
    queues: list[list] = [[] for _ in range(gpus)]
    for i, job in enumerate(single):
        queues[i % gpus].append(job)
    started = time.monotonic()
    deadline = started + a.budget_s

    def run(queue, gpu):
        """Run the queue's commands in order on `gpu` (None: all GPUs) until the deadline -> [(name, rc, log)]."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        done = []
        for name, commands in queue:
            for i, cmd in enumerate(commands):
                log = out / f"{name}{'-' + str(i) if i else ''}.log"
                left = deadline - time.monotonic()
                if left < 10:
                    done.append((name, "not started (budget)", log))
                    continue
                with log.open("w") as f:
                    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
                    try:
                        rc = proc.wait(timeout=left)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        rc = "killed at the budget"
                done.append((name, rc, log))
        return done

    import threading

    results: list = []
    threads = [threading.Thread(target=lambda q=q, g=g: results.extend(run(q, g))) for g, q in enumerate(queues) if q]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if "multi" in jobs:
        results.extend(run([("multi", jobs["multi"])], None))
    print(f"\n==== gpu_suite: {gpus} GPU(s), {time.monotonic() - started:.0f} s")
    for name, rc, log in results:
        tail = log.read_text(errors="replace").splitlines()[-12:] if log.is_file() else []
        print(f"\n---- {name}: rc {rc} ({log.name})")
        print("\n".join(tail))


if __name__ == "__main__":
    main()
