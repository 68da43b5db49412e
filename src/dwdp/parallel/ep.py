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
3. dispatch: ``transport="nccl"`` (default): a tiny all-to-all of the counts (rows per
   destination and pairs per expert), the layer's one host sync, then one
   ``all_to_all_single`` of the packed rows. ``transport="symm"`` (opt-in until measured):
   ``torch.ops.symm_mem.all_to_all_vdev`` between symmetric-memory buffers sized for the
   worst case, with the splits on the device, so no counts exchange; the one host sync
   comes after the dispatch (sizes of the receive-side compute);
4. receive: the received (token, expert) pairs this rank holds are sorted by expert on
   the GPU, run through the same grouped SwiGLU GEMMs as dp/DWDP
   (:func:`~dwdp.models.moe.sorted_experts_forward`), and each received token's pairs are
   reduced in one pass with their routing weights into one partial row (no atomics);
5. combine: the partial rows go back (same transport, reversed splits) and each token
   sums the at most min(top_k, N) partial rows of the ranks it visited with a gather-based
   one-pass reduction (``slot`` again), not ``index_add_``.

``overlap=True`` (two-batch overlap; opt-in: measured 2-3% slower per step on 4x H200, the
experts slowed by NCCL's kernels beside them more than the transfer it hides, and slower on
2x H200 too; docs/BENCHMARKS.md): the layer's tokens are split
into two micro-batches; one's dispatch/combine runs on a communication stream while the
other's experts compute (dispatch B || experts A, combine A || experts B). Only the MoE
layer is split (attention is outside this module's reach). On CPU the same sequence runs
on one stream: outputs are equal, nothing overlaps.

Timing (``DEPStepStats``): a collective's duration includes waiting for the slowest peer.
To separate waiting from transfer, every dispatch and combine is preceded by a
synchronising collective that moves next to nothing: the counts exchange (nccl) or a
one-element ``all_reduce`` (the "fence"). Its duration is recorded as ``wait_s`` (it
returns only once every peer has reached it); the dispatch/combine after it starts with
all peers ready, so its duration is ``transfer_s``. On CUDA the spans are CUDA events on
the stream the collective runs on; on CPU wall clock. ``collective_s`` is the time the
compute stream spent in collectives or stalled waiting for them (without overlap:
wait + transfer; with overlap: the counts exchange plus the compute stream's waits on the
communication stream, each bracketed by events). ``compute_s = step_s - collective_s``:
the step's time outside collectives and waits, to set against dp's step time. The fences
also order the reuse of the symmetric buffers: no rank writes into a buffer a peer may
still read.

Every MoE layer is a point where all ranks of the group wait for the slowest: the
synchronization DWDP removes. Ranks with nothing to do must still run (dummy) steps so
the collectives line up; :class:`dwdp.engine.StepDriver` does that. A rank with zero
tokens in a layer still runs every collective.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .. import kernels
from ..models.moe import ExpertSegment, MoEBlock, RoutedExperts, sorted_experts_forward
from ..models.transformer import MoECausalLM
from ..quant import FP8, FP8_MAX
from ..strategy.wire import WIRES, ep_ranges, fp8_wire
from ..strategy.wire import WireLayout as _Wire

TRANSPORTS = ("nccl", "symm")


@dataclass
class DEPStepStats:
    collective_s: float  # compute stream's time in collectives or stalled on them (see module doc)
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


# ----------------------------------------------------------------------------- kernels
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same width (row copies are dtype-agnostic)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _scatter_rows(src: torch.Tensor, slot: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[slot[t, j]] = src[t] for slot[t, j] >= 0."""
    if src.shape[0] == 0:
        return
    if kernels.enabled(src):
        from ..kernels.dep_moe import scatter_rows

        return scatter_rows(_bits(src.contiguous()), slot, _bits(dst))
    for j in range(slot.shape[1]):  # fallback (CPU): one masked copy per destination
        m = slot[:, j] >= 0
        dst[slot[m, j]] = src[m]


def _gather_rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src[idx] as a new contiguous tensor (src may be a strided view of a receive buffer)."""
    if kernels.enabled(src) and idx.numel():
        from ..kernels.dep_moe import gather_rows

        out = torch.empty((idx.numel(), src.shape[1]), dtype=src.dtype, device=src.device)
        gather_rows(_bits(src), idx, _bits(out))
        return out
    return src.index_select(0, idx)


def _gather_reduce(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor) -> None:
    """out[t] = sum over pos[t, j] >= 0 of weights[t, j] * y[pos[t, j]], in one pass, no atomics."""
    if out.shape[0] == 0:
        return
    if y.shape[0] == 0:  # nothing to add (and no pointer to hand a kernel)
        out.zero_()
        return
    if kernels.enabled(out):
        from ..kernels.dep_moe import gather_reduce

        return gather_reduce(y, pos, weights, out)
    valid = pos >= 0
    w = valid.to(out.dtype) if weights is None else weights.to(out.dtype) * valid
    rows = y[pos.clamp(min=0)]  # [T, J, H]
    out.copy_(torch.bmm(w.unsqueeze(1), rows.to(out.dtype)).squeeze(1))


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 1x128 FP8 quantisation (kernels/fp8_grouped.quantize_rows; PyTorch without Triton)."""
    if kernels.enabled(x):
        from ..kernels.fp8_grouped import quantize_rows

        return quantize_rows(x)
    T, H = x.shape
    v = x.float().view(T, H // 128, 128)
    scale = v.abs().amax(-1).clamp(min=1e-10) / FP8_MAX
    return (v / scale.unsqueeze(-1)).to(FP8).view(T, H), scale


class _MicroBatch:
    """One dispatch/compute/combine unit (the whole layer, or half of it with overlap)."""

    def __init__(self, index: int, rows: slice):
        self.index, self.rows = index, rows


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

    def _wire(self, x: torch.Tensor) -> _Wire:
        rt = self.runtime
        fp8 = fp8_wire(rt.wire, self.w13_scale is not None and kernels.enabled(x),
                       x.shape[1], self.w13.shape[-1], self.w2.shape[-1])
        key = (x.shape[1], rt.top_k, x.dtype, fp8)
        if key not in rt.wires:
            rt.wires[key] = _Wire(*key)
        return rt.wires[key]

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        rt.layer += 1
        T = x.shape[0]
        wire = self._wire(x)
        if rt.transport == "symm":
            rt.symm_buffers(wire, x, T)
        cuts = [0, (T + 1) // 2, T] if rt.overlap else [0, T]
        mbs = [_MicroBatch(i, slice(a, b)) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
        for mb in mbs:
            self._prepare(mb, wire, x[mb.rows], topk_ids[mb.rows], topk_weights[mb.rows])
        if rt.transport == "nccl":
            self._exchange_counts(mbs)  # also the dispatch's fence
        out = torch.empty_like(x)
        if not rt.overlap:
            (mb,) = mbs
            self._dispatch(mb, wire, fence=rt.transport == "symm")
            self._experts(mb, wire, x)
            self._combine(mb, x)
            self._finish(mb, out)
            return out
        a, b = mbs
        with rt.on_comm():
            self._dispatch(a, wire, fence=rt.transport == "symm")
            ev_a = rt.record_comm()
            self._dispatch(b, wire, fence=False)  # peers are at the same point already
            ev_b = rt.record_comm()
        rt.wait_comm(ev_a)
        self._experts(a, wire, x)
        with rt.on_comm():
            self._combine(a, x)
        rt.wait_comm(ev_b)
        self._experts(b, wire, x)
        with rt.on_comm():
            self._combine(b, x)
        rt.wait_comm(None)  # every communication of this layer
        self._finish(a, out)
        self._finish(b, out)
        return out

    # -- sender: layout and pack (compute stream, no host sync)
    def _prepare(self, mb: _MicroBatch, wire: _Wire, x, ids, weights) -> None:
        rt = self.runtime
        T, N = x.shape[0], rt.size
        owner = rt.owner[ids]
        hit = torch.zeros(T, N, dtype=torch.bool, device=x.device).scatter_(1, owner, True)
        # Scan along tokens as rows of a [N, T] tensor: torch's scan over the outer dim of a
        # [T, N] tensor (few columns) is a slow kernel, ~1.5 ms per layer at 16K tokens on H200.
        ht = hit.t().to(torch.int32).contiguous()
        mb.send_counts = ht.sum(1, dtype=torch.long)
        first = mb.send_counts.cumsum(0) - mb.send_counts
        before = (ht.cumsum(1, dtype=torch.long) - ht).t()  # [T, N]: earlier tokens bound for the same rank
        mb.slot = torch.where(hit, first + before, -1).contiguous()  # send row of (token, destination)
        if rt.transport == "nccl":  # per destination: rows, then pairs per expert it holds
            ecount = torch.zeros(rt.num_experts + 1, dtype=torch.long, device=x.device)
            ecount.scatter_add_(0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.long, device=x.device))
            mb.counts_msg = torch.cat([mb.send_counts[:, None], ecount[rt.count_index]], 1)
        fields = {"ids": ids.to(torch.int32), "w": weights.float()}
        if wire.fp8:
            fields["x"], fields["xs"] = _quantize_rows(x)
        else:
            fields["x"] = x
        if rt.transport == "symm":
            mb.send = rt.symm.send[mb.index].view(torch.uint8)
        else:
            mb.send = torch.empty((T * min(N, rt.top_k), wire.width), dtype=torch.uint8, device=x.device)
        views = wire.views(mb.send)
        for name, src in fields.items():
            _scatter_rows(src, mb.slot, views[name])

    def _exchange_counts(self, mbs: list[_MicroBatch]) -> None:
        """nccl: counts of every micro-batch in one tiny all-to-all, then the layer's one host sync."""
        rt = self.runtime
        N, C = rt.size, rt.count_index.shape[1] + 1
        msg = torch.cat([mb.counts_msg for mb in mbs], 1)
        got = torch.empty_like(msg)
        with rt.timed("wait"):
            dist.all_to_all_single(got, msg, group=rt.process_group)
        host = torch.cat([mb.send_counts for mb in mbs] + [got.reshape(-1)]).tolist()
        rt.host_syncs += 1
        recv = host[len(mbs) * N:]
        got = got.view(N, len(mbs), C)
        for i, mb in enumerate(mbs):
            mb.send_splits = host[i * N:(i + 1) * N]
            rows = [recv[(r * len(mbs) + i) * C:(r * len(mbs) + i + 1) * C] for r in range(N)]
            mb.recv_splits = [row[0] for row in rows]
            mb.counts_host = [sum(row[1 + g] for row in rows) for g in range(self.count)]
            mb.counts = got[:, i, 1:1 + self.count].sum(0)

    # -- dispatch
    def _dispatch(self, mb: _MicroBatch, wire: _Wire, fence: bool) -> None:
        rt = self.runtime
        if fence:
            rt.fence()
        if rt.transport == "symm":
            s = rt.symm
            s.in_d[mb.index].copy_(mb.send_counts)
            with rt.timed("transfer"):
                torch.ops.symm_mem.all_to_all_vdev(s.send[mb.index], s.recv[mb.index], s.in_d[mb.index],
                                                   s.oso_d[mb.index], rt.group_name)
            mb.recv = s.recv[mb.index].view(torch.uint8)
            return
        S, R = sum(mb.send_splits), sum(mb.recv_splits)
        mb.recv = torch.empty((R, wire.width), dtype=torch.uint8, device=mb.send.device)
        with rt.timed("transfer"):
            dist.all_to_all_single(mb.recv, mb.send[:S], mb.recv_splits, mb.send_splits, group=rt.process_group)
        rt.count_bytes(mb.send_splits, mb.recv_splits, wire.width)

    # -- receiver: sort pairs by expert, grouped GEMM, one-pass weighted reduction per row
    def _experts(self, mb: _MicroBatch, wire: _Wire, x: torch.Tensor) -> None:
        rt = self.runtime
        K, E = rt.top_k, self.count
        views = wire.views(mb.recv)
        if rt.transport == "symm":  # sizes are on the device: the layer's one host sync is here
            oso = rt.symm.oso_d[mb.index]
            rmax = mb.recv.shape[0]
            live = torch.arange(rmax, device=x.device) < oso[0].sum()
            local = views["ids"].long() - self.start
            ok = (local >= 0) & (local < E) & live[:, None]
            ecount = torch.zeros(E + 1, dtype=torch.long, device=x.device)
            ecount.scatter_add_(0, torch.where(ok, local, E).reshape(-1), torch.ones(rmax * K, dtype=torch.long,
                                                                                     device=x.device))
            host = torch.cat([oso[0], mb.send_counts, ecount[:E]]).tolist()
            rt.host_syncs += 1
            mb.recv_splits, mb.send_splits = host[:rt.size], host[rt.size:2 * rt.size]
            mb.counts_host, mb.counts = host[2 * rt.size:], ecount[:E]
            rt.count_bytes(mb.send_splits, mb.recv_splits, wire.width)
        R = sum(mb.recv_splits)
        views = {k: v[:R] for k, v in views.items()}
        local = views["ids"].long() - self.start
        ok = (local >= 0) & (local < E)
        P = sum(mb.counts_host)
        rt.add_pairs(P)
        order = torch.argsort(torch.where(ok, local, E).reshape(-1), stable=True)[:P]  # pairs held here, by expert
        pos = torch.full((R * K,), -1, dtype=torch.long, device=x.device)
        pos[order] = torch.arange(P, device=x.device)
        src = order // K
        xs = _gather_rows(views["x"], src)
        xs_scale = _gather_rows(views["xs"], src) if wire.fp8 else None
        ys = sorted_experts_forward(xs, mb.counts, self._segment(), mb.counts_host, xs_scale, out_dtype=x.dtype)
        if rt.transport == "symm":
            mb.partial = rt.symm.partial[mb.index][:R]
        else:
            mb.partial = torch.empty((R, x.shape[1]), dtype=x.dtype, device=x.device)
        _gather_reduce(ys, pos.view(R, K), views["w"], mb.partial)

    # -- combine
    def _combine(self, mb: _MicroBatch, x: torch.Tensor) -> None:
        rt = self.runtime
        rt.fence()  # peers finish their experts here, not inside the transfer
        row_bytes = x.shape[1] * x.element_size()
        if rt.transport == "symm":
            s = rt.symm
            s.in_c[mb.index].copy_(s.oso_d[mb.index][0])
            with rt.timed("transfer"):
                torch.ops.symm_mem.all_to_all_vdev(s.partial[mb.index], s.back[mb.index], s.in_c[mb.index],
                                                   s.oso_c[mb.index], rt.group_name)
            mb.back = s.back[mb.index]
        else:
            mb.back = torch.empty((sum(mb.send_splits), x.shape[1]), dtype=x.dtype, device=x.device)
            with rt.timed("transfer"):
                dist.all_to_all_single(mb.back, mb.partial, mb.send_splits, mb.recv_splits, group=rt.process_group)
        rt.count_bytes(mb.recv_splits, mb.send_splits, row_bytes)

    def _finish(self, mb: _MicroBatch, out: torch.Tensor) -> None:
        """Each token sums the partial rows of the ranks it visited (gather, one pass)."""
        _gather_reduce(mb.back, mb.slot, None, out[mb.rows])


# --------------------------------------------------------------------------- runtime
_SYMM_CACHE: dict = {}


class _SymmBuffers:
    """Worst-case-sized symmetric-memory buffers, one set per micro-batch, shared by all layers
    (the fences order their reuse)."""

    def __init__(self, rt: "DEPRuntime", wire: _Wire, act_dtype: torch.dtype, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        n_mb = 2 if rt.overlap else 1
        cap = -(-rt.max_tokens // n_mb)  # tokens per micro-batch and rank
        N, fan, H = rt.size, min(rt.size, rt.top_k), wire.hidden
        esz = torch.empty(0, dtype=act_dtype).element_size()
        self.key = (wire.width, act_dtype, H)
        need = n_mb * (cap * fan * (wire.width + H * esz) + N * cap * (wire.width + H * esz))
        os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(int(need * 1.25) + (512 << 20)))
        try:
            current = symm_mem.get_backend(device)
        except Exception:  # noqa: BLE001 - older torch: no query, just set it
            current = None
        if current != "NVSHMEM":
            symm_mem.set_backend("NVSHMEM")
        with contextlib.suppress(Exception):  # needed by older torch, a no-op or gone in newer
            symm_mem.enable_symm_mem_for_group(rt.group_name)

        def alloc(*shape, dtype):
            t = symm_mem.empty(*shape, dtype=dtype, device=device)
            symm_mem.rendezvous(t, rt.group_name)
            return t

        bf = torch.bfloat16  # rows travel as bf16 columns (the dtype measured with all_to_all_vdev)
        self.send = [alloc(cap * fan, wire.width // 2, dtype=bf) for _ in range(n_mb)]
        self.recv = [alloc(N * cap, wire.width // 2, dtype=bf) for _ in range(n_mb)]
        self.partial = [alloc(N * cap, H, dtype=act_dtype) for _ in range(n_mb)]
        self.back = [alloc(cap * fan, H, dtype=act_dtype) for _ in range(n_mb)]
        # Splits/offsets: one tensor per operation (its signal pad is the op's scratch).
        self.in_d = [alloc(N, dtype=torch.int64) for _ in range(n_mb)]
        self.oso_d = [alloc(2, N, dtype=torch.int64) for _ in range(n_mb)]
        self.in_c = [alloc(N, dtype=torch.int64) for _ in range(n_mb)]
        self.oso_c = [alloc(2, N, dtype=torch.int64) for _ in range(n_mb)]
        self.cap = cap
        self.nbytes = need


class DEPRuntime:
    """Per-rank state of DEP and its per-step statistics."""

    def __init__(self, model: MoECausalLM, process_group, rank: int, size: int, device: torch.device,
                 transport: str = "nccl", overlap: bool = False, max_tokens: int = 16384, wire: str = "auto"):
        cfg = model.config
        if transport not in TRANSPORTS:
            raise ValueError(f"DEP transport {transport!r}: choose from {', '.join(TRANSPORTS)}")
        if wire not in WIRES:
            raise ValueError(f"DEP wire {wire!r}: choose from {', '.join(WIRES)}")
        if transport == "symm" and device.type != "cuda":
            raise ValueError("transport='symm' (NVSHMEM symmetric memory) needs CUDA")
        self.model, self.process_group, self.rank, self.size = model, process_group, rank, size
        self.transport, self.overlap, self.max_tokens, self.wire = transport, overlap, max_tokens, wire
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
        self.group_name = getattr(process_group, "group_name", None) if process_group is not None else \
            dist.group.WORLD.group_name
        self.comm_stream = torch.cuda.Stream(device) if self.cuda and overlap else None
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.wires: dict = {}
        self.symm: _SymmBuffers | None = None
        self.sent_bytes = self.received_bytes = self.host_syncs = 0
        self.layer = -1
        self._pairs: list[int] = []  # (token, expert) pairs computed per MoE layer of the step
        self._spans: list[tuple] = []  # (kind, exposed, layer, start, end)
        self._step0 = None
        self.step_stats: list[DEPStepStats] = []
        # A step spans embedding to lm_head, so a prefill forward and a decode step
        # (MoECausalLM.decode) are both accounted; a bare experts module: its forward.
        first = getattr(getattr(model, "model", None), "embed_tokens", None)
        last = getattr(model, "lm_head", None)
        first, last = (first, last) if first is not None and last is not None else (model, model)
        self._hooks = [first.register_forward_pre_hook(self._begin_step),
                       last.register_forward_hook(self._end_step)]

    # -- symmetric buffers
    def symm_buffers(self, wire: _Wire, x: torch.Tensor, T: int) -> None:
        if T > self.max_tokens:
            raise ValueError(f"DEP symm transport: {T} tokens in a step exceed max_tokens={self.max_tokens} "
                             "(the symmetric buffers are sized for it; raise --max-num-tokens)")
        if self.symm is None:
            # Shared by runtimes of the same group and layout (the symmetric heap is fixed-size).
            key = (self.group_name, self.size, self.top_k, self.overlap, self.max_tokens, wire.width, wire.hidden,
                   x.dtype, x.device)
            if key not in _SYMM_CACHE:
                _SYMM_CACHE[key] = _SymmBuffers(self, wire, x.dtype, x.device)
            self.symm = _SYMM_CACHE[key]
        elif self.symm.key != (wire.width, x.dtype, wire.hidden):
            raise ValueError("DEP symm transport: every MoE layer must use the same row layout")

    # -- streams (overlap on CUDA; no-ops otherwise)
    def on_comm(self):
        if self.comm_stream is None:
            return contextlib.nullcontext()
        self.comm_stream.wait_stream(torch.cuda.current_stream())  # everything issued so far
        return torch.cuda.stream(self.comm_stream)

    def record_comm(self):
        if self.comm_stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(self.comm_stream)
        return ev

    def wait_comm(self, ev) -> None:
        """The compute stream waits for ``ev`` (or the whole comm stream); the stall is timed."""
        if self.comm_stream is None:
            return
        cur = torch.cuda.current_stream()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(cur)
        if ev is None:
            cur.wait_stream(self.comm_stream)
        else:
            cur.wait_event(ev)
        b.record(cur)
        self._spans.append(("stall", True, self.layer, a, b))

    # -- timing
    @contextlib.contextmanager
    def timed(self, kind: str):
        on_comm = self.comm_stream is not None and torch.cuda.current_stream() == self.comm_stream
        exposed = not on_comm
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
        else:
            a = time.perf_counter()
            yield
            b = time.perf_counter()
        self._spans.append((kind, exposed, self.layer, a, b))

    def fence(self) -> None:
        """A one-element all_reduce: returns once every peer got here (absorbs their lateness)."""
        with self.timed("wait"):
            dist.all_reduce(self._flag, group=self.process_group)

    def add_pairs(self, pairs: int) -> None:
        """Pairs computed in the current MoE layer (micro-batches add up)."""
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
        exposed = transfer = wait = 0.0
        for kind, exp, layer, a, b in self._spans:
            d = dur(a, b)
            if exp:
                exposed += d
                layers[layer] += d
            if kind == "transfer":
                transfer += d
            elif kind == "wait":
                wait += d
        self.step_stats.append(DEPStepStats(exposed, self.sent_bytes, self.received_bytes, layers, step,
                                            max(0.0, step - exposed), transfer, wait, self.host_syncs,
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
def apply_dep(model: MoECausalLM, process_group, rank: int, size: int, *, transport: str = "nccl",
              overlap: bool = False, max_tokens: int = 16384, wire: str = "auto") -> DEPRuntime:
    """Turn ``model`` (holding expert share ``ep_ranges(E, size)[rank]``) into a DEP rank.

    transport: "nccl" (all_to_all_single; default) or "symm" (NVSHMEM all_to_all_vdev over
    symmetric buffers sized for ``max_tokens`` tokens per rank and step). overlap: two-batch
    overlap of communication with expert compute. wire: "auto" (FP8 rows with 1x128
    scales when the experts are FP8 and computed by the FP8 kernel, else the activation
    dtype), "native" or "fp8". ``dwdp bench --dep-transport/--dep-overlap/--dep-wire`` set them.
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
    rt = DEPRuntime(model, process_group, rank, size, device, transport, overlap, max_tokens, wire)
    for b in blocks:
        b.experts = DEPExperts(rt, b.experts)
    return rt
