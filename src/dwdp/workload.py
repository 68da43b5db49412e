"""Seeded prefill workloads: prompt lengths, arrival times, rank assignment, router skew.

Every strategy in a comparison sees exactly the same requests: lengths, token ids,
arrival times and ranks all come from ``WorkloadSpec.seed``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .engine import Request

DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal", "trace")
ASSIGNMENTS = ("round_robin", "least_loaded")


@dataclass
class WorkloadSpec:
    num_requests: int = 8  # in total, over all ranks
    isl: int = 128  # input sequence length: the mean (or the maximum for "uniform")
    dist: str = "fixed"
    ratio: float = 0.8  # uniform: lengths over [ratio * isl, isl] (the paper's "input ratio")
    cv: float = 0.0  # normal / lognormal: coefficient of variation (std / mean)
    trace: str | None = None  # JSONL: {"input_len": n, "arrival": seconds} per line
    rate: float | None = None  # Poisson arrivals at this many requests/s in total; None: all at once
    assign: str = "round_robin"
    seed: int = 0

    def validate(self, max_len: int) -> None:
        if self.dist not in DISTRIBUTIONS:
            raise ValueError(f"unknown length distribution {self.dist!r}; choose from {', '.join(DISTRIBUTIONS)}")
        if self.assign not in ASSIGNMENTS:
            raise ValueError(f"unknown assignment {self.assign!r}; choose from {', '.join(ASSIGNMENTS)}")
        if self.dist == "trace" and not self.trace:
            raise ValueError("--dist trace needs --trace FILE.jsonl")
        if self.dist != "trace":
            if self.num_requests < 1:
                raise ValueError("the workload needs at least one request")
            if not 1 <= self.isl <= max_len:
                raise ValueError(f"ISL {self.isl} must lie in [1, {max_len}] (the model's max_position_embeddings)")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"input ratio {self.ratio} must lie in (0, 1]")
        if self.cv < 0:
            raise ValueError(f"CV {self.cv} must be >= 0")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"request rate {self.rate} must be > 0 (omit it for offline arrivals)")

    def describe(self) -> str:
        shape = {"fixed": f"ISL {self.isl}", "uniform": f"ISL U[{self.ratio:g}x, 1x] of {self.isl}",
                 "normal": f"ISL normal mean {self.isl} CV {self.cv:g}",
                 "lognormal": f"ISL lognormal mean {self.isl} CV {self.cv:g}",
                 "trace": f"trace {self.trace}"}[self.dist]
        arrivals = "offline" if self.rate is None and self.dist != "trace" else (
            f"Poisson {self.rate:g} req/s" if self.rate else "trace arrivals")
        return f"{self.num_requests} requests, {shape}, {arrivals}, {self.assign}"

    def to_dict(self) -> dict:
        return asdict(self)


def sample_lengths(spec: WorkloadSpec, max_len: int, rng: np.random.Generator) -> list[int]:
    n, m = spec.num_requests, spec.isl
    if spec.dist == "fixed":
        x = np.full(n, m, dtype=float)
    elif spec.dist == "uniform":
        x = rng.uniform(spec.ratio * m, m, n)
    elif spec.dist == "normal":
        x = rng.normal(m, spec.cv * m, n)
    elif spec.dist == "lognormal":
        sigma2 = math.log1p(spec.cv**2)
        x = rng.lognormal(math.log(m) - sigma2 / 2, math.sqrt(sigma2), n)
    else:
        raise ValueError(spec.dist)
    return [int(v) for v in np.clip(np.rint(x), 1, max_len)]


def read_trace(path: str, max_len: int) -> tuple[list[int], list[float]]:
    lengths, arrivals = [], []
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"trace file {path} does not exist")
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            n = int(rec.get("input_len", rec.get("prompt_len")))
            t = float(rec.get("arrival", rec.get("timestamp", 0.0)))
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"{path}:{i}: expected a JSON object with input_len (int) and arrival (seconds)")
        if not 1 <= n <= max_len:
            raise ValueError(f"{path}:{i}: input_len {n} outside [1, {max_len}] (max_position_embeddings)")
        lengths.append(n)
        arrivals.append(t)
    if not lengths:
        raise ValueError(f"trace file {path} has no requests")
    t0 = min(arrivals)
    return lengths, [t - t0 for t in arrivals]


def generate(spec: WorkloadSpec, vocab_size: int, max_len: int) -> list[Request]:
    """The workload's requests (all ranks), in arrival order, with random token ids."""
    spec.validate(max_len)
    rng = np.random.default_rng(spec.seed)
    if spec.dist == "trace":
        lengths, arrivals = read_trace(spec.trace, max_len)
    else:
        lengths = sample_lengths(spec, max_len, rng)
        if spec.rate is None:
            arrivals = [0.0] * len(lengths)
        else:
            arrivals = np.cumsum(rng.exponential(1.0 / spec.rate, len(lengths))).tolist()
            arrivals = [a - arrivals[0] for a in arrivals]
    g = torch.Generator().manual_seed(spec.seed + 7)
    reqs = [Request(i, torch.randint(0, vocab_size, (n,), generator=g).tolist(), float(t))
            for i, (n, t) in enumerate(zip(lengths, arrivals))]
    return sorted(reqs, key=lambda r: (r.arrival, r.id))


def assign(requests: list[Request], world: int, policy: str = "round_robin") -> list[list[Request]]:
    """Split requests over ranks as a front-end load balancer would.

    round_robin: request i goes to rank i mod world. least_loaded: in arrival order, each
    request goes to the rank with the fewest prompt tokens assigned so far (ties: lowest rank).
    """
    out: list[list[Request]] = [[] for _ in range(world)]
    if policy == "round_robin":
        for i, r in enumerate(requests):
            out[i % world].append(r)
    elif policy == "least_loaded":
        load = [0] * world
        for r in requests:
            k = min(range(world), key=lambda j: (load[j], j))
            out[k].append(r)
            load[k] += len(r.prompt)
    else:
        raise ValueError(f"unknown assignment {policy!r}; choose from {', '.join(ASSIGNMENTS)}")
    return out


def zipf_router_bias(num_experts: int, s: float, seed: int, layer: int) -> torch.Tensor:
    """Router-logit bias -s * log(rank) over a seeded random ranking of the experts.

    Under softmax routing this multiplies each expert's probability by rank^-s (Zipf with
    exponent s): s = 0 leaves routing alone, s = 1 makes a handful of experts hot.
    """
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    ranks = torch.randperm(num_experts, generator=g).float() + 1
    return -s * ranks.log()


def apply_router_skew(model, s: float, seed: int = 0) -> None:
    """Install :func:`zipf_router_bias` on every MoE layer's router (benchmarks only)."""
    for i, block in enumerate(model.moe_blocks()):
        gate = block.gate
        gate.logit_bias = None if s == 0 else zipf_router_bias(gate.num_experts, s, seed, i).to(gate.weight.device)
