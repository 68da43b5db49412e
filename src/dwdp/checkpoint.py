"""Loading Hugging Face safetensors checkpoints into a model built by :func:`build_model`.

Reads a directory holding ``model.safetensors``, or shards listed in
``model.safetensors.index.json``. Only the tensors the model holds are read: a rank
that stores a subset of each layer's routed experts never reads the others (safetensors
files are memory-mapped and read tensor by tensor). FP8 weights stored with DeepSeek's
128x128 block scales (``*.weight_scale_inv``) are dequantised on load.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from .models.moe import RoutedExperts
from .models.transformer import MoECausalLM


class CheckpointError(ValueError):
    """A checkpoint that does not match the model, with the tensors named."""


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FP8_BLOCK = 128


def checkpoint_index(ckpt_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    d = Path(ckpt_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: d / fname for name, fname in weight_map.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d} holds no *.safetensors files (and no model.safetensors.index.json)")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                out[k] = f
    return out


def _expected_tensors(model: MoECausalLM) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """HF name -> (destination view, expected checkpoint shape)."""
    cfg = model.config
    out: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
    inter = cfg.moe_intermediate_size
    for mod_name, mod in model.named_modules():
        if isinstance(mod, RoutedExperts):
            prefix = mod_name  # model.layers.{l}.mlp.experts
            for i, e in enumerate(mod.expert_range):
                out[f"{prefix}.{e}.gate_proj.weight"] = (mod.w13[i, :inter], (inter, cfg.hidden_size))
                out[f"{prefix}.{e}.up_proj.weight"] = (mod.w13[i, inter:], (inter, cfg.hidden_size))
                out[f"{prefix}.{e}.down_proj.weight"] = (mod.w2[i], (cfg.hidden_size, inter))
    for name, p in model.named_parameters():
        if name.endswith((".w13", ".w2")):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        out[name] = (p.data, tuple(p.shape))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            out[name] = (b, tuple(b.shape))
    return out


def _ignorable(name: str, model: MoECausalLM) -> bool:
    """Tensors a checkpoint may hold that this model legitimately does not load."""
    cfg = model.config
    if name.endswith("rotary_emb.inv_freq") or name.endswith(".weight_scale_inv"):
        return True
    if name == "lm_head.weight" and cfg.tie_word_embeddings:  # some tied checkpoints store it anyway
        return True
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= cfg.num_layers:  # truncated model, or DeepSeek's MTP layers
        return True
    m = _EXPERT.match(name)
    if m and cfg.moe_layer_mask[int(m.group(1))] and int(m.group(2)) < cfg.num_experts:
        return True  # another rank's expert
    return False


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    from .quant import dequantize_fp8_blockwise

    return dequantize_fp8_blockwise(w, scale_inv, torch.float32, _FP8_BLOCK)


@torch.no_grad()
def load_checkpoint(model: MoECausalLM, ckpt_dir: str | Path, progress: bool = False) -> MoECausalLM:
    index = checkpoint_index(ckpt_dir)
    expected = _expected_tensors(model)
    missing = sorted(n for n in expected if n not in index)
    if missing:
        shown = ", ".join(missing[:8]) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint {ckpt_dir} lacks {len(missing)} tensors the model needs: {shown}")
    unexpected = sorted(n for n in index if n not in expected and not _ignorable(n, model))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has {len(unexpected)} tensors this {model.config.model_type} model does "
            f"not know: {shown}; is config.json from the same model?"
        )
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in expected:
        by_file[index[name]].append(name)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(expected), desc="loading", unit="tensor")
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as sf:
            for name in names:
                dest, shape = expected[name]
                src = sf.get_tensor(name)
                if tuple(src.shape) != shape:
                    raise CheckpointError(
                        f"tensor {name} has shape {tuple(src.shape)} in the checkpoint, the model expects {shape}"
                    )
                if src.dtype == torch.float8_e4m3fn and f"{name}_scale_inv" in index:
                    scale_name = f"{name}_scale_inv"
                    if index[scale_name] == path:
                        scale = sf.get_tensor(scale_name)
                    else:
                        with safe_open(index[scale_name], framework="pt") as sf2:
                            scale = sf2.get_tensor(scale_name)
                    src = _dequant_fp8(src, scale)
                dest.copy_(src.to(dest.dtype))
                if bar:
                    bar.update()
    if bar:
        bar.close()
    return model
