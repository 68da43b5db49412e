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

import numpy as np
import torch

from ..memory import param_breakdown
from ..memory import cache_bytes_per_token
from ..memory import FIT_HEADROOM
from .model import CostModel, expected_distinct, pack_steps

# A loadtest client's request reaches the server, and its first token the client, ~1.5 ms
# after it happens: the client TTFT exceeds the server's by 3 ms at concurrency 2
# (benchmarks/results/2026-11-29_serve_anatomy_h200).
CLIENT_DELAY_S = 0.0015
DECODE_LAYER_FLOOR_US = 265.0  # H200, CUDA graph, batch 1: (3.30 ms - 1.18 ms bytes) / 8 layers


def _non_expert_bytes_read(cfg, dense_dtype: str = "bf16") -> float:
    """Non-expert weights a decode step reads: all but the embedding table, of which only the
    batch's rows are touched (a tied lm_head is read in full as the head). In bf16, or with
    FP8 projections one byte per weight but the lm_head's (FP8 checkpoints keep it in bf16)."""
    head = cfg.vocab_size * cfg.hidden_size
    table = 0 if cfg.tie_word_embeddings else head
    rest = param_breakdown(cfg).non_expert - table - head
    return head * 2 + rest * (1 if dense_dtype == "fp8" else 2)


def decode_step_s(cm: CostModel, batch: int, context: int, gen_gpus: int = 1,
                  layer_floor_us: float = DECODE_LAYER_FLOOR_US) -> dict:
    """Seconds of one decode step per generation GPU, and its parts."""
    cfg, hw = cm.cfg, cm.hw
    nonexp = _non_expert_bytes_read(cfg, cm.dense_dtype)
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
    dense = 1 + 4 / 128**2 if cm.dense_dtype == "fp8" else 2  # FP8 projections: 1 byte + block scales
    weights = pb.non_expert_bytes(2, dense) + -(-cfg.num_experts // gen_gpus) * len(cfg.moe_layers) * cm.expert_bytes
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


def simulate_colocated(cm: CostModel, isl: int, osl: int, num_requests: int, concurrency: int,
                       max_batch: int = 64, mnt: int = 16384,
                       overhead: tuple[float, float, float] = (0.0, 0.0, 0.0),
                       client_delay_s: float = CLIENT_DELAY_S) -> dict:
    """`dwdp serve` on one GPU, prefill in the decode process, under `dwdp loadtest
    --max-concurrency C` (closed loop: at most C in flight, the next sent when one finishes;
    the client starts its first C one after another and each reaches the server
    ``client_delay_s`` after it is sent, as a token reaches the client that long after it is
    made: a finished request's successor arrives two crossings after its last token). The
    serving loop's own rule: at each iteration it
    admits what has arrived, runs one prefill step (FIFO, MNT tokens, chunked) when prompts
    wait, then one decode step over every running sequence (at most ``max_batch``); a
    prompt's first token comes with the end of its last prefill chunk, and an idle loop
    waits for the next arrival.

    Step times are the planner's (``step_dp``, :func:`decode_step_s`) plus the server's own
    work, ``overhead`` = (seconds per decode step, per running sequence in it, per prefill
    step): sampling, token events, the HTTP threads' streaming competing for the
    interpreter, the prefill scheduler and hand-off (:func:`fit_server_overhead` measures
    them). TTFT is measured as the client sees it. Returns the loadtest's metrics."""
    from ..engine import take_chunks

    for name, v in (("concurrency", concurrency), ("requests", num_requests), ("max batch", max_batch),
                    ("output tokens", osl), ("prompt tokens", isl), ("max num tokens", mnt)):
        if v < 1:
            raise ValueError(f"a served workload needs {name} >= 1, got {v}")
    sent = min(concurrency, num_requests)
    arrivals = [client_delay_s * (i + 1) for i in range(sent)]  # when each request reaches the server
    inbox = list(range(sent))  # sent, not yet admitted (in arrival order)
    prefill: list[list[int]] = []  # [request, prompt tokens done]
    waiting: list[int] = []  # prefilled, not yet in the decode batch
    running: dict[int, int] = {}  # request -> tokens emitted
    first, last, ttft = {}, {}, []
    t, done = 0.0, 0
    while done < num_requests:
        while inbox and arrivals[inbox[0]] <= t:
            prefill.append([inbox.pop(0), 0])
        if not prefill and not running and not waiting:
            t = arrivals[inbox[0]]  # idle until the next request arrives
            continue
        if prefill:
            takes = take_chunks([isl - d for _, d in prefill], mnt)
            t += cm.step_dp(takes, [d for _, d in prefill[:len(takes)]]) + overhead[2]
            for item, take in zip(prefill, takes):
                item[1] += take
            for r, _ in [it for it in prefill if it[1] >= isl]:
                first[r] = last[r] = t
                ttft.append(t - arrivals[r] + 2 * client_delay_s)
                waiting.append(r)
            prefill = [it for it in prefill if it[1] < isl]
        while waiting and len(running) < max_batch:
            running[waiting.pop(0)] = 1
        if running and any(n < osl for n in running.values()):
            ctx = isl + sum(running.values()) / len(running)
            t += decode_step_s(cm, len(running), ctx)["step_s"] + overhead[0] + overhead[1] * len(running)
            for r in running:
                if running[r] < osl:
                    running[r] += 1
                    last[r] = t
        for r in [r for r, n in running.items() if n >= osl]:  # the client sends its next request
            del running[r]
            done += 1
            if sent < num_requests:
                arrivals.append(t + 2 * client_delay_s)
                inbox.append(sent)
                sent += 1
    tpot = [(last[r] - first[r]) / (osl - 1) for r in first if osl > 1 and last[r] > first[r]]
    return {"tps_per_gpu": num_requests * osl / t, "tps_per_user": float(sum(1 / x for x in tpot) / len(tpot))
            if tpot else None, "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p90_s": float(np.percentile(ttft, 90)),
            "wall_s": t}


def fit_server_overhead(cm: CostModel, isl: int, osl: int, rows: list[dict], mnt: int = 16384
                        ) -> tuple[float, float, float]:
    """The server's own work from a `benchmarks/serve_anatomy.py` run's two lowest
    concurrencies (its /metrics step histograms beside the loadtest), where every running
    sequence decodes each step and a prompt is prefilled alone: (per decode step, per running
    sequence, per prefill step) seconds. The measured mean decode step minus the predicted
    one at two batches gives a line; the mean prefill step minus the predicted mean step of
    one prompt (its MNT chunks), the third. Nothing is fitted to TTFT or throughput."""
    lo = sorted(rows, key=lambda r: r["max_concurrency"])[:2]
    if len(lo) < 2 or lo[0]["max_concurrency"] == lo[1]["max_concurrency"] or \
            any(r.get("decode_step_mean_s") is None or r.get("prefill_step_mean_s") is None for r in lo):
        raise ValueError("fitting the server's overhead needs serve_anatomy rows (server step times) at two "
                         "concurrencies")
    ctx = isl + osl / 2
    (b1, e1), (b2, e2) = [(r["max_concurrency"], r["decode_step_mean_s"]
                           - decode_step_s(cm, r["max_concurrency"], ctx)["step_s"]) for r in lo]
    per_seq = max(0.0, (e2 - e1) / (b2 - b1))
    chunks = [cm.step_dp(seqs, prefix) for seqs, prefix in pack_steps([isl], mnt)]  # one prompt alone
    prefill = lo[0]["prefill_step_mean_s"] - sum(chunks) / len(chunks)
    return max(0.0, e1 - per_seq * b1), per_seq, max(0.0, prefill)
