"""NCCL's all-to-all per-rank bandwidth against the message size (the ceiling DEP's all-to-alls are held against).

The bench's DEP ceiling (``--ceilings``) is NCCL ``all_to_all_single`` with equal splits at
one step's dispatch size. On 4x H200 it read 161-165 GB/s at ~0.5-1 GiB per rank where a fixed
256 MiB read 264-291 GB/s and DEP's own uneven all-to-alls of the same size ran at 246-311:
this measures the curve to see which number is NCCL's real ceiling. Each size runs with a
barrier before it, 3 warm-ups and the median of ``--iters``; bf16 vs uint8 payload and
implicit vs explicit (equal) split lists.

    PYTHONPATH=src python benchmarks/a2a_sizes.py -N 4 --out a2a.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dwdp.ceilings import machine_info  # noqa: E402
from dwdp.timing import time_cuda  # noqa: E402
from dwdp.parallel.launch import spawn_local  # noqa: E402

MB = 1 << 20


def _ceiling_fn(sizes_mb: list[int], rank: int, n: int) -> list[dict]:
    """Exactly what `bench --ceilings` calls: ``all_to_all_gbps`` on a fresh subgroup, no barrier."""
    from dwdp.ceilings import all_to_all_gbps

    pg, rows = dist.new_group(list(range(n))), []
    for mb in sizes_mb:
        gbps = all_to_all_gbps(pg, nbytes_per_rank=mb * MB)
        rows.append({"rank": rank, "mib_per_rank": mb, "dtype": "bfloat16", "group": "new_group",
                     "data": "randn", "explicit_splits": False, "gbps_to_others": gbps})
        if rank == 0:
            print(f"[a2a] all_to_all_gbps {mb} MiB: {gbps:6.0f} GB/s", flush=True)
    return rows


def _probe(sizes_mb: list[int], iters: int, variants: str, rank: int, n: int) -> list[dict]:
    # What the bench's ceiling does differently: a subgroup from new_group (as init_dwdp_groups
    # makes), random rather than constant payload.
    groups = {"world": dist.group.WORLD}
    if variants == "group-data":
        groups["new_group"] = dist.new_group(list(range(n)))
    combos = ([(g, d, torch.bfloat16, False) for g in groups for d in ("ones", "randn")] if variants == "group-data"
              else [("world", "ones", dt, ex) for dt in (torch.bfloat16, torch.uint8) for ex in (False, True)])
    rows = []
    for mb in sizes_mb:
        for gname, data, dtype, explicit in combos:
            pg = groups[gname]
            esz = torch.empty(0, dtype=dtype).element_size()
            numel = (mb * MB // esz // n) * n
            src = (torch.randn(numel, device="cuda").to(dtype) if data == "randn"
                   else torch.ones(numel, device="cuda", dtype=dtype))
            dst = torch.empty_like(src)
            splits = [numel // n] * n if explicit else None
            dist.barrier()
            t = time_cuda(lambda: dist.all_to_all_single(dst, src, splits, splits, group=pg), warmup=3,
                          iters=iters)
            gbps = numel * esz * (n - 1) / n / t / 1e9  # bytes to other ranks per second
            rows.append({"rank": rank, "mib_per_rank": mb, "dtype": str(dtype).split(".")[-1], "group": gname,
                         "data": data, "explicit_splits": explicit, "seconds": t, "gbps_to_others": gbps})
            if rank == 0:
                print(f"[a2a] {mb:5d} MiB {rows[-1]['dtype']:8s} {gname} {data} explicit={int(explicit)}: "
                      f"{gbps:6.0f} GB/s", flush=True)
            del src, dst
        torch.cuda.empty_cache()
    return rows


def worker(sizes_mb: list[int], iters: int, variants: str) -> list[dict]:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    n, rank = dist.get_world_size(), dist.get_rank()
    try:
        if variants == "ceiling-fn":
            return _ceiling_fn(sizes_mb, rank, n)
        return _probe(sizes_mb, iters, variants, rank, n)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-N", type=int, default=4)
    ap.add_argument("--sizes-mb", default="64,128,256,384,512,768,1024")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--variants", choices=("dtype-splits", "group-data", "ceiling-fn"), default="dtype-splits")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    t0 = time.time()
    ranks = spawn_local(worker, a.N, ([int(s) for s in a.sizes_mb.split(",")], a.iters, a.variants), timeout_s=600)
    doc = {"machine": machine_info(), "args": vars(a), "wall_s": time.time() - t0, "ranks": ranks}
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{'MiB/rank':>8} {'dtype':8} {'group':9} {'data':5} {'splits':8} {'min GB/s over ranks':>20}")
    for i, r in enumerate(ranks[0]):
        worst = min(rk[i]["gbps_to_others"] for rk in ranks)
        print(f"{r['mib_per_rank']:8d} {r['dtype']:8} {r['group']:9} {r['data']:5} "
              f"{'explicit' if r['explicit_splits'] else 'equal':8} {worst:20.0f}")


if __name__ == "__main__":
    main()
