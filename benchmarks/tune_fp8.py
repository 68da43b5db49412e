"""Pick the FP8 grouped GEMM's tile configuration: time each candidate on the expert
GEMM shapes of real MoE models at several rows per expert (one GPU), print the best.
``--cutlass``: the CUTLASS kernel's configurations (fp8_cutlass.CONFIGS x raster order x
swizzle) instead of the Triton kernel's (fp8_grouped.CONFIGS); the picks go to
fp8_grouped.CUTLASS_CONFIGS.

    python benchmarks/tune_fp8.py --out tune_fp8.json [--cutlass] [--multinomial]
"""

from __future__ import annotations

import argparse
import json

import torch

from dwdp.ceilings import machine_info, time_cuda
from dwdp.kernels import fp8_cutlass
from dwdp.kernels import fp8_grouped as k
from dwdp.planner.calibrate import _fp8_tflops
from dwdp.quant import quantize_fp8_blockwise

SHAPES = {  # (experts, N, K) of the gate/up and down GEMMs
    "qwen3-235b w13": (128, 3072, 4096), "qwen3-235b w2": (128, 4096, 1536),
    "deepseek-v3 w13": (256, 4096, 7168), "deepseek-v3 w2": (256, 7168, 2048),
}
CANDIDATES = [(64, 128, 4, 4, 8), (64, 128, 4, 5, 8), (64, 128, 8, 4, 8), (64, 256, 4, 3, 8), (64, 256, 8, 3, 8),
              (128, 128, 4, 4, 8), (128, 128, 8, 3, 8), (128, 128, 8, 4, 8), (128, 256, 8, 3, 8), (128, 256, 8, 4, 8),
              (256, 128, 8, 3, 8), (128, 128, 8, 4, 1), (64, 128, 4, 4, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="128,512,1024")
    ap.add_argument("--multinomial", action="store_true",
                    help="rows per expert drawn as a uniform router would (multinomial), not all equal")
    ap.add_argument("--cutlass", action="store_true", help="tune the CUTLASS kernel's configurations")
    a = ap.parse_args()
    if a.cutlass and fp8_cutlass.library() is None:
        raise SystemExit(f"error: the CUTLASS kernel is unavailable: {fp8_cutlass.why_unavailable()}")
    candidates = ([(c, r, sw) for c in fp8_cutlass.CONFIGS for r in ("m", "n") for sw in (1, 2, 4)]
                  if a.cutlass else CANDIDATES)
    ceiling = _fp8_tflops()
    res = {"machine": machine_info(), "device": torch.cuda.get_device_name(0), "fp8_matmul_tflops": ceiling,
           "runs": []}
    print(f"fp8 matmul ceiling {ceiling:.0f} TFLOP/s")
    for name, (G, N, K) in SHAPES.items():
        w = torch.empty(G, N, K, dtype=k.FP8, device="cuda")
        ws = torch.empty(G, N // 128, K // 128, device="cuda")
        for g0 in range(0, G, 16):  # quantise in chunks: the fp32 staging stays small
            q, s = quantize_fp8_blockwise(torch.randn(min(16, G - g0), N, K, device="cuda") * 0.02)
            w[g0:g0 + 16], ws[g0:g0 + 16] = q, s
        for rows in [int(r) for r in a.rows.split(",")]:
            M = rows * G
            xq, xs = k.quantize_rows(torch.randn(M, K, device="cuda", dtype=torch.bfloat16))
            counts = torch.full((G,), rows, device="cuda")
            if a.multinomial:  # partial tiles, as real routing leaves them
                counts = torch.multinomial(torch.ones(G), M, replacement=True).bincount(minlength=G).cuda()
            best = None
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            for cfg in candidates:
                if a.cutlass:
                    def fn(cfg=cfg):
                        fp8_cutlass.grouped_gemm(xq, xs, w, ws, counts, out, None, *cfg)
                else:
                    def fn(cfg=cfg):
                        k.CONFIGS["short"] = k.CONFIGS["small"] = k.CONFIGS["large"] = cfg
                        k.grouped_gemm_fp8(xq, xs, w, ws, counts, out=out, kernel="triton")
                try:
                    t = time_cuda(fn, 2, 8)
                except Exception as e:  # e.g. out of shared memory
                    print(f"  {cfg}: {type(e).__name__}")
                    continue
                tf = 2.0 * M * N * K / t / 1e12
                res["runs"].append({"shape": name, "rows_per_expert": rows, "config": cfg, "tflops": tf,
                                    "multinomial": a.multinomial, "kernel": "cutlass" if a.cutlass else "triton"})
                if best is None or tf > best[1]:
                    best = (cfg, tf)
            print(f"{name:16s} rows/expert {rows:5d}: best {best[0]} {best[1]:.0f} TFLOP/s "
                  f"({best[1] / ceiling:.0%} of fp8 matmul)", flush=True)
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
