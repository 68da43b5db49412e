"""Disaggregated serving: a prefill group (DWDP, or DEP / DP for comparison) in its own
processes, decode in the server process.

Each prefill rank runs the MNT-budgeted prefill engine on the requests the server routes
to it (least outstanding prompt tokens first) and sends back each finished request's
last logits and KV cache. Transfer is a shared-memory copy through a multiprocessing
queue (CPU tensors; on GPU: device -> host -> decode device); :class:`KVHandoff` is the
seam where a network transfer would go. DEP ranks step in lockstep (dummy steps when
idle), DWDP and DP ranks step on their own.

With ``kv_transport="cuda_ipc"`` the rank puts its GPU tensors on the queue instead: torch
shares them as CUDA IPC handles and the server copies them to the decode GPU peer to peer
(NVLink on one node), skipping the two host copies and the shared-memory pickle.

A prefill rank that dies (or reports an error) loses no request: the results the group
sent before the death are delivered, the whole group is killed (a DWDP or DEP group cannot
serve without every rank, and survivors would block on the dead peer) and the requests it
still held are prefilled again in the server process (the decode model is the whole model;
nothing of them was streamed yet: the first token is sampled here, from the logits). The
group is restarted in the background, at most ``max_pool_restarts`` times. Meanwhile, and
for good once the restarts are used up, new prompts are prefilled in the server process
too: the server keeps answering and ``/health`` reports ``degraded`` with the reason from
the moment the death is seen. Each failure and restart is logged at WARNING.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from dataclasses import dataclass, field

import torch

from ..engine import PrefillEngine, Request
from ..parallel.faults import fault_point
from ..parallel.strategies import get_strategy
from ..strategy.spec import DWDP, DWDPConfig, RankSpec
from .rank_group import GroupRestarter, RankProcesses, leave_group, rank_process
from .worker import ServeRequest, ServingWorker


KV_TRANSPORTS = ("host", "cuda_ipc")
log = logging.getLogger(__name__)


def pack_kv(kv: list) -> tuple[torch.Tensor, list]:
    """A request's per-layer (K, V) as one flat tensor and their shapes: over CUDA IPC each
    tensor's memory is one handle to open on the receiving side (~0.08 ms each: 188 handles,
    16-23 ms, for a full-depth qwen3-235b request), one flat tensor is one."""
    flat = torch.cat([t.reshape(-1) for pair in kv for t in pair])
    return flat, [(tuple(a.shape), tuple(b.shape)) for a, b in kv]


def unpack_kv(flat: torch.Tensor, shapes: list) -> list:
    """Views of :func:`pack_kv`'s flat tensor, per layer (K, V)."""
    out, o = [], 0
    for sa, sb in shapes:
        na, nb = math.prod(sa), math.prod(sb)
        out.append((flat[o:o + na].view(sa), flat[o + na:o + na + nb].view(sb)))
        o += na + nb
    return out


@dataclass
class PrefillPoolSpec:
    model: str
    strategy: str = DWDP
    world_size: int = 2
    num_layers: int | None = None
    dtype: str | None = None
    device: str = "cpu"
    dwdp: DWDPConfig = field(default_factory=DWDPConfig)  # a DWDP prefill group's options
    max_num_tokens: int = 8192
    seed: int = 0
    peer_timeout_s: float = 60.0
    expert_dtype: str = "auto"
    hold_ms: float = 3.0  # DWDP: hold a step below the measured break-even size this long to fill it
    # How each finished prompt's KV cache reaches the server: "host" (device -> shared host
    # memory -> decode device) or "cuda_ipc" (the rank shares its GPU tensors, the server
    # copies them GPU to GPU over NVLink; both sides on CUDA GPUs of one host).
    kv_transport: str = "host"
    dense_dtype: str = "auto"  # the projections, as --dense-dtype

    def __post_init__(self):
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport {self.kv_transport!r}: choose from {', '.join(KV_TRANSPORTS)}")
        if self.kv_transport == "cuda_ipc" and not self.device.startswith("cuda"):
            raise ValueError("kv_transport 'cuda_ipc' shares GPU memory: the prefill group must run on CUDA "
                             f"(device {self.device!r}); use kv_transport 'host'")

    def rank_spec(self, group_size: int) -> RankSpec:
        return RankSpec(model=self.model, strategy=self.strategy, num_layers=self.num_layers, dtype=self.dtype,
                        device=self.device, group_size=group_size, dwdp=self.dwdp, seed=self.seed,
                        expert_dtype=self.expert_dtype, dense_dtype=self.dense_dtype,
                        max_num_tokens=self.max_num_tokens, peer_timeout_s=self.peer_timeout_s)


class _Inbox:
    """A prefill rank's request source: what the server routes to it, live. ``None`` on
    the queue means the server is closing: no more requests will come."""

    def __init__(self, inq, rank: int):
        self.inq, self.rank, self.stopping, self._held = inq, rank, False, []

    def _take(self, item, now: float) -> None:
        if item is None:
            self.stopping = True
        else:
            fault_point("prefill-request", self.rank)
            self._held.append(Request(item[0], item[1], now))

    def poll(self, now: float) -> list[Request]:
        while not self.stopping:
            try:
                self._take(self.inq.get_nowait(), now)
            except queue.Empty:
                break
        out, self._held = self._held, []
        return out

    @property
    def more_coming(self) -> bool:
        return not self.stopping or bool(self._held)

    def wait(self, now: float, max_s: float | None) -> None:
        try:
            self._take(self.inq.get(timeout=0.05 if max_s is None else max_s), now)
        except queue.Empty:
            pass


def _prefill_rank(rank: int, port: int, run_id: str, spec: PrefillPoolSpec, inq, outq) -> None:
    from ..engine import StepDriver
    from ..parallel.group import PeerWatchdog, init_dwdp_groups, lockstep_sync
    from ..parallel.rank import build_rank

    with rank_process(rank, spec.world_size, port, run_id, outq):
        strategy = get_strategy(spec.strategy)
        group = spec.world_size if strategy.grouped else 1
        ctx = init_dwdp_groups(group, spec.device, timeout_s=max(spec.peer_timeout_s, 30.0))
        watchdog = PeerWatchdog(ctx, spec.peer_timeout_s) if group > 1 else None
        prefill_rank = build_rank(spec.rank_spec(group), ctx)
        runtime = prefill_rank.runtime
        engine = PrefillEngine(prefill_rank.model, spec.max_num_tokens, keep_kv=True)
        driver = StepDriver(engine, _Inbox(inq, rank), lockstep_sync(ctx) if strategy.lockstep else None,
                            idle_poll_s=0.002, hold=strategy.short_step_hold(runtime, spec.hold_ms))
        ipc = spec.kv_transport == "cuda_ipc"
        outq.put(("ready", rank, None))
        while (results := driver.step_once()) is not None:
            engine.steps.clear()  # a server runs for days: keep no per-step history here
            if results:
                wait = strategy.step_report(runtime).get("exposed_wait_s")
                runtime.step_stats.clear()
                if wait is not None:  # DWDP: pull wait the steps since the last report could not hide
                    outq.put(("stats", rank, sum(wait)))
            for r in results:
                # cuda_ipc: the queue pickles GPU tensors as IPC handles (torch.multiprocessing);
                # their memory stays this rank's until the server has copied and dropped them.
                if ipc and len({t.dtype for pair in r.kv for t in pair}) == 1:
                    kv = ("packed", *pack_kv(r.kv))
                else:
                    kv = r.kv if ipc else [(a.cpu(), b.cpu()) for a, b in r.kv]
                outq.put(("done", rank, (r.id, r.logits.float().cpu(), kv, r.prompt_len)))
            if watchdog is not None:
                watchdog.check()
        leave_group(watchdog, prefill_rank)


class PrefillPool(RankProcesses):
    def __init__(self, spec: PrefillPoolSpec, ready_timeout_s: float = 300.0):
        self.spec = spec
        super().__init__(_prefill_rank, spec, spec.world_size, "prefill", ready_timeout_s)
        self.load = [0] * spec.world_size  # outstanding prompt tokens per rank
        self.exposed_wait_s = 0.0  # DWDP prefill: pull wait the steps could not hide, summed over ranks
        self.stats_reports = 0  # step-stats messages received (each adds to exposed_wait_s)
        self.where: dict[str, tuple[int, int]] = {}

    def send(self, rid: str, prompt: list[int]) -> None:
        r = min(range(len(self.load)), key=lambda i: (self.load[i], i))
        self.load[r] += len(prompt)
        self.where[rid] = (r, len(prompt))
        self.inqs[r].put((rid, prompt))

    def poll(self):
        """Finished prefills so far: [(id, logits, kv, prompt_len)]; raises if a rank failed
        (once the results that arrived before the failure have been returned)."""
        out, failed = [], getattr(self, "_failed", None)
        while failed is None:
            try:
                kind, rank, val = self.outq.get_nowait()
            except queue.Empty:
                break
            except Exception as e:  # noqa: BLE001 - e.g. a CUDA IPC handle of a rank that died
                failed = f"a prefill result could not be received ({type(e).__name__}: {e})"
                break
            if kind == "error":
                failed = f"prefill rank {rank} failed: {val}"
                break
            if kind == "stats":
                self.exposed_wait_s += val
                self.stats_reports += 1
            if kind == "done":
                r, n = self.where.pop(val[0], (rank, 0))
                self.load[r] -= n
                rid, logits, kv, plen = val
                if isinstance(kv, tuple) and kv[0] == "packed":
                    kv = unpack_kv(kv[1], kv[2])
                out.append((rid, logits, kv, plen))
        dead = self.dead(wait_s=1.0 if failed else 0.0)  # a group with a dead rank cannot serve
        failed = f"{dead}; {failed}" if dead and failed else failed or dead  # the dead rank first
        if failed and not out:
            raise RuntimeError(failed)
        if failed:
            self._failed = failed  # deliver what came back first; the next poll raises
        return out

    @property
    def outstanding(self) -> int:
        return len(self.where)


class DisaggServingWorker(ServingWorker):
    """ServingWorker whose prefill runs on a :class:`PrefillPool`; decode stays here.

    While the pool is down (a rank died; restarting) prompts are prefilled locally."""

    def __init__(self, decode_model, pool: PrefillPool, max_batch: int = 64, max_queue: int = 256,
                 max_pool_restarts: int = 3, pool_factory=None, **kw):
        super().__init__(decode_model, pool.spec.max_num_tokens, max_batch, max_queue, **kw)
        if pool.spec.kv_transport == "cuda_ipc" and self.decode.device.type != "cuda":
            pool.close()
            raise ValueError("kv_transport 'cuda_ipc' copies the KV cache GPU to GPU: decode must run on a CUDA "
                             f"device (it is on {self.decode.device}); use kv_transport 'host'")
        self.pool: PrefillPool | None = pool
        self.spec = pool.spec
        self.max_pool_restarts = max_pool_restarts
        factory = pool_factory or PrefillPool
        self._restarter = GroupRestarter(lambda: factory(self.spec), max_pool_restarts, "prefill")

    @property
    def pool_restarts(self) -> int:
        """Restart attempts made."""
        return self._restarter.attempts

    def _dispatch(self, req: ServeRequest) -> None:
        # Prompt logprobs (echo) need every prompt token's logits: prefilled here, where they are.
        if self.pool is None or req.params.prompt_logprobs is not None:
            return super()._dispatch(req)  # fallback: prefill in this process
        self.pool.send(req.id, req.prompt)

    def _prefill_pending(self) -> bool:
        return (self.pool is not None and self.pool.outstanding > 0) or self.prefill.has_work

    def _prefill_queue_depth(self) -> int:
        return (self.pool.outstanding if self.pool is not None else 0) + len(self.prefill.queue)

    def _prefill_step(self) -> None:
        if self.prefill.has_work:  # local fallback prefill (pool down or restarting)
            super()._prefill_step()
        if self.pool is None or self.pool.outstanding == 0:
            return
        before = self.pool.exposed_wait_s
        try:
            got = self.pool.poll()
        except RuntimeError as e:  # a rank failed: not an engine fault of this process
            return self._pool_failed(str(e))
        if self.pool.exposed_wait_s > before:
            self.metrics.inc("dwdp_prefill_exposed_wait_seconds_total", self.pool.exposed_wait_s - before)
        if not got and not self.decode.has_work and not self.prefill.has_work:
            time.sleep(0.001)
        for rid, logits, kv, n in got:
            self._prefilled(rid, logits, kv, n)

    def _cancel_prefill(self, ids: set[str]) -> None:
        super()._cancel_prefill(ids)  # a request already sent to the pool: its result is dropped on arrival

    # -- supervision --------------------------------------------------------------------
    def _supervise(self) -> None:
        super()._supervise()
        if self.pool is not None and self.pool.dead():
            try:  # deliver what the group finished before the death; poll raises once drained
                while True:
                    for rid, logits, kv, n in self.pool.poll():
                        self._prefilled(rid, logits, kv, n)
            except RuntimeError as e:
                self._pool_failed(str(e))
        done = self._restarter.poll()
        if done is not None:
            new, err = done
            if new is not None:
                self.pool = new
                self.degraded = None
                self.metrics.set("dwdp_degraded", 0)
                self.metrics.inc("dwdp_prefill_pool_restarts_total")
                log.warning("prefill group restarted (attempt %d/%d): prefilling on its %d ranks again",
                            self._restarter.attempts, self.max_pool_restarts, self.spec.world_size)
            else:
                log.warning("prefill group restart %d/%d failed: %s", self._restarter.attempts,
                            self.max_pool_restarts, err)
                self._start_restart(f"restart failed: {err}")

    def _pool_failed(self, reason: str) -> None:
        pool, self.pool = self.pool, None
        pool.kill()  # reap the survivors now: no zombie ranks
        self.metrics.set("dwdp_degraded", 1)
        # What the group still held runs again here (self.pool is None: _dispatch prefills locally).
        again = [self._live[rid] for rid in list(pool.where) if rid in self._live]
        log.warning("prefill group failed: %s; %d request(s) in flight on it are prefilled again in the server "
                    "process", reason, len(again))
        for req in again:
            try:
                self._dispatch(req)
            except Exception as e:  # noqa: BLE001  (this request's fault)
                self._fail_request(req.id, f"prefill group failed ({reason}) and the request could not be "
                                           f"prefilled again: {type(e).__name__}: {e}")
        self._start_restart(reason)

    def _start_restart(self, reason: str) -> None:
        if self._restarter.start():
            self.degraded = (f"prefill group down ({reason}); prefilling in the server process while restarting "
                             f"it (attempt {self._restarter.attempts}/{self.max_pool_restarts})")
            log.warning("restarting the prefill group (attempt %d/%d)", self._restarter.attempts,
                        self.max_pool_restarts)
        elif not self._restarter.closing:
            self.degraded = (f"prefill group down ({reason}); gave up after {self._restarter.attempts} restart(s), "
                             "prefilling in the server process")
            log.warning("prefill group: gave up after %d restart(s); prefilling in the server process from now on",
                        self._restarter.attempts)

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        self._restarter.closing = True
        super().stop(drain_timeout_s)
        if self.pool is not None:
            self.pool.close()
        self._restarter.close()
