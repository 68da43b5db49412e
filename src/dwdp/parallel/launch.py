"""Running DWDP groups: the per-rank worker, a local process spawner, and the CLI glue.

Under torchrun every process calls :func:`dwdp_worker` itself (``dwdp run --group-size N``
detects the torchrun environment); otherwise ``dwdp run --group-size N`` spawns the
local processes. Each rank runs its own requests (round-robin share of the prompts).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch


@dataclass
class DWDPRunSpec:
    model: str
    num_layers: int | None = None
    dtype: str | None = None
    device: str = "cpu"  # "cpu" or "cuda" (each rank takes cuda:LOCAL_RANK)
    group_size: int = 2
    local_experts: int | None = None
    seed: int = 0
    max_num_tokens: int = 8192
    peer_timeout_s: float = 60.0
    slice_mb: float | None = None
    prompts: list[list[int]] = field(default_factory=list)


def dwdp_worker(spec: DWDPRunSpec, after_setup: Callable | None = None) -> dict[str, Any]:
    """One rank: join the group, load its share of experts, prefill its own prompts."""
    from ..checkpoint import load_checkpoint
    from ..cli import DTYPES
    from ..engine import PrefillEngine, Request
    from ..models import build_model, init_random
    from ..presets import resolve_model
    from .dwdp import apply_dwdp
    from .group import check_agreement, fingerprint_checkpoint, group_session, init_dwdp_groups
    from .placement import Placement

    ctx = init_dwdp_groups(spec.group_size, spec.device, timeout_s=max(spec.peer_timeout_s, 30.0))
    with group_session(ctx, spec.peer_timeout_s) as watchdog:
        cfg, ckpt = resolve_model(spec.model, spec.num_layers)
        placement = Placement.create(cfg.num_experts, spec.group_size, spec.local_experts)
        dtype = DTYPES[spec.dtype] if spec.dtype else (torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
        check_agreement(ctx, {"model config": cfg.to_dict(), "placement": placement.describe(),
                              "checkpoint": fingerprint_checkpoint(str(ckpt) if ckpt else None),
                              "dtype": str(dtype), "seed": spec.seed if ckpt is None else None})
        mine = placement.local_range(ctx.group_rank)
        model = build_model(cfg, dtype, ctx.device, expert_shard=lambda layer: (mine.start, len(mine)))
        if ckpt is not None:
            load_checkpoint(model, ckpt)
        else:
            init_random(model, spec.seed)
        rt = apply_dwdp(model, ctx, placement, copy_timeout_s=spec.peer_timeout_s,
                        slice_bytes=int(spec.slice_mb * 2**20) if spec.slice_mb else None)
        if after_setup is not None:
            after_setup(ctx, model, rt)
        my_prompts = [(i, p) for i, p in enumerate(spec.prompts) if i % ctx.world_size == ctx.rank]
        engine = PrefillEngine(model, spec.max_num_tokens, keep_kv=False)
        t0 = time.perf_counter()
        results = engine.run([Request(i, p) for i, p in my_prompts])
        wall = time.perf_counter() - t0
        watchdog.check()
        out = {
            "rank": ctx.rank, "group": ctx.group_index, "group_rank": ctx.group_rank,
            "placement": placement.describe(), "local_experts": [mine.start, mine.stop],
            "results": [{"id": r.id, "prompt_len": r.prompt_len, "next_token": r.next_token,
                         "logits": r.logits.cpu().numpy()} for r in results],
            "steps": [asdict(s) for s in engine.steps],
            "dwdp_steps": [{"exposed_wait_s": s.exposed_wait_s, "pulled_bytes": s.pulled_bytes,
                            "pull_gbps": s.pull_gbps} for s in rt.step_stats],
            "memory": rt.memory_bytes(), "wall_s": wall,
        }
        rt.close()
    return out


# ------------------------------------------------------------------------------ spawning
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, run_id, fn, args, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DWDP_RUN_ID=run_id)
    for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(k, "0" if k == "NCCL_NVLS_ENABLE" else "1")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # Results travel pickled through a pipe: keep them free of torch tensors (torch would
    # share their storage by file descriptor, which dies with this process).
    try:
        q.put((rank, "ok", fn(*args)))
    except BaseException as e:
        report = (rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        for _ in range(3):  # a peer watchdog's pending interrupt can land inside put(): report anyway
            try:
                q.put(report)
                break
            except KeyboardInterrupt:
                continue
        raise SystemExit(1)


class SpawnError(RuntimeError):
    pass


def spawn_local(fn: Callable, world: int, args: tuple = (), timeout_s: float = 600.0,
                failure_grace_s: float = 15.0) -> list[Any]:
    """Run ``fn(*args)`` in ``world`` fresh processes forming one torch.distributed world;
    returns their results by rank. Raises :class:`SpawnError` naming each failed rank.
    Once one rank fails, the rest get ``failure_grace_s`` to finish before being killed."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    procs = [ctx.Process(target=_entry, args=(r, world, port, run_id, fn, args, q), daemon=False)
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
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    errors = []
    for r in range(world):
        if r not in results:
            code = procs[r].exitcode
            errors.append(f"rank {r}: " + ("killed: no result in time" if code is not None and code < 0
                                           else f"exited with code {code} and no result"))
        elif results[r][0] == "error":
            errors.append(f"rank {r}: {results[r][1]}")
    if errors:
        raise SpawnError("\n".join(errors))
    return [results[r][1] for r in range(world)]


# ------------------------------------------------------------------------------ CLI
def run_dwdp_from_cli(args, prompts: list[list[int]]) -> list[dict]:
    spec = DWDPRunSpec(model=args.model, num_layers=args.num_layers, dtype=args.dtype,
                       device="cuda" if args.device.startswith("cuda") else "cpu", group_size=args.group_size,
                       local_experts=args.local_experts, seed=args.seed, max_num_tokens=args.max_num_tokens,
                       peer_timeout_s=args.peer_timeout, slice_mb=args.slice_mb, prompts=prompts)
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        return [dwdp_worker(spec)]
    world = args.world_size or args.group_size
    return spawn_local(dwdp_worker, world, (spec,), timeout_s=args.timeout)
