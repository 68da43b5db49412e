"""Just-in-time pacing of DWDP pulls, and the step size below which a pull cannot hide.

A layer's pull only has to land before that layer's MoE starts, one layer of compute
after it is issued. Pulled as fast as possible it takes HBM bandwidth from the compute
it overlaps at both ends (measured on H200: GEMMs 1.07x, HBM-bound kernels 1.13x slower
while every rank pulls); stretched over the window it has, the same bytes take less
bandwidth at any moment. :class:`PullRates` learns both rates from the rank's own steps
(no constant, no calibration file):

* the compute window of one MoE layer per token of the step: the time between two
  consecutive MoE starts on the compute stream, less the time spent waiting for pulls
  there (so a too-slow pace cannot feed back into a longer window);
* the full-rate pull bandwidth: bytes over copy-engine seconds of pulls issued unpaced;
* how far paced pulls overrun their plan (``stretch``): a slice copies slower than a whole
  block, each gap is a launch, and the gaps are clock-cycle spins that last longer when
  the GPU clocks down; the first version planned with the full rate alone and its pulls
  landed 60 ms late on 2x H200. The plan assumes one slice's full-rate time per slice and
  is scaled by the measured overrun.

:meth:`PullRates.pace` turns them into a :class:`Pace` (slices with idle gaps on the copy
queue) so a pull ends at ``margin`` of the predicted window; :meth:`PullRates.break_even_tokens`
is the step size whose window just hides a full-rate pull, what a scheduler should not
go below when it can wait a moment for more work.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MiB = 1 << 20
PACINGS = ("off", "jit")  # RankSpec.pull_pacing: as fast as possible, or just in time


@dataclass(frozen=True)
class Pace:
    """Cut a pull into slices of at most ``slice_bytes`` and idle ``gap_s`` after each."""

    slice_bytes: int
    gap_s: float


class PullRates:
    def __init__(self, margin: float = 0.8, slice_bytes: int = 64 * MiB, history: int = 16,
                 min_tokens: int = 256):
        """``margin``: a paced pull should end at this fraction of the predicted window (the
        rest absorbs prediction error). ``history``: steps remembered. Steps under
        ``min_tokens`` do not teach the window (launch-bound: their per-token time says
        nothing about a long step's)."""
        if not 0 < margin <= 1:
            raise ValueError(f"pacing margin must lie in (0, 1], got {margin}")
        self.margin, self.slice_bytes, self.min_tokens = margin, slice_bytes, min_tokens
        self._per_token: deque[float] = deque(maxlen=history)
        self._bytes_per_s: deque[float] = deque(maxlen=history)
        self._stretch: deque[float] = deque(maxlen=history)

    def observe(self, tokens: int, windows_s: list[float], pulls: list[tuple[int, float, Pace | None]]) -> None:
        """One finished step: its token count, the compute window of each MoE layer that had
        a pull in flight (waits excluded), and (bytes, seconds, pace) of each pull."""
        good = sorted(w for w in windows_s if w > 0)
        if tokens >= self.min_tokens and good:
            self._per_token.append(good[len(good) // 2] / tokens)
        unpaced = [(b, s) for b, s, p in pulls if p is None and s == s]
        nbytes, secs = sum(b for b, _ in unpaced), sum(s for _, s in unpaced)
        if nbytes and secs > 0:
            self._bytes_per_s.append(nbytes / secs)
        for b, s, p in pulls:
            planned = self.planned_s(b, p) if p is not None else None
            if planned and s == s:
                self._stretch.append(s / planned)

    @staticmethod
    def slices(nbytes: int, slice_bytes: int) -> int:
        return max(1, -(-nbytes // slice_bytes))

    def planned_s(self, nbytes: int, pace: Pace) -> float | None:
        """What a paced pull should take: its bytes at full rate, then per slice its gap and
        the slicing cost (assumed one slice's full-rate time: a slice copies slower than a
        whole block, and each gap is a launch; 2x H200 showed ~0.1 ms per 32 MiB slice)."""
        full = self.full_rate_s(nbytes)
        if full is None:
            return None
        return full + self.slices(nbytes, pace.slice_bytes) * (pace.gap_s + self.full_rate_s(pace.slice_bytes))

    @property
    def stretch(self) -> float:
        """Measured over planned duration of recent paced pulls (1.0 until one is measured).
        Folds in whatever the plan misses: the gaps are spins counted in GPU clock cycles,
        which last longer when the GPU clocks down under load."""
        s = sorted(self._stretch)
        return s[len(s) // 2] if s else 1.0

    def window_s(self, tokens: int) -> float | None:
        """Predicted compute window of one MoE layer at ``tokens``: the fastest per-token
        time seen recently (a short prediction only paces less, never makes a pull late)."""
        return min(self._per_token) * tokens if self._per_token else None

    def full_rate_s(self, nbytes: int) -> float | None:
        """Seconds an unpaced pull of ``nbytes`` takes (the best recent rate)."""
        return nbytes / max(self._bytes_per_s) if self._bytes_per_s else None

    def pace(self, tokens: int, nbytes: int) -> Pace | None:
        """How to pull ``nbytes`` so it lands at ``margin`` of the window at ``tokens``, or
        None (pull at full rate: nothing measured yet, or the window is too short)."""
        window, full = self.window_s(tokens), self.full_rate_s(nbytes)
        if window is None or full is None or nbytes <= 0:
            return None
        n, stretch = self.slices(nbytes, self.slice_bytes), self.stretch
        # stretch * (full + n * (gap + slice cost)) = margin * window
        spare = self.margin * window / stretch - full - n * self.full_rate_s(self.slice_bytes)
        if spare <= 0.05 * full:  # within 5% of full rate: pacing buys nothing
            if self._stretch:  # forget the stretch slowly, so a later step tries pacing again
                self._stretch.append(1.0 + (stretch - 1.0) / 2)
            return None
        return Pace(self.slice_bytes, spare / n)

    def break_even_tokens(self, nbytes_per_layer: int) -> int | None:
        """Tokens a step needs for one layer's compute to hide one layer's full-rate pull."""
        full = self.full_rate_s(nbytes_per_layer)
        if full is None or not self._per_token:
            return None
        return int(full / min(self._per_token)) + 1


def slice_copies(copies: list, slice_bytes: int) -> list:
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
