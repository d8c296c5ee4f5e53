"""GPU time per kernel of a repeated step, through torch.profiler (shared by the attention and decode benchmarks)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def device_us(event) -> float:
    """An event's total device time in microseconds, under either name torch has used for it."""
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def kernel_times(step: Callable[[], object], reps: int) -> list[dict]:
    """Run `step` `reps` times under the profiler -> [{kernel, us_per_step, calls_per_step}], slowest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = [
        dict(kernel=e.key[:100], us_per_step=device_us(e) / reps, calls_per_step=e.count / reps)
        for e in prof.key_averages()
        if device_us(e) > 0
    ]
    return sorted(rows, key=lambda r: -r["us_per_step"])
