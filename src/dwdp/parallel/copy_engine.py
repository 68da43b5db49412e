"""Asynchronous copies beside the compute, with cross-queue signals.

One interface, two implementations chosen by device:

* CUDA: a dedicated copy stream (the copy engine does the work, no SMs) and CUDA events.
* CPU: a copy thread that executes submitted copies in order, and threading events.

Both give the same guarantees: copies of one submission run after the signals it
waits for, in submission order, and ``compute_wait(signal)`` makes subsequent compute
observe the finished copies. ``mark()`` timestamps the compute queue.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

class TransportTimeout(RuntimeError):
    """A copy or a wait did not finish within the configured time."""


Copy = tuple[torch.Tensor, torch.Tensor]  # (dst, src)


def slice_copies(copies: list[Copy], slice_bytes: int) -> list[Copy]:
    """Cut each (dst, src) copy along its first dimension into pieces of at most
    ``slice_bytes`` (at least one row), interleaved across copies so peers alternate."""
    pieces = []
    for dst, src in copies:
        rows = max(1, slice_bytes // max(1, src[0].numel() * src.element_size())) if len(src) else 1
        pieces.append([(dst[i:i + rows], src[i:i + rows]) for i in range(0, len(src), rows)])
    out = []
    for i in range(max((len(p) for p in pieces), default=0)):
        out += [p[i] for p in pieces if i < len(p)]
    return out


class CopyEngine:
    """Abstract interface; see the module docstring."""

    def submit(self, copies: list[Copy], wait_for=None, nbytes: int = 0):
        raise NotImplementedError

    def mark(self):
        """A timestamp of the compute queue at this point (read after the step)."""
        raise NotImplementedError

    def seconds_between(self, a, b) -> float:
        raise NotImplementedError

    def compute_signal(self):
        """A signal that fires once the compute issued so far has finished."""
        raise NotImplementedError

    def compute_wait(self, signal) -> float:
        """Make later compute wait for ``signal``; returns seconds spent waiting on the
        host (CPU) or 0 (CUDA: the wait is measured on the device, see ``wait_timers``)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- CPU
@dataclass
class _CpuSignal:
    event: threading.Event = field(default_factory=threading.Event)
    start: float = 0.0
    end: float = 0.0
    nbytes: int = 0
    error: BaseException | None = None


class CpuCopyEngine(CopyEngine):
    def __init__(self, timeout_s: float = 60.0, copy_delay: Callable[[], float] | None = None):
        self.timeout_s = timeout_s
        self.copy_delay = copy_delay  # tests: a random sleep before each copy
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="dwdp-copy", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            copies, wait_for, sig = item
            try:
                if wait_for is not None and not wait_for.event.wait(self.timeout_s):
                    raise TransportTimeout(f"copy waited over {self.timeout_s:.0f} s for its slot to be released")
                sig.start = time.perf_counter()
                for dst, src in copies:
                    if self.copy_delay is not None:
                        time.sleep(self.copy_delay())
                    dst.copy_(src)
                sig.end = time.perf_counter()
            except BaseException as e:  # surfaced to whoever waits on this signal
                sig.error = e
            sig.event.set()

    def submit(self, copies, wait_for=None, nbytes: int = 0):
        sig = _CpuSignal(nbytes=nbytes)
        self._q.put((copies, wait_for, sig))
        return sig

    def mark(self) -> float:
        return time.perf_counter()  # CPU compute is synchronous: now is where it stands

    def seconds_between(self, a: float, b: float) -> float:
        return b - a

    def compute_signal(self):
        sig = _CpuSignal()
        sig.event.set()  # CPU compute is synchronous: everything issued so far is done
        return sig

    def compute_wait(self, signal) -> float:
        t0 = time.perf_counter()
        if not signal.event.wait(self.timeout_s):
            raise TransportTimeout(
                f"a peer pull did not finish within {self.timeout_s:.0f} s (is a peer's memory unreachable?)"
            )
        if signal.error is not None:
            raise RuntimeError(f"a peer pull failed: {signal.error}") from signal.error
        return time.perf_counter() - t0

    @staticmethod
    def copy_seconds(signal) -> float:
        return signal.end - signal.start

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------- CUDA
@dataclass
class _CudaSignal:
    done: "torch.cuda.Event"
    start: "torch.cuda.Event | None" = None
    nbytes: int = 0


class CudaCopyEngine(CopyEngine):
    """Copies on ``num_streams`` side streams. One stream runs a submission's copies back to
    back; with several, copy i goes to stream i % num_streams (the copy plan interleaves
    peers, so each stream then serves one peer) and the submission is done when all are."""

    def __init__(self, device: torch.device, timing: bool = True, delay_cycles: int = 0, num_streams: int = 1):
        if num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {num_streams}")
        self.device = device
        self.delay_cycles = delay_cycles  # tests: a device-side sleep before each submission's copies
        # Copies are DMA work on the copy engines; stream priority matters little.
        self.streams = [torch.cuda.Stream(device=device) for _ in range(num_streams)]
        self.stream = self.streams[0]
        self.timing = timing
        self.wait_timers: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def submit(self, copies, wait_for=None, nbytes: int = 0):
        main = self.stream
        with torch.cuda.stream(main):
            if wait_for is not None:
                main.wait_event(wait_for.done)
            start = torch.cuda.Event(enable_timing=True) if self.timing else None
            if start is not None:
                start.record(main)
            if self.delay_cycles:
                torch.cuda._sleep(self.delay_cycles)
            if len(self.streams) == 1:
                for dst, src in copies:
                    dst.copy_(src, non_blocking=True)
            else:
                fork = torch.cuda.Event()
                fork.record(main)
                used = self.streams[:min(len(self.streams), len(copies))]
                for i, s in enumerate(used):
                    s.wait_event(fork)
                    with torch.cuda.stream(s):
                        for dst, src in copies[i::len(used)]:
                            dst.copy_(src, non_blocking=True)
                for s in used[1:]:
                    joined = torch.cuda.Event()
                    joined.record(s)
                    main.wait_event(joined)
            done = torch.cuda.Event(enable_timing=self.timing)
            done.record(main)
        return _CudaSignal(done, start, nbytes)

    def compute_signal(self):
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return _CudaSignal(ev)

    def mark(self) -> "torch.cuda.Event":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def seconds_between(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3

    def compute_wait(self, signal) -> float:
        cur = torch.cuda.current_stream(self.device)
        if self.timing:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(cur)
            cur.wait_event(signal.done)
            b.record(cur)
            self.wait_timers.append((a, b))
        else:
            cur.wait_event(signal.done)
        return 0.0

    @staticmethod
    def copy_seconds(signal) -> float:
        if signal.start is None:
            return float("nan")
        return signal.start.elapsed_time(signal.done) / 1e3

    def drain_waits(self) -> list[float]:
        """Device seconds the compute stream stalled at each ``compute_wait`` since the last
        drain, in call order (syncs)."""
        if not self.wait_timers:
            return []
        self.wait_timers[-1][1].synchronize()
        waits = [a.elapsed_time(b) / 1e3 for a, b in self.wait_timers]
        self.wait_timers.clear()
        return waits

    def drain_wait_seconds(self) -> float:
        """Device time the compute stream stalled on pulls since the last drain (syncs)."""
        return sum(self.drain_waits())
