"""Attention data parallelism + expert parallelism (DEP), applied to a model from outside.

The baseline DWDP must beat, run the way SGLang/vLLM (with DeepEP) and TensorRT-LLM run
it: every rank keeps its own requests and a full copy of the non-expert weights, and a
contiguous E/N share of each MoE layer's routed experts. In each MoE layer

1. layout (on the GPU, no host sync): each token goes once to each rank holding at least
   one of its top-k experts (not once per expert); ``slot[t, r]`` is its row in the send
   buffer (grouped by destination rank) or -1;
2. pack: one kernel writes each token's row into all its send slots, together with its
   top-k expert ids and routing weights. With FP8 experts the rows travel as FP8 with
   per-token 1x128 scales (quantised once, as ``routed_experts_forward`` does), so the
   dispatch moves about half the bytes and the receiver feeds them straight to the FP8
   grouped GEMM;
3. dispatch: a tiny all-to-all of the counts (rows per destination and pairs per
   expert), the layer's one host sync, then one ``all_to_all_single`` of the packed rows;
4. receive: the received (token, expert) pairs this rank holds are sorted by expert on
   the GPU, run through the same grouped SwiGLU GEMMs as dp/DWDP
   (:func:`~dwdp.models.moe.sorted_experts_forward`), and each received token's pairs are
   reduced in one pass with their routing weights into one partial row (no atomics);
5. combine: the partial rows go back (reversed splits) and each token sums the at most
   min(top_k, N) partial rows of the ranks it visited with a gather-based one-pass
   reduction (``slot`` again), not ``index_add_``.

Timing (``DEPStepStats``): a collective's duration includes waiting for the slowest peer.
To separate waiting from transfer, the dispatch and the combine are each preceded by a
synchronising collective that moves next to nothing: the counts exchange, and a
one-element ``all_reduce`` (the "fence"). Its duration is recorded as ``wait_s`` (it
returns only once every peer has reached it); the transfer after it starts with all peers
ready, so its duration is ``transfer_s``. On CUDA the spans are CUDA events on the compute
stream; on CPU wall clock. ``collective_s = wait_s + transfer_s``, and
``compute_s = step_s - collective_s``: the step's time outside collectives and waits, to
set against dp's step time.

Every MoE layer is a point where all ranks of the group wait for the slowest: the
synchronization DWDP removes. Ranks with nothing to do must still run (dummy) steps so
the collectives line up; :class:`dwdp.engine.StepDriver` does that. A rank with zero
tokens in a layer still runs every collective.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..models.moe import FP8_TRITON, ExpertSegment, MoEBlock, RoutedExperts, expert_kernel, sorted_experts_forward
from ..models.transformer import MoECausalLM
from .ep_dispatch import gather_reduce, gather_rows, quantize_rows, scatter_rows
from ..strategy.wire import WIRES, ep_ranges, fp8_wire
from ..strategy.wire import WireLayout as Wire


@dataclass
class DEPStepStats:
    collective_s: float  # wait_s + transfer_s (see module doc)
    sent_bytes: int  # payload this rank sent to other ranks (dispatch + combine)
    received_bytes: int
    layer_collective_s: list[float] = field(default_factory=list)
    step_s: float = 0.0  # the whole forward (GPU time on CUDA)
    compute_s: float = 0.0  # step_s - collective_s: busy outside collectives and waits
    transfer_s: float = 0.0  # dispatch + combine after the fence: moving bytes
    wait_s: float = 0.0  # fences / counts exchange: waiting for the slowest peer
    host_syncs: int = 0  # host synchronisations DEP issued in the step
    # (token, expert) pairs this rank computed, per MoE layer: set beside the other ranks'
    # lists (lockstep: the same layers in the same order) they give the expert-load imbalance
    # the layer waited for.
    expert_pairs: list[int] = field(default_factory=list)

    @property
    def send_gbps(self) -> float:
        """Bytes sent to other ranks per second of transfer (as ceilings.all_to_all_gbps)."""
        return self.sent_bytes / self.transfer_s / 1e9 if self.transfer_s > 0 else 0.0


class _Exchange:
    """One MoE layer's dispatch/compute/combine state on this rank."""

    send_counts: torch.Tensor  # [N] rows for each destination
    slot: torch.Tensor  # [T, N] send row of (token, destination) or -1
    counts_msg: torch.Tensor  # per destination: rows, then pairs per expert it holds
    send: torch.Tensor  # packed rows, grouped by destination
    send_splits: list[int]
    recv_splits: list[int]
    counts: torch.Tensor  # received pairs per local expert (device)
    counts_host: list[int]
    recv: torch.Tensor
    partial: torch.Tensor  # one reduced row per received token
    back: torch.Tensor  # the partial rows returned to this rank


# ------------------------------------------------------------------------- the layer
class DEPExperts(nn.Module):
    """Routed experts of one MoE layer under DEP (same interface as RoutedExperts)."""

    def __init__(self, runtime: "DEPRuntime", experts: RoutedExperts):
        super().__init__()
        self.runtime = runtime
        self.start, self.count = experts.start, experts.w13.shape[0]
        self.w13, self.w2 = experts.w13, experts.w2  # parameters stay where they were loaded
        self.w13_scale = getattr(experts, "w13_scale", None)  # FP8 experts
        self.w2_scale = getattr(experts, "w2_scale", None)

    def _segment(self) -> ExpertSegment:
        return ExpertSegment(self.start, self.w13, self.w2, self.w13_scale, self.w2_scale)

    def _wire(self, x: torch.Tensor) -> Wire:
        rt = self.runtime
        fp8 = fp8_wire(rt.wire, expert_kernel(x, self._segment()) == FP8_TRITON,
                       x.shape[1], self.w13.shape[-1], self.w2.shape[-1])
        key = (x.shape[1], rt.top_k, x.dtype, fp8)
        if key not in rt.wires:
            rt.wires[key] = Wire(*key)
        return rt.wires[key]

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.runtime.layer += 1
        wire = self._wire(x)
        ex = _Exchange()
        self._prepare(ex, wire, x, topk_ids, topk_weights)
        self._exchange_counts(ex)  # also the dispatch's fence
        self._dispatch(ex, wire)
        self._experts(ex, wire, x)
        self._combine(ex, x)
        out = torch.empty_like(x)
        gather_reduce(ex.back, ex.slot, None, out)  # each token sums the partial rows of the ranks it visited
        return out

    # -- sender: layout and pack (no host sync)
    def _prepare(self, ex: _Exchange, wire: Wire, x, ids, weights) -> None:
        rt = self.runtime
        T, N = x.shape[0], rt.size
        owner = rt.owner[ids]
        hit = torch.zeros(T, N, dtype=torch.bool, device=x.device).scatter_(1, owner, True)
        # Scan along tokens as rows of a [N, T] tensor: torch's scan over the outer dim of a
        # [T, N] tensor (few columns) is a slow kernel, ~1.5 ms per layer at 16K tokens on H200.
        ht = hit.t().to(torch.int32).contiguous()
        ex.send_counts = ht.sum(1, dtype=torch.long)
        first = ex.send_counts.cumsum(0) - ex.send_counts
        before = (ht.cumsum(1, dtype=torch.long) - ht).t()  # [T, N]: earlier tokens bound for the same rank
        ex.slot = torch.where(hit, first + before, -1).contiguous()
        ecount = torch.zeros(rt.num_experts + 1, dtype=torch.long, device=x.device)
        ecount.scatter_add_(0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.long, device=x.device))
        ex.counts_msg = torch.cat([ex.send_counts[:, None], ecount[rt.count_index]], 1)
        fields = {"ids": ids.to(torch.int32), "w": weights.float()}
        if wire.fp8:
            fields["x"], fields["xs"] = quantize_rows(x)
        else:
            fields["x"] = x
        ex.send = torch.empty((T * min(N, rt.top_k), wire.width), dtype=torch.uint8, device=x.device)
        views = wire.views(ex.send)
        for name, src in fields.items():
            scatter_rows(src, ex.slot, views[name])

    def _exchange_counts(self, ex: _Exchange) -> None:
        """The counts in one tiny all-to-all, then the layer's one host sync."""
        rt = self.runtime
        got = torch.empty_like(ex.counts_msg)
        with rt.timed("wait"):
            dist.all_to_all_single(got, ex.counts_msg, group=rt.process_group)
        host = torch.cat([ex.send_counts, got.reshape(-1)]).tolist()
        rt.host_syncs += 1
        N, C = rt.size, got.shape[1]
        ex.send_splits = host[:N]
        rows = [host[N + r * C:N + (r + 1) * C] for r in range(N)]
        ex.recv_splits = [row[0] for row in rows]
        ex.counts_host = [sum(row[1 + g] for row in rows) for g in range(self.count)]
        ex.counts = got[:, 1:1 + self.count].sum(0)

    def _dispatch(self, ex: _Exchange, wire: Wire) -> None:
        rt = self.runtime
        S, R = sum(ex.send_splits), sum(ex.recv_splits)
        ex.recv = torch.empty((R, wire.width), dtype=torch.uint8, device=ex.send.device)
        with rt.timed("transfer"):
            dist.all_to_all_single(ex.recv, ex.send[:S], ex.recv_splits, ex.send_splits, group=rt.process_group)
        rt.count_bytes(ex.send_splits, ex.recv_splits, wire.width)

    # -- receiver: sort pairs by expert, grouped GEMM, one-pass weighted reduction per row
    def _experts(self, ex: _Exchange, wire: Wire, x: torch.Tensor) -> None:
        rt = self.runtime
        K, E = rt.top_k, self.count
        R = sum(ex.recv_splits)
        views = wire.views(ex.recv)
        local = views["ids"].long() - self.start
        ok = (local >= 0) & (local < E)
        P = sum(ex.counts_host)
        rt.add_pairs(P)
        order = torch.argsort(torch.where(ok, local, E).reshape(-1), stable=True)[:P]  # pairs held here, by expert
        pos = torch.full((R * K,), -1, dtype=torch.long, device=x.device)
        pos[order] = torch.arange(P, device=x.device)
        src = order // K
        xs = gather_rows(views["x"], src)
        xs_scale = gather_rows(views["xs"], src) if wire.fp8 else None
        ys = sorted_experts_forward(xs, ex.counts, self._segment(), ex.counts_host, xs_scale, out_dtype=x.dtype)
        ex.partial = torch.empty((R, x.shape[1]), dtype=x.dtype, device=x.device)
        gather_reduce(ys, pos.view(R, K), views["w"], ex.partial)

    def _combine(self, ex: _Exchange, x: torch.Tensor) -> None:
        rt = self.runtime
        rt.fence()  # peers finish their experts here, not inside the transfer
        ex.back = torch.empty((sum(ex.send_splits), x.shape[1]), dtype=x.dtype, device=x.device)
        with rt.timed("transfer"):
            dist.all_to_all_single(ex.back, ex.partial, ex.send_splits, ex.recv_splits, group=rt.process_group)
        rt.count_bytes(ex.recv_splits, ex.send_splits, x.shape[1] * x.element_size())


# --------------------------------------------------------------------------- runtime
class DEPRuntime:
    """Per-rank state of DEP and its per-step statistics."""

    def __init__(self, model: MoECausalLM, process_group, rank: int, size: int, device: torch.device,
                 wire: str = "auto"):
        cfg = model.config
        if wire not in WIRES:
            raise ValueError(f"DEP wire {wire!r}: choose from {', '.join(WIRES)}")
        self.model, self.process_group, self.rank, self.size = model, process_group, rank, size
        self.wire = wire
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.ranges = ep_ranges(cfg.num_experts, size)
        owner = torch.empty(cfg.num_experts, dtype=torch.long)
        for r, rg in enumerate(self.ranges):
            owner[rg.start:rg.stop] = r
        self.owner = owner.to(device)
        width = max(len(rg) for rg in self.ranges)  # global expert ids per rank, padded with E (count 0)
        self.count_index = torch.tensor([list(rg) + [cfg.num_experts] * (width - len(rg)) for rg in self.ranges],
                                        dtype=torch.long, device=device)
        self.cuda = device.type == "cuda"
        self.device = device
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.wires: dict = {}
        self.sent_bytes = self.received_bytes = self.host_syncs = 0
        self.layer = -1
        self._pairs: list[int] = []  # (token, expert) pairs computed per MoE layer of the step
        self._spans: list[tuple] = []  # (kind, layer, start, end)
        self._step0 = None
        self.step_stats: list[DEPStepStats] = []
        # A step spans embedding to lm_head, so a prefill forward and a decode step
        # (MoECausalLM.decode) are both accounted; a bare experts module: its forward.
        first = getattr(getattr(model, "model", None), "embed_tokens", None)
        last = getattr(model, "lm_head", None)
        first, last = (first, last) if first is not None and last is not None else (model, model)
        self._hooks = [first.register_forward_pre_hook(self._begin_step),
                       last.register_forward_hook(self._end_step)]

    @contextlib.contextmanager
    def timed(self, kind: str):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
        else:
            a = time.perf_counter()
            yield
            b = time.perf_counter()
        self._spans.append((kind, self.layer, a, b))

    def fence(self) -> None:
        """A one-element all_reduce: returns once every peer got here (absorbs their lateness)."""
        with self.timed("wait"):
            dist.all_reduce(self._flag, group=self.process_group)

    def add_pairs(self, pairs: int) -> None:
        """Pairs computed in the current MoE layer."""
        while len(self._pairs) <= self.layer:
            self._pairs.append(0)
        self._pairs[self.layer] += pairs

    def count_bytes(self, sent_splits: list[int], recv_splits: list[int], row_bytes: int) -> None:
        self.sent_bytes += (sum(sent_splits) - sent_splits[self.rank]) * row_bytes
        self.received_bytes += (sum(recv_splits) - recv_splits[self.rank]) * row_bytes

    def _begin_step(self, module, args):
        self.sent_bytes = self.received_bytes = self.host_syncs = 0
        self._spans, self.layer, self._pairs = [], -1, []
        if self.cuda:
            self._step0 = torch.cuda.Event(enable_timing=True)
            self._step0.record()
        else:
            self._step0 = time.perf_counter()

    def _end_step(self, module, args, output):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            dur = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731
            step = dur(self._step0, end)
        else:
            dur = lambda a, b: b - a  # noqa: E731
            step = time.perf_counter() - self._step0
        layers = [0.0] * (self.layer + 1)
        transfer = wait = 0.0
        for kind, layer, a, b in self._spans:
            d = dur(a, b)
            layers[layer] += d
            if kind == "transfer":
                transfer += d
            else:
                wait += d
        collective = transfer + wait
        self.step_stats.append(DEPStepStats(collective, self.sent_bytes, self.received_bytes, layers, step,
                                            max(0.0, step - collective), transfer, wait, self.host_syncs,
                                            self._pairs + [0] * (self.layer + 1 - len(self._pairs))))

    def memory_bytes(self) -> dict[str, int]:
        expert_params = {id(p) for b in self.model.moe_blocks() for p in b.experts.parameters()}
        non_expert = sum(p.numel() * p.element_size() for p in self.model.parameters() if id(p) not in expert_params)
        resident = sum(p.numel() * p.element_size() for b in self.model.moe_blocks() for p in b.experts.parameters())
        return {"non_expert": non_expert, "resident_experts": resident}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def apply_dep(model: MoECausalLM, process_group, rank: int, size: int, *, wire: str = "auto") -> DEPRuntime:
    """Turn ``model`` (holding expert share ``ep_ranges(E, size)[rank]``) into a DEP rank.

    wire: "auto" (FP8 rows with 1x128 scales when the experts are FP8 and computed by the
    FP8 kernel, else the activation dtype), "native" or "fp8" (``dwdp bench --dep-wire``).
    """
    cfg = model.config
    want = ep_ranges(cfg.num_experts, size)[rank]
    device = next(model.parameters()).device
    blocks: list[MoEBlock] = model.moe_blocks()
    for b in blocks:
        ex = b.experts
        if not isinstance(ex, RoutedExperts) or ex.expert_range != want:
            raise ValueError(f"apply_dep needs each MoE layer to hold exactly experts {want.start}..{want.stop - 1} "
                             f"(build_model(expert_shard=...)); found {getattr(ex, 'expert_range', type(ex))}")
    rt = DEPRuntime(model, process_group, rank, size, device, wire)
    for b in blocks:
        b.experts = DEPExperts(rt, b.experts)
    return rt
