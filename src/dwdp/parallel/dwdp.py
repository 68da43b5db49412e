"""Distributed Weight Data Parallelism, applied to a model from outside.

``apply_dwdp(model, ctx, placement)`` takes a model whose MoE layers hold only this
rank's resident experts (built with ``expert_shard=placement.local_range(rank)``),
moves those experts into peer-visible memory, allocates two prefetch slots, and swaps
each MoE block's ``experts`` for a :class:`DWDPExperts` that

1. issues the pull of the *next* MoE layer's remote experts (overlapping this MoE and
   the next attention), then
2. computes its resident experts first, then each peer's experts in the order they were
   pulled, waiting for a peer's block only just before using it (local-first, per-peer
   signals), reading every expert where it lies (no merge copy),
3. releases its slot for the refill two layers later.

A forward pre-hook primes the first MoE layer at every step start. No collective is
issued during steps. The runtime times each MoE layer's compute window and its pulls
(:class:`~dwdp.parallel.pull_rates.PullRates`): they give the break-even step size below
which a step waits on its pulls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.moe import ExpertSegment, MoEBlock, RoutedExperts, routed_experts_forward
from ..models.transformer import MoECausalLM
from .copy_engine import CpuCopyEngine, CudaCopyEngine, slice_copies
from .group import DWDPContext
from .hooks import NO_HOOKS, RuntimeHooks
from ..strategy.placement import Placement
from .prefetch import SlotPrefetcher
from .pull_rates import PullRates
from .transport import PeerMemory


class ExpertRows:
    """How one expert is laid out in a row of peer-visible storage: [w13 | w2] in the
    weights' dtype, or for FP8 experts the bytes [w13 | w2 | w13 scales | w2 scales], so a
    pull moves one byte per weight plus the block scales (half of bf16)."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype):
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.fp8 = dtype == torch.float8_e4m3fn
        n13, n2 = 2 * inter * hidden, hidden * inter
        if self.fp8:
            from ..quant import BLOCK

            self.s13 = (-(-2 * inter // BLOCK), -(-hidden // BLOCK))
            self.s2 = (-(-hidden // BLOCK), -(-inter // BLOCK))
            self.bounds = [0, n13, n13 + n2, n13 + n2 + 4 * self.s13[0] * self.s13[1]]
            self.bounds.append(self.bounds[-1] + 4 * self.s2[0] * self.s2[1])
            if (n13 + n2) % 4:
                raise ValueError(f"FP8 experts need hidden x inter divisible by 4 (got {hidden} x {inter})")
            self.storage_dtype = torch.uint8
        else:
            self.bounds = [0, n13, n13 + n2]
            self.storage_dtype = dtype

    @property
    def width(self) -> int:
        return self.bounds[-1]

    def views(self, block: torch.Tensor) -> tuple:
        """[count, width] storage -> (w13, w2, w13_scale, w2_scale) views (scales None unless FP8)."""
        n, H, I, b = block.shape[0], self.hidden, self.inter, self.bounds
        if not self.fp8:
            return (block[:, b[0]:b[1]].view(n, 2 * I, H), block[:, b[1]:b[2]].view(n, H, I), None, None)
        f8 = torch.float8_e4m3fn
        return (block[:, b[0]:b[1]].view(f8).view(n, 2 * I, H), block[:, b[1]:b[2]].view(f8).view(n, H, I),
                block[:, b[2]:b[3]].view(torch.float32).view(n, *self.s13),
                block[:, b[3]:b[4]].view(torch.float32).view(n, *self.s2))


@dataclass
class DWDPStepStats:
    exposed_wait_s: float
    pulled_bytes: int
    pull_seconds: list[float] = field(default_factory=list)  # per pull part, in issue order

    @property
    def pull_gbps(self) -> float:
        secs = sum(s for s in self.pull_seconds if not math.isnan(s))
        return self.pulled_bytes / secs / 1e9 if secs > 0 else float("nan")


class DWDPExperts(nn.Module):
    """Routed experts of one MoE layer under DWDP (same interface as RoutedExperts)."""

    def __init__(self, runtime: "DWDPRuntime", moe_index: int, resident: torch.Tensor):
        super().__init__()
        self.runtime, self.moe_index = runtime, moe_index
        pl, rank = runtime.placement, runtime.ctx.group_rank
        self.local = ExpertSegment(pl.local_range(rank).start, *runtime.rows.views(resident))

    def forward(self, x, topk_ids, topk_weights):
        """The DWDP MoE layer, top to bottom: issue the next layer's pull; compute the resident
        experts, then each peer's part of this layer's slot as it lands (waiting just before
        its first use); wait for any part no token used, so the slot is whole; release the
        slot for the refill two layers later."""
        rt = self.runtime
        m = self.moe_index
        rt.moe_start(x.shape[0])
        if m + 1 < rt.prefetcher.num_layers:
            rt.prefetcher.prefetch(m + 1)  # overlaps this MoE and the next attention
        segments = [self.local]
        remote = rt.remote_segments_for_slot[m % 2] if rt.remote_segments_for_slot else []
        part_of = {id(seg): part for seg, part in remote}
        segments += [seg for seg, _ in remote]
        waited: set[int] = set()

        def on_segment_start(seg: ExpertSegment) -> None:
            part = part_of.get(id(seg))
            if part is None or part in waited:
                return
            rt.hooks.before_acquire(m, part)
            rt.prefetcher.acquire(m, part)
            waited.add(part)
            rt.hooks.after_acquire(m, part, x)

        y = routed_experts_forward(x, topk_ids, topk_weights, segments, rt.placement.num_experts,
                                   on_segment_start)
        if remote:
            for part in sorted(set(part_of.values()) - waited):
                rt.prefetcher.acquire(m, part)
            rt.prefetcher.release(m)
        return y


class DWDPRuntime:
    def __init__(self, model: MoECausalLM, ctx: DWDPContext, placement: Placement, peer_memory: PeerMemory,
                 slots: list[torch.Tensor], engine, layer_parts, rows: ExpertRows | None = None,
                 remote_parts: list[list[range]] | None = None, hooks: RuntimeHooks = NO_HOOKS,
                 rates: PullRates | None = None):
        cfg = model.config
        self.rows = rows or ExpertRows(cfg.hidden_size, cfg.moe_intermediate_size, peer_memory.local.dtype)
        self.model, self.ctx, self.placement = model, ctx, placement
        self.hidden, self.inter = cfg.hidden_size, cfg.moe_intermediate_size
        self.peer_memory, self.engine = peer_memory, engine
        self.hooks = hooks
        self.prefetcher = SlotPrefetcher(engine, slots, layer_parts, hooks)
        rank, L = ctx.group_rank, placement.local
        lo = placement.local_range(rank).start  # remote experts below ours: [0, lo)
        # Remote experts in the order they are pulled, grouped by the copy part (one per peer
        # for whole-block plans, one for sliced plans) whose signal says they have landed.
        if remote_parts is None:
            remote_parts = [[r for r in (range(0, lo), range(lo + L, placement.num_experts)) if len(r)]]
        self.remote_segments_for_slot: list[list[tuple[ExpertSegment, int]]] = []
        for slot in (slots if placement.remote else []):
            views = self.rows.views(slot)
            segs = []
            for part, ranges in enumerate(remote_parts):
                for r in ranges:
                    s0 = r.start if r.start < lo else r.start - L  # slot row of global expert r.start
                    segs.append((ExpertSegment(r.start, *[v[s0:s0 + len(r)] if v is not None else None
                                                          for v in views]), part))
            self.remote_segments_for_slot.append(segs)
        self.rates = rates or PullRates()
        # Bytes one MoE layer pulls (every layer pulls the same).
        self.layer_bytes = sum(d.numel() * d.element_size() for part in (layer_parts[0] if layer_parts else [])
                               for d, _ in part)
        self._marks: list = []  # compute-queue timestamp at each MoE start of this step
        self._tokens = 0
        self.step_stats: list[DWDPStepStats] = []
        self._hooks = [model.register_forward_pre_hook(self._begin_step),
                       model.register_forward_hook(self._end_step)]

    def moe_start(self, tokens: int) -> None:
        self._marks.append(self.engine.mark())
        self._tokens = tokens

    def break_even_tokens(self) -> int | None:
        """The smallest step whose layer compute hides a pull (None: not yet measured)."""
        return self.rates.break_even_tokens(self.layer_bytes) if self.layer_bytes else None

    def _begin_step(self, module, args):
        self.hooks.step_begin()
        self._marks = []
        if self.prefetcher.num_layers and self.remote_segments_for_slot:
            self.prefetcher.new_step()
            self.prefetcher.prefetch(0)

    def _end_step(self, module, args, output):
        self.hooks.step_end()
        st = self.prefetcher.take_stats()
        waits = [w for _, w in st.waits]
        if isinstance(self.engine, CudaCopyEngine):
            # Reading the timers syncs with this step's copies; a step ends in a sync anyway.
            for p in st.pulls:
                p.signal.done.synchronize()
            device = self.engine.drain_waits()
            if len(device) == len(waits):
                waits = [h + d for h, d in zip(waits, device)]
            else:  # a hook waited outside the prefetcher: totals stay right, per layer unknown
                waits = [sum(waits) + sum(device)]
            secs = [self.engine.copy_seconds(p.signal) for p in st.pulls]
        else:
            secs = []
            for p in st.pulls:
                self.engine.compute_wait(p.signal)
                secs.append(self.engine.copy_seconds(p.signal))
        if len(waits) == len(st.waits) and len(self._marks) > 1:
            # The marks are compute-stream events: without pulls to wait for, nothing above
            # synced with the stream, and no MoE layer syncs with the host (FP8 kernels).
            if isinstance(self.engine, CudaCopyEngine):
                self._marks[-1].synchronize()
            per_layer = [0.0] * len(self._marks)
            for (layer, _), w in zip(st.waits, waits):
                if layer < len(per_layer):
                    per_layer[layer] += w
            windows = [self.engine.seconds_between(a, b) - per_layer[m]
                       for m, (a, b) in enumerate(zip(self._marks, self._marks[1:]))]
            self.rates.observe(self._tokens, windows, [(p.nbytes, s) for p, s in zip(st.pulls, secs)])
        self.step_stats.append(DWDPStepStats(sum(waits), sum(p.nbytes for p in st.pulls), secs))

    @property
    def outside_allocator_bytes(self) -> int:
        """Device memory torch's caching allocator does not count: the resident experts live
        in peer-visible (symmetric / IPC) memory, so max_memory_allocated() misses them."""
        local = self.peer_memory.local
        if not local.is_cuda:
            return 0
        return local.numel() * local.element_size()

    def memory_bytes(self) -> dict[str, int]:
        local = self.peer_memory.local
        slot_bytes = sum(s.numel() * s.element_size() for s in self.prefetcher.slots)
        expert_params = {id(p) for b in self.model.moe_blocks() for p in b.experts.parameters()}
        non_expert = sum(p.numel() * p.element_size() for p in self.model.parameters() if id(p) not in expert_params)
        return {"non_expert": non_expert, "resident_experts": local.numel() * local.element_size(), "slots": slot_bytes}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.engine.close()


class ResidentStore:
    """This rank's resident experts in peer-visible memory, allocated before the model so
    ``build_model(..., expert_storage=store.views)`` places them there directly (no second
    copy of the resident experts while moving them: the model's peak is its final size)."""

    def __init__(self, cfg, placement: Placement, expert_dtype: torch.dtype, ctx: DWDPContext):
        self.rows = ExpertRows(cfg.hidden_size, cfg.moe_intermediate_size, expert_dtype)
        self.moe_layers = list(cfg.moe_layers)
        self.pending = PeerMemory.allocate((len(self.moe_layers), placement.local, self.rows.width),
                                           self.rows.storage_dtype, ctx.device, ctx.group)

    def views(self, layer_idx: int):
        """build_model's expert_storage: (w13, w2, w13_scale, w2_scale) of a model layer."""
        return self.rows.views(self.pending.local[self.moe_layers.index(layer_idx)])


@torch.no_grad()
def apply_dwdp(model: MoECausalLM, ctx: DWDPContext, placement: Placement, *, copy_timeout_s: float = 60.0,
               slice_bytes: int | None = None, copy_streams: int = 1,
               hooks: RuntimeHooks = NO_HOOKS, store: ResidentStore | None = None) -> DWDPRuntime:
    """Turn ``model`` (holding this rank's resident experts) into a DWDP rank of ``ctx``'s group.

    ``slice_bytes``/``copy_streams`` choose the pull plan: whole per-peer blocks on one
    stream (the default: fastest measured on H100/H200, see docs/RESULTS.md) or slices
    issued round-robin over peers, on one or several copy streams (CUDA). ``hooks``: fault
    injection and tracing for tests and diagnostics (:mod:`dwdp.parallel.hooks`). ``store``:
    the model was built into it (its experts already lie in peer-visible memory)."""
    cfg = model.config
    rank = ctx.group_rank
    blocks: list[MoEBlock] = model.moe_blocks()
    want = placement.local_range(rank)
    for b in blocks:
        ex = b.experts
        if not isinstance(ex, RoutedExperts) or ex.expert_range != want:
            raise ValueError(f"apply_dwdp needs each MoE layer to hold exactly experts {want.start}..{want.stop - 1} "
                             f"(build_model(expert_shard=...)); found {getattr(ex, 'expert_range', type(ex))}")
    dtype = blocks[0].experts.w13.dtype if blocks else torch.float32
    device = ctx.device
    if store is not None:  # built in place: the experts already lie in peer-visible memory
        rows, pending = store.rows, store.pending
        for m, b in enumerate(blocks):
            if b.experts.w13.data_ptr() != rows.views(pending.local[m])[0].data_ptr():
                raise ValueError("apply_dwdp(store=...) needs the model built with expert_storage=store.views")
            b.experts = None
    else:
        rows = ExpertRows(cfg.hidden_size, cfg.moe_intermediate_size, dtype)
        pending = PeerMemory.allocate((len(blocks), placement.local, rows.width), rows.storage_dtype, device,
                                      ctx.group)
        # Move resident experts into the peer-visible storage, one layer at a time.
        for m, b in enumerate(blocks):
            w13, w2, s13, s2 = rows.views(pending.local[m])
            w13.copy_(b.experts.w13)
            w2.copy_(b.experts.w2)
            if rows.fp8:
                s13.copy_(b.experts.w13_scale)
                s2.copy_(b.experts.w2_scale)
            b.experts = None
    row = rows.width
    peer_memory = pending.connect()
    R = placement.remote
    slots = [torch.empty((R, row), dtype=rows.storage_dtype, device=device) for _ in range(2)] if R else []
    if device.type == "cuda":
        engine = CudaCopyEngine(device, delay_cycles=hooks.copy_delay_cycles, num_streams=copy_streams)
    else:
        engine = CpuCopyEngine(timeout_s=copy_timeout_s, copy_delay=hooks.copy_delay_s)
    plans = [_layer_copy_plan(m, placement, rank, peer_memory, slots, slice_bytes) for m in range(len(blocks))] \
        if R else []
    rt = DWDPRuntime(model, ctx, placement, peer_memory, slots or [torch.empty(0)] * 2, engine,
                     [p[0] for p in plans], rows, plans[0][1] if plans else None, hooks)
    for m, b in enumerate(blocks):
        b.experts = DWDPExperts(rt, m, peer_memory.local[m])
    return rt


def _layer_copy_plan(m: int, placement: Placement, rank: int, peer_memory: PeerMemory, slots, slice_bytes):
    """Copies that bring MoE layer m's remote experts into slot m % 2, as
    (parts: list of copy lists issued in order, experts: the global expert ranges of each part).

    Whole blocks: one part per peer, starting at a different peer on each rank (spreads the
    load over the source GPUs), so the MoE can use a peer's experts as soon as they land.
    With ``slice_bytes`` each peer's block is cut into slices issued round-robin across
    peers: one part (slices of every peer land together).
    """
    slot = slots[m % 2]
    lo = placement.local_range(rank).start
    per_peer = []
    for pp in placement.pulls(rank):
        dst0 = pp.start if pp.start < lo else pp.start - placement.local
        src = peer_memory.peer(pp.peer)[m, pp.peer_offset:pp.peer_offset + pp.count]
        per_peer.append(((slot[dst0:dst0 + pp.count], src), range(pp.start, pp.start + pp.count)))
    n = len(per_peer)
    start = rank % n if n else 0
    order = per_peer[start:] + per_peer[:start]
    if not slice_bytes:
        return [[c] for c, _ in order], [[r] for _, r in order]
    return [slice_copies([c for c, _ in order], slice_bytes)], [[r for _, r in order]]
