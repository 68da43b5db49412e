"""Plain PyTorch MoE models built from a :class:`~dwdp.config.ModelConfig`."""

from .moe import ExpertSegment, MoEBlock, Router, RoutedExperts, routed_experts_forward
from .transformer import LayerKV, MoECausalLM, PrefillOutput
from .build import build_model, init_random

__all__ = [
    "ExpertSegment", "LayerKV", "MoEBlock", "MoECausalLM", "PrefillOutput", "Router", "RoutedExperts",
    "build_model", "init_random", "routed_experts_forward",
]
