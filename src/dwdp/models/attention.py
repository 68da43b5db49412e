"""Causal attention over a packed batch of variable-length sequences.

Each sequence attends to its own cached prefix (chunked prefill) plus its new tokens,
causally aligned bottom-right. On CUDA a sequence of at least ``CUDNN_MIN_TOKENS`` new
tokens goes to cuDNN's fused attention: 0.56-0.65 of the H200 bf16 peak where the
variable-length FlashAttention-2 kernel reaches 0.22-0.35 (benchmarks/vendor_kernels.py).
A chunk with a cached prefix is two cuDNN calls, its queries over the prefix (no mask) and
over its own keys (causal), merged by their log-sum-exps (cuDNN has no bottom-right causal
mask). Shorter sequences run in PyTorch's varlen kernel (``torch.nn.attention.varlen``),
one call per run of consecutive ones; everywhere else a per-sequence SDPA call, which is
also the reference path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # older torch
        return None
    return varlen_attn


@functools.lru_cache(maxsize=1)
def _causal_kwargs() -> dict:
    """torch 2.11 spells causal as a (-1, 0) window; later releases add ``is_causal``."""
    import inspect

    params = inspect.signature(_varlen_attn()).parameters
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


_BACKEND = {"cuda": "auto"}
_NATIVE_GQA = {"ok": True}
# Below this many tokens a sequence's attention is short next to a launch and the varlen
# kernel's one call for a run of sequences is cheaper than one cuDNN call each.
CUDNN_MIN_TOKENS = 1024
_CUDNN = {"ok": True, "gqa": True}
MERGE_HEADS = 16  # heads merged per float32 pass (a 16K-token MLA chunk: 134 MB, not 1 GB, per temporary)


def set_cuda_attention_backend(name: str) -> None:
    """'auto' (cuDNN for sequences of at least CUDNN_MIN_TOKENS new tokens, the varlen kernel
    for the rest), 'varlen' (the varlen kernel for every sequence) or 'sdpa' (per-sequence
    SDPA). Setting it also forgets a cuDNN refusal seen before."""
    if name not in ("auto", "sdpa", "varlen"):
        raise ValueError(f"attention backend {name!r}: choose auto, sdpa or varlen")
    _BACKEND["cuda"] = name
    _CUDNN.update(ok=True, gqa=True)


def packed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    scale: float,
    cu_q_dev: torch.Tensor | None = None,
    cu_k_dev: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [Tq, Hq, D]; k: [Tk, Hkv, D]; v: [Tk, Hkv, Dv] -> [Tq, Hq, Dv].

    Sequence i's queries are rows cu_q[i]:cu_q[i+1] and its keys cu_k[i]:cu_k[i+1];
    a sequence's keys are its prefix followed by its new tokens (so Tk_i >= Tq_i).
    """
    if q.is_cuda and _BACKEND["cuda"] == "auto" and _CUDNN["ok"] and q.dtype in (torch.float16, torch.bfloat16):
        out = _cudnn_and_varlen(q, k, v, cu_q, cu_k, scale, cu_q_dev, cu_k_dev)
        if out is not None:
            return out
    return _varlen_or_sdpa(q, k, v, cu_q, cu_k, scale, cu_q_dev, cu_k_dev)


def _varlen_or_sdpa(q, k, v, cu_q, cu_k, scale, cu_q_dev, cu_k_dev):
    """The varlen kernel where it applies, else per-sequence SDPA (the reference)."""
    if q.is_cuda and _BACKEND["cuda"] != "sdpa" and _varlen_attn() is not None:
        out = _try_varlen(q, k, v, cu_q, cu_k, scale, cu_q_dev, cu_k_dev)
        if out is not None:
            return out
    return _sdpa_per_sequence(q, k, v, cu_q, cu_k, scale)


def _cudnn_causal(q, k, v, scale, native_gqa: bool | None = None):
    """One sequence's new tokens, q [N, Hq, D], over its keys k [P + N, Hkv, D], v [P + N,
    Hkv, Dv] (a cached prefix of P first) -> [N, Hq, Dv] through cuDNN; None where cuDNN
    refuses it (then not tried again until the backend is set anew). Running out of memory
    is raised as it is: it says nothing about cuDNN."""
    hq, hkv = q.shape[1], k.shape[1]
    native = _CUDNN["gqa"] if native_gqa is None else native_gqa
    qi, ki, vi = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if hkv != hq and not native:
        ki, vi = ki.repeat_interleave(hq // hkv, dim=1), vi.repeat_interleave(hq // hkv, dim=1)
    try:
        P = k.shape[0] - q.shape[0]
        if P == 0:
            o = _cudnn_sdpa(qi, ki, vi, True, scale)[0]
        else:  # softmax over [prefix | own keys] = the two partial softmaxes weighted by their mass
            oa, la = _cudnn_sdpa(qi, ki[:, :, :P], vi[:, :, :P], False, scale)
            ob, lb = _cudnn_sdpa(qi, ki[:, :, P:], vi[:, :, P:], True, scale)
            wa = torch.sigmoid(la - lb)  # the prefix's share of the softmax mass, per query
            o = torch.empty_like(oa)
            for h in range(0, hq, MERGE_HEADS):  # float32 a few heads at a time: bounded temporaries
                hs = slice(h, h + MERGE_HEADS)
                o[:, hs] = torch.lerp(ob[:, hs].float(), oa[:, hs].float(), wa[:, hs]).to(o.dtype)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError) as e:
        if hkv != hq and native:  # perhaps no native GQA here: try repeated K/V once
            out = _cudnn_causal(q, k, v, scale, native_gqa=False)
            if out is not None:
                _CUDNN["gqa"] = False  # it was the GQA: repeat K/V from now on
            return out
        _CUDNN["ok"] = False
        _warn_once(f"cuDNN attention unavailable, using the varlen kernel: {e}")
        return None
    _CUDNN["calls"] = _CUDNN.get("calls", 0) + 1  # read by the GPU tests: the path was taken
    return o[0].transpose(0, 1)


def _cudnn_sdpa(q, k, v, causal: bool, scale: float):
    """cuDNN attention of [1, H, S, D] views: (output, log-sum-exp [1, H, S, 1] float32)."""
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    try:  # the packed layout as strided views; a copy where cuDNN wants its own layout
        out = op(q, k, v, None, True, 0.0, causal, False, scale=scale)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        out = op(q.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def _cudnn_and_varlen(q, k, v, cu_q, cu_k, scale, cu_q_dev, cu_k_dev):
    """Sequences of at least ``CUDNN_MIN_TOKENS`` new tokens through cuDNN, each run of the
    other sequences through one varlen call (its cumulative lengths sliced from the batch's
    device copy: no host transfer). None when no sequence qualifies (the caller runs the
    whole batch as one varlen call)."""
    n = len(cu_q) - 1
    long_ = [cu_q[i + 1] - cu_q[i] >= CUDNN_MIN_TOKENS for i in range(n)]
    if not any(long_):
        return None
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    i = 0
    while i < n:
        if long_[i]:
            q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
            o = _cudnn_causal(q[q0:q1], k[k0:k1], v[k0:k1], scale)
            if o is None:
                return None
            out[q0:q1] = o
            i += 1
            continue
        j = i
        while j < n and not long_[j]:
            j += 1
        q0, q1, k0, k1 = cu_q[i], cu_q[j], cu_k[i], cu_k[j]
        sub_q = [c - q0 for c in cu_q[i:j + 1]]
        sub_k = [c - k0 for c in cu_k[i:j + 1]]
        dq = None if cu_q_dev is None else cu_q_dev[i:j + 1] - cu_q_dev[i]
        dk = None if cu_k_dev is None else cu_k_dev[i:j + 1] - cu_k_dev[i]
        out[q0:q1] = _varlen_or_sdpa(q[q0:q1], k[k0:k1], v[k0:k1], sub_q, sub_k, scale, dq, dk)
        i = j
    return out


def _sdpa_per_sequence(q, k, v, cu_q, cu_k, scale):
    hq, hkv = q.shape[1], k.shape[1]
    out = q.new_empty(q.shape[0], hq, v.shape[-1])
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        nq, nk = q1 - q0, k1 - k0
        if nq == 0:
            continue
        qi = q[q0:q1].transpose(0, 1)
        ki = k[k0:k1].transpose(0, 1)
        vi = v[k0:k1].transpose(0, 1)
        if hkv != hq:
            ki = ki.repeat_interleave(hq // hkv, dim=0)
            vi = vi.repeat_interleave(hq // hkv, dim=0)
        if nq == nk:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:  # prefix present: query j sees keys [0, nk - nq + j]
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[q0:q1] = o.transpose(0, 1)
    return out


def _try_varlen(q, k, v, cu_q, cu_k, scale, cu_q_dev, cu_k_dev):
    v_in = v
    if q.dtype not in (torch.float16, torch.bfloat16):
        return None
    d, dv = q.shape[-1], v.shape[-1]
    if dv > d:
        return None
    if dv < d:  # the kernel needs one head dim: pad V (MLA has d=192, dv=128), then slice
        v = F.pad(v, (0, d - dv))
    if cu_q_dev is None:
        cu_q_dev = torch.tensor(cu_q, dtype=torch.int32, device=q.device)
    if cu_k_dev is None:
        cu_k_dev = cu_q_dev if cu_k == cu_q else torch.tensor(cu_k, dtype=torch.int32, device=q.device)
    max_q = max(b - a for a, b in zip(cu_q[:-1], cu_q[1:]))
    max_k = max(b - a for a, b in zip(cu_k[:-1], cu_k[1:]))
    hq, hkv = q.shape[1], k.shape[1]
    if hkv != hq and not _NATIVE_GQA["ok"]:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    try:
        # GQA as is (the kernel maps query heads onto KV heads; bitwise equal to repeating
        # K/V and 13% faster on H200 for 64/4 heads).
        out = _varlen_attn()(q, k.contiguous(), v.contiguous(), cu_q_dev, cu_k_dev, max_q, max_k,
                             scale=scale, **_causal_kwargs())
    except (RuntimeError, TypeError) as e:  # unsupported shape/arch: fall back, once noted
        if hkv != hq and _NATIVE_GQA["ok"]:  # a kernel without GQA: repeat K/V from now on
            _NATIVE_GQA["ok"] = False
            return _try_varlen(q, k, v_in, cu_q, cu_k, scale, cu_q_dev, cu_k_dev)
        if _BACKEND["cuda"] == "varlen":
            raise
        _warn_once(f"varlen attention unavailable, using per-sequence SDPA: {str(e)[:200]}")
        return None
    if isinstance(out, tuple):
        out = out[0]
    return out[..., :dv]


@functools.lru_cache(maxsize=8)
def _warn_once(msg: str) -> None:
    import warnings

    warnings.warn(msg[:300], stacklevel=3)


def decode_kernel_applies(t: torch.Tensor, dk: int, dv: int, v_is_k: bool) -> bool:
    from .. import kernels

    if not (kernels.enabled(t) and t.dtype in (torch.float16, torch.bfloat16)):
        return False
    from ..kernels.decode_attention import supported

    return supported(dk, dv, v_is_k)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float, max_len: int | None = None, v_is_k: bool = False
                     ) -> torch.Tensor:
    """One query per sequence over its cache slot: q [B, H, Dk]; k_cache [S, L, Hkv, Dk];
    v_cache [S, L, Hkv, Dv]; sequence b reads slot ``slots[b]``, keys [0, lens[b]).

    On CUDA the Triton split-K kernel (no host sync: CUDA-graph safe); elsewhere the
    reference below, which reads keys up to ``max_len`` (default: the longest, a sync)."""
    if decode_kernel_applies(q, q.shape[-1], v_cache.shape[-1], v_is_k):
        from ..kernels.decode_attention import decode_attention as triton_decode

        return triton_decode(q, k_cache, v_cache, slots, lens, scale, k_cache.shape[1], v_is_k)
    return decode_attention_reference(q, k_cache, v_cache, slots, lens, scale, max_len)


def decode_attention_reference(q, k_cache, v_cache, slots, lens, scale, max_len=None) -> torch.Tensor:
    B, H, D = q.shape
    hkv = k_cache.shape[2]
    n = int(lens.max()) if max_len is None else max_len
    k = k_cache[slots, :n].float()  # [B, n, Hkv, D]
    v = v_cache[slots, :n].float()
    s = torch.einsum("bkgd,bnkd->bkgn", q.float().view(B, hkv, H // hkv, D), k) * scale
    valid = torch.arange(n, device=q.device)[None, :] < lens[:, None]
    p = torch.softmax(s.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    return torch.einsum("bkgn,bnkd->bkgd", p, v).reshape(B, H, -1).to(q.dtype)
