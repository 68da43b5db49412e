"""FP8 block quantisation against a float64 reference."""

from __future__ import annotations

import torch

from dwdp.quant import FP8_MAX, dequantize_fp8_blockwise, quantize_fp8_blockwise


def _reference_dequant(q, s, block=128):
    rows, cols = q.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(0, rows, block):
        for j in range(0, cols, block):
            out[i:i + block, j:j + block] = q[i:i + block, j:j + block].double() * float(s[i // block, j // block])
    return out


def test_roundtrip_padded_shape_and_block_maxima():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 260, generator=g) * 3
    w[128:256, 128:256] = 0  # an all-zero block
    q, s = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.shape == (3, 3)
    assert s[1, 1] == 1.0 and torch.all(q[128:256, 128:256].float() == 0)
    # Each non-zero block's largest magnitude lands on the largest e4m3 value.
    for i in range(3):
        for j in range(3):
            blk = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float().abs()
            if (i, j) != (1, 1):
                assert blk.max() == FP8_MAX
    got = dequantize_fp8_blockwise(q, s)
    torch.testing.assert_close(got.double(), _reference_dequant(q, s), rtol=1e-7, atol=0)
    err = (got - w).norm() / w.norm()
    assert err < 0.04  # e4m3 has 3 mantissa bits: ~2-3% relative error on Gaussian weights


def test_batched_experts_equal_per_matrix():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 200, 130, generator=g)
    q, s = quantize_fp8_blockwise(w)
    assert s.shape == (4, 2, 2)
    for e in range(4):
        qe, se = quantize_fp8_blockwise(w[e])
        assert torch.equal(q[e].float(), qe.float()) and torch.equal(s[e], se)
        assert torch.equal(dequantize_fp8_blockwise(q, s)[e], dequantize_fp8_blockwise(qe, se))
    assert dequantize_fp8_blockwise(q, s, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_experts_compute_in_chunks_equals_whole_dequant(monkeypatch):
    """The FP8 expert path widens a few experts at a time; the result equals widening the
    whole segment first (same values, same per-expert kernels)."""
    import dwdp.models.moe as moe
    from dwdp.models.moe import ExpertSegment, routed_experts_forward

    g = torch.Generator().manual_seed(2)
    E, H, I, T, K = 37, 64, 32, 90, 4
    q13, s13 = quantize_fp8_blockwise(torch.randn(E, 2 * I, H, generator=g) * 0.1)
    q2, s2 = quantize_fp8_blockwise(torch.randn(E, H, I, generator=g) * 0.1)
    fp8 = ExpertSegment(0, q13, q2, s13, s2)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    monkeypatch.setattr(moe, "FP8_WIDEN_CHUNK", 5)
    # Split across two segments as DWDP does (resident + slot), chunk boundaries inside both.
    split = [ExpertSegment(0, q13[:12], q2[:12], s13[:12], s2[:12]),
             ExpertSegment(12, q13[12:], q2[12:], s13[12:], s2[12:])]
    got = routed_experts_forward(x, ids, w, split, E)
    want = routed_experts_forward(x, ids, w, [fp8.dequantized(torch.float32)], E)
    assert torch.equal(got, want)
