"""Is DWDP's exposed-wait metric right? Small and large steps with pulls on and off.

For each step size the step time with pulls minus the same step with pulls switched off
(the communication-free limit) is the true cost of pulling; the metric should match it
when compute cannot hide the pulls. Also checks CUDA event timing around a stream wait.

    python benchmarks/exposed_wait_check.py -N 4 --model qwen3-235b-a22b --layers 4 --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from dwdp.batch import PackedBatch
from dwdp.ceilings import machine_info
from dwdp.parallel.group import init_dwdp_groups
from dwdp.parallel.launch import spawn_local
from dwdp.parallel.rank import build_rank
from dwdp.strategy.spec import DWDPConfig, RankSpec


def event_check() -> dict:
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        done = torch.cuda.Event()
        done.record(s)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    a.record()
    torch.cuda.current_stream().wait_event(done)
    b.record()
    b.synchronize()
    return {"event_wait_s": a.elapsed_time(b) / 1e3, "host_wall_s": time.perf_counter() - t0}


def worker(n, model_name, layers, sizes, slice_mb, expert_dtype="same", seqs=1, fresh_batch=False, copy_streams=1):
    ctx = init_dwdp_groups(n, "cuda")
    spec = RankSpec(model=model_name, strategy="dwdp", num_layers=layers, device="cuda", group_size=n,
                    expert_dtype=expert_dtype, dwdp=DWDPConfig(slice_mb=slice_mb, copy_streams=copy_streams))
    rank = build_rank(spec, ctx)
    cfg, model, rt = rank.cfg, rank.model, rank.runtime
    out = {"rank": ctx.rank, "events": event_check(), "steps": []}
    g = torch.Generator().manual_seed(ctx.rank)
    with torch.no_grad():
        for T in sizes:
            toks = [torch.randint(0, cfg.vocab_size, (T // seqs,), generator=g).tolist() for _ in range(seqs)]
            batch = PackedBatch.from_sequences(toks, ctx.device)
            row = {"tokens": T}
            for mode in ("pulls", "no_pulls", "pulls"):
                rt.prefetcher.skip_pulls = mode == "no_pulls"  # the skip-pulls diagnostic, toggled per mode
                model(batch)  # warm
                ts, waits = [], []
                for _ in range(3):
                    dist.barrier()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    if fresh_batch:  # as the engine does: a new packed batch (H2D copies) every step
                        batch = PackedBatch.from_sequences(toks, ctx.device)
                    model(batch)
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                    waits.append(rt.step_stats[-1].exposed_wait_s)
                row[f"{mode}_s"] = sorted(ts)[1]
                if mode == "pulls":
                    row["exposed_wait_s"] = sorted(waits)[1]
                    row["pulled_bytes"] = rt.step_stats[-1].pulled_bytes
            out["steps"].append(row)
    dist.barrier()
    rt.close()
    dist.destroy_process_group()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-N", type=int, default=torch.cuda.device_count())
    p.add_argument("--model", default="qwen3-235b-a22b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sizes", default="128,2048,16384")
    p.add_argument("--slice-mb", type=float, default=None)
    p.add_argument("--expert-dtype", default="same", choices=["same", "fp8"])
    p.add_argument("--seqs", type=int, default=1, help="split each step into this many sequences")
    p.add_argument("--fresh-batch", action="store_true", help="build the packed batch inside each timed step")
    p.add_argument("--copy-streams", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    sizes = [int(x) for x in a.sizes.split(",")]
    ranks = spawn_local(worker, a.N, (a.N, a.model, a.layers, sizes, a.slice_mb, a.expert_dtype, a.seqs, a.fresh_batch,
                                       a.copy_streams), timeout_s=500)
    with open(a.out, "w") as f:
        json.dump({"machine": machine_info(), "args": vars(a), "ranks": ranks}, f, indent=1)
    r0 = ranks[0]
    print("event check:", r0["events"])
    for row in r0["steps"]:
        print(f"T={row['tokens']:6d} pulls {row['pulls_s'] * 1e3:8.2f} ms  no pulls {row['no_pulls_s'] * 1e3:8.2f} ms  "
              f"diff {(row['pulls_s'] - row['no_pulls_s']) * 1e3:8.2f} ms  exposed-wait metric "
              f"{row['exposed_wait_s'] * 1e3:8.2f} ms  pulled {row['pulled_bytes'] / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
