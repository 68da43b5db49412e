"""Where a model's parameters and bytes are: the numbers behind ``dwdp info``.

Counted on a meta-device model (no memory allocated), so it works for DeepSeek-V3's
671B parameters on a laptop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .parallel.placement import Placement


@dataclass
class ParamBreakdown:
    embeddings: int
    attention: int
    norms: int
    dense_mlp: int
    shared_experts: int
    routers: int
    routed_experts: int
    num_moe_layers: int
    expert_numel: int  # one routed expert

    @property
    def total(self) -> int:
        return self.non_expert + self.routed_experts

    @property
    def non_expert(self) -> int:
        return (self.embeddings + self.attention + self.norms + self.dense_mlp + self.shared_experts
                + self.routers)


@functools.lru_cache(maxsize=64)
def param_breakdown(cfg: ModelConfig) -> ParamBreakdown:
    from .models.transformer import MoECausalLM

    with torch.device("meta"):
        model = MoECausalLM(cfg)
    counts = dict(embeddings=0, attention=0, norms=0, dense_mlp=0, shared_experts=0, routers=0, routed_experts=0)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        n = p.numel()
        if name.endswith((".w13", ".w2")):
            counts["routed_experts"] += n
        elif "embed_tokens" in name or name.startswith("lm_head"):
            counts["embeddings"] += n
        elif ".self_attn." in name and "norm" not in name.split(".")[-2]:
            counts["attention"] += n
        elif "norm" in name:
            counts["norms"] += n
        elif ".shared_experts." in name:
            counts["shared_experts"] += n
        elif ".mlp.gate." in name:
            counts["routers"] += n
        else:
            counts["dense_mlp"] += n
    return ParamBreakdown(**counts, num_moe_layers=len(cfg.moe_layers), expert_numel=cfg.expert_numel())


@dataclass
class RankMemory:
    non_expert: int
    resident_experts: int
    slots: int  # the two prefetch slots, each sized for one MoE layer's remote experts

    @property
    def total(self) -> int:
        return self.non_expert + self.resident_experts + self.slots


def dwdp_rank_memory(cfg: ModelConfig, placement: Placement, bytes_per_param: float,
                     expert_bytes_per_param: float | None = None) -> RankMemory:
    pb = param_breakdown(cfg)
    ebpp = bytes_per_param if expert_bytes_per_param is None else expert_bytes_per_param
    expert_bytes = pb.expert_numel * ebpp
    return RankMemory(
        non_expert=int(pb.non_expert * bytes_per_param),
        resident_experts=int(placement.local * pb.num_moe_layers * expert_bytes),
        slots=int(2 * placement.remote * expert_bytes) if placement.group_size > 1 else 0,
    )
