"""Constructing a model: shapes from the config, memory on the target device, values
from a checkpoint (see :mod:`dwdp.checkpoint`) or from a seed."""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from ..config import ModelConfig
from .moe import RoutedExperts
from .transformer import MoECausalLM

ExpertShard = Callable[[int], tuple[int, int]]
"""MoE layer index -> (first global expert, count) that this process stores."""


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                expert_shard: ExpertShard | None = None) -> MoECausalLM:
    """Allocate an uninitialised model (no values written: load or init_random next).

    With ``expert_shard`` each MoE layer stores only the given run of routed experts,
    so a rank never allocates (or later reads) experts it does not own.
    """
    with torch.device("meta"):
        model = MoECausalLM(cfg)
    if expert_shard is not None:
        for layer in model.model.layers:
            if layer.is_moe:
                start, count = expert_shard(layer.idx)
                if not (0 <= start and count >= 0 and start + count <= cfg.num_experts):
                    raise ValueError(f"expert shard ({start}, {count}) does not fit {cfg.num_experts} experts")
                with torch.device("meta"):
                    layer.mlp.experts = RoutedExperts(
                        cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, start, count
                    )
    model = model.to_empty(device=device)
    for name, p in model.named_parameters():
        if not name.endswith("mlp.gate.weight"):  # router weights stay fp32, as the reference keeps them
            p.data = p.data.to(dtype)
    # Routing tables and rotary frequencies stay fp32 whatever the weight dtype.
    for mod in model.modules():
        if hasattr(mod, "inv_freq"):
            from .layers import rope_inv_freq

            mod.inv_freq = rope_inv_freq(cfg.rope, mod.inv_freq.numel() * 2)[0].to(device)
    if cfg.tie_word_embeddings:  # to_empty() gave lm_head its own tensor: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)  # inference only
    model.eval()
    return model


def _seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_random(model: MoECausalLM, seed: int = 0, std: float = 0.02) -> MoECausalLM:
    """Seeded random weights. Each tensor (and each routed expert separately) draws from
    its own stream keyed by name, so a rank holding any subset of experts gets exactly
    the values the full model would have: DWDP/EP outputs can be compared bitwise."""
    dev = next(model.parameters()).device

    def fill(t: torch.Tensor, key: str) -> None:
        g = torch.Generator(device=dev)
        g.manual_seed(_seed_for(seed, key))
        t.copy_(torch.randn(t.shape, generator=g, device=dev, dtype=torch.float32).mul_(std).to(t.dtype))

    for name, mod in model.named_modules():
        if isinstance(mod, RoutedExperts):
            for i, e in enumerate(mod.expert_range):
                fill(mod.w13[i], f"{name}.{e}.w13")
                fill(mod.w2[i], f"{name}.{e}.w2")
    for name, p in model.named_parameters():
        if name.endswith((".w13", ".w2")):
            continue
        if "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            fill(p, name)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    return model
