"""Building blocks shared by the model families: RMSNorm, rotary embeddings, SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale after casting back, as the reference models do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DenseMLP(nn.Module):
    """SwiGLU MLP: dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin magnitude scale for a rotary dim ``dim``."""
    base_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if rope.kind == "default":
        return (1.0 / base_freqs).float(), 1.0
    # YaRN: interpolate low frequencies by `factor`, keep high ones, ramp in between.
    orig = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = (1 - ramp).double()
    inv = (1.0 / (rope.factor * base_freqs)) * (1 - extrapolate) + (1.0 / base_freqs) * extrapolate
    if rope.attention_factor is not None:
        scale = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        scale = _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        scale = _yarn_mscale(rope.factor)
    return inv.float(), scale


def yarn_softmax_scale(rope: RopeConfig) -> float:
    """Extra softmax scale DeepSeek applies under YaRN (mscale_all_dim squared)."""
    if rope.kind == "yarn" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        return m * m
    return 1.0


class Rotary(nn.Module):
    """cos/sin tables indexed by absolute position; applied in half-split or interleaved layout."""

    def __init__(self, rope: RopeConfig, dim: int, interleaved: bool = False):
        super().__init__()
        inv, self.magnitude = rope_inv_freq(rope, dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.interleaved = interleaved

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        return (freqs.cos() * self.magnitude).to(dtype), (freqs.sin() * self.magnitude).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, dim]; cos/sin: [T, dim/2]."""
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleaved:
            # Pairs (x0,x1),(x2,x3)... rotate together; the output is de-interleaved
            # (first all "real" parts, then all "imaginary"), as the reference does.
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
