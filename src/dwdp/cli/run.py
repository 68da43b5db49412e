"""``dwdp run``: prefill prompts in this process, or in a local group of ranks with -N."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ..config import DTYPES
from ..errors import UserError, int_list, positive_float, positive_int
from ..strategy.registry import STRATEGIES
from ..strategy.spec import DWDP, DEPConfig, DWDPConfig
from .common import (_add_dense_dtype, _add_expert_dtype, _add_model_args, _add_options, _add_removed_flags,
                     _check_device, _console, _device, _model_config, _plan_or_explain, _rank_spec,
                     load_model_from_args)


def add_parser(subparsers) -> None:
    run = subparsers.add_parser("run", help="prefill prompts in this process, or in a local DWDP group with -N "
                                            "(default: a tiny model on CPU)")
    _add_run_args(run)
    run.set_defaults(func=cmd_run)


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


def _check_context(lengths: list[int], max_len: int, flag: str) -> None:
    if lengths and max(lengths) > max_len:
        raise UserError(f"{flag}: a prompt of {max(lengths)} tokens is longer than the model's context "
                        f"({max_len} tokens, max_position_embeddings); give shorter prompts")


def cmd_run(args) -> int:
    from rich.table import Table

    from ..engine import PrefillEngine, Request

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

    from ..parallel.launch import PrefillRun, SpawnError, run_prefill_group

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
