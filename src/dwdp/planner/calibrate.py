"""``dwdp calibrate``: measure a hardware profile on the machine it runs on.

Measured: a large bf16 matmul (and fp8 where ``torch._scaled_mm`` runs), a device copy,
single-peer and all-peer pulls through symmetric memory on the copy engine, NCCL
all-to-all bandwidth and latency (all with every visible GPU), the slowdown of each
kind of kernel (GEMM, HBM-bound, attention) while every rank pulls (interference), the
spread of identical work across ranks (layer jitter), and, for a model, a fit of the
engine's own step times (GEMM and attention efficiency, per-layer overhead) from a few
one-GPU steps of that model's shape.
"""

from __future__ import annotations

import datetime
import platform
import time

import numpy as np
import torch

from .hardware import MEASURED_FRACTIONS, HardwareProfile

MB = 1 << 20


def _fp8_tflops(n: int = 8192) -> float | None:
    try:
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        from ..ceilings import time_cuda

        t = time_cuda(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        return 2 * n**3 / t / 1e12
    except Exception:
        return None


def _fp8_experts_run() -> bool:
    """Whether FP8 experts run as FP8 here (the Triton kernel on a Hopper-or-newer GPU)."""
    from .. import kernels

    return kernels.HAVE_TRITON and torch.cuda.get_device_capability()[0] >= 9


def _comm_worker(n: int, nbytes: int) -> dict:
    """Per rank: single-peer pull (rank 0 only pulls), all-peer pulls, all-to-all."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from ..ceilings import all_to_all_gbps, time_cuda
    from ..parallel.group import init_dwdp_groups

    ctx = init_dwdp_groups(n, "cuda")
    r, pg = ctx.group_rank, ctx.group.process_group
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    buf.fill_(r)
    h = symm_mem.rendezvous(buf, pg)
    peers = {q: h.get_buffer(q, (nbytes,), torch.uint8) for q in range(n) if q != r}
    dst = torch.empty((n, nbytes), dtype=torch.uint8, device=ctx.device)
    stream = torch.cuda.Stream(ctx.device)

    def issue(qs, timed=False):
        """Queue one pull from each of ``qs``; returns its done event ((start, done) if timed)."""
        with torch.cuda.stream(stream):
            start = torch.cuda.Event(enable_timing=True) if timed else None
            if start is not None:
                start.record(stream)
            for q in qs:
                dst[q].copy_(peers[q], non_blocking=True)
            done = torch.cuda.Event(enable_timing=timed)
            done.record(stream)
        return (start, done) if timed else done

    def pull(qs):
        issue(qs)
        torch.cuda.current_stream().wait_stream(stream)

    out = {}
    dist.barrier(group=pg)
    if r == 0:
        out["pull_single_gbps"] = nbytes / time_cuda(lambda: pull([1]), warmup=2, iters=5) / 1e9
    dist.barrier(group=pg)
    order = [(r + i) % n for i in range(1, n)]
    pull(order)
    torch.cuda.synchronize()
    dist.barrier(group=pg)
    t = time_cuda(lambda: pull(order), warmup=1, iters=5)
    out["pull_all_gbps"] = (n - 1) * nbytes / t / 1e9
    out.update(_interference(lambda: issue(order), t, pg))
    out.update(_pulls_under_compute(lambda: issue(order, timed=True), (n - 1) * nbytes, t, pg))
    out["jitter_times"] = _jitter_times(pg)
    out["a2a_gbps"] = all_to_all_gbps(pg, 512 * MB)
    small = torch.zeros(n * 256, device=ctx.device, dtype=torch.bfloat16)
    small_out = torch.empty_like(small)
    out["a2a_latency_us"] = time_cuda(lambda: dist.all_to_all_single(small_out, small, group=pg), 5, 20) * 1e6
    dist.barrier(group=pg)
    dist.destroy_process_group()
    return out


def _kernels() -> dict:
    """One kernel of each kind the planner prices: (function, kind)."""
    import torch.nn.functional as F

    m = 8192
    A = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(128 * MB, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    q = torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16)
    # Expert GEMMs: 32 experts' [4096 x 3072] weights (0.8 GB) against 1,024 rows each, the
    # shape of a 16K-token qwen3-235b MoE layer; they read far more weight bytes per FLOP
    # than one large matmul, and on 2x H200 slowed 9-13% under pulls where it did not slow.
    xe = torch.randn(32, 1024, 4096, device="cuda", dtype=torch.bfloat16)
    we = torch.randn(32, 4096, 3072, device="cuda", dtype=torch.bfloat16)
    return {"gemm": lambda: torch.mm(A, B), "experts": lambda: torch.bmm(xe, we),
            "hbm": lambda: torch.mul(x, 1.5, out=y),
            "attention": lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)}


def _interference(issue, round_s: float, pg) -> dict:
    """Each kernel kind timed alone, then while every rank pulls from every peer: the
    slowdown the planner applies to compute that overlaps pulls, per kind. ``issue()``
    queues one round of all-peer pulls on the copy stream (``round_s`` seconds) and returns
    its done event."""
    import torch.distributed as dist

    from ..ceilings import time_cuda

    out = {}
    for kind, fn in _kernels().items():
        alone = time_cuda(fn, warmup=3, iters=10)
        dist.barrier(group=pg)
        torch.cuda.synchronize()
        rounds = max(2, int(1.5 * 10 * alone / round_s) + 1)  # outlast the timed loop
        done = [issue() for _ in range(rounds)][-1]  # queued first, so they run beside the kernels
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            fn()
        b.record()
        b.synchronize()
        outlasted = not done.query()
        torch.cuda.synchronize()
        slowdown = a.elapsed_time(b) / 1e3 / 10 / alone - 1.0
        out[f"interference_{kind}"] = max(0.0, slowdown)
        out[f"interference_{kind}_pulls_outlasted"] = outlasted  # False: a lower bound
        dist.barrier(group=pg)
    return out


def _pulls_under_compute(issue_timed, nbytes: int, round_s: float, pg) -> dict:
    """The other side of the interference: how fast an all-peer pull round moves while every
    rank computes (each kind of kernel in turn), against ``round_s`` with nothing else
    running. Pulls read peer HBM that the peer's own kernels are using, so they slow too
    (4x H200, ISL 2K steps: 231-239 GB/s in the runs against 362 measured alone).
    ``issue_timed()`` queues one round and returns its (start, done) timing events."""
    import torch.distributed as dist

    from ..ceilings import time_cuda

    out = {}
    for kind, fn in _kernels().items():
        alone = time_cuda(fn, warmup=3, iters=5)
        iters = max(4, int(3 * round_s / alone) + 1)  # the kernels outlast the pull round
        dist.barrier(group=pg)
        torch.cuda.synchronize()
        for _ in range(2):  # the round starts once the compute stream is busy
            fn()
        start, done = issue_timed()
        for _ in range(iters):
            fn()
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        torch.cuda.synchronize()
        out[f"pull_under_{kind}_gbps"] = nbytes / (start.elapsed_time(done) / 1e3) / 1e9
        # False: the kernels ended before the round, so part of it ran alone (an upper bound).
        out[f"pull_under_{kind}_covered"] = done.elapsed_time(end) >= 0
        dist.barrier(group=pg)
    return out


def _jitter_times(pg, iters: int = 30) -> list[float]:
    """Device seconds of the same ~5 ms kernel mix, iteration by iteration, started together
    on every rank: how far ranks doing identical work drift apart per layer."""
    import torch.distributed as dist

    ks = _kernels()
    mix = [ks["gemm"], ks["hbm"], ks["attention"]]
    ts = []
    for i in range(iters + 3):
        dist.barrier(group=pg)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for fn in mix:
            fn()
        b.record()
        b.synchronize()
        if i >= 3:
            ts.append(a.elapsed_time(b) / 1e3)
    return ts


def layer_jitter_from_times(per_rank: list[list[float]]) -> float:
    """Relative standard deviation of one unit of identical work across ranks: the mean over
    iterations of the ranks' sample standard deviation over their mean, unbiased (a sample
    standard deviation of n draws averages c4(n) sigma: 0.80 sigma for two ranks)."""
    import math

    t = np.array(per_rank, dtype=float)  # [ranks, iterations]
    n = t.shape[0]
    if n < 2:
        return 0.0
    c4 = math.sqrt(2.0 / (n - 1)) * math.exp(math.lgamma(n / 2) - math.lgamma((n - 1) / 2))
    return float(np.mean(t.std(axis=0, ddof=1) / t.mean(axis=0)) / c4)


def _timed_shapes(net, cfg, shapes, device="cuda"):
    """Time one step of ``net`` per shape (lists of sequence lengths the model's context
    allows); yields (lengths, seconds, dense GEMM FLOPs, expert FLOPs, attention FLOPs)."""
    from ..batch import PackedBatch
    from ..ceilings import time_cuda
    from .model import layer_work

    for lens in shapes:
        if max(lens) > cfg.max_position_embeddings:
            continue
        batch = PackedBatch.from_sequences([[1] * n for n in lens], device)
        batch.meta()
        with torch.no_grad():
            t = time_cuda(lambda: net(batch), warmup=2, iters=3)
        dense = experts = attn = 0.0
        for layer in range(cfg.num_layers):
            w = layer_work(cfg, layer, lens, [0] * len(lens))
            dense, experts, attn = dense + w.gemm_flops, experts + w.expert_flops, attn + w.attn_flops
        yield lens, t, dense, experts, attn


def fit_model(model: str, num_layers: int | None, peak_tflops: float, hbm_gbps: float,
              fp8_tflops: float | None = None) -> dict:
    """Time one-GPU steps of ``model`` (every expert local) at several shapes and fit
    step = sum over layers of (GEMM FLOPs / (gemm_eff peak) + attention FLOPs / (attn_eff
    peak) + overhead) by least squares."""
    from ..models import build_model, init_random
    from ..presets import resolve_model

    cfg, _ = resolve_model(model, num_layers)
    net = init_random(build_model(cfg, torch.bfloat16, "cuda"), 0)
    shapes = [[256], [2048], [4096] * 4, [16384], [8192] * 2, [1024] * 8]
    rows, ts, used = [], [], []
    for lens, t, dense, experts, attn in _timed_shapes(net, cfg, shapes):
        rows.append([(dense + experts) / (peak_tflops * 1e12), attn / (peak_tflops * 1e12), cfg.num_layers,
                     sum(lens) * cfg.num_layers / (hbm_gbps * 1e9)])
        ts.append(t)
        used.append(lens)
    A, y = np.array(rows), np.array(ts)
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    keep = list(range(4))
    while (coef[keep] < 0).any():  # non-negative: drop a term that fits below zero
        keep.remove(keep[int(np.argmin(coef[keep]))])
        coef = np.zeros(4)
        coef[keep] = np.linalg.lstsq(A[:, keep], y, rcond=None)[0]
    pred = A @ coef
    fit = {"gemm_eff": 1 / coef[0] if coef[0] > 0 else 1.0, "attn_eff": 1 / coef[1] if coef[1] > 0 else 1.0,
           "layer_overhead_us": coef[2] * 1e6, "bytes_per_token_layer": coef[3],
           "samples": [{"lengths": s, "measured_s": float(t), "fit_s": float(p)}
                       for s, t, p in zip(used, ts, pred)]}
    if fp8_tflops:
        del net
        torch.cuda.empty_cache()
        fit.update(_fit_fp8_experts(cfg, coef, peak_tflops, fp8_tflops, hbm_gbps))
    return fit


def _fit_fp8_experts(cfg, coef, peak_tflops: float, fp8_tflops: float, hbm_gbps: float, device="cuda") -> dict:
    """The same model with FP8 experts (our block-scaled kernel): keep the bf16 fit for
    everything else and solve each large step for the expert GEMMs' fraction of the FP8
    peak; their median is ``fp8_gemm_eff`` (without it FP8 runs were predicted 12-22% fast
    on 2x H200: the bf16 GEMM fraction does not carry over to the FP8 kernel)."""
    from ..models import build_model, init_random

    net = init_random(build_model(cfg, torch.bfloat16, device, expert_dtype="fp8"), 0)
    effs, samples = [], []
    for lens, t, dense, experts, attn in _timed_shapes(net, cfg, ([16384], [8192] * 2, [4096] * 4), device):
        rest = (dense * coef[0] + attn * coef[1]) / (peak_tflops * 1e12) + coef[2] * cfg.num_layers \
            + coef[3] * sum(lens) * cfg.num_layers / (hbm_gbps * 1e9)
        if experts and t > rest:
            effs.append(experts / ((t - rest) * fp8_tflops * 1e12))
        samples.append({"lengths": lens, "measured_s": float(t)})
    return {"fp8_gemm_eff": float(np.median(effs)), "fp8_samples": samples} if effs else {}


def calibrate(models: list[str] = (), num_layers: int | None = None, log=print) -> HardwareProfile:
    if not torch.cuda.is_available():
        raise ValueError("dwdp calibrate measures a GPU machine; no CUDA device is visible here. "
                         "Use a built-in --hardware profile (h100-sxm, h200, b200, gb200-nvl72) instead")
    from ..ceilings import copy_gbps, matmul_tflops
    from ..parallel.launch import spawn_local

    n = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    log(f"calibrating {n} x {name}")
    bf16 = matmul_tflops()
    fp8 = _fp8_tflops() or 2 * bf16
    hbm = copy_gbps()
    log(f"  matmul bf16 {bf16:.0f} TFLOP/s, fp8 {fp8:.0f}, device copy {hbm:.0f} GB/s")
    comm = {}
    if n > 1:
        ranks = spawn_local(_comm_worker, n, (n, 1024 * MB), timeout_s=300)
        comm = {"pull_single_gbps": ranks[0]["pull_single_gbps"],
                "pull_all_gbps": float(np.mean([r["pull_all_gbps"] for r in ranks])),
                "a2a_gbps": float(np.mean([r["a2a_gbps"] for r in ranks])),
                "a2a_latency_us": float(np.mean([r["a2a_latency_us"] for r in ranks])),
                "layer_jitter": layer_jitter_from_times([r["jitter_times"] for r in ranks])}
        for kind in ("gemm", "experts", "hbm", "attention"):
            comm[f"interference_{kind}"] = float(np.mean([r[f"interference_{kind}"] for r in ranks]))
        comm["pull_under_gbps"] = {kind: float(np.mean([r[f"pull_under_{kind}_gbps"] for r in ranks]))
                                   for kind in ("gemm", "experts", "hbm", "attention")}
        comm["pull_under_covered"] = all(r[f"pull_under_{k}_covered"] for r in ranks for k in comm["pull_under_gbps"])
        log("  pulls: single peer {pull_single_gbps:.0f} GB/s, all peers {pull_all_gbps:.0f} GB/s/rank; "
            "all-to-all {a2a_gbps:.0f} GB/s/rank, latency {a2a_latency_us:.0f} us".format(**comm))
        log("  under all-peer pulls: GEMM {:.1%}, expert GEMMs {:.1%}, HBM-bound {:.1%}, attention {:.1%} slower; "
            "layer jitter across ranks {:.2%}".format(comm["interference_gemm"], comm["interference_experts"],
                                                      comm["interference_hbm"], comm["interference_attention"],
                                                      comm["layer_jitter"]))
        log("  all-peer pulls beside each kind: " + ", ".join(f"{k} {v:.0f}" for k, v in comm["pull_under_gbps"].items())
            + " GB/s/rank" + ("" if comm["pull_under_covered"] else " (some kernels ended first: upper bounds)"))
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    prof = HardwareProfile(
        name=f"{n}x {name}", source=f"measured on {platform.node()}, {datetime.date.today()}, torch {torch.__version__}",
        bf16_tflops=bf16, fp8_tflops=fp8, hbm_gbps=hbm,  # bytes moved (read + written) per second
        link_gbps=comm.get("pull_single_gbps", 0.0), pull_single_gbps=comm.get("pull_single_gbps", 0.0),
        pull_all_gbps=comm.get("pull_all_gbps", 0.0), a2a_gbps=comm.get("a2a_gbps", 0.0),
        a2a_latency_us=comm.get("a2a_latency_us", 0.0), memory_gib=total, domain=n,
        # Until a model is fitted: the engine's measured fractions relative to the large
        # matmuls measured above (grouped expert GEMMs 0.56, prefill attention 0.55 and decode
        # attention 0.35 of the bf16 peak, where the large bf16 matmul reaches 0.81; FP8 expert
        # GEMMs 0.34 of the FP8 peak, where the large FP8 matmul reaches 0.72), not the
        # matmuls' own rates. A model fit replaces the prefill ones, never the decode one.
        gemm_eff=MEASURED_FRACTIONS["gemm"] / 0.81, attn_eff=MEASURED_FRACTIONS["attn"] / 0.81,
        decode_attn_eff=MEASURED_FRACTIONS["decode_attn"] / 0.81,
        fp8_gemm_eff=MEASURED_FRACTIONS["fp8_gemm"] / 0.72)
    if n > 1:  # measured here; one GPU keeps the defaults (nothing to pull, no peer to drift from)
        prof.layer_jitter = comm["layer_jitter"]
        prof.interference_gemm = comm["interference_gemm"]
        prof.interference_experts = comm["interference_experts"]
        prof.interference_hbm = comm["interference_hbm"]
        prof.interference_attn = comm["interference_attention"]
        prof.pull_under_gbps = comm["pull_under_gbps"]
    for model in models:
        t0 = time.perf_counter()
        fit = fit_model(model, num_layers, bf16, hbm, fp8 if _fp8_experts_run() else None)
        prof.fits[model] = fit
        torch.cuda.empty_cache()
        fp8_note = f", fp8 expert eff {fit['fp8_gemm_eff']:.2f}" if "fp8_gemm_eff" in fit else ""
        log(f"  {model}: gemm_eff {fit['gemm_eff']:.2f}, attn_eff {fit['attn_eff']:.2f}, overhead "
            f"{fit['layer_overhead_us']:.0f} us/layer{fp8_note} ({time.perf_counter() - t0:.0f} s)")
    return prof
