"""The parallel strategies and their registry: the one place that knows their names.

A strategy is applied to a plain model from outside, in two parts:

* :meth:`Strategy.plan`: pure arithmetic on the config (no device, no group): which
  routed experts this rank stores and how many bytes of weights that is. The CLI calls
  it before spawning anything, so an impossible placement fails once, cleanly;
* :meth:`Strategy.apply`: turns the built model into a rank of the group and returns
  its :class:`Runtime` (per-step statistics, memory report, close).

``dp`` keeps a full replica per rank; ``dep`` splits each MoE layer's experts and moves
tokens to them in all-to-alls every layer, so its ranks must step in lockstep; ``dwdp``
splits the experts and moves the weights instead, one layer ahead, and never waits for
a peer. :mod:`dwdp.parallel.rank` builds a rank from a :class:`~dwdp.parallel.rank.RankSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..config import ModelConfig
from .hooks import NO_HOOKS, RuntimeHooks
from .placement import Placement

DP, DEP, DWDP = "dp", "dep", "dwdp"  # the strategies' names; other modules import these
BASELINE = DEP  # what throughput ratios are reported against: the expert parallelism the field runs

if TYPE_CHECKING:
    from ..models.transformer import MoECausalLM
    from .group import DWDPContext
    from .rank import RankSpec


class Runtime(Protocol):
    """What every strategy's per-rank runtime offers the step driver and the bench."""

    step_stats: list  # one entry per forward step: the strategy's own stats dataclass

    def memory_bytes(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RankPlan:
    """What one rank of a strategy stores, decided before anything is allocated."""

    label: str  # e.g. "dwdp (E=128 N=4 L=32 P=32)", used in errors and tables
    expert_shard: tuple[int, int] | None  # (first expert, count) per MoE layer; None: all
    weight_bytes: int  # parameters + DWDP slots + DEP all-to-all buffers: the fit check adds activations
    placement: Placement | None = None


class Strategy:
    name: str
    lockstep: bool = False  # ranks must step together (collectives inside every step)
    grouped: bool = True  # ranks of a group share experts (dp: each rank alone)
    summary: str = ""
    color: str = "tab:gray"  # in plots

    def plan(self, cfg: ModelConfig, spec: "RankSpec", dtype: torch.dtype, group_size: int,
             group_rank: int) -> RankPlan:
        raise NotImplementedError

    def expert_store(self, cfg: ModelConfig, ctx: "DWDPContext", spec: "RankSpec", plan: RankPlan,
                     dtype: torch.dtype):
        """Memory the routed experts must live in, allocated before the model (an object with
        ``views(layer_idx)`` for ``build_model(expert_storage=...)``), or None: anywhere."""
        return None

    def apply(self, model: "MoECausalLM", ctx: "DWDPContext", spec: "RankSpec", plan: RankPlan,
              hooks: RuntimeHooks = NO_HOOKS, store=None) -> Runtime:
        raise NotImplementedError

    def step_report(self, runtime: Runtime) -> dict[str, Any]:
        """The runtime's step statistics as JSON-ready fields of a bench rank report."""
        return {}


class ReplicaRuntime:
    """dp: nothing to do during steps; only the memory report."""

    def __init__(self, model: "MoECausalLM"):
        self.model = model
        self.step_stats: list = []

    def memory_bytes(self) -> dict[str, int]:
        return {"replica": sum(p.numel() * p.element_size() for p in self.model.parameters())}

    def close(self) -> None:
        pass


class DataParallel(Strategy):
    name, grouped = DP, False
    summary = "a full replica per rank, no communication (the upper bound where it fits)"

    def plan(self, cfg, spec, dtype, group_size, group_rank):
        from ..info import rank_memory

        return RankPlan("dp (a full replica per GPU)", None, rank_memory(cfg, dtype, spec.expert_dtype, dense_dtype=spec.dense_dtype).total)

    def apply(self, model, ctx, spec, plan, hooks=NO_HOOKS, store=None):
        return ReplicaRuntime(model)


class ExpertParallel(Strategy):
    name, lockstep, color = DEP, True, "tab:red"
    summary = "attention data parallel + expert parallel all-to-alls in every MoE layer"

    def plan(self, cfg, spec, dtype, group_size, group_rank):
        from ..info import rank_memory
        from ..models.build import resolve_expert_dtype
        from ..quant import FP8
        from .ep import dep_buffer_bytes, ep_ranges, fp8_wire

        mine = ep_ranges(cfg.num_experts, group_size)[group_rank]
        fp8_experts = resolve_expert_dtype(cfg, spec.expert_dtype, dtype) == FP8 and spec.device.startswith("cuda")
        wire = fp8_wire(spec.dep_wire, fp8_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        buffers = dep_buffer_bytes(cfg, group_size, spec.max_num_tokens, wire, torch.empty(0, dtype=dtype).element_size())
        return RankPlan(f"dep (EP{group_size})", (mine.start, len(mine)),
                        rank_memory(cfg, dtype, spec.expert_dtype, len(mine), dense_dtype=spec.dense_dtype).total + buffers)

    def apply(self, model, ctx, spec, plan, hooks=NO_HOOKS, store=None):
        from .ep import apply_dep

        return apply_dep(model, ctx.group.process_group, ctx.group_rank, ctx.group_size,
                         transport=spec.dep_transport, overlap=spec.dep_overlap, max_tokens=spec.max_num_tokens,
                         wire=spec.dep_wire)

    def step_report(self, runtime):
        st = runtime.step_stats
        return {"collective_s": [s.collective_s for s in st], "a2a_sent_bytes": sum(s.sent_bytes for s in st),
                "compute_s": [s.compute_s for s in st], "transfer_s": [s.transfer_s for s in st],
                "peer_wait_s": [s.wait_s for s in st], "host_syncs": sum(s.host_syncs for s in st),
                "expert_pairs": [s.expert_pairs for s in st]}


class DistributedWeights(Strategy):
    name, color = DWDP, "tab:blue"
    summary = "attention data parallel + experts split, pulled from peers one layer ahead"

    def plan(self, cfg, spec, dtype, group_size, group_rank):
        from ..info import dwdp_rank_memory

        placement = Placement.create(cfg.num_experts, group_size, spec.local_experts)
        mine = placement.local_range(group_rank)
        return RankPlan(f"dwdp ({placement.describe()})", (mine.start, len(mine)),
                        dwdp_rank_memory(cfg, placement, dtype=dtype, expert_dtype=spec.expert_dtype,
                                         dense_dtype=spec.dense_dtype).total, placement)

    def expert_store(self, cfg, ctx, spec, plan, dtype):
        from ..models.build import resolve_expert_dtype
        from .dwdp import ResidentStore

        # Peers read the resident experts from peer-visible memory: build them there.
        return ResidentStore(cfg, plan.placement, resolve_expert_dtype(cfg, spec.expert_dtype, dtype), ctx)

    def apply(self, model, ctx, spec, plan, hooks=NO_HOOKS, store=None):
        from .dwdp import apply_dwdp

        return apply_dwdp(model, ctx, plan.placement, copy_timeout_s=spec.peer_timeout_s,
                          slice_bytes=int(spec.slice_mb * 2**20) if spec.slice_mb else None,
                          copy_streams=spec.copy_streams, pacing=spec.pull_pacing, hooks=hooks, store=store,
                          short_steps=spec.short_steps,
                          ship_max_tokens=min(spec.ship_max_tokens, spec.max_num_tokens))  # no step is larger

    def step_report(self, runtime):
        st = runtime.step_stats
        return {"exposed_wait_s": [s.exposed_wait_s for s in st], "pulled_bytes": sum(s.pulled_bytes for s in st),
                "pull_seconds": sum(sum(s.pull_seconds) for s in st),
                "transfer_s": [sum(p for p in s.pull_seconds if p == p) for s in st],  # on the copy engine
                "peer_wait_s": [s.exposed_wait_s for s in st], "paced_pulls": [s.paced_pulls for s in st],
                "shipped_steps": sum(s.shipped_bytes > 0 for s in st), "shipped_bytes": sum(s.shipped_bytes for s in st),
                "break_even_tokens": runtime.break_even_tokens()}


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (DataParallel(), ExpertParallel(), DistributedWeights())}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None
