"""Double-buffered prefetch of remote experts.

Two slots; MoE layer m uses slot m % 2. Two orderings are enforced with signals:

* read-after-write (RAW): the MoE that reads a slot waits for the copies that filled it
  (:meth:`SlotPrefetcher.acquire`); a layer's copies may come in parts (one per peer),
  each with its own signal, so the MoE can start on the experts that landed first;
* write-after-read (WAR): the copies that refill a slot wait for the MoE that last read
  it (:meth:`SlotPrefetcher.release` records that point *after* the reading compute
  was issued; :meth:`prefetch` makes the copies wait for it).

Hooks (:mod:`dwdp.parallel.hooks`) with ``skip_raw_wait`` / ``skip_war_wait`` drop one wait:
they exist only so the tests can show that each wait is needed (the ordering tests fail
with either set); ``skip_pulls`` is the communication-free diagnostic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .copy_engine import Copy, CopyEngine
from .hooks import NO_HOOKS, RuntimeHooks


@dataclass
class PullStats:
    layer: int
    nbytes: int
    signal: object


@dataclass
class StepStats:
    exposed_wait_s: float = 0.0  # host-measured (CPU); CUDA adds device-measured at step end
    pulls: list[PullStats] = field(default_factory=list)
    # One entry per compute_wait, in call order: the layer and the host-measured seconds
    # (CUDA: 0 here, the device-measured stall comes from the engine's timers, same order).
    waits: list[tuple[int, float]] = field(default_factory=list)


class SlotPrefetcher:
    def __init__(self, engine: CopyEngine, slots: list[torch.Tensor],
                 layer_parts: list[list[list[Copy]]], hooks: RuntimeHooks = NO_HOOKS):
        """``layer_parts[m]``: the copies that fill layer m's slot, in parts issued in order."""
        if len(slots) != 2:
            raise ValueError("double buffering needs exactly two slots")
        self.engine, self.slots, self.layer_parts = engine, slots, layer_parts
        self.skip_raw, self.skip_war, self.skip_pulls = hooks.skip_raw_wait, hooks.skip_war_wait, hooks.skip_pulls
        self._filled: list[tuple[int, list] | None] = [None, None]  # (layer, signal per part) per slot
        self._released: list[object | None] = [None, None]
        self.stats = StepStats()

    @property
    def num_layers(self) -> int:
        return len(self.layer_parts)

    def new_step(self) -> None:
        """Forget which layer each slot holds: every step pulls every layer again (a slot
        could keep its layer only when a model has at most two MoE layers; benchmarks
        on truncated models must not profit from that)."""
        self._filled = [None, None]

    def prefetch(self, layer: int) -> None:
        """Issue the pulls of ``layer`` into its slot, after the slot's last reader."""
        s = layer % 2
        if self.skip_pulls or (self._filled[s] is not None and self._filled[s][0] == layer):
            return  # already issued
        wait = None if self.skip_war else self._released[s]
        sigs = []
        for copies in self.layer_parts[layer]:
            nbytes = sum(d.numel() * d.element_size() for d, _ in copies)
            sig = self.engine.submit(copies, wait_for=wait, nbytes=nbytes)
            sigs.append(sig)
            self.stats.pulls.append(PullStats(layer, nbytes, sig))
        self._filled[s] = (layer, sigs)

    def acquire(self, layer: int, part: int | None = None) -> torch.Tensor:
        """The slot holding ``layer``'s remote experts, once part ``part`` (default: every
        part) has landed."""
        s = layer % 2
        if self.skip_pulls:
            return self.slots[s]
        if self._filled[s] is None or self._filled[s][0] != layer:
            self.prefetch(layer)  # not issued early (first step of a caller that skipped priming)
        if not self.skip_raw:
            sigs = self._filled[s][1]
            for sig in (sigs if part is None else [sigs[part]]):
                waited = self.engine.compute_wait(sig)
                self.stats.exposed_wait_s += waited
                self.stats.waits.append((layer, waited))
        return self.slots[s]

    def release(self, layer: int) -> None:
        """Call after issuing the last compute that reads ``layer``'s slot."""
        self._released[layer % 2] = self.engine.compute_signal()

    def take_stats(self) -> StepStats:
        st, self.stats = self.stats, StepStats()
        return st
