"""DEP's MoE layer on N GPUs of one host: compute outside collectives vs dp,
dispatch + combine bandwidth vs NCCL's all-to-all ceiling.

One MoE layer of the qwen3-235b-a22b shape (hidden 4096, expert inter 1536, 128 experts,
top-8), 16K and 32K tokens per rank, bf16 and FP8 experts. For each variant and rank:

* ``dp_s``: the same rank's tokens through ``RoutedExperts`` holding all 128 experts
  (the dp-equivalent compute, no communication), CUDA events, median;
* DEP's ``compute_s`` (GPU time outside collectives and waits), ``transfer_s``, ``wait_s``
  (DEPStepStats), their medians, the ratio compute_s / dp_s (acceptance: <= 1.05);
* bytes sent to other ranks and GB/s over transfer_s, against NCCL all_to_all_single
  moving the same bytes with equal splits (acceptance: >= 85% of it);
* DEP's output against the dp reference (bf16/FP8 rounding only).

    PYTHONPATH=src python benchmarks/dep_gpu.py -N 4 --out dep_gpu.json
    PYTHONPATH=src torchrun --nproc-per-node 4 benchmarks/dep_gpu.py --out dep_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

# Before torch / NCCL start: no NVLink multicast.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from dwdp.models.moe import RoutedExperts  # noqa: E402
from dwdp.ceilings import all_to_all_gbps  # noqa: E402
from dwdp.timing import time_cuda  # noqa: E402
from dwdp.parallel.ep import apply_dep  # noqa: E402
from dwdp.strategy.wire import ep_ranges  # noqa: E402

HIDDEN, INTER, EXPERTS, TOP_K = 4096, 1536, 128, 8


class OneLayer(nn.Module):
    """Just enough of a model for apply_dep: one MoE layer's routed experts."""

    def __init__(self, experts: RoutedExperts):
        super().__init__()
        self.config = SimpleNamespace(num_experts=EXPERTS, top_k=TOP_K)
        self.block = SimpleNamespace(experts=experts)
        self.params = nn.ModuleList([experts])

    def moe_blocks(self):
        return [self.block]

    def forward(self, x, ids, w):
        return self.block.experts(x, ids, w)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _cuda_time(fn, iters):
    return time_cuda(fn, warmup=0, iters=iters)


def _experts(start: int, count: int, fp8: bool, device) -> RoutedExperts:
    with torch.device("meta"):  # the parameters are replaced below
        ex = RoutedExperts(EXPERTS, HIDDEN, INTER, start, count)
    g = torch.Generator(device=device)
    with torch.no_grad():
        for name in ("w13", "w2"):  # each expert's weights from its own seed: shards equal the full set
            p = getattr(ex, name)
            full = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
            for i in range(count):
                g.manual_seed(1000 * (start + i) + (name == "w2"))
                full[i] = torch.randn(p.shape[1:], generator=g, device=device, dtype=torch.float32) * 0.02
            setattr(ex, name, nn.Parameter(full, requires_grad=False))
        if fp8:
            ex.quantize_fp8()
    return ex


def _routing(T: int, rank: int, device):
    g = torch.Generator(device=device)
    g.manual_seed(77 + rank)
    logits = torch.randn(T, EXPERTS, generator=g, device=device)
    w, ids = logits.softmax(-1).topk(TOP_K, dim=-1)
    return ids, w / w.sum(-1, keepdim=True)


def worker(args) -> dict:
    rank, N = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda", torch.cuda.current_device())
    pg = dist.group.WORLD
    mine = ep_ranges(EXPERTS, N)[rank]
    rows = []
    for dtype_name in args.dtypes:
        fp8 = dtype_name == "fp8"
        full = _experts(0, EXPERTS, fp8, dev)
        shard = _experts(mine.start, len(mine), fp8, dev)
        for T in args.tokens:
            x = torch.randn(T, HIDDEN, device=dev, dtype=torch.bfloat16)
            ids, w = _routing(T, rank, dev)
            with torch.no_grad():
                ref = full(x, ids, w)
                full(x, ids, w)
                dp_s = _cuda_time(lambda: full(x, ids, w), args.iters)
            row = {"rank": rank, "experts": dtype_name, "tokens": T, "dp_s": dp_s}
            try:
                model = OneLayer(shard)
                rt = apply_dep(model, pg, rank, N)
                with torch.no_grad():
                    for _ in range(2):
                        out = model(x, ids, w)
                    rt.step_stats.clear()
                    for _ in range(args.iters):
                        model(x, ids, w)
                if args.profile and not rows:  # the first variant: where the time goes (every
                    # rank runs the profiled steps: they hold collectives; rank 0 writes)
                    _profile(args.profile if rank == 0 else None, lambda: model(x, ids, w),
                             lambda: full(x, ids, w))
                st = rt.step_stats
                med = {k: _median([getattr(s, k) for s in st])
                       for k in ("step_s", "compute_s", "transfer_s", "wait_s", "collective_s")}
                sent, recv = st[-1].sent_bytes, st[-1].received_bytes
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                row.update(med, sent_bytes=sent, received_bytes=recv, host_syncs=st[-1].host_syncs,
                           send_gbps=sent / med["transfer_s"] / 1e9 if med["transfer_s"] else 0.0,
                           compute_vs_dp=med["compute_s"] / dp_s, rel_err_vs_dp=err)
                rt.close()
                model.block.experts = shard
                # NCCL's ceiling for the same bytes (what this rank's buffers hold, self included).
                # Every rank must pass the same size to the equal-split all-to-all (ranks
                # send different byte counts; mismatched sizes can hang NCCL): the largest.
                total = torch.tensor([sent * N // max(1, N - 1)], device=dev)
                dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pg)
                gbps = all_to_all_gbps(pg, nbytes_per_rank=int(total.item()), iters=args.iters)
                row.update(nccl_a2a_gbps=gbps,
                           bw_vs_nccl=row["send_gbps"] / gbps if gbps else 0.0)
            except Exception as e:  # noqa: BLE001 - keep measuring the other variants
                row["error"] = f"{type(e).__name__}: {e}"
                row["traceback"] = traceback.format_exc()
                model.block.experts = shard
            rows.append(row)
            if rank == 0:  # progress, so a run cut short shows where it was
                print(f"[dep_gpu] {dtype_name} {T}: "
                      f"layer {row.get('step_s', float('nan')) * 1e3:.2f} ms, dp {dp_s * 1e3:.2f} ms "
                      f"({time.time() - args.t0:.0f} s)", flush=True)
            torch.cuda.synchronize()
            dist.barrier()
            del x, ids, w, ref
        del full, shard
        torch.cuda.empty_cache()
    return {"rank": rank, "rows": rows}


def _profile(path: str | None, dep_step, dp_step) -> None:
    """Kernel-level GPU time of one DEP layer vs the same layer with every expert local."""
    from torch.profiler import ProfilerActivity, profile

    text = []
    for name, fn in (("dep", dep_step), ("dp", dp_step)):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        text.append(f"==== {name} (3 iterations)\n"
                    + prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
    if path:
        with open(path, "w") as f:
            f.write("\n".join(text))


def _table(results: list[dict]) -> str:
    by = {}
    for res in results:
        for r in res["rows"]:
            by.setdefault((r["experts"], r["tokens"]), []).append(r)
    lines = [f"{'experts':7} {'tokens':>6} {'dp ms':>7} {'layer ms':>8} {'dep cmp ms':>10} {'x dp':>5} "
             f"{'xfer ms':>8} {'wait ms':>8} {'GB/s':>6} {'nccl GB/s':>9} {'x nccl':>6} {'err':>7}"]
    for key, rs in sorted(by.items()):
        if any("error" in r for r in rs):
            lines.append(f"{key[0]:7} {key[1]:6} ERROR {rs[0].get('error', '')[:80]}")
            continue
        worst = max(rs, key=lambda r: r["compute_vs_dp"])  # the acceptance is per rank: show the worst
        slow = min(rs, key=lambda r: r["bw_vs_nccl"])
        lines.append(f"{key[0]:7} {key[1]:6} {worst['dp_s'] * 1e3:7.2f} "
                     f"{max(r['step_s'] for r in rs) * 1e3:8.2f} "
                     f"{worst['compute_s'] * 1e3:10.2f} {worst['compute_vs_dp']:5.2f} "
                     f"{slow['transfer_s'] * 1e3:8.2f} {max(r['wait_s'] for r in rs) * 1e3:8.2f} "
                     f"{slow['send_gbps']:6.0f} {slow['nccl_a2a_gbps']:9.0f} {slow['bw_vs_nccl']:6.2f} "
                     f"{max(r['rel_err_vs_dp'] for r in rs):7.1e}")
    return "\n".join(lines)


def _run(args):
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    try:
        res = worker(args)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res)
        return gathered
    finally:
        dist.destroy_process_group()


def _spawned(args):  # dwdp.parallel.launch.spawn_local sets the rendezvous env
    return _run(args)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-N", type=int, default=4, help="GPUs (ignored under torchrun)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="16384,32768")
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--profile", default=None, help="rank 0: torch.profiler table of the first variant here")
    args = ap.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.dtypes = args.dtypes.split(",")
    t0 = args.t0 = time.time()
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:  # torchrun
        results = _run(args)
        if int(os.environ["RANK"]) != 0:
            return
    else:
        from dwdp.parallel.launch import spawn_local

        results = spawn_local(_spawned, args.N, (args,), timeout_s=900)[0]
    from dwdp.ceilings import machine_info

    doc = {"machine": machine_info(), "shape": dict(hidden=HIDDEN, inter=INTER, experts=EXPERTS, top_k=TOP_K),
           "args": {k: v for k, v in vars(args).items()}, "wall_s": time.time() - t0, "ranks": results}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(_table(results))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
