"""Named model shapes: real models' public config.json values, and tiny CPU models.

Real presets carry the shapes only (weights are random in benchmarks: weights don't
change speed, routing skew does). Tiny presets run a full prefill on a CPU in well
under a second and are what the default ``dwdp run`` and the tests use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig

_QWEN3_COMMON = dict(model_type="qwen3_moe", hidden_act="silu", rms_norm_eps=1e-6, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)

_DSV3_COMMON = dict(model_type="deepseek_v3", hidden_act="silu", rms_norm_eps=1e-6, topk_method="noaux_tc",
                    scoring_func="sigmoid", norm_topk_prob=True, moe_layer_freq=1, rope_interleave=True,
                    tie_word_embeddings=False)

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": dict(
        _QWEN3_COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, max_position_embeddings=40960, rope_theta=1000000.0,
    ),
    # Qwen/Qwen3-235B-A22B
    "qwen3-235b-a22b": dict(
        _QWEN3_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, max_position_embeddings=40960, rope_theta=1000000.0,
    ),
    # deepseek-ai/DeepSeek-V3 (DeepSeek-R1 has the same shape)
    "deepseek-v3": dict(
        _DSV3_COMMON, vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    ),
    # deepseek-ai/DeepSeek-V2-Lite: MLA without q compression, softmax greedy routing.
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", hidden_act="silu", rms_norm_eps=1e-6, vocab_size=102400, hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1,
        topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=1.0, first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        max_position_embeddings=163840, rope_theta=10000.0, rope_interleave=True,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        tie_word_embeddings=False,
    ),
    # Tiny models of both families: seconds on a CPU, every code path exercised
    # (dense + MoE layers, shared experts, group-limited routing, q low-rank, YaRN).
    "tiny-qwen3-moe": dict(
        _QWEN3_COMMON, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=12,
        num_experts_per_tok=2, mlp_only_layers=[0], max_position_embeddings=2048, rope_theta=10000.0,
    ),
    "tiny-deepseek-v3": dict(
        _DSV3_COMMON, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=12,
        n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, max_position_embeddings=2048, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=4, original_max_position_embeddings=512, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    ),
}

DEFAULT_MODEL = "tiny-qwen3-moe"


def preset_hf_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def resolve_model(spec: str, num_layers: int | None = None) -> tuple[ModelConfig, Path | None]:
    """A preset name or a checkpoint directory -> (config, checkpoint dir or None)."""
    path = Path(spec)
    if spec in PRESETS:
        cfg, ckpt = ModelConfig.from_hf_dict(preset_hf_dict(spec), name=spec), None
    elif path.is_dir():
        cfg, ckpt = ModelConfig.from_json_file(path / "config.json"), path
    elif path.name == "config.json" and path.is_file():
        cfg, ckpt = ModelConfig.from_json_file(path), None
    else:
        raise ConfigError(
            f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory"
        )
    if num_layers is not None:
        cfg = cfg.truncated(num_layers)
    return cfg, ckpt
