"""Tiny random Hugging Face models (transformers' own code) saved as real checkpoints:
the independent reference our models are checked against."""

from __future__ import annotations

from pathlib import Path

import torch

QWEN3_KW = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=10, num_experts_per_tok=3,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], max_position_embeddings=2048,
    rope_theta=10000.0, tie_word_embeddings=False,
)

DSV3_KW = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=12, n_shared_experts=1,
    num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
    q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
    max_position_embeddings=2048, rope_interleave=True, tie_word_embeddings=False,
    rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32,
                      beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    rope_theta=10000.0,
)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights with enough spread that routing is decisive (no near-ties between
    experts whose order rounding could flip) and every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def make_hf_model(family: str, out_dir: Path, seed: int = 0, **overrides):
    """Build, randomise and save_pretrained a tiny HF model; returns it (eval, fp32)."""
    import transformers

    torch.manual_seed(seed)
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**{**QWEN3_KW, **overrides})
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif family == "deepseek_v3":
        kw = {**DSV3_KW, **overrides}
        cfg = transformers.DeepseekV3Config(**kw)
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    _randomise(model, seed)
    model.eval()
    model.config._attn_implementation = "eager"
    model.save_pretrained(out_dir)
    return model


@torch.no_grad()
def hf_last_logits_and_cache(model, ids: list[int]):
    """Run one sequence alone through the HF model: last-token logits and per-layer cache."""
    out = model(torch.tensor([ids]), use_cache=True)
    cache = out.past_key_values
    layers = []
    for layer in cache.layers:
        layers.append((layer.keys[0], layer.values[0]))  # [heads, T, d]
    return out.logits[0, -1].float(), layers
