"""Triton kernels for expert parallelism's (DEP's) dispatch and receive paths.

* ``scatter_rows``: the dispatch pack. Each token's row is read once and written to every
  send slot it has (one per destination rank), straight into the send buffer's columns:
  no gather-then-concatenate.
* ``gather_rows``: the receiver's permute of received rows into expert order.
* ``gather_reduce``: ``out[t] = sum_j w[t, j] * y[pos[t, j]]`` over the ``pos >= 0``
  entries, accumulated in fp32 in one pass (no atomics). The receiver uses it to sum
  each received token's expert outputs, with the routing weights; the sender uses it
  (without weights) to add the partial rows that came back from the ranks it visited.

Rows are copied as raw bits: callers pass same-size integer views (fp8 as uint8...), so
one kernel serves every dtype. PyTorch fallbacks live in :mod:`dwdp.parallel.ep_dispatch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scatter_rows_kernel(src_ptr, slot_ptr, dst_ptr, C, s_src, s_slot, s_dst, J: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    v = tl.load(src_ptr + t.to(tl.int64) * s_src + cols, mask=mask)
    for j in tl.static_range(J):
        r = tl.load(slot_ptr + t.to(tl.int64) * s_slot + j).to(tl.int64)
        tl.store(dst_ptr + r * s_dst + cols, v, mask=mask & (r >= 0))


def scatter_rows(src: torch.Tensor, slot: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[slot[t, j]] = src[t] for every slot[t, j] >= 0 (src, dst: same dtype, unit column stride)."""
    T, C = src.shape
    if T == 0:
        return
    bc = min(1024, triton.next_power_of_2(C))
    _scatter_rows_kernel[(T, triton.cdiv(C, bc))](src, slot, dst, C, src.stride(0), slot.stride(0), dst.stride(0),
                                                  J=slot.shape[1], BLOCK_C=bc, num_warps=4)


@triton.jit(do_not_specialize=["M"])  # rows vary per step: one compiled variant
def _gather_rows_kernel(src_ptr, idx_ptr, dst_ptr, M, C, s_src, s_dst, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < C)
    src_rows = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    v = tl.load(src_ptr + src_rows[:, None] * s_src + cols[None, :], mask=mask)
    tl.store(dst_ptr + rows[:, None].to(tl.int64) * s_dst + cols[None, :], v, mask=mask)


def gather_rows(src: torch.Tensor, idx: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[i] = src[idx[i]] for i < len(idx)."""
    M, C = idx.numel(), src.shape[1]
    if M == 0:
        return
    bc = min(512, triton.next_power_of_2(C))
    _gather_rows_kernel[(triton.cdiv(M, 4), triton.cdiv(C, bc))](src, idx, dst, M, C, src.stride(0), dst.stride(0),
                                                                 BLOCK_R=4, BLOCK_C=bc, num_warps=4)


@triton.jit
def _gather_reduce_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, H, s_ym, s_pt, s_wt, s_om, J: tl.constexpr,
                          HAS_W: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(J):
        r = tl.load(pos_ptr + t * s_pt + j).to(tl.int64)
        v = tl.load(y_ptr + r * s_ym + cols, mask=mask & (r >= 0), other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t * s_wt + j).to(tl.float32)
        acc += v
    tl.store(out_ptr + t * s_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_reduce(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor) -> None:
    """out[t] = sum over j with pos[t, j] >= 0 of weights[t, j] * y[pos[t, j]] (weights 1 if None)."""
    T, J = pos.shape
    H = out.shape[1]
    if T == 0:
        return
    bh = min(1024, triton.next_power_of_2(H))
    w = weights if weights is not None else pos
    _gather_reduce_kernel[(T, triton.cdiv(H, bh))](y, pos, w, out, H, y.stride(0), pos.stride(0), w.stride(0),
                                                   out.stride(0), J=J, HAS_W=weights is not None, BLOCK_H=bh,
                                                   num_warps=4)
