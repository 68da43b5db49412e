"""One rank of a benchmark run: build the model under a strategy, run its requests, report.

Strategies are applied to the plain model from outside:

* ``dp``: a full replica, no communication (refused with the numbers where it does not fit);
* ``dep``: attention DP + expert parallelism over the group (all-to-all in every MoE layer,
  lockstep steps, dummy steps on idle ranks);
* ``dwdp``: attention DP + distributed weights pulled one layer ahead.
"""

from __future__ import annotations

import os

import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..workload import WorkloadSpec

from ..parallel.strategies import STRATEGIES  # noqa: E402


@dataclass
class BenchSpec:
    model: str = "tiny-qwen3-moe"
    num_layers: int | None = None
    dtype: str | None = None
    device: str = "cpu"
    world_size: int = 2
    group_size: int | None = None  # DEP / DWDP group size (default: the whole world)
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    max_num_tokens: int = 8192
    skew: float = 0.0  # Zipf exponent of the router bias (0: the model's own routing)
    local_experts: int | None = None  # DWDP L
    slice_mb: float | None = None  # DWDP sliced pulls
    copy_streams: int = 1  # DWDP copy streams per rank
    expert_dtype: str = "same"  # "fp8": routed experts stored and pulled as FP8 e4m3 + block scales
    warmup: bool = True
    seed: int = 0  # random weights
    peer_timeout_s: float = 120.0
    ceilings: bool = False  # GPU: also measure all-to-all bandwidth (dep)
    return_logits: bool = False  # tests: ship each request's logits back
    progress: bool = True

    @property
    def n(self) -> int:
        return self.group_size or self.world_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["workload"] = self.workload.to_dict()
        return d


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def bench_worker(spec: BenchSpec, strategy: str, configs: list[tuple[WorkloadSpec, int]] | None = None
                 ) -> list[dict[str, Any]]:
    """Build the model once under ``strategy``, then run each (workload, MNT) of ``configs``
    (default: the spec's own); one report per config."""

    from ..cli import DTYPES
    from ..parallel.group import group_session, init_dwdp_groups
    from ..parallel.replica import DoesNotFit
    from ..parallel.strategies import build_rank_model

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    configs = configs or [(spec.workload, spec.max_num_tokens)]
    max_mnt = max(m for _, m in configs)
    ctx = init_dwdp_groups(spec.n, spec.device, timeout_s=max(spec.peer_timeout_s, 30.0))
    outs: list[dict[str, Any]] = []
    with group_session(ctx, spec.peer_timeout_s) as watchdog:
        try:
            rm = build_rank_model(strategy, ctx, spec.model, spec.num_layers, DTYPES[spec.dtype] if spec.dtype else None,
                                  spec.local_experts, spec.slice_mb, spec.seed, spec.peer_timeout_s, max_mnt,
                                  spec.expert_dtype, spec.copy_streams)
        except DoesNotFit as e:  # every rank reaches the same verdict: all skip, then leave together
            return [{"rank": ctx.rank, "strategy": strategy, "skipped": str(e)} for _ in configs]
        # Diagnostics only: DWDP_BENCH_SKIP_PULLS=1 times DWDP with no pulls at all (wrong
        # outputs; the communication-free limit of the same schedule). Marked in the JSON.
        skip_pulls = strategy == "dwdp" and bool(os.environ.get("DWDP_BENCH_SKIP_PULLS"))
        if skip_pulls and rm.runtime is not None:
            rm.runtime.prefetcher.benchmark_skip_pulls = True
        warmed: set = set()
        for workload, mnt in configs:
            out = _run_config(spec, strategy, ctx, rm.model, rm.runtime, rm.cfg, workload, mnt, warmed)
            out["placement"] = rm.placement.describe() if rm.placement else None
            if skip_pulls:
                out["diagnostic_pulls_skipped"] = True
            out["memory"] = rm.memory_bytes()
            outs.append(out)
            watchdog.check()
        if rm.runtime is not None:
            rm.runtime.close()
    return outs


def _run_config(spec: BenchSpec, strategy: str, ctx, model, rt, cfg, workload: WorkloadSpec, mnt: int,
                warmed: set[int]) -> dict[str, Any]:
    import torch.distributed as dist

    from ..engine import PrefillEngine, Request, run_lockstep
    from ..workload import apply_router_skew, assign, generate

    out: dict[str, Any] = {"rank": ctx.rank, "strategy": strategy}
    apply_router_skew(model, spec.skew, workload.seed)
    requests = generate(workload, cfg.vocab_size, cfg.max_position_embeddings)
    # Ranks (of every group) split the world's requests, as a front-end balancer would.
    mine_reqs = assign(requests, ctx.world_size, workload.assign)[ctx.rank]
    pg = ctx.group.process_group

    def any_rank(flags: list[bool]) -> list[bool]:
        t = torch.tensor([int(f) for f in flags], device=ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
        return [bool(v) for v in t.tolist()]

    def drive(engine, reqs, progress=False):
        if strategy == "dep":
            return run_lockstep(engine, reqs, any_rank, progress=progress)
        return engine.run(reqs, progress=progress)

    with torch.no_grad():
        if spec.warmup and mnt not in warmed:  # kernels, allocator, NCCL channels: not measured
            # A full MNT step, so the caching allocator already holds blocks for the largest
            # step: a cudaMalloc during a DWDP step waits for the in-flight pulls (an implicit
            # device sync), which would charge the pulls to the host, invisible to the
            # exposed-wait metric.
            n = min(workload.isl, mnt, cfg.max_position_embeddings)
            drive(PrefillEngine(model, mnt, keep_kv=False),
                  [Request(f"warmup{i}", [1] * n) for i in range(-(-mnt // n))])
            warmed.add(mnt)
        if spec.ceilings and strategy == "dep" and ctx.device.type == "cuda" and "a2a" not in warmed:
            from ..ceilings import all_to_all_gbps

            out["a2a_ceiling_gbps"] = all_to_all_gbps(pg)
            warmed.add("a2a")
        if rt is not None:
            rt.step_stats.clear()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        engine = PrefillEngine(model, mnt, keep_kv=False)
        dist.barrier()
        t0 = time.perf_counter()
        results = drive(engine, mine_reqs, progress=spec.progress and ctx.rank == 0)
        makespan = time.perf_counter() - t0
    out.update(
        makespan_s=makespan,
        busy_s=sum(s.seconds for s in engine.steps),
        steps=[asdict(s) for s in engine.steps],
        requests=[{"id": x.id, "prompt_len": x.prompt_len, "ttft_s": x.ttft, "next_token": x.next_token}
                  for x in results],
        peak_memory_bytes=_peak_memory(ctx.device),
    )
    if spec.return_logits:
        out["logits"] = {x.id: x.logits.float().cpu().numpy() for x in results}
    if strategy == "dep":
        out["collective_s"] = [s.collective_s for s in rt.step_stats]
        out["a2a_sent_bytes"] = sum(s.sent_bytes for s in rt.step_stats)
    elif strategy == "dwdp":
        out["exposed_wait_s"] = [s.exposed_wait_s for s in rt.step_stats]
        out["pulled_bytes"] = sum(s.pulled_bytes for s in rt.step_stats)
        out["pull_seconds"] = sum(sum(s.pull_seconds) for s in rt.step_stats)
        if rt.trace is not None:
            out["trace"] = rt.trace
            rt.trace = []
    return out
