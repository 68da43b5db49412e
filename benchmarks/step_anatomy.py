"""Where a step's device time goes.

``--one-gpu``: one prefill step of a full replica on one GPU, profiled; writes one record
per model and weight format: ``model``, ``expert_dtype``, ``dense_dtype``, ``tokens``,
``device_ms_by_kind`` (summed kernel and copy time; idle time is not counted) and
``kernels``, the per-kernel list (name, count, device ms, kind) it was summed from.

How a kernel's kind is found: by what launched it, not by its name. The profiler links
each kernel to its launch on the host; the launch sits inside a stack of host ranges:
aten ops, and ranges this script opens around the engine's own entry points while it
profiles (``dwdp:gemm`` around the Triton GEMMs, ``dwdp:attention`` around the attention
call, ``dwdp:norm``, ``dwdp:rope``, ``dwdp:quantise``, ``dwdp:router``, and
``dwdp:experts`` around the routed-expert module). In order:
1. the innermost aten op or ``dwdp:gemm`` is a matrix product (mm, addmm, bmm,
   _scaled_mm, _grouped_mm, _scaled_grouped_mm, ...) or ``dwdp:gemm``: ``gemm``, or
   ``expert_gemm`` inside ``dwdp:experts``;
2. an attention op (scaled_dot_product_*, flash/cudnn/efficient attention, varlen) or
   ``dwdp:attention`` on the stack: ``attention`` (the prefix-merge arithmetic included);
3. ``dwdp:quantise`` / ``dwdp:norm`` / ``dwdp:rope`` on the stack: ``quantise`` / ``norm`` /
   ``rope``; ``dwdp:router`` or ``dwdp:experts``: ``routing`` (routing, permute, combine);
4. else by the innermost aten op: copies, casts, concatenations and fills are ``copy``,
   everything else ``elementwise``; memcpy/memset are ``copy``; no host op at all: ``other``.

The N-GPU mode (default): where a DWDP step's time goes against the same step on a full
replica.

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
import functools
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


# ------------------------------------------------------------------------------------------
# One-GPU step anatomy record
# ------------------------------------------------------------------------------------------

_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_scaled_mm",
               "aten::_grouped_mm", "aten::_scaled_grouped_mm", "aten::scaled_mm", "aten::_int_mm")
_ATTN_KEYS = ("scaled_dot_product", "flash_attention", "cudnn_attention", "efficient_attention", "varlen")
_COPY_KEYS = ("copy", "cat", "_to_copy", "aten::to", "clone", "contiguous", "fill", "zero", "empty", "stack",
              "index_put", "expand", "pad")


def classify(stack: list[str]) -> str:
    """A kernel's kind from its launch's host stack (outermost first); see the docstring."""
    inner = next((n for n in reversed(stack) if n.startswith("aten::") or n == "dwdp:gemm"), None)
    if inner is not None and (inner == "dwdp:gemm" or inner in _MATMUL_OPS):
        return "expert_gemm" if "dwdp:experts" in stack else "gemm"
    if "dwdp:attention" in stack or any(k in n for n in stack for k in _ATTN_KEYS):
        return "attention"
    for tag, kind in (("dwdp:quantise", "quantise"), ("dwdp:norm", "norm"), ("dwdp:rope", "rope"),
                      ("dwdp:router", "routing"), ("dwdp:experts", "routing")):
        if tag in stack:
            return kind
    if inner is None:
        return "other"
    return "copy" if any(k in inner for k in _COPY_KEYS) else "elementwise"


def _launch_stacks(events: list[dict]) -> dict[int, list[str]]:
    """Kernel correlation id -> names of the host ranges enclosing its launch."""
    ranges = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e]
    launches = [e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})]
    by_tid: dict = {}
    for e in ranges:
        by_tid.setdefault(e["tid"], []).append((e["ts"], 0, -e["dur"], e))
    for e in launches:
        by_tid.setdefault(e["tid"], []).append((e["ts"], 1, 0, e))
    out: dict[int, list[str]] = {}
    for items in by_tid.values():
        items.sort(key=lambda t: (t[0], t[1], t[2]))
        stack: list[dict] = []
        for ts, is_launch, _, e in items:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= ts:
                stack.pop()
            if is_launch:
                out[e["args"]["correlation"]] = [r["name"] for r in stack]
            else:
                stack.append(e)
    return out


def kernel_record(events: list[dict]) -> tuple[dict, list[dict]]:
    """(device ms by kind, per-kernel rows) from a chrome trace's events."""
    stacks = _launch_stacks(events)
    rows: dict[tuple[str, str], list] = {}
    for e in events:
        cat = e.get("cat")
        if cat == "kernel":
            kind = classify(stacks.get(e.get("args", {}).get("correlation"), []))
        elif cat in ("gpu_memcpy", "gpu_memset"):
            kind = "copy"
        else:
            continue
        r = rows.setdefault((e["name"], kind), [0, 0.0])
        r[0] += 1
        r[1] += e["dur"] / 1e3
    by_kind: dict[str, float] = {}
    for (_, kind), (_, ms) in rows.items():
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    table = sorted(({"name": n, "kind": k, "count": c, "device_ms": round(ms, 4)} for (n, k), (c, ms) in rows.items()),
                   key=lambda r: -r["device_ms"])
    return {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}, table


@contextlib.contextmanager
def _instrumented(model):
    """Host ranges naming the engine's entry points (see the docstring), while profiling."""
    import importlib

    from torch.profiler import record_function

    patches, hooks = [], []

    def wrap(modname: str, attr: str, tag: str):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            return
        fn = getattr(mod, attr, None)
        if fn is None:
            return

        def wrapped(*a, **k):
            with record_function(tag):
                return fn(*a, **k)

        patches.append(mock.patch.object(mod, attr, wrapped))

    for modname, attr, tag in (
            ("dwdp.kernels.fp8_dense", "fp8_gemm", "dwdp:gemm"),
            ("dwdp.kernels.fp8_grouped", "grouped_gemm_fp8", "dwdp:gemm"),
            ("dwdp.kernels.fp8_grouped", "grouped_gemm_bf16", "dwdp:gemm"),
            ("dwdp.kernels.fp8_grouped", "quantize_rows", "dwdp:quantise"),
            ("dwdp.quant", "quantize_act_1x128", "dwdp:quantise"),
            ("dwdp.models.transformer", "packed_causal_attention", "dwdp:attention"),
            ("dwdp.models.transformer", "decode_attention", "dwdp:attention")):
        wrap(modname, attr, tag)
    from dwdp.models import layers as L
    from dwdp.models import moe as M

    for cls, attr, tag in ((L.RMSNorm, "forward", "dwdp:norm"), (L.RMSNorm, "add_forward", "dwdp:norm"),
                           (L.Rotary, "apply", "dwdp:rope"), (L.Rotary, "apply_into", "dwdp:rope"),
                           (M.Router, "forward", "dwdp:router")):
        fn = getattr(cls, attr, None)
        if fn is None:
            continue

        def wrapped(self, *a, _fn=fn, _tag=tag, **k):
            with record_function(_tag):
                return _fn(self, *a, **k)

        patches.append(mock.patch.object(cls, attr, wrapped))
    for block in model.moe_blocks():
        def pre(mod, args):
            mod._dwdp_rf = record_function("dwdp:experts")
            mod._dwdp_rf.__enter__()

        def post(mod, args, out):
            mod._dwdp_rf.__exit__(None, None, None)

        hooks += [block.experts.register_forward_pre_hook(pre), block.experts.register_forward_hook(post)]
    with contextlib.ExitStack() as st:
        for p in patches:
            st.enter_context(p)
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


def one_gpu(a) -> list[dict]:
    """One record per (expert dtype, dense dtype) of --formats, for --model."""
    from dwdp.models import build_model, init_random
    from dwdp.presets import resolve_model

    cfg, _ = resolve_model(a.model, a.layers)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in a.lengths]
    out = []
    for fmt in a.formats.split(","):
        edt, ddt = fmt.split("/")
        kw = {"expert_dtype": edt, "dense_dtype": ddt}
        try:
            model = build_model(cfg, torch.bfloat16, "cuda", **kw)
        except TypeError:  # an engine without FP8 projections (a base commit)
            model = build_model(cfg, torch.bfloat16, "cuda", expert_dtype=edt)
            ddt = "bf16"
        init_random(model, 0)
        dense = "fp8" if any(p.dtype == torch.float8_e4m3fn for n, p in model.named_parameters()
                             if ".self_attn." in n) else "bf16"
        batch = PackedBatch.from_sequences(seqs, "cuda")
        batch.meta()
        with torch.no_grad():
            for _ in range(3):
                model(batch)
            torch.cuda.synchronize()
            ts = []
            for _ in range(a.iters):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                model(batch)
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1))
            with _instrumented(model):
                model(batch)  # the wrappers' first call outside the profile
                events = _trace_events(functools.partial(model, batch))
        by_kind, table = kernel_record(events)
        total = sum(by_kind.values())
        core = sum(by_kind.get(k, 0.0) for k in ("expert_gemm", "gemm", "attention"))
        ts.sort()
        out.append({"model": a.model, "num_layers": a.layers, "expert_dtype": edt,
                    "dense_dtype": dense,
                    "tokens": sum(a.lengths), "lengths": a.lengths, "step_ms_median": round(ts[len(ts) // 2], 3),
                    "device_ms_total": round(total, 3), "device_ms_by_kind": by_kind,
                    "outside_gemm_attention_share": round(1 - core / total, 4) if total else None,
                    "kernels": table})
        del model, batch
        torch.cuda.empty_cache()
    return out


def _trace_events(step) -> list[dict]:
    """The profiler's trace events (CPU ops and CUDA kernels) of one call of ``step``."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def _median_step(model, batch, iters: int, group) -> float:
    from dwdp.timing import time_cuda  # here, not at the top: --one-gpu also runs a base commit's src

    def meet():
        dist.barrier(group=group)
        torch.cuda.synchronize()

    return time_cuda(lambda: model(batch), warmup=0, iters=iters, before=meet)


def _anatomy(model, batch, group) -> dict:
    """One profiled step: compute-stream device time by kernel kind, its idle time, copies."""
    dist.barrier(group=group)
    events = _trace_events(functools.partial(model, batch))
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
    p.add_argument("--one-gpu", action="store_true", help="the one-GPU step anatomy record (see the docstring)")
    p.add_argument("--formats", default="fp8/fp8,fp8/same",
                   help="--one-gpu: expert dtype/dense dtype pairs (dense: fp8, same or auto)")
    p.add_argument("--label", default="", help="--one-gpu: a note stored with the records (e.g. the commit)")
    a = p.parse_args()
    a.lengths = [int(x) for x in a.lengths.split(",")]
    if a.one_gpu:
        recs = one_gpu(a)
        for r in recs:
            r["label"] = a.label
        with open(a.out, "w") as f:
            json.dump({"machine": machine_info(), "torch": torch.__version__, "records": recs}, f, indent=1)
        for r in recs:
            kinds = " ".join(f"{k} {v:.1f}" for k, v in r["device_ms_by_kind"].items())
            print(f"{a.label} {r['model']} L{r['num_layers']} experts {r['expert_dtype']} dense {r['dense_dtype']}: "
                  f"step {r['step_ms_median']:.1f} ms, device {r['device_ms_total']:.1f} ms ({kinds}); "
                  f"outside GEMM+attention {100 * r['outside_gemm_attention_share']:.1f}%")
        return
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
