"""``dwdp report``: plots and markdown tables from ``dwdp bench`` and loadtest sweep files."""

from __future__ import annotations

from ..errors import UserError
from .common import _profile


def add_parser(subparsers) -> None:
    rep = subparsers.add_parser("report", help="PNG plots from dwdp bench / loadtest --sweep-concurrency JSON files")
    rep.add_argument("files", nargs="+", help="JSON files written by dwdp bench --out or a loadtest sweep")
    rep.add_argument("--out-dir", "-o", default="bench-report", help="directory for the PNGs (default bench-report)")
    rep.add_argument("--markdown", action="store_true", help="print markdown tables instead of plotting")
    rep.add_argument("--reps", action="store_true",
                     help="the files are repetitions: one markdown row per setting and strategy, min / median / max")
    rep.add_argument("--hardware", default=None,
                     help="with runs that sweep the ISL: draw dwdp plan's prediction (this profile: a built-in name "
                          "or a dwdp calibrate JSON) beside each measured curve in isl_sweep.png")
    rep.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from ..bench.report import render
    from ..serve import frontier

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
        from ..bench.report import repetitions_markdown

        print(repetitions_markdown(args.files))
        return 0
    if args.markdown:
        from ..bench.report import markdown

        print(markdown(args.files))
        return 0
    hw = None
    if args.hardware:
        hw = _profile(args.hardware)
    for p in render(args.files, args.out_dir, hw):
        print(f"wrote {p}")
    return 0
