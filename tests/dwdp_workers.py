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
from dwdp.parallel.pacing import PullRates
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
                    slice_bytes: int | None = None, pacing: str = "off", short_steps: str = "pull",
                    ship_max_tokens: int = 2048, peer_timeout_s: float = 30.0):
    """The same build_rank every entry point uses, at fp32 on CPU."""
    spec = RankSpec(model=model_spec, strategy="dwdp", group_size=ctx.group_size,
                    dwdp=DWDPConfig(local_experts=local, slice_mb=slice_bytes / 2**20 if slice_bytes else None),
                    pull_pacing=pacing,
                    short_steps=short_steps, ship_max_tokens=ship_max_tokens, peer_timeout_s=peer_timeout_s)
    rank = build_rank(spec, ctx, hooks)
    if pacing == "jit":  # tiny steps: learn from every step, and cut pulls into several slices
        rank.runtime.rates = PullRates(min_tokens=1, slice_bytes=4096)
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
    pacing ("jit": paced pulls), count_collectives (return how many torch.distributed calls the steps made),
    short_steps / ship_max_tokens (token shipping), rotate (rank r runs the batches starting at r % len).
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
            model, rt = build_dwdp_rank(ctx, spec, local, hooks, opts.get("slice_bytes"), opts.get("pacing", "off"),
                                        opts.get("short_steps", "pull"), opts.get("ship_max_tokens", 2048))
            k = ctx.group_rank % len(batches) if opts.get("rotate") else 0
            run_batches = batches[k:] + batches[:k]
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
                logits = [model(PackedBatch.from_sequences(b)).logits.numpy() for b in run_batches]
            finally:
                for name, fn in originals.items():
                    setattr(dist, name, fn)
            out.append({"logits": logits, "stats": [(s.exposed_wait_s, s.pulled_bytes) for s in rt.step_stats],
                        "shipped_bytes": [s.shipped_bytes for s in rt.step_stats],
                        "paced_pulls": [s.paced_pulls for s in rt.step_stats],
                        "break_even_tokens": rt.break_even_tokens()})
            rt.close()
    finally:
        wd.stop()
    dist.barrier()
    dist.destroy_process_group()
    return {"cases": out, "collectives_during_steps": counts}


def shipping_timeout_worker(group_size: int, timeout_s: float):
    """Rank 1 stops serving shipped tokens; rank 0's shipped step must fail with a clear
    TransportTimeout after ``timeout_s`` (not hang). Returns (rank 0) the error and seconds."""
    torch.set_num_threads(1)
    ctx = init_dwdp_groups(group_size, "cpu", timeout_s=60)
    model, rt = build_dwdp_rank(ctx, "tiny-qwen3-moe", None, short_steps="ship", peer_timeout_s=timeout_s)
    result = None
    if ctx.group_rank == 1:
        rt.shipper.close()
    dist.barrier()
    if ctx.group_rank == 0:
        t0 = time.monotonic()
        try:
            model(PackedBatch.from_sequences([[1, 2, 3, 4]]))
            result = ("no error", time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            result = (f"{type(e).__name__}: {e}", time.monotonic() - t0)
    dist.barrier()
    rt.close()
    dist.destroy_process_group()
    return result


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


def gpu_ship_worker(group_size: int, model_spec: str, lengths: list[int], cap: int) -> dict:
    """GPU: the same step pulled and shipped (bf16), a step over the cap (pulls), then rank 1
    stops serving and rank 0's shipped step must raise a timeout. Returns errors and flags."""
    os.environ["DWDP_EXPERIMENTAL_SHIPPING"] = "1"
    ctx = init_dwdp_groups(group_size, "cuda", timeout_s=120)
    spec = RankSpec(model=model_spec, strategy="dwdp", device="cuda", group_size=group_size, short_steps="ship",
                    ship_max_tokens=cap, peer_timeout_s=60.0)
    rank = build_rank(spec, ctx)
    model, rt = rank.model, rank.runtime
    g = torch.Generator().manual_seed(ctx.group_rank)
    out = {"rel_err": [], "shipped": []}
    for T in lengths:
        batch = PackedBatch.from_sequences([torch.randint(0, 500, (T,), generator=g).tolist()], ctx.device)
        rt.short_steps = "pull"
        want = model(batch).logits.float()
        rt.short_steps = "ship"
        got = model(batch).logits.float()
        out["rel_err"].append(float((got - want).norm() / want.norm()))
        out["shipped"].append(rt.step_stats[-1].shipped_bytes > 0)
    dist.barrier()
    if ctx.group_rank == 1:  # stops serving (after half a second waiting for rank 0 to close too)
        rt.shipper.timeout_s = 0.5
        rt.shipper.close()
    dist.barrier()
    if ctx.group_rank == 0:
        rt.shipper.timeout_s = 3.0
        t0 = time.monotonic()
        try:
            model(PackedBatch.from_sequences([[1, 2, 3, 4]], ctx.device))
            out["timeout"] = ("no error", time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            out["timeout"] = (f"{type(e).__name__}: {e}", time.monotonic() - t0)
    dist.barrier()
    rt.shipper.timeout_s = 1.0  # the peers are gone or stopped: do not wait long at close
    rt.close()
    dist.destroy_process_group()
    return out
