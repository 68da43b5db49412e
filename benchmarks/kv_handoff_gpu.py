"""What handing one request's KV cache from a prefill rank (cuda:0, its own process) to
decode (cuda:1, this process) costs, per transport of ``PrefillPoolSpec.kv_transport``:

* host: the rank copies each layer's K and V to host memory, the multiprocessing queue
  passes them through shared memory, decode copies them to its GPU (LocalKVHandoff);
* cuda_ipc: the rank packs the request's KV into one flat GPU tensor and puts it on the
  queue (one CUDA IPC handle), decode unpacks views, copies them peer to peer and drops them
  (which releases the rank's memory) — what ``dwdp serve`` does;
* cuda_ipc_per_tensor: the same without packing (one handle per layer's K and V).

Timed per request from the rank's put to the KV on the decode GPU (both clocks are this
host's), one request in flight at a time, after two warm-up requests; KV tensors of the
engine's prefill layout (per layer K and V, [tokens, kv_heads, head_dim], bf16). Writes JSON.

    python benchmarks/kv_handoff_gpu.py --out kv_handoff.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch

from dwdp.serve.disagg import pack_kv, unpack_kv

# (name, layers, kv_heads, head_dim): qwen3-235b-a22b at full depth and cut to 8 layers.
SHAPES = [("qwen3-235b-a22b L94", 94, 4, 128), ("qwen3-235b-a22b L8", 8, 4, 128)]


def _rank(q, acks, layers, heads, dim, tokens, transport, n):
    torch.cuda.set_device(0)
    for i in range(n):
        kv = [(torch.randn(tokens, heads, dim, device="cuda:0", dtype=torch.bfloat16),
               torch.randn(tokens, heads, dim, device="cuda:0", dtype=torch.bfloat16)) for _ in range(layers)]
        torch.cuda.synchronize()
        t0 = time.time()
        if transport == "cuda_ipc":
            payload = pack_kv(kv)
        elif transport == "cuda_ipc_per_tensor":
            payload = kv
        else:
            payload = [(a.cpu(), b.cpu()) for a, b in kv]
        q.put((i, t0, payload))
        del kv
        acks.get()  # one in flight; the IPC memory is released once decode dropped it


def measure(layers, heads, dim, tokens, transport, n=8) -> list[float]:
    ctx = mp.get_context("spawn")
    q, acks = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_rank, args=(q, acks, layers, heads, dim, tokens, transport, n + 2), daemon=True)
    p.start()
    out = []
    dst = torch.device("cuda:1")
    for _ in range(n + 2):
        i, t0, kv = q.get(timeout=300)
        if transport == "cuda_ipc":
            kv = unpack_kv(*kv)
        moved = [(a.to(dst, non_blocking=True), b.to(dst, non_blocking=True)) for a, b in kv]
        torch.cuda.synchronize(dst)
        torch.cuda.synchronize(0)
        t1 = time.time()
        del kv, moved
        if i >= 2:
            out.append(t1 - t0)
        acks.put(i)
    p.join(timeout=60)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="2048,8192")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from dwdp.ceilings import machine_info

    a_ = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
    b_ = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:1")
    b_.copy_(a_)
    torch.cuda.synchronize(1)
    t = time.perf_counter()
    for _ in range(5):
        b_.copy_(a_)
    torch.cuda.synchronize(1)
    peer_gbps = 5 * (1 << 30) / (time.perf_counter() - t) / 1e9
    rows = []
    for name, layers, heads, dim in SHAPES:
        for tokens in [int(x) for x in a.tokens.split(",")]:
            nbytes = 2 * layers * tokens * heads * dim * 2
            for transport in ("host", "cuda_ipc", "cuda_ipc_per_tensor"):
                ts = measure(layers, heads, dim, tokens, transport, a.requests)
                row = {"model": name, "tokens": tokens, "transport": transport, "bytes": nbytes,
                       "seconds": ts, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                       "gbps_median": nbytes / statistics.median(ts) / 1e9}
                rows.append(row)
                print(f"{name:22s} {tokens:6d} tok {nbytes / 1e9:6.2f} GB  {transport:19s}  "
                      f"median {1e3 * row['median_s']:8.1f} ms (min {1e3 * row['min_s']:.1f}, max {1e3 * row['max_s']:.1f})"
                      f"  {row['gbps_median']:6.1f} GB/s", flush=True)
    print(f"peer copy cuda:0 -> cuda:1: {peer_gbps:.0f} GB/s")
    with open(a.out, "w") as f:
        json.dump({"machine": machine_info(), "peer_copy_gbps": peer_gbps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
