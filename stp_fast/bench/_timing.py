"""Timing used by every stp_fast benchmark: quantiles of repeated runs.

CPU: a warm-up, then repeated calls until ``min_time`` seconds and ``min_reps`` runs have passed,
with the thread count fixed by the caller; CUDA: ``triton.testing.do_bench`` (flushes L2, warms up),
falling back to CUDA events when Triton is missing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def quantiles(times_ms: list[float]) -> dict[str, float]:
    """p50 / p20 / p80 of run times in milliseconds."""
    qs = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return {"p50": statistics.median(times_ms), "p20": qs[1], "p80": qs[7]}


def measure(fn: Callable[[], object], device: str = "cpu", *, min_time: float = 0.3, min_reps: int = 5) -> dict:
    """Run ``fn`` repeatedly; return its p50/p20/p80 wall time in milliseconds."""
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench

            p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=int(min_time * 1000))
            return {"p50": p50, "p20": p20, "p80": p80}
        except ImportError:
            pass
    for _ in range(2):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    return quantiles(times)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
