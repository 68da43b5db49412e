"""Attention data parallelism + expert parallelism (DEP), applied to a model from outside.

The baseline DWDP must beat, run the way vLLM, SGLang and TensorRT-LLM run it: every
rank keeps its own requests and a full copy of the non-expert weights, and a contiguous
E/N share of each MoE layer's routed experts. In each MoE layer

1. dispatch: every token is sent once to each rank that holds at least one of its top-k
   experts (not once per expert), together with those experts' ids and routing weights,
   in one ``all_to_all_single`` (after a tiny one for the counts);
2. each rank runs its experts over the (token, expert) pairs it received — one grouped
   GEMM over pairs sorted by expert — and sums each token's weighted outputs;
3. combine: the partial sums go back in one ``all_to_all_single`` and each token adds
   the partial sums of the ranks it visited.

So every MoE layer is a point where all ranks of the group wait for the slowest: the
synchronization DWDP removes. Ranks with nothing to do must still run (dummy) steps so
the collectives line up; :func:`dwdp.engine.run_lockstep` does that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..models.moe import ExpertSegment, MoEBlock, RoutedExperts, expert_pairs_forward
from ..models.transformer import MoECausalLM


def ep_ranges(num_experts: int, size: int) -> list[range]:
    """Contiguous, balanced expert shares (sizes differ by at most one)."""
    if size < 1 or size > num_experts:
        raise ValueError(f"expert parallelism over {size} ranks needs 1 <= ranks <= experts ({num_experts})")
    return [range(r * num_experts // size, (r + 1) * num_experts // size) for r in range(size)]


@dataclass
class DEPStepStats:
    collective_s: float  # time inside all-to-alls, including waiting for the slowest peer
    sent_bytes: int  # payload this rank sent to other ranks (dispatch + combine)
    received_bytes: int
    layer_collective_s: list[float] = field(default_factory=list)


def _as_columns(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret [rows, k] int32/fp32 metadata as columns of ``dtype`` (bit-exact)."""
    return t.contiguous().view(dtype)


class DEPExperts(nn.Module):
    """Routed experts of one MoE layer under DEP (same interface as RoutedExperts)."""

    def __init__(self, runtime: "DEPRuntime", experts: RoutedExperts):
        super().__init__()
        self.runtime = runtime
        self.start, self.count = experts.start, experts.w13.shape[0]
        self.w13, self.w2 = experts.w13, experts.w2  # parameters stay where they were loaded
        self.w13_scale = getattr(experts, "w13_scale", None)  # FP8 experts
        self.w2_scale = getattr(experts, "w2_scale", None)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        N, pg = rt.size, rt.process_group
        T, H = x.shape
        owner = rt.owner[topk_ids]  # [T, K] rank holding each chosen expert
        hit = torch.zeros(T, N, dtype=torch.bool, device=x.device)
        hit.scatter_(1, owner, True)
        dest = hit.t().nonzero()  # (rank, token), grouped by destination rank
        send_rank, send_tok = dest[:, 0], dest[:, 1]
        send_counts = hit.sum(0)
        # Metadata travels in the same buffer as the hidden states, bit-cast to their dtype.
        mine = owner[send_tok] == send_rank[:, None]
        meta_ids = torch.where(mine, topk_ids[send_tok], -1).to(torch.int32)
        meta_w = topk_weights[send_tok].float()
        payload = torch.cat([x[send_tok], _as_columns(meta_ids, x.dtype), _as_columns(meta_w, x.dtype)], dim=1)
        recv_counts = torch.empty_like(send_counts)
        t0 = rt.begin_collective()
        dist.all_to_all_single(recv_counts, send_counts, group=pg)
        in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()  # host sync: buffer sizes
        recv = payload.new_empty((sum(out_splits), payload.shape[1]))
        dist.all_to_all_single(recv, payload, out_splits, in_splits, group=pg)
        rt.end_collective(t0)

        width = payload.shape[1] - H
        rx = recv[:, :H]
        meta = recv[:, H:].contiguous()
        rids = meta[:, :width // 2].contiguous().view(torch.int32).long()
        rw = meta[:, width // 2:].contiguous().view(torch.float32)
        row, slot = (rids >= 0).nonzero(as_tuple=True)  # only the (token, expert) pairs held here
        partial = expert_pairs_forward(rx, row, rids[row, slot] - self.start, rw[row, slot],
                                       ExpertSegment(0, self.w13, self.w2, self.w13_scale, self.w2_scale))

        back = partial.new_empty((send_tok.numel(), H))
        t0 = rt.begin_collective()
        dist.all_to_all_single(back, partial, in_splits, out_splits, group=pg)
        rt.end_collective(t0)
        esz = x.element_size()
        self_rows = in_splits[rt.rank]
        rt.sent_bytes += (sum(in_splits) - self_rows) * payload.shape[1] * esz + (sum(out_splits) - out_splits[rt.rank]) * H * esz
        rt.received_bytes += (sum(out_splits) - out_splits[rt.rank]) * payload.shape[1] * esz + (sum(in_splits) - self_rows) * H * esz
        return torch.zeros_like(x).index_add_(0, send_tok, back)


class DEPRuntime:
    """Per-rank state of DEP and its per-step statistics."""

    def __init__(self, model: MoECausalLM, process_group, rank: int, size: int, device: torch.device):
        cfg = model.config
        self.model, self.process_group, self.rank, self.size = model, process_group, rank, size
        self.ranges = ep_ranges(cfg.num_experts, size)
        owner = torch.empty(cfg.num_experts, dtype=torch.long)
        for r, rg in enumerate(self.ranges):
            owner[rg.start:rg.stop] = r
        self.owner = owner.to(device)
        self.cuda = device.type == "cuda"
        self.sent_bytes = self.received_bytes = 0
        self._events: list[tuple] = []
        self._wall: list[float] = []
        self.step_stats: list[DEPStepStats] = []
        self._hooks = [model.register_forward_pre_hook(self._begin_step),
                       model.register_forward_hook(self._end_step)]

    def begin_collective(self):
        if self.cuda:  # events on the compute stream bracket NCCL's kernels (which spin for peers)
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def end_collective(self, t0) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events.append((t0, ev))
        else:
            self._wall.append(time.perf_counter() - t0)

    def _begin_step(self, module, args):
        self.sent_bytes = self.received_bytes = 0
        self._events, self._wall = [], []

    def _end_step(self, module, args, output):
        if self.cuda:
            torch.cuda.current_stream().synchronize()
            per = [a.elapsed_time(b) / 1e3 for a, b in self._events]
        else:
            per = self._wall
        # Two collectives in dispatch and one in combine are bracketed per layer: fold per layer.
        layers = [sum(per[i:i + 2]) for i in range(0, len(per), 2)]
        self.step_stats.append(DEPStepStats(sum(per), self.sent_bytes, self.received_bytes, layers))

    def memory_bytes(self) -> dict[str, int]:
        expert_params = {id(p) for b in self.model.moe_blocks() for p in b.experts.parameters()}
        non_expert = sum(p.numel() * p.element_size() for p in self.model.parameters() if id(p) not in expert_params)
        resident = sum(p.numel() * p.element_size() for b in self.model.moe_blocks() for p in b.experts.parameters())
        return {"non_expert": non_expert, "resident_experts": resident}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def apply_dep(model: MoECausalLM, process_group, rank: int, size: int) -> DEPRuntime:
    """Turn ``model`` (holding expert share ``ep_ranges(E, size)[rank]``) into a DEP rank."""
    cfg = model.config
    want = ep_ranges(cfg.num_experts, size)[rank]
    device = next(model.parameters()).device
    rt = DEPRuntime(model, process_group, rank, size, device)
    blocks: list[MoEBlock] = model.moe_blocks()
    for b in blocks:
        ex = b.experts
        if not isinstance(ex, RoutedExperts) or ex.expert_range != want:
            raise ValueError(f"apply_dep needs each MoE layer to hold exactly experts {want.start}..{want.stop - 1} "
                             f"(build_model(expert_shard=...)); found {getattr(ex, 'expert_range', type(ex))}")
        b.experts = DEPExperts(rt, ex)
    return rt
