"""Prefill attention on CUDA (cuDNN for long sequences, a chunk with a prefix as two merged
cuDNN calls; the varlen kernel for short ones) against a float64 reference. GPU only:
skipped without CUDA."""

import pytest
import torch

from dwdp.models import attention as A

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _reference(q, k, v, cu_q, cu_k, scale):
    """float64, per sequence, queries aligned bottom-right on their keys."""
    hq, hkv = q.shape[1], k.shape[1]
    out = []
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i]:cu_q[i + 1]].double()
        ki = k[cu_k[i]:cu_k[i + 1]].double().repeat_interleave(hq // hkv, dim=1)
        vi = v[cu_k[i]:cu_k[i + 1]].double().repeat_interleave(hq // hkv, dim=1)
        nq, nk = qi.shape[0], ki.shape[0]
        s = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        out.append(torch.einsum("hqk,khd->qhd", p, vi))
    return torch.cat(out)


@pytest.mark.parametrize("heads,dims", [((8, 2), (128, 128)), ((8, 8), (192, 128))], ids=["gqa", "mla-dims"])
def test_packed_attention_cudnn_and_varlen_match_float64(heads, dims):
    torch.manual_seed(0)
    hq, hkv = heads
    d, dv = dims
    # (new tokens, cached prefix): long ones through cuDNN (a chunk with a prefix among them:
    # two calls merged), short ones through the varlen kernel (a chunk with a prefix last).
    seqs = [(2048, 0), (100, 0), (1200, 500), (1536, 0), (300, 200), (64, 0)]  # the last two: one varlen run
    cu_q, cu_k = [0], [0]
    for n, p in seqs:
        cu_q.append(cu_q[-1] + n)
        cu_k.append(cu_k[-1] + n + p)
    q = torch.randn(cu_q[-1], hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(cu_k[-1], hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(cu_k[-1], hkv, dv, device="cuda", dtype=torch.bfloat16)
    dq = torch.tensor(cu_q, dtype=torch.int32, device="cuda")
    dk = torch.tensor(cu_k, dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    ref = _reference(q, k, v, cu_q, cu_k, scale)
    before = A._CUDNN.get("calls", 0)
    out = A.packed_causal_attention(q, k, v, cu_q, cu_k, scale, dq, dk)
    assert A._CUDNN["ok"], "cuDNN attention was refused on this GPU"
    assert A._CUDNN.get("calls", 0) - before == 3  # the three long sequences
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (cu_q[-1], hq, dv) and rel < 1e-2, rel
    A.set_cuda_attention_backend("varlen")
    try:
        alt = A.packed_causal_attention(q, k, v, cu_q, cu_k, scale, dq, dk)
    finally:
        A.set_cuda_attention_backend("auto")
    assert ((alt.double() - ref).norm() / ref.norm()).item() < 1e-2
