"""DEP's all-to-all arithmetic: which experts each EP rank holds, the byte layout of a
dispatched row, how many ranks a token goes to, and the buffers that takes.

Pure (torch dtypes for sizes, no process group): the runtime (:mod:`dwdp.parallel.ep`)
lays its buffers out with it, and the planner and the fit check price DEP with the
same numbers.
"""

from __future__ import annotations

import functools
import math

import torch

from ..quant import FP8

WIRES = ("auto", "native", "fp8")  # DEP dispatch rows: FP8 when experts are FP8 / the activation dtype / FP8


def ep_ranges(num_experts: int, size: int) -> list[range]:
    """Contiguous, balanced expert shares (sizes differ by at most one)."""
    if size < 1 or size > num_experts:
        raise ValueError(f"expert parallelism over {size} ranks needs 1 <= ranks <= experts ({num_experts})")
    return [range(r * num_experts // size, (r + 1) * num_experts // size) for r in range(size)]


class WireLayout:
    """Byte layout of one dispatched row: hidden state (or FP8 + scales), ids, weights."""

    def __init__(self, hidden: int, top_k: int, act_dtype: torch.dtype, fp8: bool):
        self.fp8, self.hidden = fp8, hidden
        spec = [("x", FP8 if fp8 else act_dtype, hidden)]
        if fp8:
            spec.append(("xs", torch.float32, hidden // 128))
        spec += [("ids", torch.int32, top_k), ("w", torch.float32, top_k)]
        self.fields, off = {}, 0
        for name, dt, n in spec:
            esz = torch.empty(0, dtype=dt).element_size()
            off = -(-off // esz) * esz
            self.fields[name] = (dt, off, n * esz)
            off += n * esz
        self.width = -(-off // 16) * 16  # bytes per row

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed column views of a uint8 [rows, width] buffer."""
        return {name: buf[:, o:o + nb].view(dt) for name, (dt, o, nb) in self.fields.items()}


def fp8_wire(wire: str, fp8_experts: bool, *dims: int) -> bool:
    """Whether DEP's dispatch rows travel as FP8 (1x128 scales): asked for (``wire="fp8"``), or
    ``"auto"`` with FP8 experts on the FP8 kernels and every dimension a multiple of 128."""
    return wire == "fp8" or (wire == "auto" and fp8_experts and all(d % 128 == 0 for d in dims))


@functools.lru_cache(maxsize=256)
def wire_row_bytes(hidden: int, top_k: int, fp8: bool, act_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one dispatched row on the wire (what the planner charges DEP per token and
    destination rank; the combine sends ``hidden`` values of ``act_dtype`` back)."""
    return WireLayout(hidden, top_k, act_dtype, fp8).width


@functools.lru_cache(maxsize=64)
def _dest_ranks(num_experts: int, top_k: int, n: int, n_group: int, topk_group: int) -> float:
    """Expected number of EP ranks (contiguous expert ranges) a token's top-k experts land on.

    Plain top-k: k distinct experts drawn uniformly. Group-limited top-k (DeepSeek-V3: the
    ``topk_group`` of ``n_group`` groups with the best top-2 scores first, then the top k
    inside them): the k experts spread over every chosen group (each was chosen for its best
    experts), so a rank is hit when it holds a chosen group — fewer ranks than independent
    draws (3.12 of 4 measured with the engine's router against 3.63; tests/test_planner.py)."""
    k = top_k
    if n <= 1:
        return 1.0
    if 1 < n_group and topk_group < n_group and k >= topk_group:
        if n <= n_group and n_group % n == 0:
            per = n_group // n  # groups per rank
            return n * (1 - math.comb(n_group - per, topk_group) / math.comb(n_group, topk_group))
        if n % n_group == 0:  # each chosen group split over s ranks, ~k / topk_group experts in it
            s_ = n // n_group
            return topk_group * s_ * (1 - (1 - 1 / s_) ** (k / topk_group))
    return n * (1 - math.comb(num_experts - num_experts // n, k) / math.comb(num_experts, k))


def expected_dest_ranks(cfg, n: int) -> float:
    return _dest_ranks(cfg.num_experts, max(cfg.top_k, 1), n, getattr(cfg, "n_group", 1) or 1,
                       getattr(cfg, "topk_group", 1) or 1)


def dep_buffer_bytes(cfg, n: int, max_tokens: int, fp8: bool, act_bytes: int = 2) -> int:
    """DEP's all-to-all buffers in one MoE layer of a ``max_tokens``-token step (NCCL
    transport): the dispatch rows (allocated for min(n, k) destinations per token), the rows
    received (the expected destinations per token, every rank sending alike), the partial
    results sent back and the combined rows returned. Beyond a dense step's activations: the
    fit check counts them (4x H200, full-depth qwen3-235b at 16K tokens: 1.4 GiB)."""
    if n <= 1:
        return 0
    T, H, K = max_tokens, cfg.hidden_size, max(cfg.top_k, 1)
    width = wire_row_bytes(H, K, fp8)
    rows_in = T * expected_dest_ranks(cfg, n)
    return int(T * min(n, K) * width + rows_in * width + 2 * rows_in * H * act_bytes)
