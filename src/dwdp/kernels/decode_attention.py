"""Decode attention in Triton: one new query per sequence over its slot of the KV cache.

Split-K ("flash-decoding"): each program takes one sequence, one block of query heads
that share a KV head, and one contiguous chunk of the sequence's keys, and writes a
partial output with its log-sum-exp; a small reduction merges the chunks. Reading a key
tile once for all the query heads of its group is what makes GQA decode bandwidth-bound
rather than launch-bound, and the chunking keeps every SM busy at small batch.

Chunk bounds are computed on the device from each sequence's length, so the launch does
not depend on the lengths: it can be captured in a CUDA graph.

MLA decodes in the absorbed form (one "KV head" of width kv_lora_rank + rope dim): the
key is ``[latent | roped key]`` and the value the latent itself (``V_IS_K``), read once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, len_ptr, o_ptr, lse_ptr, scale_log2,
    s_qb, s_qh, s_ks, s_kl, s_kh, s_vs, s_vl, s_vh, s_ob, s_oh, s_os, s_lb, s_lh,
    G: tl.constexpr, HB_PER_KV: tl.constexpr, BLOCK_H: tl.constexpr, DM: tl.constexpr, DT: tl.constexpr,
    DV: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, V_IS_K: tl.constexpr,
):
    # Head blocks vary fastest: the programs that read the same keys (one KV head's query
    # heads, split over blocks; MLA's 128 heads share one latent) run together and share
    # the key tiles through L2.
    b = tl.program_id(1)
    kvh = tl.program_id(0) // HB_PER_KV
    hb = tl.program_id(0) % HB_PER_KV
    split = tl.program_id(2)
    hh = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hh < G
    heads = kvh * G + hh
    slot = tl.load(slot_ptr + b).to(tl.int64)
    L = tl.load(len_ptr + b)
    chunk = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, L)

    dm = tl.arange(0, DM)
    dv = tl.arange(0, DV)
    q_rows = q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh
    q = tl.load(q_rows + dm[None, :], mask=hmask[:, None], other=0.0)
    if DT > 0:
        dt = tl.arange(0, DT)
        qt = tl.load(q_rows + DM + dt[None, :], mask=hmask[:, None], other=0.0)
    k_base = k_ptr + slot * s_ks + kvh * s_kh
    v_base = v_ptr + slot * s_vs + kvh * s_vh

    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    lsum = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, DV), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < end
        k = tl.load(k_base + offs[:, None].to(tl.int64) * s_kl + dm[None, :], mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k))
        if DT > 0:
            kt = tl.load(k_base + offs[:, None].to(tl.int64) * s_kl + DM + dt[None, :], mask=nmask[:, None],
                         other=0.0)
            s += tl.dot(qt, tl.trans(kt))
        s = tl.where(nmask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        lsum = lsum * alpha + tl.sum(p, 1)
        if V_IS_K:
            v = k
        else:
            v = tl.load(v_base + offs[:, None].to(tl.int64) * s_vl + dv[None, :], mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    out = acc / tl.maximum(lsum, 1e-30)[:, None]
    o_rows = o_ptr + b.to(tl.int64) * s_ob + heads[:, None] * s_oh + split * s_os
    tl.store(o_rows + dv[None, :], out, mask=hmask[:, None])
    lse = tl.where(lsum > 0, m + tl.log2(tl.maximum(lsum, 1e-30)), float("-inf"))
    tl.store(lse_ptr + b.to(tl.int64) * s_lb + heads * s_lh + split, lse, mask=hmask)


# Tile shapes, chosen on an H200 with benchmarks/tune_decode.py (batch 64, 8K context).
GQA_CONFIG = {"block_h": 64, "block_n": 128, "warps": 8, "stages": 2}
MLA_CONFIG = {"block_h": 64, "block_n": 64, "warps": 8, "stages": 2}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SMS: dict[int, int] = {}


def num_splits(batch: int, kv_heads: int, head_blocks: int, max_context: int, device: torch.device) -> int:
    """Key chunks per sequence: enough programs for ~4 waves over the SMs, none under 256 keys."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    want = math.ceil(4 * _SMS[idx] / max(1, batch * kv_heads * head_blocks))
    return max(1, min(want, math.ceil(max_context / 256), 64))


def _parts(dk: int, dv: int, v_is_k: bool) -> tuple[int, int]:
    dm = dv if v_is_k else dk
    return dm, dk - dm


def supported(dk: int, dv: int, v_is_k: bool = False) -> bool:
    """The kernel's shapes: key (latent) and value widths powers of two >= 16, an optional
    rope tail likewise (tl.dot's smallest K)."""
    def ok(n: int) -> bool:
        return n >= 16 and _pow2(n) == n

    dm, dt = _parts(dk, dv, v_is_k)
    return ok(dm) and ok(dv) and (dt == 0 or ok(dt))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float, max_context: int, v_is_k: bool = False,
                     config: dict | None = None) -> torch.Tensor:
    """q [B, H, Dk]; k_cache [S, L, Hkv, Dk]; v_cache [S, L, Hkv, Dv] (with ``v_is_k``: the
    first Dv columns of k_cache); slots / lens [B] on the device -> [B, H, Dv] in q's dtype.

    ``max_context`` only sizes the split count (the capacity, not the batch's lengths)."""
    B, H, Dk = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[-1]
    G = H // Hkv
    DM, DT = _parts(Dk, Dv, v_is_k)
    if not supported(Dk, Dv, v_is_k):
        raise ValueError(f"decode attention kernel: head dims {Dk}/{Dv} unsupported (see supported())")
    c = {**(MLA_CONFIG if DM + DT >= 512 else GQA_CONFIG), **(config or {})}
    BLOCK_H = max(16, min(_pow2(G), c["block_h"]))
    hb = triton.cdiv(G, BLOCK_H)
    BLOCK_N = c["block_n"]
    splits = c.get("splits") or num_splits(B, Hkv, hb, max_context, q.device)
    q = q.contiguous()
    o = torch.empty(B, H, splits, Dv, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    if B:
        _decode_split_kernel[(Hkv * hb, B, splits)](
            q, k_cache, v_cache, slots, lens, o, lse, scale * 1.4426950408889634,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1), o.stride(2),
            lse.stride(0), lse.stride(1),
            G=G, HB_PER_KV=hb, BLOCK_H=BLOCK_H, DM=DM, DT=DT, DV=Dv, BLOCK_N=BLOCK_N, NUM_SPLITS=splits,
            V_IS_K=v_is_k, num_warps=c["warps"], num_stages=c["stages"],
        )
    w = torch.softmax(lse * math.log(2.0), dim=-1)  # merge the chunks by their log-sum-exp
    return (o * w[..., None]).sum(2).to(q.dtype)
