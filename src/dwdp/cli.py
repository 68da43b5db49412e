"""The ``dwdp`` command line: ``run``, ``info``, ``bench``, ``report``, ``plan``, ``calibrate``,
``serve``, ``loadtest``. A user's mistake is a :class:`~dwdp.errors.UserError`, printed as one
line before any model is loaded or process spawned."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .config import DTYPES, ConfigError
from .errors import UserError, check_port_free, float_list, int_list, nonnegative_int, positive_float, positive_int
from .models.build import DENSE_DTYPES
from .presets import DEFAULT_MODEL, PRESETS
from .strategy.registry import STRATEGIES, describe
from .strategy.spec import (BASELINE, DEP, DP, DWDP, EXPERT_DTYPES, DEPConfig, DWDPConfig, expert_format,
                            local_count, options_from)


def _console():
    from rich.console import Console

    # Wide enough for our tables when output goes to a file or a pipe (rich assumes 80).
    return Console() if sys.stdout.isatty() else Console(width=160)


# Experiments that measured worse than the default were removed; their flags remain only to
# say so in one line (docs/RESULTS.md holds the measurements).
REMOVED_FLAGS = {
    "--short-steps": "token shipping (short steps sending their tokens to the experts' owners) measured faster "
                     "only while every rank ran a short bf16 step, slower otherwise",
    "--ship-max-tokens": "token shipping measured faster only while every rank ran a short bf16 step, slower "
                         "otherwise",
    "--pull-pacing": "just-in-time pull pacing measured no gain over pulling at full rate (2x H200)",
    "--dep-transport": "DEP's symmetric-memory (NVSHMEM) all-to-all measured slower than NCCL's",
    "--dep-overlap": "DEP's two-batch overlap measured slower than the plain layer (NCCL's kernels slowed the "
                     "experts beside them more than the transfer they hid)",
}


class _RemovedFlag(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        raise SystemExit(f"error: {option_string} was removed: {REMOVED_FLAGS[option_string]} "
                         "(see docs/RESULTS.md); drop the flag")


def _add_removed_flags(p, *flags: str) -> None:
    for flag in flags:
        p.add_argument(flag, action=_RemovedFlag)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset ({', '.join(PRESETS)}) or a Hugging Face checkpoint directory "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--num-layers", type=positive_int, default=None, help="keep only the first N layers (default: all)")


def _add_options(p, *configs) -> None:
    """The flags of strategy config dataclasses (:mod:`dwdp.strategy.spec`), declared once
    there: every subcommand that builds ranks gets the same names, types and help."""
    for cls in configs:
        for f in dataclasses.fields(cls):
            m = f.metadata
            kw = {"type": m["type"]} if m["type"] else {}
            p.add_argument(*m["flags"], default=f.default, choices=m["choices"], help=m["help"], **kw)


def _fixed_local_count(text: str) -> int:
    """-L where no GPU sizes it: a number (``dwdp plan`` lists the L that fit a budget)."""
    L = local_count(text)
    if L == "auto":
        raise argparse.ArgumentTypeError("auto sizes L on the GPUs of a run; give a number of experts here")
    return L


def _add_expert_dtype(p, default: str, runs: bool = True) -> None:
    p.add_argument("--expert-dtype", default=default, choices=EXPERT_DTYPES,
                   help="routed experts: auto = as the checkpoint ships them (FP8 releases stay FP8), same = the "
                        "model dtype, bf16, fp8 = e4m3 with 128x128 block scales (quantised at load)"
                        + (", fp4 (priced by plan and info; nothing runs it yet)" if runs else ", fp4")
                        + f" (default {default})")


def _add_dense_dtype(p, default: str) -> None:
    p.add_argument("--dense-dtype", default=default, choices=DENSE_DTYPES,
                   help="attention, dense-MLP and shared-expert projections: auto = as the checkpoint ships them "
                        "(FP8 releases stay FP8), same = the model dtype, fp8 = e4m3 with 128x128 block scales "
                        f"(quantised at load) (default {default})")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weight/activation dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--prompt", action="append", default=[],
                   help="comma-separated token ids; repeat for several prompts")
    p.add_argument("--lengths", default="16,48,7,100",
                   help="random prompts of these lengths when no --prompt is given (default: 16,48,7,100)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and prompts")
    p.add_argument("--max-num-tokens", type=positive_int, default=8192, help="token budget per step (MNT)")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    d = p.add_argument_group("DWDP (several processes; under torchrun each process is one rank)")
    d.add_argument("--group-size", "-N", type=positive_int, default=1, help="DWDP group size N (1: a single process)")
    d.add_argument("--strategy", default=DWDP, choices=list(STRATEGIES),
                   help="how the group shares the experts (default dwdp; dep and dp for comparison)")
    _add_expert_dtype(d, "auto")
    _add_dense_dtype(d, "auto")
    _add_options(d, DWDPConfig, DEPConfig)
    _add_removed_flags(d, "--pull-pacing", "--short-steps", "--ship-max-tokens")
    d.add_argument("--world-size", type=positive_int, default=None, help="local processes to spawn (default N; W/N groups)")
    d.add_argument("--peer-timeout", type=positive_float, default=60.0,
                   help="seconds without a peer heartbeat before the group fails (default 60)")
    d.add_argument("--timeout", type=positive_float, default=1800.0, help="overall limit for spawned runs, seconds")


def _prompts(args, vocab: int) -> list[list[int]]:
    if args.prompt:
        prompts = [int_list(p, "--prompt", "1,2,3", minimum=0) for p in args.prompt]
        bad = sorted({t for p in prompts for t in p if t >= vocab})
        if bad:
            raise UserError(f"--prompt: token id {bad[0]} is outside the model's vocabulary (ids 0..{vocab - 1})")
        return prompts
    g = torch.Generator().manual_seed(args.seed + 1)
    lengths = int_list(args.lengths, "--lengths", "16,48", minimum=1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _rank_spec(args, strategy: str = DP, group_size: int = 1):
    from .strategy.spec import RankSpec

    return RankSpec(model=args.model, strategy=strategy, num_layers=args.num_layers, dtype=args.dtype,
                    device="cuda" if args.device.startswith("cuda") else "cpu", group_size=group_size,
                    expert_dtype=getattr(args, "expert_dtype", "auto"), dense_dtype=getattr(args, "dense_dtype", "auto"),
                    dwdp=options_from(DWDPConfig, args), dep=options_from(DEPConfig, args), seed=args.seed,
                    max_num_tokens=args.max_num_tokens, peer_timeout_s=getattr(args, "peer_timeout", 60.0))


def load_model_from_args(args):
    """The whole model in this process (``dwdp run`` on one device, the decode model of
    ``dwdp serve``): a dp rank on its own."""
    from .parallel.group import DWDPContext
    from .parallel.rank import build_rank

    rank = build_rank(_rank_spec(args), DWDPContext.single(args.device), progress=sys.stderr.isatty())
    return rank.cfg, rank.model


def cmd_run(args) -> int:
    from rich.table import Table

    from .engine import PrefillEngine, Request

    console = _console()
    _check_device(args.device)
    if args.group_size > 1 or (args.world_size or 1) > 1:
        return _cmd_run_dwdp(args, console)
    cfg = _model_config(args.model, args.num_layers)
    prompts = _prompts(args, cfg.vocab_size)  # a bad prompt is refused before the model loads
    _check_context([len(p) for p in prompts], cfg.max_position_embeddings, "--prompt/--lengths")
    t0 = time.perf_counter()
    cfg, model = load_model_from_args(args)
    load_s = time.perf_counter() - t0
    engine = PrefillEngine(model, max_num_tokens=args.max_num_tokens, keep_kv=False)
    t0 = time.perf_counter()
    results = engine.run([Request(i, p) for i, p in enumerate(prompts)])
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.id)
    table = Table(title=f"prefill on {cfg.name or args.model} ({args.device}, {next(model.parameters()).dtype})")
    for col in ("seq", "prompt tokens", "next token", "TTFT ms"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r.id), str(r.prompt_len), str(r.next_token), f"{r.ttft * 1e3:.1f}")
    console.print(table)
    ntok = sum(r.prompt_len for r in results)
    step_s = sum(s.seconds for s in engine.steps)
    console.print(f"{ntok} tokens in {len(engine.steps)} step(s): {step_s * 1e3:.1f} ms forward, "
                  f"{ntok / step_s:,.0f} tokens/s (load {load_s:.2f} s, wall {wall * 1e3:.1f} ms)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "device": args.device, "tokens": ntok, "forward_s": step_s,
                       "tokens_per_s": ntok / step_s,
                       "results": [{"id": r.id, "prompt_len": r.prompt_len, "next_token": r.next_token,
                                    "ttft_s": r.ttft} for r in results]}, f, indent=2)
    return 0


def _cmd_run_dwdp(args, console) -> int:
    from rich.table import Table

    from .parallel.launch import PrefillRun, SpawnError, run_prefill_group

    cfg = _model_config(args.model, args.num_layers)
    prompts = _prompts(args, cfg.vocab_size)
    _check_context([len(p) for p in prompts], cfg.max_position_embeddings, "--prompt/--lengths")
    if args.world_size is not None and args.world_size % args.group_size:
        raise UserError(f"--world-size {args.world_size} is not a multiple of --group-size {args.group_size}: "
                        f"give a multiple (W/N groups of N ranks)")
    _plan_or_explain(_rank_spec(args, args.strategy, args.group_size), "-N/--group-size")
    run = PrefillRun(_rank_spec(args, args.strategy, args.group_size), prompts)
    try:
        ranks = run_prefill_group(run, args.world_size, args.timeout)
    except SpawnError as e:
        print(f"error: the group failed:\n{e.summary()}", file=sys.stderr)
        return 1
    table = Table(title=f"prefill on {cfg.name or args.model}: {ranks[0]['plan']}")
    for col in ("rank", "experts kept", "seqs", "tokens", "steps", "forward ms", "tokens/s",
                "exposed wait ms", "pulled GiB", "pull GB/s"):
        table.add_column(col, justify="right")
    for r in ranks:
        ntok = sum(x["prompt_len"] for x in r["results"])
        fwd = sum(s["seconds"] for s in r["steps"])
        rt = r["runtime"]
        wait, pulled, pull_s = sum(rt.get("exposed_wait_s", [])), rt.get("pulled_bytes", 0), rt.get("pull_seconds", 0)
        table.add_row(str(r["rank"]), f"{r['local_experts'][0]}..{r['local_experts'][1] - 1}",
                      str(len(r["results"])), str(ntok), str(len(r["steps"])), f"{fwd * 1e3:.1f}",
                      f"{ntok / fwd:,.0f}" if fwd else "-", f"{wait * 1e3:.2f}" if "exposed_wait_s" in rt else "-",
                      f"{pulled / 2**30:.3f}", f"{pulled / pull_s / 1e9:.1f}" if pull_s else "-")
    console.print(table)
    seqs = sorted((x["id"], r["rank"], x["prompt_len"], x["next_token"]) for r in ranks for x in r["results"])
    console.print("next tokens: " + ", ".join(f"seq {i} (rank {rk}, {n} tok) -> {t}" for i, rk, n, t in seqs))
    if args.out:
        path = args.out
        if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: a file per rank
            stem, ext = os.path.splitext(path)
            path = f"{stem}.rank{os.environ['RANK']}{ext}"
        with open(path, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "results"} | {"results": [
                {k: v for k, v in x.items() if k != "logits"} for x in r["results"]]} for r in ranks], f, indent=2)
    return 0


def _model_config(model: str, num_layers: int | None):
    """The model's config, and its checkpoint's files checked from their headers (whole, no
    integer weights) before any process builds the model."""
    from .checkpoint import check_files
    from .presets import resolve_model

    cfg, ckpt = resolve_model(model, num_layers)
    if ckpt is not None:
        check_files(ckpt)
    return cfg


def _device(text: str) -> str:
    """argparse type for --device: cpu, cuda or cuda:i (checked against this machine later)."""
    if text == "cpu" or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give cpu, cuda or cuda:N")


def _check_device(device: str, needed: int = 1) -> None:
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} but no CUDA device is visible here; use --device cpu")
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index + needed > count:
        raise UserError(f"--device {device} needs GPU {index + needed - 1}, but {count} are visible; "
                        f"give --device cuda:0..{count - 1}")


def _check_context(lengths: list[int], max_len: int, flag: str) -> None:
    if lengths and max(lengths) > max_len:
        raise UserError(f"{flag}: a prompt of {max(lengths)} tokens is longer than the model's context "
                        f"({max_len} tokens, max_position_embeddings); give shorter prompts")


def _plan_or_explain(rank_spec, flag: str):
    """Plan every rank of a group from the model's config (no weights, no processes): an
    impossible group (more ranks than experts, no valid placement) is one line here, not a
    traceback from each spawned rank."""
    from .strategy.placement import PlacementError
    from .parallel.rank import plan_group
    from .parallel.strategies import get_strategy
    from .presets import resolve_model

    cfg, _ = resolve_model(rank_spec.model, rank_spec.num_layers)
    n, e = rank_spec.group_size, cfg.num_experts
    if get_strategy(rank_spec.strategy).grouped and n > e:
        raise UserError(f"{flag} {n}: a {rank_spec.strategy} group of {n} ranks needs at least one of the model's "
                        f"{e} routed experts per rank; give a group size of at most {e}")
    try:
        return plan_group(rank_spec)
    except ConfigError:
        raise
    except ValueError as err:  # PlacementError and the strategies' own checks
        hint = "" if isinstance(err, PlacementError) and "Valid" in str(err) else \
            f" (see dwdp info --model {rank_spec.model} -N {n})"
        raise UserError(f"{flag} {n} ({rank_spec.strategy}): {err}{hint}") from None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_info(args) -> int:
    from rich.table import Table

    from .memory import dwdp_rank_memory, param_breakdown
    from .presets import resolve_model
    from .quant import bytes_per_expert_weight
    from .strategy.placement import Placement

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
    from .memory import cache_bytes_per_token

    kv = cache_bytes_per_token(cfg, DTYPES[args.dtype])
    console.print(f"decode KV cache: {_fmt_bytes(kv)} per token (all layers{', compressed MLA latent' if cfg.is_mla else ''});"
                  f" dwdp serve allocates --max-batch x --max-context of it, e.g. 64 x 8192 = {_fmt_bytes(64 * 8192 * kv)}")
    return 0


def cmd_bench(args) -> int:
    from .bench.runner import comparison_table, sweep, write_json
    from .bench.worker import BenchSpec
    from .ceilings import machine_info
    from .parallel.launch import SpawnError
    from .workload import WorkloadSpec, generate

    console = _console()
    strategies = [s.strip() for s in args.strategies.split(",")]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise UserError(f"--strategies {args.strategies!r}: unknown strategy {', '.join(map(repr, bad))}; "
                        f"choose from {', '.join(STRATEGIES)}")
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
        if torch.cuda.device_count() < args.world_size:
            raise UserError(f"--world-size {args.world_size} needs {args.world_size} GPUs, "
                            f"{torch.cuda.device_count()} visible; give -W {torch.cuda.device_count()} or less")
    if args.group_size is not None and args.world_size % args.group_size:
        raise UserError(f"--world-size {args.world_size} is not a multiple of --group-size {args.group_size}: "
                        "give a multiple (W/N groups of N ranks)")
    if args.repeat < 1:
        raise UserError(f"--repeat {args.repeat}: give at least 1 (the number of runs of each setting)")
    cfg = _model_config(args.model, args.num_layers)
    cvs = float_list(args.cv, "--cv", "0,0.2")
    mnts = int_list(args.max_num_tokens, "--max-num-tokens", "256,1024", minimum=1)
    isls = int_list(args.isl, "--isl", "8192 or --isl 1024,2048", minimum=1)
    limit = cfg.max_position_embeddings
    if args.dist != "trace" and max(isls) > limit:
        raise UserError(f"--isl {max(isls)} is longer than the model's context ({limit} tokens, "
                        f"max_position_embeddings of {args.model}); give --isl {limit} or less")
    workload = WorkloadSpec(num_requests=args.num_requests, isl=isls[0], dist=args.dist, ratio=args.ratio,
                            cv=cvs[0], trace=args.trace, rate=args.rate, assign=args.assign, seed=args.seed)
    for isl in isls:
        for cv in cvs:
            try:
                wl = dataclasses.replace(workload, isl=isl, cv=cv)
                wl.validate(limit)
                if wl.dist == "trace":  # read here, not in every rank
                    generate(wl, cfg.vocab_size, limit)
            except ValueError as e:
                raise UserError(f"the workload: {e}") from None
    spec = BenchSpec(model=args.model, num_layers=args.num_layers, dtype=args.dtype, device=device,
                     world_size=args.world_size, group_size=args.group_size, strategies=strategies,
                     workload=workload, max_num_tokens=mnts[0], skew=args.skew, balance_tail=args.balance_tail,
                     dwdp=options_from(DWDPConfig, args), dep=options_from(DEPConfig, args), hold_ms=args.hold_ms,
                     expert_dtype=args.expert_dtype, dense_dtype=args.dense_dtype,
                     seed=args.seed,
                     peer_timeout_s=args.peer_timeout,
                     ceilings=args.ceilings, diagnostic=args.diagnostic, progress=sys.stderr.isatty())
    # Every strategy's group planned from the config before any process starts: -W 13 on a
    # 12-expert model is one line here, not a dp run followed by a traceback per rank.
    flag = "-N/--group-size" if args.group_size is not None else "-W/--world-size (the group size)"
    for strategy in strategies:
        _plan_or_explain(spec.rank_spec(strategy, max(mnts)), flag)
    machine, saved = machine_info(), []

    def save(runs):  # after every strategy: a run cut short keeps what it finished
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            write_json(args.out, [r for r in runs if r.results], machine)
            saved.append(True)

    try:
        runs = sweep(spec, cvs if len(cvs) > 1 else None, mnts if len(mnts) > 1 else None, args.timeout,
                     log=lambda m: console.print(m, highlight=False, markup=False),
                     isls=isls if len(isls) > 1 else None, repeat=args.repeat, on_strategy=save)
    except SpawnError as e:
        console.print(f"[red]error:[/red] a rank failed:\n{e}", highlight=False)
        if saved:
            console.print(f"{args.out} holds the strategies that finished before it")
        return 1
    for run in runs:
        console.print(comparison_table(run))
    if args.out:
        save(runs)
        console.print(f"wrote {args.out}")
    return 0


def _profile(name: str):
    from .planner.hardware import resolve_profile

    try:
        return resolve_profile(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_report(args) -> int:
    from .bench.report import render
    from .serve import frontier

    fronts = [p for p in args.files if frontier.is_frontier(p)]
    args.files = [p for p in args.files if p not in fronts]
    if fronts:
        try:
            print(frontier.markdown(fronts) if args.markdown else f"wrote {frontier.render(fronts, args.out_dir)}")
        except ValueError as e:  # a frontier file lacking a field: named, with the command that writes one
            raise UserError(f"{e}; write frontier files with dwdp loadtest --sweep-concurrency") from None
    if not args.files:
        return 0
    if args.reps:
        from .bench.report import repetitions_markdown

        print(repetitions_markdown(args.files))
        return 0
    if args.markdown:
        from .bench.report import markdown

        print(markdown(args.files))
        return 0
    hw = None
    if args.hardware:
        hw = _profile(args.hardware)
    for p in render(args.files, args.out_dir, hw):
        print(f"wrote {p}")
    return 0


def _plan_input(args):
    from .planner.hardware import with_kernels
    from .planner.plan import PlanInput
    from .presets import resolve_model
    from .workload import WorkloadSpec

    cfg, _ = resolve_model(args.model, args.num_layers)
    if not cfg.name:  # a bare config.json: name it after its path (ModelConfig is frozen)
        cfg = dataclasses.replace(cfg, name=args.model)
    hw = with_kernels(_profile(args.hardware), args.kernels)
    if args.interference is not None:
        hw = dataclasses.replace(hw, interference=args.interference)
    limit = cfg.max_position_embeddings
    isl = args.isl if args.isl is not None else min(8192, limit)  # a short-context model plans at its context
    if isl > limit:
        raise UserError(f"--isl {isl} is longer than {cfg.name}'s context ({limit} tokens, "
                        f"max_position_embeddings); give --isl {limit} or less, or another --model")
    wl = WorkloadSpec(num_requests=args.requests_per_rank, isl=isl, dist=args.dist, ratio=args.ratio,
                      cv=args.cv, assign=args.assign, seed=args.seed, rate=args.rate)
    try:
        wl.validate(limit)
    except ValueError as e:
        raise UserError(f"the workload: {e}") from None
    from .strategy.placement import Placement

    Placement.create(cfg.num_experts, args.group_size, args.local_experts)  # impossible N, L: said before any output
    expert_dtype = expert_format(args.expert_dtype, cfg.fp8_checkpoint, "bf16")  # the planner's model dtype
    if expert_dtype not in ("bf16", "fp8", "fp4"):
        raise UserError(f"--expert-dtype {args.expert_dtype}: the planner prices bf16, fp8 or fp4 experts")
    return PlanInput(cfg, hw, expert_dtype, args.group_size, args.local_experts, wl, args.max_num_tokens,
                     args.skew, args.sliced, args.balance_tail, args.dense_dtype)


def cmd_plan(args) -> int:
    from rich.table import Table

    from .memory import FIT_HEADROOM
    from .planner.plan import crossover, memory_per_gpu, predict_all, recommend, sweep, validate

    console = _console()
    if args.validate:
        from .bench.schema import load_runs

        hw = _profile(args.hardware)
        rows = validate(load_runs(args.validate), hw)
        t = Table(title=f"predicted vs measured ({args.hardware})")
        for c in ("model", "MNT", "CV", "strategy", "measured step ms", "predicted", "error", "measured tok/s/GPU",
                  "predicted", "error", "TTFT p50 ms meas / pred", "p90 meas / pred"):
            t.add_column(c, justify="right")
        for r in rows:
            tt = [f"{1e3 * r[f'measured_ttft_{q}_s']:.0f} / {1e3 * r[f'predicted_ttft_{q}_s']:.0f}"
                  if f"measured_ttft_{q}_s" in r else "-" for q in ("p50", "p90")]
            t.add_row(r["model"], str(r["mnt"]), f"{r['cv']:g}", r["strategy"], f"{r['measured_step_s'] * 1e3:.1f}",
                      f"{r['predicted_step_s'] * 1e3:.1f}", f"{100 * r['step_error']:+.1f}%", f"{r['measured_tps']:,.0f}",
                      f"{r['predicted_tps']:,.0f}", f"{100 * r['tps_error']:+.1f}%", *tt)
        console.print(t)
        ct = Table(title="components per rank, seconds: measured / predicted (compute outside communication; "
                         "transfer: dep all-to-all, dwdp pulls; wait: dep for the slowest rank, dwdp exposed prefetch)")
        for c in ("model", "MNT", "CV", "strategy", "compute", "transfer", "wait"):
            ct.add_column(c, justify="right")
        for r in rows:
            cells = []
            for k in ("compute_s", "transfer_s", "wait_s"):
                m, pr_ = r.get(f"measured_{k}"), r[f"predicted_{k}"]
                cells.append("-" if m is None else f"{m:.2f} / {pr_:.2f}" + (
                    f" ({100 * (pr_ / m - 1):+.0f}%)" if m > 1e-3 else ""))
            ct.add_row(r["model"], str(r["mnt"]), f"{r['cv']:g}", r["strategy"], *cells)
        console.print(ct)
        errs = [abs(r["step_error"]) for r in rows]
        within = sum(e <= 0.15 for e in errs)
        console.print(f"step time within +-15%: {within} of {len(rows)} settings; mean |error| "
                      f"{100 * sum(errs) / len(errs):.1f}%")
        for strat in dict.fromkeys(r["strategy"] for r in rows):
            e = [abs(r["step_error"]) for r in rows if r["strategy"] == strat]
            console.print(f"  {strat}: {sum(x <= 0.15 for x in e)} of {len(e)} within +-15%, mean |error| "
                          f"{100 * sum(e) / len(e):.1f}%")
        for model in dict.fromkeys(r["model"] for r in rows):
            console.print(f"  {model}: {hw.fit_for(model)[1]}", highlight=False)
        loads = [(r["measured_expert_load_max_over_mean"], r["predicted_expert_load_max_over_mean"]) for r in rows
                 if r.get("measured_expert_load_max_over_mean") is not None]
        if loads:
            console.print("  dep expert load, busiest rank / mean per layer (measured / predicted): " + ", ".join(
                f"{m:.3f} / {p:.3f}" for m, p in loads), highlight=False)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    if args.paper:
        from .planner.paper import markdown, paper_points

        pts = paper_points()
        print(markdown(pts))
        errs = [abs(p.error) for p in pts]
        print(f"\n{sum(e <= 0.05 for e in errs)} of {len(pts)} within 5%, {sum(e <= 0.15 for e in errs)} within 15%")
        if args.out:
            with open(args.out, "w") as f:
                json.dump([dataclasses.asdict(p) | {"error": p.error} for p in pts], f, indent=1)
        return 0
    p = _plan_input(args)
    hw = p.hw
    # Every list parsed before anything is printed.
    if args.sweep:
        what, _, vals = args.sweep.partition("=")
        if what not in ("isl", "mnt", "cv", "skew"):
            raise UserError(f"--sweep {args.sweep!r}: sweep one of isl, mnt, cv, skew, e.g. --sweep mnt or "
                            "--sweep cv=0,0.2,0.4")
        values = float_list(vals, "--sweep " + what + "=", "0,0.2") if vals else {
            "isl": [1024, 2048, 4096, 8192, 16384, 32768], "mnt": [4096, 8192, 16384, 32768, 65536],
            "cv": [0, 0.1, 0.2, 0.3, 0.5], "skew": [0, 0.5, 1.0, 1.5]}[what]
    targets = float_list(args.frontier, "--frontier", "20,50,100") if args.frontier else None
    colocated = int_list(args.colocated, "--colocated", "1,8,32", minimum=1) if args.colocated else None
    console.print(f"[bold]{p.cfg.name}[/bold] ({p.cfg.num_layers} layers, E={p.cfg.num_experts}, top-{p.cfg.top_k}), "
                  f"experts {p.expert_dtype}; hardware {hw.name} ({hw.source}); "
                  f"{p.workload.describe().replace(str(p.workload.num_requests) + ' requests', str(p.workload.num_requests) + ' requests per rank')}, "
                  f"MNT {p.mnt}, skew {p.skew:g}", highlight=False)
    if args.sweep:
        rows = sweep(p, what, values)
        t = Table(title=f"sweep over {what}")
        for c in (what, "dep tok/s/GPU", "dwdp tok/s/GPU", "dwdp / dep", "dep sync share"):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(f"{r[what]:g}", f"{r['dep']:,.0f}", f"{r['dwdp']:,.0f}", f"{r['ratio']:.2f}",
                      f"{100 * r['dep_sync_share']:.1f}%")
        console.print(t)
        if args.png:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6.5, 4))
            xs = [r[what] for r in rows]
            for name in (DEP, DWDP):
                ax.plot(xs, [r[name] for r in rows], "o-", color=STRATEGIES[name].color, label=f"{name} (predicted)")
            ax.set_xlabel(what)
            ax.set_ylabel("input tokens / s / GPU")
            if what in ("isl", "mnt"):
                ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{p.cfg.name} on {hw.name}, N={p.group_size}, {p.expert_dtype} experts")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.png, dpi=120)
            console.print(f"wrote {args.png}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    pr = predict_all(p)
    base = pr[BASELINE].tps_per_gpu
    t = Table(title=f"predicted, group of N={p.group_size}")
    for c in ("strategy", "memory/GPU", "mean step ms", "tok/s/GPU", "vs dep", "where the time goes"):
        t.add_column(c, justify="left" if c in ("strategy", "where the time goes") else "right")
    budget = hw.memory_gib * FIT_HEADROOM
    for name, x in pr.items():
        mem = memory_per_gpu(p.cfg, name, p.group_size, p.local_experts, p.expert_dtype, p.mnt, p.dense_dtype) / 2**30
        steps = [s for rank in x.step_s for s in rank]
        note = describe(name).time_note(x, p.group_size)
        fits = "" if mem <= budget else " [red](does not fit)[/red]"
        t.add_row(name, f"{mem:.1f} GiB{fits}", f"{1e3 * sum(steps) / len(steps):.1f}", f"{x.tps_per_gpu:,.0f}",
                  f"{x.tps_per_gpu / base:.2f}", note)
    console.print(t)
    rows, first = crossover(p)
    console.print("dwdp / dep over ISL (this MNT): " + ", ".join(f"{isl // 1024}K {r:.2f}" for isl, _, _, r in rows)
                  + (f" -> dwdp wins from ISL {first}" if first else " -> dwdp does not win in this range"))
    rows1, first1 = crossover(p, batch_one=True)
    console.print("batch 1 (one prompt per step, MNT = ISL): " + ", ".join(
        f"{isl // 1024}K {r:.2f}" for isl, _, _, r in rows1) + (f" -> dwdp wins from ISL {first1}" if first1 else ""))
    if args.frontier:
        from .planner.serving import frontier

        cm = p.cost_model()
        t = Table(title=f"disaggregated serving, ISL {p.workload.isl} / OSL {args.osl}, generation: {args.gen_gpus} "
                        f"GPU(s) per decode group (attention DP + EP), context: dwdp vs dep")
        for c in ("tok/s/user", "batch per gen GPU", "decode step ms", "gen tok/s/GPU", f"ctx GPUs per gen GPU {DWDP}",
                  DEP, f"output tok/s/GPU {DWDP}-context", f"{DEP}-context", f"{DWDP} / {DEP}"):
            t.add_column(c, justify="right")
        fr = {name: frontier(cm, pr[name].tps_per_gpu, p.workload.isl, args.osl, targets, args.gen_gpus)
              for name in (DWDP, DEP)}
        for a, b in zip(fr[DWDP], fr[DEP]):
            t.add_row(f"{a.tps_user:.0f}", str(a.batch), f"{a.step_s * 1e3:.1f}", f"{a.gen_tps_per_gpu:,.0f}",
                      f"{a.ctx_gpus_per_gen_gpu:.2f}", f"{b.ctx_gpus_per_gen_gpu:.2f}", f"{a.tps_per_gpu:,.0f}",
                      f"{b.tps_per_gpu:,.0f}", f"{a.tps_per_gpu / b.tps_per_gpu:.3f}")
        console.print(t)
        if len(fr[DWDP]) < len(targets):
            console.print(f"{len(targets) - len(fr[DWDP])} target(s) out of reach even at batch 1")
    if colocated:
        _print_colocated(console, p, args, colocated)
    if args.rate:
        from .planner.plan import predict_ttft

        tt = predict_ttft(p)
        t = Table(title=f"TTFT at {args.rate:g} requests/s in total (prefill only; Poisson arrivals)")
        for c in ("strategy", "TTFT p50 ms", "p90 ms", "p99 ms", "mean ms"):
            t.add_column(c, justify="right")
        for name, r in tt.items():
            t.add_row(name, *(f"{1e3 * r[k]:.0f}" for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_mean_s")))
        console.print(t)
    cands, best = recommend(p, args.memory_gib)
    if best:
        console.print(f"recommended under {args.memory_gib or budget:.0f} GiB/GPU: N={best['N']} L={best['L']} "
                      f"({best['memory_gib']:.1f} GiB, {best['tps_per_gpu']:,.0f} tok/s/GPU predicted)")
    else:
        console.print("no DWDP group size fits the memory budget")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({name: {"tps_per_gpu": x.tps_per_gpu, "busy_s": x.busy_s, "makespan_s": x.makespan_s}
                       for name, x in pr.items()} | {"crossover": rows, "candidates": cands}, f, indent=1, default=float)
    return 0


def _print_colocated(console, p, args, concurrencies: list[int]) -> None:
    """`dwdp plan --colocated C1,C2,..`: a one-GPU server (prefill in the decode loop) under a
    closed-loop loadtest at each concurrency, with the server's overhead fitted from a
    `benchmarks/serve_anatomy.py` file when given, its measured points beside."""
    from rich.table import Table

    from .planner.serving import fit_server_overhead, simulate_colocated

    cm = p.cost_model()
    isl, osl = p.workload.isl, args.osl
    overhead, measured = (0.0, 0.0, 0.0), {}
    if args.server_anatomy:
        try:
            data = json.loads(Path(args.server_anatomy).read_text())
            rows = data["rows"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"--server-anatomy {args.server_anatomy}: not a benchmarks/serve_anatomy.py JSON ({e}); "
                            "give the file that script wrote") from None
        if (data.get("isl"), data.get("osl")) != (isl, osl):  # compare like with like: the file's workload
            console.print(f"--server-anatomy: using the file's ISL {data.get('isl')} / OSL {data.get('osl')} "
                          f"(not {isl} / {osl})")
            isl, osl = data.get("isl") or isl, data.get("osl") or osl
        overhead = fit_server_overhead(cm, isl, osl, rows, p.mnt)
        measured = {r["max_concurrency"]: r["loadtest"] for r in rows}
    t = Table(title=f"one-GPU server, prefill in the decode loop, ISL {isl} / OSL {osl}, max batch {args.max_batch}, "
                    f"MNT {p.mnt}; server overhead {overhead[0] * 1e3:.2f} ms + {overhead[1] * 1e3:.3f} ms/seq per decode "
                    f"step, {overhead[2] * 1e3:.1f} ms per prefill step")
    for c in ("concurrency", "tok/s/GPU", "tok/s/user", "TTFT p50 ms", "TTFT p90 ms"):
        t.add_column(c, justify="right")
    for c in concurrencies:
        r = simulate_colocated(cm, isl, osl, args.colocated_requests, c, args.max_batch, p.mnt, overhead)
        m = measured.get(c)
        def pair(pred, meas, f):
            show = (lambda v: "-" if v is None else f(v))
            return show(pred) if meas is None else f"{show(pred)} / {show(meas)}"

        t.add_row(str(c), pair(r["tps_per_gpu"], m and m["tps_per_gpu"], lambda v: f"{v:,.0f}"),
                  pair(r["tps_per_user"], m and m["tps_per_user"], lambda v: f"{v:.0f}"),
                  pair(r["ttft_p50_s"], m and m["ttft_s"]["p50"], lambda v: f"{v * 1e3:.0f}"),
                  pair(r["ttft_p90_s"], m and m["ttft_s"]["p90"], lambda v: f"{v * 1e3:.0f}"))
    console.print(t)
    if measured:
        console.print("(predicted / measured)")


def _positive_ms(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of milliseconds (e.g. 0.5)")
    return v


def cmd_calibrate(args) -> int:
    from .planner.calibrate import calibrate

    if not torch.cuda.is_available():
        raise UserError("dwdp calibrate measures a GPU machine; no CUDA device is visible here: run it on the GPU "
                        "machine, or give dwdp plan a built-in --hardware profile (h100-sxm, h200, b200, gb200-nvl72)")
    prof = calibrate(args.model or [], args.num_layers)
    prof.to_json(args.out)
    print(f"wrote {args.out}")
    return 0


def _warn_without_transformers(model: str) -> None:
    """A checkpoint with a tokenizer served without transformers answers token ids only."""
    import importlib.util

    if (Path(model).is_dir() and any((Path(model) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
            and importlib.util.find_spec("transformers") is None):
        print(f"dwdp serve: warning: {model} ships a tokenizer, but transformers is not installed: prompts must be "
              "token ids and chat requests are refused; pip install 'dwdp[serve]' for text and chat templates",
              file=sys.stderr, flush=True)


def cmd_serve(args) -> int:
    from .serve.server import Server
    from .serve.worker import ServingWorker

    # Everything a user can get wrong is checked before the model loads or a rank starts.
    check_port_free(args.host, args.port)
    _check_device(args.device)
    _model_config(args.model, args.num_layers)
    _warn_without_transformers(args.model)
    on_gpu = args.device.startswith("cuda")
    decode_spec = prefill_spec = None
    if args.decode_ranks:
        from .serve.decode_pool import DecodePoolSpec

        decode_spec = DecodePoolSpec(args.model, args.decode_ranks, args.num_layers, args.dtype,
                                     "cuda" if on_gpu else "cpu", args.expert_dtype, args.max_batch,
                                     args.max_context, args.seed, dep=options_from(DEPConfig, args))
        _plan_or_explain(decode_spec.rank_spec(), "--decode-ranks")
    if args.prefill != "local":
        from .serve.disagg import PrefillPoolSpec

        # A decode group in its own processes receives the KV through this one: host memory.
        kv_transport = args.kv_transport if args.kv_transport != "auto" else (
            "cuda_ipc" if on_gpu and not args.decode_ranks else "host")
        if kv_transport == "cuda_ipc" and args.decode_ranks:
            raise UserError("--kv-transport cuda_ipc needs decode in the server process "
                            "(drop --decode-ranks, or use --kv-transport host)")
        try:
            prefill_spec = PrefillPoolSpec(args.model, args.prefill, args.prefill_ranks, args.num_layers, args.dtype,
                                           "cuda" if on_gpu else "cpu", options_from(DWDPConfig, args),
                                           args.max_num_tokens, args.seed, expert_dtype=args.expert_dtype,
                                           hold_ms=args.prefill_hold_ms,
                                           kv_transport=kv_transport)
        except ValueError as e:
            raise UserError(f"--kv-transport: {e}") from None
        _plan_or_explain(prefill_spec.rank_spec(args.prefill_ranks), "--prefill-ranks")

    cfg, model = load_model_from_args(args)
    from .serve.server import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    decode = None
    if decode_spec is not None:
        from .serve.decode_pool import SupervisedDecodePool

        print(f"dwdp serve: starting an expert-parallel decode group of {args.decode_ranks} ranks", flush=True)
        decode = SupervisedDecodePool(decode_spec)
    if prefill_spec is None:
        worker = ServingWorker(model, args.max_num_tokens, args.max_batch, args.max_queue,
                               intra_op_threads=args.threads, max_context=args.max_context, decode=decode,
                               decode_overlap=args.decode_overlap == "on")
    else:
        from .serve.disagg import DisaggServingWorker, PrefillPool

        print(f"dwdp serve: starting a {args.prefill} prefill group of {args.prefill_ranks} ranks", flush=True)
        worker = DisaggServingWorker(model, PrefillPool(prefill_spec), args.max_batch, args.max_queue,
                                     intra_op_threads=args.threads, max_context=args.max_context, decode=decode,
                                     decode_overlap=args.decode_overlap == "on")
    if args.switch_interval_ms is not None:
        # The serving loop shares the interpreter with the HTTP threads; it waits up to one
        # switch interval for the lock whenever they hold it (Python's default is 5 ms).
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    api_key = args.api_key or os.environ.get("DWDP_API_KEY")
    names = args.served_model_name or [cfg.name or args.model]
    server = Server(worker, names, args.host, args.port, tokenizer, api_key,
                    drain_timeout_s=args.drain_timeout)
    print(f"dwdp serve: {', '.join(names)} on {args.device} at http://{args.host}:{server.port} "
          f"(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics{'; API key required' if api_key else ''})", flush=True)
    server.serve_until_signal()
    print("dwdp serve: stopped", flush=True)
    return 0


def cmd_loadtest(args) -> int:
    from .serve.loadtest import percentile_table, run_loadtest
    from .workload import WorkloadSpec

    api_key = args.api_key or os.environ.get("DWDP_API_KEY")
    wl = WorkloadSpec(num_requests=args.num_requests, isl=args.isl, dist=args.dist, ratio=args.ratio, cv=args.cv,
                      rate=args.rate, seed=args.seed)
    try:
        wl.validate(10**9)  # the server's context is checked once it answers
    except ValueError as e:
        raise UserError(f"the workload: {e}") from None
    console = _console()
    if args.sweep_concurrency:
        from .ceilings import machine_info
        from .serve.frontier import sweep

        caps = int_list(args.sweep_concurrency, "--sweep-concurrency", "1,4,16,64", minimum=1)
        res = sweep(lambda cap: run_loadtest(args.url, wl, args.max_tokens, args.gpus, cap, api_key), caps,
                    args.label, machine_info())
        failed = sum(p["failed"] for p in res["points"])
        summary = res
    else:
        summary = run_loadtest(args.url, wl, args.max_tokens, args.gpus, args.max_concurrency, api_key,
                               log=lambda m: None)
        console.print(percentile_table(summary))
        failed = summary["failed"]
        if failed:
            console.print(f"{failed} request(s) failed: " + "; ".join(summary["errors"]), highlight=False,
                          markup=False)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {args.out}")
    return 0 if failed == 0 else 1


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; give 0 to 65535 (0: any free port)")
    return v


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, unless its help already says it (or it has none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None or action.default == []
                or isinstance(action.default, bool) or action.default is argparse.SUPPRESS):  # 0 is shown
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line naming it and where to look, as every other error."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=__package__, description="DWDP: an MoE inference engine built around Distributed Weight Data "
                "Parallelism (each GPU a data-parallel worker; routed experts split across a group and pulled "
                "from peers a layer ahead).")
    p.add_argument("--version", action="version", version=f"dwdp {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="prefill prompts in this process, or in a local DWDP group with -N "
                                     "(default: a tiny model on CPU)")
    _add_run_args(run)
    run.set_defaults(func=cmd_run)
    info = sub.add_parser("info", help="parameter and byte breakdown of a model (and DWDP per-rank memory)")
    _add_model_args(info)
    info.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight dtype (default bf16)")
    _add_expert_dtype(info, "same", runs=False)
    _add_dense_dtype(info, "same")
    info.add_argument("--group-size", "-N", type=nonnegative_int, default=0,
                      help="DWDP group size N: show per-rank memory (0: do not)")
    info.add_argument("--local-experts", "-L", type=_fixed_local_count, default=None, help="DWDP local experts per rank L")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="compare dp / dep / dwdp on one seeded workload, each in its own local "
                                         "processes (default: tiny model, 2 CPU processes)")
    _add_model_args(bench)
    bench.add_argument("--device", type=_device, default="cpu", help="cpu (processes) or cuda (one GPU per rank)")
    bench.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                       help="default: float32 on cpu, bfloat16 on cuda")
    bench.add_argument("--world-size", "-W", type=positive_int, default=2, help="ranks (GPUs or CPU processes), default 2")
    bench.add_argument("--group-size", "-N", type=positive_int, default=None,
                       help="DEP / DWDP group size (default: the whole world)")
    bench.add_argument("--strategies", default="dp,dep,dwdp", help="comma-separated subset of dp,dep,dwdp")
    w = bench.add_argument_group("workload (seeded: every strategy sees the same requests)")
    w.add_argument("--num-requests", type=positive_int, default=8, help="requests in total (default 8)")
    w.add_argument("--isl", default="96",
                   help="mean input length (uniform: the maximum); comma list = sweep, shorter ISLs with proportionally "
                        "more requests (plot: dwdp report); default 96")
    w.add_argument("--dist", default="uniform", choices=["fixed", "uniform", "normal", "lognormal", "trace"],
                   help="input length distribution (default uniform)")
    w.add_argument("--ratio", type=float, default=0.5, help="uniform: lengths over [ratio*ISL, ISL] (default 0.5)")
    w.add_argument("--cv", default="0", help="normal/lognormal coefficient of variation; comma list = sweep")
    w.add_argument("--trace", default=None, help="JSONL trace: {\"input_len\": n, \"arrival\": s} per line")
    w.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests/s (default: all at once)")
    w.add_argument("--assign", default="round_robin", choices=["round_robin", "least_loaded"],
                   help="how requests are spread over ranks")
    w.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of a router bias (hot experts); 0: none")
    w.add_argument("--balance-tail", action="store_true",
                   help="dp/dwdp ranks: once every request has arrived, split the rest into equal steps (no short "
                        "last step whose pulls cannot hide); lockstep dep keeps the plain scheduler")
    w.add_argument("--seed", type=int, default=0, help="workload and random-weight seed")
    bench.add_argument("--max-num-tokens", default="256", help="MNT per step; comma list = sweep (default 256)")
    _add_options(bench, DWDPConfig, DEPConfig)
    _add_removed_flags(bench, "--pull-pacing", "--short-steps", "--ship-max-tokens")
    bench.add_argument("--hold-ms", type=float, default=3.0,
                       help="DWDP with timed arrivals (--rate, traces): hold a step below the measured break-even "
                            "size up to this long for more requests (default 3; 0: never)")
    _add_expert_dtype(bench, "auto")
    _add_dense_dtype(bench, "auto")
    _add_removed_flags(bench, "--dep-transport", "--dep-overlap")
    bench.add_argument("--peer-timeout", type=positive_float, default=120.0, help="seconds before a silent peer fails the run")
    bench.add_argument("--ceilings", action="store_true", help="GPU: also measure all-to-all bandwidth")
    bench.add_argument("--diagnostic", default=None, choices=["trace", "skip-pulls"],
                       help="trace: host timeline of DWDP slot acquires; skip-pulls: DWDP with no pulls at all "
                            "(wrong outputs: the communication-free limit of the schedule). Marked in the JSON")
    bench.add_argument("--timeout", type=positive_float, default=1800.0, help="limit per strategy run, seconds")
    bench.add_argument("--repeat", type=int, default=1,
                       help="run every setting this many times in the same processes (warm; "
                            "`dwdp report --reps` gives min / median / max)")
    bench.add_argument("--out", default="bench.json", help="JSON results file (default bench.json)")
    bench.set_defaults(func=cmd_bench)

    plan = sub.add_parser("plan", help="predict dwdp vs dep (and dp) without a GPU; --sweep, --validate")
    _add_model_args(plan)
    plan.add_argument("--hardware", default="h200",
                      help="h100-sxm, h200, b200, gb200-nvl72 (datasheet) or a `dwdp calibrate` JSON (default h200)")
    _add_expert_dtype(plan, "bf16", runs=False)
    plan.add_argument("--kernels", default="ours", choices=["ours", "vendor"],
                      help="with a datasheet profile: this engine's kernel rates (default) or vendor libraries' "
                           "(cuBLAS, CUTLASS, cuDNN attention; both measured on H200)")
    plan.add_argument("--dense-dtype", default="bf16", choices=["bf16", "fp8"],
                      help="dense projections' precision (fp8: a vendor engine on an FP8 checkpoint)")
    plan.add_argument("--group-size", "-N", type=positive_int, default=4, help="DWDP / EP group size (default 4)")
    plan.add_argument("--local-experts", "-L", type=_fixed_local_count, default=None,
                      help="DWDP experts kept per rank (default: the smallest valid L)")
    plan.add_argument("--isl", type=positive_int, default=None,
                      help="mean input length (default: 8192, or the model's context if shorter)")
    plan.add_argument("--dist", default="uniform", choices=["fixed", "uniform", "normal", "lognormal"],
                      help="input length distribution")
    plan.add_argument("--ratio", type=float, default=0.8, help="uniform: lengths over [ratio*ISL, ISL]")
    plan.add_argument("--cv", type=float, default=0.0, help="normal/lognormal: coefficient of variation of the lengths")
    plan.add_argument("--assign", default="round_robin", choices=["round_robin", "least_loaded"],
                      help="how requests are spread over ranks")
    plan.add_argument("--requests-per-rank", type=positive_int, default=8, help="requests each rank prefills")
    plan.add_argument("--max-num-tokens", type=positive_int, default=16384, help="token budget per step (MNT)")
    plan.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of expert popularity")
    plan.add_argument("--balance-tail", action="store_true", help="the engine's --balance-tail scheduling")
    plan.add_argument("--paper", action="store_true",
                      help="the model against every published DWDP number it can express (a markdown table)")
    plan.add_argument("--frontier", default=None, metavar="U1,U2,...",
                      help="target tokens/s per user: the disaggregated-serving frontier (context dwdp vs dep)")
    plan.add_argument("--osl", type=positive_int, default=1024, help="with --frontier / --colocated: output tokens per request")
    plan.add_argument("--gen-gpus", type=positive_int, default=1, help="with --frontier: GPUs per decode (DEP) group")
    plan.add_argument("--colocated", default=None, metavar="C1,C2,...",
                      help="loadtest concurrencies: predict a one-GPU `dwdp serve` (prefill in the decode loop)")
    plan.add_argument("--colocated-requests", type=positive_int, default=64, help="with --colocated: requests per point")
    plan.add_argument("--max-batch", type=positive_int, default=64, help="with --colocated: the server's decode batch limit")
    plan.add_argument("--server-anatomy", default=None, metavar="FILE",
                      help="with --colocated: a benchmarks/serve_anatomy.py JSON: the server's overhead is fitted "
                           "from it and its measured points are printed beside")
    plan.add_argument("--rate", type=positive_float, default=None,
                      help="requests/s in total (Poisson): also predict TTFT percentiles per strategy")
    plan.add_argument("--sliced", action="store_true", help="model the sliced round-robin pull plan")
    plan.add_argument("--interference", type=float, default=None,
                      help="compute slowdown while pulls run (0.07 = 7%%); default: the profile's")
    plan.add_argument("--seed", type=int, default=0, help="seed of the simulated workload")
    plan.add_argument("--memory-gib", type=float, default=None, help="memory budget per GPU (default 92%% of it)")
    plan.add_argument("--sweep", default=None, help="isl|mnt|cv|skew[=v1,v2,...]: a table (and --png)")
    plan.add_argument("--png", default=None, help="with --sweep: write a plot here")
    plan.add_argument("--validate", nargs="+", default=None, help="dwdp bench JSON files: predicted vs measured")
    plan.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    plan.set_defaults(func=cmd_plan)

    cal = sub.add_parser("calibrate", help="measure a hardware profile on this GPU machine (for dwdp plan)")
    cal.add_argument("--model", action="append", default=None,
                     help="also fit the engine's step time for this model's shape (repeatable)")
    cal.add_argument("--num-layers", type=positive_int, default=None,
                     help="with --model: keep only the first N layers (default: all)")
    cal.add_argument("--out", default="hardware.json", help="the profile's JSON file (dwdp plan --hardware FILE)")
    cal.set_defaults(func=cmd_calibrate)

    srv = sub.add_parser("serve", help="OpenAI-compatible completions and chat server (default: tiny model, "
                                       "CPU, 127.0.0.1:8000)")
    _add_model_args(srv)
    srv.add_argument("--device", type=_device, default="cpu",
                     help="where decode (and local prefill) runs: cpu or cuda[:i]")
    srv.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help="weight/activation dtype (default: float32 on cpu, bfloat16 on cuda)")
    srv.add_argument("--seed", type=int, default=0, help="seed for random weights (presets)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    srv.add_argument("--port", type=_port, default=8000, help="TCP port to listen on (0: any free port)")
    srv.add_argument("--api-key", default=None, help="require this bearer key (or set DWDP_API_KEY)")
    srv.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="the model name(s) requests may name (the first is what answers report); default: the "
                          "model's name as /v1/models lists it")
    srv.add_argument("--max-num-tokens", type=positive_int, default=8192, help="prefill token budget per step")
    srv.add_argument("--max-batch", type=positive_int, default=64, help="requests decoded together")
    _add_expert_dtype(srv, "auto")
    _add_dense_dtype(srv, "auto")
    srv.add_argument("--decode-ranks", type=nonnegative_int, default=0,
                     help="decode in an expert-parallel (DEP) group of this many processes (GPUs cuda:0..N-1 with "
                          "--device cuda), each holding E/N experts; 0: decode in the server process")
    srv.add_argument("--max-context", type=positive_int, default=None,
                     help="tokens per request (prompt + output) the decode KV cache holds; it is allocated once "
                          "for --max-batch requests (default: the model's context, at most 4096)")
    srv.add_argument("--max-queue", type=positive_int, default=256, help="requests in flight before 429")
    srv.add_argument("--threads", type=positive_int, default=1,
                     help="CPU decode: torch intra-op threads of the serving loop (default 1: a step is many tiny "
                          "ops, and a thread pool's per-op barriers stall whenever the cores are shared)")
    srv.add_argument("--prefill", default="local", choices=["local", *STRATEGIES],
                     help="local: prefill in the server process; else a prefill group of --prefill-ranks processes "
                          "(GPUs cuda:0..R-1) handing KV caches to decode here (--device, e.g. cuda:4)")
    srv.add_argument("--prefill-ranks", type=positive_int, default=2,
                     help="with --prefill dp/dep/dwdp: processes in the prefill group")
    _add_options(srv, DWDPConfig, DEPConfig)  # a DWDP prefill group; --dep-wire: --decode-ranks' DEP group
    _add_removed_flags(srv, "--pull-pacing")
    srv.add_argument("--prefill-hold-ms", type=float, default=3.0,
                     help="DWDP prefill: hold a step smaller than the measured break-even size (the tokens whose "
                          "compute hides one layer's pull) up to this long for more requests (default 3; 0: never)")
    srv.add_argument("--kv-transport", default="auto", choices=["auto", "host", "cuda_ipc"],
                     help="how a prefill rank's KV cache reaches decode: cuda_ipc = GPU to GPU (NVLink), "
                          "host = through shared host memory; auto = cuda_ipc when prefill and decode (in this "
                          "process) are on GPUs")
    srv.add_argument("--switch-interval-ms", type=_positive_ms, default=0.5,
                     help="the interpreter's thread switch interval (default 0.5; Python's own is 5): with 64 "
                          "streams on one H200 the serving loop's decode step fell from 14.7 to 11.8 ms")
    srv.add_argument("--decode-overlap", default="on", choices=["on", "off"],
                     help="launch each decode step before the host reads the previous one's tokens (default on; "
                          "off: one step at a time). Decode in this process only (not --decode-ranks)")
    srv.add_argument("--drain-timeout", type=positive_float, default=30.0,
                     help="on SIGTERM/SIGINT, seconds running requests may take to finish (default 30)")
    srv.set_defaults(func=cmd_serve)

    lt = sub.add_parser("loadtest", help="replay a workload against a dwdp serve on this machine: TTFT / TPOT / "
                                         "ITL / E2E percentiles and throughput")
    lt.add_argument("--url", default="http://127.0.0.1:8000",
                    help="the server's address (an OpenAI base URL ending in /v1 works too)")
    lt.add_argument("--num-requests", type=positive_int, default=32, help="requests in total")
    lt.add_argument("--isl", type=positive_int, default=64, help="mean input length, tokens (uniform: the maximum)")
    lt.add_argument("--dist", default="uniform", choices=["fixed", "uniform", "normal", "lognormal"],
                    help="input length distribution")
    lt.add_argument("--ratio", type=float, default=0.5, help="uniform: lengths over [ratio*ISL, ISL]")
    lt.add_argument("--cv", type=float, default=0.0, help="normal/lognormal: coefficient of variation of the lengths")
    lt.add_argument("--rate", type=positive_float, default=None, help="requests/s (Poisson); default all at once")
    lt.add_argument("--max-tokens", type=positive_int, default=16, help="output tokens per request (OSL)")
    lt.add_argument("--max-concurrency", type=positive_int, default=64, help="requests in flight at most")
    lt.add_argument("--gpus", type=positive_int, default=1, help="GPUs behind the server, for tokens/s per GPU")
    lt.add_argument("--api-key", default=None, help="the server's bearer key (default: $DWDP_API_KEY)")
    lt.add_argument("--seed", type=int, default=0, help="seed of the request lengths and token ids")
    lt.add_argument("--out", default=None, help="JSON summary")
    lt.add_argument("--sweep-concurrency", default=None,
                    help="comma-separated concurrency caps, e.g. 1,4,16,64: one load test each, written as one "
                         "frontier file (plot it with dwdp report)")
    lt.add_argument("--label", default="server", help="the frontier's name in plots (e.g. dwdp-context)")
    lt.set_defaults(func=cmd_loadtest)

    rep = sub.add_parser("report", help="PNG plots from dwdp bench / loadtest --sweep-concurrency JSON files")
    rep.add_argument("files", nargs="+", help="JSON files written by dwdp bench --out or a loadtest sweep")
    rep.add_argument("--out-dir", "-o", default="bench-report", help="directory for the PNGs (default bench-report)")
    rep.add_argument("--markdown", action="store_true", help="print markdown tables instead of plotting")
    rep.add_argument("--reps", action="store_true",
                     help="the files are repetitions: one markdown row per setting and strategy, min / median / max")
    rep.add_argument("--hardware", default=None,
                     help="with runs that sweep the ISL: draw dwdp plan's prediction (this profile: a built-in name "
                          "or a dwdp calibrate JSON) beside each measured curve in isl_sweep.png")
    rep.set_defaults(func=cmd_report)

    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """The typed errors that mean the user's input is wrong (their messages say how): printed
    as one line. Anything else is a bug and keeps its traceback."""
    from .bench.schema import SchemaError
    from .checkpoint import CheckpointError
    from .strategy.placement import PlacementError
    from .memory import DoesNotFit

    return UserError, ConfigError, CheckpointError, PlacementError, SchemaError, DoesNotFit


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"dwdp {args.cmd}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dwdp report --markdown x.json | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
