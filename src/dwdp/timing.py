"""CUDA timing for benchmarks and calibration: one place, so every script times the same way.

Device time comes from CUDA events recorded on the current stream around the work; the
host is synchronised only after the closing event, so launch overhead that the GPU hides
is not counted. Medians, not means: one preempted iteration must not move a result.
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from typing import Callable, Iterator

import torch


class CudaTimer:
    """Seconds between two CUDA events on the current stream; ``seconds`` syncs on the end."""

    def __init__(self) -> None:
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    @property
    def seconds(self) -> float:
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


@contextmanager
def cuda_timer() -> Iterator[CudaTimer]:
    """``with cuda_timer() as t: work()`` then ``t.seconds``: the device time of ``work``."""
    t = CudaTimer()
    t.start.record()
    yield t
    t.end.record()


def cuda_times(fn: Callable[[], object], warmup: int = 3, iters: int = 10,
               before: Callable[[], object] | None = None) -> list[float]:
    """Device seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones.
    ``before`` runs untimed ahead of every timed call (a barrier, a cache flush)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        if before is not None:
            before()
        with cuda_timer() as t:
            fn()
        out.append(t.seconds)
    return out


def time_cuda(fn: Callable[[], object], warmup: int = 3, iters: int = 10,
              before: Callable[[], object] | None = None) -> float:
    """Median device seconds of ``fn`` (see :func:`cuda_times`; the upper one of an even count)."""
    return statistics.median_high(cuda_times(fn, warmup, iters, before))
