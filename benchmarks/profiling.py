"""GPU time per kernel of a repeated step, through torch.profiler (shared by the attention, decode and pretraining
benchmarks)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def device_us(event) -> float:
    """An event's total device time in microseconds, under either name torch has used for it."""
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def event_rows(prof, reps: int) -> list[dict]:
    """A finished profile of `reps` steps -> [{kernel, us_per_step, calls_per_step}], slowest first: device time,
    or CPU time on a machine without a GPU (so the table still says something there)."""
    time_us = device_us if torch.cuda.is_available() else (lambda e: e.self_cpu_time_total)
    rows = [
        dict(kernel=e.key[:120], us_per_step=time_us(e) / reps, calls_per_step=e.count / reps)
        for e in prof.key_averages()
        if time_us(e) > 0
    ]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def kernel_times(step: Callable[[], object], reps: int) -> list[dict]:
    """Run `step` `reps` times under the profiler -> event_rows."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    return event_rows(prof, reps)
