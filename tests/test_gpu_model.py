"""The whole model on one GPU (bf16, the CUDA attention and MoE kernels) against independent
references: transformers' own fp32 forward of the same checkpoint for the tiny HF families,
and, for real models' shapes (random weights, a few layers), the same weights in fp32 on the
CPU (the path the CPU suite checks against transformers).

GPU only: skipped without CUDA. On the GPU machine:
``PYTHONPATH=src python -m pytest tests/test_gpu_model.py``.
"""

import pytest
import torch

from dwdp.batch import PackedBatch
from dwdp.models import attention as A

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_bf16_gpu_matches_transformers(base_ref, backend):
    from dwdp.checkpoint import load_checkpoint
    from dwdp.models import build_model

    model = build_model(base_ref.cfg, torch.bfloat16, "cuda")
    load_checkpoint(model, base_ref.path)
    g = torch.Generator().manual_seed(0)
    # One sequence long enough for cuDNN (>= 1,024 tokens) and one for the varlen kernel.
    seqs = [torch.randint(0, base_ref.vocab, (n,), generator=g).tolist() for n in (1100, 37)]
    A.set_cuda_attention_backend(backend)
    try:
        with torch.no_grad():
            logits = model(PackedBatch.from_sequences(seqs, "cuda")).logits.float().cpu()
    finally:
        A.set_cuda_attention_backend("auto")
    ends = torch.tensor([len(seqs[0]), len(seqs[0]) + len(seqs[1])]) - 1
    for i, ids in enumerate(seqs):
        ref = base_ref.reference(ids)[0]
        ours = logits[ends[i]]
        # bf16 weights and activations against fp32: ~1% relative error (tiny random models
        # have near-tied logits, so the top token is not compared).
        assert _rel(ours, ref) < 3e-2, (base_ref.name, backend, i, _rel(ours, ref))


def _token_logits(model, seqs, device) -> torch.Tensor:
    at = torch.arange(sum(map(len, seqs)), device=device)
    with torch.no_grad():
        return model(PackedBatch.from_sequences(seqs, device), logits_at=at).token_logits.float().cpu()


def _per_token_rel(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (got.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1)


@pytest.mark.parametrize("model_name,layers,lengths", [
    ("qwen3-30b-a3b", 2, [37, 300, 1, 1100]),
    ("deepseek-v2-lite", 2, [37, 300, 5, 1100]),
])
def test_real_shape_bf16_gpu_matches_fp32_cpu(model_name, layers, lengths):
    """Every token's logits against the fp32 CPU forward, held to the error that bf16 rounding
    alone gives on the CPU reference path (same weights): random weights at real shapes
    leave near-tied router scores, so a few tokens take another expert under any bf16
    rounding (~10% of qwen3-30b's tokens in the second layer), and a handful of rows would
    pass or fail by chance."""
    from dwdp.models import build_model, init_random
    from dwdp.presets import resolve_model

    cfg, _ = resolve_model(model_name, layers)
    cpu = init_random(build_model(cfg, torch.float32, "cpu"), 0)
    cpu16 = build_model(cfg, torch.bfloat16, "cpu")
    cpu16.load_state_dict(cpu.state_dict(), strict=False)
    gpu = build_model(cfg, torch.bfloat16, "cuda")
    gpu.load_state_dict(cpu.state_dict(), strict=False)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    ref = _token_logits(cpu, seqs, "cpu")
    got, rounding = _token_logits(gpu, seqs, "cuda"), _token_logits(cpu16, seqs, "cpu")
    e_gpu, e_bf16 = _per_token_rel(got, ref), _per_token_rel(rounding, ref)
    # Seen on CPU (bf16 rounding alone): median 0.016 / 0.013, 86% / 100% of tokens within
    # 0.05, argmax agreeing on 96% / 97% (random logits have near-ties) for qwen3 / deepseek.
    assert e_gpu.median() < 1.5 * e_bf16.median() + 2e-3, (e_gpu.median(), e_bf16.median())
    assert (e_gpu < 0.05).float().mean() > (e_bf16 < 0.05).float().mean() - 0.05
    agree = lambda x: (x.argmax(-1) == ref.argmax(-1)).float().mean()  # noqa: E731
    assert agree(got) > agree(rounding) - 0.03
