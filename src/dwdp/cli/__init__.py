"""The ``dwdp`` command line: ``run``, ``info``, ``bench``, ``report``, ``plan``, ``calibrate``,
``serve``, ``loadtest``. A user's mistake is a :class:`~dwdp.errors.UserError`, printed as one
line before any model is loaded or process spawned.

Each subcommand is a module here with its ``add_parser`` and ``cmd_*``; :mod:`.common` holds
the flags, argument types and checks several of them share."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..config import ConfigError
from ..errors import UserError
from . import bench, calibrate, info, loadtest, plan, report, run, serve

# In the order --help lists them.
COMMANDS = (run, info, bench, plan, calibrate, serve, loadtest, report)


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
    p = _Parser(prog="dwdp", description="DWDP: an MoE inference engine built around Distributed Weight Data "
                "Parallelism (each GPU a data-parallel worker; routed experts split across a group and pulled "
                "from peers a layer ahead).")
    p.add_argument("--version", action="version", version=f"dwdp {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """The typed errors that mean the user's input is wrong (their messages say how): printed
    as one line. Anything else is a bug and keeps its traceback."""
    from ..bench.schema import SchemaError
    from ..checkpoint import CheckpointError
    from ..strategy.placement import PlacementError
    from ..memory import DoesNotFit

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
