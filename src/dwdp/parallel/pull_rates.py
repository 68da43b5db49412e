"""The step size below which a DWDP pull cannot hide, measured on the rank's own steps.

A layer's pull only has to land before that layer's MoE starts, one layer of compute
after it is issued. A step whose MoE layer computes for less time than one layer's pull
takes waits on its pulls. :class:`PullRates` learns the two rates that decide this from
the rank's own steps (no constant, no calibration file):

* the compute window of one MoE layer per token of the step: the time between two
  consecutive MoE starts on the compute stream, less the time spent waiting for pulls
  there (a slow pull must not feed back into a longer window);
* the pull bandwidth: bytes over copy-engine seconds.

:meth:`PullRates.break_even_tokens` is the step size whose window just hides a pull, what
a scheduler should not go below when it can wait a moment for more work
(:class:`~dwdp.engine.ShortStepHold`).
"""

from __future__ import annotations

from collections import deque


class PullRates:
    def __init__(self, history: int = 16, min_tokens: int = 256):
        """``history``: steps remembered. Steps under ``min_tokens`` do not teach the window
        (launch-bound: their per-token time says nothing about a long step's)."""
        self.min_tokens = min_tokens
        self._per_token: deque[float] = deque(maxlen=history)
        self._bytes_per_s: deque[float] = deque(maxlen=history)

    def observe(self, tokens: int, windows_s: list[float], pulls: list[tuple[int, float]]) -> None:
        """One finished step: its token count, the compute window of each MoE layer that had
        a pull in flight (waits excluded), and (bytes, seconds) of each pull."""
        good = sorted(w for w in windows_s if w > 0)
        if tokens >= self.min_tokens and good:
            self._per_token.append(good[len(good) // 2] / tokens)
        timed = [(b, s) for b, s in pulls if s == s]  # NaN: not timed
        nbytes, secs = sum(b for b, _ in timed), sum(s for _, s in timed)
        if nbytes and secs > 0:
            self._bytes_per_s.append(nbytes / secs)

    def window_s(self, tokens: int) -> float | None:
        """Predicted compute window of one MoE layer at ``tokens``: the fastest per-token
        time seen recently (a slow step, from waits or jitter, must not lengthen it)."""
        return min(self._per_token) * tokens if self._per_token else None

    def full_rate_s(self, nbytes: int) -> float | None:
        """Seconds a pull of ``nbytes`` takes (the best recent rate)."""
        return nbytes / max(self._bytes_per_s) if self._bytes_per_s else None

    def break_even_tokens(self, nbytes_per_layer: int) -> int | None:
        """Tokens a step needs for one layer's compute to hide one layer's pull."""
        full = self.full_rate_s(nbytes_per_layer)
        if full is None or not self._per_token:
            return None
        return int(full / min(self._per_token)) + 1
