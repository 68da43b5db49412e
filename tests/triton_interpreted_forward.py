"""The GPU path of the shared model code without a GPU: Triton's interpreter
(TRITON_INTERPRET=1, numpy < 2 for its runtime loop bounds) runs the norm, rope and FP8
dense kernels on CPU tensors inside a whole forward (models with 128-multiple dims, so
every projection takes the FP8 kernel), against the same model's plain-torch path.

The interpreter's fp32 -> e4m3 conversion is not the GPU's round-to-nearest, so
``--torch-quant`` swaps the activation quantiser for the torch reference; the rest is then
the kernels' arithmetic (expected agreement: fp32 rounding, ~1e-6).

    TRITON_INTERPRET=1 PYTHONPATH=src python tests/triton_interpreted_forward.py --torch-quant

Run by tests/test_triton_interpreted.py where Triton is installed (it prints one line per
model and dense format: ``<name> dense <fmt>: ... rel. diff <x>``).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import dwdp.kernels as K  # noqa: E402
import dwdp.kernels.fp8_grouped as G  # noqa: E402
from dwdp.batch import PackedBatch  # noqa: E402
from dwdp.config import ModelConfig  # noqa: E402
from dwdp.models import build_model, init_random  # noqa: E402
from dwdp.presets import preset_hf_dict  # noqa: E402
from dwdp.quant import quantize_act_1x128  # noqa: E402

QWEN = dict(preset_hf_dict("tiny-qwen3-moe"), vocab_size=512, hidden_size=256, moe_intermediate_size=128,
            num_experts=8, num_hidden_layers=2, mlp_only_layers=[1], head_dim=64, intermediate_size=256,
            num_attention_heads=4, num_key_value_heads=2)
DSV3 = dict(preset_hf_dict("tiny-deepseek-v3"), vocab_size=512, hidden_size=256, moe_intermediate_size=128,
            n_routed_experts=8, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=256, q_lora_rank=256,
            kv_lora_rank=128, num_attention_heads=2, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
            n_group=2, topk_group=1, num_experts_per_tok=2)


def _torch_quantize_rows(x, swiglu=False, row_range=None, m_major_pad=0):
    assert row_range is None and not m_major_pad  # the GPU-only variants
    if swiglu:
        C = x.shape[1] // 2
        x = torch.nn.functional.silu(x[:, :C].float()) * x[:, C:].float()
    return quantize_act_1x128(x)


def main():
    if "--torch-quant" in sys.argv:
        G.quantize_rows = _torch_quantize_rows
    enabled = K.enabled
    for name, hf in (("qwen3", QWEN), ("deepseek-v3", DSV3)):
        cfg = ModelConfig.from_hf_dict(hf)
        for dense in ("fp8", "same"):
            model = init_random(build_model(cfg, torch.float32, dense_dtype=dense, expert_dtype="same"), 1)
            seqs = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (9, 4)]
            want = model(PackedBatch.from_sequences(seqs)).logits
            K.enabled = lambda t: True
            try:
                got = model(PackedBatch.from_sequences(seqs)).logits
            finally:
                K.enabled = enabled
            print(f"{name} dense {dense}: Triton (interpreted) vs torch path, rel. diff "
                  f"{float((got - want).norm() / want.norm()):.2e}")


if __name__ == "__main__":
    main()
