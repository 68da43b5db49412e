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
DENSE_DTYPES = ("auto", "same", "fp8")


def _storage_dtype(kind: str, what: str, choice: str | torch.dtype, dtype: torch.dtype, choices: tuple[str, ...],
                   keep_fp8: bool) -> torch.dtype:
    """``choice`` ("auto", "same", "fp8", a dtype name or a torch dtype) as the dtype ``what``
    is stored in; ``keep_fp8``: what "auto" keeps (the checkpoint ships them FP8, usably)."""
    from ..config import DTYPES
    from ..quant import FP8

    if isinstance(choice, torch.dtype):
        if choice not in (FP8, dtype):
            raise ValueError(f"{kind} dtype {choice}: choose the model dtype {dtype} or {FP8}")
        return choice
    if choice in DTYPES:  # a dtype name: the model's own dtype is "same" (`dwdp plan` says bf16)
        if DTYPES[choice] != dtype:
            raise ValueError(f"{kind} dtype {choice!r}: {what} are stored in the model dtype ({dtype}) "
                             f"or as fp8; choose from {', '.join(choices)} or pass --dtype {choice}")
        return dtype
    if choice not in choices:
        raise ValueError(f"{kind} dtype {choice!r}: choose from {', '.join(choices)} "
                         f"(or the model dtype's name)")
    if choice == "auto":
        return FP8 if keep_fp8 else dtype
    return FP8 if choice == "fp8" else dtype


def resolve_dense_dtype(cfg: ModelConfig, dense_dtype: str | torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """How the decoder layers' projections (attention, dense MLPs, shared experts) are
    stored: ``"auto"`` as the checkpoint ships them (FP8 for an FP8 release), ``"same"`` in
    ``dtype`` (an FP8 release's are dequantised), ``"fp8"`` as e4m3 + 128x128 block scales
    (a bf16 checkpoint's are quantised at load). Embeddings, lm_head, norms and routers
    always stay in their own dtypes."""
    return _storage_dtype("dense", "projections", dense_dtype, dtype, DENSE_DTYPES, cfg.fp8_checkpoint)

def _to_fp8_projections(model: MoECausalLM) -> None:
    """Every nn.Linear of the decoder layers becomes an Fp8Linear (on the meta device)."""
    from .layers import Fp8Linear

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Fp8Linear(child.in_features, child.out_features, child.bias is not None))


def _merge_groups(model: MoECausalLM):
    """(owner, attribute, projections reading the same input) whose weights share one
    tensor, so one GEMM (and one activation quantise) serves them all."""
    from .layers import DenseMLP
    from .transformer import GQAAttention, MLAttention

    for mod in model.modules():
        if isinstance(mod, DenseMLP):
            yield mod, "gate_up", [mod.gate_proj, mod.up_proj]
        elif isinstance(mod, GQAAttention):
            yield mod, "qkv", [mod.q_proj, mod.k_proj, mod.v_proj]
        elif isinstance(mod, MLAttention) and hasattr(mod, "q_a_proj"):
            yield mod, "qkv_a", [mod.q_a_proj, mod.kv_a_proj_with_mqa]


def _merge_projections(model: MoECausalLM, made: dict, device, dtype: torch.dtype, fp8: bool) -> None:
    """Allocate each group's weights as row blocks of one tensor (``made``: meta parameter
    -> its allocation, as build_model fills it). FP8 rows stay whole 128-row scale blocks,
    so every projection but the last must have a multiple of 128 outputs."""
    from ..quant import BLOCK, FP8, SCALE_DTYPE, scale_shape

    for owner, attr, mods in _merge_groups(model):
        if any(m.bias is not None for m in mods) or (fp8 and any(m.out_features % BLOCK for m in mods[:-1])):
            continue
        n, k = sum(m.out_features for m in mods), mods[0].in_features
        w = torch.empty(n, k, dtype=FP8 if fp8 else dtype, device=device)
        s = torch.empty(*scale_shape(n, k), dtype=SCALE_DTYPE, device=device) if fp8 else None
        r0 = 0
        for m in mods:
            r1 = r0 + m.out_features
            made[id(m.weight)] = nn.Parameter(w[r0:r1], requires_grad=False)
            if fp8:
                made[id(m.weight_scale_inv)] = nn.Parameter(s[r0 // BLOCK:-(-r1 // BLOCK)], requires_grad=False)
            r0 = r1
        setattr(owner, attr, (w, s) if fp8 else (w,))


def resolve_expert_dtype(cfg: ModelConfig, expert_dtype: str | torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """How routed experts are stored: ``"same"`` as the other weights (``dtype``; an FP8
    checkpoint's experts are dequantised), ``"fp8"`` as e4m3 + 128x128 fp32 block scales
    (a bf16 checkpoint's experts are quantised at load), ``"auto"`` as the checkpoint ships
    them (FP8 for an FP8 checkpoint, else ``dtype``)."""
    from ..quant import BLOCK

    # Stored FP8 experts can be kept only when gate's and up's 128-row scale blocks stack
    # into whole w13 blocks (moe_intermediate_size % 128 == 0, true of every release).
    keep = cfg.fp8_checkpoint and cfg.moe_intermediate_size % BLOCK == 0
    return _storage_dtype("expert", "experts", expert_dtype, dtype, EXPERT_DTYPES, keep)

def _param_dtype(module: nn.Module, name: str, dtype: torch.dtype, expert_dtype: torch.dtype) -> torch.dtype:
    from .layers import Fp8Linear

    if isinstance(module, Fp8Linear) and name != "bias":
        return module.weight.dtype if name == "weight" else module.weight_scale_inv.dtype
    if isinstance(module, RoutedExperts):
        return torch.float32 if name.endswith("_scale") else expert_dtype
    if isinstance(module, Router):
        return torch.float32  # router weights stay fp32, as the reference keeps them
    return dtype


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                expert_shard: ExpertShard | None = None, *, expert_dtype: str | torch.dtype = "auto",
                expert_storage: ExpertStorage | None = None, dense_dtype: str | torch.dtype = "auto") -> MoECausalLM:
    """Allocate an uninitialised model (no values written: load or init_random next).

    With ``expert_shard`` each MoE layer stores only the given run of routed experts,
    so a rank never allocates (or later reads) experts it does not own. ``expert_dtype``:
    see :func:`resolve_expert_dtype`; FP8 experts are allocated as FP8 directly, and
    :func:`~dwdp.checkpoint.load_checkpoint` / :func:`init_random` fill them an expert
    at a time. Exactly the bytes :func:`dwdp.memory.build_bytes` predicts are allocated.
    With ``expert_storage`` the routed experts are placed in the caller's tensors (views
    are fine) and only the non-expert bytes are allocated here. ``dense_dtype``: see
    :func:`resolve_dense_dtype`.
    """
    edt = resolve_expert_dtype(cfg, expert_dtype, dtype)
    dense_fp8 = resolve_dense_dtype(cfg, dense_dtype, dtype) == torch.float8_e4m3fn
    with torch.device("meta"):
        model = MoECausalLM(cfg)
        for layer in model.model.layers:
            if layer.is_moe:
                start, count = expert_shard(layer.idx) if expert_shard is not None else (0, cfg.num_experts)
                if not (0 <= start and count >= 0 and start + count <= cfg.num_experts):
                    raise ValueError(f"expert shard ({start}, {count}) does not fit {cfg.num_experts} experts")
                layer.mlp.experts = RoutedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                                  start, count, fp8=edt == torch.float8_e4m3fn)
        if dense_fp8:
            _to_fp8_projections(model)
    made: dict[int, nn.Parameter] = {}  # meta parameter -> its allocation (keeps tied weights tied)
    _merge_projections(model, made, device, dtype, dense_fp8)
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
    from .layers import Fp8Linear

    for name, mod in model.named_modules():
        if isinstance(mod, Fp8Linear):  # drawn in the compute dtype, then quantised
            buf = fill(torch.empty(mod.weight.shape, dtype=wide, device=dev), f"{name}.weight")
            quantize_fp8_blockwise(buf, out=(mod.weight, mod.weight_scale_inv))
    for name, p in model.named_parameters():
        if name.endswith((".w13", ".w2", "_scale", "_scale_inv")) or p.dtype == torch.float8_e4m3fn:
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
