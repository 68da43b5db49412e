"""Device-side flags between GPUs: set a peer's counter, wait on ours, without the host.

DWDP token shipping orders work across GPUs with monotonic int64 counters in
peer-visible memory: a writer bumps a counter on the reader's GPU after the data it
guards (stream order puts the data first; the store is a system-scope release), and the
reader's stream runs a one-thread spin kernel until the counter reaches the value it
expects. The wait gives up after a timeout and records it in a status word the host reads
at the end of the step, so a dead peer is an error, not a hang.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _now_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["value"])
def _set_kernel(flag_ptr, value, status_ptr):
    if tl.load(status_ptr, volatile=True) == 0:
        tl.atomic_xchg(flag_ptr, value, sem="release", scope="sys")


@triton.jit(do_not_specialize=["value", "timeout_ns", "code"])
def _wait_kernel(flag_ptr, value, status_ptr, timeout_ns, code):
    # Once a wait before this one timed out (status set) the step is lost: pass at once, so
    # a dead peer costs one timeout, not one per remaining layer.
    start = _now_ns()
    cur = tl.load(flag_ptr, volatile=True)
    failed = tl.load(status_ptr, volatile=True)
    elapsed = start - start
    while (cur < value) & (elapsed < timeout_ns) & (failed == 0):
        cur = tl.load(flag_ptr, volatile=True)
        elapsed = _now_ns() - start
    if (cur < value) & (failed == 0):
        tl.atomic_cas(status_ptr, 0, code)  # the first timeout names the culprit


def signal_set(flag: torch.Tensor, value: int, status: torch.Tensor) -> None:
    """On the current stream, after the work before it: ``flag[0] = value`` (``flag`` may be
    a peer's memory mapped into ours), unless ``status[0]`` says a wait before it timed out
    (then the data it would vouch for is not valid)."""
    _set_kernel[(1,)](flag, value, status, num_warps=1)


def signal_wait(flag: torch.Tensor, value: int, status: torch.Tensor, timeout_s: float, code: int = 1) -> None:
    """On the current stream: hold later work until ``flag[0] >= value``; after
    ``timeout_s`` go on and raise ``status[0]`` to ``code`` (the host checks it)."""
    _wait_kernel[(1,)](flag, value, status, int(timeout_s * 1e9), code, num_warps=1)
