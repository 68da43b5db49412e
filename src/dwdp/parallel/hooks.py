"""Fault injection and tracing for the DWDP runtime: one small object passed in.

The runtime calls a :class:`RuntimeHooks` at fixed points of a step; the default does
nothing and costs a no-op method call. Tests pass a subclass to delay copies or compute
at random (ordering under stress) or to drop one of the two prefetch waits (to show the
ordering tests catch the race); diagnostics pass :class:`TraceHooks` (host times of
slot acquires) or :class:`SkipPullsHooks` (the communication-free limit of a schedule).
None of this is reachable from the command line except the bench's labelled diagnostics.
"""

from __future__ import annotations

import time

import torch


class RuntimeHooks:
    """Default: no delays, no tracing, every wait kept."""

    # Unsafe, tests only: drop the read-after-write wait (the MoE reads a slot before its
    # copies landed) or the write-after-read wait (a refill overwrites a slot still read).
    skip_raw_wait: bool = False
    skip_war_wait: bool = False
    # Diagnostics only: issue no pulls at all. Outputs are wrong; step times are the
    # communication-free limit of the same schedule.
    skip_pulls: bool = False
    # Tests (CUDA): a device-side sleep of this many cycles before each copy submission.
    copy_delay_cycles: int = 0

    def copy_delay_s(self) -> float:
        """CPU copy thread: seconds to sleep before each copy (tests: random delays)."""
        return 0.0

    def step_begin(self) -> None:
        pass

    def step_end(self) -> None:
        pass

    def before_acquire(self, layer: int, part: int) -> None:
        """Before the MoE of ``layer`` waits for pull part ``part`` (host side)."""

    def after_acquire(self, layer: int, part: int, x: torch.Tensor) -> None:
        """After that wait, before the kernels that read the part are issued."""


NO_HOOKS = RuntimeHooks()


class TraceHooks(RuntimeHooks):
    """Host timestamps of step begin / end and of every slot acquire, for timelines."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []

    def step_begin(self) -> None:
        self.events.append(("begin", time.perf_counter()))

    def step_end(self) -> None:
        self.events.append(("end", time.perf_counter()))

    def before_acquire(self, layer: int, part: int) -> None:
        self.events.append((f"acquire{layer}.{part}", time.perf_counter()))

    def take(self) -> list[tuple[str, float]]:
        ev, self.events = self.events, []
        return ev


class SkipPullsHooks(RuntimeHooks):
    skip_pulls = True


DIAGNOSTICS = {"trace": TraceHooks, "skip-pulls": SkipPullsHooks}
"""Bench diagnostics by name (``dwdp bench --diagnostic NAME``); marked in the JSON."""
