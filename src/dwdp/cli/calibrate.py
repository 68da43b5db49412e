"""``dwdp calibrate``: measure a hardware profile on this GPU machine, for ``dwdp plan``."""

from __future__ import annotations

import torch

from ..errors import UserError, positive_int


def add_parser(subparsers) -> None:
    cal = subparsers.add_parser("calibrate", help="measure a hardware profile on this GPU machine (for dwdp plan)")
    cal.add_argument("--model", action="append", default=None,
                     help="also fit the engine's step time for this model's shape (repeatable)")
    cal.add_argument("--num-layers", type=positive_int, default=None,
                     help="with --model: keep only the first N layers (default: all)")
    cal.add_argument("--out", default="hardware.json", help="the profile's JSON file (dwdp plan --hardware FILE)")
    cal.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from ..planner.calibrate import calibrate

    if not torch.cuda.is_available():
        raise UserError("dwdp calibrate measures a GPU machine; no CUDA device is visible here: run it on the GPU "
                        "machine, or give dwdp plan a built-in --hardware profile (h100-sxm, h200, b200, gb200-nvl72)")
    prof = calibrate(args.model or [], args.num_layers)
    prof.to_json(args.out)
    print(f"wrote {args.out}")
    return 0
