"""FP8 dense projections on the CPU path: bf16 checkpoints quantised at load (against
the test's own bound on e4m3 rounding and against transformers), random init, the bytes
``dwdp info`` / the fit check count, the plain-torch GEMM against float64, bad names."""

from __future__ import annotations

import copy

import pytest
import torch

from alloc_tracker import AllocTracker
from fp8_reference import round_inputs_to_fp8
from dwdp.batch import PackedBatch
from dwdp.checkpoint import load_checkpoint
from dwdp.memory import build_bytes, param_breakdown, rank_memory
from dwdp.models import build_model, init_random
from dwdp.models.layers import Fp8Linear
from dwdp.presets import resolve_model
from dwdp.quant import FP8, dequantize_fp8_blockwise, fp8_linear_reference, quantize_fp8_blockwise


def _fp8_linears(model) -> dict[str, Fp8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def test_reference_gemm_matches_float64_with_partial_blocks():
    g = torch.Generator().manual_seed(0)
    M, N, K = 37, 200, 300  # partial last blocks along N and K (DeepSeek's kv_a has N = 576)
    x = torch.randn(M, K, generator=g) * 3
    w = torch.randn(N, K, generator=g) * 0.05
    q, s = quantize_fp8_blockwise(w)
    w64 = dequantize_fp8_blockwise(q, s, torch.float64)
    y = fp8_linear_reference(x, q, s)
    xp = torch.nn.functional.pad(x.double(), (0, 84)).view(M, 3, 128)
    sx = xp.abs().amax(-1, keepdim=True) / 448.0
    x64 = ((xp / sx).float().to(FP8).double() * sx).view(M, 384)[:, :K]
    want = x64 @ w64.T
    assert ((y.double() - want).norm() / want.norm()) < 1e-6
    # the e4m3 activation rounding is really applied: a few percent from the exact product
    exact = x.double() @ w64.T
    assert 1e-3 < ((y.double() - exact).norm() / exact.norm()) < 5e-2


@pytest.mark.parametrize("ref_name", ["qwen3_ref", "dsv3_ref"])
def test_bf16_checkpoint_quantised_at_load_tracks_transformers(ref_name, request):
    ref = request.getfixturevalue(ref_name)
    model = load_checkpoint(build_model(ref.cfg, torch.float32, dense_dtype="fp8"), ref.path)
    lin = _fp8_linears(model)
    hf_params = dict(ref.hf.named_parameters())
    assert len(lin) >= 4 * ref.cfg.num_layers
    hf = copy.deepcopy(ref.hf)
    hf_mods = dict(hf.named_modules())
    for name, m in lin.items():
        w = hf_params[name + ".weight"].detach().double()
        deq = dequantize_fp8_blockwise(m.weight, m.weight_scale_inv, torch.float64)
        # e4m3 keeps 3 mantissa bits: within 2^-4 relative, or half the smallest step below 2^-6
        step = m.weight_scale_inv.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:w.shape[0], :w.shape[1]]
        assert ((deq - w).abs() <= 2 ** -4 * w.abs() + step * 2 ** -10).all(), name
        # each block's largest magnitude maps to the largest e4m3 value
        assert m.weight.float().abs().max() == 448.0, name
        hf_mods[name].weight.data = deq.float()
    assert all(hf_mods[n].weight.dtype == torch.float32 for n in lin)
    hooks = round_inputs_to_fp8([hf_mods[n] for n in lin])
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, ref.vocab, (n,), generator=g).tolist() for n in (13, 5)]
    got = model(PackedBatch.from_sequences(seqs)).logits
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            want = hf(torch.tensor([seq])).logits[0, -1].double()
        assert float((got[i].double() - want).norm() / want.norm()) < 1e-4, (ref_name, i)  # 16% without the hooks
    for h in hooks:
        h.remove()


def test_fp8_random_init_equals_quantising_a_random_model():
    cfg = resolve_model("tiny-deepseek-v3")[0]
    plain = init_random(build_model(cfg, torch.bfloat16, dense_dtype="same"), seed=5)
    fp8 = init_random(build_model(cfg, torch.bfloat16, dense_dtype="fp8"), seed=5)
    p = dict(plain.named_parameters())
    lin = _fp8_linears(fp8)
    assert lin
    for name, m in lin.items():
        q, s = quantize_fp8_blockwise(p[name + ".weight"])
        assert torch.equal(m.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(m.weight_scale_inv, s)
    assert torch.equal(fp8.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    assert fp8.lm_head.weight.dtype == torch.bfloat16
    assert all(b.gate.weight.dtype == torch.float32 for b in fp8.moe_blocks())


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_fp8_projection_bytes_are_counted_exactly(preset):
    cfg = resolve_model(preset)[0]
    with AllocTracker() as tr:
        model = build_model(cfg, torch.bfloat16, "cpu", expert_dtype="fp8", dense_dtype="fp8")
    assert tr.peak == tr.current() == rank_memory(cfg, torch.bfloat16, "fp8", dense_dtype="fp8").total
    same, fp8 = build_bytes(cfg, torch.bfloat16, "fp8", "same"), build_bytes(cfg, torch.bfloat16, "fp8", "fp8")
    lin = _fp8_linears(model)
    n = sum(m.weight.numel() for m in lin.values())
    scales = sum(m.weight_scale_inv.numel() for m in lin.values())
    assert n == param_breakdown(cfg).projections  # info's projection count is what becomes FP8
    assert same.non_expert - fp8.non_expert == 2 * n - (n + 4 * scales)


def test_unknown_dense_dtype_is_named():
    cfg = resolve_model("tiny-qwen3-moe")[0]
    with pytest.raises(ValueError, match="dense dtype 'int4'"):
        build_model(cfg, torch.bfloat16, "meta", dense_dtype="int4")
    with pytest.raises(ValueError, match="--dtype fp32"):
        build_model(cfg, torch.bfloat16, "meta", dense_dtype="fp32")


def test_merged_projections_never_go_stale(dsv3_ref):
    """build_model gives q_a|kv_a, gate|up (and q|k|v) one weight tensor; a model moved
    afterwards holds copies, and then each projection runs on its own: same logits."""
    from dwdp.models.layers import merged_parts

    model = load_checkpoint(build_model(dsv3_ref.cfg, torch.float32), dsv3_ref.path)
    attn = model.model.layers[0].self_attn
    assert merged_parts(attn.qkv_a, (attn.q_a_proj, attn.kv_a_proj_with_mqa)) is not None
    seqs = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3]]
    want = model(PackedBatch.from_sequences(seqs)).logits
    moved = copy.deepcopy(model)
    for p in moved.parameters():  # as .to() / a cast does: new storages, the merged tuples no longer back them
        p.data = p.data.clone()
    a2 = moved.model.layers[0].self_attn
    assert merged_parts(a2.qkv_a, (a2.q_a_proj, a2.kv_a_proj_with_mqa)) is None
    got = moved(PackedBatch.from_sequences(seqs)).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # FP8 rows stay whole 128-row scale blocks: a q_a of fewer rows (the tiny model) heads no merge
    fp8 = build_model(dsv3_ref.cfg, torch.float32, "meta", dense_dtype="fp8").model.layers[0].self_attn
    assert dsv3_ref.cfg.q_lora_rank % 128 and fp8.qkv_a is None
