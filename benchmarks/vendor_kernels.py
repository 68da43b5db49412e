"""What the field's kernels reach on this GPU, next to ours: the achievable fractions the
planner's "vendor" kernel set uses (the paper's engine, TensorRT-LLM, runs vendor
GEMMs and attention, not our Triton kernels).

Per shape, measured in one run on one GPU against the same run's ceilings (a bf16 8192^3
matmul, an FP8 e4m3 matmul, the datasheet peak when given):

* dense projections (cuBLAS through ``torch.matmul``, bf16; ``torch._scaled_mm`` FP8 with
  row-wise scales) at the real models' attention / shared-expert shapes, 16K tokens;
* routed-expert grouped GEMMs: ``torch._grouped_mm`` (bf16, CUTLASS), ``torch._scaled_grouped_mm``
  (FP8, row-wise scales), our block-scaled CUTLASS kernel (``fp8_ours_tflops``, and each of its
  configurations) and our Triton kernel, at 128-1024 rows per expert drawn as a router draws them;
* causal attention: SDPA with each backend torch has here (flash, cuDNN, memory-efficient)
  and our engine's varlen path, GQA (d 128) and MLA (qk 192 / v 128), FLOPs counted causal
  (half the square).

    PYTHONPATH=src python benchmarks/vendor_kernels.py --out vendor.json [--peak-bf16 989 --peak-fp8 1979]
        [--parts grouped --rows 64,128,256,512,1024]
"""

from __future__ import annotations

import argparse
import json

import torch

from dwdp.ceilings import machine_info, matmul_tflops, time_cuda
from dwdp.presets import resolve_model

T = 16384
FP8 = torch.float8_e4m3fn


def _fp8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-6) / 448.0
    return (x.float() / s).to(FP8), s


def fp8_matmul_tflops(n: int = 8192) -> float:
    a, sa = _fp8_rowwise(torch.randn(n, n, device="cuda"))
    w, sw = _fp8_rowwise(torch.randn(n, n, device="cuda"))
    t = time_cuda(lambda: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw.t(), out_dtype=torch.bfloat16))
    return 2 * n**3 / t / 1e12


def projection_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, K, N) of one layer's dense GEMMs (attention projections, shared expert)."""
    cfg, _ = resolve_model(model, 1)
    H = cfg.hidden_size
    if cfg.is_mla:
        qd = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        shapes = [("q_a", H, cfg.q_lora_rank), ("q_b", cfg.q_lora_rank, cfg.num_heads * qd),
                  ("kv_a", H, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                  ("kv_b", cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
                  ("o", cfg.num_heads * cfg.v_head_dim, H)]
    else:
        shapes = [("qkv", H, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim), ("o", cfg.num_heads * cfg.head_dim, H)]
    if cfg.n_shared_experts:
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        shapes += [("shared_w13", H, 2 * inter), ("shared_w2", inter, H)]
    return shapes


def projections(model: str) -> dict:
    out = {"model": model, "tokens": T, "shapes": []}
    tot = {"bf16": 0.0, "fp8": 0.0}
    flops = 0.0
    for name, K, N in projection_shapes(model):
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        tb = time_cuda(lambda: x @ w.t())
        xq, sx = _fp8_rowwise(x)
        wq, sw = _fp8_rowwise(w)
        try:
            tf = time_cuda(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16))
        except Exception as e:  # noqa: BLE001 - a shape the FP8 GEMM refuses is reported, not fatal
            tf = None
            out.setdefault("errors", []).append(f"{name} fp8: {type(e).__name__}: {e}"[:300])
        f = 2.0 * T * K * N
        flops += f
        tot["bf16"] += tb
        tot["fp8"] += tf if tf is not None else float("nan")
        out["shapes"].append({"name": name, "K": K, "N": N, "bf16_tflops": f / tb / 1e12,
                              "fp8_tflops": f / tf / 1e12 if tf else None})
    out["bf16_tflops"] = flops / tot["bf16"] / 1e12
    out["fp8_tflops"] = flops / tot["fp8"] / 1e12
    return out


def grouped(model: str, rows: int, groups: int = 64, multinomial: bool = True) -> dict:
    """gate/up then down for ``groups`` experts with ``rows`` tokens each on average (one expert
    shard). ``multinomial``: our kernels get per-expert counts drawn as a uniform router draws
    them (uneven, partial tiles); torch's grouped GEMMs get equal counts (their offsets)."""
    from dwdp import kernels

    cfg, _ = resolve_model(model, 1)
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    M = rows * groups
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(M, I, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(groups, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(groups, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
    offs = torch.arange(1, groups + 1, device="cuda", dtype=torch.int32) * rows
    flops = 2.0 * M * 3 * H * I
    res = {"model": model, "rows_per_expert": rows, "experts": groups,
           "ours_counts": "multinomial" if multinomial else "equal", "torch_counts": "equal"}

    def bf16():
        torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
        torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)

    res["bf16_grouped_mm_tflops"] = flops / time_cuda(bf16) / 1e12
    xq, sx = _fp8_rowwise(x)
    hq, sh = _fp8_rowwise(h)
    q13, s13 = _fp8_rowwise(w13)
    q2, s2 = _fp8_rowwise(w2)
    try:
        sx1, sh1, s131, s21 = sx.squeeze(-1), sh.squeeze(-1), s13.squeeze(-1), s2.squeeze(-1)

        def fp8():
            torch._scaled_grouped_mm(xq, q13.transpose(-2, -1), sx1, s131, offs=offs, out_dtype=torch.bfloat16)
            torch._scaled_grouped_mm(hq, q2.transpose(-2, -1), sh1, s21, offs=offs, out_dtype=torch.bfloat16)

        res["fp8_scaled_grouped_mm_tflops"] = flops / time_cuda(fp8) / 1e12
    except Exception as e:  # noqa: BLE001
        res["fp8_scaled_grouped_mm_error"] = f"{type(e).__name__}: {e}"[:300]
    del xq, hq, q13, q2
    if kernels.HAVE_TRITON:
        from dwdp.kernels import fp8_cutlass
        from dwdp.kernels import fp8_grouped as fg
        from dwdp.quant import quantize_fp8_blockwise

        bq13, bs13 = quantize_fp8_blockwise(w13.float())
        bq2, bs2 = quantize_fp8_blockwise(w2.float())
        ax, axs = fg.quantize_rows(x)
        ah, ahs = fg.quantize_rows(h)
        counts = torch.full((groups,), rows, device="cuda")
        if multinomial:  # partial tiles, as real routing leaves them
            counts = torch.multinomial(torch.ones(groups), M, replacement=True).bincount(minlength=groups).cuda()
        res["max_rows_of_an_expert"] = int(counts.max())
        o13 = torch.empty(M, 2 * I, device="cuda", dtype=torch.bfloat16)
        o2 = torch.empty(M, H, device="cuda", dtype=torch.bfloat16)

        def ours(kernel="auto"):
            fg.grouped_gemm_fp8(ax, axs, bq13, bs13, counts, out=o13, kernel=kernel)
            fg.grouped_gemm_fp8(ah, ahs, bq2, bs2, counts, out=o2, kernel=kernel)

        res["fp8_ours_triton_tflops"] = flops / time_cuda(lambda: ours("triton")) / 1e12
        if fp8_cutlass.library() is not None:
            res["fp8_ours_tflops"] = flops / time_cuda(ours) / 1e12
            res["fp8_ours_config"] = fg._cutlass_config(rows)
            res["fp8_ours_by_config"] = {}
            for c in fp8_cutlass.CONFIGS:
                for raster in ("m", "n"):
                    def run(c=c, raster=raster):
                        fp8_cutlass.grouped_gemm(ax, axs, bq13, bs13, counts, o13, None, c, raster)
                        fp8_cutlass.grouped_gemm(ah, ahs, bq2, bs2, counts, o2, None, c, raster)

                    res["fp8_ours_by_config"][f"{c}{raster}"] = flops / time_cuda(run) / 1e12
        else:
            res["fp8_ours_tflops"] = res["fp8_ours_triton_tflops"]
            res["fp8_ours_note"] = f"CUTLASS kernel unavailable: {fp8_cutlass.why_unavailable()}"
    return res


def attention(kind: str, S: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dwdp.models.attention import packed_causal_attention

    hq, hkv, d, dv = (64, 4, 128, 128) if kind == "gqa" else (128, 128, 192, 128)
    q = torch.randn(1, hq, S, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, S, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, S, dv, device="cuda", dtype=torch.bfloat16)
    flops = 2.0 * (S * (S + 1) / 2) * hq * (d + dv)
    res = {"kind": kind, "seq": S, "heads": hq, "kv_heads": hkv, "qk_dim": d, "v_dim": dv}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                kk, vv = (k, v) if hkv == hq else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
                t = time_cuda(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True))
            res[f"sdpa_{name}_tflops"] = flops / t / 1e12
        except Exception as e:  # noqa: BLE001 - a backend that refuses this shape is reported
            res[f"sdpa_{name}_error"] = f"{type(e).__name__}: {e}"[:200]
    qp, kp, vp = (t_[0].transpose(0, 1).contiguous() for t_ in (q, k, v))
    cu = [0, S]
    cu_dev = torch.tensor(cu, dtype=torch.int32, device="cuda")
    from dwdp.models.attention import set_cuda_attention_backend

    set_cuda_attention_backend("varlen")  # the kernel the engine used before cuDNN (auto picks cuDNN here)
    try:
        t = time_cuda(lambda: packed_causal_attention(qp, kp, vp, cu, cu, d**-0.5, cu_dev, cu_dev))
    finally:
        set_cuda_attention_backend("auto")
    res["ours_varlen_tflops"] = flops / t / 1e12
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--peak-bf16", type=float, default=None, help="datasheet dense bf16 TFLOP/s (ratios also to it)")
    ap.add_argument("--peak-fp8", type=float, default=None)
    ap.add_argument("--parts", default="projections,grouped,attention", help="comma list of what to measure")
    ap.add_argument("--rows", default="128,512,1024", help="rows per expert of the grouped GEMMs")
    ap.add_argument("--equal-rows", action="store_true", help="equal rows per expert for our kernels too")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    res = {"machine": machine_info(), "device": torch.cuda.get_device_name(0),
           "matmul_tflops": matmul_tflops(), "fp8_matmul_tflops": fp8_matmul_tflops(),
           "peak_bf16_tflops": a.peak_bf16, "peak_fp8_tflops": a.peak_fp8}
    print(f"ceilings: bf16 matmul {res['matmul_tflops']:.0f}, FP8 matmul {res['fp8_matmul_tflops']:.0f} TFLOP/s", flush=True)
    res["projections"] = [projections(m) for m in ("deepseek-v3", "qwen3-235b-a22b")] if "projections" in parts else []
    for p in res["projections"]:
        print(f"projections {p['model']}: bf16 {p['bf16_tflops']:.0f}, fp8 {p['fp8_tflops']:.0f} TFLOP/s", flush=True)
    res["grouped"] = []
    for model in ("deepseek-v3", "qwen3-235b-a22b") if "grouped" in parts else ():
        for rows in [int(r) for r in a.rows.split(",")]:
            r = grouped(model, rows, multinomial=not a.equal_rows)
            res["grouped"].append(r)
            print("grouped", json.dumps(r), flush=True)
            with open(a.out, "w") as f:  # as it goes: a run cut short keeps what it measured
                json.dump(res, f, indent=1)
            torch.cuda.empty_cache()
    for r in res["grouped"]:
        print(f"{r['model']:16s} rows/expert {r['rows_per_expert']:5d}: ours {r.get('fp8_ours_tflops', 0):6.0f} "
              f"({r.get('fp8_ours_tflops', 0) / res['fp8_matmul_tflops']:.2f}x dense fp8), triton "
              f"{r.get('fp8_ours_triton_tflops', 0):6.0f}, torch rowwise {r.get('fp8_scaled_grouped_mm_tflops', 0):6.0f}",
              flush=True)
    res["attention"] = []
    for kind in ("gqa", "mla") if "attention" in parts else ():
        for S in (4096, 16384):
            r = attention(kind, S)
            res["attention"].append(r)
            print("attention", json.dumps(r), flush=True)
            torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
