"""Shared fixtures: tiny random Hugging Face reference models, built once per session.

Each reference model is created with transformers' own modelling code (see
``hf_reference.py``), randomised, and written with ``save_pretrained`` into a
session temp dir; tests load that directory with our loader and compare our forward
pass against transformers' forward pass on the same weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hf_reference import DSV3_KW, _randomise, hf_last_logits_and_cache, make_hf_model

# One intra-op thread in the test process (spawned ranks set their own): the ops here are
# tiny, and a thread pool's barriers stall whenever other processes share the cores (the
# planner's small reductions ran thousands of times slower beside two busy loops).
torch.set_num_threads(1)

# name -> (family, overrides of hf_reference's tiny config). Every variant is an
# independent reference: transformers' code for that family on those settings.
VARIANTS: dict[str, tuple[str, dict]] = {
    # GQA + q/k norm, dense layer 1 (mlp_only_layers), softmax top-k with renormalisation.
    "qwen3_moe": ("qwen3_moe", {}),
    # No renormalisation of the top-k weights; decoder_sparse_step=2 makes layers 1 and 3
    # sparse by step, and mlp_only_layers=[3] takes layer 3 back out: only layer 1 is MoE.
    "qwen3_moe_sparse": ("qwen3_moe", dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[3])),
    # Qwen3 with YaRN rope (cos/sin magnitude, no softmax mscale) and q/k/v/o biases.
    "qwen3_moe_yarn_bias": ("qwen3_moe", dict(
        attention_bias=True,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128))),
    # lm_head shares the embedding matrix (no lm_head.weight in the checkpoint).
    "qwen3_moe_tied": ("qwen3_moe", dict(tie_word_embeddings=True)),
    # MLA with q low-rank, interleaved rope, YaRN + mscale, sigmoid noaux_tc group routing.
    "deepseek_v3": ("deepseek_v3", {}),
    # MLA without q compression, half-split rope, plain (non-YaRN) rope.
    "deepseek_v3_plain": ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False, rope_scaling=None)),
    # DeepSeek-V2: softmax group_limited_greedy routing, 2 shared experts, mscale 0.707,
    # attention biases. (transformers' V2 ignores norm_topk_prob; we keep it False.)
    "deepseek_v2": ("deepseek_v2", dict(
        n_shared_experts=2, topk_method="group_limited_greedy", routed_scaling_factor=1.5, q_lora_rank=None,
        attention_bias=True, norm_topk_prob=False,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707))),
}
# A large rms_norm_eps: the MLA latent norms must keep the reference's fixed 1e-6 while
# every other norm takes the config's eps (tested on its own, not in every fixture).
EPS_VARIANTS = {f"{name}_eps": (VARIANTS[name][0], {**VARIANTS[name][1], "rms_norm_eps": 1e-3})
                for name in ("deepseek_v3", "deepseek_v2")}
VARIANTS.update(EPS_VARIANTS)
CORE_VARIANTS = [v for v in VARIANTS if v not in EPS_VARIANTS]

# Variants whose HF cache stores the roped key interleaved ([re0, im0, re1, im1, ...]):
# transformers' DeepSeek-V2 applies rope as a complex product. Our cache (like
# transformers' DeepSeek-V3 and DeepSeek's own code) de-interleaves it; attention scores
# are invariant to that fixed permutation, so the tests de-interleave HF's copy.
INTERLEAVED_HF_CACHE = {"deepseek_v2", "deepseek_v2_eps"}

SEEDS = {name: i + 1 for i, name in enumerate(VARIANTS)}


def _make_deepseek_v2(out_dir: Path, seed: int, **overrides):
    import transformers

    torch.manual_seed(seed)
    kw = {k: v for k, v in DSV3_KW.items()}
    kw.update(overrides)
    cfg = transformers.DeepseekV2Config(**kw)
    model = transformers.DeepseekV2ForCausalLM(cfg)
    _randomise(model, seed)
    model.eval()
    model.config._attn_implementation = "eager"
    model.save_pretrained(out_dir)
    return model


class RefCase:
    """One saved reference model: HF module, checkpoint dir, parsed config, our model."""

    def __init__(self, name: str, family: str, path: Path, hf):
        from dwdp.config import ModelConfig

        self.name, self.family, self.path, self.hf = name, family, path, hf
        self.cfg = ModelConfig.from_json_file(path / "config.json")
        self._ours: dict[torch.dtype, torch.nn.Module] = {}
        self._refs: dict[tuple[int, ...], tuple[torch.Tensor, list]] = {}
        self._hf_bf16 = None

    @property
    def vocab(self) -> int:
        return self.cfg.vocab_size

    def ours(self, dtype: torch.dtype = torch.float32):
        """Our model loaded from the checkpoint (cached per dtype; never mutate it)."""
        if dtype not in self._ours:
            from dwdp.checkpoint import load_checkpoint
            from dwdp.models import build_model

            m = build_model(self.cfg, dtype=dtype)
            load_checkpoint(m, self.path)
            self._ours[dtype] = m
        return self._ours[dtype]

    def reference(self, ids: list[int]):
        """transformers' fp32 forward of one sequence alone: (last logits, per-layer cache)."""
        key = tuple(ids)
        if key not in self._refs:
            self._refs[key] = hf_last_logits_and_cache(self.hf, list(ids))
        return self._refs[key]

    def reference_bf16_logits(self, ids: list[int]) -> torch.Tensor:
        """transformers' own bf16 forward (to put our bf16 error in context)."""
        if self._hf_bf16 is None:
            self._hf_bf16 = copy.deepcopy(self.hf).to(torch.bfloat16)
        return hf_last_logits_and_cache(self._hf_bf16, list(ids))[0]


class RefCases:
    """Lazily built reference models, each at most once per session."""

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._cases: dict[str, RefCase] = {}

    def __getitem__(self, name: str) -> RefCase:
        if name not in self._cases:
            family, overrides = VARIANTS[name]
            path = self._tmp.mktemp(f"hf_{name}")
            if family == "deepseek_v2":
                hf = _make_deepseek_v2(path, SEEDS[name], **overrides)
            else:
                hf = make_hf_model(family, path, seed=SEEDS[name], **overrides)
            self._cases[name] = RefCase(name, family, path, hf)
        return self._cases[name]


@pytest.fixture(scope="session")
def ref_cases(tmp_path_factory) -> RefCases:
    return RefCases(tmp_path_factory)


@pytest.fixture(scope="session")
def qwen3_ref(ref_cases) -> RefCase:
    return ref_cases["qwen3_moe"]


@pytest.fixture(scope="session")
def dsv3_ref(ref_cases) -> RefCase:
    return ref_cases["deepseek_v3"]


@pytest.fixture(scope="session")
def dsv3_plain_ref(ref_cases) -> RefCase:
    return ref_cases["deepseek_v3_plain"]


@pytest.fixture(scope="session")
def qwen3_sparse_ref(ref_cases) -> RefCase:
    return ref_cases["qwen3_moe_sparse"]


@pytest.fixture(scope="session", params=CORE_VARIANTS)
def any_ref(request, ref_cases) -> RefCase:
    """Every reference variant (tests using it run once per variant)."""
    return ref_cases[request.param]


# Self-consistency tests (packed vs alone, chunked vs one shot) need a model whose
# output is well defined; the tied variant is covered by the vs-HF tests.
@pytest.fixture(scope="session", params=[v for v in CORE_VARIANTS if v != "qwen3_moe_tied"])
def self_ref(request, ref_cases) -> RefCase:
    return ref_cases[request.param]


@pytest.fixture(scope="session", params=["qwen3_moe", "deepseek_v3"])
def base_ref(request, ref_cases) -> RefCase:
    """The two base families only."""
    return ref_cases[request.param]
