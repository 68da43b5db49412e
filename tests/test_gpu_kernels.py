"""Triton kernels (FP8 grouped GEMM, fused MoE epilogues) against float64 references.

GPU only: skipped without CUDA and Triton (run on the GPU machine with
``PYTHONPATH=src python -m pytest tests/test_gpu_kernels.py``).
"""

import pytest
import torch

from dwdp import kernels
from dwdp.quant import dequantize_fp8_blockwise, quantize_fp8_blockwise

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.HAVE_TRITON),
                                reason="needs CUDA and Triton")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _group_ref(a64, w64, counts):
    """float64 grouped product: rows of group g times w[g].T."""
    out, r = [], 0
    for g, c in enumerate(counts.tolist()):
        out.append(a64[r:r + c] @ w64[g].T)
        r += c
    return torch.cat(out)


def test_quantize_rows_matches_per_group_reference():
    from dwdp.kernels.fp8_grouped import quantize_rows

    x = torch.randn(77, 512, device="cuda", dtype=torch.bfloat16) * 3
    x[5] = 0  # an all-zero row must not divide by zero
    q, s = quantize_rows(x)
    groups = x.double().view(77, 4, 128)
    amax = groups.abs().amax(-1)
    torch.testing.assert_close(s.double(), (amax / 448).clamp(min=1e-10 / 448), rtol=1e-6, atol=0)
    deq = (q.double().view(77, 4, 128) * s.double()[..., None]).view(77, 512)
    assert torch.isfinite(deq).all()
    assert _rel(deq, x) < 0.04  # e4m3: 3 mantissa bits
    # The fused SwiGLU variant quantises silu(gate) * up.
    h = torch.randn(33, 2 * 256, device="cuda", dtype=torch.bfloat16)
    q2, s2 = quantize_rows(h, swiglu=True)
    g, u = h.double().chunk(2, dim=-1)
    ref = torch.nn.functional.silu(g) * u
    assert _rel((q2.double().view(33, 2, 128) * s2.double()[..., None]).view(33, 256), ref) < 0.04


@pytest.mark.parametrize("counts", [[0, 300, 5, 0, 129, 64], [1000, 1, 700]])
def test_grouped_gemm_fp8_equals_float64_of_dequantized_operands(counts):
    from dwdp.kernels.fp8_grouped import grouped_gemm_fp8, quantize_rows

    torch.manual_seed(0)
    G, N, K = len(counts), 384, 512
    M = sum(counts)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    # The weights live inside a wider buffer (as in a DWDP slot row): a strided view.
    big = torch.randn(G, N + 128, K, device="cuda") * 0.05
    wq, ws = quantize_fp8_blockwise(big)
    w, w_scale = wq[:, :N], ws[:, :N // 128]
    aq, a_s = quantize_rows(a)
    cnt = torch.tensor(counts, device="cuda")
    out = grouped_gemm_fp8(aq, a_s, w, w_scale, cnt)
    a64 = (aq.double().view(M, K // 128, 128) * a_s.double()[..., None]).view(M, K)
    w64 = dequantize_fp8_blockwise(w, w_scale, torch.float64)
    ref = _group_ref(a64, w64, cnt)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    assert _rel(out, ref) < 4e-3  # fp32 accumulation + the bf16 output rounding only
    # Persistent: a few programs loop over the same tiles, each computed the same way.
    assert torch.equal(grouped_gemm_fp8(aq, a_s, w, w_scale, cnt, persistent=True), out)


def test_grouped_swiglu_fp8_close_to_bf16_experts():
    from dwdp.kernels.fp8_grouped import grouped_swiglu_fp8, quantize_rows

    torch.manual_seed(1)
    G, H, I = 8, 512, 256
    counts = torch.tensor([40, 0, 513, 7, 128, 90, 1, 300], device="cuda")
    M = int(counts.sum())
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(G, 2 * I, H, device="cuda") * 0.05
    w2 = torch.randn(G, H, I, device="cuda") * 0.05
    q13, s13 = quantize_fp8_blockwise(w13)
    q2, s2 = quantize_fp8_blockwise(w2)
    xq, xs = quantize_rows(x)
    y = grouped_swiglu_fp8(xq, xs, q13, s13, q2, s2, counts)
    h = _group_ref(x.double(), w13.double(), counts)
    g, u = h.chunk(2, dim=-1)
    ref = _group_ref(torch.nn.functional.silu(g) * u, w2.double(), counts)
    assert _rel(y, ref) < 0.08  # FP8 weights and activations (two roundings each) vs unquantised


def test_fused_epilogues_match_float64():
    from dwdp.kernels.moe_epilogue import silu_mul, weighted_combine

    h = torch.randn(100, 2 * 300, device="cuda", dtype=torch.bfloat16)
    g, u = h.double().chunk(2, dim=-1)
    assert _rel(silu_mul(h), torch.nn.functional.silu(g) * u) < 4e-3
    T, K, H = 50, 8, 1000
    ys = torch.randn(T * K, H, device="cuda", dtype=torch.bfloat16)
    order = torch.randperm(T * K, device="cuda")
    w = torch.rand(T, K, device="cuda")
    pos = torch.empty_like(order)
    pos[order] = torch.arange(T * K, device="cuda")
    ref = (w.double()[..., None] * ys.double()[pos].view(T, K, H)).sum(1)
    assert _rel(weighted_combine(ys, order, w), ref) < 4e-3


def test_moe_layer_fp8_on_split_segments_matches_float64():
    """routed_experts_forward with FP8 experts split over two base tensors (resident shard
    + slot) on CUDA equals a float64 MoE over the dequantised weights, up to FP8 activations."""
    from dwdp.models.moe import ExpertSegment, routed_experts_forward

    torch.manual_seed(2)
    E, H, I, K, T = 16, 256, 128, 4, 700
    w13 = torch.randn(E, 2 * I, H, device="cuda") * 0.05
    w2 = torch.randn(E, H, I, device="cuda") * 0.05
    q13, s13 = quantize_fp8_blockwise(w13)
    q2, s2 = quantize_fp8_blockwise(w2)
    segs = [ExpertSegment(4, q13[4:10], q2[4:10], s13[4:10], s2[4:10]),
            ExpertSegment(0, q13[:4], q2[:4], s13[:4], s2[:4]),
            ExpertSegment(10, q13[10:].clone(), q2[10:].clone(), s13[10:].clone(), s2[10:].clone())]
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    wts = torch.rand(T, K, device="cuda")
    y = routed_experts_forward(x, ids, wts, segs, E)
    d13 = dequantize_fp8_blockwise(q13, s13, torch.float64)
    d2 = dequantize_fp8_blockwise(q2, s2, torch.float64)
    ref = torch.zeros(T, H, dtype=torch.float64, device="cuda")
    for k in range(K):
        g, u = torch.einsum("th,tnh->tn", x.double(), d13[ids[:, k]]).chunk(2, dim=-1)
        ref += wts[:, k, None].double() * torch.einsum("ti,thi->th", torch.nn.functional.silu(g) * u, d2[ids[:, k]])
    assert _rel(y, ref) < 0.05


def test_quantize_rows_in_a_device_row_range_leaves_other_rows_alone():
    from dwdp.kernels.fp8_grouped import quantize_rows

    torch.manual_seed(3)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    full_q, full_s = quantize_rows(x, swiglu=True)
    for r0, r1 in ((37, 181), (0, 300), (120, 120)):
        q, s = quantize_rows(x, swiglu=True, row_range=torch.tensor([r0, r1], device="cuda"))
        assert torch.equal(q[r0:r1].float(), full_q[r0:r1].float()) and torch.equal(s[r0:r1], full_s[r0:r1])


def test_moe_layer_fp8_split_with_an_unrouted_segment():
    """A segment no token is routed to (its rows are empty on the device) adds nothing and
    leaves the other segments' rows intact: equal to the same experts in one segment."""
    from dwdp.models.moe import ExpertSegment, routed_experts_forward

    torch.manual_seed(4)
    E, H, I, K, T = 16, 256, 128, 2, 300
    q13, s13 = quantize_fp8_blockwise(torch.randn(E, 2 * I, H, device="cuda") * 0.05)
    q2, s2 = quantize_fp8_blockwise(torch.randn(E, H, I, device="cuda") * 0.05)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(8, device="cuda")[:K] for _ in range(T)])  # experts 8..15 unused
    wts = torch.rand(T, K, device="cuda")
    whole = routed_experts_forward(x, ids, wts, [ExpertSegment(0, q13, q2, s13, s2)], E)
    split = routed_experts_forward(x, ids, wts, [ExpertSegment(8, q13[8:], q2[8:], s13[8:], s2[8:]),
                                                 ExpertSegment(0, q13[:8], q2[:8], s13[:8], s2[:8])], E)
    assert torch.equal(split, whole)


def test_grouped_swiglu_fp8_on_a_device_row_range_equals_the_sliced_call():
    """Segment rows that start at a non-zero device offset (``row_range``, the tile map's
    ``row_base``) give bit-for-bit what the same call on the sliced rows gives, and the
    rows outside the range stay as they were."""
    from dwdp.kernels.fp8_grouped import grouped_swiglu_fp8, quantize_rows

    torch.manual_seed(5)
    G, H, I = 4, 256, 128
    counts = torch.tensor([40, 0, 200, 7], device="cuda")
    r0, n = 113, int(counts.sum())
    x = torch.randn(600, H, device="cuda", dtype=torch.bfloat16)
    q13, s13 = quantize_fp8_blockwise(torch.randn(G, 2 * I, H, device="cuda") * 0.05)
    q2, s2 = quantize_fp8_blockwise(torch.randn(G, H, I, device="cuda") * 0.05)
    xq, xs = quantize_rows(x)
    hint = n / G  # one tile shape for both calls
    ref = grouped_swiglu_fp8(xq[r0:r0 + n], xs[r0:r0 + n], q13, s13, q2, s2, counts, rows_per_group=hint)
    out = torch.full((600, H), 7.0, device="cuda", dtype=torch.bfloat16)
    grouped_swiglu_fp8(xq, xs, q13, s13, q2, s2, counts, out=out,
                       row_range=torch.tensor([r0, r0 + n], device="cuda"), rows_per_group=hint)
    assert torch.equal(out[r0:r0 + n], ref)
    assert (out[:r0] == 7).all() and (out[r0 + n:] == 7).all()


@pytest.mark.parametrize("bounds", [(4, 8, 0, 4, 8, 16), (0, 4, 8, 16, 4, 8)])
def test_moe_layer_fp8_three_segments_equal_one(bounds):
    """Three segments in any order, every one routed to (so two of them start at a
    non-zero row of the sorted buffer): bit-for-bit the same as one segment."""
    from dwdp.models.moe import ExpertSegment, routed_experts_forward

    torch.manual_seed(6)
    E, H, I, K, T = 16, 256, 128, 4, 500
    q13, s13 = quantize_fp8_blockwise(torch.randn(E, 2 * I, H, device="cuda") * 0.05)
    q2, s2 = quantize_fp8_blockwise(torch.randn(E, H, I, device="cuda") * 0.05)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    wts = torch.rand(T, K, device="cuda")
    whole = routed_experts_forward(x, ids, wts, [ExpertSegment(0, q13, q2, s13, s2)], E)
    segs = [ExpertSegment(a, q13[a:b], q2[a:b], s13[a:b], s2[a:b]) for a, b in zip(bounds[::2], bounds[1::2])]
    assert torch.equal(routed_experts_forward(x, ids, wts, segs, E), whole)


@pytest.mark.parametrize("streams", [1, 3])
def test_copy_engine_streams_wait_for_compute_and_join(streams):
    """Every copy stream waits for the submission's signal, ``done`` covers them all, and
    the compute stream's stall on the copies is what drain_wait_seconds reports."""
    from dwdp.parallel.copy_engine import CudaCopyEngine

    # ~5 ms of device sleep on the copy stream before the copies: compute must stall that long.
    eng = CudaCopyEngine(torch.device("cuda"), num_streams=streams, delay_cycles=10_000_000)
    src = torch.zeros(9, 1 << 20, device="cuda")
    dst = torch.empty_like(src)
    torch.cuda._sleep(20_000_000)  # the copies must not start before this compute finishes
    src.fill_(1.0)
    sig = eng.submit([(dst[i], src[i]) for i in range(9)], wait_for=eng.compute_signal())
    eng.compute_wait(sig)
    assert bool((dst == 1).all())
    stalled = eng.drain_wait_seconds()
    assert 1e-3 < stalled < 1.0, stalled
    assert eng.drain_wait_seconds() == 0.0  # drained



def _cutlass_or_skip():
    from dwdp.kernels import fp8_cutlass

    if fp8_cutlass.library() is None:
        pytest.skip(f"CUTLASS FP8 grouped GEMM unavailable: {fp8_cutlass.why_unavailable()}")
    return fp8_cutlass


@pytest.mark.parametrize("config", [0, 2, 3])  # fp8_cutlass.CONFIGS
def test_cutlass_grouped_gemm_on_split_weights_equals_float64(config):
    """The CUTLASS kernel on two weight bases (a strided view of a wider resident buffer and
    a separate slot tensor), each segment's rows starting at a device-side offset: uneven
    counts, partial tiles, zero-row experts. Every segment row is written and equals the
    float64 product of the dequantised operands; rows outside the segments stay untouched."""
    fc = _cutlass_or_skip()
    from dwdp.kernels.fp8_grouped import grouped_gemm_fp8, quantize_rows

    torch.manual_seed(10 + config)
    N, K = 384, 640
    counts_a = torch.tensor([0, 300, 5, 0, 129, 64], device="cuda")
    counts_b = torch.tensor([1, 0, 257], device="cuda", dtype=torch.int32)
    big = torch.randn(8, N + 128, K, device="cuda") * 0.05  # resident shard inside a wider buffer
    qa, sa = quantize_fp8_blockwise(big)
    wa, wsa = qa[1:7, :N], sa[1:7, :N // 128]
    wb, wsb = quantize_fp8_blockwise(torch.randn(3, N, K, device="cuda") * 0.05)  # prefetch slot
    na, nb, r0 = int(counts_a.sum()), int(counts_b.sum()), 37
    M = r0 + na + nb + 11
    aq, a_s = quantize_rows(torch.randn(M, K, device="cuda", dtype=torch.bfloat16))
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    base_a = torch.tensor([r0], device="cuda")
    base_b = torch.tensor([r0 + na], device="cuda", dtype=torch.int32)
    for w, ws, cnt, base in ((wa, wsa, counts_a, base_a), (wb, wsb, counts_b, base_b)):
        fc.grouped_gemm(aq, a_s, w, ws, cnt, out, base, config=config, raster="n" if config % 2 else "m",
                        swizzle=1 + config % 3)
    a64 = (aq.double().view(M, K // 128, 128) * a_s.double()[..., None]).view(M, K)
    ref_a = _group_ref(a64[r0:r0 + na], dequantize_fp8_blockwise(wa, wsa, torch.float64), counts_a)
    ref_b = _group_ref(a64[r0 + na:r0 + na + nb], dequantize_fp8_blockwise(wb, wsb, torch.float64), counts_b)
    got = out[r0:r0 + na + nb]
    assert torch.isfinite(got).all()  # every segment row written
    assert _rel(got, torch.cat([ref_a, ref_b])) < 4e-3  # fp32 accumulation + the bf16 output rounding only
    assert out[:r0].isnan().all() and out[r0 + na + nb:].isnan().all()
    # Through the dispatching entry point, at row 0 of its own operands.
    y = grouped_gemm_fp8(aq[r0:r0 + na], a_s[r0:r0 + na], wa, wsa, counts_a, kernel="cutlass")
    assert _rel(y, ref_a) < 4e-3


@pytest.mark.parametrize("kernel", ["triton", "cutlass"])
def test_grouped_swiglu_fp8_kernels_on_a_row_range_equal_float64(kernel, monkeypatch):
    """Both kernels through grouped_swiglu_fp8 on a segment at a device row offset: the MLP of
    the dequantised weights on the quantised activations (float64), up to the re-quantised
    SwiGLU output (e4m3, 1x128 scales)."""
    from dwdp.kernels import fp8_grouped

    if kernel == "cutlass":
        _cutlass_or_skip()
    else:
        monkeypatch.setattr(fp8_grouped, "cutlass_applies", lambda *a, **k: False)
    torch.manual_seed(11)
    G, H, I = 5, 512, 256
    counts = torch.tensor([70, 0, 333, 1, 128], device="cuda")
    r0, n = 29, int(counts.sum())
    x = torch.randn(r0 + n + 5, H, device="cuda", dtype=torch.bfloat16)
    q13, s13 = quantize_fp8_blockwise(torch.randn(G, 2 * I, H, device="cuda") * 0.05)
    q2, s2 = quantize_fp8_blockwise(torch.randn(G, H, I, device="cuda") * 0.05)
    xq, xs = fp8_grouped.quantize_rows(x)
    out = torch.full((x.shape[0], H), 3.0, device="cuda", dtype=torch.bfloat16)
    fp8_grouped.grouped_swiglu_fp8(xq, xs, q13, s13, q2, s2, counts, out=out,
                                   row_range=torch.tensor([r0, r0 + n], device="cuda"))
    a64 = (xq.double().view(-1, H // 128, 128) * xs.double()[..., None]).view(-1, H)[r0:r0 + n]
    h = _group_ref(a64, dequantize_fp8_blockwise(q13, s13, torch.float64), counts)
    g, u = h.chunk(2, dim=-1)
    ref = _group_ref(torch.nn.functional.silu(g) * u, dequantize_fp8_blockwise(q2, s2, torch.float64), counts)
    assert _rel(out[r0:r0 + n], ref) < 0.03  # e4m3 re-quantisation of the SwiGLU output (3 mantissa bits)
    assert (out[:r0] == 3).all() and (out[r0 + n:] == 3).all()
