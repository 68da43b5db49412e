"""``dp``: a full replica per rank, no communication (the upper bound where it fits)."""

from __future__ import annotations

from ..memory import activation_bytes, param_breakdown, rank_memory
from ..planner.model import EXPERT_BYTES, Prediction
from .base import StrategyDescription
from .spec import DP, RankPlan


class DataParallel(StrategyDescription):
    name, grouped = DP, False
    summary = "a full replica per rank, no communication (the upper bound where it fits)"

    def plan(self, cfg, spec, dtype, group_size, group_rank):
        return RankPlan("dp (a full replica per GPU)", None, rank_memory(cfg, dtype, spec.expert_dtype, dense_dtype=spec.dense_dtype).total)

    def memory_per_gpu(self, cfg, n, local, expert_dtype, mnt, dense_dtype="bf16"):
        pb = param_breakdown(cfg)
        return pb.non_expert_bytes(2, EXPERT_BYTES[dense_dtype]) + pb.routed_experts * EXPERT_BYTES[expert_dtype] + activation_bytes(cfg, mnt, 2)

    def predict(self, cm, plans, n, local, skew, sliced, seed, tokens):
        steps = [[cm.step_dp(s, p) for s, p in plan] for plan in plans]
        busy = [sum(x) for x in steps]
        return Prediction(DP, max(busy), busy, steps, tokens, len(plans))

    def group_step(self, cm, n, local, skew, sliced, seed):
        return lambda per: cm.step_dp(*per[0])
