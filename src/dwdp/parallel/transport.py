"""One-sided access to peers' expert storage.

Each rank allocates its resident experts in memory that its group peers can map; after
setup a rank reads a peer's experts with a plain local copy and the owner does nothing.

* CUDA: PyTorch symmetric memory. ``get_buffer(peer, ...)`` returns a tensor on *our*
  device that maps the peer's allocation over NVLink, so ``dst.copy_(view)`` on our copy
  stream is a copy-engine pull (not a copy from a ``cuda:<peer>`` tensor rebuilt from an
  IPC handle, which would involve the peer device's streams).
* CPU: a file in /dev/shm per rank, mapped shared by its peers. Peers map it as soon as it
  exists (before it is filled) and it is unlinked right then: the memory lives as long as a
  mapping does and no name outlives the allocation, whatever happens later (a rank that
  raises or is killed while loading its weights). Inside that short window a name can be
  left by a rank that dies; names carry the launcher's pid and the run's id
  (``dwdp-<pid>-<run>-...``), so the launcher removes its run's (:func:`remove_run_segments`)
  once the ranks are gone, and a rank whose launcher died removes its own
  (:func:`release_owned_segments`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class GroupHandle:
    """The DWDP group as transport sees it."""

    group_rank: int
    group_size: int
    process_group: object  # torch.distributed ProcessGroup (setup only)
    global_ranks: list[int]


SEGMENT_PREFIX = "dwdp-"
_owned: set[str] = set()  # segments this process created and has not unlinked yet


def segment_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")


def run_tag(launcher_pid: int | None = None, run_id: str | None = None) -> str:
    """``<launcher pid>-<run id>``: what a run's segment names start with (after the prefix).
    In a rank: the launcher that spawned it (``DWDP_LAUNCHER_PID``, ``DWDP_RUN_ID``, as
    :func:`~dwdp.parallel.launch.setup_rank_process` sets them; under torchrun: the agent
    and its run id)."""
    pid = launcher_pid or os.environ.get("DWDP_LAUNCHER_PID") or os.getppid()
    run = run_id or os.environ.get("DWDP_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "solo"
    return f"{pid}-{re.sub(r'[^A-Za-z0-9]', '', run)[:16] or 'solo'}"


def run_segments(launcher_pid: int, run_id: str | None = None) -> list[str]:
    """The segments a run (every run of ``launcher_pid`` when ``run_id`` is None) has on disk."""
    tag = run_tag(launcher_pid, run_id) if run_id else f"{launcher_pid}-"
    return sorted(glob.glob(os.path.join(segment_dir(), glob.escape(SEGMENT_PREFIX + tag) + "*")))


def remove_run_segments(launcher_pid: int, run_id: str) -> int:
    """Unlink what a run's ranks left (call once they are gone); returns how many."""
    n = 0
    for path in run_segments(launcher_pid, run_id):
        with contextlib.suppress(FileNotFoundError):  # removed first by the rank or its launcher
            os.unlink(path)
            n += 1
    return n


def release_owned_segments() -> None:
    """Unlink the segments this process created and has not unlinked yet (a failing rank)."""
    for path in list(_owned):
        _release(path)


def _release(path: str) -> None:
    _owned.discard(path)
    with contextlib.suppress(FileNotFoundError):  # removed first by the rank or its launcher
        os.unlink(path)


class PeerMemory:
    """This rank's shared expert storage and read-only views of its peers'."""

    def __init__(self, local: torch.Tensor, peers: dict[int, torch.Tensor], keepalive=None):
        self.local = local
        self._peers = peers
        self._keepalive = keepalive

    def peer(self, q: int) -> torch.Tensor:
        return self._peers[q]

    @staticmethod
    def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, group: GroupHandle):
        """Phase 1 (collective over the group): allocate the local storage. Fill it,
        then call :meth:`PendingPeerMemory.connect`."""
        if device.type == "cuda":
            return _CudaPending(shape, dtype, device, group)
        return _CpuPending(shape, dtype, group)


class _CpuPending:
    def __init__(self, shape, dtype, group: GroupHandle):
        from .faults import fault_point

        self.shape, self.dtype, self.group = shape, dtype, group
        numel = 1
        for s in shape:
            numel *= s
        self.numel = numel
        token = [uuid.uuid4().hex[:12] if group.group_rank == 0 else None]
        dist.broadcast_object_list(token, src=group.global_ranks[0], group=group.process_group)
        name = f"{SEGMENT_PREFIX}{run_tag()}-{token[0]}-"
        paths = [os.path.join(segment_dir(), f"{name}{r}") for r in range(group.group_size)]
        path = paths[group.group_rank]
        _owned.add(path)
        try:
            self.local = torch.from_file(path, shared=True, size=max(numel, 1), dtype=dtype)[:numel].view(shape)
            fault_point("shm-created", group.global_ranks[group.group_rank])
            dist.barrier(group=group.process_group)  # every peer's file exists
            self.peers = {q: torch.from_file(paths[q], shared=True, size=max(numel, 1), dtype=dtype)[:numel].view(shape)
                          for q in range(group.group_size) if q != group.group_rank}
            dist.barrier(group=group.process_group)  # every peer has mapped ours: the name can go
        finally:
            _release(path)

    def connect(self) -> PeerMemory:
        dist.barrier(group=self.group.process_group)  # every peer has filled its storage
        return PeerMemory(self.local, self.peers)


class _CudaPending:
    def __init__(self, shape, dtype, device, group: GroupHandle):
        import torch.distributed._symmetric_memory as symm_mem

        self.symm_mem = symm_mem
        self.shape, self.dtype, self.group = shape, dtype, group
        self.local = symm_mem.empty(shape, dtype=dtype, device=device)

    def connect(self) -> PeerMemory:
        g = self.group
        handle = self.symm_mem.rendezvous(self.local, g.process_group)
        dist.barrier(group=g.process_group)
        peers = {q: handle.get_buffer(q, self.shape, self.dtype) for q in range(g.group_size) if q != g.group_rank}
        return PeerMemory(self.local, peers, keepalive=handle)
