"""Process groups for DWDP: setup, agreement checks, and the peer watchdog.

A world of W ranks forms W/N independent groups of N consecutive ranks. torch.distributed
(NCCL on GPU, gloo on CPU) is used during setup and teardown only; steady-state steps
issue no collective. Liveness is watched on a side channel (a TCPStore client thread),
so a dead or hung peer ends every rank of its group with a clear error within a bounded
time instead of a silent hang.
"""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .transport import GroupHandle


class SetupMismatch(RuntimeError):
    """Ranks of one group disagree on something they must share (model, placement...)."""


class PeerFailure(RuntimeError):
    """A peer of this DWDP group died or stopped responding."""


@dataclass
class DWDPContext:
    rank: int
    world_size: int
    local_rank: int
    group_index: int
    group: GroupHandle
    device: torch.device

    @property
    def group_rank(self) -> int:
        return self.group.group_rank

    @property
    def group_size(self) -> int:
        return self.group.group_size

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "DWDPContext":
        """A process on its own (no torch.distributed): a group of one."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
        return cls(0, 1, 0, 0, GroupHandle(0, 1, None, [0]), device)


def init_dwdp_groups(group_size: int, device_type: str = "cpu", timeout_s: float = 60.0) -> DWDPContext:
    """Join the world (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as
    torchrun or ``dwdp run --group-size`` set them) and form the DWDP groups."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"{key} is not set: launch with torchrun or `dwdp run --group-size N`")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if group_size < 1 or world % group_size:
        raise ValueError(f"world size {world} is not a multiple of the DWDP group size {group_size}")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_node % group_size:
        # torchrun numbers ranks node by node: groups of consecutive ranks stay inside a node
        # only if the group size divides the processes per node. Peers map each other's
        # memory (CUDA IPC / shared memory), which does not cross nodes.
        raise ValueError(f"a DWDP group must lie within one node: group size {group_size} does not divide the "
                         f"{per_node} processes per node; use --nproc-per-node a multiple of -N")
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    groups = [list(range(g * group_size, (g + 1) * group_size)) for g in range(world // group_size)]
    mine = rank // group_size
    pg = None
    for g, ranks in enumerate(groups):  # every rank must create every group
        h = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
        if g == mine:
            pg = h
    handle = GroupHandle(rank % group_size, group_size, pg, groups[mine])
    return DWDPContext(rank, world, local_rank, mine, handle, device)


def lockstep_sync(ctx: DWDPContext):
    """For :class:`~dwdp.engine.StepDriver`: OR a few flags over the group (one small
    all-reduce), so the ranks of a lockstep strategy agree on whether to step."""

    def any_rank(flags: list[bool]) -> list[bool]:
        t = torch.tensor([int(f) for f in flags], device=ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group.process_group)
        return [bool(v) for v in t.tolist()]

    return any_rank


def fingerprint_checkpoint(path: str | None) -> str:
    """Names and sizes of a checkpoint's files: cheap, and catches different checkpoints."""
    if path is None:
        return "random-init"
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f.endswith((".safetensors", ".json")):
                p = os.path.join(root, f)
                h.update(f"{f}:{os.path.getsize(p)}".encode())
    return h.hexdigest()[:16]


def check_agreement(ctx: DWDPContext, facts: dict) -> None:
    """Every rank of the group must hold identical ``facts``; else fail naming the field."""
    mine = json.loads(json.dumps(facts, sort_keys=True, default=str))
    gathered: list = [None] * ctx.group_size
    dist.all_gather_object(gathered, mine, group=ctx.group.process_group)
    for key in sorted(set().union(*[g.keys() for g in gathered])):
        values = [g.get(key) for g in gathered]
        if any(v != values[0] for v in values):
            per_rank = "; ".join(f"rank {ctx.group.global_ranks[i]}: {v!r}" for i, v in enumerate(values))
            raise SetupMismatch(f"ranks of DWDP group {ctx.group_index} disagree on {key}: {per_rank}")


class PeerWatchdog:
    """Heartbeats on a TCPStore; declares a peer dead after ``timeout_s`` without one.

    On failure it prints the reason, interrupts the main thread (which raises
    :class:`PeerFailure` from :meth:`check`), and if the process has not exited within
    ``grace_s`` (stuck in a device call), ends it with exit code 17.
    """

    def __init__(self, ctx: DWDPContext, timeout_s: float = 60.0, interval_s: float | None = None,
                 grace_s: float = 10.0, hard_exit: bool = True):
        self.ctx, self.timeout_s = ctx, timeout_s
        self.interval_s = interval_s or max(0.05, min(1.0, timeout_s / 10))
        self.grace_s, self.hard_exit = grace_s, hard_exit
        self.failure: str | None = None
        self._stop = threading.Event()
        self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                    is_master=False, timeout=timedelta(seconds=max(5.0, timeout_s)))
        self._prefix = f"dwdp/{os.environ.get('DWDP_RUN_ID', 'run')}"
        self._thread = threading.Thread(target=self._loop, name="dwdp-watchdog", daemon=True)
        self._thread.start()

    def _key(self, kind: str, rank: int) -> str:
        return f"{self._prefix}/{kind}/{rank}"

    def _loop(self) -> None:
        me = self.ctx.rank
        peers = [r for r in self.ctx.group.global_ranks if r != me]
        last_seen = {r: (-1, time.monotonic()) for r in peers}
        try:
            while not self._stop.is_set():
                self._store.add(self._key("hb", me), 1)
                now = time.monotonic()
                for r in peers:
                    if self._store.add(self._key("done", r), 0):
                        continue
                    beat = self._store.add(self._key("hb", r), 0)
                    if beat != last_seen[r][0]:
                        last_seen[r] = (beat, now)
                    elif now - last_seen[r][1] > self.timeout_s:
                        return self._fail(f"DWDP peer rank {r} sent no heartbeat for {self.timeout_s:.0f} s: "
                                          "it died or hangs; this group cannot continue")
                self._stop.wait(self.interval_s)
        except Exception as e:  # the store lives on rank 0: losing it means rank 0 is gone
            if not self._stop.is_set():
                self._fail(f"lost the DWDP rendezvous store ({e}); rank {self.ctx.group.global_ranks[0]} "
                           "or the launcher died")

    def _fail(self, msg: str) -> None:
        self.failure = msg
        print(f"[dwdp rank {self.ctx.rank}] error: {msg}", file=sys.stderr, flush=True)
        _thread.interrupt_main()
        if self.hard_exit:
            if not self._stop.wait(self.grace_s):
                print(f"[dwdp rank {self.ctx.rank}] exiting: main thread did not stop within {self.grace_s:.0f} s",
                      file=sys.stderr, flush=True)
                from .transport import release_owned_segments

                release_owned_segments()  # a hard exit runs no clean-up of its own
                os._exit(17)

    def check(self) -> None:
        if self.failure:
            raise PeerFailure(self.failure)

    def stop(self) -> None:
        """Normal end: tell peers we are done (not dead), stop beating."""
        try:
            self._store.add(self._key("done", self.ctx.rank), 1)
        except Exception:
            pass
        self._stop.set()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def group_session(ctx: DWDPContext, peer_timeout_s: float):
    """A rank's working life in its group: a watchdog while inside; a peer failure (the
    watchdog interrupts the main thread) surfaces as :class:`PeerFailure`; on a clean exit
    every rank meets at a barrier (rank 0's store must outlive the others) and leaves."""
    watchdog = PeerWatchdog(ctx, peer_timeout_s)
    try:
        yield watchdog
    except KeyboardInterrupt:
        raise PeerFailure(watchdog.failure or "interrupted") from None
    finally:
        watchdog.stop()
    dist.barrier()
    dist.destroy_process_group()
