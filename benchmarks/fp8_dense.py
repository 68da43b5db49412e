"""FP8 dense projections: block-scaled GEMM rates against torch's row-wise FP8 matmul.

For each projection shape of qwen3-235b-a22b and deepseek-v3 (merged as the engine runs
them: q|k|v, q_a|kv_a, gate|up) at --tokens rows: TFLOP/s of
- ``rowwise``: ``torch._scaled_mm`` with one scale per row / per column (the bar),
- ``blockwise_scaled_mm``: ``torch._scaled_mm``'s 1x128 x 128x128 recipe (where it runs),
- ``triton``: our block-scaled kernel (kernels/fp8_dense.py),
- ``bf16``: ``F.linear`` in bf16,
- ``fp8_linear``: the engine's whole FP8 projection (activation quantise + GEMM).
Median of --iters CUDA-event timings each. Writes JSON.

    python benchmarks/fp8_dense.py --tokens 8192,16384 --out fp8_dense.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from dwdp.ceilings import machine_info
from dwdp.kernels import fp8_dense
from dwdp.kernels.fp8_grouped import quantize_rows
from dwdp.models.layers import fp8_linear
from dwdp.quant import FP8, quantize_fp8_blockwise

SHAPES = {  # name: (N, K)
    "qwen3-235b-a22b": {"qkv": (9216, 4096), "o": (4096, 8192)},
    "deepseek-v3": {"q_a|kv_a": (2112, 7168), "q_a": (1536, 7168), "kv_a": (576, 7168), "q_b": (24576, 1536),
                    "kv_b": (32768, 512), "o": (7168, 16384), "gate|up": (36864, 7168), "down": (7168, 18432)},
}


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="8192,16384")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="fp8_dense.json")
    a = p.parse_args()
    dev = "cuda"
    rows = []
    for model, shapes in SHAPES.items():
        for name, (N, K) in shapes.items():
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
            wq, ws = quantize_fp8_blockwise(w)
            w_row = (w.float() / (w.float().abs().amax(1, keepdim=True) / 448)).to(FP8)
            ws_row = (w.float().abs().amax(1, keepdim=True) / 448).t().contiguous()  # [1, N]
            for M in (int(t) for t in a.tokens.split(",")):
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                xq, xs = quantize_rows(x)
                xs_row = (x.float().abs().amax(1, keepdim=True) / 448)  # [M, 1]
                xq_row = (x.float() / xs_row).to(FP8)
                flop = 2 * M * N * K
                r = {"model": model, "proj": name, "M": M, "N": N, "K": K}
                fns = {
                    "rowwise": lambda: torch._scaled_mm(xq_row, w_row.t(), scale_a=xs_row, scale_b=ws_row,
                                                        out_dtype=torch.bfloat16),
                    "blockwise_scaled_mm": lambda: fp8_dense.gemm_scaled_mm(xq, xs, wq, ws),
                    "triton": lambda: fp8_dense.gemm_triton(xq, xs, wq, ws),
                    "bf16": lambda: F.linear(x, w),
                    "fp8_linear": lambda: fp8_linear(x, wq, ws),
                }
                for k, fn in fns.items():
                    try:
                        r[f"{k}_tflops"] = round(flop / _time(fn, a.iters) / 1e12, 1)
                    except (RuntimeError, TypeError, ValueError) as e:
                        r[f"{k}_tflops"] = None
                        r[f"{k}_error"] = str(e).splitlines()[0][:200]
                if r.get("rowwise_tflops"):
                    best = max(v for v in (r.get("blockwise_scaled_mm_tflops"), r.get("triton_tflops")) if v) \
                        if (r.get("blockwise_scaled_mm_tflops") or r.get("triton_tflops")) else None
                    r["best_block_over_rowwise"] = round(best / r["rowwise_tflops"], 3) if best else None
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if not k.endswith("_error")}), flush=True)
    backend_ok = fp8_dense._scaled_mm_works(torch.device(dev))
    with open(a.out, "w") as f:
        json.dump({"machine": machine_info(), "torch": torch.__version__, "scaled_mm_blockwise_works": backend_ok,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
