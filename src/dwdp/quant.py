"""FP8 (e4m3) block quantisation as DeepSeek-V3 and Qwen3-*-FP8 checkpoints store it: one
fp32 scale per 128 x 128 block of a weight matrix, ``w ~= q * scale_inv``.

Used to read FP8 checkpoints, and to quantise experts at load, so a DWDP rank stores and
pulls about half the bytes of bf16 and computes in FP8 (kernels/fp8_grouped.py).

Every routine here works a bounded number of elements at a time (``CHUNK_ELEMS``): the
fp32 working copy of a whole layer's experts (28 GiB for DeepSeek-V3) must never exist.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
BLOCK = 128
SCALE_DTYPE = torch.float32
CHUNK_ELEMS = 1 << 24  # fp32 working set of the chunked routines: 64 MiB (one DeepSeek-V3 expert matrix at most)

# Bytes per weight, block scales included, for shapes that are multiples of the block:
# FP8 stores 1 byte + one 4-byte scale per 128 x 128 weights = 1 + 1/4096.
_BYTES_PER_WEIGHT = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0,
    "fp8": 1.0 + 4 / BLOCK**2,
    "fp4": 0.5 + 1 / 16,  # planner only (not stored by the engine): NVFP4, one e4m3 scale per 16 weights
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", FP8: "fp8"}


def _dtype_name(d: torch.dtype | str) -> str:
    name = _DTYPE_NAMES.get(d, d) if isinstance(d, torch.dtype) else {"float32": "fp32", "bfloat16": "bf16",
                                                                      "float16": "fp16"}.get(d, d)
    if name not in _BYTES_PER_WEIGHT:
        raise ValueError(f"expert dtype {d!r}: choose from {', '.join(_BYTES_PER_WEIGHT)}")
    return name


def bytes_per_expert_weight(expert_dtype: torch.dtype | str) -> float:
    """Bytes per routed-expert weight as stored, block scales included ("fp8": 1 + 1/4096).

    The one number for planners and fit checks; exact whenever hidden and
    moe_intermediate_size are multiples of 128 (every released model). For an exact
    per-expert byte count at any shape use :func:`expert_bytes`."""
    return _BYTES_PER_WEIGHT[_dtype_name(expert_dtype)]


def scale_shape(rows: int, cols: int, block: int = BLOCK) -> tuple[int, int]:
    """Shape of the block-scale grid of a [rows, cols] weight (partial edge blocks included)."""
    return -(-rows // block), -(-cols // block)


def expert_bytes(hidden: int, inter: int, expert_dtype: torch.dtype | str) -> int:
    """Exact bytes one routed expert occupies as the engine stores it: w13 [2*inter, hidden]
    and w2 [hidden, inter], plus for FP8 their fp32 block scales."""
    name = _dtype_name(expert_dtype)
    n = 3 * hidden * inter
    if name != "fp8":
        if name == "fp4":
            raise ValueError("fp4 experts are a planner estimate only; the engine does not store them")
        return int(n * _BYTES_PER_WEIGHT[name])
    s13, s2 = scale_shape(2 * inter, hidden), scale_shape(hidden, inter)
    return n + 4 * (s13[0] * s13[1] + s2[0] * s2[1])


def _lead_chunks(lead: int, per_item: int):
    step = max(1, CHUNK_ELEMS // max(per_item, 1))
    for i in range(0, lead, step):
        yield i, min(lead, i + step)


def quantize_fp8_blockwise(w: torch.Tensor, block: int = BLOCK,
                           out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, cols] -> (q fp8 [..., rows, cols], scale_inv fp32 [..., ceil(rows/B), ceil(cols/B)]).

    Each block's largest magnitude maps to the largest e4m3 value; all-zero blocks get
    scale 1. ``out``: destination (q, scale) to write into (e.g. a model's FP8 parameters).
    Works on a few matrices (``CHUNK_ELEMS``) at a time; per matrix the result does not
    depend on how many are quantised together."""
    *lead, rows, cols = w.shape
    br, bc = scale_shape(rows, cols, block)
    if out is None:
        out = (torch.empty(w.shape, dtype=FP8, device=w.device),
               torch.empty(*lead, br, bc, dtype=SCALE_DTYPE, device=w.device))
    q, scale = out
    if tuple(q.shape) != tuple(w.shape) or tuple(scale.shape) != (*lead, br, bc):
        raise ValueError(f"quantize_fp8_blockwise: out shapes {tuple(q.shape)}, {tuple(scale.shape)} do not fit "
                         f"a {tuple(w.shape)} weight (scales {(*lead, br, bc)})")
    w3, q3, s3 = w.reshape(-1, rows, cols), q.view(-1, rows, cols), scale.view(-1, br, bc)
    for i0, i1 in _lead_chunks(w3.shape[0], br * bc * block * block):
        n = i1 - i0
        padded = torch.zeros(n, br * block, bc * block, dtype=torch.float32, device=w.device)
        padded[:, :rows, :cols] = w3[i0:i1]
        tiles = padded.view(n, br, block, bc, block)
        amax = tiles.abs().amax(dim=(-3, -1))  # [n, br, bc]
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        tiles.div_(s[:, :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
        q3[i0:i1].copy_(padded[:, :rows, :cols])  # the fp32 -> e4m3 rounding happens in this copy
        s3[i0:i1].copy_(s)
    return q, scale


def dequantize_fp8_into(dest: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """dest[..., r, c] = q[..., r, c] * scale_inv[..., r // B, c // B], computed in fp32 and
    rounded once to dest's dtype, a bounded number of rows at a time on dest's device
    (q and scale_inv may live elsewhere, e.g. a memory-mapped checkpoint)."""
    *lead, rows, cols = q.shape
    if tuple(scale_inv.shape) != (*lead, *scale_shape(rows, cols, block)):
        raise ValueError(f"block scales of shape {tuple(scale_inv.shape)} do not fit a {tuple(q.shape)} weight "
                         f"with {block}x{block} blocks (expected {(*lead, *scale_shape(rows, cols, block))})")
    q3, s3, d3 = q.reshape(-1, rows, cols), scale_inv.reshape(-1, *scale_inv.shape[-2:]), dest.view(-1, rows, cols)
    if rows * cols <= CHUNK_ELEMS:  # whole matrices, several at a time
        spans = [(i0, i1, 0, rows) for i0, i1 in _lead_chunks(q3.shape[0], rows * cols)]
    else:  # one matrix at a time, whole 128-row blocks at a time
        step = max(block, (CHUNK_ELEMS // cols) // block * block)
        spans = [(i, i + 1, r0, min(rows, r0 + step)) for i in range(q3.shape[0]) for r0 in range(0, rows, step)]
    for i0, i1, r0, r1 in spans:
        s = s3[i0:i1, r0 // block:-(-r1 // block)].to(dest.device, torch.float32)
        s = s.repeat_interleave(block, 1)[:, : r1 - r0].repeat_interleave(block, 2)[:, :, :cols]
        d3[i0:i1, r0:r1].copy_(q3[i0:i1, r0:r1].to(dest.device).float().mul_(s))
    return dest


def dequantize_fp8_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                             block: int = BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_blockwise` (fp8 * fp32 scale, computed in fp32)."""
    return dequantize_fp8_into(torch.empty(q.shape, dtype=dtype, device=q.device), q, scale_inv, block)


def quantize_experts_fp8(model) -> None:
    """Quantise every MoE layer's routed experts (as loaded: full or a rank's shard) to FP8.

    Holds a layer's full-precision and FP8 experts together while it runs; building with
    ``build_model(..., expert_dtype="fp8")`` instead never allocates the full-precision
    experts at all."""
    for block in model.moe_blocks():
        block.experts.quantize_fp8()


# --------------------------------------------------------------------------------------
# FP8 dense projections: e4m3 weights with 128x128 block scales (as the releases ship
# them), activations quantised per token and per 128 columns at run time (DeepSeek-V3's
# recipe), so each 128-wide K step has one activation scale per row and one weight scale
# per 128 output columns.
# --------------------------------------------------------------------------------------


def quantize_act_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K/128)]), x ~= q * scale per 1x128 block.

    The reference of the GPU kernel (``kernels.fp8_grouped.quantize_rows``): amax over
    each block (floored at 1e-10, so an all-zero block quantises to zeros), scale =
    amax / 448, q = x / scale rounded once to e4m3."""
    M, K = x.shape
    nb = -(-K // BLOCK)
    xf = torch.zeros(M, nb * BLOCK, dtype=torch.float32, device=x.device)
    xf[:, :K] = x
    blocks = xf.view(M, nb, BLOCK)
    scale = blocks.abs().amax(-1).clamp_min(1e-10) / FP8_MAX
    q = (blocks / scale[:, :, None]).view(M, nb * BLOCK)[:, :K].to(FP8)
    return q, scale


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the GPU path computes, in plain torch: activations quantised 1x128, both
    operands dequantised and multiplied in fp32, rounded once to x's dtype."""
    lead, K = x.shape[:-1], x.shape[-1]
    q, s = quantize_act_1x128(x.reshape(-1, K))
    xd = q.float() * s.repeat_interleave(BLOCK, 1)[:, :K]
    y = xd @ dequantize_fp8_blockwise(w, w_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, w.shape[0])
