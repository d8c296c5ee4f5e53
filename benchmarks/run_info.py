"""What a benchmark run records about itself (shared by attention.py, attention_real.py and prefill.py)."""

from __future__ import annotations

import argparse
import datetime
import sys

from ssa_adapt.provenance import git_commit  # noqa: F401  (the benchmarks import it from here)


def markdown_header(title: str, result: dict) -> str:
    """The top of a benchmark's markdown: the title, then the card, date, commit and command of `result` (its
    "device", "date", "commit" and "command" entries)."""
    return (
        f"# {title}\n\n{result['device']}, {result['date']}, commit {result.get('commit', 'not recorded')}.\n\n"
        f"Command: `{result['command']}`\n"
    )


def card_slug(gpus: int = 1) -> str:
    """The card a result file is named after: "h100", "h200", ... from CUDA device 0's name ("2xh200" for a run
    over two GPUs); "cpu" without CUDA."""
    import re

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    model = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    slug = (model.group(1) if model else name.split()[-1]).lower()
    return f"{gpus}x{slug}" if gpus > 1 else slug


def result_path(name: str, given: str | None = None, suffix: str = ".json", gpus: int = 1) -> str:
    """`given` (the --out / --md argument), else benchmarks/results/<name>-<card><suffix>: one file per benchmark
    and card, overwritten by the next run of its command there."""
    return given or f"benchmarks/results/{name}-{card_slug(gpus)}{suffix}"


def head_shape(text: str) -> tuple[int, int, int]:
    """ "HQ,H,D" -> (query heads, KV heads, head dim), the --shapes argument type."""
    try:
        HQ, H, D = (int(x) for x in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write query heads, KV heads, head dim as HQ,H,D (e.g. 9,3,64)"
        ) from err
    return HQ, H, D


def run_record(benchmark: str, commit: str | None = None, **extra) -> dict:
    """The head of a benchmark's JSON: its name, the command that ran it, the UTC date, the commit measured
    (`git_commit(commit)`), then `extra` (device, versions, settings) and whatever the benchmark adds."""
    return dict(
        benchmark=benchmark,
        command="python " + " ".join(sys.argv),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=git_commit(commit),
        **extra,
    )
