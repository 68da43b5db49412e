"""Constructing a model: shapes from the config, memory on the target device, values
from a checkpoint (see :mod:`dwdp.checkpoint`) or from a seed.

Every tensor is allocated once, in its final dtype on its final device: no full-size
temporaries (an fp32 model, a layer of fp32 experts) ever exist, so the peak memory of
building is the model itself plus a few experts' worth of working space.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from .moe import RoutedExperts, Router
from .transformer import MoECausalLM

ExpertShard = Callable[[int], tuple[int, int]]
"""MoE layer index -> (first global expert, count) that this process stores."""

ExpertStorage = Callable[[int], tuple]
"""Decoder layer index of a MoE layer -> (w13, w2, w13_scale, w2_scale): tensors the caller
already allocated (e.g. DWDP's peer-visible rows) that the layer's routed experts should
live in instead of fresh allocations (scales None unless the experts are FP8)."""

EXPERT_DTYPES = ("auto", "same", "fp8")


def resolve_expert_dtype(cfg: ModelConfig, expert_dtype: str | torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """How routed experts are stored: ``"same"`` as the other weights (``dtype``; an FP8
    checkpoint's experts are dequantised), ``"fp8"`` as e4m3 + 128x128 fp32 block scales
    (a bf16 checkpoint's experts are quantised at load), ``"auto"`` as the checkpoint ships
    them (FP8 for an FP8 checkpoint, else ``dtype``)."""
    from ..quant import BLOCK, FP8

    if isinstance(expert_dtype, torch.dtype):
        if expert_dtype not in (FP8, dtype):
            raise ValueError(f"expert dtype {expert_dtype}: choose the model dtype {dtype} or {FP8}")
        return expert_dtype
    from ..config import DTYPES

    if expert_dtype in DTYPES:  # a dtype name: the model's own dtype is "same" (`dwdp plan` says bf16)
        if DTYPES[expert_dtype] != dtype:
            raise ValueError(f"expert dtype {expert_dtype!r}: experts are stored in the model dtype ({dtype}) "
                             f"or as fp8; choose from {', '.join(EXPERT_DTYPES)} or pass --dtype {expert_dtype}")
        return dtype
    if expert_dtype not in EXPERT_DTYPES:
        raise ValueError(f"expert dtype {expert_dtype!r}: choose from {', '.join(EXPERT_DTYPES)} "
                         f"(or the model dtype's name)")
    if expert_dtype == "auto":
        # Stored FP8 experts can be kept only when gate's and up's 128-row scale blocks
        # stack into whole w13 blocks (moe_intermediate_size % 128 == 0, true of every release).
        keep = cfg.fp8_checkpoint and cfg.moe_intermediate_size % BLOCK == 0
        return FP8 if keep else dtype
    return FP8 if expert_dtype == "fp8" else dtype


def _param_dtype(module: nn.Module, name: str, dtype: torch.dtype, expert_dtype: torch.dtype) -> torch.dtype:
    if isinstance(module, RoutedExperts):
        return torch.float32 if name.endswith("_scale") else expert_dtype
    if isinstance(module, Router):
        return torch.float32  # router weights stay fp32, as the reference keeps them
    return dtype


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                expert_shard: ExpertShard | None = None, *, expert_dtype: str | torch.dtype = "auto",
                expert_storage: ExpertStorage | None = None) -> MoECausalLM:
    """Allocate an uninitialised model (no values written: load or init_random next).

    With ``expert_shard`` each MoE layer stores only the given run of routed experts,
    so a rank never allocates (or later reads) experts it does not own. ``expert_dtype``:
    see :func:`resolve_expert_dtype`; FP8 experts are allocated as FP8 directly, and
    :func:`~dwdp.checkpoint.load_checkpoint` / :func:`init_random` fill them an expert
    at a time. Exactly the bytes :func:`dwdp.memory.build_bytes` predicts are allocated.
    With ``expert_storage`` the routed experts are placed in the caller's tensors (views
    are fine) and only the non-expert bytes are allocated here.
    """
    edt = resolve_expert_dtype(cfg, expert_dtype, dtype)
    with torch.device("meta"):
        model = MoECausalLM(cfg)
        for layer in model.model.layers:
            if layer.is_moe:
                start, count = expert_shard(layer.idx) if expert_shard is not None else (0, cfg.num_experts)
                if not (0 <= start and count >= 0 and start + count <= cfg.num_experts):
                    raise ValueError(f"expert shard ({start}, {count}) does not fit {cfg.num_experts} experts")
                layer.mlp.experts = RoutedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                                  start, count, fp8=edt == torch.float8_e4m3fn)
    made: dict[int, nn.Parameter] = {}  # meta parameter -> its allocation (keeps tied weights tied)
    if expert_storage is not None:
        for layer in model.model.layers:
            if layer.is_moe:
                _adopt_expert_storage(layer.mlp.experts, expert_storage(layer.idx), torch.device(device), made,
                                      dtype, edt)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                t = torch.empty(p.shape, dtype=_param_dtype(mod, name, dtype, edt), device=device)
                made[id(p)] = nn.Parameter(t, requires_grad=False)  # inference only
            mod._parameters[name] = made[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            if name == "inv_freq":  # rotary frequencies: fp32, computed (not stored in checkpoints)
                from .layers import rope_inv_freq

                mod._buffers[name] = rope_inv_freq(cfg.rope, b.numel() * 2)[0].to(device)
            else:  # e_score_correction_bias: fp32, zero until loaded
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    model.eval()
    return model


def _adopt_expert_storage(ex: RoutedExperts, given: tuple, device: torch.device, made: dict,
                          dtype: torch.dtype, edt: torch.dtype) -> None:
    names = ("w13", "w2", "w13_scale", "w2_scale")
    for name, t in zip(names, given):
        want = getattr(ex, name, None)
        if (want is None) != (t is None):
            raise ValueError(f"expert_storage for {ex.expert_range}: {name} is "
                             f"{'missing' if t is None else 'given'} but these experts "
                             f"{'have' if want is not None else 'have no'} {name} (FP8: {ex.is_fp8})")
        if t is None:
            continue
        wdt = _param_dtype(ex, name, dtype, edt)
        if tuple(t.shape) != tuple(want.shape) or t.dtype != wdt or t.device.type != device.type:
            raise ValueError(f"expert_storage: {name} is {t.dtype} {tuple(t.shape)} on {t.device}; these experts "
                             f"need {wdt} {tuple(want.shape)} on {device}")
        made[id(want)] = nn.Parameter(t, requires_grad=False)


def _seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def compute_dtype(model: MoECausalLM) -> torch.dtype:
    """The dtype of the model's non-expert weights (what activations are computed in)."""
    return model.model.embed_tokens.weight.dtype


@torch.no_grad()
def init_random(model: MoECausalLM, seed: int = 0, std: float = 0.02) -> MoECausalLM:
    """Seeded random weights. Each tensor (and each routed expert separately) draws from
    its own stream keyed by name, so a rank holding any subset of experts gets exactly
    the values the full model would have: DWDP/EP outputs can be compared bitwise.

    Values are drawn in place (no temporary); FP8 experts are drawn in the compute dtype
    one expert at a time and quantised, giving bitwise the experts that drawing a
    full-precision model and calling ``quantize_experts_fp8`` would."""
    from ..quant import quantize_fp8_blockwise

    dev = next(model.parameters()).device
    if dev.type == "meta":
        return model
    wide = compute_dtype(model)

    def fill(t: torch.Tensor, key: str) -> torch.Tensor:
        g = torch.Generator(device=dev)
        g.manual_seed(_seed_for(seed, key))
        return t.normal_(0.0, std, generator=g)

    for name, mod in model.named_modules():
        if isinstance(mod, RoutedExperts):
            buf13 = buf2 = None
            for i, e in enumerate(mod.expert_range):
                if not mod.is_fp8:
                    fill(mod.w13[i], f"{name}.{e}.w13")
                    fill(mod.w2[i], f"{name}.{e}.w2")
                    continue
                if buf13 is None:  # one expert's working space
                    buf13 = torch.empty(mod.w13.shape[1:], dtype=wide, device=dev)
                    buf2 = torch.empty(mod.w2.shape[1:], dtype=wide, device=dev)
                quantize_fp8_blockwise(fill(buf13, f"{name}.{e}.w13"), out=(mod.w13[i], mod.w13_scale[i]))
                quantize_fp8_blockwise(fill(buf2, f"{name}.{e}.w2"), out=(mod.w2[i], mod.w2_scale[i]))
    for name, p in model.named_parameters():
        if name.endswith((".w13", ".w2", "_scale")):
            continue
        if "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            fill(p, name)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    return model
