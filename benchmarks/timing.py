"""The one timing harness of the benchmarks (run.py, gpu_check.py, gpu_check_calm.py).

`time_step(step, device, repeats)`: warm-up runs (kernel compilation stays out), on CUDA
the peak memory of one run above what was allocated before, then `repeats` timed runs
(CUDA events on a GPU, the host clock on CPU): median and 20% / 80% quantiles in ms.
"""
from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """{"ms", "ms_p20", "ms_p80", "peak_mb"} of `step()`; peak_mb is None off CUDA."""
    for _ in range(warmup):
        step()
    sync(device)
    peak_mb = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3], "peak_mb": peak_mb}
