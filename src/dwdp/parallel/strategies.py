"""Build one rank's model under a strategy: ``dp`` (full replica), ``dep`` (expert parallel)
or ``dwdp``; the shared entry for ``dwdp bench`` and the serving prefill workers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRATEGIES = ("dp", "dep", "dwdp")


@dataclass
class RankModel:
    model: object
    runtime: object | None  # DEPRuntime / DWDPRuntime (None for dp)
    placement: object | None
    cfg: object

    def memory_bytes(self) -> dict:
        from ..info import param_breakdown

        if self.runtime is not None:
            return self.runtime.memory_bytes()
        esz = next(self.model.parameters()).element_size()
        return {"replica": param_breakdown(self.cfg).total * esz}


def build_rank_model(strategy: str, ctx, model_spec: str, num_layers: int | None = None, dtype=None,
                     local_experts: int | None = None, slice_mb: float | None = None, seed: int = 0,
                     peer_timeout_s: float = 60.0, max_num_tokens: int = 8192, expert_dtype: str = "same",
                     copy_streams: int = 1) -> RankModel:
    """Check the strategy fits (:class:`DoesNotFit` otherwise), build this rank's share,
    load or randomly initialise it, and apply the strategy."""
    from ..checkpoint import load_checkpoint
    from ..info import dwdp_rank_memory, param_breakdown
    from ..models import build_model, init_random
    from ..presets import resolve_model
    from .dwdp import apply_dwdp
    from .ep import apply_dep, ep_ranges
    from .placement import Placement
    from .replica import check_fits

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    cfg, ckpt = resolve_model(model_spec, num_layers)
    dtype = dtype or (torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    esz = torch.empty(0, dtype=dtype).element_size()
    if expert_dtype not in ("same", "fp8"):
        raise ValueError(f"expert dtype {expert_dtype!r}: choose same or fp8")
    eb = 1.0 if expert_dtype == "fp8" else esz  # bytes per expert weight (FP8 scales are ~0.01%)
    pb = param_breakdown(cfg)
    N, r = ctx.group_size, ctx.group_rank
    shard, placement = None, None
    if strategy == "dp":
        check_fits("dp (a full replica per GPU)", int(pb.non_expert * esz + pb.routed_experts * eb), cfg,
                   max_num_tokens, dtype, ctx.device)
    elif strategy == "dep":
        mine = ep_ranges(cfg.num_experts, N)[r]
        shard = (mine.start, len(mine))
        check_fits(f"dep (EP{N})", int(pb.non_expert * esz + len(mine) * pb.num_moe_layers * pb.expert_numel * eb),
                   cfg, max_num_tokens, dtype, ctx.device)
    else:
        placement = Placement.create(cfg.num_experts, N, local_experts)
        mine = placement.local_range(r)
        shard = (mine.start, len(mine))
        check_fits(f"dwdp ({placement.describe()})", dwdp_rank_memory(cfg, placement, esz, eb).total, cfg,
                   max_num_tokens, dtype, ctx.device)
    model = build_model(cfg, dtype, ctx.device, (lambda _: shard) if shard else None)
    if ckpt is not None:
        load_checkpoint(model, ckpt)
    else:
        init_random(model, seed)
    if expert_dtype == "fp8":
        from ..quant import quantize_experts_fp8

        quantize_experts_fp8(model)  # stored, pulled (DWDP) and sent to GEMMs as FP8 + block scales
    rt = None
    if strategy == "dep":
        rt = apply_dep(model, ctx.group.process_group, r, N)
    elif strategy == "dwdp":
        rt = apply_dwdp(model, ctx, placement, copy_timeout_s=peer_timeout_s,
                        slice_bytes=int(slice_mb * 2**20) if slice_mb else None, copy_streams=copy_streams)
    return RankModel(model, rt, placement, cfg)
