"""The planner's performance model: step times of dp, dep and dwdp from FLOPs and bytes.

The primitives every strategy's cost is built from; each strategy's description
(:mod:`dwdp.strategy`) assembles its own prediction from them, and
:func:`dwdp.planner.plan.predict` asks the right description.

Per layer and per rank step (sequences with their cached prefixes):

* compute = GEMM FLOPs / (gemm_eff x peak) + attention FLOPs / (attn_eff x peak)
  + the elementwise activation bytes the engine's kernels move (counted per token and
  layer) / achievable HBM + a fixed per-layer overhead; a routed-expert GEMM never runs
  faster than reading the experts it touches from HBM.
* dwdp: the copy stream pulls each MoE layer's (E - L) remote experts one layer ahead (the
  first at step start); a MoE layer's remote experts wait for their pull, so the step is
  the critical path of that two-stream pipeline; compute is slowed by ``interference``
  while pulls are in flight.
* dep: ranks step in lockstep and every MoE layer has two barriers: the dispatch waits for
  every rank's attention (from the actual lengths in each rank's step), the combine for
  every EP rank's experts (each layer's routing drawn from the router distribution:
  multinomial over experts, Zipf skew as a parameter), each barrier for the expected
  slowest rank with compute noise; + dispatch and combine all-to-alls.
* dp: compute only.

Pull bandwidth: a measured all-peer ingress when the profile has one; the DWDP authors'
contention model (each pull meets Binomial(N-2, 1/(N-1)) competitors at its source) for
unsliced whole-block pulls, or the link rate for the sliced round-robin plan.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import ModelConfig
from ..engine import take_chunks
from ..flops import attention_proj_params
from ..quant import bytes_per_expert_weight
from ..strategy.placement import Placement
from ..strategy.wire import expected_dest_ranks, fp8_wire, wire_row_bytes
from .hardware import HardwareProfile

EXPERT_BYTES = {fmt: bytes_per_expert_weight(fmt) for fmt in ("bf16", "fp8", "fp4")}  # block scales included


@dataclass
class LayerWork:
    gemm_flops: float  # projections, dense MLP / shared experts, router
    attn_flops: float
    expert_flops: float  # routed experts, all of this rank's tokens
    tokens: int
    is_moe: bool
    glue_bytes: float = 0.0  # elementwise traffic: norms, residuals, rope, permute, SwiGLU, combine


def glue_elements_per_token(cfg: ModelConfig, is_moe: bool) -> float:
    """Activation elements one token reads + writes per layer outside GEMMs and attention,
    counted from the engine's kernels: two RMSNorms and two residual adds (3 x hidden each,
    read + write), rope and the q/k/v hand-offs (3 x the projected width), and in a MoE
    layer the permute (read + write top_k rows), the fused SwiGLU (read 2 x inter, write
    inter per pair) and the one-pass combine (read top_k rows, write one)."""
    H = cfg.hidden_size
    qkv = (cfg.num_heads * cfg.qk_head_dim + 2 * cfg.num_kv_heads * cfg.qk_head_dim) if not cfg.is_mla else \
        (cfg.num_heads * cfg.qk_head_dim + cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    n = 2 * 2 * H + 2 * 3 * H + 3 * qkv
    if is_moe:
        K, inter = cfg.top_k, cfg.moe_intermediate_size
        n += 2 * K * H + 3 * K * inter + K * H + H
    return n


def layer_work(cfg: ModelConfig, layer: int, seq_lens: list[int], prefix_lens: list[int]) -> LayerWork:
    return _layer_work(cfg, layer in set(cfg.moe_layers), tuple(seq_lens), tuple(prefix_lens))


@functools.lru_cache(maxsize=65536)
def _layer_work(cfg: ModelConfig, is_moe: bool, seq_lens: tuple, prefix_lens: tuple) -> LayerWork:
    T = sum(seq_lens)
    H = cfg.hidden_size
    gemm = attention_proj_params(cfg)
    if is_moe:
        gemm += 3 * H * cfg.moe_intermediate_size * cfg.n_shared_experts + H * cfg.num_experts
    else:
        gemm += 3 * H * cfg.intermediate_size
    pairs = sum(p * n + n * (n + 1) / 2 for p, n in zip(prefix_lens, seq_lens))
    d_v = cfg.v_head_dim if cfg.is_mla else cfg.head_dim
    attn = 2.0 * pairs * cfg.num_heads * (cfg.qk_head_dim + d_v)
    experts = 2.0 * T * cfg.top_k * 3 * H * cfg.moe_intermediate_size if is_moe else 0.0
    return LayerWork(2.0 * T * gemm, attn, experts, T, is_moe, T * glue_elements_per_token(cfg, is_moe))


def expected_distinct(num_experts: int, draws: float) -> float:
    """Experts touched by ``draws`` uniform routing choices (bounds the weight bytes read)."""
    return num_experts * (1 - (1 - 1 / num_experts) ** draws)


def zipf_shares(num_experts: int, s: float) -> np.ndarray:
    w = np.arange(1, num_experts + 1, dtype=float) ** -s
    return w / w.sum()


class CostModel:
    def __init__(self, cfg: ModelConfig, hw: HardwareProfile, expert_dtype: str = "bf16", act_bytes: int = 2,
                 dense_dtype: str = "bf16"):
        if expert_dtype not in EXPERT_BYTES:
            raise ValueError(f"unknown expert dtype {expert_dtype!r}; choose from {', '.join(EXPERT_BYTES)}")
        if dense_dtype not in ("bf16", "fp8"):
            raise ValueError(f"unknown dense dtype {dense_dtype!r}; choose bf16 or fp8")
        self.cfg, self.hw = cfg, hw
        self.expert_dtype, self.dense_dtype = expert_dtype, dense_dtype
        self.expert_bytes = cfg.expert_numel() * EXPERT_BYTES[expert_dtype]
        self.act_bytes = act_bytes
        # DEP's dispatch row (FP8 on the wire with FP8/FP4 experts: `--dep-wire auto`) + its combine row.
        fp8 = fp8_wire("auto", expert_dtype != "bf16", cfg.hidden_size, cfg.moe_intermediate_size)
        self.dep_row_bytes = wire_row_bytes(cfg.hidden_size, max(cfg.top_k, 1), fp8) + cfg.hidden_size * act_bytes
        # FP4 experts run at the FP4 peak where the GPU has FP4 tensor cores (Blackwell);
        # elsewhere they are widened and run at the FP8 rate.
        expert_peak = {"bf16": hw.bf16_tflops, "fp8": hw.fp8_tflops,
                       "fp4": hw.fp4_tflops or hw.fp8_tflops}[expert_dtype]
        # Dense projections in FP8 (DeepSeek's checkpoints store them so and vendor engines run
        # them so; this engine computes them in bf16).
        fp8_dense = hw.fp8_dense_eff if hw.fp8_dense_eff is not None else (hw.fp8_gemm_eff or hw.gemm_eff)
        self.gemm_rate = (fp8_dense * hw.fp8_tflops if dense_dtype == "fp8" else hw.gemm_eff * hw.bf16_tflops) * 1e12
        low_precision = expert_dtype != "bf16" and hw.fp8_gemm_eff is not None
        self.expert_rate = (hw.fp8_gemm_eff if low_precision else hw.gemm_eff) * expert_peak * 1e12
        self.attn_rate = hw.attn_eff * hw.bf16_tflops * 1e12
        self.hbm_rate = hw.hbm_eff * hw.hbm_gbps * 1e9

    # -- per layer ----------------------------------------------------------------------
    def dense_kinds(self, w: LayerWork) -> dict[str, float]:
        """Attention + projections + glue of one layer on one rank (no routed experts), in
        seconds by kind of work: gemm, attn, hbm (elementwise glue), host (launches)."""
        if w.tokens == 0:
            return {}
        return {"gemm": w.gemm_flops / self.gemm_rate, "attn": w.attn_flops / self.attn_rate,
                "hbm": (w.glue_bytes * self.act_bytes + w.tokens * self.hw.bytes_per_token_layer) / self.hbm_rate,
                "host": self.hw.layer_overhead_us * 1e-6}

    def dense_part(self, w: LayerWork) -> float:
        return sum(self.dense_kinds(w).values())

    def experts_kinds(self, tokens_k: float, experts_held: int) -> dict[str, float]:
        """Routed experts over ``tokens_k`` (token, expert) pairs spread over ``experts_held``:
        FLOP-bound (experts) or weight-read-bound (hbm), whichever takes longer."""
        if tokens_k <= 0:
            return {}
        flops = 2.0 * tokens_k * 3 * self.cfg.hidden_size * self.cfg.moe_intermediate_size
        touched = expected_distinct(experts_held, tokens_k) * self.expert_bytes
        g, h = flops / self.expert_rate, touched / self.hbm_rate
        return {"experts": g} if g >= h else {"hbm": h}

    def experts_part(self, tokens_k: float, experts_held: int) -> float:
        return sum(self.experts_kinds(tokens_k, experts_held).values())

    def slowdown(self, kinds: dict[str, float]) -> float:
        """Factor on ``kinds``' time while pulls run beside it: per kind of work when the
        profile measured it (calibrate), else the one ``interference`` on everything."""
        hw = self.hw
        per = {"gemm": hw.interference_gemm, "experts": hw.interference_experts, "attn": hw.interference_attn,
               "hbm": hw.interference_hbm}
        total = sum(kinds.values())
        if all(v is None for v in per.values()) or total <= 0:
            return 1.0 + hw.interference
        slowed = sum(t * (1.0 + ((hw.interference if per[k] is None else per[k]) if k in per else 0.0))
                     for k, t in kinds.items())
        return slowed / total

    # -- pulls --------------------------------------------------------------------------
    def pull_gbps(self, n: int, sliced: bool = False) -> float:
        """Per-rank ingress while every rank pulls (measured, or the contention model)."""
        hw = self.hw
        if n <= 2:
            return hw.pull_single_gbps
        if hw.source.startswith("measured"):
            return hw.pull_all_gbps
        if sliced:
            return min(hw.pull_all_gbps, hw.pull_single_gbps)
        return hw.pull_single_gbps / expected_contention(n)

    def pull_seconds(self, placement: Placement, sliced: bool = False, beside: dict[str, float] | None = None) -> float:
        """One layer's pull; ``beside``: seconds by kind of the compute it runs next to (the
        rate ``dwdp calibrate`` measured under each kind, time-weighted), None: alone."""
        rate = self.pull_gbps(placement.group_size, sliced)
        under = self.hw.pull_under_gbps
        if beside and under and placement.group_size > 1:
            names = {"gemm": "gemm", "experts": "experts", "hbm": "hbm", "attn": "attention"}
            timed = {k: t for k, t in beside.items() if k in names and t > 0}
            total = sum(timed.values())
            if total > 0:  # bytes moved beside each kind over the time it runs: the time-weighted mean rate
                rate = sum(t * under.get(names[k], rate) for k, t in timed.items()) / total
        return placement.remote * self.expert_bytes / (rate * 1e9)

    def step_pull_seconds(self, seq_lens, prefix_lens, placement: Placement, sliced: bool = False
                          ) -> tuple[float, float]:
        """(beside compute, alone): one layer's pull during a step of these sequences. A pull
        runs beside a MoE layer's compute (its experts, the next attention) and alone while
        the compute stream waits for it: two rates where calibrate measured both."""
        cfg = self.cfg
        if not placement.remote or not cfg.moe_layers:
            return 0.0, 0.0
        w = layer_work(cfg, cfg.moe_layers[0], seq_lens, prefix_lens)
        beside = dict(self.dense_kinds(w))
        for k, v in self.experts_kinds(w.tokens * cfg.top_k, cfg.num_experts).items():
            beside[k] = beside.get(k, 0.0) + v
        return self.pull_seconds(placement, sliced, beside), self.pull_seconds(placement, sliced)

    # -- one step per strategy -------------------------------------------------------------
    def step_dp(self, seq_lens, prefix_lens) -> float:
        cfg = self.cfg
        n_moe = len(cfg.moe_layers)
        t = 0.0
        for is_moe, count in ((True, n_moe), (False, cfg.num_layers - n_moe)):
            if count:
                w = _layer_work(cfg, is_moe, tuple(seq_lens), tuple(prefix_lens))
                t += count * (self.dense_part(w) + (self.experts_part(w.tokens * cfg.top_k, cfg.num_experts)
                                                    if is_moe else 0.0))
        return t

    def step_dwdp(self, seq_lens, prefix_lens, placement: Placement, sliced: bool = False) -> tuple[float, float]:
        """(step seconds, exposed pull wait) for one rank's step."""
        cfg = self.cfg
        local_share = placement.local / cfg.num_experts
        pull, alone = self.step_pull_seconds(seq_lens, prefix_lens, placement, sliced)
        moe_layers = cfg.moe_layers
        t, copy_free, waited = 0.0, 0.0, 0.0
        pull_end: dict[int, float] = {}
        if moe_layers and pull:
            pull_end[0] = copy_free = pull  # primed at step start
        m = 0

        def run(t0: float, kinds: dict[str, float]) -> float:
            """Finish time of compute ``kinds`` (seconds by kind) started at t0; slowed while pulls run."""
            work, slow = sum(kinds.values()), self.slowdown(kinds)
            overlap = max(0.0, copy_free - t0)
            if work * slow <= overlap:
                return t0 + work * slow
            return t0 + overlap + (work - overlap / slow)

        for layer in range(cfg.num_layers):
            w = layer_work(cfg, layer, seq_lens, prefix_lens)
            t = run(t, self.dense_kinds(w))
            if not w.is_moe:
                continue
            if pull and m + 1 < len(moe_layers):
                start = max(t, copy_free)
                pull_end[m + 1] = copy_free = start + pull
            tk = w.tokens * cfg.top_k
            t = run(t, self.experts_kinds(tk * local_share, placement.local))
            if pull:
                ready = pull_end[m]
                if ready > t:
                    # The rest of the pull runs alone (faster where calibrate measured both),
                    # and the next pull, queued behind it, starts that much sooner.
                    early = max(0.0, (ready - t) * (1.0 - alone / pull))
                    pull_end[m] = ready = ready - early
                    if m + 1 in pull_end:
                        pull_end[m + 1] -= early
                        copy_free = pull_end[m + 1]
                    else:
                        copy_free = ready
                    waited += ready - t
                    t = ready
            # The next layer's pull may still be running: remote experts are slowed too.
            t = run(t, self.experts_kinds(tk * (1 - local_share), cfg.num_experts - placement.local))
            m += 1
        return t, waited

    def dep_experts(self, works: list[LayerWork], loads: np.ndarray, n: int) -> tuple[list[float], float]:
        """(each EP rank's expert seconds, dispatch + combine all-to-all seconds) of one
        lockstep MoE layer over ``n`` ranks; ``loads[r]``: (token, expert) pairs EP rank r
        computes in this layer."""
        cfg = self.cfg
        held = math.ceil(cfg.num_experts / n)
        expert = [self.experts_part(float(load), held) for load in loads]
        # Each token goes once to every rank holding one of its k experts (its row as the
        # wire lays it out: FP8 + scales when experts are FP8), and comes back in bf16.
        max_tokens = max(w.tokens for w in works)
        per_rank = max_tokens * expected_dest_ranks(cfg, n) * (n - 1) / n * self.dep_row_bytes
        a2a = per_rank / (self.hw.a2a_gbps * 1e9) + 4 * self.hw.a2a_latency_us * 1e-6 if n > 1 else 0.0
        return expert, a2a


def expected_contention(n: int) -> float:
    """E[1 + C] with C ~ Binomial(N-2, 1/(N-1)): other ranks pulling from the same source."""
    return 1.0 + (n - 2) / (n - 1)


def expert_popularity(num_experts: int, skew: float, seed: int = 0) -> np.ndarray:
    """Probability that a routing choice picks each expert: Zipf(``skew``) over a seeded
    random expert order (as ``--skew`` biases the router in ``dwdp bench``)."""
    probs = zipf_shares(num_experts, skew)
    order = np.random.default_rng(seed).permutation(num_experts)
    per_expert = np.empty(num_experts)
    per_expert[order] = probs
    return per_expert


def ep_rank_shares(num_experts: int, n: int, skew: float, seed: int = 0) -> np.ndarray:
    """Expected share of routed pairs each EP rank serves (contiguous E/n expert ranges)."""
    per_expert = expert_popularity(num_experts, skew, seed)
    bounds = [r * num_experts // n for r in range(n + 1)]
    return np.array([per_expert[bounds[r]:bounds[r + 1]].sum() for r in range(n)])


def draw_ep_loads(rng: np.random.Generator, pairs: int, per_expert: np.ndarray, n: int) -> np.ndarray:
    """One layer's routing drawn from the router's distribution: ``pairs`` (token, expert)
    choices, multinomial over experts, summed per EP rank. The lockstep layer then waits
    for the most loaded rank: imbalance from sampling, not only from the mean skew."""
    counts = rng.multinomial(pairs, per_expert)
    bounds = [r * len(per_expert) // n for r in range(n + 1)]
    return np.array([counts[bounds[r]:bounds[r + 1]].sum() for r in range(n)], dtype=float)


def router_logit_std(cfg: ModelConfig) -> float:
    """Spread of the bench's random router logits: weights of std 0.02 (``init_random``) on
    the unit-RMS normed hidden state, 0.02 * sqrt(hidden)."""
    return 0.02 * math.sqrt(cfg.hidden_size)


@functools.lru_cache(maxsize=1024)
def topk_popularity(num_experts: int, top_k: int, skew: float, logit_std: float, layer: int, seed: int = 0,
                    tokens: int = 4096) -> tuple[float, ...]:
    """Share of routed pairs each expert gets under ``dwdp bench --skew``, as the engine does
    it: the top k of (router logits + the Zipf bias of :func:`dwdp.workload.zipf_router_bias`,
    the same seeded ranking per layer), logits drawn N(0, ``logit_std``). Milder than Zipf
    shares: a top-k choice caps how much the hottest experts can take (skew 1.0, qwen3-235b
    shape, 4 ranks: the hot rank serves 34% of the pairs, not Zipf's 38.5%). Group-limited
    routing (DeepSeek-V3) is approximated by plain top-k."""
    from ..workload import zipf_router_bias

    bias = zipf_router_bias(num_experts, skew, seed, layer).numpy().astype(np.float64)
    rng = np.random.default_rng(10_007 + layer)
    logits = rng.standard_normal((tokens, num_experts)) * logit_std + bias
    top = np.argpartition(-logits, top_k - 1, axis=1)[:, :top_k]
    counts = np.bincount(top.ravel(), minlength=num_experts).astype(np.float64)
    return tuple(counts / counts.sum())


class DEPRouting:
    """Per-layer routing draws for one DEP prediction (a seeded stream). With skew, each MoE
    layer's expert shares are the engine's (:func:`topk_popularity`, that layer's ranking)."""

    def __init__(self, cfg: ModelConfig, n: int, skew: float, seed: int = 0):
        self.n, self.skew, self.seed = n, skew, seed
        self.top_k, self.logit_std = max(cfg.top_k, 1), router_logit_std(cfg)
        self.per_expert = expert_popularity(cfg.num_experts, 0.0, seed)  # no skew: uniform
        self.rng = np.random.default_rng(seed + 1)
        self.imbalance: list[float] = []

    def shares(self, layer: int) -> np.ndarray:
        if self.skew == 0:
            return self.per_expert
        return np.array(topk_popularity(len(self.per_expert), self.top_k, self.skew, self.logit_std, layer, self.seed))

    def loads(self, pairs: int, layer: int) -> np.ndarray:
        """One MoE layer's pairs per EP rank (``layer``: its index among the MoE layers)."""
        loads = draw_ep_loads(self.rng, pairs, self.shares(layer), self.n)
        if pairs:
            self.imbalance.append(loads.max() / loads.mean())
        return loads

    @property
    def mean_imbalance(self) -> float:
        return float(np.mean(self.imbalance)) if self.imbalance else 1.0


@functools.lru_cache(maxsize=256)
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (0 for one)."""
    if n <= 1:
        return 0.0
    x = np.linspace(-8, 8, 16001)
    pdf = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = np.cumsum(pdf) * (x[1] - x[0])
    return float(np.sum(x * n * pdf * cdf ** (n - 1)) * (x[1] - x[0]))


def expected_max(means: list[float], sd: float) -> float:
    """E[max_i (means[i] + sd Z_i)], Z_i independent standard normals: the barrier's wait
    when ranks arrive at different mean times with the same noise. Exact (a numerical
    integral), not max(means) + E[max Z] sd, which overstates it once one rank is clearly last."""
    m = np.asarray(means, dtype=float)
    hi, lo = float(m.max()), float(m.min())
    if sd <= 0 or len(m) == 1:
        return hi  # one rank, or no noise: nobody to wait for beyond the slowest mean
    if hi - lo < 1e-12 * max(1.0, hi):
        return hi + expected_max_normal(len(m)) * sd
    # The maximum is at least the last rank's draw, so above a = hi - 9 sd (almost surely):
    # E[X] = a + integral over [a, b] of (1 - F(x)), F = the product of the ranks' normal CDFs.
    a, b = hi - 9 * sd, hi + 9 * sd
    x = torch.linspace(a, b, 2001, dtype=torch.float64)
    cdf = torch.special.ndtr((x[:, None] - torch.from_numpy(m)[None, :]) / sd).prod(dim=1)
    return a + float(torch.trapezoid(1 - cdf, x))


def dep_step(cm: CostModel, per: list[tuple[list[int], list[int]]], n: int, router: DEPRouting
             ) -> tuple[float, float, float]:
    """One lockstep DEP step of ``n`` ranks, rank i running (seq_lens, prefix_lens) ``per[i]``
    (a dummy step is ([1], [0])): (step seconds, of which all-to-all, summed over ranks the
    time spent waiting for the slowest).

    A MoE layer has two barriers: the dispatch waits for every rank's attention (and the
    dense layers since the last barrier), the combine for every EP rank's experts.
    Between barriers ranks drift apart by the actual work (lengths, routing drawn per layer)
    and by noise: the profile's ``layer_jitter`` is the relative standard deviation of a
    whole layer, independent from layer to layer; a segment of a layer gets the share of
    that variance its time is of the layer's (noise adds up over time), and a barrier waits
    for the expected slowest rank: the maximum over ranks of (its work since the last
    barrier + its noise), each rank with its own work (its lengths, its EP shard's load)."""
    cfg = cm.cfg
    moe = set(cfg.moe_layers)
    sigma = cm.hw.layer_jitter
    t, own, step_a2a = 0.0, [0.0] * n, 0.0
    since, var = [0.0] * n, 0.0  # per rank since the last barrier; jitter variance accumulated
    by_kind = {m: [_layer_work(cfg, m, tuple(s), tuple(p)) for s, p in per] for m in (True, False)}
    moe_index = {layer: i for i, layer in enumerate(cfg.moe_layers)}

    def barrier() -> float:
        nonlocal since, var
        wait = expected_max(since, math.sqrt(var))
        since, var = [0.0] * n, 0.0
        return wait

    for layer in range(cfg.num_layers):  # routing drawn afresh for every MoE layer
        works = by_kind[layer in moe]
        dense = [cm.dense_part(w) for w in works]
        since = [a + d for a, d in zip(since, dense)]
        if layer not in moe:
            var += (sigma * float(np.mean(dense))) ** 2
            own = [o + d for o, d in zip(own, dense)]
            continue
        pairs = sum(w.tokens for w in works) * cfg.top_k
        balanced = cm.experts_part(pairs / n, cfg.num_experts // n)  # each rank's experts, were the load even
        layer_s = float(np.mean(dense)) + balanced
        var += sigma ** 2 * layer_s * float(np.mean(dense))
        t += barrier()  # dispatch
        since, a2a = cm.dep_experts(works, router.loads(pairs, moe_index[layer]), n)
        var += sigma ** 2 * layer_s * balanced
        t += barrier() + a2a  # combine
        step_a2a += a2a
        own = [o + d + balanced for o, d in zip(own, dense)]
    t += barrier()  # the step ends when the last rank does
    return t, step_a2a, sum(t - step_a2a - o for o in own)


# ------------------------------------------------------------------------------ workloads
def pack_steps(lengths: list[int], mnt: int, balance_tail: bool = False) -> list[tuple[list[int], list[int]]]:
    """The engine's scheduler, without a model: FIFO, MNT tokens per step, chunked prefill
    (``balance_tail``: every request is there from the start, so equal steps throughout)."""
    queue = [[n, 0] for n in lengths]  # [length, done]
    steps = []
    while queue:
        seqs = take_chunks([n - d for n, d in queue], mnt, balance_tail)
        prefix = [d for _, d in queue[:len(seqs)]]
        for item, take in zip(queue, seqs):
            item[1] += take
        queue = [it for it in queue if it[1] < it[0]]
        steps.append((seqs, prefix))
    return steps


@dataclass
class Prediction:
    strategy: str
    makespan_s: float
    busy_s: list[float]
    step_s: list[list[float]]  # per rank, per step (dep: lockstep, dummy steps included)
    tokens: int
    world: int
    extra: dict = field(default_factory=dict)

    @property
    def tps_per_gpu(self) -> float:
        return self.tokens / self.makespan_s / self.world

    @property
    def tps_per_busy_gpu(self) -> float:
        return self.tokens / sum(self.busy_s)
