"""One-sided access to peers' expert storage.

Each rank allocates its resident experts in memory that its group peers can map; after
setup a rank reads a peer's experts with a plain local copy and the owner does nothing.

* CUDA: PyTorch symmetric memory. ``get_buffer(peer, ...)`` returns a tensor on *our*
  device that maps the peer's allocation over NVLink, so ``dst.copy_(view)`` on our copy
  stream is a copy-engine pull (not a copy from a ``cuda:<peer>`` tensor rebuilt from an
  IPC handle, which would involve the peer device's streams).
* CPU: a file in /dev/shm per rank, mapped shared by its peers; unlinked as soon as every
  peer has mapped it, so nothing is left behind even if a process is killed.
"""

from __future__ import annotations

import os
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
        self.shape, self.dtype, self.group = shape, dtype, group
        numel = 1
        for s in shape:
            numel *= s
        self.numel = numel
        token = [uuid.uuid4().hex if group.group_rank == 0 else None]
        dist.broadcast_object_list(token, src=group.global_ranks[0], group=group.process_group)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        base = shm or os.environ.get("TMPDIR", "/tmp")
        self.paths = [os.path.join(base, f"dwdp-{token[0]}-{r}") for r in range(group.group_size)]
        path = self.paths[group.group_rank]
        self.local = torch.from_file(path, shared=True, size=max(numel, 1), dtype=dtype)[:numel].view(shape)

    def connect(self) -> PeerMemory:
        g = self.group
        dist.barrier(group=g.process_group)  # every peer's file exists and is filled
        peers = {}
        for q in range(g.group_size):
            if q != g.group_rank:
                t = torch.from_file(self.paths[q], shared=True, size=max(self.numel, 1), dtype=self.dtype)
                peers[q] = t[:self.numel].view(self.shape)
        dist.barrier(group=g.process_group)  # every peer has mapped ours: the name can go
        os.unlink(self.paths[g.group_rank])
        return PeerMemory(self.local, peers)


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
