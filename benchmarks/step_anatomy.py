"""Where a DWDP step's time goes against the same step on a full replica (issue 16).

Every rank of an N-GPU group builds three models of the same weights shape: a dp replica,
a DWDP rank, and a DWDP rank whose pulls are switched off (the communication-free limit of
DWDP's own schedule: same split of the MoE into resident and remote segments). Each times
the same packed step (median of --iters, all ranks stepping together, so all pull at once),
then profiles one step and splits the device time of
the compute stream by kernel kind (GEMM, attention, MoE glue, other) plus the time that
stream sat idle. The differences name the causes of DWDP's slowdown against dp: kernels
slowed by concurrent pulls (same kernels, longer), extra kernels from the split MoE,
host gaps, waits on pulls. Writes JSON.

    python benchmarks/step_anatomy.py -N 2 --model qwen3-235b-a22b --layers 8 --lengths 8192,4181 --out a.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from unittest import mock

import torch
import torch.distributed as dist

from dwdp.batch import PackedBatch
from dwdp.models import moe
from dwdp.ceilings import machine_info
from dwdp.parallel.group import init_dwdp_groups
from dwdp.parallel.hooks import SkipPullsHooks
from dwdp.parallel.launch import spawn_local
from dwdp.parallel.rank import RankSpec, build_rank

KINDS = (("gemm", ("gemm", "gemv", "matmul", "cutlass", "sm90_xmma", "nvjet", "grouped", "fp8_")),
         ("attention", ("flash", "fmha", "attention", "attn")),
         ("moe_glue", ("permute", "combine", "swiglu", "silu", "topk", "sort", "scatter", "gather", "index",
                       "cumsum", "histc", "bincount")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def _median_step(model, batch, iters: int, group) -> float:
    ts = []
    for _ in range(iters):
        dist.barrier(group=group)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        model(batch)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def _anatomy(model, batch, group) -> dict:
    """One profiled step: compute-stream device time by kernel kind, its idle time, copies."""
    dist.barrier(group=group)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        model(batch)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    copies = [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset")]
    streams: dict[int, float] = {}
    for e in kernels:
        streams[e["args"]["stream"]] = streams.get(e["args"]["stream"], 0.0) + e["dur"]
    compute = max(streams, key=streams.get)  # the stream doing most kernel time
    ks = sorted((e for e in kernels if e["args"]["stream"] == compute), key=lambda e: e["ts"])
    by_kind: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in ks:
        k = kind_of(e["name"])
        by_kind[k] = by_kind.get(k, 0.0) + e["dur"] / 1e6
        counts[k] = counts.get(k, 0) + 1
    span = (ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]) / 1e6
    busy, end = 0.0, ks[0]["ts"]
    for e in ks:  # union of kernel intervals on the compute stream
        s, t = max(e["ts"], end), e["ts"] + e["dur"]
        if t > s:
            busy += (t - s) / 1e6
        end = max(end, t)
    sleeps = sum(e["dur"] for e in kernels if "spin" in e["name"].lower() or "sleep" in e["name"].lower()) / 1e6
    return {"span_s": span, "busy_s": busy, "idle_s": span - busy, "by_kind_s": by_kind, "kernels": counts,
            "copy_s": sum(e["dur"] for e in copies) / 1e6, "copies": len(copies), "sleep_kernels_s": sleeps,
            **_gaps(ks, events)}


def _gaps(ks: list[dict], events: list[dict], top: int = 8) -> dict:
    """Where the compute stream idles: idle time summed by the kernel that ends each gap
    (what the GPU waited for the host to launch), and the host's blocking syncs (runtime
    calls named *Synchronize*: each drains the launch queue, so the next kernels start
    only as fast as the host launches them)."""
    by_next: dict[str, float] = {}
    end = ks[0]["ts"] + ks[0]["dur"]
    for prev, e in zip(ks, ks[1:]):
        gap = e["ts"] - end
        if gap > 2.0:  # us: launch-to-launch jitter below this is not a host gap
            name = e["name"][:70]
            by_next[name] = by_next.get(name, 0.0) + gap / 1e6
        end = max(end, e["ts"] + e["dur"])
    syncs: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" and "ynchronize" in e.get("name", ""):
            c = syncs.setdefault(e["name"], [0, 0.0])
            c[0] += 1
            c[1] += e.get("dur", 0) / 1e6
    worst = sorted(by_next.items(), key=lambda kv: -kv[1])[:top]
    return {"idle_by_next_kernel_s": dict(worst), "host_syncs": {k: {"calls": c, "host_s": t} for k, (c, t) in syncs.items()}}


def _read_back_blocking(t: torch.Tensor):
    values = t.tolist()  # a host sync before anything after it is queued
    return lambda: values


def worker(a) -> dict:
    ctx = init_dwdp_groups(a.N, "cuda")
    group = ctx.group.process_group
    base = dict(model=a.model, num_layers=a.layers, device="cuda", group_size=a.N, expert_dtype=a.expert_dtype,
                max_num_tokens=sum(a.lengths))
    g = torch.Generator().manual_seed(1 + ctx.rank)
    from dwdp.presets import resolve_model

    cfg, _ = resolve_model(a.model, a.layers)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in a.lengths]
    batch = PackedBatch.from_sequences(seqs, ctx.device)
    batch.meta()
    out = {"rank": ctx.rank, "tokens": sum(a.lengths), "variants": {}}
    variants = [("dp", RankSpec(strategy="dp", **base), None),
                ("dwdp", RankSpec(strategy="dwdp", **base), None),
                ("dwdp_no_pulls", RankSpec(strategy="dwdp", **base), SkipPullsHooks()),
                # bf16 only: the split MoE as it was, the host blocking on the segment boundaries
                # before queuing the permute (the FP8 path no longer reads them: same as dwdp).
                ("dwdp_sync_bounds", RankSpec(strategy="dwdp", **base), None)]
    with torch.no_grad():
        for name, spec, hooks in variants:
            rank = build_rank(spec, ctx, hooks) if hooks else build_rank(spec, ctx)
            with (mock.patch.object(moe, "_read_back", _read_back_blocking) if name == "dwdp_sync_bounds"
                  else contextlib.nullcontext()):
                for _ in range(3):  # kernels, allocator
                    rank.model(batch)
                row = {"step_s": _median_step(rank.model, batch, a.iters, group)}
                row.update(_anatomy(rank.model, batch, group))
            st = getattr(rank.runtime, "step_stats", None)
            if st and hasattr(st[-1], "exposed_wait_s"):
                row["exposed_wait_s"] = st[-1].exposed_wait_s
                row["pull_s"] = sum(s for s in st[-1].pull_seconds if s == s)
            out["variants"][name] = row
            rank.close()
            del rank
            torch.cuda.empty_cache()
            dist.barrier(group=group)
    dist.destroy_process_group()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-N", type=int, default=torch.cuda.device_count())
    p.add_argument("--model", default="qwen3-235b-a22b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--lengths", default="8192,4181", help="the packed step's sequences")
    p.add_argument("--expert-dtype", default="auto")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="anatomy.json")
    a = p.parse_args()
    a.lengths = [int(x) for x in a.lengths.split(",")]
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    ranks = spawn_local(worker, a.N, (a,), timeout_s=500)
    res = {"machine": machine_info(), "args": {k: v for k, v in vars(a).items()}, "ranks": ranks}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    for r in ranks:
        dp = r["variants"]["dp"]
        for name, v in r["variants"].items():
            kinds = " ".join(f"{k} {1e3 * t:.1f}" for k, t in sorted(v["by_kind_s"].items()))
            print(f"rank {r['rank']} {name:14s} step {1e3 * v['step_s']:7.1f} ms ({v['step_s'] / dp['step_s']:.3f}x dp)"
                  f"  busy {1e3 * v['busy_s']:.1f} idle {1e3 * v['idle_s']:.1f}  {kinds}"
                  f"  wait {1e3 * v.get('exposed_wait_s', 0):.1f}")
        if r["rank"] == 0:  # where the idle time sits (rank 1 looks the same)
            for name, v in r["variants"].items():
                syncs = ", ".join(f"{k} x{c['calls']} {1e3 * c['host_s']:.1f} ms" for k, c in v["host_syncs"].items())
                print(f"  {name}: host syncs: {syncs or 'none'}")
                for k, t in list(v["idle_by_next_kernel_s"].items())[:5]:
                    print(f"    idle {1e3 * t:5.2f} ms before {k}")


if __name__ == "__main__":
    main()
