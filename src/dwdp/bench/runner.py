"""``dwdp bench``: run strategies on one seeded workload, summarise, compare, write JSON.

Each strategy runs in its own fresh set of local processes (one per GPU, or CPU
processes), one after another on the same machine, over exactly the same requests.
"""

from __future__ import annotations

import copy
import time
import numpy as np

from ..strategy.spec import BASELINE
from ..workload import WorkloadSpec
from .schema import TTFT, BenchRun, RankSummary, StrategyResult, write_runs
from .worker import BenchSpec, bench_worker


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def expert_load_imbalance(pairs_by_rank: list[list[list[int]] | None], group_size: int) -> float | None:
    """Mean over the lockstep MoE layers of each DEP group of max / mean of the (token,
    expert) pairs its ranks computed (``pairs_by_rank[r][step][layer]``; groups are
    consecutive ranks). None without per-layer counts."""
    if not pairs_by_rank or any(p is None for p in pairs_by_rank) or group_size < 1:
        return None
    ratios = []
    for g in range(0, len(pairs_by_rank), group_size):
        group = pairs_by_rank[g:g + group_size]
        for steps in zip(*group):  # lockstep: step k on every rank of the group
            for layer in zip(*steps):
                mean = sum(layer) / len(layer)
                if mean > 0:
                    ratios.append(max(layer) / mean)
    return float(np.mean(ratios)) if ratios else None


def summarize(ranks: list[dict], world: int, group_size: int | None = None) -> StrategyResult:
    """Per-strategy metrics from the ranks' reports.

    tps_per_gpu: input tokens / makespan (until the last rank finishes) / GPUs: offline
    throughput. tps_per_busy_gpu: input tokens / GPU-seconds spent in steps (a DEP rank in
    a dummy step or waiting at a collective is busy; a DWDP or DP rank that ran out of
    work is free for other requests): the capacity measure when traffic keeps coming.
    """
    if any("skipped" in r for r in ranks):
        return StrategyResult(skipped=next(r["skipped"] for r in ranks if "skipped" in r))
    reqs = [q for r in ranks for q in r["requests"]]
    tokens = sum(q["prompt_len"] for q in reqs)
    makespan = max(r["makespan_s"] for r in ranks)
    busy = [r["busy_s"] for r in ranks]
    ttft = [q["ttft_s"] for q in reqs]
    per_rank = []
    for r in ranks:
        rt = r.get("runtime", {})
        row = RankSummary(
            rank=r["rank"], tokens=sum(q["prompt_len"] for q in r["requests"]), requests=len(r["requests"]),
            steps=sum(1 for s in r["steps"] if s["num_tokens"]),
            dummy_steps=sum(1 for s in r["steps"] if not s["num_tokens"]),
            busy_s=r["busy_s"], makespan_s=r["makespan_s"], idle_s=max(0.0, makespan - r["busy_s"]),
            peak_memory_bytes=r["peak_memory_bytes"], memory=r.get("memory"),
            step_tokens=[s["num_tokens"] for s in r["steps"]], step_seconds=[s["seconds"] for s in r["steps"]],
            a2a_ceiling_gbps=r.get("a2a_ceiling_gbps"))
        if "collective_s" in rt:
            row.collective_s, row.step_collective_s = sum(rt["collective_s"]), rt["collective_s"]
            row.a2a_sent_bytes = rt["a2a_sent_bytes"]
            row.expert_pairs = rt.get("expert_pairs")
        if "exposed_wait_s" in rt:
            row.exposed_wait_s, row.step_exposed_wait_s = sum(rt["exposed_wait_s"]), rt["exposed_wait_s"]
            row.pulled_bytes = rt["pulled_bytes"]
            row.pull_gbps = rt["pulled_bytes"] / rt["pull_seconds"] / 1e9 if rt["pull_seconds"] else float("nan")
            row.break_even_tokens = rt.get("break_even_tokens")
        row.held_s = r.get("held_s")
        row.peer_wait_s = sum(rt.get("peer_wait_s", []))
        row.transfer_s = sum(rt.get("transfer_s", []))
        row.compute_s = sum(rt["compute_s"]) if "compute_s" in rt else row.busy_s - row.peer_wait_s
        row.host_syncs = rt.get("host_syncs")
        if "trace" in r and r["trace"]:
            t0 = r["trace"][0][1]
            row.trace = [(k, t - t0) for k, t in r["trace"]]
        per_rank.append(row)
    out = StrategyResult(
        tokens=tokens, requests=len(reqs), makespan_s=makespan,
        tps_per_gpu=tokens / makespan / world, tps_per_busy_gpu=tokens / sum(busy),
        ttft_s=TTFT(float(np.mean(ttft)), percentile(ttft, 50), percentile(ttft, 90), percentile(ttft, 99)),
        peak_memory_bytes=max(r["peak_memory_bytes"] for r in ranks), ranks=per_rank,
        diagnostic=ranks[0].get("diagnostic"))
    if any(r.collective_s is not None for r in per_rank):
        out.collective_share = sum(r.collective_s or 0.0 for r in per_rank) / sum(busy)
    out.expert_load_max_over_mean = expert_load_imbalance([r.expert_pairs for r in per_rank], group_size or world)
    if any(r.exposed_wait_s is not None for r in per_rank):
        out.exposed_wait_share = sum(r.exposed_wait_s or 0.0 for r in per_rank) / sum(busy)
        out.pull_gbps = float(np.nanmean([r.pull_gbps for r in per_rank]))
    return out


def run_bench(spec: BenchSpec, timeout_s: float = 1800.0, log=print,
              configs: list[tuple[WorkloadSpec, int]] | None = None, on_strategy=None) -> list[BenchRun]:
    """Every strategy of ``spec`` on each (workload, MNT) of ``configs`` (default: the spec's).

    A strategy's processes build the model once and run every config; returns one run per
    config. Each run's ``raw`` attribute keeps the ranks' own reports (logits for tests).
    ``on_strategy(runs)`` is called after each strategy (the CLI writes the file then, so a
    run cut short keeps the strategies it finished).
    """
    from ..parallel.launch import spawn_local

    configs = configs or [(spec.workload, spec.max_num_tokens)]
    runs = []
    for wl, mnt in configs:
        s = copy.deepcopy(spec)
        s.workload, s.max_num_tokens = copy.deepcopy(wl), mnt
        runs.append(BenchRun(s.to_dict(), {}))
    for strategy in spec.strategies:
        log(f"[{strategy}] {spec.world_size} ranks, {len(configs)} workload(s): "
            + "; ".join(f"{wl.describe()}, MNT {mnt}" for wl, mnt in configs))
        t0 = time.perf_counter()
        ranks = spawn_local(bench_worker, spec.world_size, (spec, strategy, configs), timeout_s=timeout_s)
        for i, run in enumerate(runs):
            per_rank = [rk[i] for rk in ranks]
            run.results[strategy] = summarize(per_rank, spec.world_size, spec.n)
            run.raw[strategy] = per_rank
            if spec.dwdp.local_experts == "auto" and per_rank[0].get("local_experts", "auto") != "auto":
                # What "auto" chose on these GPUs (the strategy that uses L resolved it), so the
                # file can be re-predicted (dwdp plan --validate).
                run.spec["local_experts"], run.spec["local_experts_auto"] = per_rank[0]["local_experts"], True
        if on_strategy is not None:
            on_strategy(runs)
        s = runs[0].results[strategy]
        log(f"[{strategy}] " + (f"skipped: {s.skipped}" if s.skipped else
                                "done: " + ", ".join(f"{r.results[strategy].tps_per_gpu:,.0f}" for r in runs)
                                + f" tok/s/GPU ({time.perf_counter() - t0:.1f} s wall)"))
    return runs


def sweep(spec: BenchSpec, cvs: list[float] | None, mnts: list[int] | None, timeout_s: float, log=print,
          isls: list[int] | None = None, repeat: int = 1, on_strategy=None):
    """One run per (MNT, ISL, CV) combination, each comparing every strategy. In an ISL
    sweep a shorter ISL gets proportionally more requests (the same total tokens as the
    longest), so every setting fills its steps alike. ``repeat`` > 1 runs the whole list
    that many times over in the same processes (the model built once, warm), each run's
    spec naming its ``repeat`` (1-based), so repetitions cost no rebuild."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1 (got {repeat})")
    configs = []
    longest = max(isls) if isls else spec.workload.isl
    for mnt in mnts or [spec.max_num_tokens]:
        for isl in isls or [spec.workload.isl]:
            for cv in cvs if cvs is not None else [spec.workload.cv]:
                wl = copy.deepcopy(spec.workload)
                wl.cv, wl.isl = cv, isl
                wl.num_requests = max(1, round(spec.workload.num_requests * longest / isl))
                configs.append((wl, mnt))
    def label(runs):
        if repeat > 1:
            for i, run in enumerate(runs):
                run.spec["repeat"] = i // len(configs) + 1
        return runs

    return label(run_bench(spec, timeout_s, log, configs * repeat,
                           on_strategy=(lambda runs: on_strategy(label(runs))) if on_strategy else None))


def write_json(path: str, runs: list[BenchRun], machine: dict) -> None:
    write_runs(path, runs, machine)


def comparison_table(run: BenchRun, title: str | None = None):
    """A rich Table comparing the strategies of one run, with ratios to dep."""
    from rich.table import Table

    res = run.results
    ref = res.get(BASELINE)
    base = ref.tps_per_gpu if ref is not None and not ref.skipped else None
    w, spec = run.workload, run.spec
    t = Table(title=title or f"{spec['model']} x{spec['world_size']}, MNT {run.mnt}, "
                             f"{w['dist']} ISL {w['isl']} CV {w['cv']:g} ratio {w['ratio']:g}, skew {spec['skew']:g}")
    cols = ("strategy", "tok/s/GPU", "vs dep", "tok/s/busy GPU", "TTFT mean ms", "p50", "p90", "p99",
            "steps", "collective %", "exposed wait %", "pull GB/s", "peak GiB")
    for c in cols:
        t.add_column(c, justify="left" if c == "strategy" else "right")
    for name, s in res.items():
        if s.skipped:
            t.add_row(name, "skipped", *[""] * (len(cols) - 2))
            continue
        f = s.ttft_s
        steps = max(r.steps + r.dummy_steps for r in s.ranks)
        t.add_row(name + (f" ({s.diagnostic})" if s.diagnostic else ""), f"{s.tps_per_gpu:,.0f}",
                  f"{s.tps_per_gpu / base:.3f}" if base else "-",
                  f"{s.tps_per_busy_gpu:,.0f}", f"{f.mean * 1e3:.1f}", f"{f.p50 * 1e3:.1f}",
                  f"{f.p90 * 1e3:.1f}", f"{f.p99 * 1e3:.1f}", str(steps),
                  f"{100 * s.collective_share:.1f}" if s.collective_share is not None else "-",
                  f"{100 * s.exposed_wait_share:.2f}" if s.exposed_wait_share is not None else "-",
                  f"{s.pull_gbps:.0f}" if s.pull_gbps is not None and s.pull_gbps == s.pull_gbps else "-",
                  f"{s.peak_memory_bytes / 2**30:.2f}")
    return t
