"""Where a model's bytes are: the one place memory is counted, for ``dwdp info``, the
fit check every rank runs before allocating, ``-L auto`` and the planner.

Weights are counted on a meta-device model (no memory allocated), so it works for
DeepSeek-V3's 671B parameters on a laptop. :func:`build_bytes` runs
:func:`~dwdp.models.build_model` itself on the meta device, so it counts exactly what a
real build allocates: fp32 routers and routing buffers, tied embeddings once, FP8 experts
with their block scales. What differs between strategies (DWDP's prefetch slots, DEP's
all-to-all buffers) each strategy's description adds on top (:mod:`dwdp.strategy`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .strategy.placement import Placement, valid_local_counts

FIT_HEADROOM = 0.92  # usable share of a GPU's memory: what the fit check, -L auto and the planner allow


class DoesNotFit(ValueError):
    """A strategy's per-GPU memory exceeds the device."""


@dataclass
class ParamBreakdown:
    embeddings: int
    attention: int
    norms: int
    dense_mlp: int
    shared_experts: int
    routers: int
    routed_experts: int
    num_moe_layers: int
    expert_numel: int  # one routed expert

    @property
    def total(self) -> int:
        return self.non_expert + self.routed_experts

    @property
    def non_expert(self) -> int:
        return (self.embeddings + self.attention + self.norms + self.dense_mlp + self.shared_experts
                + self.routers)

    @property
    def projections(self) -> int:
        """The weights ``--dense-dtype fp8`` stores as FP8: attention, dense MLP, shared experts."""
        return self.attention + self.dense_mlp + self.shared_experts

    def non_expert_bytes(self, bytes_per_param: float, dense_bytes_per_param: float | None = None) -> float:
        """Non-expert bytes with the projections at ``dense_bytes_per_param`` (FP8: 1 + 1/4096)."""
        dense = bytes_per_param if dense_bytes_per_param is None else dense_bytes_per_param
        return (self.non_expert - self.projections) * bytes_per_param + self.projections * dense


@functools.lru_cache(maxsize=64)
def param_breakdown(cfg: ModelConfig) -> ParamBreakdown:
    from .models.transformer import MoECausalLM

    with torch.device("meta"):
        model = MoECausalLM(cfg)
    counts = dict(embeddings=0, attention=0, norms=0, dense_mlp=0, shared_experts=0, routers=0, routed_experts=0)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        n = p.numel()
        if name.endswith((".w13", ".w2")):
            counts["routed_experts"] += n
        elif "embed_tokens" in name or name.startswith("lm_head"):
            counts["embeddings"] += n
        elif ".self_attn." in name and "norm" not in name.split(".")[-2]:
            counts["attention"] += n
        elif "norm" in name:
            counts["norms"] += n
        elif ".shared_experts." in name:
            counts["shared_experts"] += n
        elif ".mlp.gate." in name:
            counts["routers"] += n
        else:
            counts["dense_mlp"] += n
    return ParamBreakdown(**counts, num_moe_layers=len(cfg.moe_layers), expert_numel=cfg.expert_numel())


@dataclass(frozen=True)
class BuildBytes:
    """Bytes :func:`~dwdp.models.build_model` allocates, split so any expert share can be priced."""

    non_expert: int  # all but the routed experts: weights in the model dtype, fp32 routers, buffers
    per_expert: int  # one routed expert as stored (FP8: block scales included)
    num_moe_layers: int

    def total(self, experts_per_layer: int) -> int:
        return self.non_expert + experts_per_layer * self.num_moe_layers * self.per_expert


@functools.lru_cache(maxsize=64)
def build_bytes(cfg: ModelConfig, dtype: torch.dtype, expert_dtype: str | torch.dtype = "auto",
                dense_dtype: str | torch.dtype = "auto") -> BuildBytes:
    """Exact bytes of ``build_model(cfg, dtype, expert_dtype=expert_dtype)`` (any shard:
    ``total(experts per MoE layer)``). Checkpoint loading and init_random allocate nothing
    that outlives them, so this is also the resident size after loading. FP8 projections
    (``dense_dtype``) count 1 byte per weight plus their block scales."""
    from .models.build import build_model, resolve_expert_dtype
    from .quant import expert_bytes

    model = build_model(cfg, dtype, "meta", lambda _: (0, 0), expert_dtype=expert_dtype, dense_dtype=dense_dtype)
    seen: set[int] = set()
    non_expert = 0
    for t in [*model.parameters(), *model.buffers()]:  # parameters() yields tied weights once
        if id(t) not in seen:
            seen.add(id(t))
            non_expert += t.numel() * t.element_size()
    edt = resolve_expert_dtype(cfg, expert_dtype, dtype)
    return BuildBytes(non_expert, expert_bytes(cfg.hidden_size, cfg.moe_intermediate_size, edt),
                      len(cfg.moe_layers))


@dataclass
class RankMemory:
    non_expert: int
    resident_experts: int
    slots: int  # the two prefetch slots, each sized for one MoE layer's remote experts

    @property
    def total(self) -> int:
        return self.non_expert + self.resident_experts + self.slots


def rank_memory(cfg: ModelConfig, dtype: torch.dtype, expert_dtype: str | torch.dtype = "auto",
                local_experts: int | None = None, slot_experts: int = 0,
                dense_dtype: str | torch.dtype = "auto") -> RankMemory:
    """Exact weight bytes of one rank: the model as built with ``local_experts`` routed
    experts per MoE layer (default all: a ``dp`` replica), plus ``slot_experts`` experts'
    worth of prefetch slots (DWDP: ``2 * placement.remote``)."""
    bb = build_bytes(cfg, dtype, expert_dtype, dense_dtype)
    local = cfg.num_experts if local_experts is None else local_experts
    return RankMemory(non_expert=bb.non_expert, resident_experts=bb.total(local) - bb.non_expert,
                      slots=slot_experts * bb.per_expert)


def dwdp_rank_memory(cfg: ModelConfig, placement: Placement, bytes_per_param: float | None = None,
                     expert_bytes_per_param: float | None = None, *, dense_bytes_per_param: float | None = None,
                     dtype: torch.dtype | None = None,
                     expert_dtype: str | torch.dtype = "auto", dense_dtype: str | torch.dtype = "auto") -> RankMemory:
    """A DWDP rank's weights. With ``dtype`` (preferred) exactly what it allocates (see
    :func:`rank_memory`); with bytes per parameter only, the older estimate."""
    if dtype is not None:
        slots = 2 * placement.remote if placement.group_size > 1 else 0
        return rank_memory(cfg, dtype, expert_dtype, placement.local, slots, dense_dtype)
    if bytes_per_param is None:
        raise TypeError("dwdp_rank_memory needs dtype= (exact) or bytes_per_param")
    pb = param_breakdown(cfg)
    ebpp = bytes_per_param if expert_bytes_per_param is None else expert_bytes_per_param
    expert_bytes = pb.expert_numel * ebpp
    return RankMemory(
        non_expert=int(pb.non_expert_bytes(bytes_per_param, dense_bytes_per_param)),
        resident_experts=int(placement.local * pb.num_moe_layers * expert_bytes),
        slots=int(2 * placement.remote * expert_bytes) if placement.group_size > 1 else 0,
    )


def auto_local_experts(cfg: ModelConfig, group_size: int, dtype: torch.dtype, expert_dtype: str | torch.dtype,
                       max_num_tokens: int, budget_bytes: float, dense_dtype: str | torch.dtype = "auto") -> int:
    """DWDP's ``-L auto``: the largest valid L whose weights (resident experts, both prefetch
    slots, non-expert) plus one step's activations fit ``budget_bytes``. Spare memory then
    holds experts a rank would otherwise pull every layer: fewer bytes on NVLink and less HBM
    taken from the compute the pulls overlap. When none fits, the smallest L (the fit check
    then refuses it with the numbers)."""
    valid = valid_local_counts(cfg.num_experts, group_size)
    if not valid:  # E < N: let the placement say why
        return Placement.create(cfg.num_experts, group_size).local
    act = activation_bytes(cfg, max_num_tokens, torch.empty(0, dtype=dtype).element_size())
    best = valid[0]
    for L in valid:
        mem = dwdp_rank_memory(cfg, Placement(cfg.num_experts, group_size, L), dtype=dtype, expert_dtype=expert_dtype,
                               dense_dtype=dense_dtype)
        if mem.total + act <= budget_bytes:
            best = L
    return best


def activation_bytes(cfg: ModelConfig, max_num_tokens: int, bytes_per_elem: int) -> int:
    """Rough peak activation memory of one prefill step of ``max_num_tokens`` tokens.

    Dominated by the MoE layer: k copies of each token's hidden state sorted by expert,
    their gate/up projections (2 x inter) and outputs, plus the residual stream, the
    attention inputs/outputs and the step's KV.
    """
    T, H, K, inter = max_num_tokens, cfg.hidden_size, max(cfg.top_k, 1), cfg.moe_intermediate_size
    moe = T * K * (2 * H + 3 * inter)
    qkv = T * (cfg.num_heads * (cfg.qk_head_dim + (cfg.v_head_dim if cfg.is_mla else cfg.head_dim)) + 2 * H)
    kv = T * cfg.num_layers * cfg.kv_cache_width
    return int((moe + qkv + kv + 4 * T * H) * bytes_per_elem + T * cfg.num_experts * 4 * 2)


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the decode KV cache, across all layers."""
    return cfg.kv_cache_width * cfg.num_layers * torch.empty((), dtype=dtype).element_size()


def check_fits(what: str, weight_bytes: int, cfg: ModelConfig, max_num_tokens: int, dtype: torch.dtype,
               device: torch.device, headroom: float = FIT_HEADROOM, total_memory: int | None = None) -> None:
    """Raise :class:`DoesNotFit` if weights + one step's activations exceed the GPU
    (``total_memory`` overrides the device's size; CPU runs are not checked)."""
    if total_memory is None:
        if device.type != "cuda":
            return
        total_memory = torch.cuda.get_device_properties(device).total_memory
    total = total_memory
    act = activation_bytes(cfg, max_num_tokens, torch.empty(0, dtype=dtype).element_size())
    need = weight_bytes + act
    if need > headroom * total:
        gib = 2**30
        raise DoesNotFit(
            f"{what} does not fit: {weight_bytes / gib:.1f} GiB of weights + ~{act / gib:.1f} GiB of activations at "
            f"{max_num_tokens} tokens per step = {need / gib:.1f} GiB per GPU, but {device} has "
            f"{total / gib:.1f} GiB ({headroom:.0%} usable). Use dwdp or dep, fewer layers (--num-layers), "
            "or a smaller --max-num-tokens")
