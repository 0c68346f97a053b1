"""CUDA timing helpers shared by the benchmarks: event-timed medians and peak memory of one call."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of ``fn`` on the current CUDA stream, timed with events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back_ms(fn: Callable[[], object], warmup: int = 3, calls: int = 10) -> float:
    """Mean time per call of ``calls`` calls in a row with no synchronisation between them, as a training loop runs:
    the host queues the next call's kernels while the card works (``median_ms`` starts every call on an idle card)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def peak_memory_gib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during one call of ``fn`` (what was allocated before included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def gemm_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """The card's measured dense GEMM rate, the ceiling the other numbers are read against."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / (median_ms(lambda: a @ b, warmup=5, reps=20) * 1e-3) / 1e12
