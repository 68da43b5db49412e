"""Loading Hugging Face safetensors checkpoints into a model built by :func:`build_model`.

Reads a directory holding ``model.safetensors``, or shards listed in
``model.safetensors.index.json``. Only the tensors the model holds are read: a rank
that stores a subset of each layer's routed experts never reads the others (safetensors
files are memory-mapped and read tensor by tensor).

Every tensor's name, shape and dtype is checked against the model from the files'
headers before any data is read, so a wrong or incomplete checkpoint fails at once.

FP8 checkpoints (``*.weight`` e4m3 with ``*.weight_scale_inv`` 128x128 block scales, as
DeepSeek-V3/R1 and Qwen3-*-FP8 ship):
- routed experts stored as FP8 (``build_model(expert_dtype="fp8"/"auto")``) receive the
  stored bytes and scales unchanged, no dequantise/requantise round trip;
- projections built FP8 (``build_model(dense_dtype="fp8"/"auto")``, :class:`~dwdp.models.
  layers.Fp8Linear`) likewise receive the stored bytes and scales unchanged;
- everything else (other non-expert weights, and weights stored in the compute dtype) is
  dequantised in fp32 and rounded once to the compute dtype, a few rows at a time.
Full-precision experts (projections) loaded into FP8 storage are quantised one expert
(one matrix) at a time.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import UserError
from .models.build import compute_dtype
from .models.moe import RoutedExperts
from .models.transformer import MoECausalLM
from .quant import BLOCK, FP8, quantize_fp8_blockwise, scale_shape


class CheckpointError(UserError):
    """A checkpoint that does not match the model, or a damaged file, with the tensors or file named."""


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"
_FP8_NAME = "F8_E4M3"
_SCALE_DTYPES = {"F32", "BF16", "F16", "F8_E8M0"}  # all exactly representable in fp32
_PROJ = ("gate_proj", "up_proj", "down_proj")


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
        for k in _header(f):
            out[k] = f
    return out


_INT_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape), from the file's JSON header (no tensor data read).
    A file shorter than its header says (an interrupted download) is refused here, by name,
    before the loader would fail deep inside with "incomplete metadata"."""
    damaged = (f"{path} is truncated or not a safetensors file", "download or copy it again")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{damaged[0]} (its header claims {n:,} bytes, the file holds {size:,}); "
                                      f"{damaged[1]}")
            head = json.loads(f.read(n))
        tensors = {k: v for k, v in head.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        out = {k: (v["dtype"], tuple(v["shape"])) for k, v in tensors.items()}
    except CheckpointError:
        raise
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{damaged[0]} ({type(e).__name__}: {e}); {damaged[1]}") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{damaged[0]}: its tensors need {8 + n + end:,} bytes, the file holds {size:,}; "
                              f"{damaged[1]}")
    return out


def check_files(ckpt_dir: str | Path) -> None:
    """Cheap checks of a checkpoint's files from their headers, before a model is built: every
    file whole, no weight stored as integers (which would load silently, as garbage)."""
    index = checkpoint_index(ckpt_dir)
    for path in sorted(set(index.values())):
        for name, (dtype, _) in _header(path).items():
            if dtype in _INT_DTYPES and (name.endswith(".weight") or name.endswith("_bias")):
                raise _integer_weight(name, dtype, path)


def _integer_weight(name: str, dtype: str, path) -> CheckpointError:
    return CheckpointError(
        f"tensor {name} is stored as integers ({dtype}) in {path}; the model needs floating-point weights "
        "(bf16/fp16/fp32, or FP8 with block scales): use the checkpoint's unquantized or FP8 release")


def _expected_tensors(model: MoECausalLM) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """HF name -> (destination view, expected checkpoint shape), non-expert tensors only."""
    cfg = model.config
    out: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
    for name, p in model.named_parameters():
        if name.endswith((".w13", ".w2", "_scale", SCALE_SUFFIX)) or p.dtype == FP8:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        out[name] = (p.data, tuple(p.shape))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            out[name] = (b, tuple(b.shape))
    return out


def _expert_names(model: MoECausalLM) -> list[tuple[RoutedExperts, list[tuple[str, str, str]]]]:
    """Per MoE layer: (module, the (gate, up, down) checkpoint names of each expert it holds)."""
    return [(mod, [tuple(f"{mod_name}.{e}.{p}.weight" for p in _PROJ) for e in mod.expert_range])
            for mod_name, mod in model.named_modules()  # model.layers.{l}.mlp.experts
            if isinstance(mod, RoutedExperts)]


def _fp8_linears(model: MoECausalLM) -> dict[str, object]:
    """HF weight name -> its Fp8Linear (weight and scales filled together)."""
    from .models.layers import Fp8Linear

    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def _load_fp8_linear(reader: _Reader, name: str, mod, wide: torch.dtype) -> None:
    """Stored FP8 bytes and scales verbatim; a full-precision weight quantised once."""
    src = reader.get(name)
    if src.dtype == FP8:
        mod.weight.copy_(src)
        mod.weight_scale_inv.copy_(_scale(reader, name))
    else:
        quantize_fp8_blockwise(src.to(mod.weight.device, wide), out=(mod.weight, mod.weight_scale_inv))


def _ignorable(name: str, model: MoECausalLM, expected: set[str]) -> bool:
    """Tensors a checkpoint may hold that this model legitimately does not load."""
    cfg = model.config
    if name.endswith(SCALE_SUFFIX):  # the scales of a weight we load, or of one we may skip
        base = name[: -len(SCALE_SUFFIX)]
        return base in expected or _ignorable(base, model, expected)
    if name.endswith("rotary_emb.inv_freq"):
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


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")


class _Reader:
    """Memory-mapped access to a checkpoint's tensors, each file opened once."""

    def __init__(self, index: dict[str, Path], stack: contextlib.ExitStack):
        self.index, self.stack, self.files = index, stack, {}

    def get(self, name: str) -> torch.Tensor:
        path = self.index[name]
        if path not in self.files:
            self.files[path] = self.stack.enter_context(safe_open(path, framework="pt"))
        return self.files[path].get_tensor(name)


def _validate(model, ckpt_dir, index, meta, shapes: dict[str, tuple[int, ...]]) -> None:
    """Names, shapes and FP8 scales of everything the model will read, from the headers."""
    missing = sorted(n for n in shapes if n not in index)
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_dir} lacks {len(missing)} tensors the model needs: {_shown(missing)}")
    unexpected = sorted(n for n in index if n not in shapes and not _ignorable(n, model, set(shapes)))
    if unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has {len(unexpected)} tensors this {model.config.model_type} model does "
            f"not know: {_shown(unexpected)}; is config.json from the same model?"
        )
    no_scale = []
    for name, shape in shapes.items():
        dtype, got = meta[name]
        if dtype in _INT_DTYPES:
            raise _integer_weight(name, dtype, index[name])
        if got != shape:
            raise CheckpointError(f"tensor {name} has shape {got} in the checkpoint, the model expects {shape}")
        if dtype != _FP8_NAME:
            continue
        sname = name + SCALE_SUFFIX
        if sname not in meta:
            no_scale.append(name)
            continue
        sdtype, sshape = meta[sname]
        want = scale_shape(*shape, BLOCK)
        if sshape != want or sdtype not in _SCALE_DTYPES:
            raise CheckpointError(
                f"{sname} is {sdtype} {sshape}; the {shape} FP8 weight {name} needs float32 block scales of "
                f"shape {want} (128x128 blocks, as DeepSeek-V3 and Qwen3-*-FP8 store them)")
    if no_scale:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} stores {len(no_scale)} weights as float8_e4m3fn without their block scales "
            f"({SCALE_SUFFIX}): {_shown(no_scale)}; an FP8 checkpoint needs every *.weight_scale_inv "
            "(a missing shard, or a checkpoint re-saved without them?)")


def _scale(reader: _Reader, name: str) -> torch.Tensor:
    return reader.get(name + SCALE_SUFFIX).float()  # fp32/bf16/e8m0 -> fp32 is exact


def _read_into(reader: _Reader, name: str, src: torch.Tensor, dest: torch.Tensor) -> None:
    """dest <- the checkpoint's tensor, dequantised to dest's dtype if it is stored FP8."""
    if src.dtype == FP8:
        from .quant import dequantize_fp8_into

        dequantize_fp8_into(dest, src, _scale(reader, name))
    else:
        dest.copy_(src)


def _load_fp8_expert(reader: _Reader, mod: RoutedExperts, i: int, names, wide: torch.dtype, bufs: dict) -> None:
    """One expert into FP8 storage: stored FP8 bytes and scales verbatim, else quantised."""
    I = mod.inter
    srcs = [reader.get(n) for n in names]
    if all(s.dtype == FP8 for s in srcs):
        if I % BLOCK:
            raise CheckpointError(
                f"{names[0]}: moe_intermediate_size={I} is not a multiple of {BLOCK}, so the stored gate and up "
                f"block scales cannot be stacked into w13's {BLOCK}-row blocks without requantising; build the "
                "model with expert_dtype='same' (experts dequantised to the compute dtype)")
        rb = I // BLOCK
        mod.w13[i, :I].copy_(srcs[0])
        mod.w13[i, I:].copy_(srcs[1])
        mod.w2[i].copy_(srcs[2])
        mod.w13_scale[i, :rb].copy_(_scale(reader, names[0]))
        mod.w13_scale[i, rb:].copy_(_scale(reader, names[1]))
        mod.w2_scale[i].copy_(_scale(reader, names[2]))
        return
    if not bufs:  # one expert's working space in the compute dtype, reused
        bufs["w13"] = torch.empty(mod.w13.shape[1:], dtype=wide, device=mod.w13.device)
        bufs["w2"] = torch.empty(mod.w2.shape[1:], dtype=wide, device=mod.w2.device)
    for name, src, dest in zip(names, srcs, (bufs["w13"][:I], bufs["w13"][I:], bufs["w2"])):
        _read_into(reader, name, src, dest)
    quantize_fp8_blockwise(bufs["w13"], out=(mod.w13[i], mod.w13_scale[i]))
    quantize_fp8_blockwise(bufs["w2"], out=(mod.w2[i], mod.w2_scale[i]))


@torch.no_grad()
def load_checkpoint(model: MoECausalLM, ckpt_dir: str | Path, progress: bool = False) -> MoECausalLM:
    index = checkpoint_index(ckpt_dir)
    meta: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in sorted(set(index.values())):
        meta.update(_header(path))
    cfg = model.config
    plain = _expected_tensors(model)
    experts = _expert_names(model)
    fp8_linears = _fp8_linears(model)
    shapes = {n: s for n, (_, s) in plain.items()}
    shapes.update({n: tuple(m.weight.shape) for n, m in fp8_linears.items()})
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    for _, per_expert in experts:
        for g, u, d in per_expert:
            shapes.update({g: (I, H), u: (I, H), d: (H, I)})
    _validate(model, ckpt_dir, index, {n: meta.get(n, ("?", ())) for n in index}, shapes)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(shapes), desc="loading", unit="tensor")
    wide = compute_dtype(model)
    with contextlib.ExitStack() as stack:
        reader = _Reader(index, stack)
        for name, (dest, _) in plain.items():
            _read_into(reader, name, reader.get(name), dest)
            if bar:
                bar.update()
        for name, mod in fp8_linears.items():
            _load_fp8_linear(reader, name, mod, wide)
            if bar:
                bar.update()
        for mod, per_expert in experts:  # layer by layer, one expert at a time
            bufs: dict[str, torch.Tensor] = {}
            for i, names in enumerate(per_expert):
                if mod.is_fp8:
                    _load_fp8_expert(reader, mod, i, names, wide, bufs)
                else:
                    for name, dest in zip(names, (mod.w13[i, :I], mod.w13[i, I:], mod.w2[i])):
                        _read_into(reader, name, reader.get(name), dest)
                if bar:
                    bar.update(3)
    if bar:
        bar.close()
    return model
