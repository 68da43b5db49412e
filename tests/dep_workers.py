"""Functions that run inside spawned DEP ranks (importable by the child processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dwdp.batch import PackedBatch
from dwdp.config import ModelConfig
from dwdp.models import build_model, init_random
from dwdp.parallel.ep import apply_dep
from dwdp.strategy.wire import ep_ranges
from dwdp.parallel.group import init_dwdp_groups
from dwdp.presets import preset_hf_dict


def tiny_config(hidden: int = 64, experts: int = 12, top_k: int = 2) -> ModelConfig:
    hf = {**preset_hf_dict("tiny-qwen3-moe"), "hidden_size": hidden, "num_experts": experts,
          "num_experts_per_tok": top_k}
    return ModelConfig.from_hf_dict(hf, name=f"tiny-qwen3-moe-h{hidden}-e{experts}-k{top_k}")


def _models(cfg: ModelConfig, rank: int, size: int, fp8: bool):
    mine = ep_ranges(cfg.num_experts, size)[rank]
    shard = build_model(cfg, torch.float32, "cpu", expert_shard=lambda _: (mine.start, len(mine)))
    full = build_model(cfg, torch.float32, "cpu")
    init_random(shard, 0)
    init_random(full, 0)
    if fp8:
        from dwdp.quant import quantize_experts_fp8

        quantize_experts_fp8(shard)
        quantize_experts_fp8(full)
    return shard, full


def _routing(mode: str, T: int, cfg: ModelConfig, size: int, g: torch.Generator):
    E, K = cfg.num_experts, cfg.top_k
    if mode == "rank0":  # every token picks experts of rank 0 only: the others receive nothing
        pool = torch.tensor(list(ep_ranges(E, size)[0]))
    else:
        pool = torch.arange(E)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.long)
    return ids, torch.rand(T, K, generator=g)


def _qdq(x: torch.Tensor) -> torch.Tensor:
    """Per token and 128 columns: scale = amax / 448, round to e4m3, scale back."""
    T, H = x.shape
    blocks = x.view(T, H // 128, 128)
    scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-10) / torch.finfo(torch.float8_e4m3fn).max
    return ((blocks / scale).to(torch.float8_e4m3fn).float() * scale).view(T, H)


def dep_worker(group_size: int, cfg_kw: dict, dep_kw: dict, layer_cases: list[dict], batches_by_rank,
               fp8: bool = False):
    """Layer cases: run the first MoE layer's DEP experts on hand-made tokens and routing,
    returning (got, want) against the same layer with every expert in this process. Then
    full forwards of ``batches_by_rank[rank]``: (got logits, single-process logits, stats)."""
    torch.set_num_threads(1)
    ctx = init_dwdp_groups(group_size, "cpu", timeout_s=60)
    r, N = ctx.group_rank, ctx.group_size
    cfg = tiny_config(**cfg_kw)
    shard, full = _models(cfg, r, N, fp8)
    rt = apply_dep(shard, ctx.group.process_group, r, N, **dep_kw)
    out = {"layers": [], "steps": []}
    with torch.no_grad():
        for case in layer_cases:
            g = torch.Generator().manual_seed(1000 * case["seed"] + r)
            T = case["tokens"][r]
            x = torch.randn(T, cfg.hidden_size, generator=g)
            ids, w = _routing(case["routing"], T, cfg, N, g)
            got = shard.moe_blocks()[0].experts(x, ids, w)
            want = full.moe_blocks()[0].experts(_qdq(x) if dep_kw.get("wire") == "fp8" else x, ids, w)
            out["layers"].append((got.numpy(), want.numpy()))
        for batch in batches_by_rank[r]:
            got = shard(PackedBatch.from_sequences(batch)).logits
            want = full(PackedBatch.from_sequences(batch)).logits
            s = rt.step_stats[-1]
            out["steps"].append((got.numpy(), want.numpy(), {
                "collective_s": s.collective_s, "transfer_s": s.transfer_s, "wait_s": s.wait_s,
                "step_s": s.step_s, "compute_s": s.compute_s, "sent_bytes": s.sent_bytes,
                "received_bytes": s.received_bytes, "host_syncs": s.host_syncs,
                "layers": len(s.layer_collective_s), "moe_layers": len(shard.moe_blocks())}))
    rt.close()
    dist.barrier()
    dist.destroy_process_group()
    return out


def dep_gpu_worker(fp8: bool, cases: list[dict]):
    """GPU: one DEP layer (small qwen3-like shape, bf16) against all experts in this process."""
    import os

    from dwdp.models.moe import RoutedExperts

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=dev)
    N = dist.get_world_size()
    E, K, H, inter = 16, 4, 256, 128

    def experts(start, count):
        ex = RoutedExperts(E, H, inter, start, count)
        g = torch.Generator().manual_seed(5)
        w13, w2 = torch.randn(E, 2 * inter, H, generator=g) * 0.05, torch.randn(E, H, inter, generator=g) * 0.05
        ex.w13 = torch.nn.Parameter(w13[start:start + count].to(dev, torch.bfloat16), requires_grad=False)
        ex.w2 = torch.nn.Parameter(w2[start:start + count].to(dev, torch.bfloat16), requires_grad=False)
        if fp8:
            ex.quantize_fp8()
        return ex

    class One(torch.nn.Module):
        def __init__(self, ex):
            super().__init__()
            from types import SimpleNamespace

            self.config = SimpleNamespace(num_experts=E, top_k=K)
            self.block = SimpleNamespace(experts=ex)
            self.mods = torch.nn.ModuleList([ex])

        def moe_blocks(self):
            return [self.block]

        def forward(self, x, ids, w):
            return self.block.experts(x, ids, w)

    mine = ep_ranges(E, N)[rank]
    full, model = experts(0, E), One(experts(mine.start, len(mine)))
    rt = apply_dep(model, dist.group.WORLD, rank, N)
    cfg = type("C", (), {"num_experts": E, "top_k": K})
    errs = []
    with torch.no_grad():
        for case in cases:
            g = torch.Generator().manual_seed(1000 * case["seed"] + rank)
            T = case["tokens"][rank]
            ids, w = _routing(case["routing"], T, cfg, N, g)
            x = torch.randn(T, H, generator=g).to(dev, torch.bfloat16)
            got = model(x, ids.to(dev), w.to(dev))
            want = full(x, ids.to(dev), w.to(dev))
            errs.append(((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()
                        if T else float(got.numel()))
    s = rt.step_stats[-1]
    dist.barrier()
    dist.destroy_process_group()
    return {"errs": errs, "host_syncs": s.host_syncs, "transfer_s": s.transfer_s, "wait_s": s.wait_s}


def dep_decode_worker(prompts_by_rank: list[list[list[int]]], max_tokens_by_rank: list[int]):
    """DEP decode in lockstep: each rank decodes its own requests (greedy) with its expert
    share, the ranks with fewer or shorter requests running dummy steps meanwhile. Returns
    (DEP tokens, the full single-process model's tokens, dummy steps) for this rank."""
    import os

    from dwdp.decode import DecodeEngine, DecodeRequest
    from dwdp.engine import PrefillEngine, Request
    from dwdp.parallel.group import DWDPContext, lockstep_sync
    from dwdp.sampling import SamplingParams

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config()
    shard, full = _models(cfg, rank, size, False)
    rt = apply_dep(shard, dist.group.WORLD, rank, size)
    prompts, n = prompts_by_rank[rank], max_tokens_by_rank[rank]
    # The prompt caches come from a context server; here the full model prefills them.
    pre = PrefillEngine(full, 64, keep_kv=True).run([Request(i, p) for i, p in enumerate(prompts)])
    reqs = lambda: [DecodeRequest(r.id, list(r.kv), r.next_token, SamplingParams(max_tokens=n), r.prompt_len)  # noqa: E731
                    for r in sorted(pre, key=lambda r: r.id)]
    ctx = DWDPContext.single(torch.device("cpu"))
    ctx.group = type("G", (), {"process_group": dist.group.WORLD})()
    ctx.device = torch.device("cpu")
    dep = DecodeEngine(shard, max_batch=2, max_context=64, lockstep=lockstep_sync(ctx))
    got = {r.id: r.tokens for r in dep.run(reqs())}
    want = {r.id: r.tokens for r in DecodeEngine(full, max_batch=2, max_context=64).run(reqs())}
    steps = len(rt.step_stats)
    rt.close()
    dist.barrier()
    dist.destroy_process_group()
    del os
    return got, want, dep.dummy_steps, dep.steps, steps
