"""The user's mistakes, told in one line.

A :class:`UserError` is raised where the problem is found and says what is wrong and how to
fix it; ``dwdp``'s ``main`` prints it as ``dwdp <command>: error: <message>`` and exits 2,
with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import socket


class UserError(ValueError):
    """Bad input, a busy port, an unusable file: the message names the problem and the fix.

    A ``ValueError`` so library callers that already catch those keep working."""


def _whole_number(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {least} or more") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"{v} is not allowed; give {least} or more")
    return v


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``-N 0`` is refused, not read as 1)."""
    return _whole_number(text, 1)


def nonnegative_int(text: str) -> int:
    return _whole_number(text, 0)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number")
    return v


def int_list(text: str, flag: str, example: str = "1,2,3", minimum: int | None = None) -> list[int]:
    """A comma-separated list of whole numbers; an empty item (``1,,2``) or a non-number is
    an error, never skipped."""
    items = [t.strip() for t in text.split(",")]
    try:
        if not text.strip() or any(not t for t in items):
            raise ValueError
        values = [int(t) for t in items]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated whole numbers with none empty, e.g. "
                        f"{flag} {example}") from None
    if minimum is not None and any(v < minimum for v in values):
        raise UserError(f"{flag} {text!r}: every value must be at least {minimum}")
    return values


def float_list(text: str, flag: str, example: str = "0,0.1,0.2") -> list[float]:
    items = [t.strip() for t in text.split(",")]
    try:
        if not text.strip() or any(not t for t in items):
            raise ValueError
        return [float(t) for t in items]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated numbers with none empty, e.g. "
                        f"{flag} {example}") from None


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, so a busy port is refused before a model is loaded
    (the server binds for real later; SO_REUSEADDR as it does, so a port in TIME_WAIT passes)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use (another dwdp serve?); stop that "
                                f"server or pick another port with --port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"cannot listen on {host}: not an address of this machine; use --host "
                                "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
            if e.errno == errno.EACCES:
                raise UserError(f"port {port} needs root privileges; pick one above 1023 with --port") from None
            raise
