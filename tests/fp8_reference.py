"""FP8 checkpoints as DeepSeek-V3/R1 and Qwen3-*-FP8 release them, written by the tests
with their own (independent of dwdp.quant) block quantiser, and a float64 reference
dequantisation.

Official layout (both families): every linear weight of the decoder layers (attention
projections, dense / shared / routed expert gate, up and down projections) is stored
``float8_e4m3fn`` with ``<name>_scale_inv`` float32 of shape [ceil(out/128),
ceil(in/128)]; embeddings, lm_head, norms and the router (``mlp.gate.weight``) stay
bf16, DeepSeek's ``e_score_correction_bias`` float32; config.json carries
``quantization_config``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

FP8_MAX = 448.0

QUANTIZATION_CONFIG = {
    "deepseek_v3": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]},
    "qwen3_moe": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                  "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]},
}


def quantize_fp8_blocks(w: torch.Tensor, gen: torch.Generator, block: int = 128):
    """-> (fp8 weight, float32 scale_inv [ceil(r/128), ceil(c/128)]) with w ~= fp8 * scale."""
    r, c = w.shape
    br, bc = math.ceil(r / block), math.ceil(c / block)
    scale = torch.empty(br, bc, dtype=torch.float32)
    for i in range(br):
        for j in range(bc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            # Varied block scales, so a wrong block->element mapping cannot go unnoticed.
            scale[i, j] = blk.abs().max() / FP8_MAX * (0.5 + torch.rand((), generator=gen))
    s_full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:r, :c]
    q = (w / s_full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequant_reference_f64(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Element (i, j) = q[i, j] * scale[i // 128, j // 128], in float64."""
    r, c = q.shape
    out = torch.empty(r, c, dtype=torch.float64)
    qd, sd = q.to(torch.float64), scale.to(torch.float64)
    cols = torch.arange(c) // block
    for i in range(r):
        out[i] = qd[i] * sd[i // block][cols]
    return out


def is_fp8_in_release(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def to_official_fp8(tensors: dict[str, torch.Tensor], seed: int = 0) -> tuple[dict, dict]:
    """A full-precision HF state dict -> (the FP8 release's tensors, name -> float64 value
    each stored tensor stands for)."""
    g = torch.Generator().manual_seed(seed)
    out, value = {}, {}
    for name, w in tensors.items():
        if is_fp8_in_release(name):
            q, s = quantize_fp8_blocks(w.float(), g)
            out[name], out[name + "_scale_inv"] = q, s
            value[name] = dequant_reference_f64(q, s)
        else:
            keep = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            out[name] = w.to(keep)
            value[name] = out[name].double()
    return out, value


def write_fp8_release(dst: Path, tensors: dict[str, torch.Tensor], config: dict, family: str,
                      max_shard_tensors: int | None = None) -> Path:
    """Write tensors (already in the release's dtypes) with the family's quantization_config;
    ``max_shard_tensors`` splits them over shards with an index, as the releases do."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZATION_CONFIG[family]}))
    names = sorted(tensors)
    if not max_shard_tensors:
        save_file({k: tensors[k].contiguous() for k in names}, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    groups = [names[i:i + max_shard_tensors] for i in range(0, len(names), max_shard_tensors)]
    weight_map = {}
    for j, group in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in group}, dst / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def round_inputs_to_fp8(modules) -> list:
    """Forward pre-hooks rounding each module's input to e4m3 per token and 128 columns, as an
    FP8 GEMM sees it (a float64 quantiser of the tests' own, not dwdp's). Returns the handles."""
    def hook(mod, args):
        x = args[0].double()
        K = x.shape[-1]
        nb = -(-K // 128)
        xp = torch.nn.functional.pad(x, (0, nb * 128 - K)).view(*x.shape[:-1], nb, 128)
        s = xp.abs().amax(-1, keepdim=True).clamp_min(1e-10) / FP8_MAX
        q = (xp / s).float().to(torch.float8_e4m3fn).double() * s
        return (q.view(*x.shape[:-1], nb * 128)[..., :K].to(args[0].dtype),)

    return [m.register_forward_pre_hook(hook) for m in modules]
