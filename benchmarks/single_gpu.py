"""One GPU: ceilings, bf16 correctness against the CPU fp32 reference, attention backends,
and packed-prefill throughput / MFU for a real model shape. Writes JSON to --out."""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from dwdp.batch import PackedBatch
from dwdp.ceilings import copy_gbps, machine_info, matmul_tflops, time_cuda
from dwdp.flops import prefill_flops
from dwdp.models import attention as attn_mod
from dwdp.models import build_model, init_random
from dwdp.presets import resolve_model


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def correctness(model_name: str, layers: int, lengths: list[int]) -> dict:
    """Same weights (drawn on the CPU) in fp32 on the CPU and bf16 on the GPU."""
    cfg, _ = resolve_model(model_name, layers)
    cpu = init_random(build_model(cfg, torch.float32, "cpu"), 0)
    gpu = build_model(cfg, torch.bfloat16, "cuda")
    gpu.load_state_dict({k: v for k, v in cpu.state_dict().items()}, strict=False)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    ref = cpu(PackedBatch.from_sequences(seqs)).logits
    out = {}
    for backend in ("varlen", "sdpa"):
        attn_mod.set_cuda_attention_backend(backend if backend == "sdpa" else "auto")
        got = gpu(PackedBatch.from_sequences(seqs, "cuda")).logits.cpu()
        out[backend] = {"rel_err": rel(got, ref), "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
    attn_mod.set_cuda_attention_backend("auto")
    return {"model": model_name, "layers": layers, "lengths": lengths, **out}


def throughput(model_name: str, layers: int | None, lengths: list[int], peak_tflops: float) -> dict:
    cfg, _ = resolve_model(model_name, layers)
    model = init_random(build_model(cfg, torch.bfloat16, "cuda"), 0)
    g = torch.Generator().manual_seed(1)
    batch = PackedBatch.from_sequences([torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths], "cuda")
    res = {"model": model_name, "layers": cfg.num_layers, "lengths": lengths, "tokens": batch.num_tokens}
    fl = prefill_flops(cfg, lengths)
    for backend in ("auto", "sdpa"):
        attn_mod.set_cuda_attention_backend(backend)
        t = time_cuda(lambda: model(batch), warmup=2, iters=5)
        res[backend] = {"seconds": t, "tokens_per_s": batch.num_tokens / t, "tflops": fl.total / t / 1e12,
                        "mfu": fl.total / t / 1e12 / peak_tflops}
    attn_mod.set_cuda_attention_backend("auto")
    res["flops"] = {"dense": fl.dense, "attention": fl.attention, "experts": fl.experts}
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=None, help="truncate the throughput model")
    args = ap.parse_args()
    r = {"machine": machine_info(), "what": "single_gpu"}
    try:
        from torch.nn.attention.varlen import varlen_attn
        import inspect
        r["varlen_signature"] = str(inspect.signature(varlen_attn))
    except Exception as e:
        r["varlen_signature"] = repr(e)
    r["ceilings"] = {"matmul_bf16_tflops": matmul_tflops(), "copy_gbps": copy_gbps()}
    print(json.dumps(r, indent=1), flush=True)
    for name, fn in [
        ("correct_qwen3_30b_2l", lambda: correctness("qwen3-30b-a3b", 2, [37, 300, 1, 700])),
        ("correct_dsv3_tiny", lambda: correctness("tiny-deepseek-v3", None, [37, 300, 1, 700])),
        ("correct_dsv2lite_2l", lambda: correctness("deepseek-v2-lite", 2, [37, 300, 5])),
        ("tput_qwen3_30b_16k_4x4096", lambda: throughput("qwen3-30b-a3b", args.layers, [4096] * 4,
                                                         r["ceilings"]["matmul_bf16_tflops"])),
        ("tput_qwen3_30b_16k_1x16384", lambda: throughput("qwen3-30b-a3b", args.layers, [16384],
                                                          r["ceilings"]["matmul_bf16_tflops"])),
    ]:
        t0 = time.time()
        try:
            r[name] = fn()
        except Exception as e:
            r[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        r[name]["wall_s"] = time.time() - t0
        print(name, json.dumps(r[name])[:600], flush=True)
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
