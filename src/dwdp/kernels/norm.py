"""RMSNorm, alone or with the residual add before it, in one pass (Triton).

PyTorch runs the reference form (``models.layers.RMSNorm``) as 6-8 kernels: the add, the
cast to fp32, square, mean, rsqrt, multiply, cast back, weight multiply, each a full pass
over the activations. These read each input once and write each output once, with the
reference's rounding points (the residual sum rounded to the activation dtype; the
normalised value rounded before the weight multiply).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, M, C, s_xm, s_rm, s_ym, s_hm, eps,
                    RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < M:
            row64 = row.to(tl.int64)
            x = tl.load(x_ptr + row64 * s_xm + cols, mask=cmask, other=0.0)
            if RESIDUAL:
                x = (x.to(tl.float32) + tl.load(r_ptr + row64 * s_rm + cols, mask=cmask, other=0.0).to(tl.float32))
                x = x.to(h_ptr.dtype.element_ty)
                tl.store(h_ptr + row64 * s_hm + cols, x, mask=cmask)
            xf = x.to(tl.float32)
            inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / C + eps)
            y = (xf * inv).to(y_ptr.dtype.element_ty).to(tl.float32) * w
            tl.store(y_ptr + row64 * s_ym + cols, y.to(y_ptr.dtype.element_ty), mask=cmask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * norm(x) (x [..., C]); with ``residual``: h = x + residual, returns
    (weight * norm(h), h)."""
    C = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    y = torch.empty((M, C), dtype=x.dtype, device=x.device)
    h = r2 = None
    if residual is not None:
        r2 = _rows(residual)
        h = torch.empty((M, C), dtype=x.dtype, device=x.device)
    if M:
        bc = triton.next_power_of_2(C)
        rows = 1 if C >= 2048 else 4 if C >= 512 else 16
        warps = 8 if bc >= 4096 else 4 if bc >= 1024 else 2 if bc >= 256 else 1
        _rmsnorm_kernel[(triton.cdiv(M, rows),)](
            x2, r2 if r2 is not None else x2, weight, y, h if h is not None else y, M, C,
            x2.stride(0), (r2 if r2 is not None else x2).stride(0), y.stride(0), (h if h is not None else y).stride(0),
            eps, RESIDUAL=residual is not None, BLOCK_C=bc, ROWS=rows, num_warps=warps)
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))


@triton.jit
def _rope_kernel(x_ptr, o_ptr, w_ptr, cos_ptr, sin_ptr, H, s_xt, s_xh, s_ot, s_oh, s_ct, eps,
                 R: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr, INTERLEAVED: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    # One program: one token, BLOCK_H heads. All loads precede the stores, so o may be x.
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    j = tl.arange(0, HALF)
    c = tl.load(cos_ptr + t * s_ct + j).to(tl.float32)
    s = tl.load(sin_ptr + t * s_ct + j).to(tl.float32)
    if INTERLEAVED:  # pairs (x0, x1), (x2, x3)...; the output de-interleaved, as the reference
        i1, i2 = 2 * j, 2 * j + 1
    else:
        i1, i2 = j, j + HALF
    base = x_ptr + t * s_xt + heads[:, None].to(tl.int64) * s_xh
    x1 = tl.load(base + i1[None, :], mask=hmask[:, None], other=0.0)
    x2 = tl.load(base + i2[None, :], mask=hmask[:, None], other=0.0)
    dt = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:  # the per-head RMSNorm first (Qwen3's q/k norm), with its rounding points
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / R + eps)
        w1 = tl.load(w_ptr + i1).to(tl.float32)
        w2 = tl.load(w_ptr + i2).to(tl.float32)
        x1 = ((x1 * inv[:, None]).to(dt).to(tl.float32) * w1[None, :]).to(dt).to(tl.float32)
        x2 = ((x2 * inv[:, None]).to(dt).to(tl.float32) * w2[None, :]).to(dt).to(tl.float32)
    o1 = x1 * c[None, :] - x2 * s[None, :]
    o2 = x2 * c[None, :] + x1 * s[None, :]
    obase = o_ptr + t * s_ot + heads[:, None].to(tl.int64) * s_oh
    tl.store(obase + j[None, :], o1.to(o_ptr.dtype.element_ty), mask=hmask[:, None])
    tl.store(obase + HALF + j[None, :], o2.to(o_ptr.dtype.element_ty), mask=hmask[:, None])


def rope_supported(dim: int) -> bool:
    half = dim // 2
    return dim % 2 == 0 and half >= 1 and (half & (half - 1)) == 0


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, out: torch.Tensor | None = None,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """x [T, H, R] (any token/head strides; head stride 0 broadcasts one row to every
    head of ``out``) -> rotary-embedded [T, H, R] into ``out`` (default new; may be x
    itself), after a per-head RMSNorm with ``norm_weight`` if given. cos/sin [T, R/2]."""
    T, H, R = out.shape if out is not None else x.shape
    if out is None:
        out = torch.empty((T, H, R), dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1 or out.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rope: rows must be contiguous in their last dimension")
    if T:
        bh = min(16, triton.next_power_of_2(H))
        w = norm_weight if norm_weight is not None else cos
        _rope_kernel[(T, triton.cdiv(H, bh))](x, out, w, cos, sin, H, x.stride(0), x.stride(1), out.stride(0),
                                              out.stride(1), cos.stride(0), eps, R=R, HALF=R // 2, NORM=norm_weight is not None,
                                              INTERLEAVED=interleaved, BLOCK_H=bh, num_warps=4)
    return out
