"""One prefill step of real architectures' layers on one GPU with each CUDA attention
backend ("varlen": FlashAttention-2 varlen for every sequence; "auto": cuDNN for long
sequences without a prefix): step time, tokens/s, MFU against the same run's matmul.

    PYTHONPATH=src python benchmarks/attention_backends.py --out attn.json
"""

from __future__ import annotations

import argparse
import json

import torch

from dwdp.batch import PackedBatch
from dwdp.ceilings import machine_info, matmul_tflops, time_cuda
from dwdp.flops import prefill_flops
from dwdp.models import attention as A
from dwdp.models import build_model, init_random
from dwdp.presets import resolve_model


def _time_step(net, batch) -> float:
    with torch.no_grad():
        return time_cuda(lambda: net(batch), 2, 5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    res = {"machine": machine_info(), "device": torch.cuda.get_device_name(0), "matmul_tflops": matmul_tflops(),
           "steps": []}
    for model, layers in (("qwen3-235b-a22b", 8), ("deepseek-v3", 5)):
        cfg, _ = resolve_model(model, layers)
        net = init_random(build_model(cfg, torch.bfloat16, "cuda"), 0)
        for lens in ([2048] * 8, [4096] * 4, [8192, 6000, 2192], [16384]):
            batch = PackedBatch.from_sequences([[1] * n for n in lens], "cuda")
            batch.meta()
            fl = prefill_flops(cfg, lens)
            row = {"model": model, "layers": layers, "lengths": lens}
            for backend in ("varlen", "auto"):
                A.set_cuda_attention_backend(backend)
                s = _time_step(net, batch)
                row[backend] = {"seconds": s, "tokens_per_s": sum(lens) / s,
                                "mfu": fl.total / s / 1e12 / res["matmul_tflops"]}
            A.set_cuda_attention_backend("auto")
            row["speedup"] = row["varlen"]["seconds"] / row["auto"]["seconds"]
            res["steps"].append(row)
            print(f"{model} x{layers} {lens}: varlen {row['varlen']['seconds'] * 1e3:.1f} ms, cuDNN "
                  f"{row['auto']['seconds'] * 1e3:.1f} ms ({row['speedup']:.2f}x), attention share of FLOPs "
                  f"{fl.attention / fl.total:.0%}", flush=True)
        del net
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
