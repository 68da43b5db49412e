"""Starting ranks: the process setup every rank shares, a local spawner, and ``dwdp run -N``.

Under torchrun every process is one rank and calls :func:`prefill_worker` itself
(``dwdp run -N`` detects the torchrun environment); otherwise ``dwdp run -N`` spawns the
local processes with :func:`spawn_local`. The spawner hosts the group's rendezvous store
in the parent on a port the OS picks and keeps open (as torchrun's agent does), so
groups started back to back, or at the same time, never race for a port.

Nothing outlives a failed group: the spawner kills its ranks when one fails or when it is
interrupted, then removes the shared-memory segments its run left (their names carry its
pid and the run's id, see :mod:`.transport`); a rank whose launcher was killed outright
(SIGKILL: no clean-up in the launcher) notices within half a second, removes the
segments it created and exits.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch

from .rank import RankSpec

# NVLink multicast stays off on every multi-GPU run: it is not needed and has harmed shared machines.
NVLINK_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class LocalRendezvous:
    """A TCPStore hosted by the launching process for the ranks it spawns."""

    def __init__(self, timeout_s: float = 300.0):
        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout_s))
        self.port = self.store.port
        self.run_id = uuid.uuid4().hex[:8]

    def remove_segments(self) -> int:
        """Unlink the shared-memory segments this run's ranks left; call once they are gone."""
        from .transport import remove_run_segments

        return remove_run_segments(os.getpid(), self.run_id)


def setup_rank_process(rank: int, world: int, port: int, run_id: str, cpu_share: int | None = None) -> None:
    """Environment of a spawned rank: env:// rendezvous at the parent's store (every rank a
    client, as under torchrun's agent), NVLink multicast off, and an even share of the CPU
    cores for intra-op threads (``cpu_share`` processes share the machine; default ``world``)."""
    launcher = os.getppid()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DWDP_RUN_ID=run_id, DWDP_LAUNCHER_PID=str(launcher),
                      TORCHELASTIC_USE_AGENT_STORE="True")
    for k, v in NVLINK_SAFE_ENV.items():
        os.environ.setdefault(k, v)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (cpu_share or world)))
    watch_launcher(launcher, rank)


def watch_launcher(launcher_pid: int, rank: int, interval_s: float = 0.5) -> threading.Thread:
    """End this rank once its launcher is gone (it was reparented): nobody is left to take
    its result or to clean up after it, so it removes the segments it created itself. A
    thread that polls the parent pid, not PR_SET_PDEATHSIG: that signal fires when the
    launching *thread* ends, and pools are restarted from short-lived threads."""
    def watch():
        while os.getppid() == launcher_pid:
            time.sleep(interval_s)
        from .transport import release_owned_segments

        release_owned_segments()
        print(f"[dwdp rank {rank}] exiting: the launching process (pid {launcher_pid}) is gone",
              file=sys.stderr, flush=True)
        os._exit(1)

    t = threading.Thread(target=watch, name="dwdp-launcher-watch", daemon=True)
    t.start()
    return t


def _entry(rank, world, port, run_id, fn, args, q):
    setup_rank_process(rank, world, port, run_id)
    # Results travel pickled through a pipe: keep them free of torch tensors (torch would
    # share their storage by file descriptor, which dies with this process).
    try:
        q.put((rank, "ok", fn(*args)))
    except BaseException as e:
        from .transport import release_owned_segments

        release_owned_segments()
        report = (rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        for _ in range(3):  # a peer watchdog's pending interrupt can land inside put(): report anyway
            try:
                q.put(report)
                break
            except KeyboardInterrupt:
                continue
        raise SystemExit(1)


class SpawnError(RuntimeError):
    """One or more spawned ranks failed; ``errors`` maps rank -> its report."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        super().__init__("\n".join(f"rank {r}: {m}" for r, m in sorted(errors.items())))

    def summary(self) -> str:
        """One line per distinct failure (the same error on every rank is said once),
        without tracebacks: what a user needs to read."""
        by_msg: dict[str, list[int]] = {}
        for r, m in sorted(self.errors.items()):
            by_msg.setdefault(m.split("\n", 1)[0], []).append(r)
        return "\n".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {m}"
                         for m, rs in by_msg.items())


def spawn_local(fn: Callable, world: int, args: tuple = (), timeout_s: float = 600.0,
                failure_grace_s: float = 15.0) -> list[Any]:
    """Run ``fn(*args)`` in ``world`` fresh processes forming one torch.distributed world;
    returns their results by rank. Raises :class:`SpawnError` naming each failed rank.
    Once one rank fails, the rest get ``failure_grace_s`` to finish before being killed."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rdv = LocalRendezvous(timeout_s)
    procs = [ctx.Process(target=_entry, args=(r, world, rdv.port, rdv.run_id, fn, args, q), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, status, value = q.get(timeout=0.2)
                results[rank] = (status, value)
                if status == "error":  # the others get a short grace, then are killed
                    deadline = min(deadline, time.monotonic() + failure_grace_s)
            except Exception:  # queue empty: stop once every process has exited
                if all(p.exitcode is not None for p in procs):
                    break
                if any(p.exitcode not in (None, 0) and r not in results for r, p in enumerate(procs)):
                    deadline = min(deadline, time.monotonic() + failure_grace_s)  # died without a word
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
    finally:  # also when interrupted: no rank outlives the spawner, no segment outlives its ranks
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        rdv.remove_segments()
    errors = {}
    for r in range(world):
        if r not in results:
            code = procs[r].exitcode
            errors[r] = ("killed: no result in time" if code is not None and code < 0
                         else f"exited with code {code} and no result")
        elif results[r][0] == "error":
            errors[r] = results[r][1]
    if errors:
        raise SpawnError(errors)
    return [results[r][1] for r in range(world)]


# ------------------------------------------------------------------------------ dwdp run -N
@dataclass
class PrefillRun:
    """``dwdp run -N``: a rank spec and the prompts the world's ranks share round-robin."""

    rank: RankSpec
    prompts: list[list[int]] = field(default_factory=list)


def prefill_worker(run: PrefillRun) -> dict[str, Any]:
    """One rank: join its group, build its share, prefill its own prompts, report."""
    from ..engine import ArrivalSource, PrefillEngine, Request, StepDriver
    from .group import group_session, init_dwdp_groups, lockstep_sync
    from .rank import build_rank

    spec = run.rank
    ctx = init_dwdp_groups(spec.group_size, spec.device, timeout_s=max(spec.peer_timeout_s, 30.0))
    with group_session(ctx, spec.peer_timeout_s) as watchdog:
        rank = build_rank(spec, ctx)
        my_prompts = [(i, p) for i, p in enumerate(run.prompts) if i % ctx.world_size == ctx.rank]
        engine = PrefillEngine(rank.model, spec.max_num_tokens, keep_kv=False)
        driver = StepDriver(engine, ArrivalSource([Request(i, p) for i, p in my_prompts], engine.validate),
                            sync=lockstep_sync(ctx) if rank.strategy.lockstep else None)
        t0 = time.perf_counter()
        results = driver.run()
        wall = time.perf_counter() - t0
        watchdog.check()
        shard = rank.plan.expert_shard
        out = {
            "rank": ctx.rank, "group": ctx.group_index, "group_rank": ctx.group_rank, "plan": rank.plan.label,
            "local_experts": [shard[0], shard[0] + shard[1]] if shard else [0, rank.cfg.num_experts],
            "results": [{"id": r.id, "prompt_len": r.prompt_len, "next_token": r.next_token,
                         "logits": r.logits.cpu().numpy()} for r in results],
            "steps": [asdict(s) for s in engine.steps],
            "runtime": rank.strategy.step_report(rank.runtime),
            "memory": rank.runtime.memory_bytes(), "wall_s": wall,
            "node": int(os.environ.get("GROUP_RANK", 0)),  # torchrun's node rank (0 when spawned locally)
        }
        rank.close()
    return out


def run_prefill_group(run: PrefillRun, world_size: int | None = None, timeout_s: float = 1800.0) -> list[dict]:
    """Under torchrun: this process's rank. Otherwise spawn ``world_size`` (default: one
    group) local ranks. The plan is checked here first, so an impossible placement or an
    unknown model fails once, before any process starts."""
    from .rank import plan_group

    plan_group(run.rank)
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        return [prefill_worker(run)]
    return spawn_local(prefill_worker, world_size or run.rank.group_size, (run,), timeout_s=timeout_s)
