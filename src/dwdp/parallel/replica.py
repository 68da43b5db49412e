"""Replicated data parallelism (``dp``): a full model per rank, no communication.

The upper bound where it fits; for large MoE models it does not, and we say so with the
numbers instead of failing deep inside an allocation.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


FIT_HEADROOM = 0.92  # usable share of a GPU's memory: what the fit check, -L auto and the planner allow


class DoesNotFit(ValueError):
    """A strategy's per-GPU memory exceeds the device."""


def activation_bytes(cfg: ModelConfig, max_num_tokens: int, bytes_per_elem: int) -> int:
    """Rough peak activation memory of one prefill step of ``max_num_tokens`` tokens.

    Dominated by the MoE layer: k copies of each token's hidden state sorted by expert,
    their gate/up projections (2 x inter) and outputs, plus the residual stream, the
    attention inputs/outputs and the step's KV.
    """
    T, H, K, inter = max_num_tokens, cfg.hidden_size, max(cfg.top_k, 1), cfg.moe_intermediate_size
    moe = T * K * (2 * H + 3 * inter)
    qkv = T * (cfg.num_heads * (cfg.qk_head_dim + (cfg.v_head_dim if cfg.is_mla else cfg.head_dim)) + 2 * H)
    kv = T * cfg.num_layers * cfg.kv_cache_width
    return int((moe + qkv + kv + 4 * T * H) * bytes_per_elem + T * cfg.num_experts * 4 * 2)


def check_fits(what: str, weight_bytes: int, cfg: ModelConfig, max_num_tokens: int, dtype: torch.dtype,
               device: torch.device, headroom: float = FIT_HEADROOM, total_memory: int | None = None) -> None:
    """Raise :class:`DoesNotFit` if weights + one step's activations exceed the GPU
    (``total_memory`` overrides the device's size; CPU runs are not checked)."""
    if total_memory is None:
        if device.type != "cuda":
            return
        total_memory = torch.cuda.get_device_properties(device).total_memory
    total = total_memory
    act = activation_bytes(cfg, max_num_tokens, torch.empty(0, dtype=dtype).element_size())
    need = weight_bytes + act
    if need > headroom * total:
        gib = 2**30
        raise DoesNotFit(
            f"{what} does not fit: {weight_bytes / gib:.1f} GiB of weights + ~{act / gib:.1f} GiB of activations at "
            f"{max_num_tokens} tokens per step = {need / gib:.1f} GiB per GPU, but {device} has "
            f"{total / gib:.1f} GiB ({headroom:.0%} usable). Use dwdp or dep, fewer layers (--num-layers), "
            "or a smaller --max-num-tokens")
