"""Prometheus metrics for the server, on ``prometheus_client``.

Each :class:`Metrics` has its own registry (several servers can live in one process, as
in the tests); ``render()`` is the text exposition format ``/metrics`` returns.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the HTTP layer)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

COUNTERS = {
    "dwdp_prompt_tokens_total": "Prompt tokens admitted.",
    "dwdp_generation_tokens_total": "Tokens generated.",
    "dwdp_requests_total": "Requests admitted.",
    "dwdp_requests_rejected_total": "Requests refused with 429 (too many in flight).",
    "dwdp_requests_failed_total": "Requests that ended with an error.",
    "dwdp_requests_cancelled_total": "Requests cancelled (client disconnected or stop string reached).",
    "dwdp_prefill_exposed_wait_seconds_total": "DWDP prefill: pull wait the steps could not hide, summed over ranks.",
    "dwdp_prefill_pool_restarts_total": "Times the prefill group was restarted after a rank died.",
    "dwdp_engine_faults_total": "Engine steps that raised (their requests failed, the loop went on).",
}
GAUGES = {
    "dwdp_queue_depth": "Requests in flight and not in the decode batch (waiting for prefill or a decode slot).",
    "dwdp_running_requests": "Requests in the decode batch.",
    "dwdp_tokens_per_second": "Tokens generated per second over the last 10 s (0 when idle).",
    "dwdp_degraded": "1 while the server runs degraded (e.g. prefill group down, local fallback).",
}
HISTOGRAMS = {
    "ttft": ("dwdp_time_to_first_token_seconds", "Arrival to first token."),
    "itl": ("dwdp_inter_token_latency_seconds", "Time between consecutive tokens of a request."),
    "prefill_step": ("dwdp_prefill_step_seconds",
                     "One local prefill step of the serving loop: the engine step, first tokens, KV hand-off "
                     "(a prefill group's steps run in its own ranks)."),
    "decode_step": ("dwdp_decode_step_seconds", "One decode step of the serving loop, its token events included."),
}


class Metrics:
    """Thread-safe (prometheus_client locks internally); names as in the README."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        # prometheus_client appends "_total" to counters itself.
        self._counters = {n: Counter(n.removesuffix("_total"), h, registry=self.registry) for n, h in COUNTERS.items()}
        self._gauges = {n: Gauge(n, h, registry=self.registry) for n, h in GAUGES.items()}
        self._hists = {k: Histogram(n, h, buckets=LATENCY_BUCKETS, registry=self.registry)
                       for k, (n, h) in HISTOGRAMS.items()}

    def inc(self, name: str, v: float = 1.0) -> None:
        self._counters[name].inc(v)

    def set(self, name: str, v: float) -> None:
        self._gauges[name].set(v)

    def bind(self, name: str, fn) -> None:
        """Make a gauge report ``fn()`` whenever it is scraped."""
        self._gauges[name].set_function(fn)

    def observe(self, hist: str, v: float) -> None:
        self._hists[hist].observe(v)

    def value(self, name: str) -> float:
        """A counter's or gauge's current value (histograms: ``<name>_count`` / ``_sum``)."""
        v = self.registry.get_sample_value(name)
        if v is None:
            raise KeyError(name)
        return v

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class RateWindow:
    """Events per second over a sliding window, computed when read: a gauge that reads
    it is current whenever it is scraped, and falls to 0 once the window has no events
    (a last-step value would stay frozen while idle and swing with each step's size)."""

    def __init__(self, window_s: float = 10.0, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._events: deque[tuple[float, float]] = deque()  # (time, amount)
        self._lock = threading.Lock()
        self._t0 = clock()
        self.total = 0.0

    def _prune(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._events.popleft()

    def add(self, amount: float) -> None:
        now = self.clock()
        with self._lock:
            self._events.append((now, amount))
            self.total += amount
            self._prune(now)  # bounded whether or not anyone reads it

    def rate(self) -> float:
        """Amount per second over the last ``window_s`` (or since creation, if younger)."""
        now = self.clock()
        with self._lock:
            self._prune(now)
            got = sum(a for _, a in self._events)
        span = min(self.window_s, now - self._t0)
        return got / span if span > 0 and got else 0.0
