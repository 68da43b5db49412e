"""``dwdp info``: a model's parameters and bytes by part, and a DWDP rank's memory."""

from __future__ import annotations

import torch

from ..config import DTYPES
from ..errors import nonnegative_int
from ..strategy.spec import expert_format
from .common import _add_dense_dtype, _add_expert_dtype, _add_model_args, _console, _fixed_local_count


def add_parser(subparsers) -> None:
    info = subparsers.add_parser("info", help="parameter and byte breakdown of a model (and DWDP per-rank memory)")
    _add_model_args(info)
    info.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight dtype (default bf16)")
    _add_expert_dtype(info, "same", runs=False)
    _add_dense_dtype(info, "same")
    info.add_argument("--group-size", "-N", type=nonnegative_int, default=0,
                      help="DWDP group size N: show per-rank memory (0: do not)")
    info.add_argument("--local-experts", "-L", type=_fixed_local_count, default=None, help="DWDP local experts per rank L")
    info.set_defaults(func=cmd_info)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_info(args) -> int:
    from rich.table import Table

    from ..memory import dwdp_rank_memory, param_breakdown
    from ..presets import resolve_model
    from ..quant import bytes_per_expert_weight
    from ..strategy.placement import Placement

    cfg, _ = resolve_model(args.model, args.num_layers)
    bpp = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    ebpp = bytes_per_expert_weight(expert_format(args.expert_dtype, cfg.fp8_checkpoint, args.dtype))
    dbpp = bytes_per_expert_weight(expert_format(args.dense_dtype, cfg.fp8_checkpoint, args.dtype))  # projections
    pb = param_breakdown(cfg)
    # An impossible placement is refused before anything is printed.
    pl = Placement.create(cfg.num_experts, args.group_size, args.local_experts) if args.group_size else None
    console = _console()
    t = Table(title=f"{cfg.name or args.model}: {cfg.model_type}, {cfg.num_layers} layers "
                    f"({len(cfg.moe_layers)} MoE), {cfg.num_experts} routed experts, top-{cfg.top_k}")
    for col in ("part", "parameters", "bytes", "share"):
        t.add_column(col, justify="right" if col != "part" else "left")
    rows = [("embeddings + lm_head", pb.embeddings, bpp), ("attention", pb.attention, dbpp),
            ("norms", pb.norms, bpp), ("dense MLP", pb.dense_mlp, dbpp),
            ("shared experts", pb.shared_experts, dbpp), ("routers", pb.routers, bpp),
            ("routed experts", pb.routed_experts, ebpp)]
    total_bytes = sum(n * b for _, n, b in rows)
    for name, n, b in rows:
        t.add_row(name, f"{n:,}", _fmt_bytes(n * b), f"{100 * n * b / total_bytes:.1f}%")
    t.add_row("total", f"{pb.total:,}", _fmt_bytes(total_bytes), "100%")
    console.print(t)
    if pb.num_moe_layers:
        e_bytes = pb.expert_numel * ebpp
        console.print(f"routed experts per MoE layer: {cfg.num_experts} x {pb.expert_numel:,} params = "
                      f"{_fmt_bytes(cfg.num_experts * e_bytes)}; one expert: {_fmt_bytes(e_bytes)}")
    if pl is not None:
        mem = dwdp_rank_memory(cfg, pl, bpp, ebpp, dense_bytes_per_param=dbpp)
        t2 = Table(title=f"DWDP per-rank memory: {pl.describe()}")
        for col in ("part", "bytes"):
            t2.add_column(col)
        t2.add_row("non-expert weights (replicated)", _fmt_bytes(mem.non_expert))
        t2.add_row(f"resident experts ({pl.local} per MoE layer)", _fmt_bytes(mem.resident_experts))
        t2.add_row(f"two prefetch slots ({pl.remote} experts each)", _fmt_bytes(mem.slots))
        t2.add_row("total", _fmt_bytes(mem.total))
        console.print(t2)
        console.print(f"bytes pulled per rank per MoE layer: {_fmt_bytes(pl.remote * pb.expert_numel * ebpp)}")
    from ..memory import cache_bytes_per_token

    kv = cache_bytes_per_token(cfg, DTYPES[args.dtype])
    console.print(f"decode KV cache: {_fmt_bytes(kv)} per token (all layers{', compressed MLA latent' if cfg.is_mla else ''});"
                  f" dwdp serve allocates --max-batch x --max-context of it, e.g. 64 x 8192 = {_fmt_bytes(64 * 8192 * kv)}")
    return 0
