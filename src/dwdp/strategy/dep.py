"""``dep``: attention data parallel + expert parallelism, tokens moved to their experts'
ranks in all-to-alls in every MoE layer, so the ranks step in lockstep."""

from __future__ import annotations

import numpy as np
import torch

from ..models.build import resolve_expert_dtype
from ..memory import activation_bytes, param_breakdown, rank_memory
from ..planner.model import EXPERT_BYTES, DEPRouting, Prediction, dep_step
from ..quant import FP8
from .base import StrategyDescription
from .spec import DEP, RankPlan
from .wire import dep_buffer_bytes, ep_ranges, fp8_wire


class ExpertParallel(StrategyDescription):
    name, lockstep, color = DEP, True, "tab:red"
    summary = "attention data parallel + expert parallel all-to-alls in every MoE layer"

    def plan(self, cfg, spec, dtype, group_size, group_rank):
        mine = ep_ranges(cfg.num_experts, group_size)[group_rank]
        fp8_experts = resolve_expert_dtype(cfg, spec.expert_dtype, dtype) == FP8 and spec.device.startswith("cuda")
        wire = fp8_wire(spec.dep.wire, fp8_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        buffers = dep_buffer_bytes(cfg, group_size, spec.max_num_tokens, wire, torch.empty(0, dtype=dtype).element_size())
        return RankPlan(f"dep (EP{group_size})", (mine.start, len(mine)),
                        rank_memory(cfg, dtype, spec.expert_dtype, len(mine), dense_dtype=spec.dense_dtype).total + buffers)

    def memory_per_gpu(self, cfg, n, local, expert_dtype, mnt, dense_dtype="bf16"):
        pb = param_breakdown(cfg)
        eb = EXPERT_BYTES[expert_dtype]
        share = -(-cfg.num_experts // n)
        wire = fp8_wire("auto", expert_dtype != "bf16", cfg.hidden_size, cfg.moe_intermediate_size)
        return (pb.non_expert_bytes(2, EXPERT_BYTES[dense_dtype]) + share * pb.num_moe_layers * pb.expert_numel * eb + activation_bytes(cfg, mnt, 2)
                + dep_buffer_bytes(cfg, n, mnt, wire))

    def predict(self, cm, plans, n, local, skew, sliced, seed, tokens):
        world = len(plans)
        router = DEPRouting(cm.cfg, n, skew, seed)
        steps_by_rank: list[list[float]] = [[] for _ in range(world)]
        a2a_total, sync_total = 0.0, 0.0
        for g in range(world // n):  # each EP group steps in lockstep on its own
            ranks = list(range(g * n, (g + 1) * n))
            num = max(len(plans[r]) for r in ranks)
            for k in range(num):
                per = [plans[r][k] if k < len(plans[r]) else ([1], [0]) for r in ranks]  # idle: dummy step
                t, step_a2a, wait = dep_step(cm, per, n, router)
                a2a_total += step_a2a
                sync_total += wait
                for r in ranks:
                    steps_by_rank[r].append(t)
        busy = [sum(x) for x in steps_by_rank]
        return Prediction(DEP, max(busy), busy, steps_by_rank, tokens, world,
                          {"a2a_s": a2a_total, "sync_share": sync_total / sum(busy) if sum(busy) else 0.0,
                           "expert_load_max_over_mean": router.mean_imbalance})

    def group_step(self, cm, n, local, skew, sliced, seed):
        router = DEPRouting(cm.cfg, n, skew, seed)
        return lambda per: dep_step(cm, per, n, router)[0]

    def time_note(self, pred, n):
        return (f"all-to-all {100 * pred.extra['a2a_s'] * n / sum(pred.busy_s):.1f}%, "
                f"waiting for the slowest rank {100 * pred.extra['sync_share']:.1f}%")

    def components(self, pred, n):
        world = len(pred.busy_s)
        busy = float(np.mean(pred.busy_s))
        transfer = pred.extra["a2a_s"] * n / world
        wait = pred.extra["sync_share"] * sum(pred.busy_s) / world
        # The busiest EP rank's expert pairs over the mean, per lockstep layer.
        return {"compute_s": busy - wait - transfer, "transfer_s": transfer, "wait_s": wait,
                "expert_load_max_over_mean": pred.extra["expert_load_max_over_mean"]}
