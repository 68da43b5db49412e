"""Double-buffered prefetch of remote experts.

Two slots; MoE layer m uses slot m % 2. Two orderings are enforced with signals:

* read-after-write (RAW): the MoE that reads a slot waits for the copies that filled it
  (:meth:`SlotPrefetcher.acquire`);
* write-after-read (WAR): the copies that refill a slot wait for the MoE that last read
  it (:meth:`SlotPrefetcher.release` records that point *after* the reading compute
  was issued; :meth:`prefetch` makes the copies wait for it).

``unsafe_skip_raw`` / ``unsafe_skip_war`` drop one wait: they exist only so the tests can
show that each wait is needed (the ordering tests fail with either set).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .copy_engine import Copy, CopyEngine


@dataclass
class PullStats:
    layer: int
    nbytes: int
    signal: object


@dataclass
class StepStats:
    exposed_wait_s: float = 0.0  # host-measured (CPU); CUDA adds device-measured at step end
    pulls: list[PullStats] = field(default_factory=list)


class SlotPrefetcher:
    def __init__(self, engine: CopyEngine, slots: list[torch.Tensor],
                 layer_copies: list[list[Copy]], unsafe_skip_raw: bool = False, unsafe_skip_war: bool = False):
        if len(slots) != 2:
            raise ValueError("double buffering needs exactly two slots")
        self.engine, self.slots, self.layer_copies = engine, slots, layer_copies
        self.skip_raw, self.skip_war = unsafe_skip_raw, unsafe_skip_war
        # Benchmarks only: no pulls at all (outputs are wrong) = the communication-free limit.
        self.benchmark_skip_pulls = False
        self._filled: list[tuple[int, object] | None] = [None, None]  # (layer, signal) per slot
        self._released: list[object | None] = [None, None]
        self.stats = StepStats()

    @property
    def num_layers(self) -> int:
        return len(self.layer_copies)

    def new_step(self) -> None:
        """Forget which layer each slot holds: every step pulls every layer again (a slot
        could keep its layer only when a model has at most two MoE layers; benchmarks
        on truncated models must not profit from that)."""
        self._filled = [None, None]

    def prefetch(self, layer: int) -> None:
        """Issue the pulls of ``layer`` into its slot, after the slot's last reader."""
        s = layer % 2
        if self.benchmark_skip_pulls or (self._filled[s] is not None and self._filled[s][0] == layer):
            return  # already issued
        wait = None if self.skip_war else self._released[s]
        copies = self.layer_copies[layer]
        nbytes = sum(d.numel() * d.element_size() for d, _ in copies)
        sig = self.engine.submit(copies, wait_for=wait, nbytes=nbytes)
        self._filled[s] = (layer, sig)
        self.stats.pulls.append(PullStats(layer, nbytes, sig))

    def acquire(self, layer: int) -> torch.Tensor:
        """The slot holding ``layer``'s remote experts, once they have landed."""
        s = layer % 2
        if self.benchmark_skip_pulls:
            return self.slots[s]
        if self._filled[s] is None or self._filled[s][0] != layer:
            self.prefetch(layer)  # not issued early (first step of a caller that skipped priming)
        if not self.skip_raw:
            self.stats.exposed_wait_s += self.engine.compute_wait(self._filled[s][1])
        return self.slots[s]

    def release(self, layer: int) -> None:
        """Call after issuing the last compute that reads ``layer``'s slot."""
        self._released[layer % 2] = self.engine.compute_signal()

    def take_stats(self) -> StepStats:
        st, self.stats = self.stats, StepStats()
        return st
