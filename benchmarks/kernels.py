"""Kernel microbenchmarks against ceilings measured in the same run (one GPU).

* ceilings: a large bf16 matmul (FLOP/s) and a device-to-device copy (bytes/s);
* the MoE layer, split into routing, permute (sort + gather), grouped GEMMs (gate/up,
  SwiGLU, down) and combine (un-permute + weighted sum), for one resident segment and for
  the same experts split across two base tensors (resident shard + prefetch slot: DWDP's
  split-weight path) - GEMM FLOP/s as a share of the matmul ceiling, permute + combine as
  a share of MoE time;
* causal variable-length attention for GQA (Qwen3-235B: 64 q / 4 kv heads, d 128) and
  MLA prefill (DeepSeek-V3: 128 heads, d_qk 192, d_v 128), FLOP/s against the ceiling.

    python benchmarks/kernels.py --out kernels.json
"""

from __future__ import annotations

import argparse
import json

import torch

from dwdp.ceilings import copy_gbps, machine_info, matmul_tflops
from dwdp.timing import time_cuda
from dwdp.models.attention import packed_causal_attention
from dwdp.models.moe import ExpertSegment, Router, _grouped_swiglu
from dwdp.presets import resolve_model


def moe_parts(cfg, T: int, split: bool, mode: str = "bf16") -> dict:
    """One MoE layer's parts. mode: ``bf16`` (grouped_mm + Triton SwiGLU/combine),
    ``bf16-torch`` (grouped_mm + PyTorch SwiGLU/combine), ``fp8`` (Triton FP8 grouped GEMM
    on e4m3 experts with 128x128 block scales, FP8 activations)."""
    import contextlib

    from dwdp import kernels
    from dwdp.models.moe import routed_experts_forward
    from dwdp.quant import quantize_fp8_blockwise

    E, H, I, K = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.top_k
    dev, dt = "cuda", torch.bfloat16
    torch_path = contextlib.ExitStack()
    if mode == "bf16-torch":
        torch_path.enter_context(kernels.triton_off())
    w = {"w13": torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02,
         "w2": torch.randn(E, H, I, device=dev, dtype=dt) * 0.02}

    def fp8(name, lo, hi):  # quantised 16 experts at a time (the fp32 staging stays small)
        parts = [quantize_fp8_blockwise(w[name][i:min(hi, i + 16)]) for i in range(lo, hi, 16)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def seg(lo, hi, clone):
        if mode == "fp8":
            (q13, s13), (q2, s2) = fp8("w13", lo, hi), fp8("w2", lo, hi)
            return ExpertSegment(lo, q13, q2, s13, s2)
        return ExpertSegment(lo, *[w[n][lo:hi].clone() if clone else w[n][lo:hi] for n in ("w13", "w2")])

    # split: experts [0, E/4) resident, the rest in a separate "slot" tensor
    segs = [seg(0, E // 4, True), seg(E // 4, E, True)] if split else [seg(0, E, False)]
    w.clear()
    router = Router(cfg).to(dev)
    torch.nn.init.normal_(router.weight, std=0.02)
    x = torch.randn(T, H, device=dev, dtype=dt)
    weights, ids = router(x)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    ends = counts.cumsum(0).tolist()
    use_fp8 = mode == "fp8"
    if use_fp8:
        from dwdp.kernels.fp8_grouped import grouped_swiglu_fp8, quantize_rows

    def route():
        return router(x)

    def permute():
        o = torch.argsort(flat, stable=True)
        c = torch.bincount(flat, minlength=E)
        c.cumsum(0).tolist()
        if use_fp8:
            q, sc = quantize_rows(x)
            return q[o // K], sc[o // K]
        return x[o // K]

    xs = permute()

    def gemms():
        out = torch.empty(T * K, H, device=dev, dtype=dt)
        for s in segs:
            r0 = ends[s.start - 1] if s.start else 0
            r1 = ends[s.start + s.count - 1]
            c = counts[s.start:s.start + s.count]
            if use_fp8:
                grouped_swiglu_fp8(xs[0][r0:r1], xs[1][r0:r1], s.w13, s.w13_scale, s.w2, s.w2_scale, c,
                                   out=out[r0:r1])
            else:
                out[r0:r1] = _grouped_swiglu(xs[r0:r1], s, c, ends, s.start)
        return out

    ys = gemms()

    def combine():
        if mode != "bf16-torch":
            from dwdp.kernels.moe_epilogue import weighted_combine

            return weighted_combine(ys, order, weights)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=dev)
        y = ys[inv].view(T, K, H)
        return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)

    try:
        t = {name: time_cuda(fn, 3, 10) for name, fn in
             (("routing", route), ("permute", permute), ("grouped_gemms", gemms), ("combine", combine))}
        layer = time_cuda(lambda: routed_experts_forward(x, ids, weights, segs, E), 3, 10)
    finally:
        torch_path.close()
    flops = 2.0 * T * K * 3 * H * I
    total = sum(t.values())
    return {"tokens": T, "rows_per_expert": T * K / E, "split_segments": split, "mode": mode, "seconds": t,
            "gemm_tflops": flops / t["grouped_gemms"] / 1e12, "moe_layer_s": layer,
            "permute_combine_share": (t["permute"] + t["combine"]) / total, "moe_s": total}


def fp8_accuracy(model: str, layers: int, T: int) -> dict:
    """A prefill forward with FP8 experts (quantised at load) against the same model in
    bf16 (random weights of the real shapes): relative error and cosine of the logits, and
    how often the next-token argmax agrees."""
    from dwdp.batch import PackedBatch
    from dwdp.models import build_model, init_random
    from dwdp.quant import quantize_experts_fp8

    cfg, _ = resolve_model(model, layers)
    net = init_random(build_model(cfg, torch.bfloat16, "cuda"), 0)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (64,), generator=g).tolist() for _ in range(T // 64)]
    batch = PackedBatch.from_sequences(seqs, "cuda")
    hidden = []
    hook = net.model.norm.register_forward_hook(lambda m, i, o: hidden.append(o.float()))
    with torch.no_grad():
        ref = net(batch).logits.float()
        quantize_experts_fp8(net)
        out = net(batch).logits.float()
    hook.remove()
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean().item()
    h_rel = ((hidden[1] - hidden[0]).norm() / hidden[0].norm()).item()
    del net
    torch.cuda.empty_cache()
    return {"model": model, "layers": layers, "tokens": T, "sequences": len(seqs), "logits_rel_err": rel,
            "top1_agreement": agree, "logits_cosine": cos, "final_hidden_rel_err_all_tokens": h_rel}


def attention(kind: str, lens: list[int]) -> dict:
    dev, dt = "cuda", torch.bfloat16
    T = sum(lens)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    if kind == "gqa":
        hq, hkv, d, dv = 64, 4, 128, 128
    else:
        hq, hkv, d, dv = 128, 128, 192, 128
    q = torch.randn(T, hq, d, device=dev, dtype=dt)
    k = torch.randn(T, hkv, d, device=dev, dtype=dt)
    v = torch.randn(T, hkv, dv, device=dev, dtype=dt)
    scale = d**-0.5
    cu_dev = torch.tensor(cu, dtype=torch.int32, device=dev)
    s = time_cuda(lambda: packed_causal_attention(q, k, v, cu, cu, scale, cu_dev, cu_dev), 3, 10)
    pairs = sum(n * (n + 1) / 2 for n in lens)
    flops = 2.0 * pairs * hq * (d + dv)
    return {"kind": kind, "lengths": lens, "seconds": s, "tflops": flops / s / 1e12}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", choices=["moe", "attention", "steps"], action="append",
                    help="run only these sections (default: all)")
    a = ap.parse_args()
    want = set(a.only or ["moe", "attention", "steps"])
    res = {"machine": machine_info(), "device": torch.cuda.get_device_name(0)}
    res["matmul_tflops"] = matmul_tflops()
    res["copy_gbps"] = copy_gbps()
    print(f"ceilings: matmul {res['matmul_tflops']:.0f} TFLOP/s, device copy {res['copy_gbps']:.0f} GB/s")
    if "moe" in want:
        from dwdp.planner.calibrate import _fp8_tflops

        res["fp8_matmul_tflops"] = _fp8_tflops()
        print(f"ceilings: fp8 matmul (torch._scaled_mm) {res['fp8_matmul_tflops']:.0f} TFLOP/s")
        res["moe"] = []
        for model in ("qwen3-235b-a22b", "deepseek-v3"):
            cfg, _ = resolve_model(model, 1)
            for T in (2048, 16384):
                for split, mode in ((False, "bf16-torch"), (False, "bf16"), (True, "bf16"), (False, "fp8"),
                                    (True, "fp8")):
                    r = moe_parts(cfg, T, split, mode) | {"model": model}
                    ceil = res["fp8_matmul_tflops"] if mode == "fp8" else res["matmul_tflops"]
                    r["gemm_vs_ceiling"] = r["gemm_tflops"] / ceil
                    res["moe"].append(r)
                    print(f"{model:16s} T={T:6d} rows/expert {r['rows_per_expert']:6.0f} {mode:10s} split={split!s:5s} "
                          f"GEMMs {r['gemm_tflops']:6.0f} TFLOP/s ({r['gemm_vs_ceiling']:.0%}) "
                          f"permute+combine {r['permute_combine_share']:.0%} of {r['moe_s'] * 1e3:.2f} ms, "
                          f"layer {r['moe_layer_s'] * 1e3:.2f} ms | "
                          + " ".join(f"{k} {v * 1e3:.2f}" for k, v in r["seconds"].items()), flush=True)
        res["fp8_accuracy"] = []
        for model, layers in (("qwen3-30b-a3b", 8), ("deepseek-v3", 4)):
            r = fp8_accuracy(model, layers, 4096)
            res["fp8_accuracy"].append(r)
            print(f"fp8 accuracy {model} x{layers}: hidden rel err {r['final_hidden_rel_err_all_tokens']:.3f}, "
                  f"last-token logits rel err {r['logits_rel_err']:.3f}, cosine "
                  f"{r['logits_cosine']:.4f}, top-1 agreement {r['top1_agreement']:.1%}", flush=True)
    if "attention" in want:
        res["attention"] = []
        for kind in ("gqa", "mla"):
            for lens in ([16384], [4096] * 4, [8192, 6000, 2192]):
                r = attention(kind, lens)
                res["attention"].append(r)
                print(f"attention {kind} {lens}: {r['seconds'] * 1e3:.2f} ms, {r['tflops']:.0f} TFLOP/s "
                      f"({r['tflops'] / res['matmul_tflops']:.0%})")
    if "steps" in want:
        # End to end: one prefill step of a real architecture's layers on this GPU (MFU).
        from dwdp.batch import PackedBatch
        from dwdp.flops import prefill_flops
        from dwdp.models import build_model, init_random

        res["steps"] = []
        for model, layers in (("qwen3-235b-a22b", 8), ("qwen3-30b-a3b", 48)):
            cfg, _ = resolve_model(model, layers)
            net = init_random(build_model(cfg, torch.bfloat16, "cuda"), 0)
            for lens in ([4096] * 4, [16384]):
                batch = PackedBatch.from_sequences([[1] * n for n in lens], "cuda")
                batch.meta()
                with torch.no_grad():
                    s = time_cuda(lambda: net(batch), 2, 5)
                fl = prefill_flops(cfg, lens).total
                r = {"model": model, "layers": layers, "lengths": lens, "seconds": s, "tflops": fl / s / 1e12,
                     "mfu": fl / s / 1e12 / res["matmul_tflops"], "tokens_per_s": sum(lens) / s}
                res["steps"].append(r)
                print(f"step {model} x{layers} {lens}: {s * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} tok/s, "
                      f"{r['tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%}")
            del net
            torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
