"""How much do concurrent peer pulls slow compute, and which hardware do they run on?

Every rank times a large bf16 GEMM (compute-bound), an elementwise op (HBM-bound) and
causal flash attention, first alone, then while *all* ranks pull from all peers, for two
ways of issuing the pull:

* ``symm``: ``dst.copy_(view)`` where ``view`` maps the peer's allocation through PyTorch
  symmetric memory (what DWDP's runtime does);
* ``ipc``: ``dst.copy_(peer_tensor)`` where ``peer_tensor`` is the peer's allocation opened
  through CUDA IPC as a ``cuda:<peer>`` tensor (cudaMemcpyPeerAsync, copy engine).

A profiler trace of one pull of each kind shows whether it ran as a memcpy (copy engine)
or as a kernel (SMs). Writes JSON.

    python benchmarks/interference.py -N 4 --out interference.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dwdp.ceilings import machine_info
from dwdp.parallel.group import init_dwdp_groups
from dwdp.parallel.launch import spawn_local

MB = 1 << 20


def _time(fn, iters):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def worker(n: int, per_peer_mb: int):
    import torch.distributed._symmetric_memory as symm_mem
    from torch.multiprocessing.reductions import reduce_tensor

    ctx = init_dwdp_groups(n, "cuda")
    r, pg, dev = ctx.group_rank, ctx.group.process_group, ctx.device
    nbytes = per_peer_mb * MB
    sym = symm_mem.empty(nbytes, dtype=torch.uint8, device=dev)
    sym.random_(0, 255)
    h = symm_mem.rendezvous(sym, pg)
    sym_peers = {q: h.get_buffer(q, (nbytes,), torch.uint8) for q in range(n) if q != r}
    plain = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    handles = [None] * n
    dist.all_gather_object(handles, reduce_tensor(plain)[1], group=pg)
    rebuild = reduce_tensor(plain)[0]
    ipc_peers = {q: rebuild(*handles[q]) for q in range(n) if q != r}
    dst = torch.empty((n, nbytes), dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(dev)

    def pull(kind, rounds, slice_bytes=None, gap_cycles=0):
        peers = sym_peers if kind == "symm" else ipc_peers
        step = slice_bytes or nbytes
        with torch.cuda.stream(stream):
            for _ in range(rounds):
                for off in range(0, nbytes, step):
                    for i in range(1, n):  # each rank starts at a different peer
                        q = (r + i) % n
                        dst[q, off:off + step].copy_(peers[q][off:off + step], non_blocking=True)
                    if gap_cycles:  # pacing: idle the copy stream between slice rounds
                        torch.cuda._sleep(gap_cycles)
            done = torch.cuda.Event(enable_timing=True)
            done.record(stream)
        return done

    out = {"rank": ctx.rank, "per_peer_mb": per_peer_mb}
    # What runs a pull: memcpy (copy engine) or a kernel (SMs)?
    for kind in ("symm", "ipc"):
        pull(kind, 1).synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            pull(kind, 1).synchronize()
        out[f"{kind}_device_ops"] = sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})
        dist.barrier(group=pg)
        torch.cuda.synchronize()
        a = torch.cuda.Event(enable_timing=True)
        a.record(stream)
        done = pull(kind, 4)
        done.synchronize()
        out[f"{kind}_ingress_gbps"] = 4 * (n - 1) * nbytes / (a.elapsed_time(done) / 1e3) / 1e9
        dist.barrier(group=pg)

    # A device->host read of a few bytes (what `.tolist()` does once per MoE layer) needs
    # a copy engine too: does it queue behind in-flight pulls?
    import time

    small = torch.arange(64, device=dev)
    lat = {}
    for label, sl in (("alone", -1), ("whole_blocks", None), ("slices_8MiB", 8 * MB), ("slices_32MiB", 32 * MB)):
        dist.barrier(group=pg)
        torch.cuda.synchronize()
        done = pull("symm", 2, sl) if sl != -1 else None
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            small.tolist()
            ts.append(time.perf_counter() - t0)
        lat[label] = {"median_s": sorted(ts)[2], "max_s": max(ts),
                      "pulls_outlasted": (not done.query()) if done is not None else None}
        if done is not None:
            done.synchronize()
    out["d2h_latency"] = lat

    m = 8192
    A = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    B = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    x = torch.randn(256 * MB // 2, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    q = torch.randn(1, 32, 8192, 128, device=dev, dtype=torch.bfloat16)
    ops = {
        "gemm_8192": (lambda: torch.mm(A, B), 2 * m**3, "flop"),
        "elementwise_256MiB": (lambda: torch.mul(x, 1.5, out=y), 2 * x.numel() * 2, "byte"),
        "flash_causal_8k": (lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True),
                            2 * 8192 * 8192 * 32 * 256 // 2, "flop"),
    }
    # Pacing: 32 MiB slices with idle gaps on the copy stream, at lower pull rates.
    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        s0.record(stream)
        torch.cuda._sleep(10_000_000)
        s1.record(stream)
    s1.synchronize()
    cycles_per_s = 10_000_000 / (s0.elapsed_time(s1) / 1e3)
    slice_round_s = (n - 1) * 32 * MB / (out["symm_ingress_gbps"] * 1e9)
    paces = {"paced_slices32": 0, "paced_gap1x": int(slice_round_s * cycles_per_s),
             "paced_gap3x": int(3 * slice_round_s * cycles_per_s)}
    out["pacing"] = {}
    for label, gap in paces.items():
        dist.barrier(group=pg)
        torch.cuda.synchronize()
        a = torch.cuda.Event(enable_timing=True)
        a.record(stream)
        done = pull("symm", 2, 32 * MB, gap)
        done.synchronize()
        out["pacing"][label] = {"gap_cycles": gap,
                                "ingress_gbps": 2 * (n - 1) * nbytes / (a.elapsed_time(done) / 1e3) / 1e9}
    for name, (fn, work, unit) in ops.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        alone = _time(fn, 10)
        row = {"alone_s": alone, "unit": unit, "rate_alone": work / alone}
        for label, gap in paces.items():
            dist.barrier(group=pg)
            torch.cuda.synchronize()
            per_round = (n - 1) * nbytes / (out["pacing"][label]["ingress_gbps"] * 1e9)
            done = pull("symm", max(2, int(12 * alone / per_round) + 2), 32 * MB, gap)
            t = _time(fn, 10)
            row[f"slowdown_{label}"] = t / alone
            row[f"pulls_outlasted_{label}"] = not done.query()
            done.synchronize()
        for kind in ("symm", "ipc"):
            dist.barrier(group=pg)
            torch.cuda.synchronize()
            # Enough pull rounds to outlast the timed loop (checked below).
            per_round = (n - 1) * nbytes / (out[f"{kind}_ingress_gbps"] * 1e9)
            rounds = max(2, int(12 * alone / per_round) + 2)
            done = pull(kind, rounds)
            t = _time(fn, 10)
            row[f"with_{kind}_s"] = t
            row[f"slowdown_{kind}"] = t / alone
            row[f"pulls_outlasted_{kind}"] = not done.query()
            done.synchronize()
        out[name] = row
    dist.barrier(group=pg)
    del ipc_peers
    torch.cuda.synchronize()
    dist.barrier(group=pg)
    dist.destroy_process_group()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-N", type=int, default=torch.cuda.device_count())
    p.add_argument("--per-peer-mb", type=int, default=512)
    p.add_argument("--out", default="interference.json")
    a = p.parse_args()
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    ranks = spawn_local(worker, a.N, (a.N, a.per_peer_mb), timeout_s=500)
    res = {"machine": machine_info(), "group_size": a.N, "ranks": ranks}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    r0 = ranks[0]
    print("device ops symm:", r0["symm_device_ops"])
    print("device ops ipc: ", r0["ipc_device_ops"])
    print(f"ingress GB/s (all ranks pulling): symm {r0['symm_ingress_gbps']:.0f}, ipc {r0['ipc_ingress_gbps']:.0f}")
    for k, v in r0["d2h_latency"].items():
        print(f"tolist() latency {k:14s} median {v['median_s'] * 1e3:8.3f} ms max {v['max_s'] * 1e3:8.3f} ms "
              f"(pulls outlasted: {v['pulls_outlasted']})")
    for name in ("gemm_8192", "elementwise_256MiB", "flash_causal_8k"):
        row = r0[name]
        print(f"{name:22s} alone {row['alone_s'] * 1e3:7.3f} ms  with symm pulls x{row['slowdown_symm']:.2f} "
              f"(outlasted {row['pulls_outlasted_symm']})  with ipc pulls x{row['slowdown_ipc']:.2f} "
              f"(outlasted {row['pulls_outlasted_ipc']})")
    for label, p in r0["pacing"].items():
        print(f"{label:16s} pull {p['ingress_gbps']:5.0f} GB/s: " + ", ".join(
            f"{name} x{r0[name]['slowdown_' + label]:.2f}{'' if r0[name]['pulls_outlasted_' + label] else '?'}"
            for name in ("gemm_8192", "elementwise_256MiB", "flash_causal_8k")))


if __name__ == "__main__":
    main()
