"""Token shipping: a short DWDP step sends its tokens to the experts instead of pulling them.

A step too short to hide its pulls (a few hundred tokens against a layer's gigabytes of
remote experts) can trade the other way: its remote-expert inputs are megabytes. With
shipping on, such a step pulls nothing. At each MoE layer the requester writes its tokens
and their routing into every owner's inbox (one-sided, peer-visible memory) and bumps a
counter there; computes its resident experts' share meanwhile; then waits for each
owner's share in its own outbox and adds them.

The owner serves from a side thread: it learns of a requester's step from a host mailbox
(step number and token count) and queues the whole step at once on a high-priority side
stream, each layer's work behind a device-side wait for that layer's tokens. Its own
steps never wait for a requester, and its host only queues work. Every step that pulls
keeps DWDP's guarantee: no collective and no wait on a peer's progress.

Ordering, per (requester, owner) pair, with one counter value per shipped layer: the
requester writes layer m+1's inbox only after it has read layer m's result (stream
order), which the owner wrote only after reading layer m's inbox, so one inbox and one
outbox per pair suffice. CUDA orders through device flags (:mod:`dwdp.kernels.signals`);
CPU through shared-memory counters polled by the threads.

Status: correct on CPU and on 2 GPUs (tests), measured once on 2x H200 (BENCHMARKS.md):
faster than pulling only while every rank is in a short bf16 step, slower with FP8 experts
and beside an owner's long step. Later GPU runs stalled until the peer timeout; the suspect
is the device-side spin waits: CUDA maps streams onto a few hardware queues, so a stream
spinning on a peer can hold up this rank's serving stream behind it, and two ranks doing
so wait on each other. The step loop's device-wide synchronize also makes an owner's own
step wait for its serving streams. Off by default; on GPUs only with DWDP_EXPERIMENTAL_SHIPPING=1.
"""

from __future__ import annotations

import threading
import time

import torch

from ..models.moe import ExpertSegment, subset_experts_forward, subset_forward_is_sync_free
from .copy_engine import TransportTimeout
from .group import DWDPContext
from ..strategy.placement import Placement
from .transport import PeerMemory

try:  # CUDA only (the CPU wheel of torch ships without Triton)
    from ..kernels.signals import signal_set, signal_wait
except ImportError:  # pragma: no cover - depends on the install
    signal_set = signal_wait = None

SHORT_STEPS = ("pull", "ship", "auto")  # what a step below the break-even size does
IN, OUT = 0, 1  # rows of the flag counters: tokens in (owner side), results out (requester side)


def _check_sync_free(segments: list[ExpertSegment], act_dtype: torch.dtype, device: torch.device) -> None:
    """The serving thread queues whole steps before their tokens arrive: a host sync in the
    expert computation would block it on one requester while others wait (with three or
    more ranks, a deadlock). On CUDA only the bf16 grouped GEMM and the FP8 kernels keep
    the per-expert counts on the device (the counter kernels need Triton too)."""
    from .. import kernels

    if not segments:
        return
    x = torch.empty(0, segments[0].w2.shape[1], dtype=act_dtype, device=device)
    if not (subset_forward_is_sync_free(x, segments[0]) and kernels.enabled(x)):
        raise ValueError("token shipping on CUDA needs the sync-free expert kernels (bf16 activations with torch's "
                         "grouped GEMM, or FP8 experts with dimensions multiple of 128, and Triton enabled)")


class TokenShipper:
    """Both roles of one rank: requester for its own short steps, owner serving its peers'.

    ``segments[m]``: this rank's resident experts of MoE layer m. A requester computes all
    of them and asks each peer for exactly the experts it would have pulled from it
    (``placement.pulls``), so experts held by several ranks are counted once.
    ``max_tokens``: the largest step that can ship (the in/out boxes are sized for it)."""

    def __init__(self, ctx: DWDPContext, placement: Placement, segments: list[ExpertSegment], hidden: int,
                 top_k: int, act_dtype: torch.dtype, max_tokens: int, timeout_s: float = 60.0,
                 poll_s: float = 50e-6):
        self.segments = segments
        self.me, self.W = ctx.group_rank, ctx.group_size
        self.peers = [(self.me + i) % self.W for i in range(1, self.W)]
        self.owners = sorted({pp.peer for pp in placement.pulls(self.me)})  # who computes for our steps
        # What we compute for requester r: the experts r pulls from us, as (start, offset, count).
        self.serves = {r: [(pp.start, pp.peer_offset, pp.count) for pp in placement.pulls(r) if pp.peer == self.me]
                       for r in self.peers}
        self.clients = [r for r in self.peers if self.serves[r]]
        self.M, self.K, self.cap = len(segments), top_k, max_tokens
        self.device, self.cuda = ctx.device, ctx.device.type == "cuda"
        self.timeout_s, self.poll_s = timeout_s, poll_s
        if max_tokens < 1:
            raise ValueError(f"ship_max_tokens must be at least 1, got {max_tokens}")
        if self.cuda:
            _check_sync_free(segments, act_dtype, ctx.device)
        g, dev, W = ctx.group, ctx.device, self.W
        pend = [PeerMemory.allocate((W, max_tokens, hidden), act_dtype, dev, g),       # inbox: tokens
                PeerMemory.allocate((W, max_tokens, 2 * top_k), torch.float32, dev, g),  # inbox: ids | weights
                PeerMemory.allocate((W, max_tokens, hidden), act_dtype, dev, g),       # outbox: results
                PeerMemory.allocate((2, W), torch.int64, dev, g),                      # counters
                PeerMemory.allocate((W, 3), torch.int64, torch.device("cpu"), g)]  # mailbox: tokens, step, closing
        for p in pend[3:]:
            p.local.zero_()
        self.inbox_x, self.inbox_route, self.outbox, self.flags, self.mailbox = [p.connect() for p in pend]
        # CUDA: nonzero once a device wait timed out (requester role: 1 + the late owner; owner
        # role, per requester: that requester's tokens never came).
        self.status = torch.zeros(1, dtype=torch.int32, device=dev)
        self.serve_status = torch.zeros(W, dtype=torch.int32, device=dev)
        self.step = 0  # shipped steps announced by this rank (its counter values follow from it)
        self.shipped_bytes = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        if self.cuda:  # compile the kernels here, not in two threads at once
            probe = torch.zeros(1, dtype=torch.int64, device=dev)
            signal_set(probe, 1, self.status)
            signal_wait(probe, 1, self.status, timeout_s)  # the variant the steps use (64-bit timeout)
            seg = segments[0] if segments else None
            for rows in ((1, max_tokens) if seg is not None else ()):
                ids = torch.randint(seg.start, seg.start + seg.count, (rows, top_k), device=dev)
                subset_experts_forward(self.inbox_x.local[0, :rows], ids, torch.rand(rows, top_k, device=dev), seg)
            torch.cuda.synchronize(dev)
        self._thread = threading.Thread(target=self._serve_loop, name="dwdp-ship", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ signals
    def _set(self, flag: torch.Tensor, value: int, status: torch.Tensor) -> None:
        if self.cuda:
            signal_set(flag, value, status)
        else:
            flag.fill_(value)  # after this thread's writes of the data it guards

    def _wait(self, flag: torch.Tensor, value: int, what: str, code: int) -> None:
        if self.cuda:
            signal_wait(flag, value, self.status, self.timeout_s, code)
            return
        deadline = time.monotonic() + self.timeout_s
        while int(flag) < value:
            if self._stop.is_set():
                raise RuntimeError("token shipping stopped")
            if time.monotonic() > deadline:
                raise TransportTimeout(f"{what} did not arrive within {self.timeout_s:.0f} s "
                                       "(is the peer alive? raise --peer-timeout for very slow steps)")
            time.sleep(self.poll_s)

    def _value(self, step: int, m: int) -> int:
        return (step - 1) * self.M + m + 1

    # ------------------------------------------------------------------ requester
    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"token shipping service failed: {self.error}") from self.error

    def fits(self, tokens: int) -> bool:
        return 0 < tokens <= self.cap

    def begin_step(self, tokens: int) -> None:
        """A shipped step of ``tokens`` tokens starts (announced to the owners at its first
        MoE layer: nothing is announced for a forward that fails before it)."""
        self.check()
        if not self.fits(tokens):
            raise ValueError(f"a shipped step holds at most {self.cap} tokens, got {tokens}")
        if self.cuda:
            self.status.zero_()  # a step that raised earlier may have left it set

    def _announce(self, tokens: int) -> None:
        self.step += 1
        for p in self.owners:
            box = self.mailbox.peer(p)[self.me]
            box[0] = tokens  # the count first: the owner reads it after it sees the step number
            box[1] = self.step

    def layer(self, m: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """MoE layer m of a shipped step: resident share here, every other share at its owner."""
        T = x.shape[0]
        if m == 0:  # the step's first MoE layer: announced only once the forward got this far
            self._announce(T)
        v = self._value(self.step, m)
        route = torch.cat([topk_ids.to(torch.float32), topk_weights.to(torch.float32)], dim=1)
        for p in self.owners:
            self.inbox_x.peer(p)[self.me, :T].copy_(x)
            self.inbox_route.peer(p)[self.me, :T].copy_(route)
            self._set(self.flags.peer(p)[IN, self.me:self.me + 1], v, self.status)
        y = subset_experts_forward(x, topk_ids, topk_weights, self.segments[m]).float()  # shares summed in fp32
        for p in self.owners:
            self._wait(self.flags.local[OUT, p:p + 1], v, f"rank {p}'s expert outputs for shipped layer {m}", 1 + p)
            y += self.outbox.local[p, :T]
        per_peer = T * (2 * x.shape[1] * x.element_size() + route.shape[1] * 4)
        self.shipped_bytes += per_peer * len(self.owners)
        return y.to(x.dtype)

    def end_step(self) -> None:
        """After the step's last layer: raise if a device wait timed out (syncs on CUDA)."""
        if self.cuda:
            code = int(self.status.item())
            if code:
                self.status.zero_()
                raise TransportTimeout(f"rank {code - 1} did not return shipped expert outputs within "
                                       f"{self.timeout_s:.0f} s (is it alive?); this step's output is invalid")
        self.check()

    def take_shipped_bytes(self) -> int:
        """Tokens and routing sent plus results received, over all owners, since the last call."""
        n, self.shipped_bytes = self.shipped_bytes, 0
        return n

    # ------------------------------------------------------------------ owner
    def _serve_loop(self) -> None:
        """Serve every requester's layers as their tokens arrive, never blocking on one
        requester while another waits (with three or more ranks that would deadlock)."""
        seen = {r: 0 for r in self.clients}
        active: dict[int, list[int]] = {}  # requester -> [step, tokens, next layer] (CPU)
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
                # One stream per requester (a stream waiting on one must not hold up another),
                # ahead of this rank's own kernels.
                streams = {r: torch.cuda.Stream(self.device, priority=-1) for r in self.clients}
            with torch.no_grad():  # grad mode is per thread
                while not self._stop.is_set():
                    served = False
                    for r in self.clients:
                        step = int(self.mailbox.local[r, 1])
                        if r not in active and step != seen[r]:
                            seen[r] = step
                            active[r] = [step, int(self.mailbox.local[r, 0]), 0]
                        if r not in active:
                            continue
                        step, T, m = active[r]
                        if self.cuda:  # queue the whole step, each layer behind a device wait
                            with torch.cuda.stream(streams[r]):
                                # A failed earlier step of r (a wait that timed out) stops
                                # vouching for data only until r's next step.
                                self.serve_status[r:r + 1].zero_()
                                for m in range(self.M):
                                    v = self._value(step, m)
                                    # Bounded like the requester's: a requester that dies mid-step
                                    # holds this stream (and device-wide syncs) up to the timeout.
                                    signal_wait(self.flags.local[IN, r:r + 1], v, self.serve_status[r:r + 1],
                                                self.timeout_s, 1)
                                    self._serve_layer(r, T, m, v)
                            m = self.M
                        else:
                            while m < self.M and int(self.flags.local[IN, r]) >= self._value(step, m):
                                self._serve_layer(r, T, m, self._value(step, m))
                                m, served = m + 1, True
                        if m == self.M:
                            del active[r]
                        else:
                            active[r][2] = m
                    if not served:
                        time.sleep(self.poll_s)
        except BaseException as e:  # noqa: BLE001 - surfaced on the main thread by check()
            if not self._stop.is_set():
                self.error = e

    def _serve_layer(self, r: int, T: int, m: int, v: int) -> None:
        """Requester r's tokens of layer m through this rank's experts; the share back to r."""
        K, seg = self.K, self.segments[m]
        route = self.inbox_route.local[r, :T]
        x, ids, w = self.inbox_x.local[r, :T], route[:, :K].to(torch.int64), route[:, K:]
        y = None
        for start, off, n in self.serves[r]:
            part = ExpertSegment(start, *[t[off:off + n] if t is not None else None
                                          for t in (seg.w13, seg.w2, seg.w13_scale, seg.w2_scale)])
            share = subset_experts_forward(x, ids, w, part)
            y = share if y is None else y + share
        self.outbox.peer(r)[self.me, :T].copy_(y)
        # CUDA: not after a timed-out wait (the requester then times out instead of reading garbage).
        self._set(self.flags.peer(r)[OUT, self.me:self.me + 1], v, self.serve_status[r:r + 1])

    # ------------------------------------------------------------------
    def memory_bytes(self) -> int:
        return sum(t.local.numel() * t.local.element_size() for t in (self.inbox_x, self.inbox_route, self.outbox))

    def close(self) -> None:
        """Stop serving once every peer has closed too (a peer still stepping may ship to
        us); a peer that never closes is given up on after the timeout."""
        for p in self.peers:
            self.mailbox.peer(p)[self.me, 2] = 1
        deadline = time.monotonic() + self.timeout_s
        while (self._thread.is_alive() and time.monotonic() < deadline
               and not all(int(self.mailbox.local[r, 2]) for r in self.peers)):
            time.sleep(1e-3)
        self._stop.set()
        self._thread.join(timeout=5)
