"""A group of rank processes the server drives through queues: the prefill group
(:mod:`.disagg`) and the expert-parallel decode group (:mod:`.decode_pool`).

Parent side, :class:`RankProcesses`: spawn ``world_size`` processes around a rendezvous
store the parent keeps open, one inbox queue per rank and one shared outbox, and wait
until every rank has reported ``("ready", rank, value)`` (or fail with the reason a rank
gave, or the exit code of the one that died). Rank side, :func:`rank_process` and
:func:`leave_group`: the set-up, the error report the parent waits for, and the
orderly exit. A group that is killed or closed leaves no shared-memory segment behind
(see :mod:`dwdp.parallel.launch`). :class:`GroupRestarter`: a failed group rebuilt in the
background, with back-off and a bounded number of attempts (both groups' supervisors use it).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import threading
import time


class GroupRestarter:
    """Rebuild a rank group with ``factory()`` in a background thread, waiting 0.5, 1, 2 ...
    s (at most 30) before attempt k: a rank that dies at start-up tends to die again.
    At most ``max_attempts`` attempts over the restarter's life."""

    def __init__(self, factory, max_attempts: int, what: str):
        self.factory, self.max_attempts, self.what = factory, max_attempts, what
        self.attempts = 0
        self.closing = False
        self._thread: threading.Thread | None = None
        self._result: tuple[object | None, str | None] | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> bool:
        """Begin the next attempt; False when they are used up (or closing)."""
        if self.closing or self.attempts >= self.max_attempts:
            return False
        self.attempts += 1
        delay = min(30.0, 0.5 * 2 ** (self.attempts - 1))

        def attempt():
            time.sleep(delay)
            try:
                group = self.factory()
            except Exception as e:  # noqa: BLE001
                self._result = (None, f"{type(e).__name__}: {e}")
                return
            if self.closing:  # the server stopped meanwhile
                group.close()
                group = None
            self._result = (group, None)

        self._result = None
        self._thread = threading.Thread(target=attempt, name=f"dwdp-{self.what}-restart", daemon=True)
        self._thread.start()
        return True

    def poll(self) -> tuple[object | None, str | None] | None:
        """None while idle or still trying; else (the new group, None) or (None, why it failed)."""
        if self._thread is None or self._thread.is_alive():
            return None
        self._thread = None
        return self._result or (None, "the restart thread ended without a result")

    def close(self, timeout_s: float = 60.0) -> None:
        self.closing = True
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            group, _ = self._result or (None, None)
            if group is not None:
                group.close()


class RankProcesses:
    def __init__(self, target, spec, world_size: int, what: str, ready_timeout_s: float = 300.0):
        """Start ``target(rank, port, run_id, spec, inq, outq)`` in ``world_size`` processes;
        ``what`` names the group in errors ("prefill", "decode")."""
        if world_size < 1:
            raise ValueError(f"the {what} group needs at least one rank")
        from ..parallel.launch import LocalRendezvous

        self.what = what
        ctx = mp.get_context("spawn")
        self._rendezvous = LocalRendezvous(ready_timeout_s)  # kept open while the group lives
        port, run_id = self._rendezvous.port, self._rendezvous.run_id
        self.inqs = [ctx.Queue() for _ in range(world_size)]
        self.outq = ctx.Queue()
        self.procs = [ctx.Process(target=target, args=(r, port, run_id, spec, self.inqs[r], self.outq), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()
        self.ready: dict[int, object] = {}  # each rank's value in its "ready" message
        deadline = time.monotonic() + ready_timeout_s
        while len(self.ready) < world_size:
            try:
                kind, rank, val = self.outq.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline or self.dead():
                    self.close()
                    raise RuntimeError(f"{what} group did not start: {self.dead() or 'timed out'}")
                continue
            if kind == "error":
                self.close()
                raise RuntimeError(f"{what} rank {rank} failed to start: {val}")
            self.ready[rank] = val

    def dead(self, wait_s: float = 0.0) -> str | None:
        """Which ranks have exited; ``wait_s``: wait that long for one to (a peer's error
        arrived: the rank that caused it is usually exiting, and it is the one to name)."""
        if wait_s > 0 and all(p.is_alive() for p in self.procs):
            from multiprocessing.connection import wait

            wait([p.sentinel for p in self.procs], timeout=wait_s)
        gone = [f"{self.what} rank {r} exited (code {p.exitcode})" for r, p in enumerate(self.procs)
                if not p.is_alive()]
        return "; ".join(gone) or None

    def kill(self) -> None:
        """End every rank now (a broken group: survivors may be blocked on the dead peer)."""
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
        self._rendezvous.remove_segments()  # what a rank killed while allocating left

    def close(self, timeout_s: float = 10.0) -> None:
        """Tell every rank to finish (``None`` in its inbox), kill what is still up at the deadline."""
        for q in self.inqs:
            q.put(None)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        self._rendezvous.remove_segments()


@contextlib.contextmanager
def rank_process(rank: int, world_size: int, port: int, run_id: str, outq):
    """Set up a rank process (the server process counts as one more CPU user); any failure
    inside is reported on ``outq`` as ``("error", rank, reason)`` and ends the process."""
    from ..parallel.launch import setup_rank_process

    setup_rank_process(rank, world_size, port, run_id, cpu_share=world_size + 1)
    try:
        yield
    except BaseException as e:
        from ..parallel.transport import release_owned_segments

        release_owned_segments()
        outq.put(("error", rank, f"{type(e).__name__}: {e}"))
        raise SystemExit(1)


def leave_group(watchdog, built_rank) -> None:
    """The orderly exit: stop the peer watchdog, release the rank, leave the process group."""
    import torch.distributed as dist

    if watchdog is not None:
        watchdog.stop()
    built_rank.close()
    dist.barrier()
    dist.destroy_process_group()
