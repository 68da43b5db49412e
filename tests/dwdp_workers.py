"""Functions that run inside spawned DWDP ranks (importable by the child processes)."""

from __future__ import annotations

import os
import random
import signal
import time

import torch
import torch.distributed as dist

from dwdp.batch import PackedBatch
from dwdp.checkpoint import load_checkpoint
from dwdp.models import build_model, init_random
from dwdp.parallel.group import PeerFailure, PeerWatchdog, check_agreement, init_dwdp_groups
from dwdp.parallel.hooks import NO_HOOKS, RuntimeHooks
from dwdp.parallel.pull_rates import PullRates
from dwdp.parallel.rank import build_rank
from dwdp.presets import resolve_model
from dwdp.strategy.spec import DWDPConfig, RankSpec

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_to_all", "all_to_all_single", "barrier",
               "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "send", "recv", "isend", "irecv",
               "gather", "scatter", "all_gather_into_tensor", "reduce_scatter_tensor", "monitored_barrier")


class StressHooks(RuntimeHooks):
    """Random host-side delays before copies and before slot waits; optionally no RAW wait."""

    def __init__(self, rng: random.Random, copy_delay_ms: float = 0.0, compute_delay_ms: float = 0.0,
                 skip_raw_wait: bool = False):
        self.rng, self.copy_ms, self.compute_ms = rng, copy_delay_ms, compute_delay_ms
        self.skip_raw_wait = skip_raw_wait

    def copy_delay_s(self) -> float:
        return self.rng.uniform(0, self.copy_ms) / 1e3

    def before_acquire(self, layer: int, part: int) -> None:
        if self.compute_ms:
            time.sleep(self.rng.uniform(0, self.compute_ms) / 1e3)


def build_dwdp_rank(ctx, model_spec: str, local: int | None, hooks: RuntimeHooks = NO_HOOKS,
                    slice_bytes: int | None = None, peer_timeout_s: float = 30.0):
    """The same build_rank every entry point uses, at fp32 on CPU."""
    spec = RankSpec(model=model_spec, strategy="dwdp", group_size=ctx.group_size,
                    dwdp=DWDPConfig(local_experts=local, slice_mb=slice_bytes / 2**20 if slice_bytes else None),
                    peer_timeout_s=peer_timeout_s)
    rank = build_rank(spec, ctx, hooks)
    rank.runtime.rates = PullRates(min_tokens=1)  # tiny steps: learn the rates from every step
    return rank.model, rank.runtime


def reference_logits(model_spec: str, batches: list[list[list[int]]]) -> list[torch.Tensor]:
    """Single-process reference: every expert resident, same kernels."""
    cfg, ckpt = resolve_model(model_spec)
    model = build_model(cfg, torch.float32, "cpu")
    if ckpt is not None:
        load_checkpoint(model, ckpt)
    else:
        init_random(model, 0)
    return [model(PackedBatch.from_sequences(b)).logits for b in batches]


def logits_worker(group_size: int, cases: list[tuple[str, int | None]], batches, opts: dict | None = None):
    """For each (model, L) case: build a DWDP rank, run every batch as one step, return logits.

    opts: copy_delay_ms / compute_delay_ms (random sleeps up to that), skip_raw_wait, slice_bytes,
    count_collectives (return how many torch.distributed calls the steps made).
    """
    opts = opts or {}
    torch.set_num_threads(1)
    ctx = init_dwdp_groups(group_size, "cpu", timeout_s=60)
    wd = PeerWatchdog(ctx, 30)
    rng = random.Random(1000 + ctx.rank)
    out = []
    counts = {}
    try:
        for spec, local in cases:
            hooks = StressHooks(rng, opts.get("copy_delay_ms", 0.0), opts.get("compute_delay_ms", 0.0),
                                opts.get("skip_raw_wait", False))
            model, rt = build_dwdp_rank(ctx, spec, local, hooks, opts.get("slice_bytes"))
            originals = {}
            if opts.get("count_collectives"):
                for name in COLLECTIVES:
                    if hasattr(dist, name):
                        originals[name] = getattr(dist, name)

                        def counted(*a, _n=name, **k):
                            counts[_n] = counts.get(_n, 0) + 1
                            return originals[_n](*a, **k)

                        setattr(dist, name, counted)
            try:
                logits = [model(PackedBatch.from_sequences(b)).logits.numpy() for b in batches]
            finally:
                for name, fn in originals.items():
                    setattr(dist, name, fn)
            out.append({"logits": logits, "stats": [(s.exposed_wait_s, s.pulled_bytes) for s in rt.step_stats],
                        "break_even_tokens": rt.break_even_tokens()})
            rt.close()
    finally:
        wd.stop()
    dist.barrier()
    dist.destroy_process_group()
    return {"cases": out, "collectives_during_steps": counts}


def failure_worker(group_size: int, mode: str, peer_timeout_s: float):
    """Rank 1 dies (mode='exit') or freezes (mode='stop'); the others keep stepping and must
    fail with PeerFailure, reporting how long detection took."""
    torch.set_num_threads(1)
    ctx = init_dwdp_groups(group_size, "cpu", timeout_s=60)
    wd = PeerWatchdog(ctx, peer_timeout_s, grace_s=3.0)
    model, rt = build_dwdp_rank(ctx, "tiny-qwen3-moe", None)
    if ctx.rank == 1:
        if mode == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 10 * peer_timeout_s + 30:
            model(PackedBatch.from_sequences([[1, 2, 3, 4]]))
            wd.check()
            time.sleep(0.01)
    except KeyboardInterrupt:
        raise PeerFailure(f"{wd.failure} (detected after {time.monotonic() - t0:.1f} s)") from None
    except PeerFailure as e:
        raise PeerFailure(f"{e} (detected after {time.monotonic() - t0:.1f} s)") from None
    return "no failure detected"


def mismatch_worker(group_size: int):
    """Rank 1 uses a different model config: setup must fail naming the difference."""
    ctx = init_dwdp_groups(group_size, "cpu", timeout_s=60)
    cfg, _ = resolve_model("tiny-qwen3-moe", num_layers=4 if ctx.group_rank == 0 else 3)
    check_agreement(ctx, {"model config": cfg.to_dict(), "placement": "same"})
    return "agreed"


def allreduce_worker(group_size: int) -> int:
    """Join a group, sum the ranks over it, leave: a whole rendezvous in miniature."""
    ctx = init_dwdp_groups(group_size, "cpu", timeout_s=60)
    t = torch.tensor([ctx.rank + 1])
    dist.all_reduce(t, group=ctx.group.process_group)
    dist.barrier()
    dist.destroy_process_group()
    return int(t)
