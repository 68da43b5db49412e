"""The ``dwdp`` command line: ``run`` (prefill), ``info`` (where the bytes are), ``dwdp``
(a DWDP group of local processes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from .config import DTYPES, ConfigError
from .parallel.strategies import BASELINE, DEP, DP, DWDP, STRATEGIES
from .presets import DEFAULT_MODEL, PRESETS


def _console():
    from rich.console import Console

    # Wide enough for our tables when output goes to a file or a pipe (rich assumes 80).
    return Console() if sys.stdout.isatty() else Console(width=160)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset ({', '.join(PRESETS)}) or a Hugging Face checkpoint directory "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first N layers")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weight/activation dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--prompt", action="append", default=[],
                   help="comma-separated token ids; repeat for several prompts")
    p.add_argument("--lengths", default="16,48,7,100",
                   help="random prompts of these lengths when no --prompt is given (default: 16,48,7,100)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and prompts")
    p.add_argument("--max-num-tokens", type=int, default=8192, help="token budget per step (MNT)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    d = p.add_argument_group("DWDP (several processes; under torchrun each process is one rank)")
    d.add_argument("--group-size", "-N", type=int, default=1, help="DWDP group size N (1: a single process)")
    d.add_argument("--strategy", default=DWDP, choices=list(STRATEGIES),
                   help="how the group shares the experts (default dwdp; dep and dp for comparison)")
    d.add_argument("--expert-dtype", default="auto", choices=["auto", "same", "fp8"],
                   help="routed experts: auto = as the checkpoint ships them (FP8 releases stay FP8), same = the "
                        "model dtype, fp8 = e4m3 with 128x128 block scales (quantised at load)")
    d.add_argument("--dense-dtype", default="auto", choices=["auto", "same", "fp8"],
                   help="attention / dense MLP / shared-expert projections, as --expert-dtype")
    d.add_argument("--copy-streams", type=int, default=1, help="DWDP copy streams per rank (default 1)")
    d.add_argument("--pull-pacing", default="off", choices=["off", "jit"],
                   help="DWDP pulls: off = as fast as possible; jit = each stretched to end just before its MoE "
                        "(less HBM taken from the compute it overlaps; rates measured on the run's own steps)")
    d.add_argument("--short-steps", default="pull", choices=["pull", "ship", "auto"],
                   help="DWDP steps too short to hide their pulls: pull (default), ship = every step of at most "
                        "--ship-max-tokens sends its tokens to the experts' owners instead, auto = those below the "
                        "measured break-even size ship (on GPUs experimental: needs DWDP_EXPERIMENTAL_SHIPPING=1)")
    d.add_argument("--ship-max-tokens", type=int, default=2048, help="largest step that may ship (default 2048)")
    d.add_argument("--world-size", type=int, default=None, help="local processes to spawn (default N; W/N groups)")
    d.add_argument("--local-experts", "-L", type=_local_count, default=None,
                   help="experts each rank keeps per MoE layer (default: the smallest valid L; auto: the "
                        "largest that fits the GPU, so fewer are pulled)")
    d.add_argument("--peer-timeout", type=float, default=60.0,
                   help="seconds without a peer heartbeat before the group fails (default 60)")
    d.add_argument("--slice-mb", type=float, default=None,
                   help="cut pulls into slices of this many MiB issued round-robin over peers")
    d.add_argument("--timeout", type=float, default=1800.0, help="overall limit for spawned runs, seconds")


def _prompts(args, vocab: int) -> list[list[int]]:
    if args.prompt:
        try:
            return [[int(t) for t in p.split(",") if t.strip()] for p in args.prompt]
        except ValueError:
            raise SystemExit("error: --prompt takes comma-separated integer token ids, e.g. --prompt 1,2,3")
    g = torch.Generator().manual_seed(args.seed + 1)
    lengths = [int(x) for x in args.lengths.split(",")]
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _rank_spec(args, strategy: str = DP, group_size: int = 1):
    from .parallel.rank import RankSpec

    return RankSpec(model=args.model, strategy=strategy, num_layers=args.num_layers, dtype=args.dtype,
                    device="cuda" if args.device.startswith("cuda") else "cpu", group_size=group_size,
                    local_experts=getattr(args, "local_experts", None),
                    expert_dtype=getattr(args, "expert_dtype", "auto"), slice_mb=getattr(args, "slice_mb", None),
                    dense_dtype=getattr(args, "dense_dtype", "auto"),
                    copy_streams=getattr(args, "copy_streams", 1), pull_pacing=getattr(args, "pull_pacing", "off"),
                    short_steps=getattr(args, "short_steps", "pull"),
                    ship_max_tokens=getattr(args, "ship_max_tokens", 2048), seed=args.seed,
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
    if args.group_size > 1 or (args.world_size or 1) > 1:
        return _cmd_run_dwdp(args, console)
    t0 = time.perf_counter()
    cfg, model = load_model_from_args(args)
    load_s = time.perf_counter() - t0
    prompts = _prompts(args, cfg.vocab_size)
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": args.device, "tokens": ntok, "forward_s": step_s,
                       "tokens_per_s": ntok / step_s,
                       "results": [{"id": r.id, "prompt_len": r.prompt_len, "next_token": r.next_token,
                                    "ttft_s": r.ttft} for r in results]}, f, indent=2)
    return 0


def _cmd_run_dwdp(args, console) -> int:
    from rich.table import Table

    from .parallel.launch import PrefillRun, SpawnError, run_prefill_group
    from .presets import resolve_model

    cfg, _ = resolve_model(args.model, args.num_layers)
    prompts = _prompts(args, cfg.vocab_size)
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
    if args.json:
        path = args.json
        if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: a file per rank
            stem, ext = os.path.splitext(path)
            path = f"{stem}.rank{os.environ['RANK']}{ext}"
        with open(path, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "results"} | {"results": [
                {k: v for k, v in x.items() if k != "logits"} for x in r["results"]]} for r in ranks], f, indent=2)
    return 0


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_info(args) -> int:
    from rich.table import Table

    from .info import dwdp_rank_memory, param_breakdown
    from .parallel.placement import Placement
    from .presets import resolve_model

    from .quant import bytes_per_expert_weight

    cfg, _ = resolve_model(args.model, args.num_layers)
    bpp = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    ebpp = bytes_per_expert_weight(DTYPES[args.dtype] if args.expert_dtype == "same" else args.expert_dtype)
    dbpp = bpp if args.dense_dtype == "same" else bytes_per_expert_weight("fp8")  # projections
    pb = param_breakdown(cfg)
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
    if args.group_size:
        pl = Placement.create(cfg.num_experts, args.group_size, args.local_experts)
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
    from .kv_cache import cache_bytes_per_token

    kv = cache_bytes_per_token(cfg, DTYPES[args.dtype])
    console.print(f"decode KV cache: {_fmt_bytes(kv)} per token (all layers{', compressed MLA latent' if cfg.is_mla else ''});"
                  f" dwdp serve allocates --max-batch x --max-context of it, e.g. 64 x 8192 = {_fmt_bytes(64 * 8192 * kv)}")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: expected comma-separated numbers, got {text!r}")


def _local_count(text: str) -> int | str:
    """-L: a number of experts, or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of experts or 'auto'") from None


def cmd_bench(args) -> int:
    from .bench.runner import comparison_table, sweep, write_json
    from .bench.worker import BenchSpec
    from .ceilings import machine_info
    from .parallel.launch import SpawnError
    from .presets import resolve_model
    from .workload import WorkloadSpec

    console = _console()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise SystemExit(f"error: unknown strategy {', '.join(bad)}; choose from {', '.join(STRATEGIES)}")
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is visible; use --device cpu")
        if torch.cuda.device_count() < args.world_size:
            raise SystemExit(f"error: --world-size {args.world_size} needs {args.world_size} GPUs; "
                             f"{torch.cuda.device_count()} visible")
    cfg, _ = resolve_model(args.model, args.num_layers)
    cvs = _floats(args.cv)
    mnts = [int(x) for x in _floats(args.max_num_tokens)]
    try:
        isls = [int(x) for x in args.isl.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --isl takes whole token counts, e.g. 8192 or 1024,2048 (got {args.isl!r})") from None
    if not isls:
        raise SystemExit("error: --isl needs at least one length")
    workload = WorkloadSpec(num_requests=args.num_requests, isl=isls[0], dist=args.dist, ratio=args.ratio,
                            cv=cvs[0], trace=args.trace, rate=args.rate, assign=args.assign, seed=args.seed)
    for isl in isls:
        dataclasses.replace(workload, isl=isl).validate(cfg.max_position_embeddings)
    spec = BenchSpec(model=args.model, num_layers=args.num_layers, dtype=args.dtype, device=device,
                     world_size=args.world_size, group_size=args.group_size, strategies=strategies,
                     workload=workload, max_num_tokens=mnts[0], skew=args.skew, balance_tail=args.balance_tail, local_experts=args.local_experts,
                     slice_mb=args.slice_mb, copy_streams=args.copy_streams, pull_pacing=args.pull_pacing,
                     short_steps=args.short_steps, ship_max_tokens=args.ship_max_tokens, hold_ms=args.hold_ms,
                     expert_dtype=args.expert_dtype, dense_dtype=args.dense_dtype,
                     dep_transport=args.dep_transport, dep_overlap=args.dep_overlap, dep_wire=args.dep_wire,
                     seed=args.seed,
                     peer_timeout_s=args.peer_timeout,
                     ceilings=args.ceilings, diagnostic=args.diagnostic, progress=sys.stderr.isatty())
    if args.world_size % spec.n:
        raise SystemExit(f"error: --world-size {args.world_size} is not a multiple of --group-size {spec.n}")
    if args.repeat < 1:
        raise SystemExit(f"error: --repeat {args.repeat}: give at least 1 (the number of runs of each setting)")
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


def cmd_report(args) -> int:
    from .bench.report import render
    from .serve import frontier

    fronts = [p for p in args.files if frontier.is_frontier(p)]
    args.files = [p for p in args.files if p not in fronts]
    if fronts:
        print(frontier.markdown(fronts) if args.markdown else f"wrote {frontier.render(fronts, args.out_dir)}")
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
        from .planner.hardware import resolve_profile

        hw = resolve_profile(args.hardware)
    for p in render(args.files, args.out_dir, hw):
        print(f"wrote {p}")
    return 0


def _plan_input(args):
    from .planner.hardware import resolve_profile, with_kernels
    from .planner.plan import PlanInput
    from .presets import resolve_model
    from .workload import WorkloadSpec

    cfg, _ = resolve_model(args.model, args.num_layers)
    if not cfg.name:  # a bare config.json: name it after its path (ModelConfig is frozen)
        cfg = dataclasses.replace(cfg, name=args.model)
    hw = with_kernels(resolve_profile(args.hardware), args.kernels)
    if args.interference is not None:
        hw = dataclasses.replace(hw, interference=args.interference)
    wl = WorkloadSpec(num_requests=args.requests_per_rank, isl=args.isl, dist=args.dist, ratio=args.ratio,
                      cv=args.cv, assign=args.assign, seed=args.seed, rate=args.rate)
    wl.validate(cfg.max_position_embeddings)
    return PlanInput(cfg, hw, args.expert_dtype, args.group_size, args.local_experts, wl, args.max_num_tokens,
                     args.skew, args.sliced, args.balance_tail, args.dense_dtype)


def cmd_plan(args) -> int:
    from rich.table import Table

    from .parallel.replica import FIT_HEADROOM
    from .planner.plan import crossover, memory_per_gpu, predict_all, recommend, sweep, validate

    console = _console()
    if args.validate:
        from .bench.schema import load_runs
        from .planner.hardware import resolve_profile

        hw = resolve_profile(args.hardware)
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
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    if args.paper:
        from .planner.paper import markdown, paper_points

        pts = paper_points()
        print(markdown(pts))
        errs = [abs(p.error) for p in pts]
        print(f"\n{sum(e <= 0.05 for e in errs)} of {len(pts)} within 5%, {sum(e <= 0.15 for e in errs)} within 15%")
        if args.json:
            with open(args.json, "w") as f:
                json.dump([dataclasses.asdict(p) | {"error": p.error} for p in pts], f, indent=1)
        return 0
    p = _plan_input(args)
    hw = p.hw
    console.print(f"[bold]{p.cfg.name}[/bold] ({p.cfg.num_layers} layers, E={p.cfg.num_experts}, top-{p.cfg.top_k}), "
                  f"experts {p.expert_dtype}; hardware {hw.name} ({hw.source}); "
                  f"{p.workload.describe().replace(str(p.workload.num_requests) + ' requests', str(p.workload.num_requests) + ' requests per rank')}, "
                  f"MNT {p.mnt}, skew {p.skew:g}", highlight=False)
    if args.sweep:
        what, _, vals = args.sweep.partition("=")
        values = [float(v) for v in vals.split(",")] if vals else {
            "isl": [1024, 2048, 4096, 8192, 16384, 32768], "mnt": [4096, 8192, 16384, 32768, 65536],
            "cv": [0, 0.1, 0.2, 0.3, 0.5], "skew": [0, 0.5, 1.0, 1.5]}.get(what, [])
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
        if args.json:
            with open(args.json, "w") as f:
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
        if name == DEP:
            note = (f"all-to-all {100 * x.extra['a2a_s'] * p.group_size / sum(x.busy_s):.1f}%, "
                    f"waiting for the slowest rank {100 * x.extra['sync_share']:.1f}%")
        elif name == DWDP:
            wait = sum(x.extra["exposed_wait_s"]) / sum(x.busy_s)
            note = f"pull {x.extra['pull_s_per_layer'] * 1e3:.1f} ms per MoE layer, exposed {100 * wait:.1f}%"
        else:
            note = "compute only"
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
        targets = [float(u) for u in args.frontier.split(",")]
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
    if args.colocated:
        _print_colocated(console, p, args)
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: {"tps_per_gpu": x.tps_per_gpu, "busy_s": x.busy_s, "makespan_s": x.makespan_s}
                       for name, x in pr.items()} | {"crossover": rows, "candidates": cands}, f, indent=1, default=float)
    return 0


def _print_colocated(console, p, args) -> None:
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
            raise SystemExit(f"--server-anatomy {args.server_anatomy}: not a benchmarks/serve_anatomy.py JSON ({e})")
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
    for c in (int(x) for x in args.colocated.split(",")):
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

    prof = calibrate(args.model or [], args.num_layers)
    prof.to_json(args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_serve(args) -> int:
    import os

    from .serve.server import Server
    from .serve.worker import ServingWorker

    cfg, model = load_model_from_args(args)
    from .serve.server import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    decode = None
    if args.decode_ranks:
        from .serve.decode_pool import DecodePoolSpec, SupervisedDecodePool

        print(f"dwdp serve: starting an expert-parallel decode group of {args.decode_ranks} ranks", flush=True)
        decode = SupervisedDecodePool(DecodePoolSpec(
            args.model, args.decode_ranks, args.num_layers, args.dtype, "cuda" if args.device.startswith("cuda") else "cpu",
            args.expert_dtype, args.max_batch, args.max_context, args.seed))
    if args.prefill == "local":
        worker = ServingWorker(model, args.max_num_tokens, args.max_batch, args.max_queue,
                               intra_op_threads=args.threads, max_context=args.max_context, decode=decode,
                               decode_overlap=args.decode_overlap == "on")
    else:
        from .serve.disagg import DisaggServingWorker, PrefillPool, PrefillPoolSpec

        on_gpu = args.device.startswith("cuda")
        # A decode group in its own processes receives the KV through this one: host memory.
        kv_transport = args.kv_transport if args.kv_transport != "auto" else (
            "cuda_ipc" if on_gpu and not args.decode_ranks else "host")
        if kv_transport == "cuda_ipc" and args.decode_ranks:
            raise SystemExit("dwdp serve: --kv-transport cuda_ipc needs decode in the server process "
                             "(drop --decode-ranks, or use --kv-transport host)")
        spec = PrefillPoolSpec(args.model, args.prefill, args.prefill_ranks, args.num_layers, args.dtype,
                               "cuda" if on_gpu else "cpu", args.local_experts,
                               args.max_num_tokens, args.seed, expert_dtype=args.expert_dtype,
                               pull_pacing=args.pull_pacing, hold_ms=args.prefill_hold_ms, kv_transport=kv_transport)
        print(f"dwdp serve: starting a {args.prefill} prefill group of {args.prefill_ranks} ranks", flush=True)
        worker = DisaggServingWorker(model, PrefillPool(spec), args.max_batch, args.max_queue,
                                     intra_op_threads=args.threads, max_context=args.max_context, decode=decode,
                                     decode_overlap=args.decode_overlap == "on")
    if args.switch_interval_ms is not None:
        # The serving loop shares the interpreter with the HTTP threads; it waits up to one
        # switch interval for the lock whenever they hold it (Python's default is 5 ms).
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    api_key = args.api_key or os.environ.get("DWDP_API_KEY")
    server = Server(worker, cfg.name or args.model, args.host, args.port, tokenizer, api_key,
                    drain_timeout_s=args.drain_timeout)
    print(f"dwdp serve: {cfg.name or args.model} on {args.device} at http://{args.host}:{server.port} "
          f"(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics{'; API key required' if api_key else ''})", flush=True)
    server.serve_until_signal()
    print("dwdp serve: stopped", flush=True)
    return 0


def cmd_loadtest(args) -> int:
    from .serve.loadtest import run_loadtest
    from .workload import WorkloadSpec

    wl = WorkloadSpec(num_requests=args.num_requests, isl=args.isl, dist=args.dist, ratio=args.ratio, cv=args.cv,
                      rate=args.rate, seed=args.seed)
    if args.sweep_concurrency:
        from .ceilings import machine_info
        from .serve.frontier import sweep

        caps = [int(c) for c in args.sweep_concurrency.split(",")]
        res = sweep(lambda cap: run_loadtest(args.url, wl, args.max_tokens, args.gpus, cap, args.api_key), caps,
                    args.label, machine_info())
        failed = sum(p["failed"] for p in res["points"])
        summary = res
    else:
        summary = run_loadtest(args.url, wl, args.max_tokens, args.gpus, args.max_concurrency, args.api_key)
        failed = summary["failed"]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {args.out}")
    return 0 if failed == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=__package__, description="DWDP: an MoE prefill engine built around "
                                "Distributed Weight Data Parallelism.")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="prefill prompts on one device (default: a tiny model on CPU)")
    _add_run_args(run)
    run.set_defaults(func=cmd_run)
    info = sub.add_parser("info", help="parameter and byte breakdown of a model (and DWDP per-rank memory)")
    _add_model_args(info)
    info.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight dtype (default bf16)")
    info.add_argument("--expert-dtype", default="same", choices=["same", "fp8", "fp4"],
                      help="routed expert storage format (default: same as --dtype)")
    info.add_argument("--dense-dtype", default="same", choices=["same", "fp8"],
                      help="attention / dense MLP / shared-expert projections (default: same as --dtype)")
    info.add_argument("--group-size", "-N", type=int, default=0, help="DWDP group size N: show per-rank memory")
    info.add_argument("--local-experts", "-L", type=int, default=None, help="DWDP local experts per rank L")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="compare dp / dep / dwdp on one seeded workload (default: tiny, CPU)")
    _add_model_args(bench)
    bench.add_argument("--device", default="cpu", help="cpu (processes) or cuda (one GPU per rank)")
    bench.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                       help="default: float32 on cpu, bfloat16 on cuda")
    bench.add_argument("--world-size", "-W", type=int, default=2, help="ranks (GPUs or CPU processes), default 2")
    bench.add_argument("--group-size", "-N", type=int, default=None,
                       help="DEP / DWDP group size (default: the whole world)")
    bench.add_argument("--strategies", default="dp,dep,dwdp", help="comma-separated subset of dp,dep,dwdp")
    w = bench.add_argument_group("workload (seeded: every strategy sees the same requests)")
    w.add_argument("--num-requests", type=int, default=8, help="requests in total (default 8)")
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
    bench.add_argument("--local-experts", "-L", type=_local_count, default=None,
                       help="DWDP experts kept per rank (auto: the largest that fits the GPU)")
    bench.add_argument("--slice-mb", type=float, default=None, help="DWDP pull slices of this many MiB")
    bench.add_argument("--copy-streams", type=int, default=1,
                       help="DWDP copy streams per rank (slices go round-robin over them; default 1)")
    bench.add_argument("--pull-pacing", default="off", choices=["off", "jit"],
                       help="DWDP pulls: off = as fast as possible; jit = each stretched to end just before its MoE")
    bench.add_argument("--short-steps", default="pull", choices=["pull", "ship", "auto"],
                       help="DWDP steps too short to hide their pulls: pull (default), ship = every step of at most "
                        "--ship-max-tokens sends its tokens to the experts' owners instead, auto = those below the "
                        "measured break-even size ship (on GPUs experimental: needs DWDP_EXPERIMENTAL_SHIPPING=1)")
    bench.add_argument("--ship-max-tokens", type=int, default=2048, help="largest step that may ship (default 2048)")
    bench.add_argument("--hold-ms", type=float, default=3.0,
                       help="DWDP with timed arrivals (--rate, traces): hold a step below the measured break-even "
                            "size up to this long for more requests (default 3; 0: never)")
    bench.add_argument("--expert-dtype", default="auto", choices=["auto", "same", "fp8"],
                       help="fp8: quantise routed experts to e4m3 with 128x128 block scales at load")
    bench.add_argument("--dense-dtype", default="auto", choices=["auto", "same", "fp8"],
                       help="projections: auto = as the checkpoint ships them, same = the model dtype, fp8 = e4m3 "
                            "with 128x128 block scales (quantised at load)")
    bench.add_argument("--dep-transport", default="nccl", choices=["nccl", "symm"],
                       help="DEP all-to-all: nccl (all_to_all_single) or symm (NVSHMEM one-sided, GPU)")
    bench.add_argument("--dep-overlap", action="store_true",
                       help="DEP two-batch overlap: one micro-batch's all-to-all under the other's experts")
    bench.add_argument("--dep-wire", default="auto", choices=["auto", "native", "fp8"],
                       help="DEP dispatch rows: auto = FP8 with 1x128 scales when experts are FP8")
    bench.add_argument("--peer-timeout", type=float, default=120.0, help="seconds before a silent peer fails the run")
    bench.add_argument("--ceilings", action="store_true", help="GPU: also measure all-to-all bandwidth")
    bench.add_argument("--diagnostic", default=None, choices=["trace", "skip-pulls"],
                       help="trace: host timeline of DWDP slot acquires; skip-pulls: DWDP with no pulls at all "
                            "(wrong outputs: the communication-free limit of the schedule). Marked in the JSON")
    bench.add_argument("--timeout", type=float, default=1800.0, help="limit per strategy run, seconds")
    bench.add_argument("--repeat", type=int, default=1,
                       help="run every setting this many times in the same processes (warm; "
                            "`dwdp report --reps` gives min / median / max)")
    bench.add_argument("--out", default="bench.json", help="JSON results file (default bench.json)")
    bench.set_defaults(func=cmd_bench)

    plan = sub.add_parser("plan", help="predict dwdp vs dep (and dp) without a GPU; --sweep, --validate")
    _add_model_args(plan)
    plan.add_argument("--hardware", default="h200",
                      help="h100-sxm, h200, b200, gb200-nvl72 (datasheet) or a `dwdp calibrate` JSON (default h200)")
    plan.add_argument("--expert-dtype", default="bf16", choices=["bf16", "fp8", "fp4"])
    plan.add_argument("--kernels", default="ours", choices=["ours", "vendor"],
                      help="with a datasheet profile: this engine's kernel rates (default) or vendor libraries' "
                           "(cuBLAS, CUTLASS, cuDNN attention; both measured on H200)")
    plan.add_argument("--dense-dtype", default="bf16", choices=["bf16", "fp8"],
                      help="dense projections' precision (fp8: a vendor engine on an FP8 checkpoint)")
    plan.add_argument("--group-size", "-N", type=int, default=4, help="DWDP / EP group size (default 4)")
    plan.add_argument("--local-experts", "-L", type=int, default=None)
    plan.add_argument("--isl", type=int, default=8192)
    plan.add_argument("--dist", default="uniform", choices=["fixed", "uniform", "normal", "lognormal"])
    plan.add_argument("--ratio", type=float, default=0.8)
    plan.add_argument("--cv", type=float, default=0.0)
    plan.add_argument("--assign", default="round_robin", choices=["round_robin", "least_loaded"])
    plan.add_argument("--requests-per-rank", type=int, default=8)
    plan.add_argument("--max-num-tokens", type=int, default=16384)
    plan.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of expert popularity")
    plan.add_argument("--balance-tail", action="store_true", help="the engine's --balance-tail scheduling")
    plan.add_argument("--paper", action="store_true",
                      help="the model against every published DWDP number it can express (a markdown table)")
    plan.add_argument("--frontier", default=None, metavar="U1,U2,...",
                      help="target tokens/s per user: the disaggregated-serving frontier (context dwdp vs dep)")
    plan.add_argument("--osl", type=int, default=1024, help="with --frontier / --colocated: output tokens per request")
    plan.add_argument("--gen-gpus", type=int, default=1, help="with --frontier: GPUs per decode (DEP) group")
    plan.add_argument("--colocated", default=None, metavar="C1,C2,...",
                      help="loadtest concurrencies: predict a one-GPU `dwdp serve` (prefill in the decode loop)")
    plan.add_argument("--colocated-requests", type=int, default=64, help="with --colocated: requests per point")
    plan.add_argument("--max-batch", type=int, default=64, help="with --colocated: the server's decode batch limit")
    plan.add_argument("--server-anatomy", default=None, metavar="FILE",
                      help="with --colocated: a benchmarks/serve_anatomy.py JSON: the server's overhead is fitted "
                           "from it and its measured points are printed beside")
    plan.add_argument("--rate", type=float, default=None,
                      help="requests/s in total (Poisson): also predict TTFT percentiles per strategy")
    plan.add_argument("--sliced", action="store_true", help="model the sliced round-robin pull plan")
    plan.add_argument("--interference", type=float, default=None,
                      help="compute slowdown while pulls run (0.07 = 7%%); default: the profile's")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--memory-gib", type=float, default=None, help="memory budget per GPU (default 92%% of it)")
    plan.add_argument("--sweep", default=None, help="isl|mnt|cv|skew[=v1,v2,...]: a table (and --png)")
    plan.add_argument("--png", default=None, help="with --sweep: write a plot here")
    plan.add_argument("--validate", nargs="+", default=None, help="dwdp bench JSON files: predicted vs measured")
    plan.add_argument("--json", default=None, help="also write the numbers here")
    plan.set_defaults(func=cmd_plan)

    cal = sub.add_parser("calibrate", help="measure a hardware profile on this GPU machine")
    cal.add_argument("--model", action="append", default=None,
                     help="also fit the engine's step time for this model's shape (repeatable)")
    cal.add_argument("--num-layers", type=int, default=None)
    cal.add_argument("--out", default="hardware.json")
    cal.set_defaults(func=cmd_calibrate)

    srv = sub.add_parser("serve", help="OpenAI-compatible completions server (default: tiny model, CPU)")
    _add_model_args(srv)
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    srv.add_argument("--seed", type=int, default=0, help="seed for random weights (presets)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require this bearer key (or set DWDP_API_KEY)")
    srv.add_argument("--max-num-tokens", type=int, default=8192, help="prefill token budget per step")
    srv.add_argument("--max-batch", type=int, default=64, help="requests decoded together")
    srv.add_argument("--expert-dtype", default="auto", choices=["auto", "same", "fp8"],
                     help="routed experts as stored (auto), in the model dtype (same) or FP8 (fp8)")
    srv.add_argument("--dense-dtype", default="auto", choices=["auto", "same", "fp8"],
                     help="projections as stored (auto), in the model dtype (same) or FP8 (fp8)")
    srv.add_argument("--decode-ranks", type=int, default=0,
                     help="decode in an expert-parallel (DEP) group of this many processes (GPUs cuda:0..N-1 with "
                          "--device cuda), each holding E/N experts; 0: decode in the server process")
    srv.add_argument("--max-context", type=int, default=None,
                     help="tokens per request (prompt + output) the decode KV cache holds; it is allocated once "
                          "for --max-batch requests (default: the model's context, at most 4096)")
    srv.add_argument("--max-queue", type=int, default=256, help="requests in flight before 429")
    srv.add_argument("--threads", type=int, default=1,
                     help="CPU decode: torch intra-op threads of the serving loop (default 1: a step is many tiny "
                          "ops, and a thread pool's per-op barriers stall whenever the cores are shared)")
    srv.add_argument("--prefill", default="local", choices=["local", *STRATEGIES],
                     help="local: prefill in the server process; else a prefill group of --prefill-ranks processes "
                          "(GPUs cuda:0..R-1) handing KV caches to decode here (--device, e.g. cuda:4)")
    srv.add_argument("--prefill-ranks", type=int, default=2)
    srv.add_argument("--local-experts", "-L", type=_local_count, default=None,
                     help="DWDP prefill: experts kept per rank (auto: the largest that fits the GPU)")
    srv.add_argument("--pull-pacing", default="off", choices=["off", "jit"],
                     help="DWDP prefill pulls: off = as fast as possible; jit = each ends just before its MoE")
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
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on SIGTERM/SIGINT, seconds running requests may take to finish (default 30)")
    srv.set_defaults(func=cmd_serve)

    lt = sub.add_parser("loadtest", help="replay a workload against a local dwdp serve")
    lt.add_argument("--url", default="http://127.0.0.1:8000")
    lt.add_argument("--num-requests", type=int, default=32)
    lt.add_argument("--isl", type=int, default=64)
    lt.add_argument("--dist", default="uniform", choices=["fixed", "uniform", "normal", "lognormal"])
    lt.add_argument("--ratio", type=float, default=0.5)
    lt.add_argument("--cv", type=float, default=0.0)
    lt.add_argument("--rate", type=float, default=None, help="requests/s (Poisson); default all at once")
    lt.add_argument("--max-tokens", type=int, default=16, help="output tokens per request (OSL)")
    lt.add_argument("--max-concurrency", type=int, default=64)
    lt.add_argument("--gpus", type=int, default=1, help="GPUs behind the server, for tokens/s per GPU")
    lt.add_argument("--api-key", default=None)
    lt.add_argument("--seed", type=int, default=0)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
