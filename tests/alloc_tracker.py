"""Peak bytes of tensor storage allocated by torch ops, on any device (CPU included,
where torch keeps no peak counter).

A ``TorchDispatchMode`` sees every aten op. A storage counts as *allocated* when an op
returns a tensor whose storage is not one of the op's inputs' (so views, in-place ops
and ``set_`` onto an existing storage, e.g. a memory-mapped safetensors file, are not
allocations). Each allocated storage is held by a weak reference; when it expires the
bytes are released. The live total is re-evaluated after every op, which is when a peak
can occur (memory only grows inside an op). This is what a device's caching allocator
would be asked for, independent of page faults, RSS noise or the allocator's caching.

Not seen: tensors created before the mode is entered (the baseline), kernel-internal
scratch that never becomes a tensor, and file-backed storages (mmap).
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(obj) -> list[torch.UntypedStorage]:
    out = []
    for x in tree_flatten(obj)[0]:
        if isinstance(x, torch.Tensor):
            out.append(x.untyped_storage())
        elif isinstance(x, torch.UntypedStorage):
            out.append(x)
        elif isinstance(x, torch.TypedStorage):
            out.append(x.untyped_storage)
    return out


class AllocTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage cdata -> (weak ref, bytes)
        self.live_bytes = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.live_bytes -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {StorageWeakRef(s).cdata for s in _storages((args, kwargs))}
        out = func(*args, **kwargs)
        self._sweep()
        for s in _storages(out):
            if s.device.type == "meta":
                continue
            ref = StorageWeakRef(s)
            if ref.cdata in inputs or ref.cdata in self.live:
                continue
            self.live[ref.cdata] = (ref, s.nbytes())
            self.live_bytes += s.nbytes()
        self.peak = max(self.peak, self.live_bytes)
        return out

    def current(self) -> int:
        self._sweep()
        return self.live_bytes
