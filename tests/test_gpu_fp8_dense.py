"""FP8 dense projections and the fused glue kernels (norm, residual add + norm, norm +
rope, SwiGLU + quantise) against float64 references.

GPU only: skipped without CUDA and Triton. Tolerances: the block-scaled GEMM against
float64 on the same FP8-rounded activations differs by the bf16 output rounding (2^-9)
plus a rare e4m3 rounding flip where fp32 and float64 disagree on a tie (rel. norm 5e-3);
against float64 on the unrounded activations by e4m3's relative rounding of each input
(at most 2^-4 per element, a few percent as a norm: 5e-2). Norm and rope outputs are
rounded to bf16 up to three times (2^-8 each: elementwise 2^-5 relative).
"""

import pytest
import torch

from dwdp import kernels
from dwdp.quant import dequantize_fp8_blockwise, quantize_fp8_blockwise

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.HAVE_TRITON),
                                reason="needs CUDA and Triton")


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _quantised_f64(x: torch.Tensor) -> torch.Tensor:
    """The test's own 1x128 activation rounding, in float64 (K a multiple of 128)."""
    M, K = x.shape
    xb = x.double().view(M, K // 128, 128)
    s = xb.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 448.0
    return ((xb / s).float().to(torch.float8_e4m3fn).double() * s).view(M, K)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("M,N,K", [(300, 576, 512), (1, 1536, 1024), (4099, 1024, 256), (64, 384, 640)])
def test_fp8_linear_matches_float64(backend, M, N, K):
    from dwdp.kernels import fp8_dense
    from dwdp.models.layers import fp8_linear

    g = torch.Generator(device="cuda").manual_seed(M + N)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g) * 2
    x[0, :128] = 0  # an all-zero activation block
    w = torch.randn(N, K, device="cuda", generator=g) * 0.05
    wq, ws = quantize_fp8_blockwise(w)
    ws.mul_(torch.rand(ws.shape, device="cuda", generator=g) + 0.5)  # varied block scales
    w64 = dequantize_fp8_blockwise(wq, ws, torch.float64)
    fp8_dense.set_backend(backend)
    try:
        y = fp8_linear(x, wq, ws)
    finally:
        fp8_dense.set_backend("auto")
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    assert _rel(y, _quantised_f64(x) @ w64.T) < 5e-3
    assert _rel(y, x.double() @ w64.T) < 5e-2


def test_rmsnorm_and_residual_add_match_float64():
    from dwdp.kernels.norm import rmsnorm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, 7168, device="cuda", dtype=torch.bfloat16, generator=g)
    r = torch.randn(1000, 7168, device="cuda", dtype=torch.bfloat16, generator=g) * 4
    w = (torch.rand(7168, device="cuda", generator=g) + 0.5).bfloat16()
    h64 = x.double() + r.double()
    y, h = rmsnorm(x, w, 1e-6, residual=r)
    torch.testing.assert_close(h.double(), h64, rtol=2 ** -7, atol=0)  # one bf16 rounding: within an ulp
    want = w.double() * h64 / (h64.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(y.double(), want, rtol=2 ** -5, atol=1e-6)  # three bf16 roundings
    y2 = rmsnorm(x[:, :4096], w[:4096], 1e-5)  # a strided view, no residual
    want2 = w[:4096].double() * x[:, :4096].double() / (x[:, :4096].double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(y2.double(), want2, rtol=2 ** -6, atol=1e-6)


def _rope64(x64, cos, sin, interleaved):
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    x1, x2 = (x64[..., 0::2], x64[..., 1::2]) if interleaved else x64.chunk(2, -1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_norm_rope_kernel_matches_float64(interleaved):
    from dwdp.kernels.norm import rope

    g = torch.Generator(device="cuda").manual_seed(1)
    T, H, D = 333, 12, 128
    base = torch.randn(T, H * D + 64, device="cuda", dtype=torch.bfloat16, generator=g)
    x = base[:, :H * D].view(T, H, D)  # a strided view, as a merged q|k|v output
    ang = torch.rand(T, D // 2, device="cuda", generator=g) * 6
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    w = (torch.rand(D, device="cuda", generator=g) + 0.5).bfloat16()
    got = rope(x, cos, sin, interleaved, norm_weight=w, eps=1e-6)
    x64 = x.double()
    n64 = w.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(got.double(), _rope64(n64, cos, sin, interleaved), rtol=2 ** -5, atol=2 ** -6)
    # In place on a slice (MLA's q rope part), and one row broadcast to every head (MLA's k).
    q = torch.randn(T, H, 192, device="cuda", dtype=torch.bfloat16, generator=g)
    want = _rope64(q[..., 128:].double(), cos[:, :32], sin[:, :32], interleaved)
    nope = q[..., :128].clone()
    rope(q[..., 128:], cos[:, :32].contiguous(), sin[:, :32].contiguous(), interleaved, out=q[..., 128:])
    assert torch.equal(q[..., :128], nope)
    torch.testing.assert_close(q[..., 128:].double(), want, rtol=2 ** -6, atol=2 ** -7)
    k = torch.empty(T, H, 64, device="cuda", dtype=torch.bfloat16)
    kr = torch.randn(T, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    rope(kr[:, None, :].expand(T, H, 64), cos[:, :32].contiguous(), sin[:, :32].contiguous(), interleaved, out=k)
    want_k = _rope64(kr[:, None, :].double(), cos[:, :32], sin[:, :32], interleaved)
    torch.testing.assert_close(k.double(), want_k.expand(T, H, 64), rtol=2 ** -6, atol=2 ** -7)


def test_fp8_dense_mlp_fused_swiglu_quantise_matches_float64():
    """A merged gate|up FP8 MLP as build_model makes it (SwiGLU fused with the down
    projection's activation quantise) against float64 on the dequantised weights."""
    from dwdp.models.layers import DenseMLP, Fp8Linear

    g = torch.Generator(device="cuda").manual_seed(2)
    H, I, M = 512, 384, 777
    mlp = DenseMLP(H, I)
    w13 = torch.randn(2 * I, H, device="cuda", generator=g) * 0.05
    w2 = torch.randn(H, I, device="cuda", generator=g) * 0.05
    q13, s13 = quantize_fp8_blockwise(w13)
    q2, s2 = quantize_fp8_blockwise(w2)
    down = Fp8Linear(I, H)
    down.weight.data, down.weight_scale_inv.data = q2, s2
    mlp.down_proj = down
    for name, rows in (("gate_proj", slice(0, I)), ("up_proj", slice(I, 2 * I))):
        lin = Fp8Linear(H, I)  # views of the merged tensor, as build_model makes them
        blocks = slice(rows.start // 128, rows.stop // 128)
        lin.weight.data, lin.weight_scale_inv.data = q13[rows], s13[blocks]
        setattr(mlp, name, lin)
    mlp.gate_up = (q13, s13)
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
    with torch.no_grad():
        y = mlp(x)
    a64 = dequantize_fp8_blockwise(q13, s13, torch.float64)
    b64 = dequantize_fp8_blockwise(q2, s2, torch.float64)
    h = x.double() @ a64.T
    want = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ b64.T
    assert _rel(y, want) < 6e-2
