"""Model configuration parsed from a Hugging Face ``config.json``.

We parse the JSON ourselves (rather than instantiate transformers' config classes) so
that every field the engine relies on is explicit, both the old (``rope_theta`` +
``rope_scaling``) and the new (``rope_parameters``) rope layouts are accepted, and an
unsupported option fails loudly with the field's name instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "deepseek_v3", "deepseek_v2")


class ConfigError(ValueError):
    """A config.json the engine cannot run, with the offending field named."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """The weight / activation dtype: ``name`` (a key of DTYPES) if given, else bfloat16 on
    a GPU and float32 on CPU (CPU bf16 matmuls are slow and the CPU tests compare in fp32)."""
    if name is not None:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(sorted(DTYPES))}")
        return DTYPES[name]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # dense MLP width
    moe_intermediate_size: int  # one routed expert's width
    num_experts: int  # routed experts per MoE layer
    top_k: int
    moe_layer_mask: tuple[bool, ...]  # per layer: MoE (True) or dense MLP (False)
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    norm_topk_prob: bool = False
    # GQA (qwen3_moe)
    num_kv_heads: int = 0
    head_dim: int = 0
    # MLA + DeepSeek routing (deepseek_v2 / deepseek_v3)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    n_shared_experts: int = 0
    scoring_func: str = "softmax"  # "softmax" or "sigmoid"
    topk_method: str = "greedy"  # "greedy", "group_limited_greedy", "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # The checkpoint stores its linear weights as e4m3 with 128x128 block scales
    # (``quantization_config`` with ``quant_method: "fp8"``: DeepSeek-V3/R1, Qwen3-*-FP8).
    fp8_checkpoint: bool = False
    name: str = ""

    # ---- derived -------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.model_type in ("deepseek_v2", "deepseek_v3")

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_layer_mask) if m]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def kv_cache_width(self) -> int:
        """Elements one token caches per layer: GQA keys + values, MLA latent + roped key."""
        return self.kv_lora_rank + self.qk_rope_head_dim if self.is_mla else 2 * self.num_kv_heads * self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def expert_numel(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def truncated(self, num_layers: int) -> "ModelConfig":
        """The same model with only its first ``num_layers`` layers (benchmarks, quick runs)."""
        if not 1 <= num_layers <= self.num_layers:
            raise ConfigError(f"num_layers={num_layers}: must be between 1 and {self.num_layers}")
        return dataclasses.replace(
            self, num_layers=num_layers, moe_layer_mask=self.moe_layer_mask[:num_layers]
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- parsing -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")

        def req(key: str, *alts: str) -> Any:
            for k in (key, *alts):
                if d.get(k) is not None:
                    return d[k]
            raise ConfigError(f"config.json of a {model_type} model lacks the field {key!r}")

        num_layers = int(req("num_hidden_layers"))
        common = dict(
            model_type=model_type,
            vocab_size=int(req("vocab_size")),
            hidden_size=int(req("hidden_size")),
            num_layers=num_layers,
            num_heads=int(req("num_attention_heads")),
            intermediate_size=int(req("intermediate_size")),
            moe_intermediate_size=int(req("moe_intermediate_size")),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(d),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            top_k=int(req("num_experts_per_tok")),
            fp8_checkpoint=_parse_quantization(d.get("quantization_config")),
            name=name,
        )
        if model_type == "qwen3_moe":
            if d.get("use_sliding_window"):
                raise ConfigError("use_sliding_window=true is not supported for qwen3_moe")
            num_experts = int(req("num_experts", "num_local_experts"))
            step = int(d.get("decoder_sparse_step", 1))
            only = set(d.get("mlp_only_layers") or [])
            mask = tuple(
                (i not in only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
            )
            num_heads = common["num_heads"]
            cfg = cls(
                **common,
                num_experts=num_experts,
                moe_layer_mask=mask,
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                num_kv_heads=int(d.get("num_key_value_heads", num_heads)),
                head_dim=int(d.get("head_dim") or common["hidden_size"] // num_heads),
                scoring_func="softmax",
                topk_method="greedy",
            )
        else:
            num_experts = int(req("n_routed_experts"))
            first_dense = int(d.get("first_k_dense_replace", 0))
            freq = int(d.get("moe_layer_freq", 1))
            mask = tuple(i >= first_dense and i % freq == 0 for i in range(num_layers))
            default_topk = "noaux_tc" if model_type == "deepseek_v3" else "greedy"
            default_scoring = "sigmoid" if model_type == "deepseek_v3" else "softmax"
            topk_method = d.get("topk_method") or default_topk
            scoring = d.get("scoring_func") or default_scoring
            if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
                raise ConfigError(f"topk_method={topk_method!r} is not supported")
            if scoring not in ("softmax", "sigmoid"):
                raise ConfigError(f"scoring_func={scoring!r} is not supported")
            n_group = int(d.get("n_group") or 1)
            if num_experts % n_group:
                raise ConfigError(f"n_routed_experts={num_experts} is not divisible by n_group={n_group}")
            cfg = cls(
                **common,
                num_experts=num_experts,
                moe_layer_mask=mask,
                norm_topk_prob=bool(d.get("norm_topk_prob", model_type == "deepseek_v3")),
                q_lora_rank=d.get("q_lora_rank"),
                kv_lora_rank=int(req("kv_lora_rank")),
                qk_nope_head_dim=int(req("qk_nope_head_dim")),
                qk_rope_head_dim=int(req("qk_rope_head_dim")),
                v_head_dim=int(req("v_head_dim")),
                rope_interleave=bool(d.get("rope_interleave", True)),
                n_shared_experts=int(d.get("n_shared_experts") or 0),
                scoring_func=scoring,
                topk_method=topk_method,
                n_group=n_group,
                topk_group=int(d.get("topk_group") or 1),
                routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            )
        if cfg.top_k > cfg.num_experts:
            raise ConfigError(f"num_experts_per_tok={cfg.top_k} exceeds the {cfg.num_experts} routed experts")
        if cfg.num_kv_heads and cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={cfg.num_heads} is not a multiple of num_key_value_heads={cfg.num_kv_heads}"
            )
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: a model directory needs a config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d, name=path.parent.name)


def _parse_quantization(q: dict[str, Any] | None) -> bool:
    """True for block-scaled FP8 weights as DeepSeek-V3/R1 and Qwen3-*-FP8 ship them; any
    other quantisation is refused by name rather than loaded as garbage."""
    if not q:
        return False
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(
            f"quantization_config.quant_method={method!r} is not supported; only 'fp8' checkpoints with 128x128 "
            "block scales (DeepSeek-V3/R1, Qwen3-*-FP8) load, or use the unquantised (bf16) release")
    block = q.get("weight_block_size")
    if block is None or list(block) != [128, 128]:
        raise ConfigError(
            f"quantization_config.weight_block_size={block!r} is not supported; FP8 checkpoints need [128, 128] "
            "block scales (per-tensor FP8 is not supported)")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config.fmt={fmt!r} is not supported (only 'e4m3')")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"quantization_config.activation_scheme={scheme!r} is not supported (only 'dynamic': "
                          "activations are quantised per token at run time, no stored input scales)")
    return True


def _parse_rope(d: dict[str, Any]) -> RopeConfig:
    # New layout (transformers >= 5): rope_parameters holds theta and scaling together.
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind != "yarn":
        raise ConfigError(f"rope scaling type {kind!r} is not supported (supported: default, yarn)")
    orig = params.get("original_max_position_embeddings")
    if orig is None:
        raise ConfigError("yarn rope scaling needs original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        factor = float(d["max_position_embeddings"]) / float(orig)
    return RopeConfig(
        theta=theta,
        kind="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )
