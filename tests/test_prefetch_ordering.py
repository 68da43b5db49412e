"""Write-after-read ordering of the double-buffered prefetcher.

On a GPU the host runs ahead of the device: the refill of a slot for layer m+2 is issued
while the MoE of layer m may still be reading that slot. Here a reader thread plays the
still-running MoE kernels, and ``compute_signal`` fires only when it finishes (as a CUDA
event recorded after those kernels would). The refill must not touch the slot before
that; with the write-after-read wait removed it does, and the reader sees the wrong
layer's weights. (On a CPU the model's own compute is synchronous, so only this test and
the GPU one can exercise the race; read-after-write is exercised end to end in
test_dwdp.py.)
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dwdp.parallel.copy_engine import CpuCopyEngine, _CpuSignal
from dwdp.parallel.hooks import RuntimeHooks
from dwdp.parallel.prefetch import SlotPrefetcher


class AsyncComputeEngine(CpuCopyEngine):
    """CPU copy engine whose compute signals fire when the test says the compute is done."""

    def __init__(self):
        super().__init__(timeout_s=10)
        self.pending_compute: list[_CpuSignal] = []

    def compute_signal(self):
        sig = _CpuSignal()
        self.pending_compute.append(sig)
        return sig


class _Hooks(RuntimeHooks):
    def __init__(self, skip_war: bool):
        self.skip_war_wait = skip_war


@pytest.mark.parametrize("skip_war", [False, True])
def test_refill_waits_for_the_slots_last_reader(skip_war):
    layers = [torch.full((4, 4096), float(layer)) for layer in range(3)]
    slots = [torch.full((4, 4096), -1.0), torch.full((4, 4096), -1.0)]
    engine = AsyncComputeEngine()
    pre = SlotPrefetcher(engine, slots, [[[(slots[m % 2], layers[m])]] for m in range(3)], _Hooks(skip_war))

    pre.prefetch(0)
    slot = pre.acquire(0)  # read-after-write: layer 0 has landed
    assert torch.equal(slot, layers[0])
    seen: list[float] = []

    def moe_of_layer_0():  # reads the slot over ~100 ms, like queued kernels
        for _ in range(20):
            seen.append(float(slot.max()))
            time.sleep(0.005)
        engine.pending_compute[0].event.set()  # "the kernels finished"

    reader = threading.Thread(target=moe_of_layer_0)
    reader.start()
    pre.release(0)  # recorded after the reading compute was issued
    pre.prefetch(1)
    pre.prefetch(2)  # refills slot 0 while layer 0's MoE may still run
    reader.join()
    pre.acquire(2)
    engine.close()
    assert torch.equal(slots[0], layers[2])  # the refill did happen in the end
    corrupted = any(v != 0.0 for v in seen)
    if skip_war:
        assert corrupted, "without the write-after-read wait the reader should have seen layer 2"
    else:
        assert not corrupted, f"the refill overwrote the slot while it was being read: {seen}"


def test_parts_of_a_layer_are_acquired_separately():
    """Local-first per peer: the MoE may start on the first peer's experts while the
    second peer's block is still in flight; acquiring every part waits for all."""
    gate = threading.Event()
    calls = []

    def delay():  # the second copy (the second peer's block) stalls until the gate opens
        calls.append(1)
        if len(calls) == 2:
            assert gate.wait(10), "test gate never opened"
        return 0.0

    engine = CpuCopyEngine(timeout_s=10, copy_delay=delay)
    src = [torch.full((2, 8), 1.0), torch.full((2, 8), 2.0)]
    slots = [torch.zeros(4, 8), torch.zeros(4, 8)]
    parts = [[(slots[0][0:2], src[0])], [(slots[0][2:4], src[1])]]
    pre = SlotPrefetcher(engine, slots, [parts])
    pre.prefetch(0)
    slot = pre.acquire(0, part=0)  # must not wait for part 1 (it cannot land yet)
    assert torch.equal(slot[0:2], src[0])
    assert not torch.equal(slot[2:4], src[1])
    gate.set()
    pre.acquire(0)  # every part
    assert torch.equal(slot[2:4], src[1])
    assert len(pre.take_stats().pulls) == 2
    engine.close()
