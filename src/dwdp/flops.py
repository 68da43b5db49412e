"""Counting work: FLOPs and bytes of a prefill step (used for MFU and by the planner).

Matmul FLOPs are 2 * m * n * k. Causal attention over a sequence of n new tokens after a
prefix p does (p * n + n * (n + 1) / 2) query-key pairs, each costing 2 * d_qk (scores)
plus 2 * d_v (weighted sum) FLOPs per head.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass
class StepFlops:
    dense: float  # projections, dense MLPs, shared experts, routers, lm_head
    attention: float  # score and value products
    experts: float  # routed experts (top-k per token)

    @property
    def total(self) -> float:
        return self.dense + self.attention + self.experts


def attention_proj_params(cfg: ModelConfig) -> int:
    H = cfg.hidden_size
    if cfg.is_mla:
        qd = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = H * cfg.num_heads * qd if cfg.q_lora_rank is None else H * cfg.q_lora_rank + cfg.q_lora_rank * cfg.num_heads * qd
        kv = H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * cfg.num_heads * (
            cfg.qk_nope_head_dim + cfg.v_head_dim)
        return q + kv + cfg.num_heads * cfg.v_head_dim * H
    d = cfg.head_dim
    return H * cfg.num_heads * d * 2 + H * cfg.num_kv_heads * d * 2


def prefill_flops(cfg: ModelConfig, seq_lens: list[int], prefix_lens: list[int] | None = None) -> StepFlops:
    prefix_lens = prefix_lens or [0] * len(seq_lens)
    T = sum(seq_lens)
    H = cfg.hidden_size
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.num_layers - n_moe
    dense_params = attention_proj_params(cfg) * cfg.num_layers
    dense_params += n_dense * 3 * H * cfg.intermediate_size
    dense_params += n_moe * (3 * H * cfg.moe_intermediate_size * cfg.n_shared_experts + H * cfg.num_experts)
    dense = 2.0 * T * dense_params + 2.0 * len(seq_lens) * H * cfg.vocab_size
    pairs = sum(p * n + n * (n + 1) / 2 for p, n in zip(prefix_lens, seq_lens))
    d_qk = cfg.qk_head_dim
    d_v = cfg.v_head_dim if cfg.is_mla else cfg.head_dim
    attention = 2.0 * pairs * cfg.num_heads * (d_qk + d_v) * cfg.num_layers
    experts = 2.0 * T * cfg.top_k * 3 * H * cfg.moe_intermediate_size * n_moe
    return StepFlops(dense, attention, experts)
