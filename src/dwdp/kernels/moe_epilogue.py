"""Fused MoE epilogues in Triton: SwiGLU between the grouped GEMMs, and the weighted
combine that un-permutes expert outputs back to tokens.

PyTorch needs two passes for each (silu, then multiply; a gather to token order, then a
batched [1, K] x [K, H] product); these read each input once and write once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])  # rows vary per step: one compiled variant
def _silu_mul_kernel(h_ptr, out_ptr, M, C, s_hm, s_om, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < M) & (cols[None, :] < C)
    base = h_ptr + rows[:, None].to(tl.int64) * s_hm + cols[None, :]
    gate = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + C, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + rows[:, None].to(tl.int64) * s_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """h [M, 2C] = gate | up -> silu(gate) * up [M, C]."""
    M, C = h.shape[0], h.shape[1] // 2
    out = torch.empty((M, C), dtype=h.dtype, device=h.device)
    if M:
        _silu_mul_kernel[(triton.cdiv(M, 16), triton.cdiv(C, 256))](h, out, M, C, h.stride(0), out.stride(0),
                                                                    BLOCK_R=16, BLOCK_C=256)
    return out


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, H, s_ym, s_om, K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(K):
        r = tl.load(pos_ptr + t * K + k).to(tl.int64)
        w = tl.load(w_ptr + t * K + k).to(tl.float32)
        acc += w * tl.load(y_ptr + r * s_ym + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * s_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def weighted_combine(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * y_sorted[position of pair (t, k) in ``order``]."""
    T, K = weights.shape
    H = y_sorted.shape[1]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    out = torch.empty((T, H), dtype=y_sorted.dtype, device=y_sorted.device)
    if T:
        bh = 1024 if H >= 1024 else triton.next_power_of_2(H)
        _combine_kernel[(T, triton.cdiv(H, bh))](y_sorted, pos, weights.contiguous(), out, H, y_sorted.stride(0),
                                                 out.stride(0), K=K, BLOCK_H=bh, num_warps=4)
    return out
