"""One rank of a benchmark run: build the rank under a strategy (see
:mod:`dwdp.parallel.strategies`), run its share of the workload, report."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..parallel.hooks import TraceHooks
from ..parallel.strategies import STRATEGIES
from ..strategy.spec import DEPConfig, DWDPConfig, RankSpec, check_expert_dtype, flat_options
from ..strategy.wire import expected_dest_ranks, fp8_wire, wire_row_bytes
from ..workload import WorkloadSpec


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
    balance_tail: bool = False  # equal last steps once every request has arrived (PrefillEngine)
    dwdp: DWDPConfig = field(default_factory=DWDPConfig)
    dep: DEPConfig = field(default_factory=DEPConfig)
    hold_ms: float = 3.0  # DWDP, timed arrivals: hold a step below the measured break-even this long
    expert_dtype: str = "auto"  # as the checkpoint ships them; "fp8": stored, pulled and computed as e4m3
    dense_dtype: str = "auto"  # the projections: as the checkpoint ships them; "same"; "fp8"
    warmup: bool = True
    seed: int = 0  # random weights
    peer_timeout_s: float = 120.0
    ceilings: bool = False  # GPU: also measure all-to-all bandwidth (dep)
    diagnostic: str | None = None  # "trace" or "skip-pulls" (wrong outputs): see parallel/hooks.py
    return_logits: bool = False  # tests: ship each request's logits back
    progress: bool = True

    def __post_init__(self):
        check_expert_dtype(self.expert_dtype)  # here, not in the rank processes

    @property
    def n(self) -> int:
        return self.group_size or self.world_size

    def rank_spec(self, strategy: str, max_num_tokens: int) -> RankSpec:
        return RankSpec(model=self.model, strategy=strategy, num_layers=self.num_layers, dtype=self.dtype,
                        device=self.device, group_size=self.n, expert_dtype=self.expert_dtype,
                        dense_dtype=self.dense_dtype, dwdp=self.dwdp, dep=self.dep,
                        seed=self.seed, max_num_tokens=max_num_tokens, peer_timeout_s=self.peer_timeout_s)

    def to_dict(self) -> dict:
        """As result JSON records it: the strategies' options flat, by their flags' names
        (``local_experts``, ``slice_mb``, ``dep_wire``, ...), which readers look up."""
        options = [self.dwdp, self.dep]
        d = {k: v for k, v in asdict(self).items() if not any(getattr(self, k) is o for o in options)}
        d["workload"] = self.workload.to_dict()
        for o in options:
            d.update(flat_options(o))
        return d


def _peak_memory(device: torch.device, runtime=None) -> int:
    if device.type == "cuda":
        # Plus what lives outside the caching allocator (DWDP's peer-visible experts; before
        # this, DWDP peaks were reported without its resident experts).
        return torch.cuda.max_memory_allocated(device) + getattr(runtime, "outside_allocator_bytes", 0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def bench_worker(spec: BenchSpec, strategy: str, configs: list[tuple[WorkloadSpec, int]] | None = None
                 ) -> list[dict[str, Any]]:
    """Build the model once under ``strategy``, then run each (workload, MNT) of ``configs``
    (default: the spec's own); one report per config."""
    from ..parallel.group import group_session, init_dwdp_groups
    from ..parallel.hooks import DIAGNOSTICS, NO_HOOKS
    from ..parallel.rank import build_rank
    from ..memory import DoesNotFit

    configs = configs or [(spec.workload, spec.max_num_tokens)]
    rank_spec = spec.rank_spec(strategy, max(m for _, m in configs))
    hooks = DIAGNOSTICS[spec.diagnostic]() if spec.diagnostic else NO_HOOKS
    ctx = init_dwdp_groups(spec.n, spec.device, timeout_s=max(spec.peer_timeout_s, 30.0))
    outs: list[dict[str, Any]] = []
    warmed: dict = {}  # MNTs warmed up, and the all-to-all ceiling per MNT
    with group_session(ctx, spec.peer_timeout_s) as watchdog:
        if spec.ceilings and STRATEGIES[strategy].lockstep and ctx.device.type == "cuda":
            # under the watchdog: a peer that dies here fails the run instead of stalling it
            _a2a_ceilings(spec, ctx, sorted({m for _, m in configs}), warmed)
        try:
            rank = build_rank(rank_spec, ctx, hooks)
        except DoesNotFit as e:  # every rank reaches the same verdict: all skip, then leave together
            return [{"rank": ctx.rank, "strategy": strategy, "skipped": str(e)} for _ in configs]
        for workload, mnt in configs:
            out = _run_config(spec, rank, ctx, workload, mnt, warmed, hooks)
            out["plan"] = rank.plan.label
            out["local_experts"] = rank.spec.dwdp.local_experts  # resolved: "auto" became a number
            out["memory"] = rank.runtime.memory_bytes()
            outs.append(out)
            watchdog.check()
        rank.close()
    return outs


def _a2a_ceilings(spec: BenchSpec, ctx, mnts: list[int], warmed: dict) -> None:
    """NCCL's equal-split all-to-all per rank, at the size of one full step's dispatch for
    each MNT (a row per token and destination rank, as DEP's wire lays it out), capped at
    1 GiB per rank, measured in these processes before the model is built. On 4x H200 this
    read 158-169 GB/s at such sizes, where a fresh process reads 289-324 and DEP's own
    all-to-alls reached 246-311: :func:`dwdp.ceilings.a2a_numel` has the suspected cause and its
    fix, not yet re-measured; until it is, docs/RESULTS.md reads DEP's rate against
    ``benchmarks/a2a_sizes.py``'s curve from the same machine."""
    from ..ceilings import all_to_all_gbps
    from ..presets import resolve_model

    cfg, _ = resolve_model(spec.model, spec.num_layers)
    fp8 = fp8_wire(spec.dep.wire, spec.expert_dtype == "fp8", cfg.hidden_size, cfg.moe_intermediate_size)
    row = wire_row_bytes(cfg.hidden_size, max(cfg.top_k, 1), fp8)
    by_size: dict[int, float] = {}
    for mnt in mnts:
        nbytes = min(int(mnt * expected_dest_ranks(cfg, ctx.group_size) * row), 1 << 30)
        if nbytes not in by_size:
            by_size[nbytes] = all_to_all_gbps(ctx.group.process_group, nbytes_per_rank=nbytes)
        warmed[("a2a", mnt)] = by_size[nbytes]
    torch.cuda.empty_cache()


def _run_config(spec: BenchSpec, rank, ctx, workload: WorkloadSpec, mnt: int, warmed: dict, hooks
                ) -> dict[str, Any]:
    import torch.distributed as dist

    from ..engine import ArrivalSource, PrefillEngine, Request, StepDriver
    from ..parallel.group import lockstep_sync
    from ..workload import apply_router_skew, assign, generate

    model, cfg, strategy = rank.model, rank.cfg, rank.strategy
    out: dict[str, Any] = {"rank": ctx.rank, "strategy": strategy.name}
    apply_router_skew(model, spec.skew, workload.seed)
    requests = generate(workload, cfg.vocab_size, cfg.max_position_embeddings)
    # Ranks (of every group) split the world's requests, as a front-end balancer would.
    mine_reqs = assign(requests, ctx.world_size, workload.assign)[ctx.rank]
    sync = lockstep_sync(ctx) if strategy.lockstep else None

    hold = strategy.short_step_hold(rank.runtime, spec.hold_ms)

    def drive(engine, reqs, progress=False):
        driver = StepDriver(engine, ArrivalSource(reqs, engine.validate), sync, hold=hold)
        return driver.run(progress), driver.held_s

    with torch.no_grad():
        if spec.warmup and mnt not in warmed:  # kernels, allocator, NCCL channels: not measured
            # A full MNT step, so the caching allocator already holds blocks for the largest
            # step: a cudaMalloc during a DWDP step waits for the in-flight pulls (an implicit
            # device sync), which would charge the pulls to the host, invisible to the
            # exposed-wait metric.
            n = min(workload.isl, mnt, cfg.max_position_embeddings)
            drive(PrefillEngine(model, mnt, keep_kv=False),
                  [Request(f"warmup{i}", [1] * n) for i in range(-(-mnt // n))])
            # And short steps: a few rows per expert take other kernels (the decode-size
            # grouped GEMM tiers), which would otherwise compile inside a timed tail step
            # (a 95-token step took 452 ms on 2x H200 before this).
            for short in sorted({min(n, cfg.max_position_embeddings) for n in (61, 200)}):  # a short context
                drive(PrefillEngine(model, mnt, keep_kv=False), [Request(f"warmup-short{short}", [1] * short)])
            # And continuations: a chunk whose sequence has a cached prefix takes other attention
            # work (a pass over the prefix, the varlen kernel's prefix variant for short chunks),
            # set up at first use. Without these, the first timed step with a prefix took
            # 0.4-0.5 s longer than the others on one H100.
            for tail in (61, 1100):
                length = min(mnt + tail, cfg.max_position_embeddings)
                if length > mnt:
                    drive(PrefillEngine(model, mnt, keep_kv=False), [Request(f"warmup-chunked{tail}", [1] * length)])
            warmed[mnt] = True
        if ("a2a", mnt) in warmed:
            out["a2a_ceiling_gbps"] = warmed[("a2a", mnt)]
        rank.runtime.step_stats.clear()
        if isinstance(hooks, TraceHooks):
            hooks.take()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        # Equal last steps help ranks that step on their own; in a lockstep group they only
        # lengthen the steps every rank waits for (the planner predicts DEP 7-17% slower).
        engine = PrefillEngine(model, mnt, keep_kv=False, balance_tail=spec.balance_tail and not strategy.lockstep)
        dist.barrier()
        t0 = time.perf_counter()
        results, held_s = drive(engine, mine_reqs, progress=spec.progress and ctx.rank == 0)
        makespan = time.perf_counter() - t0
    out.update(
        makespan_s=makespan,
        busy_s=sum(s.seconds for s in engine.steps),
        held_s=held_s,
        steps=[asdict(s) for s in engine.steps],
        requests=[{"id": x.id, "prompt_len": x.prompt_len, "ttft_s": x.ttft, "next_token": x.next_token}
                  for x in results],
        peak_memory_bytes=_peak_memory(ctx.device, rank.runtime),
        runtime=strategy.step_report(rank.runtime),
    )
    if spec.diagnostic:
        out["diagnostic"] = spec.diagnostic
    if isinstance(hooks, TraceHooks):
        out["trace"] = hooks.take()
    if spec.return_logits:
        out["logits"] = {x.id: x.logits.float().cpu().numpy() for x in results}
    return out
