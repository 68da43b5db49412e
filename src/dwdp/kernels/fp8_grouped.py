"""FP8 (e4m3) grouped GEMM with DeepSeek-V3 block scales, in Triton.

Weights: ``w [G, N, K]`` e4m3 with one fp32 scale per 128 x 128 block
(``w_scale [G, N/128, K/128]``, as the checkpoints store them). Activations are quantised
per token and per 128 columns (``a_scale [M, K/128]``), so every 128-wide K step of the
GEMM has exactly one activation scale per row and one weight scale per tile: the
accumulator adds ``dot(a, b) * a_scale * w_scale`` in fp32 (DeepGEMM's recipe).

Rows are grouped by expert (``counts[g]`` consecutive rows each). The launch grid covers
an upper bound of M tiles; a small device-side map tells each program its expert and
rows, so there is no host sync. The weights may be any strided view of a larger buffer
(a DWDP prefetch slot, a resident shard): the kernel takes the expert stride.

On Hopper, where nvcc and CUTLASS's headers are present, :func:`grouped_gemm_fp8` runs
CUTLASS's block-scaled pointer-array grouped GEMM instead (``fp8_cutlass.py``: the same
function, 1.2-1.7x the Triton kernel's rate on an H100); this module is the one place that
chooses, and says once in the log which kernel runs. ``DWDP_FP8_KERNEL=triton`` forces the Triton kernel.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from ..quant import FP8, FP8_MAX

BLOCK = 128  # the scale block along K and N
log = logging.getLogger("dwdp")


@triton.jit(do_not_specialize=["M"])  # rows vary per step: one compiled variant
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, range_ptr, M, M_out, s_xm, s_qm, s_sm, s_sk, half,
                      SWIGLU: tl.constexpr, BLOCK_R: tl.constexpr, FMAX: tl.constexpr, RANGED: tl.constexpr):
    # One program quantises BLOCK_R rows x 128 columns (optionally of silu(gate) * up first).
    # RANGED: only rows [range[0], range[1]) (read on the device), the others are left alone.
    # Rows [M, M_out) are padding: written as zeros with a tiny scale.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    lo, hi = 0, M_out
    if RANGED:
        lo = tl.load(range_ptr)
        hi = tl.minimum(tl.load(range_ptr + 1), M)
        if tl.program_id(0) * BLOCK_R >= hi or tl.program_id(0) * BLOCK_R + BLOCK_R <= lo:
            return
    rows_ok = (rows >= lo) & (rows < hi)
    rmask = (rows_ok & (rows < M))[:, None]
    base = x_ptr + rows[:, None].to(tl.int64) * s_xm + cols[None, :]
    if SWIGLU:
        gate = tl.load(base, mask=rmask, other=0.0).to(tl.float32)
        up = tl.load(base + half, mask=rmask, other=0.0).to(tl.float32)
        v = gate * tl.sigmoid(gate) * up
    else:
        v = tl.load(base, mask=rmask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-10)
    scale = amax / FMAX
    q = (v / scale[:, None]).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * s_qm + cols[None, :], q, mask=rows_ok[:, None])
    tl.store(s_ptr + rows.to(tl.int64) * s_sm + tl.program_id(1) * s_sk, scale, mask=rows_ok)


def quantize_rows(x: torch.Tensor, swiglu: bool = False, row_range: torch.Tensor | None = None,
                  m_major_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, C] (or [M, 2C] = gate | up with ``swiglu``) -> (e4m3 [M, C], fp32 scales [M, C/128]).
    ``row_range``: a device tensor [r0, r1]; only those rows are quantised (the rest of the
    outputs is left unwritten), without reading the range back to the host.
    ``m_major_pad``: rows padded with zeros to a multiple of it, and the scales stored
    M-major (strides (1, padded M)), as cuBLASLt's block-wise FP8 GEMM reads them."""
    M = x.shape[0]
    C = x.shape[1] // 2 if swiglu else x.shape[1]
    if C % BLOCK or x.stride(-1) != 1:
        raise ValueError(f"FP8 activations need contiguous rows with a multiple of {BLOCK} columns (got {C})")
    M_out = -(-M // m_major_pad) * m_major_pad if m_major_pad else M
    q = torch.empty((M_out, C), dtype=FP8, device=x.device)
    if m_major_pad:
        s = torch.empty((C // BLOCK, M_out), dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty((M_out, C // BLOCK), dtype=torch.float32, device=x.device)
    if row_range is not None:
        if m_major_pad:
            raise ValueError("quantize_rows: row_range and m_major_pad do not combine")
        if row_range.numel() != 2 or row_range.device != x.device or row_range.is_floating_point():
            raise ValueError(f"row_range must be two integer row indices on {x.device}, got {tuple(row_range.shape)} "
                             f"{row_range.dtype} on {row_range.device}")
        row_range = row_range.contiguous()  # the kernel reads [0] and [1]
    if M_out:
        grid = (triton.cdiv(M_out, 16), C // BLOCK)
        rng = row_range if row_range is not None else s  # unread when not RANGED
        _act_quant_kernel[grid](x, q, s, rng, M, M_out, x.stride(0), q.stride(0), s.stride(0), s.stride(1), C,
                                SWIGLU=swiglu, BLOCK_R=16, FMAX=FP8_MAX, RANGED=row_range is not None)
    return q, s


@triton.jit
def _gemm_tile(t, num_tiles_m, a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tile_e_ptr, tile_r0_ptr, tile_r1_ptr,
               N, K, s_am, s_asm, s_be, s_bn, s_bse, s_bsn, s_cm,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr, SCALED: tl.constexpr):
    # Tile t walks GROUP_M row tiles across all column tiles before moving on, so a group's
    # activation tiles and its expert's weights are re-read from L2, not HBM.
    num_n = N // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (t // per_group) * GROUP_M
    group_m = tl.minimum(num_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (t % per_group) % group_m
    pid_n = (t % per_group) // group_m
    e = tl.load(tile_e_ptr + pid_m)
    if e >= 0:  # else past the last tile of the last expert
        r0 = tl.load(tile_r0_ptr + pid_m)
        r1 = tl.load(tile_r1_ptr + pid_m)
        offs_m = r0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < r1
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        e64 = e.to(tl.int64)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * s_am + offs_k[None, :]
        b_ptrs = b_ptr + e64 * s_be + offs_n[None, :].to(tl.int64) * s_bn + offs_k[:, None]
        as_ptrs = as_ptr + offs_m.to(tl.int64) * s_asm
        bs_ptrs = bs_ptr + e64 * s_bse + (offs_n // 128) * s_bsn  # one weight scale per 128 columns
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, K // BLOCK_K):
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs)
            if SCALED:
                sa = tl.load(as_ptrs + kb, mask=mask_m, other=0.0)
                sb = tl.load(bs_ptrs + kb)
                acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
            else:
                acc += tl.dot(a, b)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * s_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None])


# The tile count varies with every step's rows: not a specialisation key (a short step
# would otherwise compile a new variant inside a timed step).
@triton.jit(do_not_specialize=["num_tiles_m"])
def _grouped_fp8_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tile_e_ptr, tile_r0_ptr, tile_r1_ptr, valid_m_ptr,
                        num_tiles_m, N, K, s_am, s_asm, s_be, s_bn, s_bse, s_bsn, s_cm,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, SCALED: tl.constexpr = True, PERSISTENT: tl.constexpr = False):
    # SCALED=False: plain bf16 operands (no scales; as_ptr/bs_ptr unused), the decode path.
    # PERSISTENT: a grid of about one program per SM loops over the valid tiles, counted on
    # the device (``valid_m_ptr``), instead of one program per tile of an upper bound: for a
    # segment of a larger buffer the bound is mostly empty tiles, and launching each costs
    # about a microsecond per SM wave (the kernel's shared memory allows one program per SM).
    if PERSISTENT:
        num_valid_m = tl.load(valid_m_ptr).to(tl.int32)
        for t in range(tl.program_id(0), num_valid_m * (N // BLOCK_N), tl.num_programs(0)):
            _gemm_tile(t, num_valid_m, a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tile_e_ptr, tile_r0_ptr, tile_r1_ptr,
                       N, K, s_am, s_asm, s_be, s_bn, s_bse, s_bsn, s_cm, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SCALED)
    else:
        _gemm_tile(tl.program_id(0), num_tiles_m, a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tile_e_ptr, tile_r0_ptr,
                   tile_r1_ptr, N, K, s_am, s_asm, s_be, s_bn, s_bse, s_bsn, s_cm, BLOCK_M, BLOCK_N, BLOCK_K,
                   GROUP_M, SCALED)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, GROUP_M) by rows per expert; benchmarks/tune_fp8.py,
# and benchmarks/tune_decode.py for decode sizes (a few rows per expert: small M tiles).
# "short" (16-95 rows, a ~1K-token prefill step): 64-row tiles. At 64 rows per expert on an
# H200 (2026-11-29_gpu_checks_h200/) they run 1.16-1.75x the 128-row tiles with equal rows per
# expert, 0.96-1.14x with multinomial (routed) rows, over qwen3-235b's and deepseek-v3's GEMMs.
CONFIGS = {"decode": (32, 128, 4, 4, 1), "short": (64, 128, 8, 4, 8), "small": (128, 128, 8, 4, 8),
           "large": (128, 128, 8, 4, 8)}


def _config(rows_per_group: float, n: int) -> tuple[int, int, int, int, int]:
    tier = ("large" if rows_per_group >= 256 else "small" if rows_per_group >= 96
            else "short" if rows_per_group >= 16 else "decode")
    bm, bn, warps, stages, group_m = CONFIGS[tier]
    return bm, (bn if n % bn == 0 else BLOCK), warps, stages, group_m


def _tile_map(counts: torch.Tensor, block_m: int, max_tiles: int, row_base: torch.Tensor | None = None):
    """Per M tile: its group (-1 past the end), first row and row end, on the device.
    ``row_base`` (a one-element device tensor): the groups' rows start there, not at 0."""
    dev = counts.device
    counts = counts.to(torch.int64)
    tiles = (counts + block_m - 1) // block_m
    tile_end = tiles.cumsum(0)
    row_end = counts.cumsum(0)
    if row_base is not None:
        row_end = row_end + row_base.to(torch.int64)
    t = torch.arange(max_tiles, device=dev)
    g = torch.searchsorted(tile_end, t, right=True).clamp_(max=counts.numel() - 1)
    r0 = row_end[g] - counts[g] + (t - (tile_end[g] - tiles[g])) * block_m
    valid = t < tile_end[-1]
    # The last item, the count of valid tiles, is what a persistent launch loops to.
    return (torch.where(valid, g, -1).to(torch.int32), r0.to(torch.int32), row_end[g].to(torch.int32),
            tile_end[-1:])


# CUTLASS configuration (fp8_cutlass.CONFIGS id, raster order, swizzle) by rows per expert;
# benchmarks/vendor_kernels.py times every configuration (2026-12-06_fp8_grouped_h100/):
# 128x128 tiles with a 1x2 cluster (two CTAs share the activation tile) won from 128 to
# 1,024 routed rows per expert on both models, 64-row pingpong tiles at 64.
# Below CUTLASS_MIN_ROWS rows per expert the Triton kernel runs.
CUTLASS_CONFIGS = {"short": (3, "m", 1), "small": (2, "m", 1), "large": (2, "m", 1)}
CUTLASS_MIN_ROWS = 16


def _cutlass_config(rows_per_group: float) -> tuple[int, str, int]:
    return CUTLASS_CONFIGS["large" if rows_per_group >= 256 else "small" if rows_per_group >= 96 else "short"]


_announced = False


def _announce(msg: str, warn: bool) -> None:
    global _announced
    if not _announced:
        _announced = True
        (log.warning if warn else log.info)(msg)


def _cutlass_operand_ok(a: torch.Tensor, a_scale: torch.Tensor) -> bool:
    return (a.data_ptr() % 16 == 0 and a.stride(0) % 16 == 0 and a_scale.dtype == torch.float32
            and a_scale.stride(0) == a.shape[1] // BLOCK)


def _cutlass_weight_ok(w: torch.Tensor, w_scale: torch.Tensor) -> bool:
    G, N, K = w.shape
    return (w.data_ptr() % 16 == 0 and w.stride(0) % 16 == 0 and w.stride(1) % 16 == 0
            and w_scale.dtype == torch.float32 and w_scale.stride(1) == K // BLOCK
            and tuple(w_scale.shape[1:]) == (N // BLOCK, K // BLOCK))


def cutlass_applies(a, a_scale, w, w_scale, counts, out, rows_per_group: float) -> bool:
    """Whether the CUTLASS kernel computes this call (else the Triton kernel does): a Hopper
    GPU with the library built, bf16 output, 16-byte aligned rows, scales in the layouts
    the quantiser and the checkpoints write."""
    if rows_per_group < CUTLASS_MIN_ROWS or not a.is_cuda:
        return False
    from . import fp8_cutlass

    if fp8_cutlass.library() is None:
        _announce(f"FP8 grouped GEMM: the Triton kernel runs ({fp8_cutlass.why_unavailable()}); on Hopper the "
                  "CUTLASS kernel runs 1.2-1.7x faster: pip install 'dwdp[cutlass]' with nvcc on PATH, "
                  "or build it with: python -m dwdp.kernels.fp8_cutlass build", warn=True)
        return False
    ok = (_cutlass_operand_ok(a, a_scale) and _cutlass_weight_ok(w, w_scale) and out.dtype == torch.bfloat16
          and counts.dtype in (torch.int32, torch.int64) and counts.is_cuda
          and out.data_ptr() % 16 == 0 and out.stride(0) % 8 == 0)
    if ok:
        _announce(f"FP8 grouped GEMM: the CUTLASS sm90 kernel runs ({fp8_cutlass.library().path})", warn=False)
    return ok


def grouped_gemm_fp8(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     counts: torch.Tensor, out_dtype=torch.bfloat16, tile_map=None,
                     out: torch.Tensor | None = None, rows_per_group: float | None = None,
                     persistent: bool = False, row_base: torch.Tensor | None = None,
                     kernel: str = "auto") -> torch.Tensor:
    """out[rows of group g] = (a * a_scale)[rows] @ (w[g] * w_scale[g]).T, for consecutive row groups.
    ``rows_per_group``: the tile-shape hint (default M / G); a ``tile_map`` must be built
    with the same hint's tile height. ``persistent``: one program per SM looping over the
    valid tiles (for groups that fill a small part of ``a``). ``row_base`` (a device
    tensor, read on the device): the groups' rows start there, not at 0 (the CUTLASS
    kernel; the Triton kernel takes it through ``tile_map``). ``kernel``: "auto" (CUTLASS
    where it applies), "triton" or "cutlass"."""
    M, K = a.shape
    G, N, Kw = w.shape
    rpg = rows_per_group if rows_per_group is not None else M / max(1, G)
    bm, bn, warps, stages, group_m = _config(rpg, N)
    if Kw != K or K % BLOCK or N % BLOCK or N % bn:
        raise ValueError(f"FP8 grouped GEMM needs K and N multiples of {BLOCK} (a {tuple(a.shape)}, w {tuple(w.shape)})")
    if a.stride(1) != 1 or w.stride(2) != 1 or a_scale.stride(1) != 1 or w_scale.stride(2) != 1:
        raise ValueError("FP8 grouped GEMM needs row-contiguous operands and scales")
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    elif out.shape != (M, N) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous [{M}, {N}] tensor, got {tuple(out.shape)}")
    if M == 0:
        return out
    if kernel == "cutlass" or (kernel == "auto" and cutlass_applies(a, a_scale, w, w_scale, counts, out, rpg)):
        from . import fp8_cutlass

        cfg, raster, swizzle = _cutlass_config(rpg)
        return fp8_cutlass.grouped_gemm(a, a_scale, w, w_scale, counts, out, row_base, cfg, raster, swizzle)
    if row_base is not None and tile_map is None:
        tile_map = _tile_map(counts, bm, triton.cdiv(M, bm) + G, row_base)
    max_tiles = triton.cdiv(M, bm) + G
    te, tr0, tr1, valid_m = tile_map if tile_map is not None else _tile_map(counts, bm, max_tiles)
    programs = max_tiles * (N // bn)
    if persistent:
        programs = min(programs, _num_sms(a.device))
    _grouped_fp8_kernel[(programs,)](
        a, a_scale, w, w_scale, out, te, tr0, tr1, valid_m, max_tiles, N, K,
        a.stride(0), a_scale.stride(0), w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK, GROUP_M=group_m, PERSISTENT=persistent,
        num_warps=warps, num_stages=stages)
    return out


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def grouped_swiglu_fp8(xq: torch.Tensor, xs: torch.Tensor, w13, w13_scale, w2, w2_scale,
                       counts: torch.Tensor, out_dtype=torch.bfloat16, out=None,
                       row_range: torch.Tensor | None = None, rows_per_group: float | None = None) -> torch.Tensor:
    """The routed-expert MLP in FP8: gate/up GEMM, fused SwiGLU + re-quantisation, down GEMM.

    ``row_range`` (device tensor [r0, r1]): the groups' rows are r0..r1 of ``xq`` / ``xs`` /
    ``out`` (one segment of a buffer sorted by expert), found on the device: no host sync,
    so a split MoE launches its segments while earlier work still runs (the host would
    otherwise wait for the boundaries and the GPU idle while it launches). Other rows of
    ``out`` are left alone. ``rows_per_group``: the tile-shape hint when ``xq`` holds more
    rows than these groups'."""
    M, G = xq.shape[0], counts.numel()
    rpg = rows_per_group if rows_per_group is not None else M / max(1, G)
    base = None if row_range is None else row_range[:1]
    h = torch.empty((M, w13.shape[1]), dtype=out_dtype, device=xq.device)
    if out is None:
        out = torch.empty((M, w2.shape[1]), dtype=out_dtype, device=xq.device)
    # The second GEMM's activations are fresh contiguous buffers: its weights decide.
    kernel = ("cutlass" if M and cutlass_applies(xq, xs, w13, w13_scale, counts, h, rpg)
              and _cutlass_weight_ok(w2, w2_scale) and out.dtype == torch.bfloat16 and out.data_ptr() % 16 == 0
              and out.stride(0) % 8 == 0 else "triton")
    tmap = None
    if kernel == "triton" and M:
        bm = _config(rpg, w13.shape[1])[0]  # the tile height depends on rows per group only: one map for both GEMMs
        tmap = _tile_map(counts, bm, triton.cdiv(M, bm) + G, base)
    ranged = row_range is not None
    grouped_gemm_fp8(xq, xs, w13, w13_scale, counts, out_dtype, tmap, h, rows_per_group=rpg, persistent=ranged,
                     row_base=base, kernel=kernel)
    hq, hs = quantize_rows(h, swiglu=True, row_range=row_range)
    return grouped_gemm_fp8(hq, hs, w2, w2_scale, counts, out_dtype, tmap, out, rows_per_group=rpg,
                            persistent=ranged, row_base=base, kernel=kernel)


# bf16 experts at decode sizes (a few rows per expert): torch's grouped GEMM reads the
# weights at ~70% of copy bandwidth there; this tile shape streams them (decode_gpu.py).
DECODE_BF16 = {"bm": 32, "bn": 128, "bk": 128, "warps": 4, "stages": 5, "group_m": 1}


def grouped_gemm_bf16(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, tile_map=None, cfg=None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """out[rows of group g] = a[rows] @ w[g].T for consecutive row groups (bf16, no scales)."""
    c = {**DECODE_BF16, **(cfg or {})}
    M, K = a.shape
    G, N, Kw = w.shape
    if Kw != K or K % c["bk"] or N % c["bn"] or a.stride(1) != 1 or w.stride(2) != 1:
        raise ValueError(f"bf16 grouped GEMM: shapes a {tuple(a.shape)} w {tuple(w.shape)} do not tile")
    out = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
    if M == 0:
        return out
    max_tiles = triton.cdiv(M, c["bm"]) + G
    te, tr0, tr1, valid_m = tile_map if tile_map is not None else _tile_map(counts, c["bm"], max_tiles)
    _grouped_fp8_kernel[(max_tiles * (N // c["bn"]),)](
        a, a, w, w, out, te, tr0, tr1, valid_m, max_tiles, N, K, a.stride(0), 0, w.stride(0), w.stride(1), 0, 0,
        out.stride(0), BLOCK_M=c["bm"], BLOCK_N=c["bn"], BLOCK_K=c["bk"], GROUP_M=c["group_m"], SCALED=False,
        num_warps=c["warps"], num_stages=c["stages"])
    return out


def bf16_decode_shapes(rows: int, groups: int, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Use :func:`grouped_swiglu_bf16` for this many rows over these experts."""
    c = DECODE_BF16
    return (rows <= 8 * groups and w13.shape[-1] % c["bk"] == 0 and w2.shape[-1] % c["bk"] == 0
            and w13.shape[1] % c["bn"] == 0 and w2.shape[1] % c["bn"] == 0)


def grouped_swiglu_bf16(x: torch.Tensor, w13, w2, counts: torch.Tensor, cfg=None) -> torch.Tensor:
    from .moe_epilogue import silu_mul

    c = {**DECODE_BF16, **(cfg or {})}
    M, G = x.shape[0], counts.numel()
    tmap = _tile_map(counts, c["bm"], triton.cdiv(M, c["bm"]) + G) if M else None
    h = grouped_gemm_bf16(x, w13, counts, tmap, c)
    return grouped_gemm_bf16(silu_mul(h), w2, counts, tmap, c)
