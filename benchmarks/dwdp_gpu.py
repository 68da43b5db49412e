"""DWDP on N GPUs of one host: pull ceilings, correctness against a full local model,
the ordering waits on real streams, and prefill steps against the communication-free
limit (same step, pulls switched off). Writes JSON to --out.

    python benchmarks/dwdp_gpu.py -N 4 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
import torch.distributed as dist

from dwdp.batch import PackedBatch
from dwdp.ceilings import machine_info, matmul_tflops
from dwdp.flops import prefill_flops
from dwdp.models import build_model, init_random
from dwdp.parallel.group import init_dwdp_groups
from dwdp.parallel.hooks import NO_HOOKS, RuntimeHooks
from dwdp.parallel.launch import spawn_local
from dwdp.parallel.rank import build_rank
from dwdp.presets import resolve_model
from dwdp.strategy.spec import DWDPConfig, RankSpec

MB = 1 << 20


def _timed(fn, iters=5):
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def pull_ceilings(ctx, nbytes_per_peer: int) -> dict:
    """Single-peer pull (one rank pulls, the rest idle) and all ranks pulling from all
    peers at once (the DWDP pattern), whole blocks and 2 MiB round-robin slices."""
    import torch.distributed._symmetric_memory as symm_mem

    N, r, pg = ctx.group_size, ctx.group_rank, ctx.group.process_group
    buf = symm_mem.empty(nbytes_per_peer, dtype=torch.uint8, device=ctx.device)
    buf.random_(0, 255)
    h = symm_mem.rendezvous(buf, pg)
    peers = {q: h.get_buffer(q, (nbytes_per_peer,), torch.uint8) for q in range(N) if q != r}
    dst = torch.empty((N, nbytes_per_peer), dtype=torch.uint8, device=ctx.device)
    out = {"nbytes_per_peer": nbytes_per_peer}
    single = {}
    for size in (16 * MB, 64 * MB, 256 * MB, nbytes_per_peer):
        dist.barrier(group=pg)
        if r == 0:
            t = _timed(lambda: dst[1, :size].copy_(peers[1][:size]))
            single[str(size // MB) + "MiB"] = size / t / 1e9
        dist.barrier(group=pg)
    out["single_peer_gbps"] = single
    order = [(r + k) % N for k in range(1, N)]

    def whole():
        for q in order:
            dst[q].copy_(peers[q])

    slice_b = 2 * MB
    slices = [(dst[q, i:i + slice_b], peers[q][i:i + slice_b]) for i in range(0, nbytes_per_peer, slice_b) for q in order]

    def sliced():
        for d, s in slices:
            d.copy_(s)

    for name, fn in (("all_peers_whole", whole), ("all_peers_2mib_round_robin", sliced)):
        fn()
        dist.barrier(group=pg)
        t = _timed(fn, iters=3)
        out[name + "_ingress_gbps"] = (N - 1) * nbytes_per_peer / t / 1e9
        # a CUDA graph removes the per-copy launch cost of the sliced plan
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            sliced()
            with torch.cuda.graph(g):
                sliced()
        dist.barrier(group=pg)
        t = _timed(g.replay, iters=3)
        out["all_peers_2mib_round_robin_graph_ingress_gbps"] = (N - 1) * nbytes_per_peer / t / 1e9
    except Exception as e:
        out["graph_error"] = repr(e)[:300]
    del peers, h, buf, dst
    return out


class DelayHooks(RuntimeHooks):
    """Device sleeps on the copy stream and before each MoE reads its slot; optionally one
    of the two prefetch waits dropped (the ordering must then show up as wrong logits)."""

    def __init__(self, copy_delay_cycles=0, device_delay=0, skip_raw=False, skip_war=False):
        self.copy_delay_cycles, self.device_delay = copy_delay_cycles, device_delay
        self.skip_raw_wait, self.skip_war_wait = skip_raw, skip_war

    def after_acquire(self, layer, part, x):
        if self.device_delay:
            torch.cuda._sleep(self.device_delay)  # keep this MoE's slot reads in flight


def dwdp_rank(ctx, model_name, layers, local=None, slice_bytes=None, hooks=NO_HOOKS):
    spec = RankSpec(model=model_name, strategy="dwdp", num_layers=layers, device="cuda", group_size=ctx.group_size,
                    dwdp=DWDPConfig(local_experts=local, slice_mb=slice_bytes / 2**20 if slice_bytes else None))
    rank = build_rank(spec, ctx, hooks)
    return rank.cfg, rank.plan.placement, rank.model, rank.runtime


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def correctness(ctx, model_name, layers) -> dict:
    cfg, _ = resolve_model(model_name, layers)
    g = torch.Generator().manual_seed(ctx.rank)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (37, 300, 700, 2048)]
    batch = PackedBatch.from_sequences(seqs, ctx.device)
    full = init_random(build_model(cfg, torch.bfloat16, ctx.device), 0)
    ref = full(batch).logits
    del full
    torch.cuda.empty_cache()
    out = {}
    variants = {
        "dwdp": DelayHooks(),
        "dwdp_delays": DelayHooks(copy_delay_cycles=20_000_000, device_delay=50_000_000),
        "no_write_after_read_wait_delays": DelayHooks(skip_war=True, device_delay=200_000_000),
        "no_read_after_write_wait_delays": DelayHooks(skip_raw=True, copy_delay_cycles=50_000_000),
    }
    for name, hooks in variants.items():
        _, _, model, rt = dwdp_rank(ctx, model_name, layers, hooks=hooks)
        errs = [rel(model(batch).logits, ref) for _ in range(2)]
        out[name] = {"rel_err_step1": errs[0], "rel_err_step2": errs[1]}
        rt.close()
        del model, rt
        torch.cuda.empty_cache()
    return out


def perf(ctx, model_name, layers, lengths, steps, peak) -> dict:
    cfg, pl, model, rt = dwdp_rank(ctx, model_name, layers)
    g = torch.Generator().manual_seed(ctx.rank)
    batch = PackedBatch.from_sequences([torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths],
                                       ctx.device)
    fl = prefill_flops(cfg, lengths).total
    out = {"placement": pl.describe(), "layers": cfg.num_layers, "lengths": lengths,
           "memory_bytes": rt.memory_bytes()}
    for mode in ("dwdp", "no_pulls_limit", "dwdp_again"):
        rt.prefetcher.skip_pulls = mode == "no_pulls_limit"  # the skip-pulls diagnostic
        model(batch)  # warm-up
        dist.barrier(group=ctx.group.process_group)  # start the timed steps together (benchmark only)
        rt.step_stats.clear()
        ts = []
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model(batch)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        st = rt.step_stats
        secs = sorted(ts)[len(ts) // 2]
        rec = {"step_s": secs, "step_s_all": ts, "tokens_per_s": batch.num_tokens / secs,
               "mfu": fl / secs / 1e12 / peak,
               "exposed_wait_ms_per_step": [s.exposed_wait_s * 1e3 for s in st]}
        if mode != "no_pulls_limit":
            layer_s = [x for s in st for x in s.pull_seconds]
            rec["pulled_gib_per_step"] = st[-1].pulled_bytes / 2**30
            rec["pull_gbps_per_step"] = [s.pull_gbps for s in st]
            rec["pull_ms_per_layer_median"] = sorted(layer_s)[len(layer_s) // 2] * 1e3
        out[mode] = rec
    out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    rt.close()
    return out


def rank_main(N: int, args: dict) -> dict:
    ctx = init_dwdp_groups(N, "cuda", timeout_s=300)
    res = {"rank": ctx.rank, "gpu": torch.cuda.get_device_name(ctx.device)}
    peak = matmul_tflops()
    res["matmul_bf16_tflops"] = peak
    for name, fn in [
        ("pull_ceilings", lambda: pull_ceilings(ctx, args["pull_mb"] * MB)),
        ("correctness", lambda: correctness(ctx, args["model"], args["correct_layers"])),
        *[(f"perf_{sum(w)}tok", lambda w=w: perf(ctx, args["model"], args["layers"], w, args["steps"], peak))
          for w in args["workloads"]],
    ]:
        t0 = time.time()
        try:
            res[name] = fn()
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        res[name + "_wall_s"] = time.time() - t0
        torch.cuda.empty_cache()
        dist.barrier()
    dist.destroy_process_group()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-N", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--correct-layers", type=int, default=4)
    ap.add_argument("--workloads", default="4096,4096,4096,4096;4096",
                    help="per-rank step shapes: sequence lengths, workloads separated by ';'")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pull-mb", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=560, help="seconds before the ranks are killed")
    a = ap.parse_args()
    args = dict(model=a.model, layers=a.layers, correct_layers=a.correct_layers,
                workloads=[[int(x) for x in w.split(",")] for w in a.workloads.split(";")], steps=a.steps, pull_mb=a.pull_mb)
    t0 = time.time()
    ranks = spawn_local(rank_main, a.N, (a.N, args), timeout_s=a.timeout)
    result = {"what": "dwdp_gpu", "N": a.N, "args": args, "machine": machine_info(), "ranks": ranks,
              "wall_s": time.time() - t0}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for r in ranks:
        print(json.dumps({k: v for k, v in r.items()})[:3000])


if __name__ == "__main__":
    main()
