"""DEP's row movers: pack token rows into send slots, gather received rows, reduce partial
rows with their routing weights, quantise rows to FP8. Each runs the Triton kernel of
:mod:`dwdp.kernels.dep_moe` where it applies and the plain PyTorch equivalent elsewhere (CPU)."""

from __future__ import annotations

import torch

from .. import kernels
from ..quant import FP8, FP8_MAX


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same width (row copies are dtype-agnostic)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def scatter_rows(src: torch.Tensor, slot: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[slot[t, j]] = src[t] for slot[t, j] >= 0."""
    if src.shape[0] == 0:
        return
    if kernels.enabled(src):
        from ..kernels.dep_moe import scatter_rows as kernel

        return kernel(_bits(src.contiguous()), slot, _bits(dst))
    for j in range(slot.shape[1]):  # fallback (CPU): one masked copy per destination
        m = slot[:, j] >= 0
        dst[slot[m, j]] = src[m]


def gather_rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src[idx] as a new contiguous tensor (src may be a strided view of a receive buffer)."""
    if kernels.enabled(src) and idx.numel():
        from ..kernels.dep_moe import gather_rows as kernel

        out = torch.empty((idx.numel(), src.shape[1]), dtype=src.dtype, device=src.device)
        kernel(_bits(src), idx, _bits(out))
        return out
    return src.index_select(0, idx)


def gather_reduce(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor) -> None:
    """out[t] = sum over pos[t, j] >= 0 of weights[t, j] * y[pos[t, j]], in one pass, no atomics."""
    if out.shape[0] == 0:
        return
    if y.shape[0] == 0:  # nothing to add (and no pointer to hand a kernel)
        out.zero_()
        return
    if kernels.enabled(out):
        from ..kernels.dep_moe import gather_reduce as kernel

        return kernel(y, pos, weights, out)
    valid = pos >= 0
    w = valid.to(out.dtype) if weights is None else weights.to(out.dtype) * valid
    rows = y[pos.clamp(min=0)]  # [T, J, H]
    out.copy_(torch.bmm(w.unsqueeze(1), rows.to(out.dtype)).squeeze(1))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 1x128 FP8 quantisation (kernels/fp8_grouped.quantize_rows; PyTorch without Triton)."""
    if kernels.enabled(x):
        from ..kernels.fp8_grouped import quantize_rows as kernel

        return kernel(x)
    T, H = x.shape
    v = x.float().view(T, H // 128, 128)
    scale = v.abs().amax(-1).clamp(min=1e-10) / FP8_MAX
    return (v / scale.unsqueeze(-1)).to(FP8).view(T, H), scale
