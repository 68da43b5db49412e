"""One rank of a run: its configuration (:class:`RankSpec`) and the one way to build it.

``dwdp run -N``, ``dwdp bench``, the serving prefill group, the tests and the GPU
benchmark scripts all build ranks with :func:`build_rank`: plan the strategy's share,
check it fits the device, agree with the group's peers on what they run, allocate only
this rank's experts, load or seed the weights, quantise experts if asked, apply the
strategy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from ..config import ModelConfig, resolve_dtype
from .hooks import NO_HOOKS, RuntimeHooks
from .strategies import DWDP, RankPlan, Runtime, Strategy, get_strategy

if TYPE_CHECKING:
    from ..models.transformer import MoECausalLM


@dataclass
class RankSpec:
    """Everything a rank needs to build its model; identical on every rank of a group."""

    model: str  # preset name or Hugging Face checkpoint directory
    strategy: str = DWDP
    num_layers: int | None = None  # keep only the first N layers
    dtype: str | None = None  # a key of config.DTYPES; default bf16 on GPU, fp32 on CPU
    device: str = "cpu"  # "cpu" or "cuda" (each rank takes cuda:LOCAL_RANK)
    group_size: int = 1
    local_experts: int | str | None = None  # DWDP L (default: the smallest valid; "auto": the largest that fits)
    expert_dtype: str = "auto"  # "auto": as the checkpoint ships them; "same": the model dtype; "fp8": e4m3
    dense_dtype: str = "auto"  # the layers' projections, as expert_dtype (FP8 releases ship them FP8)
    slice_mb: float | None = None  # DWDP: pull slices of this many MiB, round-robin over peers
    copy_streams: int = 1  # DWDP copy streams per rank
    pull_pacing: str = "off"  # DWDP: "off" (pulls as fast as possible) or "jit" (each ends just before its MoE)
    short_steps: str = "pull"  # DWDP: "pull", "ship" (steps <= ship_max_tokens send tokens to owners) or "auto"
    ship_max_tokens: int = 2048  # DWDP: the largest step that may ship (sizes the in/out boxes)
    dep_transport: str = "nccl"  # DEP all-to-all: "nccl" (all_to_all_single) or "symm" (NVSHMEM, one-sided)
    dep_overlap: bool = False  # DEP two-batch overlap of all-to-alls with expert compute
    dep_wire: str = "auto"  # DEP dispatch rows: "auto" (FP8 when experts are FP8), "native", "fp8"
    seed: int = 0  # random weights (presets)
    max_num_tokens: int = 8192  # the step budget: sizes the memory fit check
    peer_timeout_s: float = 60.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Rank:
    spec: RankSpec
    strategy: Strategy
    cfg: ModelConfig
    plan: RankPlan
    model: "MoECausalLM"  # with the strategy applied
    runtime: Runtime

    def close(self) -> None:
        self.runtime.close()


def plan_group(spec: RankSpec):
    """Resolve the model and plan every rank of a group: raises the user's error (unknown
    model or strategy, impossible placement) before any process is started."""
    from ..presets import resolve_model

    strategy = get_strategy(spec.strategy)
    cfg, ckpt = resolve_model(spec.model, spec.num_layers)
    dtype = resolve_dtype(spec.dtype, spec.device)
    spec = resolve_local_experts(spec, cfg, dtype, None)  # "auto" is sized on the rank's device
    plans = [strategy.plan(cfg, spec, dtype, spec.group_size, r) for r in range(spec.group_size)]
    return strategy, cfg, ckpt, plans


AUTO_L_MARGIN_BYTES = 4 << 30  # -L auto leaves this much of the free memory unplanned


def resolve_local_experts(spec: RankSpec, cfg: ModelConfig, dtype, device) -> RankSpec:
    """``local_experts="auto"`` made a number: the largest L that fits this CUDA device
    (:func:`dwdp.info.auto_local_experts`); elsewhere (CPU, or before a device is known) the
    smallest valid L."""
    if spec.local_experts != "auto":
        return spec
    import torch

    from ..info import auto_local_experts
    from .placement import Placement
    from .replica import FIT_HEADROOM

    if device is not None and torch.device(device).type == "cuda" and spec.strategy == DWDP:
        # What the fit check allows (FIT_HEADROOM of the card), and no more than is free now less a
        # margin for what no estimate counts (NCCL and CUDA context, the all-to-all ceiling's
        # buffers, token-shipping boxes), so a GPU shared with decode ranks is not overfilled.
        dev = torch.device(device)
        free, total = torch.cuda.mem_get_info(dev)
        budget = min(FIT_HEADROOM * total, free - AUTO_L_MARGIN_BYTES)
        L = auto_local_experts(cfg, spec.group_size, dtype, spec.expert_dtype, spec.max_num_tokens, budget,
                               dense_dtype=spec.dense_dtype)
    else:  # the default placement's L (raises, saying why, for an impossible E and N)
        L = Placement.create(cfg.num_experts, max(spec.group_size, 1)).local
    return replace(spec, local_experts=L)


def build_rank(spec: RankSpec, ctx, hooks: RuntimeHooks = NO_HOOKS, progress: bool = False) -> Rank:
    """Build this process's rank of ``ctx``'s group (see the module docstring).

    Raises :class:`~dwdp.parallel.replica.DoesNotFit` (same verdict on every rank) when the
    strategy's share does not fit the device, and
    :class:`~dwdp.parallel.group.SetupMismatch` when the group's ranks disagree."""
    from ..checkpoint import load_checkpoint
    from ..models import build_model, init_random
    from ..presets import resolve_model
    from .group import check_agreement, fingerprint_checkpoint
    from .replica import check_fits

    strategy = get_strategy(spec.strategy)
    if strategy.grouped and ctx.group_size != spec.group_size:
        raise ValueError(f"rank spec says group size {spec.group_size}, the process group has {ctx.group_size}")
    cfg, ckpt = resolve_model(spec.model, spec.num_layers)
    dtype = resolve_dtype(spec.dtype, ctx.device)
    spec = resolve_local_experts(spec, cfg, dtype, ctx.device)
    group_size, group_rank = (ctx.group_size, ctx.group_rank) if strategy.grouped else (1, 0)
    plan = strategy.plan(cfg, spec, dtype, group_size, group_rank)
    check_fits(plan.label, plan.weight_bytes, cfg, spec.max_num_tokens, dtype, ctx.device)
    if ctx.group_size > 1:
        check_agreement(ctx, {"model config": cfg.to_dict(), "strategy": spec.strategy, "plan": plan.label,
                              "checkpoint": fingerprint_checkpoint(str(ckpt) if ckpt else None),
                              "dtype": str(dtype), "expert dtype": spec.expert_dtype,
                              "dense dtype": spec.dense_dtype,
                              "seed": spec.seed if ckpt is None else None})
    shard = plan.expert_shard
    # Every tensor allocated once in its final dtype; FP8 experts stay FP8 from allocation on
    # (stored, pulled by DWDP and sent to the GEMMs as FP8 + block scales).
    store = strategy.expert_store(cfg, ctx, spec, plan, dtype)
    model = build_model(cfg, dtype, ctx.device, (lambda _: shard) if shard else None,
                        expert_dtype=spec.expert_dtype, expert_storage=store.views if store else None,
                        dense_dtype=spec.dense_dtype)
    if ckpt is not None:
        load_checkpoint(model, ckpt, progress=progress)
    else:
        init_random(model, spec.seed)
    runtime = strategy.apply(model, ctx, spec, plan, hooks, store)
    return Rank(spec, strategy, cfg, plan, model, runtime)
