"""One rank of a run: its configuration (:class:`RankSpec`) and the one way to build it.

``dwdp run -N``, ``dwdp bench``, the serving prefill group, the tests and the GPU
benchmark scripts all build ranks with :func:`build_rank`: plan the strategy's share,
check it fits the device, agree with the group's peers on what they run, allocate only
this rank's experts, load or seed the weights, quantise experts if asked, apply the
strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import ModelConfig, resolve_dtype
from ..strategy.spec import RankPlan, RankSpec
from .hooks import NO_HOOKS, RuntimeHooks
from .strategies import Runtime, Strategy, get_strategy

if TYPE_CHECKING:
    from ..models.transformer import MoECausalLM


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
    spec = strategy.resolve(spec, cfg, dtype, None)  # "-L auto" is sized on the rank's device
    plans = [strategy.plan(cfg, spec, dtype, spec.group_size, r) for r in range(spec.group_size)]
    return strategy, cfg, ckpt, plans


def build_rank(spec: RankSpec, ctx, hooks: RuntimeHooks = NO_HOOKS, progress: bool = False) -> Rank:
    """Build this process's rank of ``ctx``'s group (see the module docstring).

    Raises :class:`~dwdp.memory.DoesNotFit` (same verdict on every rank) when the
    strategy's share does not fit the device, and
    :class:`~dwdp.parallel.group.SetupMismatch` when the group's ranks disagree."""
    from ..checkpoint import load_checkpoint
    from ..memory import check_fits
    from ..models import build_model, init_random
    from ..presets import resolve_model
    from .group import check_agreement, fingerprint_checkpoint

    strategy = get_strategy(spec.strategy)
    if strategy.grouped and ctx.group_size != spec.group_size:
        raise ValueError(f"rank spec says group size {spec.group_size}, the process group has {ctx.group_size}")
    cfg, ckpt = resolve_model(spec.model, spec.num_layers)
    dtype = resolve_dtype(spec.dtype, ctx.device)
    spec = strategy.resolve(spec, cfg, dtype, ctx.device)
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
