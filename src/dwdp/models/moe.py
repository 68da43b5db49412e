"""Mixture-of-experts layer: router, routed experts, optional shared experts.

The routed experts are reached through one narrow interface, :class:`RoutedExperts`:
``forward(x, topk_ids, topk_weights) -> y``. The plain version here holds every expert
(or a chosen subset, for loading a rank's share). Parallel strategies (DWDP, expert
parallelism) replace the ``experts`` attribute of each :class:`MoEBlock` from outside
with their own implementation of the same interface; nothing else in the model knows
about parallelism.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .layers import DenseMLP


def router_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ w.T``. For bf16/fp16 operands on CUDA, one half-precision GEMM with fp32
    accumulation and output: the products of 16-bit values are exact in fp32, so this is
    the fp32 GEMM up to summation order, without an fp32 copy of x and at tensor-core rate."""
    global _mm_fp32_out
    if _mm_fp32_out and x.is_cuda and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32).view(*x.shape[:-1], w.shape[0])
        except torch.OutOfMemoryError:
            raise  # says nothing about mm(out_dtype=)
        except (TypeError, NotImplementedError, RuntimeError):  # a torch without mm(out_dtype=): once
            _mm_fp32_out = False
    return F.linear(x.float(), w.float())


_mm_fp32_out = True


class Router(nn.Module):
    """Top-k routing: softmax (Qwen3, DeepSeek-V2) or sigmoid + group-limited (DeepSeek-V3).

    Parameter names match the Hugging Face checkpoints (``mlp.gate.weight``,
    ``mlp.gate.e_score_correction_bias``). Routing runs in fp32: a flipped expert choice
    from low-precision scores changes the output far more than rounding does.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.scoring, self.method = cfg.scoring_func, cfg.topk_method
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Benchmarks only: an additive bias on router logits that makes some experts hot.
        self.logit_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = router_logits(x, self.weight)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        if self.method == "greedy":
            weights, ids = torch.topk(scores, self.top_k, dim=-1)
        else:
            choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            top_groups = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, top_groups, 1.0).bool()
            expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(-1, self.num_experts)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
            ids = torch.topk(choice, self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, ids


FP8_WIDEN_CHUNK = 16  # FP8 experts widened to the activation dtype this many at a time


@dataclass
class ExpertSegment:
    """A run of consecutive global experts [start, start + count) whose weights lie in
    ``w13[i]`` / ``w2[i]`` for expert ``start + i`` (a resident shard, or a prefetch slot)."""

    start: int
    w13: torch.Tensor  # [count, 2 * inter, hidden]: gate rows then up rows
    w2: torch.Tensor  # [count, hidden, inter]
    # FP8 experts: w13/w2 are e4m3 and these their 128x128 block scales (w ~= q * scale).
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.w13.shape[0]

    def dequantized(self, dtype: torch.dtype) -> "ExpertSegment":
        from ..quant import dequantize_fp8_blockwise

        return ExpertSegment(self.start, dequantize_fp8_blockwise(self.w13, self.w13_scale, dtype),
                             dequantize_fp8_blockwise(self.w2, self.w2_scale, dtype))


# How a segment's experts are computed. expert_kernel() is the one place that chooses.
FP8_TRITON = "fp8-triton"  # FP8 experts computed in FP8 (kernels/fp8_grouped.py), FP8 rows
BF16_TRITON = "bf16-triton"  # bf16, a few rows per expert (decode): kernels/fp8_grouped.grouped_swiglu_bf16
GROUPED_MM = "grouped-mm"  # bf16 on CUDA: torch._grouped_mm
WIDEN_FP8 = "widen-fp8"  # FP8 experts without the FP8 kernel: widened a few at a time, then as bf16/fp32
PER_EXPERT = "per-expert"  # one matmul pair per expert (CPU, fp32): the reference
# These take the per-expert row counts on the device; the others read group boundaries on the host.
DEVICE_COUNTS = frozenset({FP8_TRITON, BF16_TRITON, GROUPED_MM})


def expert_kernel(x: torch.Tensor, seg: ExpertSegment, rows: int | None = None) -> str:
    """How ``seg``'s experts run on activations like ``x`` (their device and dtype; FP8 rows
    count as the FP8 kernel's input). ``rows``: the sorted rows they get, when known: a few
    per expert take the decode kernel."""
    triton = kernels.enabled(x)
    if seg.w13_scale is not None:
        whole_blocks = seg.w13.shape[-1] % 128 == 0 and seg.w2.shape[-1] % 128 == 0
        return FP8_TRITON if triton and whole_blocks else WIDEN_FP8
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return PER_EXPERT
    if triton and rows is not None:
        from ..kernels.fp8_grouped import bf16_decode_shapes

        if bf16_decode_shapes(rows, seg.count, seg.w13, seg.w2):
            return BF16_TRITON
    return GROUPED_MM


def routed_experts_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    segments: list[ExpertSegment],
    num_experts: int,
    on_segment_start=None,
) -> torch.Tensor:
    """Compute sum_k w_k * expert_{id_k}(x) reading each expert where it lies.

    Tokens are sorted by expert once; each segment then runs one grouped GEMM over its
    contiguous block of sorted rows, so weights split across a resident shard and a
    prefetch slot are used in place (no merge copy). ``on_segment_start(seg)`` lets the
    caller wait for a segment's weights just before it is used (DWDP: local first).
    """
    T, K = topk_ids.shape
    hidden = x.shape[-1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # Not bincount: on CUDA it reads the largest id back to the host.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    src = order // K
    kernel = expert_kernel(x, segments[0])  # segments share a dtype and shape: one choice for all
    fp8 = kernel == FP8_TRITON
    # Segment boundaries are read back to the host (one sync per layer), except when one
    # segment holds every expert and its kernel takes the counts on the device (a replica's
    # GPU path: a decode step with it can be captured in a CUDA graph), and on the FP8
    # kernel, which finds each segment's rows on the device.
    whole = len(segments) == 1 and segments[0].start == 0 and segments[0].count == num_experts
    boundaries = None if fp8 or (whole and kernel in DEVICE_COUNTS) else _read_back(counts.cumsum(0))
    bounds = torch.cat([counts.new_zeros(1), counts.cumsum(0)]) if fp8 and not whole else None
    if fp8:  # quantise each token once, then permute the (half-size) FP8 rows
        from ..kernels.fp8_grouped import quantize_rows

        xq, xsc = quantize_rows(x)
        xq, xsc = xq[src], xsc[src]
    else:
        x_sorted = x[src]
    # Only now wait for the boundaries: the permute above is queued behind their copy, so the
    # GPU keeps working while the host waits and launches the segments (reading them before
    # it left the GPU idle for that host time at every MoE layer of a DWDP step).
    ends = None if boundaries is None else boundaries()
    y_sorted = torch.empty(T * K, hidden, dtype=x.dtype, device=x.device)
    for seg in segments:  # caller's order: DWDP puts resident experts first
        e0, e1 = seg.start, seg.start + seg.count
        r0, r1 = (0, T * K) if ends is None else ((ends[e0 - 1] if e0 else 0), ends[e1 - 1])
        if on_segment_start is not None:
            on_segment_start(seg)
        if r1 == r0 or seg.count == 0:
            continue
        if fp8:
            from ..kernels.fp8_grouped import grouped_swiglu_fp8

            # bounds[e0], bounds[e1] as a view (a list index would copy it from the host: a sync).
            rows = None if bounds is None else bounds[e0:e1 + 1:e1 - e0]
            grouped_swiglu_fp8(xq, xsc, seg.w13, seg.w13_scale, seg.w2, seg.w2_scale, counts[e0:e1], x.dtype,
                               out=y_sorted, row_range=rows, rows_per_group=T * K / num_experts)
        else:
            y_sorted[r0:r1] = _grouped_swiglu(x_sorted[r0:r1], seg, counts[e0:e1], ends, e0)
    return _combine(y_sorted, order, topk_weights)


def _combine(y_sorted: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Each token's k expert outputs (rows ``order`` of ``y_sorted``) summed with its weights."""
    if kernels.enabled(y_sorted):
        from ..kernels.moe_epilogue import weighted_combine

        return weighted_combine(y_sorted, order, topk_weights)
    # Un-permute with a gather (cheaper than a scatter) and combine the k outputs of each
    # token with one batched [1, K] x [K, hidden] product.
    T, K = topk_weights.shape
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = y_sorted[inverse].view(T, K, y_sorted.shape[-1])
    return torch.bmm(topk_weights.to(y.dtype).unsqueeze(1), y).squeeze(1)


def _read_back(t: torch.Tensor):
    """Start copying ``t`` to the host; returns a function that waits for it and gives it
    as a list. On CUDA the copy goes to pinned memory behind the work already queued, so
    the caller can queue more GPU work before it waits."""
    if not t.is_cuda:
        values = t.tolist()
        return lambda: values
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    landed = torch.cuda.Event()
    landed.record(torch.cuda.current_stream(t.device))  # the copy's stream, whatever the current device

    def wait() -> list:
        landed.synchronize()
        return host.tolist()

    return wait


def sorted_experts_forward(
    xs: torch.Tensor, counts: torch.Tensor, segment: ExpertSegment, counts_host: list[int] | None = None,
    xs_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each expert's SwiGLU MLP over rows already sorted by expert: ``counts[g]`` rows for
    expert ``segment.start + g`` (DEP's receive side, which permutes the received rows itself).

    ``xs_scale``: ``xs`` is already FP8 with per-token 1x128 scales (quantised once by the
    sender, as ``routed_experts_forward`` does before its permute). ``counts_host`` spares a
    host sync where the kernel needs the group boundaries on the host.
    """
    out_dtype = out_dtype or (xs.dtype if xs_scale is None else torch.bfloat16)
    if xs.shape[0] == 0:
        return out if out is not None else torch.empty(0, segment.w2.shape[1], dtype=out_dtype, device=xs.device)
    kernel = expert_kernel(xs, segment, xs.shape[0])
    if xs_scale is not None and kernel != FP8_TRITON:  # FP8 rows where the FP8 kernel does not apply: widen
        xs = (xs.float().view(xs.shape[0], -1, 128) * xs_scale.unsqueeze(-1)).view(xs.shape).to(out_dtype)
        xs_scale = None
        kernel = expert_kernel(xs, segment, xs.shape[0])
    if kernel == FP8_TRITON:
        from ..kernels.fp8_grouped import grouped_swiglu_fp8, quantize_rows

        if xs_scale is None:
            xs, xs_scale = quantize_rows(xs)
        return grouped_swiglu_fp8(xs, xs_scale, segment.w13, segment.w13_scale, segment.w2, segment.w2_scale,
                                  counts, out_dtype, out=out)
    ends = None if kernel in DEVICE_COUNTS else (list(itertools.accumulate(counts_host)) if counts_host is not None
                                                 else counts.cumsum(0).tolist())
    ys = _grouped_swiglu(xs, segment, counts, ends, 0, kernel)
    if out is not None:
        out.copy_(ys)
        return out
    return ys


def _grouped_swiglu(xs, seg: ExpertSegment, counts, ends, e0, kernel: str | None = None) -> torch.Tensor:
    """Each expert's SwiGLU MLP over ``xs`` (rows sorted by expert, in the activation dtype).
    ``ends``: cumulative row counts on the host from expert ``e0`` on (None where ``kernel``
    takes ``counts`` on the device)."""
    kernel = kernel or expert_kernel(xs, seg, xs.shape[0])
    if kernel in (WIDEN_FP8, FP8_TRITON):  # the FP8 kernel takes FP8 rows: these widen the experts
        # A few experts at a time, so the wide copy stays small.
        out = torch.empty_like(xs)
        base = ends[e0 - 1] if e0 else 0
        for c0 in range(0, seg.count, FP8_WIDEN_CHUNK):
            c1 = min(seg.count, c0 + FP8_WIDEN_CHUNK)
            r0 = (ends[e0 + c0 - 1] if e0 + c0 else 0) - base
            r1 = ends[e0 + c1 - 1] - base
            if r1 == r0:
                continue
            part = ExpertSegment(seg.start + c0, seg.w13[c0:c1], seg.w2[c0:c1], seg.w13_scale[c0:c1],
                                 seg.w2_scale[c0:c1]).dequantized(xs.dtype)
            out[r0:r1] = _grouped_swiglu(xs[r0:r1], part, counts[c0:c1], ends, e0 + c0)
        return out
    if kernel == BF16_TRITON:
        from ..kernels.fp8_grouped import grouped_swiglu_bf16

        return grouped_swiglu_bf16(xs, seg.w13, seg.w2, counts)
    if kernel == GROUPED_MM:
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(xs, seg.w13.transpose(-2, -1), offs=offs)
        if kernels.enabled(xs):
            from ..kernels.moe_epilogue import silu_mul

            act = silu_mul(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return torch._grouped_mm(act, seg.w2.transpose(-2, -1), offs=offs)
    out = torch.empty_like(xs)
    base = ends[e0 - 1] if e0 else 0
    for i in range(seg.count):
        r0 = (ends[e0 + i - 1] if e0 + i else 0) - base
        r1 = ends[e0 + i] - base
        if r1 == r0:
            continue
        gate, up = F.linear(xs[r0:r1], seg.w13[i]).chunk(2, dim=-1)
        out[r0:r1] = F.linear(F.silu(gate) * up, seg.w2[i])
    return out


class RoutedExperts(nn.Module):
    """The routed experts of one MoE layer, all held in this process.

    ``expert_ids`` may be a contiguous subset [start, start + count): that is how a rank
    loads only its share; computing with a subset is only meaningful under a parallel
    strategy that supplies the rest.
    """

    def __init__(self, num_experts: int, hidden: int, inter: int, start: int = 0, count: int | None = None,
                 fp8: bool = False):
        super().__init__()
        count = num_experts - start if count is None else count
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.start = start
        if not fp8:
            self.w13 = nn.Parameter(torch.empty(count, 2 * inter, hidden))
            self.w2 = nn.Parameter(torch.empty(count, hidden, inter))
            return
        # FP8: e4m3 weights and their fp32 128x128 block scales, the checkpoints' layout
        # with gate and up stacked (w13 row blocks: gate's, then up's).
        from ..quant import FP8, SCALE_DTYPE, scale_shape

        self._set_fp8(torch.empty(count, 2 * inter, hidden, dtype=FP8), torch.empty(count, hidden, inter, dtype=FP8),
                      torch.empty(count, *scale_shape(2 * inter, hidden), dtype=SCALE_DTYPE),
                      torch.empty(count, *scale_shape(hidden, inter), dtype=SCALE_DTYPE))

    def _set_fp8(self, w13, w2, w13_scale, w2_scale) -> None:
        for name, t in (("w13", w13), ("w2", w2), ("w13_scale", w13_scale), ("w2_scale", w2_scale)):
            setattr(self, name, nn.Parameter(t, requires_grad=False))

    @property
    def expert_range(self) -> range:
        return range(self.start, self.start + self.w13.shape[0])

    def segments(self) -> list[ExpertSegment]:
        return [ExpertSegment(self.start, self.w13, self.w2, getattr(self, "w13_scale", None),
                              getattr(self, "w2_scale", None))]

    @property
    def is_fp8(self) -> bool:
        return self.w13.dtype == torch.float8_e4m3fn

    @torch.no_grad()
    def quantize_fp8(self) -> None:
        """Store these experts as FP8 e4m3 with 128x128 block scales (as DeepSeek-V3 does).

        Quantises a few experts at a time straight into the FP8 parameters; the
        full-precision ones are released once all are done."""
        from ..quant import FP8, SCALE_DTYPE, quantize_fp8_blockwise, scale_shape

        if self.is_fp8:
            return
        out = []
        for w in (self.w13, self.w2):
            q = torch.empty(w.shape, dtype=FP8, device=w.device)
            s = torch.empty(w.shape[0], *scale_shape(*w.shape[1:]), dtype=SCALE_DTYPE, device=w.device)
            out += [q, s]
            quantize_fp8_blockwise(w, out=(q, s))
        self._set_fp8(out[0], out[2], out[1], out[3])

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if len(self.expert_range) != self.num_experts:
            raise RuntimeError(
                f"this MoE layer holds experts {self.expert_range.start}..{self.expert_range.stop - 1} of "
                f"{self.num_experts}: apply a parallel strategy (DWDP/EP) to supply the others"
            )
        return routed_experts_forward(x, topk_ids, topk_weights, self.segments(), self.num_experts)


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts: nn.Module = RoutedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        y = self.experts(x, ids, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
