"""Pull plans: ingress per rank with every rank pulling from every peer at once.

Measured against two ceilings from the same run: one rank pulling alone from one peer
(single-peer), and all ranks pulling whole per-peer blocks back to back (the DWDP
default). Plans: whole blocks or slices of 1-32 MiB issued round-robin over peers (each
rank starting at a different peer), on 1, N-1 or 2(N-1) copy streams, through the
runtime's own CudaCopyEngine. Writes JSON.

    python benchmarks/pulls.py -N 4 --out pulls.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from dwdp.ceilings import machine_info
from dwdp.parallel.copy_engine import CudaCopyEngine
from dwdp.parallel.group import init_dwdp_groups
from dwdp.parallel.launch import spawn_local

MB = 1 << 20


def plan(peers: dict, dst: torch.Tensor, rank: int, n: int, slice_bytes: int | None):
    order = [(rank + k) % n for k in range(1, n)]
    per_peer = []
    for q in order:
        size = peers[q].numel()
        step = slice_bytes or size
        per_peer.append([(dst[q, i:i + step], peers[q][i:i + step]) for i in range(0, size, step)])
    copies = []
    for i in range(max(len(p) for p in per_peer)):
        copies += [p[i] for p in per_peer if i < len(p)]
    return copies


def worker(n: int, per_peer_mb: int, iters: int):
    import torch.distributed._symmetric_memory as symm_mem

    ctx = init_dwdp_groups(n, "cuda")
    r, pg, dev = ctx.group_rank, ctx.group.process_group, ctx.device
    nbytes = per_peer_mb * MB
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=dev)
    buf.random_(0, 255)
    h = symm_mem.rendezvous(buf, pg)
    peers = {q: h.get_buffer(q, (nbytes,), torch.uint8) for q in range(n) if q != r}
    dst = torch.empty((n, nbytes), dtype=torch.uint8, device=dev)

    def timed(copies, streams: int) -> float:
        eng = CudaCopyEngine(dev, num_streams=streams)
        ts = []
        for i in range(iters + 1):
            dist.barrier(group=pg)
            torch.cuda.synchronize()
            sig = eng.submit(copies)
            sig.done.synchronize()
            if i:  # the first round warms up
                ts.append(eng.copy_seconds(sig))
        ts.sort()
        return ts[len(ts) // 2]

    out = {"rank": r, "per_peer_bytes": nbytes, "single_peer_gbps": None, "plans": []}
    # Ceiling 1: one rank pulls from one peer while the others idle.
    dist.barrier(group=pg)
    if r == 0:
        eng = CudaCopyEngine(dev)
        ts = []
        for _ in range(iters + 1):
            sig = eng.submit([(dst[1], peers[1])])
            sig.done.synchronize()
            ts.append(eng.copy_seconds(sig))
        out["single_peer_gbps"] = nbytes / sorted(ts[1:])[iters // 2] / 1e9
    dist.barrier(group=pg)
    for slice_mb in (None, 32, 8, 2, 1):
        copies = plan(peers, dst, r, n, slice_mb * MB if slice_mb else None)
        for streams in (1, n - 1, 2 * (n - 1)):
            if slice_mb is None and streams > n - 1:
                continue
            t = timed(copies, streams)
            ok = all(torch.equal(dst[q, :4096], peers[q][:4096]) for q in peers)
            out["plans"].append({"slice_mb": slice_mb, "streams": streams, "copies": len(copies),
                                 "ingress_gbps": (n - 1) * nbytes / t / 1e9, "seconds": t, "data_ok": ok})
    dist.barrier(group=pg)
    del peers, h, buf
    dist.destroy_process_group()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-N", type=int, default=4)
    ap.add_argument("--per-peer-mb", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    t0 = time.time()
    ranks = spawn_local(worker, a.N, (a.N, a.per_peer_mb, a.iters), timeout_s=500)
    single = ranks[0]["single_peer_gbps"]
    rows = []
    for i, p in enumerate(ranks[0]["plans"]):
        per_rank = [rk["plans"][i]["ingress_gbps"] for rk in ranks]
        rows.append({k: p[k] for k in ("slice_mb", "streams", "copies")} |
                    {"ingress_gbps_min": min(per_rank), "ingress_gbps_mean": sum(per_rank) / len(per_rank),
                     "data_ok": all(rk["plans"][i]["data_ok"] for rk in ranks)})
    best = max(r["ingress_gbps_mean"] for r in rows)
    for r in rows:
        r["vs_best"] = r["ingress_gbps_mean"] / best
        r["vs_single_peer"] = r["ingress_gbps_mean"] / single
    res = {"what": "pull_plans", "N": a.N, "per_peer_mb": a.per_peer_mb, "machine": machine_info(),
           "single_peer_gbps": single, "best_gbps": best, "plans": rows, "wall_s": time.time() - t0}
    print(f"N={a.N}: single-peer ceiling {single:.0f} GB/s; all ranks pulling {a.per_peer_mb} MiB from each peer:")
    print(f"{'plan':>14s} {'streams':>7s} {'copies':>6s} {'ingress GB/s/rank':>18s} {'vs best':>8s} {'vs 1-peer':>9s}")
    for r in rows:
        name = "whole blocks" if r["slice_mb"] is None else f"{r['slice_mb']} MiB slices"
        print(f"{name:>14s} {r['streams']:7d} {r['copies']:6d} {r['ingress_gbps_mean']:10.0f} (min {r['ingress_gbps_min']:.0f})"
              f" {r['vs_best']:8.0%} {r['vs_single_peer']:9.0%}{'' if r['data_ok'] else '  DATA MISMATCH'}")
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
