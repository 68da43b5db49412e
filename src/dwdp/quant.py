"""FP8 (e4m3) block quantisation as DeepSeek-V3 checkpoints store it: one fp32 scale per
128 x 128 block of a weight matrix, ``w ~= q * scale_inv``.

Used to read FP8 checkpoints, and to quantise bf16 experts at load, so a DWDP rank stores
and pulls half the bytes and computes in FP8 (kernels/fp8_grouped.py).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
BLOCK = 128


def _blocks(rows: int, cols: int, block: int) -> tuple[int, int]:
    return -(-rows // block), -(-cols // block)


def quantize_fp8_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, cols] -> (q fp8 [..., rows, cols], scale_inv fp32 [..., ceil(rows/B), ceil(cols/B)]).

    Each block's largest magnitude maps to the largest e4m3 value; all-zero blocks get scale 1."""
    *lead, rows, cols = w.shape
    br, bc = _blocks(rows, cols, block)
    padded = torch.zeros(*lead, br * block, bc * block, dtype=torch.float32, device=w.device)
    padded[..., :rows, :cols] = w.float()
    tiles = padded.view(*lead, br, block, bc, block)
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., br, bc]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(*lead, br * block, bc * block)[..., :rows, :cols].contiguous(), scale


def dequantize_fp8_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                             block: int = BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_blockwise` (fp8 * fp32 scale, computed in fp32)."""
    *_, rows, cols = q.shape
    s = scale_inv.float().repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :rows, :cols]
    return (q.float() * s).to(dtype)


def quantize_experts_fp8(model) -> None:
    """Quantise every MoE layer's routed experts (as loaded: full or a rank's shard) to FP8."""
    for block in model.moe_blocks():
        block.experts.quantize_fp8()


def expert_bytes_per_weight(fmt: str, weight_elem_bytes: int = 2) -> float:
    """Bytes per routed-expert weight in storage format ``fmt``, block scales included:
    "same"/"bf16" (the model dtype's ``weight_elem_bytes``), "fp8" (one byte plus one fp32
    scale per 128x128 block), "fp4" (NVFP4: half a byte plus one fp8 scale per 16 weights)."""
    if fmt == "same":
        return float(weight_elem_bytes)
    table = {"bf16": 2.0, "fp8": 1.0 + 4.0 / (BLOCK * BLOCK), "fp4": 0.5 + 1.0 / 16}
    if fmt not in table:
        raise ValueError(f"expert format {fmt!r}: choose one of same, {', '.join(table)}")
    return table[fmt]
