"""Fault injection at named points, for the tests of failure handling.

``DWDP_FAULT="<point>:<rank>[:<n>[:<action>]]"`` (several separated by ``,``) makes rank
``<rank>`` fail the ``<n>``-th time (default 1) it reaches ``<point>``. Actions: ``exit``
(the default: ``os._exit(1)``, a crash with no clean-up, like a kill), ``raise`` (a
``RuntimeError``) or ``hang`` (sleep until killed). Spawned ranks inherit the variable at
spawn time, so a test sets it before starting a group (and a group restarted after it is
unset runs clean). Points: ``shm-created`` (a CPU peer-memory segment exists, its peers have
not mapped it), ``prefill-request`` (a prefill rank took a request from its inbox),
``decode-step`` (a decode rank sent the tokens of a step that had requests of its own).
Unset (always, outside tests), a point costs one environment lookup.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

FAULT_ENV = "DWDP_FAULT"
ACTIONS = ("exit", "raise", "hang")
_hits: Counter = Counter()


def fault_point(point: str, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _hits[point] += 1
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) < 2 or parts[0] != point:
            continue
        try:
            who, nth = int(parts[1]), int(parts[2]) if len(parts) > 2 else 1
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={spec!r}: write <point>:<rank>[:<n>[:<action>]]") from None
        action = parts[3] if len(parts) > 3 else "exit"
        if action not in ACTIONS:
            raise ValueError(f"{FAULT_ENV}={spec!r}: action {action!r}: choose from {', '.join(ACTIONS)}")
        if who != rank or _hits[point] != nth:
            continue
        print(f"[dwdp rank {rank}] {FAULT_ENV}: {action} at {point} #{nth}", file=sys.stderr, flush=True)
        if action == "exit":
            os._exit(1)
        if action == "raise":
            raise RuntimeError(f"injected fault at {point} #{nth} ({FAULT_ENV})")
        while True:
            time.sleep(1)
