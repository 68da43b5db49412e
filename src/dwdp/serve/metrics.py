"""Prometheus text-format metrics (counters, gauges, histograms), thread-safe, no dependency."""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            lines.append(f'{self.name}_bucket{{le="{b}"}} {acc}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = Histogram("dwdp_time_to_first_token_seconds", "Arrival to first token.")
        self.itl = Histogram("dwdp_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        self.counters = {"dwdp_prompt_tokens_total": 0.0, "dwdp_generation_tokens_total": 0.0,
                         "dwdp_requests_total": 0.0, "dwdp_requests_rejected_total": 0.0,
                         "dwdp_requests_failed_total": 0.0, "dwdp_prefill_exposed_wait_seconds_total": 0.0}
        self.gauges = {"dwdp_queue_depth": 0.0, "dwdp_running_requests": 0.0, "dwdp_tokens_per_second": 0.0}

    def inc(self, name: str, v: float = 1.0) -> None:
        with self.lock:
            self.counters[name] += v

    def set(self, name: str, v: float) -> None:
        with self.lock:
            self.gauges[name] = v

    def observe(self, hist: str, v: float) -> None:
        with self.lock:
            getattr(self, hist).observe(v)

    def render(self) -> str:
        with self.lock:
            lines = []
            for name, v in self.counters.items():
                lines += [f"# TYPE {name} counter", f"{name} {v}"]
            for name, v in self.gauges.items():
                lines += [f"# TYPE {name} gauge", f"{name} {v}"]
            lines += self.ttft.render() + self.itl.render()
        return "\n".join(lines) + "\n"
