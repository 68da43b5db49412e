"""Functions that run inside spawned DEP ranks (importable by the child processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dwdp.batch import PackedBatch
from dwdp.config import ModelConfig
from dwdp.models import build_model, init_random
from dwdp.parallel.ep import apply_dep, ep_ranges
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
