"""Block-scaled FP8 dense GEMM for the projections: ``y = (xq * xs) @ (w * ws).T``.

Weights ``w [N, K]`` e4m3 with one fp32 scale per 128 x 128 block (``ws [ceil(N/128),
K/128]``, as the releases ship them), activations ``xq [M, K]`` e4m3 quantised per token
and per 128 columns (``xs [M, K/128]``). Two backends:

- ``scaled_mm``: torch's ``_scaled_mm`` with the block-wise 1x128 x 128x128 recipe
  (cuBLASLt on SM90), where this torch build has it and the shape suits it (N and K
  multiples of 128);
- ``triton``: the kernel below, any N (a partial last 128-column block, e.g.
  DeepSeek-V3's kv_a_proj_with_mqa N = 576), K a multiple of 128.

``auto`` takes ``scaled_mm`` where it works (found once per process, on a small problem
checked against the Triton kernel) and the Triton kernel elsewhere, with one log line.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

BLOCK = 128
_BACKEND = {"cuda": "auto"}
log = logging.getLogger(__name__)


def set_backend(name: str) -> None:
    """'auto', 'scaled_mm' or 'triton' (benchmarks compare them)."""
    if name not in ("auto", "scaled_mm", "triton"):
        raise ValueError(f"FP8 dense backend {name!r}: choose auto, scaled_mm or triton")
    _BACKEND["cuda"] = name


@triton.jit(do_not_specialize=["M"])  # rows vary per step: one compiled variant
def _fp8_dense_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, s_am, s_asm, s_ask, s_bn, s_bsn, s_cm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # GROUP_M row tiles walk all column tiles together: their activations and the weight
    # columns they share are re-read from L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * s_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * s_bn + offs_k[:, None]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * s_asm
    bs_ptrs = bs_ptr + (offs_n // 128) * s_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        sa = tl.load(as_ptrs + kb * s_ask, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptrs + kb, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * s_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config(M: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages, GROUP_M): 128x128 tiles for prefill, short M tiles
    for decode-sized batches (a few rows: the weights stream once)."""
    if M <= 32:
        return 32, 128, 4, 5, 1
    if M <= 128:
        return 64, 128, 4, 4, 8
    return 128, 128, 8, 4, 8


def gemm_triton(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    M, K = xq.shape
    N = w.shape[0]
    if K % BLOCK or w.shape[1] != K:
        raise ValueError(f"FP8 dense GEMM needs K a multiple of {BLOCK} (x {tuple(xq.shape)}, w {tuple(w.shape)})")
    out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if M == 0:
        return out
    bm, bn, warps, stages, group_m = _config(M)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fp8_dense_kernel[grid](xq, xs, w, ws, out, M, N, K, xq.stride(0), xs.stride(0), xs.stride(1), w.stride(0),
                            ws.stride(0), out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK, GROUP_M=group_m,
                            num_warps=warps, num_stages=stages)
    return out


def gemm_scaled_mm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """torch's block-wise ``_scaled_mm``: activation scales M-major [M, K/128] (strides
    (1, M); copied into that layout if given K-major), weight scales [K/128, N/128] as a
    transposed view of the stored grid."""
    if xs.stride(0) != 1 or xs.stride(1) != xs.shape[0]:
        xs = xs.t().contiguous().t()
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws.t(), out_dtype=out_dtype)


# cuBLASLt's block-wise FP8 GEMM (H100, torch 2.11) refused M = 1 and M = 777 (the M-major
# activation scales' leading dimension) and returned garbage for K = 640 (weight-scale
# rows of 5 floats): activations are padded to ROW_PAD rows by the quantiser, and K must
# be a multiple of 512 (16-byte weight-scale rows); other shapes take the Triton kernel.
ROW_PAD = 16
_REFUSED: set[tuple[int, int]] = set()  # (N, K) cuBLASLt turned down in this process


@functools.lru_cache(maxsize=8)
def _scaled_mm_works(device: torch.device, ragged_n: bool) -> bool:
    """Does this torch build run the block-wise recipe here (N a multiple of 128, or not with
    ``ragged_n``), and agree with the Triton kernel?"""
    g = torch.Generator(device=device).manual_seed(0)
    M, N, K = 256, 320 if ragged_n else 256, 512
    xq = (torch.randn(M, K, device=device, generator=g) * 50).to(torch.float8_e4m3fn)
    w = (torch.randn(N, K, device=device, generator=g) * 50).to(torch.float8_e4m3fn)
    xs = torch.rand(M, K // BLOCK, device=device, generator=g) + 0.5
    ws = torch.rand(-(-N // BLOCK), K // BLOCK, device=device, generator=g) + 0.5
    try:
        got = gemm_scaled_mm(xq, xs, w, ws).float()
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        log.info("FP8 dense projections: torch block-wise _scaled_mm unavailable%s (%s); using the Triton kernel",
                 " for N not a multiple of 128" if ragged_n else "", str(e).splitlines()[0][:160])
        return False
    want = gemm_triton(xq, xs, w, ws).float()
    ok = bool(((got - want).norm() / want.norm()) < 1e-2)
    if not ok:
        log.warning("FP8 dense projections: torch block-wise _scaled_mm disagrees with the reference kernel here%s; "
                    "using the Triton kernel", " for N not a multiple of 128" if ragged_n else "")
    return ok


def use_scaled_mm(M: int, N: int, K: int, device: torch.device) -> bool:
    """Whether :func:`fp8_gemm` takes torch's ``_scaled_mm`` for this shape (then its
    activations should come padded to ROW_PAD rows with M-major scales)."""
    b = _BACKEND["cuda"]
    if device.type != "cuda" or b == "triton" or M == 0 or K % (4 * BLOCK) or (N, K) in _REFUSED:
        return False
    if b == "scaled_mm":
        return True
    return _scaled_mm_works(device, False) and (N % BLOCK == 0 or _scaled_mm_works(device, True))


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The block-scaled product through the chosen backend (see the module docstring). A
    shape cuBLASLt refuses outside graph capture runs on the Triton kernel from then on,
    with one log line."""
    M, K = xq.shape
    N = w.shape[0]
    if use_scaled_mm(M, N, K, xq.device):
        try:
            return gemm_scaled_mm(xq, xs, w, ws, out_dtype)
        except torch.OutOfMemoryError:
            raise  # says nothing about the shape
        except RuntimeError as e:
            if torch.cuda.is_current_stream_capturing() or _BACKEND["cuda"] == "scaled_mm":
                raise
            _REFUSED.add((N, K))
            log.warning("FP8 dense projections: cuBLASLt refused N=%d K=%d (%s); the Triton kernel runs them",
                        N, K, str(e).splitlines()[0][:120])
    return gemm_triton(xq, xs, w, ws, out_dtype)
