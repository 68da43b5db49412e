"""Functions that run inside spawned DWDP ranks on GPUs (importable by the child processes)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from dwdp.batch import PackedBatch
from dwdp.models import build_model, init_random
from dwdp.parallel.group import init_dwdp_groups
from dwdp.parallel.hooks import RuntimeHooks
from dwdp.parallel.rank import RankSpec, build_rank
from dwdp.presets import resolve_model


class DelayHooks(RuntimeHooks):
    """Device sleeps on the copy stream (before each copy) and after each MoE acquires its
    slot (its reads stay in flight); optionally one of the two prefetch waits dropped."""

    def __init__(self, copy_delay_cycles: int = 0, device_delay: int = 0, skip_raw: bool = False,
                 skip_war: bool = False):
        self.copy_delay_cycles, self.device_delay = copy_delay_cycles, device_delay
        self.skip_raw_wait, self.skip_war_wait = skip_raw, skip_war

    def after_acquire(self, layer, part, x):
        if self.device_delay:
            torch.cuda._sleep(self.device_delay)


VARIANTS = {
    "waits": {},
    "waits_delayed": dict(copy_delay_cycles=20_000_000, device_delay=50_000_000),
    "no_write_after_read_wait": dict(skip_war=True, device_delay=200_000_000),
    "no_read_after_write_wait": dict(skip_raw=True, copy_delay_cycles=50_000_000),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _dwdp_rank(ctx, model: str, layers: int, hooks: RuntimeHooks, expert_dtype: str = "same"):
    spec = RankSpec(model=model, strategy="dwdp", num_layers=layers, device="cuda", group_size=ctx.group_size,
                    expert_dtype=expert_dtype)
    return build_rank(spec, ctx, hooks)


def ordering_worker(group_size: int, model: str, layers: int) -> dict:
    """Each variant's relative error (two steps) against the full model on the same GPU with
    the same seeded weights (every expert resident, no pulls)."""
    ctx = init_dwdp_groups(group_size, "cuda", timeout_s=300)
    cfg, _ = resolve_model(model, layers)
    g = torch.Generator().manual_seed(ctx.rank)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (37, 300, 700, 2048)]
    batch = PackedBatch.from_sequences(seqs, ctx.device)
    with torch.no_grad():
        full = init_random(build_model(cfg, torch.bfloat16, ctx.device), 0)
        ref = full(batch).logits.float()
        del full
        torch.cuda.empty_cache()
        out = {}
        for name, kw in VARIANTS.items():
            rank = _dwdp_rank(ctx, model, layers, DelayHooks(**kw))
            out[name] = [_rel(rank.model(batch).logits, ref) for _ in range(2)]
            rank.close()
            del rank
            torch.cuda.empty_cache()
            dist.barrier()
    dist.destroy_process_group()
    return out


def exposed_wait_worker(group_size: int, model: str, layers: int, tokens: int) -> dict:
    """One step too small to hide its pulls, with pulls and with pulls switched off (the
    communication-free limit of the same step): median host seconds of each and the
    runtime's exposed-wait metric for the step with pulls."""
    ctx = init_dwdp_groups(group_size, "cuda", timeout_s=300)
    rank = _dwdp_rank(ctx, model, layers, RuntimeHooks())
    cfg, rt = rank.cfg, rank.runtime
    g = torch.Generator().manual_seed(ctx.rank)
    batch = PackedBatch.from_sequences([torch.randint(0, cfg.vocab_size, (tokens,), generator=g)], ctx.device)
    res = {}
    with torch.no_grad():
        for mode in ("pulls", "no_pulls"):
            rt.prefetcher.skip_pulls = mode == "no_pulls"
            rank.model(batch)  # warm
            ts, waits = [], []
            for _ in range(5):
                dist.barrier()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                rank.model(batch)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
                waits.append(rt.step_stats[-1].exposed_wait_s)
            res[f"{mode}_s"] = sorted(ts)[2]
            res[f"{mode}_exposed_wait_s"] = sorted(waits)[2]
    rt.prefetcher.skip_pulls = False
    dist.barrier()
    rank.close()
    dist.destroy_process_group()
    return res
