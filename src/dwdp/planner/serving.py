"""Disaggregated serving end to end: decode step time, and the frontier of output
tokens/s per GPU against tokens/s per user for a context/generation GPU split.

Decode step (one token for each of ``batch`` sequences of ``context`` tokens) on a
generation group of ``gen_gpus`` GPUs running attention data parallelism + expert
parallelism (each GPU holds E/G experts, ``batch`` sequences of its own): the bytes each
GPU must read (its non-expert weights except the embedding table, the experts the whole
group's batch routes to among its own, its sequences' KV) at the achievable HBM rate, plus
a per-layer launch floor (a decode step is many tiny kernels even as one CUDA graph:
measured 0.27 ms per layer on H200, `benchmarks/decode_gpu.py`), plus two all-to-all
latencies per MoE layer when G > 1.

Frontier: for a target per-user speed u, the decode step may last 1/u; the largest
batch that fits gives the generation throughput per GPU, B x u. Each request also needs
ISL prefill tokens: context GPUs per generation GPU = (B u / OSL) x ISL / (context tokens/s
per GPU, from the prefill prediction of the context strategy). Output tokens/s per GPU =
B u / (1 + that ratio): the split the planner recommends for u.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..info import param_breakdown
from ..kv_cache import cache_bytes_per_token
from ..parallel.replica import FIT_HEADROOM
from .model import CostModel, expected_distinct

DECODE_LAYER_FLOOR_US = 265.0  # H200, CUDA graph, batch 1: (3.30 ms - 1.18 ms bytes) / 8 layers


def _non_expert_bytes_read(cfg) -> float:
    """Non-expert weights a decode step reads (bf16): all but the embedding table, of
    which only the batch's rows are touched (a tied lm_head is read in full as the head)."""
    table = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return (param_breakdown(cfg).non_expert - table) * 2


def decode_step_s(cm: CostModel, batch: int, context: int, gen_gpus: int = 1,
                  layer_floor_us: float = DECODE_LAYER_FLOOR_US) -> dict:
    """Seconds of one decode step per generation GPU, and its parts."""
    cfg, hw = cm.cfg, cm.hw
    nonexp = _non_expert_bytes_read(cfg)
    held = -(-cfg.num_experts // gen_gpus)
    picks = batch * gen_gpus * cfg.top_k * held / cfg.num_experts  # this GPU's share of the group's choices
    experts = expected_distinct(held, picks) * cm.expert_bytes * len(cfg.moe_layers)
    kv = batch * context * cache_bytes_per_token(cfg, torch.bfloat16)
    rate = hw.hbm_eff * hw.hbm_gbps * 1e9
    # Attention reads the KV once for all query heads of a KV head, but absorbed MLA does
    # (latent + rope + latent) x 128 heads of FLOPs per cached token: compute-bound at batch.
    dk = (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.kv_lora_rank) if cfg.is_mla else 2 * cfg.head_dim
    attn_flops = 2.0 * batch * context * cfg.num_heads * dk * cfg.num_layers
    eff = hw.decode_attn_eff if hw.decode_attn_eff is not None else hw.attn_eff
    attn = max(kv / rate, attn_flops / (eff * hw.bf16_tflops * 1e12))
    a2a = 2 * len(cfg.moe_layers) * hw.a2a_latency_us * 1e-6 if gen_gpus > 1 else 0.0
    floor = cfg.num_layers * layer_floor_us * 1e-6
    t = (nonexp + experts) / rate + attn + floor + a2a
    return {"step_s": t, "bytes": nonexp + experts + kv, "floor_s": floor, "a2a_s": a2a, "kv_bytes": kv,
            "attention_s": attn}


@dataclass
class FrontierPoint:
    tps_user: float
    batch: int  # sequences per generation GPU
    step_s: float
    gen_tps_per_gpu: float
    ctx_gpus_per_gen_gpu: float
    tps_per_gpu: float  # output tokens/s over all GPUs (context + generation)


def max_batch_in_memory(cm: CostModel, isl: int, osl: int, gen_gpus: int) -> int:
    """Sequences of ISL + OSL tokens one generation GPU can hold next to its weights
    (non-expert weights + E/G experts per MoE layer), within FIT_HEADROOM (92%) of its memory."""
    cfg = cm.cfg
    pb = param_breakdown(cfg)
    weights = pb.non_expert * 2 + -(-cfg.num_experts // gen_gpus) * len(cfg.moe_layers) * cm.expert_bytes
    free = FIT_HEADROOM * cm.hw.memory_gib * 2**30 - weights
    return max(0, int(free // ((isl + osl) * cache_bytes_per_token(cfg, torch.bfloat16))))


def frontier(cm: CostModel, ctx_tps_per_gpu: float, isl: int, osl: int, targets: list[float],
             gen_gpus: int = 1, max_batch: int = 1024) -> list[FrontierPoint]:
    """One point per target tokens/s per user that batch 1 can reach; the batch is also
    capped by what fits in a generation GPU's memory."""
    context = isl + osl // 2  # a sequence's mean length over its decode
    max_batch = min(max_batch, max_batch_in_memory(cm, isl, osl, gen_gpus))
    out = []
    for u in targets:
        budget = 1.0 / u
        lo, hi = 0, max_batch
        while lo < hi:  # the largest batch whose step fits the budget (step time grows with batch)
            mid = (lo + hi + 1) // 2
            if decode_step_s(cm, mid, context, gen_gpus)["step_s"] <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            continue
        step = decode_step_s(cm, lo, context, gen_gpus)["step_s"]
        gen = lo / step
        ratio = gen * isl / osl / ctx_tps_per_gpu
        out.append(FrontierPoint(1 / step, lo, step, gen, ratio, gen / (1 + ratio)))
    return out
