"""Each CUDA attention backend ("varlen": FlashAttention-2 varlen for every sequence;
"auto": cuDNN for long sequences, a chunk with a cached prefix as two merged calls) on one
GPU: one prefill step of real architectures' layers (step time, tokens/s, MFU against the
same run's matmul), and the attention alone on chunked-prefill batches (chunks with prefixes).

    PYTHONPATH=src python benchmarks/attention_backends.py --out attn.json
"""

from __future__ import annotations

import argparse
import json

import torch

from dwdp.batch import PackedBatch
from dwdp.ceilings import machine_info, matmul_tflops
from dwdp.timing import time_cuda
from dwdp.flops import prefill_flops
from dwdp.models import attention as A
from dwdp.models import build_model, init_random
from dwdp.presets import resolve_model


def _time_step(net, batch) -> float:
    with torch.no_grad():
        return time_cuda(lambda: net(batch), 2, 5)


def chunked(kind: str, seqs: list[tuple[int, int]]) -> dict:
    """(new tokens, cached prefix) per sequence, packed as the engine packs them."""
    hq, hkv, d, dv = (64, 4, 128, 128) if kind == "gqa" else (128, 128, 192, 128)
    cu_q, cu_k = [0], [0]
    for n, p in seqs:
        cu_q.append(cu_q[-1] + n)
        cu_k.append(cu_k[-1] + n + p)
    q = torch.randn(cu_q[-1], hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(cu_k[-1], hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(cu_k[-1], hkv, dv, device="cuda", dtype=torch.bfloat16)
    dq = torch.tensor(cu_q, dtype=torch.int32, device="cuda")
    dk = torch.tensor(cu_k, dtype=torch.int32, device="cuda")
    flops = sum(2.0 * (n * p + n * (n + 1) / 2) * hq * (d + dv) for n, p in seqs)
    row = {"kind": kind, "seqs": seqs}
    for backend in ("varlen", "auto"):
        A.set_cuda_attention_backend(backend)
        s = time_cuda(lambda: A.packed_causal_attention(q, k, v, cu_q, cu_k, d**-0.5, dq, dk))
        row[backend] = {"seconds": s, "tflops": flops / s / 1e12}
    A.set_cuda_attention_backend("auto")
    return row


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
    res["chunked"] = []
    for kind in ("gqa", "mla"):
        for seqs in ([(8192, 8192)], [(4096, 12288), (4096, 0)], [(5000, 3192), (8192, 0), (3192, 0)],
                     [(2048, 6144)] * 4):
            r = chunked(kind, seqs)
            res["chunked"].append(r)
            print(f"attention {kind} (new, prefix) {seqs}: varlen {r['varlen']['tflops']:.0f}, auto "
                  f"{r['auto']['tflops']:.0f} TFLOP/s", flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
