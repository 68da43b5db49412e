"""``dwdp``: attention data parallel, each MoE layer's experts split over the group and
the missing ones pulled from peers one layer ahead; no rank waits for another's step."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..memory import FIT_HEADROOM, activation_bytes, auto_local_experts, dwdp_rank_memory
from ..planner.model import EXPERT_BYTES, Prediction
from .base import StrategyDescription
from .placement import Placement
from .spec import DWDP, RankPlan

AUTO_L_MARGIN_BYTES = 4 << 30  # -L auto leaves this much of the free memory unplanned


class DistributedWeights(StrategyDescription):
    name, color = DWDP, "tab:blue"
    summary = "attention data parallel + experts split, pulled from peers one layer ahead"

    def resolve(self, spec, cfg, dtype, device):
        """``local_experts="auto"`` made a number: the largest L that fits this CUDA device
        (:func:`dwdp.memory.auto_local_experts`); elsewhere (CPU, or before a device is known)
        the smallest valid L."""
        if spec.dwdp.local_experts != "auto":
            return spec
        if device is not None and torch.device(device).type == "cuda":
            # What the fit check allows (FIT_HEADROOM of the card), and no more than is free now less a
            # margin for what no estimate counts (NCCL and CUDA context, the all-to-all ceiling's
            # buffers), so a GPU shared with decode ranks is not overfilled.
            free, total = torch.cuda.mem_get_info(torch.device(device))
            budget = min(FIT_HEADROOM * total, free - AUTO_L_MARGIN_BYTES)
            L = auto_local_experts(cfg, spec.group_size, dtype, spec.expert_dtype, spec.max_num_tokens, budget,
                                   dense_dtype=spec.dense_dtype)
        else:  # the default placement's L (raises, saying why, for an impossible E and N)
            L = Placement.create(cfg.num_experts, max(spec.group_size, 1)).local
        return replace(spec, dwdp=replace(spec.dwdp, local_experts=L))

    def plan(self, cfg, spec, dtype, group_size, group_rank):
        placement = spec.dwdp.placement(cfg.num_experts, group_size)
        mine = placement.local_range(group_rank)
        return RankPlan(f"dwdp ({placement.describe()})", (mine.start, len(mine)),
                        dwdp_rank_memory(cfg, placement, dtype=dtype, expert_dtype=spec.expert_dtype,
                                         dense_dtype=spec.dense_dtype).total, placement)

    def memory_per_gpu(self, cfg, n, local, expert_dtype, mnt, dense_dtype="bf16"):
        pl = Placement.create(cfg.num_experts, n, local)
        return dwdp_rank_memory(cfg, pl, 2, EXPERT_BYTES[expert_dtype],
                                dense_bytes_per_param=EXPERT_BYTES[dense_dtype]).total + activation_bytes(cfg, mnt, 2)

    def predict(self, cm, plans, n, local, skew, sliced, seed, tokens):
        cfg = cm.cfg
        pl = Placement.create(cfg.num_experts, n, local)
        steps, waits, pulls = [], [], []
        for plan in plans:
            res = [cm.step_dwdp(s, p, pl, sliced) for s, p in plan]
            steps.append([r[0] for r in res])
            waits.append(sum(r[1] for r in res))
            # Copy-engine seconds, every pull counted beside compute (as the engine times them).
            pulls.append(sum(cm.step_pull_seconds(s, p, pl, sliced)[0] for s, p in plan) * len(cfg.moe_layers))
        busy = [sum(x) for x in steps]
        return Prediction(DWDP, max(busy), busy, steps, tokens, len(plans),
                          {"exposed_wait_s": waits, "pull_s_per_layer": cm.pull_seconds(pl, sliced),
                           "pull_s": pulls})

    def group_step(self, cm, n, local, skew, sliced, seed):
        pl = Placement.create(cm.cfg.num_experts, n, local)
        return lambda per: cm.step_dwdp(*per[0], pl, sliced)[0]

    def time_note(self, pred, n):
        wait = sum(pred.extra["exposed_wait_s"]) / sum(pred.busy_s)
        return f"pull {pred.extra['pull_s_per_layer'] * 1e3:.1f} ms per MoE layer, exposed {100 * wait:.1f}%"

    def components(self, pred, n):
        busy = float(np.mean(pred.busy_s))
        wait = float(np.mean(pred.extra["exposed_wait_s"]))
        return {"compute_s": busy - wait, "transfer_s": float(np.mean(pred.extra["pull_s"])), "wait_s": wait}
