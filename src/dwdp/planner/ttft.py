"""Time to first token: the engine's scheduler run against the cost model's step times
with requests arriving over time.

Each rank serves its own requests (the workload's assignment) with the engine's online
policy: at the start of a step, the requests that have arrived are packed FIFO into at
most MNT tokens (chunked prefill); a request's first token exists when the step holding
its last chunk ends, so TTFT = that step's end - arrival. dp and dwdp ranks run on
their own; the ranks of a DEP group step in lockstep (a rank with nothing to do runs a
dummy step while a peer works, and every step lasts as long as the group's).

Prefill TTFT only: the context server's part of a disaggregated deployment (decode and
KV hand-off come after the first token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine import take_chunks
from ..strategy.registry import describe
from .model import CostModel


@dataclass
class _Req:
    arrival: float
    length: int
    done: int = 0


class _RankQueue:
    def __init__(self, reqs: list[tuple[float, int]]):
        self.pending = sorted((_Req(a, n) for a, n in reqs), key=lambda r: r.arrival)
        self.queue: list[_Req] = []

    def admit(self, t: float) -> None:
        while self.pending and self.pending[0].arrival <= t + 1e-12:
            self.queue.append(self.pending.pop(0))

    def next_arrival(self) -> float:
        return self.pending[0].arrival if self.pending else float("inf")

    @property
    def idle(self) -> bool:
        return not self.queue and not self.pending

    def pack(self, mnt: int, balance_tail: bool = False) -> tuple[list[int], list[int], list[_Req]]:
        # balance_tail applies once nothing more is coming, as in the engine's final steps.
        seqs = take_chunks([r.length - r.done for r in self.queue], mnt, balance_tail and not self.pending)
        chunks = self.queue[:len(seqs)]
        return seqs, [r.done for r in chunks], chunks

    def finish(self, chunks: list[_Req], seqs: list[int], end: float, ttft: list[float]) -> None:
        for r, take in zip(chunks, seqs):
            r.done += take
            if r.done == r.length:
                ttft.append(end - r.arrival)
        self.queue = [r for r in self.queue if r.done < r.length]


def simulate_ttft(cm: CostModel, per_rank: list[list[tuple[float, int]]], mnt: int, strategy: str, n: int,
                  local: int | None = None, skew: float = 0.0, sliced: bool = False, seed: int = 0,
                  balance_tail: bool = False) -> dict:
    """``per_rank[r]``: (arrival seconds, prompt length) of rank r's requests."""
    ranks = [_RankQueue(reqs) for reqs in per_rank]
    ttft: list[float] = []
    ends = [0.0] * len(ranks)
    desc = describe(strategy)
    step = desc.group_step(cm, n, local, skew, sliced, seed)
    size = n if desc.lockstep else 1  # ranks that step together
    for g in range(len(ranks) // size):
        group = ranks[g * size:(g + 1) * size]
        t = 0.0
        while not all(q.idle for q in group):
            for q in group:
                q.admit(t)
            if not any(q.queue for q in group):
                t = min(q.next_arrival() for q in group)
                continue
            # A lockstep group keeps the plain scheduler (see predict); a rank with nothing to
            # do runs a dummy step beside its peers.
            packed = [q.pack(mnt, balance_tail and not desc.lockstep) if q.queue else ([1], [0], [])
                      for q in group]
            t += step([(s, p) for s, p, _ in packed])
            for q, (s, _, chunks) in zip(group, packed):
                q.finish(chunks, s, t, ttft)
        for i in range(g * size, (g + 1) * size):
            ends[i] = t
    x = np.array(ttft)
    return {"strategy": strategy, "requests": len(ttft), "ttft_mean_s": float(x.mean()),
            "ttft_p50_s": float(np.percentile(x, 50)), "ttft_p90_s": float(np.percentile(x, 90)),
            "ttft_p99_s": float(np.percentile(x, 99)), "makespan_s": max(ends),
            "tokens": sum(n for reqs in per_rank for _, n in reqs)}
