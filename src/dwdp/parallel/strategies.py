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

from ..config import ModelConfig
from ..quant import expert_bytes_per_weight
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
    weight_bytes: int  # parameters + DWDP slots, for the memory fit check
    placement: Placement | None = None


class Strategy:
    name: str
    lockstep: bool = False  # ranks must step together (collectives inside every step)
    grouped: bool = True  # ranks of a group share experts (dp: each rank alone)
    summary: str = ""
    color: str = "tab:gray"  # in plots

    def plan(self, cfg: ModelConfig, spec: "RankSpec", weight_elem_bytes: int, group_size: int,
             group_rank: int) -> RankPlan:
        raise NotImplementedError

    def apply(self, model: "MoECausalLM", ctx: "DWDPContext", spec: "RankSpec", plan: RankPlan,
              hooks: RuntimeHooks = NO_HOOKS) -> Runtime:
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

    def plan(self, cfg, spec, weight_elem_bytes, group_size, group_rank):
        from ..info import param_breakdown

        pb = param_breakdown(cfg)
        eb = expert_bytes_per_weight(spec.expert_dtype, weight_elem_bytes)
        return RankPlan("dp (a full replica per GPU)", None,
                        int(pb.non_expert * weight_elem_bytes + pb.routed_experts * eb))

    def apply(self, model, ctx, spec, plan, hooks=NO_HOOKS):
        return ReplicaRuntime(model)


class ExpertParallel(Strategy):
    name, lockstep, color = DEP, True, "tab:red"
    summary = "attention data parallel + expert parallel all-to-alls in every MoE layer"

    def plan(self, cfg, spec, weight_elem_bytes, group_size, group_rank):
        from ..info import param_breakdown
        from .ep import ep_ranges

        pb = param_breakdown(cfg)
        mine = ep_ranges(cfg.num_experts, group_size)[group_rank]
        eb = expert_bytes_per_weight(spec.expert_dtype, weight_elem_bytes)
        return RankPlan(f"dep (EP{group_size})", (mine.start, len(mine)),
                        int(pb.non_expert * weight_elem_bytes + len(mine) * pb.num_moe_layers * pb.expert_numel * eb))

    def apply(self, model, ctx, spec, plan, hooks=NO_HOOKS):
        from .ep import apply_dep

        return apply_dep(model, ctx.group.process_group, ctx.group_rank, ctx.group_size,
                         transport=spec.dep_transport, overlap=spec.dep_overlap, max_tokens=spec.max_num_tokens,
                         wire=spec.dep_wire)

    def step_report(self, runtime):
        st = runtime.step_stats
        return {"collective_s": [s.collective_s for s in st], "a2a_sent_bytes": sum(s.sent_bytes for s in st),
                "compute_s": [s.compute_s for s in st], "transfer_s": [s.transfer_s for s in st],
                "peer_wait_s": [s.wait_s for s in st], "host_syncs": sum(s.host_syncs for s in st)}


class DistributedWeights(Strategy):
    name, color = DWDP, "tab:blue"
    summary = "attention data parallel + experts split, pulled from peers one layer ahead"

    def plan(self, cfg, spec, weight_elem_bytes, group_size, group_rank):
        from ..info import dwdp_rank_memory

        placement = Placement.create(cfg.num_experts, group_size, spec.local_experts)
        mine = placement.local_range(group_rank)
        eb = expert_bytes_per_weight(spec.expert_dtype, weight_elem_bytes)
        return RankPlan(f"dwdp ({placement.describe()})", (mine.start, len(mine)),
                        dwdp_rank_memory(cfg, placement, weight_elem_bytes, eb).total, placement)

    def apply(self, model, ctx, spec, plan, hooks=NO_HOOKS):
        from .dwdp import apply_dwdp

        return apply_dwdp(model, ctx, plan.placement, copy_timeout_s=spec.peer_timeout_s,
                          slice_bytes=int(spec.slice_mb * 2**20) if spec.slice_mb else None,
                          copy_streams=spec.copy_streams, hooks=hooks)

    def step_report(self, runtime):
        st = runtime.step_stats
        return {"exposed_wait_s": [s.exposed_wait_s for s in st], "pulled_bytes": sum(s.pulled_bytes for s in st),
                "pull_seconds": sum(sum(s.pull_seconds) for s in st),
                "transfer_s": [sum(p for p in s.pull_seconds if p == p) for s in st],  # on the copy engine
                "peer_wait_s": [s.exposed_wait_s for s in st]}


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (DataParallel(), ExpertParallel(), DistributedWeights())}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None
