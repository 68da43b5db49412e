"""ModelConfig parsing and presets, checked against transformers' own config classes,
model classes (instantiated on the meta device: shapes only, no memory) and rope code."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dwdp.config import ConfigError, ModelConfig, RopeConfig
from dwdp.models import build_model
from dwdp.models.layers import Rotary, rope_inv_freq, yarn_softmax_scale
from dwdp.models.transformer import MLAttention
from dwdp.presets import DEFAULT_MODEL, PRESETS, preset_hf_dict, resolve_model

HF_CONFIG = {
    "qwen3_moe": transformers.Qwen3MoeConfig,
    "deepseek_v3": transformers.DeepseekV3Config,
    "deepseek_v2": transformers.DeepseekV2Config,
}


def hf_config(d: dict):
    return HF_CONFIG[d["model_type"]](**{k: v for k, v in d.items() if k != "model_type"})


_HF_META: dict[str, torch.nn.Module] = {}


def hf_meta_model(preset: str):
    if preset not in _HF_META:
        with torch.device("meta"):
            _HF_META[preset] = transformers.AutoModelForCausalLM.from_config(hf_config(PRESETS[preset]))
    return _HF_META[preset]


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parses(name):
    cfg, ckpt = resolve_model(name)
    assert ckpt is None and cfg.name == name
    assert cfg == ModelConfig.from_hf_dict(preset_hf_dict(name), name=name)
    assert len(cfg.moe_layer_mask) == cfg.num_layers and cfg.moe_layers
    assert cfg.top_k <= cfg.num_experts


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_shapes_match_transformers_model(name):
    """Our model built on the meta device has exactly transformers' parameter names and
    shapes (routed experts: our fused w13/w2 are transformers' gate_up_proj/down_proj)
    and the same dense/MoE layer pattern."""
    cfg, _ = resolve_model(name)
    hf = hf_meta_model(name)
    ours = build_model(cfg, device="meta")
    rename = {".experts.w13": ".experts.gate_up_proj", ".experts.w2": ".experts.down_proj"}

    def hf_name(n: str) -> str:
        for a, b in rename.items():
            if n.endswith(a):
                return n[: -len(a)] + b
        return n

    ours_shapes = {hf_name(n): tuple(p.shape) for n, p in ours.named_parameters()}
    hf_shapes = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    assert ours_shapes == hf_shapes
    hf_moe = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert list(cfg.moe_layer_mask) == hf_moe
    # One routed expert's size, from transformers' fused expert tensors.
    e = hf.model.layers[cfg.moe_layers[0]].mlp.experts
    assert cfg.expert_numel() * cfg.num_experts == e.gate_up_proj.numel() + e.down_proj.numel()


def test_deepseek_v3_preset_derived_fields():
    cfg, _ = resolve_model("deepseek-v3")
    assert cfg.model_type == "deepseek_v3" and cfg.is_mla
    assert cfg.num_layers == 61
    assert cfg.moe_layer_mask[:3] == (False, False, False) and all(cfg.moe_layer_mask[3:])
    assert cfg.moe_layers == list(range(3, 61))
    assert cfg.num_experts == 256 and cfg.top_k == 8 and cfg.n_shared_experts == 1
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == (8, 4, 2.5)
    assert cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc" and cfg.norm_topk_prob
    assert cfg.qk_head_dim == 192 and cfg.rope_dim == 64 and cfg.kv_lora_rank == 512 and cfg.q_lora_rank == 1536
    assert cfg.rope.kind == "yarn" and cfg.rope.factor == 40 and cfg.rope.original_max_position_embeddings == 4096
    assert cfg.expert_numel() == 3 * 7168 * 2048  # 44M params, 88 MB in bf16


def test_qwen3_30b_preset_derived_fields():
    cfg, _ = resolve_model("qwen3-30b-a3b")
    assert cfg.model_type == "qwen3_moe" and not cfg.is_mla
    assert cfg.num_layers == 48 and all(cfg.moe_layer_mask) and len(cfg.moe_layers) == 48
    assert cfg.num_experts == 128 and cfg.top_k == 8 and cfg.norm_topk_prob
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 4, 128)
    assert cfg.qk_head_dim == cfg.rope_dim == 128
    assert cfg.rope == RopeConfig(theta=1_000_000.0)
    bf16_bytes = cfg.expert_numel() * 2
    assert bf16_bytes == 2 * 3 * 2048 * 768 == 9_437_184  # ~9.4 MB per expert in bf16


def test_default_and_tiny_presets():
    assert DEFAULT_MODEL in PRESETS
    q, _ = resolve_model("tiny-qwen3-moe")
    assert q.moe_layer_mask == (False, True, True, True)  # mlp_only_layers=[0]
    d, _ = resolve_model("tiny-deepseek-v3")
    assert d.moe_layer_mask == (False, True, True) and d.q_lora_rank == 32 and d.rope.kind == "yarn"


def test_resolve_model_paths_and_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny-deepseek-v3"]))
    cfg, ckpt = resolve_model(str(tmp_path))
    assert ckpt == tmp_path and cfg.name == tmp_path.name and cfg.num_layers == 3
    cfg2, ckpt2 = resolve_model(str(tmp_path / "config.json"))
    assert ckpt2 is None and cfg2 == cfg
    cfg3, _ = resolve_model("deepseek-v3", num_layers=5)
    assert cfg3.num_layers == 5 and cfg3.moe_layer_mask == (False, False, False, True, True)
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_model("no-such-model")
    with pytest.raises(ConfigError, match="no-such"):
        preset_hf_dict("no-such")
    with pytest.raises(ConfigError):
        resolve_model("tiny-qwen3-moe", num_layers=5)


# --------------------------------------------------------------------------------------
# Rope layouts
# --------------------------------------------------------------------------------------


def _to_new_layout(d: dict) -> dict:
    """transformers >= 5 layout: rope_parameters holds theta, type and scaling."""
    d = dict(d)
    scaling = dict(d.pop("rope_scaling", None) or {})
    theta = d.pop("rope_theta")
    kind = scaling.pop("type", None) or scaling.pop("rope_type", "default")
    d["rope_parameters"] = {"rope_type": kind, "rope_theta": theta, **scaling}
    return d


@pytest.mark.parametrize("name", list(PRESETS))
def test_old_and_new_rope_layouts_agree(name):
    old = preset_hf_dict(name)
    assert "rope_theta" in old and "rope_parameters" not in old
    a = ModelConfig.from_hf_dict(old)
    b = ModelConfig.from_hf_dict(_to_new_layout(old))
    # transformers' own conversion: its config's to_dict() is what save_pretrained writes.
    c = ModelConfig.from_hf_dict(hf_config(old).to_dict())
    assert a.rope == b.rope == c.rope
    assert a == b == c


def test_saved_hf_config_parses_like_constructor_kwargs(dsv3_ref):
    """The reference checkpoint's config.json (written by transformers, new layout)
    parses to the same rope as hf_reference's old-layout constructor arguments."""
    from hf_reference import DSV3_KW

    saved = json.loads((dsv3_ref.path / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_scaling" not in saved
    old = {"model_type": "deepseek_v3", **DSV3_KW}
    assert ModelConfig.from_hf_dict(old).rope == dsv3_ref.cfg.rope
    assert dsv3_ref.cfg.rope.kind == "yarn" and dsv3_ref.cfg.rope.factor == 4.0


def test_rope_type_key_spellings():
    base = preset_hf_dict("tiny-deepseek-v3")
    scaling = dict(base["rope_scaling"])
    with_type = ModelConfig.from_hf_dict(base).rope
    scaling["rope_type"] = scaling.pop("type")
    with_rope_type = ModelConfig.from_hf_dict({**base, "rope_scaling": scaling}).rope
    assert with_type == with_rope_type
    no_scaling = ModelConfig.from_hf_dict({**base, "rope_scaling": None}).rope
    assert no_scaling == RopeConfig(theta=10000.0)


# --------------------------------------------------------------------------------------
# truncated()
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek-v3", "tiny-qwen3-moe"])
def test_truncated_bounds(name):
    cfg, _ = resolve_model(name)
    for bad in (0, -1, cfg.num_layers + 1):
        with pytest.raises(ConfigError, match="num_layers"):
            cfg.truncated(bad)
    assert cfg.truncated(cfg.num_layers) == cfg
    one = cfg.truncated(1)
    assert one.num_layers == 1 and one.moe_layer_mask == cfg.moe_layer_mask[:1]
    t = cfg.truncated(4)
    assert t.moe_layer_mask == cfg.moe_layer_mask[:4] and t.num_experts == cfg.num_experts
    assert dataclasses.replace(t, num_layers=cfg.num_layers, moe_layer_mask=cfg.moe_layer_mask) == cfg
    assert len(cfg.moe_layer_mask) == cfg.num_layers  # the original is unchanged


# --------------------------------------------------------------------------------------
# Field validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,change,needle", [
    ("tiny-qwen3-moe", dict(num_experts_per_tok=13), "num_experts_per_tok"),
    ("tiny-qwen3-moe", dict(num_key_value_heads=3), "num_key_value_heads"),
    ("tiny-qwen3-moe", dict(vocab_size=None), "vocab_size"),
    ("tiny-qwen3-moe", dict(model_type="mixtral"), "mixtral"),
    ("tiny-deepseek-v3", dict(kv_lora_rank=None), "kv_lora_rank"),
    ("tiny-deepseek-v3", dict(n_group=5), "n_group"),
    ("tiny-deepseek-v3", dict(rope_scaling=dict(type="yarn", factor=4)), "original_max_position_embeddings"),
    ("tiny-deepseek-v3", dict(rope_scaling=dict(type="linear", factor=4)), "linear"),
])
def test_invalid_fields_are_named(preset, change, needle):
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_hf_dict({**preset_hf_dict(preset), **change})
    assert needle in str(ei.value)


def test_qwen3_moe_layer_pattern_matches_transformers():
    """decoder_sparse_step and mlp_only_layers, against transformers' layer construction."""
    base = preset_hf_dict("tiny-qwen3-moe")
    for step, only in [(1, []), (2, []), (2, [1]), (3, [0, 5]), (1, [0, 1, 2, 3, 4, 5])]:
        d = {**base, "num_hidden_layers": 6, "decoder_sparse_step": step, "mlp_only_layers": only}
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(hf_config(d))
        want = tuple(hasattr(layer.mlp, "experts") for layer in hf.model.layers)
        assert ModelConfig.from_hf_dict(d).moe_layer_mask == want, (step, only)


def test_deepseek_layer_pattern_matches_transformers():
    base = preset_hf_dict("tiny-deepseek-v3")
    for first_dense in (0, 1, 3, 6):
        d = {**base, "num_hidden_layers": 6, "first_k_dense_replace": first_dense}
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(hf_config(d))
        want = tuple(hasattr(layer.mlp, "experts") for layer in hf.model.layers)
        assert ModelConfig.from_hf_dict(d).moe_layer_mask == want, first_dense


# --------------------------------------------------------------------------------------
# Rotary frequencies and scales against transformers
# --------------------------------------------------------------------------------------

YARN_CASES = {
    "deepseek-v3": dict(qk_rope_head_dim=64, max_position_embeddings=163840, rope_scaling=dict(
        type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
        mscale_all_dim=1.0)),
    "v2-lite-mscale-0.707": dict(qk_rope_head_dim=64, max_position_embeddings=163840, rope_scaling=dict(
        type="yarn", factor=40, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707)),
    "attention_factor": dict(qk_rope_head_dim=32, max_position_embeddings=8192, rope_scaling=dict(
        rope_type="yarn", factor=4, original_max_position_embeddings=2048, attention_factor=0.8, mscale_all_dim=1.0)),
    "mscale-only": dict(qk_rope_head_dim=32, max_position_embeddings=8192, rope_scaling=dict(
        rope_type="yarn", factor=4, original_max_position_embeddings=2048, mscale=1.0)),
    "no-truncate-betas": dict(qk_rope_head_dim=32, max_position_embeddings=8192, rope_scaling=dict(
        rope_type="yarn", factor=4, original_max_position_embeddings=2048, truncate=False, beta_fast=16, beta_slow=2)),
    "theta-1e6-dim128": dict(qk_rope_head_dim=128, max_position_embeddings=32768, rope_theta=1e6, rope_scaling=dict(
        rope_type="yarn", factor=8.0, original_max_position_embeddings=4096, mscale_all_dim=1.0)),
    "factor-1": dict(qk_rope_head_dim=64, max_position_embeddings=4096, rope_scaling=dict(
        rope_type="yarn", factor=1.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)),
    "unequal-mscales": dict(qk_rope_head_dim=16, max_position_embeddings=16384, rope_scaling=dict(
        rope_type="yarn", factor=8.0, original_max_position_embeddings=2048, mscale=1.0, mscale_all_dim=0.5)),
}


def _dsv3_hf_config(case: dict):
    return transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
        kv_lora_rank=16, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
        topk_group=1, num_hidden_layers=1, intermediate_size=32, moe_intermediate_size=16, **case)


@pytest.mark.parametrize("case", list(YARN_CASES.values()), ids=list(YARN_CASES))
def test_yarn_matches_transformers(case):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    hc = _dsv3_hf_config(case)
    cfg = ModelConfig.from_hf_dict(hc.to_dict())
    assert cfg.rope.kind == "yarn" and cfg.rope_dim == case["qk_rope_head_dim"]
    hf_inv, hf_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hc)
    inv, magnitude = rope_inv_freq(cfg.rope, cfg.rope_dim)
    assert inv.shape == hf_inv.shape == (cfg.rope_dim // 2,)
    # transformers computes in fp32, we in fp64 then round: agree to fp32 rounding.
    torch.testing.assert_close(inv.double(), hf_inv.double(), rtol=1e-6, atol=0)
    assert magnitude == pytest.approx(hf_attention_factor, rel=1e-12)
    # The modules: rotary table and cos/sin magnitude, and MLA's softmax scale (qk_head_dim^-0.5 * mscale^2).
    hf_rot = DeepseekV3RotaryEmbedding(hc)
    rot = Rotary(cfg.rope, cfg.rope_dim, interleaved=True)
    torch.testing.assert_close(rot.inv_freq.double(), hf_rot.inv_freq.double(), rtol=1e-6, atol=0)
    assert rot.magnitude == pytest.approx(hf_rot.attention_scaling, rel=1e-12)
    with torch.device("meta"):
        hf_attn = DeepseekV3Attention(hc, 0)
        attn = MLAttention(cfg)
    assert attn.scale == pytest.approx(hf_attn.scaling, rel=1e-12)
    assert cfg.qk_head_dim ** -0.5 * yarn_softmax_scale(cfg.rope) == pytest.approx(hf_attn.scaling, rel=1e-12)
    # And the cos/sin tables themselves (fp32 both sides). The inverse frequencies differ
    # by fp32 rounding (~1e-7 relative), so the angle differs by ~pos * 1e-7: positions
    # up to 1000 keep that below ~1e-4 (at 8191 it reaches ~5e-4 for dim 128).
    pos = torch.tensor([0, 1, 17, 300, 1000])
    cos, sin = rot.cos_sin(pos, torch.float32)
    hf_cos, hf_sin = hf_rot(torch.zeros(1, 1, 1), pos[None])
    half = cfg.rope_dim // 2
    torch.testing.assert_close(cos, hf_cos[0, :, :half], rtol=0, atol=2e-4)
    torch.testing.assert_close(sin, hf_sin[0, :, :half], rtol=0, atol=2e-4)


def test_yarn_against_float64_formula():
    """The YaRN inverse frequencies of the DeepSeek-V3 preset from the paper's formula in
    float64 (independent of both implementations)."""
    cfg, _ = resolve_model("deepseek-v3")
    r, dim = cfg.rope, cfg.rope_dim
    inv, mag = rope_inv_freq(r, dim)

    def corr(rot):
        return dim * math.log(r.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = max(math.floor(corr(r.beta_fast)), 0), min(math.ceil(corr(r.beta_slow)), dim - 1)
    want = []
    for i in range(dim // 2):
        base = r.theta ** (-(2 * i) / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        want.append(base / r.factor * ramp + base * (1 - ramp))
    torch.testing.assert_close(inv.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    assert mag == 1.0  # mscale == mscale_all_dim
    m = 0.1 * math.log(40) + 1.0
    assert yarn_softmax_scale(r) == pytest.approx(m * m, rel=1e-12)


@pytest.mark.parametrize("theta,dim", [(10000.0, 16), (1_000_000.0, 128), (10000.0, 64)])
def test_default_rope_matches_transformers(theta, dim):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    hc = transformers.Qwen3MoeConfig(hidden_size=dim * 4, num_attention_heads=4, head_dim=dim, rope_theta=theta)
    hf_rot = Qwen3MoeRotaryEmbedding(hc)
    cfg = ModelConfig.from_hf_dict(hc.to_dict())
    inv, mag = rope_inv_freq(cfg.rope, cfg.rope_dim)
    torch.testing.assert_close(inv.double(), hf_rot.inv_freq.double(), rtol=1e-6, atol=0)
    assert mag == 1.0 == hf_rot.attention_scaling


def test_expert_dtype_names():
    """Experts are stored in the model dtype or as FP8: "same", "fp8", "auto", or the model
    dtype's own name (what `dwdp plan --expert-dtype` calls it); another dtype is refused
    with the fix."""
    from dwdp.models.build import resolve_expert_dtype
    from dwdp.quant import FP8

    cfg, _ = resolve_model("tiny-qwen3-moe", 1)
    assert resolve_expert_dtype(cfg, "bf16", torch.bfloat16) == torch.bfloat16
    assert resolve_expert_dtype(cfg, "same", torch.bfloat16) == torch.bfloat16
    assert resolve_expert_dtype(cfg, "fp8", torch.bfloat16) == FP8
    with pytest.raises(ValueError, match="--dtype fp16"):
        resolve_expert_dtype(cfg, "fp16", torch.bfloat16)
    with pytest.raises(ValueError, match="choose from auto, same, fp8"):
        resolve_expert_dtype(cfg, "int4", torch.bfloat16)
