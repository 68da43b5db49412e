"""Building blocks shared by the model families: RMSNorm, rotary embeddings, SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.enabled(x):  # one pass (kernels/norm.py), the same rounding points
            from ..kernels.norm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        # Normalise in fp32 and scale after casting back, as the reference models do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x + residual), x + residual): the residual add fused into the norm on CUDA."""
        if kernels.enabled(x):
            from ..kernels.norm import rmsnorm

            return rmsnorm(x, self.weight, self.eps, residual)
        h = x + residual
        return self(h), h


class Fp8Linear(nn.Module):
    """A linear layer stored as FP8 e4m3 with 128x128 fp32 block scales, as DeepSeek-V3/R1
    and Qwen3-*-FP8 ship their projections (``weight``, ``weight_scale_inv``: the
    checkpoint's names, so loading is a lookup and the stored bytes are kept).

    Activations are quantised per token and 128 columns, then one block-scaled GEMM
    (kernels/fp8_dense.py) on CUDA; elsewhere :func:`~dwdp.quant.fp8_linear_reference`,
    the same arithmetic in plain torch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        from ..quant import FP8, SCALE_DTYPE, scale_shape

        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(*scale_shape(out_features, in_features),
                                                         dtype=SCALE_DTYPE), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the compute dtype (MLA's absorbed decode reads kv_b_proj's weight)."""
        from ..quant import dequantize_fp8_blockwise

        return dequantize_fp8_blockwise(self.weight, self.weight_scale_inv, dtype)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               swiglu: bool = False) -> torch.Tensor:
    """y = x @ (w * w_scale).T (+ bias) with x quantised 1x128; ``swiglu``: x is gate | up
    and the product takes silu(gate) * up, fused into the activation quantise on the GPU."""
    K = w.shape[1]
    if kernels.enabled(x) and K % 128 == 0:
        from ..kernels import fp8_dense
        from ..kernels.fp8_grouped import quantize_rows

        lead = x.shape[:-1]
        x2 = x.reshape(-1, 2 * K if swiglu else K)
        M = x2.shape[0]
        cublas = fp8_dense.use_scaled_mm(M, w.shape[0], K, x.device)
        xq, xs = quantize_rows(x2 if x2.stride(-1) == 1 else x2.contiguous(), swiglu=swiglu,
                               m_major_pad=fp8_dense.ROW_PAD if cublas else 0)
        y = fp8_dense.fp8_gemm(xq, xs, w, w_scale, x.dtype)[:M]
        if bias is not None:
            y += bias
        return y.view(*lead, w.shape[0])
    from ..quant import fp8_linear_reference

    if swiglu:
        x = F.silu(x[..., :K]) * x[..., K:]
    return fp8_linear_reference(x, w, w_scale, bias)


def weight_of(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A projection's weight in the compute dtype, FP8 or not."""
    return linear.dequantized(dtype) if isinstance(linear, Fp8Linear) else linear.weight


def is_fp8(linear: nn.Module) -> bool:
    return isinstance(linear, Fp8Linear)


class DenseMLP(nn.Module):
    """SwiGLU MLP: dense layers and shared experts.

    ``build_model`` places gate_proj's and up_proj's weights in one [2 * inter, hidden]
    tensor (``gate_up``, views: the checkpoint names still load): one GEMM for both, and
    for FP8 the SwiGLU fused with the down projection's activation quantise."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up: tuple[torch.Tensor, ...] | None = None  # (weight[, scale]) holding both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = merged_parts(self.gate_up, (self.gate_proj, self.up_proj))
        if gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        inter = self.down_proj.in_features
        if len(gate_up) == 1:
            h = F.linear(x, gate_up[0])
            if kernels.enabled(h):
                from ..kernels.moe_epilogue import silu_mul

                return self.down_proj(silu_mul(h.reshape(-1, 2 * inter)).view(*x.shape[:-1], inter))
            return self.down_proj(F.silu(h[..., :inter]) * h[..., inter:])
        h = fp8_linear(x, *gate_up)
        down = self.down_proj
        if kernels.enabled(h) and inter % 128 == 0 and is_fp8(down):  # SwiGLU and quantise in one pass
            return fp8_linear(h, down.weight, down.weight_scale_inv, down.bias, swiglu=True)
        return down(F.silu(h[..., :inter]) * h[..., inter:])


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

    def apply_into(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None,
                   norm: RMSNorm | None = None) -> torch.Tensor:
        """:meth:`apply` (after ``norm`` if given) written into ``out`` (may be x itself, or
        a slice of a larger tensor: no concatenation copy). On CUDA one kernel does the
        norm and the rotation (kernels/norm.py)."""
        if kernels.enabled(x):
            from ..kernels.norm import rope, rope_supported

            if rope_supported(x.shape[-1]):
                return rope(x, cos, sin, self.interleaved, out, None if norm is None else norm.weight,
                            0.0 if norm is None else norm.eps)
        y = self.apply(x if norm is None else norm(x), cos, sin)
        if out is None:
            return y
        out.copy_(y)
        return out


def merged_parts(parts: tuple[torch.Tensor, ...] | None, mods) -> tuple[torch.Tensor, ...] | None:
    """``parts`` while ``mods``' weights (and FP8 scales) are still its row blocks, else None
    (a model moved or cast after build_model holds copies: each projection then runs on its
    own, so the merged tensor can never be stale). A few pointer compares, no device work."""
    if parts is None:
        return None
    r = 0
    for m in mods:
        w = parts[0]
        if m.weight.data_ptr() != w.data_ptr() + r * w.stride(0) * w.element_size():
            return None
        if len(parts) == 2:
            s = parts[1]
            if m.weight_scale_inv.data_ptr() != s.data_ptr() + (r // 128) * s.stride(0) * s.element_size():
                return None
        r += m.weight.shape[0]
    return parts


def merged_linear(x: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Several projections of x whose weights are row blocks of one tensor (build_model's
    ``gate_up`` / ``qkv`` / ``qkv_a``): one GEMM, the outputs side by side."""
    return F.linear(x, parts[0]) if len(parts) == 1 else fp8_linear(x, *parts)
