"""Plain PyTorch MoE models built from a :class:`~dwdp.config.ModelConfig`."""

from .moe import ExpertSegment, MoEBlock, Router, RoutedExperts, routed_experts_forward
from .transformer import LayerKV, MoECausalLM, PrefillOutput
from .build import build_model, compute_dtype, init_random, resolve_expert_dtype

__all__ = [
    "ExpertSegment", "LayerKV", "MoEBlock", "MoECausalLM", "PrefillOutput", "Router", "RoutedExperts",
    "build_model", "compute_dtype", "init_random", "resolve_expert_dtype", "routed_experts_forward",
]
