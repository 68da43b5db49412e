"""What several subcommands share: flag groups (the model, the strategies' options, the
experts' and projections' precision, removed flags), argument types, the checks made before
any model loads or process starts, loading a model in this process, and the console."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

import torch

from ..config import ConfigError
from ..errors import UserError, positive_int
from ..models.build import DENSE_DTYPES
from ..presets import DEFAULT_MODEL, PRESETS
from ..strategy.spec import DP, EXPERT_DTYPES, DEPConfig, DWDPConfig, local_count, options_from


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


def _device(text: str) -> str:
    """argparse type for --device: cpu, cuda or cuda:i (checked against this machine later)."""
    if text == "cpu" or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give cpu, cuda or cuda:N")


def _rank_spec(args, strategy: str = DP, group_size: int = 1):
    from ..strategy.spec import RankSpec

    return RankSpec(model=args.model, strategy=strategy, num_layers=args.num_layers, dtype=args.dtype,
                    device="cuda" if args.device.startswith("cuda") else "cpu", group_size=group_size,
                    expert_dtype=getattr(args, "expert_dtype", "auto"), dense_dtype=getattr(args, "dense_dtype", "auto"),
                    dwdp=options_from(DWDPConfig, args), dep=options_from(DEPConfig, args), seed=args.seed,
                    max_num_tokens=args.max_num_tokens, peer_timeout_s=getattr(args, "peer_timeout", 60.0))


def load_model_from_args(args):
    """The whole model in this process (``dwdp run`` on one device, the decode model of
    ``dwdp serve``): a dp rank on its own."""
    from ..parallel.group import DWDPContext
    from ..parallel.rank import build_rank

    rank = build_rank(_rank_spec(args), DWDPContext.single(args.device), progress=sys.stderr.isatty())
    return rank.cfg, rank.model


def _model_config(model: str, num_layers: int | None):
    """The model's config, and its checkpoint's files checked from their headers (whole, no
    integer weights) before any process builds the model."""
    from ..checkpoint import check_files
    from ..presets import resolve_model

    cfg, ckpt = resolve_model(model, num_layers)
    if ckpt is not None:
        check_files(ckpt)
    return cfg


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


def _plan_or_explain(rank_spec, flag: str):
    """Plan every rank of a group from the model's config (no weights, no processes): an
    impossible group (more ranks than experts, no valid placement) is one line here, not a
    traceback from each spawned rank."""
    from ..strategy.placement import PlacementError
    from ..parallel.rank import plan_group
    from ..parallel.strategies import get_strategy
    from ..presets import resolve_model

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


def _profile(name: str):
    from ..planner.hardware import resolve_profile

    try:
        return resolve_profile(name)
    except ValueError as e:
        raise UserError(str(e)) from None
