"""Decode step time on one GPU against its memory-bound limit, and the memory a
built replica takes against ``dwdp info``'s prediction.

For each model / expert dtype: build an N-layer replica with random weights, fill
``batch`` cache slots with ``context`` tokens each, and time whole engine steps (CUDA
graph replay + batched sampling + the one host sync) at several batch sizes. The limit
is the bytes a step must read (non-expert weights but the embedding table, the experts
the batch's routing touches, the lm_head, every sequence's KV) at the bandwidth of a
device-to-device copy measured in the same run. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dwdp.ceilings import copy_gbps, machine_info
from dwdp.timing import time_cuda
from dwdp.decode import DecodeEngine, DecodeRequest
from dwdp.memory import build_bytes
from dwdp.memory import cache_bytes_per_token
from dwdp.models import build_model, init_random
from dwdp.presets import resolve_model
from dwdp.sampling import SamplingParams


def _bytes_read(model, cfg, experts_touched: list[int], batch: int, context: int) -> dict:
    nonexp = 0
    for name, p in model.named_parameters():
        if ".experts." in name and ".shared_experts." not in name:
            continue
        if "embed_tokens" in name:
            nonexp += batch * p.shape[1] * p.element_size()  # only the batch's rows
            continue
        nonexp += p.numel() * p.element_size()
    ex = model.moe_blocks()[0].experts
    per_expert = sum(p[0].numel() * p.element_size() for p in ex.parameters())  # weights + block scales
    experts = sum(experts_touched) * per_expert
    kv = batch * context * cache_bytes_per_token(cfg, torch.bfloat16)
    return {"non_expert": nonexp, "experts": experts, "kv": kv, "total": nonexp + experts + kv,
            "experts_touched_per_layer": experts_touched}


def run_case(model_name: str, layers: int, expert_dtype: str, context: int, batches: list[int], copy_bw: float,
             steps: int, profile: bool = False, overlap: bool = True) -> dict:
    cfg, _ = resolve_model(model_name, layers)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build_model(cfg, torch.bfloat16, "cuda", expert_dtype=expert_dtype)
    built = torch.cuda.memory_allocated() - base
    init_random(model, 0)
    init_peak = torch.cuda.max_memory_allocated() - base
    predicted = build_bytes(cfg, torch.bfloat16, expert_dtype).total(cfg.num_experts)
    out = {"model": model_name, "layers": cfg.num_layers, "moe_layers": len(cfg.moe_layers),
           "expert_dtype": expert_dtype, "context": context, "overlap": overlap,
           "memory": {"predicted_bytes": predicted, "built_bytes": built, "init_peak_bytes": init_peak,
                      "built_over_predicted": built / predicted, "init_peak_over_predicted": init_peak / predicted}}
    B = max(batches)
    new_tokens = (len(batches) + 1) * (steps + 4) + 16  # more than the run takes
    eng = DecodeEngine(model, max_batch=B, max_context=context + new_tokens, overlap=overlap)
    out["cache_bytes"] = eng.cache.nbytes
    # One random prompt cache, copied into every slot (values do not change speed).
    g = torch.Generator(device="cuda").manual_seed(0)
    if cfg.is_mla:
        kv = [(torch.randn(context, cfg.kv_lora_rank, device="cuda", generator=g, dtype=torch.bfloat16),
               torch.randn(context, cfg.qk_rope_head_dim, device="cuda", generator=g, dtype=torch.bfloat16))
              for _ in range(cfg.num_layers)]
    else:
        shape = (context, cfg.num_kv_heads, cfg.head_dim)
        kv = [(torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16),
               torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)) for _ in range(cfg.num_layers)]
    ids = torch.randint(0, cfg.vocab_size, (B,), generator=torch.Generator().manual_seed(1)).tolist()
    for i in range(B):
        eng.add(DecodeRequest(i, list(kv), ids[i], SamplingParams(max_tokens=new_tokens), context))
    del kv
    t0 = time.perf_counter()
    eng.capture_graphs()
    out["graph_capture_s"] = time.perf_counter() - t0
    # Experts the routing touches: recorded on one eager forward at the full batch.
    touched: list[int] = []
    hooks = [b.gate.register_forward_hook(lambda m, a, o: touched.append(int(o[1].unique().numel())))
             for b in model.moe_blocks()]
    eng.use_graphs = False
    eng.step()
    for h in hooks:
        h.remove()
    eng.use_graphs = True
    rows = []
    for b in sorted(batches, reverse=True):
        if len(eng.active) > b:
            eng.cancel([a.req.id for a in eng.active[b:]])
        for _ in range(3):
            eng.step()
        torch.cuda.synchronize()
        t = []
        for _ in range(steps):
            s = time.perf_counter()
            eng.step()  # includes sampling and the host read-back (of the step before, when overlapped)
            t.append(time.perf_counter() - s)
        t.sort()
        step_s = t[len(t) // 2]
        inp = eng._static
        graph_s = time_cuda(lambda: eng._graphs[next(k for k in sorted(eng._graphs) if k >= b)][0].replay(),
                            warmup=2, iters=steps)
        eng.use_graphs = False
        eager_s = time_cuda(lambda: model.decode(inp[0, :b], inp[1, :b], inp[2, :b], eng.cache.layers),
                            warmup=2, iters=max(5, steps // 4))
        eng.use_graphs = True
        ctx_now = eng.active[0].length
        by = _bytes_read(model, cfg, touched if b == B else _expected_touched(cfg, b), b, ctx_now)
        limit = by["total"] / (copy_bw * 1e9)
        rows.append({"batch": b, "context": ctx_now, "step_s_median": step_s, "step_s_min": t[0], "step_s_max": t[-1],
                     "graph_replay_s": graph_s, "eager_forward_s": eager_s, "bytes": by, "memory_bound_s": limit,
                     "step_over_limit": step_s / limit, "tokens_per_s": b / step_s, "tokens_per_s_per_user": 1 / step_s})
        print(f"{model_name} L{cfg.num_layers} {expert_dtype} overlap {int(overlap)} batch {b} ctx {ctx_now}: step {step_s * 1e3:.2f} ms "
              f"(graph {graph_s * 1e3:.2f}, eager {eager_s * 1e3:.2f}); limit {limit * 1e3:.2f} ms -> "
              f"{step_s / limit:.2f}x", flush=True)
    out["rows"] = rows
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        inp = eng._static
        b = len(eng.active)
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                model.decode(inp[0, :b], inp[1, :b], inp[2, :b], eng.cache.layers)
            torch.cuda.synchronize()
        table = p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
        print(table, flush=True)
        out["profile_top"] = table
    out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    return out  # the model and cache are freed with this frame


def _expected_touched(cfg, batch: int) -> list[int]:
    """Distinct experts a batch of uniformly routed tokens touches (smaller batches)."""
    E, k = cfg.num_experts, cfg.top_k
    return [round(E * (1 - (1 - k / E) ** batch))] * len(cfg.moe_layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", required=True, help="model:layers:expert_dtype, e.g. qwen3-235b:8:same")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batches", default="64,32,16,4,1")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", action="store_true", help="print the top kernels of 3 eager steps at the smallest batch")
    ap.add_argument("--overlap", default="on", choices=["on", "off", "both"],
                    help="decode steps overlapped with the host's work (the engine's default), one at a time, or both")
    a = ap.parse_args()
    bw = copy_gbps()
    res = {"machine": machine_info(), "copy_gbps": bw, "cases": []}
    print(f"device copy: {bw:.0f} GB/s (read + write)", flush=True)
    for c in a.case:
        name, layers, edt = c.split(":")
        for overlap in {"on": [True], "off": [False], "both": [False, True]}[a.overlap]:
            res["cases"].append(run_case(name, int(layers), edt, a.context, [int(x) for x in a.batches.split(",")],
                                         bw, a.steps, a.profile, overlap))
        torch.cuda.empty_cache()
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
