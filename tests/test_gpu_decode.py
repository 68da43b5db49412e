"""The GPU decode path: the Triton decode-attention kernel against float64, CUDA-graph
replay against eager steps, and bf16 greedy decoding against transformers on the GPU.
Skipped without CUDA + Triton (the CPU suite covers the same engine on the reference path)."""

from __future__ import annotations

import copy

import pytest
import torch

from dwdp import kernels

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.HAVE_TRITON),
                                reason="needs CUDA and Triton")


def _f64_decode(q, kc, vc, slots, lens, scale):
    B, H, _ = q.shape
    G = H // kc.shape[2]
    out = torch.empty(B, H, vc.shape[-1], dtype=torch.float64)
    for b in range(B):
        s, n = int(slots[b]), int(lens[b])
        for h in range(H):
            k, v = kc[s, :n, h // G].double().cpu(), vc[s, :n, h // G].double().cpu()
            out[b, h] = torch.softmax(k @ q[b, h].double().cpu() * scale, 0) @ v
    return out


@pytest.mark.parametrize("shape", ["gqa_64_4", "gqa_8_8", "mla_16"])
def test_decode_attention_kernel_matches_float64(shape):
    from dwdp.kernels.decode_attention import decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    S, L = 6, 3000
    if shape.startswith("gqa"):
        H, Hkv = (64, 4) if shape == "gqa_64_4" else (8, 8)
        kc = torch.randn(S, L, Hkv, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        vc = torch.randn(S, L, Hkv, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        q = torch.randn(5, H, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        v_is_k = False
    else:  # absorbed MLA: one head of [latent 512 | rope 64], value = the latent
        H = 16
        kc = torch.randn(S, L, 1, 576, device="cuda", generator=g, dtype=torch.bfloat16)
        vc = kc[..., :512]
        q = torch.randn(5, H, 576, device="cuda", generator=g, dtype=torch.bfloat16)
        v_is_k = True
    slots = torch.tensor([2, 0, 5, 3, 1], device="cuda")
    lens = torch.tensor([1, 3000, 257, 64, 1999], device="cuda", dtype=torch.int32)
    scale = q.shape[-1] ** -0.5
    got = decode_attention(q, kc, vc, slots, lens, scale, L, v_is_k).double().cpu()
    want = _f64_decode(q, kc, vc, slots, lens, scale)
    err = (got - want).abs().max().item()
    assert err < 2e-2, err  # bf16 output rounding of O(1) values


def _bf16_cuda(ref):
    return copy.deepcopy(ref.ours()).to("cuda", torch.bfloat16)


def _run(model, prompts, n, graphs, max_batch=4):
    from dwdp.decode import DecodeEngine, DecodeRequest
    from dwdp.engine import PrefillEngine, Request
    from dwdp.sampling import SamplingParams

    res = PrefillEngine(model, max_num_tokens=64, keep_kv=True).run([Request(i, p) for i, p in enumerate(prompts)])
    dec = DecodeEngine(model, max_batch=max_batch, max_context=128, cuda_graphs=graphs)
    out = dec.run([DecodeRequest(r.id, r.kv, r.next_token, SamplingParams(max_tokens=n), r.prompt_len)
                   for r in res])
    return {r.id: r.tokens for r in out}, dec


@pytest.fixture(scope="module")
def mla_case(tmp_path_factory):
    """A DeepSeek-V3 reference whose latent (64) and rope (16) widths the kernel takes."""
    from conftest import RefCase
    from hf_reference import make_hf_model

    path = tmp_path_factory.mktemp("hf_dsv3_wide")
    hf = make_hf_model("deepseek_v3", path, seed=5, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16)
    return RefCase("deepseek_v3_wide", "deepseek_v3", path, hf)


PROMPTS = [[5, 9, 2, 7, 1, 3], list(range(40, 77)), [11], [7] * 20, [1, 2, 3]]


@pytest.mark.parametrize("family", ["qwen3_moe", "mla"])
def test_cuda_graph_steps_equal_eager_steps(ref_cases, mla_case, family):
    ref = mla_case if family == "mla" else ref_cases[family]
    model = _bf16_cuda(ref)
    eager, d0 = _run(model, PROMPTS, 12, graphs=False)
    graphed, d1 = _run(model, PROMPTS, 12, graphs=True)
    assert d1.use_graphs and d1._graphs and not d0._graphs
    assert graphed == eager


@pytest.mark.parametrize("family", ["qwen3_moe", "mla"])
def test_bf16_greedy_on_gpu_tracks_transformers(ref_cases, mla_case, family):
    """Our bf16 GPU decode (graphs on) against transformers' bf16 forward on the GPU over
    the tokens we produced: every token is transformers' argmax, or within 0.05 of its
    best logit (bf16 ties; stated tolerance)."""
    ref = mla_case if family == "mla" else ref_cases[family]
    ours, dec = _run(_bf16_cuda(ref), PROMPTS, 10, graphs=True)
    assert dec.use_graphs
    hf = copy.deepcopy(ref.hf).to("cuda", torch.bfloat16)
    for i, p in enumerate(PROMPTS):
        seq = torch.tensor([p + ours[i]], device="cuda")
        with torch.no_grad():
            logits = hf(seq).logits[0].float()
        for j, tok in enumerate(ours[i][1:]):  # token j+1 was chosen from position len(p)+j
            row = logits[len(p) + j]
            assert float(row.max() - row[tok]) <= 0.05, (i, j)


def test_bf16_grouped_experts_at_decode_sizes_match_float64():
    """The decode-size bf16 grouped SwiGLU (a few rows per expert, empty experts) against
    a float64 per-expert loop."""
    from dwdp.kernels.fp8_grouped import bf16_decode_shapes, grouped_swiglu_bf16

    g = torch.Generator(device="cuda").manual_seed(0)
    E, H, inter = 16, 256, 128
    counts = torch.tensor([3, 0, 1, 7, 0, 0, 2, 5, 1, 0, 4, 0, 0, 6, 1, 2], device="cuda")
    x = torch.randn(int(counts.sum()), H, device="cuda", dtype=torch.bfloat16, generator=g)
    w13 = torch.randn(E, 2 * inter, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    w2 = torch.randn(E, H, inter, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    assert bf16_decode_shapes(x.shape[0], E, w13, w2)
    got = grouped_swiglu_bf16(x, w13, w2, counts).double()
    want, r = torch.empty_like(got), 0
    for e, n in enumerate(counts.tolist()):
        h = x[r:r + n].double() @ w13[e].double().T
        gate, up = h.chunk(2, dim=-1)
        want[r:r + n] = (torch.nn.functional.silu(gate) * up) @ w2[e].double().T
        r += n
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-2, rel
