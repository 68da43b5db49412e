"""The parallel strategies' runtime side: how each is applied to a built model.

Each strategy's description (:mod:`dwdp.strategy`: options, plan, memory, cost model) is
extended here with what needs the process group:

* :meth:`Strategy.expert_store`: memory the routed experts must live in (DWDP: where
  peers can read them);
* :meth:`Strategy.apply`: turns the built model into a rank of the group and returns
  its :class:`Runtime` (per-step statistics, memory report, close);
* :meth:`Strategy.step_report` and :meth:`Strategy.short_step_hold`: what the bench
  reports and how the step driver treats short steps.

``dp`` keeps a full replica per rank; ``dep`` splits each MoE layer's experts and moves
tokens to them in all-to-alls every layer, so its ranks must step in lockstep; ``dwdp``
splits the experts and moves the weights instead, one layer ahead, and never waits for
a peer. :mod:`dwdp.parallel.rank` builds a rank from a :class:`~dwdp.strategy.spec.RankSpec`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..config import ModelConfig
from ..engine import ShortStepHold
from ..strategy import dep, dp, dwdp
from ..strategy.base import StrategyDescription
from ..strategy.spec import RankPlan, RankSpec
from .hooks import NO_HOOKS, RuntimeHooks

if TYPE_CHECKING:
    from ..models.transformer import MoECausalLM
    from .group import DWDPContext


class Runtime(Protocol):
    """What every strategy's per-rank runtime offers the step driver and the bench."""

    step_stats: list  # one entry per forward step: the strategy's own stats dataclass

    def memory_bytes(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class Strategy(StrategyDescription):
    def expert_store(self, cfg: ModelConfig, ctx: "DWDPContext", spec: RankSpec, plan: RankPlan,
                     dtype: torch.dtype):
        """Memory the routed experts must live in, allocated before the model (an object with
        ``views(layer_idx)`` for ``build_model(expert_storage=...)``), or None: anywhere."""
        return None

    def apply(self, model: "MoECausalLM", ctx: "DWDPContext", spec: RankSpec, plan: RankPlan,
              hooks: RuntimeHooks = NO_HOOKS, store=None) -> Runtime:
        raise NotImplementedError

    def step_report(self, runtime: Runtime) -> dict[str, Any]:
        """The runtime's step statistics as JSON-ready fields of a bench rank report."""
        return {}

    def short_step_hold(self, runtime: Runtime, hold_ms: float) -> ShortStepHold | None:
        """How long the step driver may hold a step too short to pay for itself, waiting for
        more requests (None: never; only a strategy that pays per step has a break-even)."""
        return None


class ReplicaRuntime:
    """dp: nothing to do during steps; only the memory report."""

    def __init__(self, model: "MoECausalLM"):
        self.model = model
        self.step_stats: list = []

    def memory_bytes(self) -> dict[str, int]:
        return {"replica": sum(p.numel() * p.element_size() for p in self.model.parameters())}

    def close(self) -> None:
        pass


class DataParallel(Strategy, dp.DataParallel):
    def apply(self, model, ctx, spec, plan, hooks=NO_HOOKS, store=None):
        return ReplicaRuntime(model)


class ExpertParallel(Strategy, dep.ExpertParallel):
    def apply(self, model, ctx, spec, plan, hooks=NO_HOOKS, store=None):
        from .ep import apply_dep

        return apply_dep(model, ctx.group.process_group, ctx.group_rank, ctx.group_size, wire=spec.dep.wire)

    def step_report(self, runtime):
        st = runtime.step_stats
        return {"collective_s": [s.collective_s for s in st], "a2a_sent_bytes": sum(s.sent_bytes for s in st),
                "compute_s": [s.compute_s for s in st], "transfer_s": [s.transfer_s for s in st],
                "peer_wait_s": [s.wait_s for s in st], "host_syncs": sum(s.host_syncs for s in st),
                "expert_pairs": [s.expert_pairs for s in st]}


class DistributedWeights(Strategy, dwdp.DistributedWeights):
    def expert_store(self, cfg, ctx, spec, plan, dtype):
        from ..models.build import resolve_expert_dtype
        from .dwdp import ResidentStore

        # Peers read the resident experts from peer-visible memory: build them there.
        return ResidentStore(cfg, plan.placement, resolve_expert_dtype(cfg, spec.expert_dtype, dtype), ctx)

    def apply(self, model, ctx, spec, plan, hooks=NO_HOOKS, store=None):
        from .dwdp import apply_dwdp

        return apply_dwdp(model, ctx, plan.placement, copy_timeout_s=spec.peer_timeout_s,
                          slice_bytes=spec.dwdp.slice_bytes, copy_streams=spec.dwdp.copy_streams,
                          hooks=hooks, store=store)

    def step_report(self, runtime):
        st = runtime.step_stats
        return {"exposed_wait_s": [s.exposed_wait_s for s in st], "pulled_bytes": sum(s.pulled_bytes for s in st),
                "pull_seconds": sum(sum(s.pull_seconds) for s in st),
                "transfer_s": [sum(p for p in s.pull_seconds if p == p) for s in st],  # on the copy engine
                "peer_wait_s": [s.exposed_wait_s for s in st],
                "break_even_tokens": runtime.break_even_tokens()}

    def short_step_hold(self, runtime, hold_ms):
        """DWDP pulls every layer's remote experts each step: a step below the measured
        break-even size cannot hide them, so it waits up to ``hold_ms`` for more tokens."""
        return ShortStepHold(hold_ms / 1e3, runtime.break_even_tokens) if hold_ms > 0 else None


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (DataParallel(), ExpertParallel(), DistributedWeights())}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None
