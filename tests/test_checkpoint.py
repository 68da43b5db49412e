"""The safetensors loader (dwdp.checkpoint): sharded checkpoints, expert subsets that
never read other experts, clear errors, FP8 block-scaled weights, truncated models."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dwdp.checkpoint as ckpt_mod
from dwdp.batch import PackedBatch
from dwdp.checkpoint import CheckpointError, load_checkpoint
from dwdp.config import ConfigError, ModelConfig
from dwdp.models import build_model
from dwdp.presets import resolve_model
from dwdp.quant import dequantize_fp8_blockwise
from fp8_reference import dequant_reference_f64, quantize_fp8_blocks
from hf_reference import hf_last_logits_and_cache, make_hf_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def file_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint dir (single file or shards), read with safetensors."""
    out = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_checkpoint(dst: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def edited_copy(src: Path, dst: Path, edit=None, config_edit=None) -> Path:
    tensors = file_tensors(src)
    config = json.loads((src / "config.json").read_text())
    if edit:
        edit(tensors)
    if config_edit:
        config_edit(config)
    return write_checkpoint(dst, tensors, config)


def model_state(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def load(ckpt_dir: Path, **build_kw):
    cfg = ModelConfig.from_json_file(Path(ckpt_dir) / "config.json")
    return load_checkpoint(build_model(cfg, **build_kw), ckpt_dir)


# --------------------------------------------------------------------------------------
# Sharded checkpoints
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3"])
def test_sharded_checkpoint_loads_like_single_file(ref_cases, tmp_path, variant):
    case = ref_cases[variant]
    case.hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}

    single, sharded = case.ours(), load(tmp_path)
    a, b = model_state(single), model_state(sharded)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    batch = PackedBatch.from_sequences([[1, 2, 3, 4, 5], [7, 8]])
    assert torch.equal(single(batch).logits, sharded(batch).logits)


# --------------------------------------------------------------------------------------
# A subset of experts: loaded exactly, and the others never read
# --------------------------------------------------------------------------------------

SHARDS = {
    "same_everywhere": lambda layer: (3, 4),
    "per_layer": lambda layer: ((2 * layer) % 7, 3),  # depends on the layer index
    "last_only": lambda layer: (9, 1),
}


def _expert_key(layer: int, e: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"


def _owned(cfg, shard, layer: int) -> range:
    start, count = shard(layer)
    return range(start, start + count)


def _is_foreign_expert(name: str, cfg, shard) -> bool:
    parts = name.split(".")
    if len(parts) > 5 and parts[3] == "mlp" and parts[4] == "experts":
        layer, e = int(parts[2]), int(parts[5])
        return e not in _owned(cfg, shard, layer)
    return False


class _RecordingOpen:
    """Wraps safetensors.safe_open, recording every tensor name read."""

    def __init__(self, real):
        self.real, self.read = real, []

    def __call__(self, *args, **kwargs):
        return _RecordingHandle(self.real(*args, **kwargs), self.read)


class _RecordingHandle:
    def __init__(self, handle, read):
        self.h, self.read = handle, read

    def __enter__(self):
        self.h.__enter__()
        return self

    def __exit__(self, *exc):
        return self.h.__exit__(*exc)

    def keys(self):
        return self.h.keys()

    def metadata(self):
        return self.h.metadata()

    def get_slice(self, name):
        self.read.append(name)
        return self.h.get_slice(name)

    def get_tensor(self, name):
        self.read.append(name)
        return self.h.get_tensor(name)


@pytest.mark.parametrize("shard_name", list(SHARDS))
def test_expert_subset_loads_exactly_those_experts(qwen3_ref, shard_name):
    case, cfg, shard = qwen3_ref, qwen3_ref.cfg, SHARDS[shard_name]
    model = load(case.path, expert_shard=shard)
    file = file_tensors(case.path)
    inter = cfg.moe_intermediate_size
    moe_layers = [l for l in model.model.layers if l.is_moe]
    assert [l.idx for l in moe_layers] == cfg.moe_layers and moe_layers
    for layer in moe_layers:
        ex = layer.mlp.experts
        owned = _owned(cfg, shard, layer.idx)
        assert list(ex.expert_range) == list(owned)
        assert ex.w13.shape == (len(owned), 2 * inter, cfg.hidden_size)
        assert ex.w2.shape == (len(owned), cfg.hidden_size, inter)
        for i, e in enumerate(owned):
            assert torch.equal(ex.w13[i, :inter], file[_expert_key(layer.idx, e, "gate_proj")])
            assert torch.equal(ex.w13[i, inter:], file[_expert_key(layer.idx, e, "up_proj")])
            assert torch.equal(ex.w2[i], file[_expert_key(layer.idx, e, "down_proj")])
    # Everything else is loaded as in the full model.
    full = model_state(case.ours())
    for name, t in model_state(model).items():
        if ".experts." not in name:
            assert torch.equal(t, full[name]), name
    # A layer holding a subset refuses to compute alone (a parallel strategy must supply the rest).
    with pytest.raises(RuntimeError, match="parallel strategy"):
        model(PackedBatch.from_sequences([[1, 2, 3]]))


@pytest.mark.parametrize("shard_name", list(SHARDS))
def test_expert_subset_never_reads_other_experts(qwen3_ref, tmp_path, monkeypatch, shard_name):
    case, cfg, shard = qwen3_ref, qwen3_ref.cfg, SHARDS[shard_name]
    original = file_tensors(case.path)

    # (1) A copy whose foreign experts are NaN: loading must leave no NaN anywhere.
    def poison(tensors):
        for name in tensors:
            if _is_foreign_expert(name, cfg, shard):
                tensors[name] = torch.full_like(tensors[name], float("nan"))

    poisoned = edited_copy(case.path, tmp_path / "poisoned", edit=poison)
    n_poisoned = sum(_is_foreign_expert(n, cfg, shard) for n in original)
    assert n_poisoned > 0

    # (2) Record every tensor the loader reads through safetensors.
    recorder = _RecordingOpen(ckpt_mod.safe_open)
    monkeypatch.setattr(ckpt_mod, "safe_open", recorder)
    model = load(poisoned, expert_shard=shard)
    monkeypatch.undo()

    for name, t in model_state(model).items():
        assert torch.isfinite(t).all(), f"{name} picked up a NaN from another rank's expert"
    for layer in model.model.layers:
        if layer.is_moe:
            inter = cfg.moe_intermediate_size
            for i, e in enumerate(layer.mlp.experts.expert_range):
                assert torch.equal(layer.mlp.experts.w13[i, :inter], original[_expert_key(layer.idx, e, "gate_proj")])
    foreign_read = [n for n in recorder.read if _is_foreign_expert(n, cfg, shard)]
    assert not foreign_read, f"read experts this rank does not own: {foreign_read[:5]}"
    wanted = {n for n in original if not _is_foreign_expert(n, cfg, shard)}
    assert set(recorder.read) == wanted
    assert len(recorder.read) == len(wanted), "some tensor was read more than once"


# --------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------


def test_missing_tensor_is_named(qwen3_ref, tmp_path):
    name = "model.layers.2.self_attn.k_norm.weight"
    bad = edited_copy(qwen3_ref.path, tmp_path / "c", edit=lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="lacks") as ei:
        load(bad)
    assert name in str(ei.value)


def test_missing_owned_expert_is_named_and_foreign_one_is_not_needed(qwen3_ref, tmp_path):
    name = _expert_key(2, 7, "up_proj")
    bad = edited_copy(qwen3_ref.path, tmp_path / "c", edit=lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as ei:
        load(bad)
    assert name in str(ei.value)
    load(bad, expert_shard=lambda layer: (0, 5))  # a rank without expert 7 does not need it


@pytest.mark.parametrize("name", [
    "model.layers.0.self_attn.bogus.weight",
    "model.layers.0.mlp.experts.10.gate_proj.weight",  # expert id past num_experts=10
    "model.layers.1.mlp.experts.0.gate_proj.weight",  # an expert on a dense layer (mlp_only_layers=[1])
    "model.bogus_norm.weight",
])
def test_unexpected_tensor_is_named(qwen3_ref, tmp_path, name):
    bad = edited_copy(qwen3_ref.path, tmp_path / "c", edit=lambda t: t.__setitem__(name, torch.zeros(32, 64)))
    with pytest.raises(CheckpointError) as ei:
        load(bad)
    assert name in str(ei.value)


@pytest.mark.parametrize("variant,name", [
    ("qwen3_moe", "model.layers.0.self_attn.q_proj.weight"),
    ("qwen3_moe", "model.layers.3.mlp.experts.4.down_proj.weight"),
    ("deepseek_v3", "model.layers.1.self_attn.kv_b_proj.weight"),
    ("deepseek_v3", "model.layers.2.mlp.gate.e_score_correction_bias"),
])
def test_misshaped_tensor_is_named(ref_cases, tmp_path, variant, name):
    def edit(t):
        w = t[name]
        t[name] = torch.zeros(*w.shape[:-1], w.shape[-1] + 1)

    bad = edited_copy(ref_cases[variant].path, tmp_path / "c", edit=edit)
    with pytest.raises(CheckpointError, match="shape") as ei:
        load(bad)
    assert name in str(ei.value)


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(model_type="llama"), "llama"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c.update(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8,
                                             long_factor=[1.0] * 8)), "longrope"),
    (lambda c: (c.pop("rope_parameters", None), c.update(rope_theta=1e4, rope_scaling=dict(
        type="longrope", short_factor=[1.0] * 8, long_factor=[1.0] * 8))), "longrope"),
    (lambda c: c.update(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)), "dynamic"),
    (lambda c: c.pop("num_hidden_layers"), "num_hidden_layers"),
])
def test_unsupported_config_is_named(qwen3_ref, tmp_path, change, needle):
    config = json.loads((qwen3_ref.path / "config.json").read_text())
    change(config)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as ei:
        resolve_model(str(d))
    assert needle in str(ei.value)
    with pytest.raises(ConfigError):
        ModelConfig.from_json_file(d / "config.json")


def test_deepseek_unsupported_options_are_named(dsv3_ref, tmp_path):
    base = json.loads((dsv3_ref.path / "config.json").read_text())
    for change, needle in [
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(topk_method="random"), "topk_method"),
        (dict(scoring_func="tanh"), "scoring_func"),
        (dict(n_group=5), "n_group"),
        (dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4)), "longrope"),
    ]:
        with pytest.raises(ConfigError) as ei:
            ModelConfig.from_hf_dict({**base, **change})
        assert needle in str(ei.value)


def test_directory_without_safetensors(qwen3_ref, tmp_path):
    shutil.copy(qwen3_ref.path / "config.json", tmp_path / "config.json")
    cfg, ckpt = resolve_model(str(tmp_path))
    assert ckpt == tmp_path
    with pytest.raises(CheckpointError, match="safetensors") as ei:
        load_checkpoint(build_model(cfg), tmp_path)
    assert str(tmp_path) in str(ei.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        resolve_model(str(tmp_path))


def test_invalid_json_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        ModelConfig.from_json_file(tmp_path / "config.json")


# --------------------------------------------------------------------------------------
# FP8 block-scaled weights (DeepSeek's 128x128 weight_scale_inv)
# --------------------------------------------------------------------------------------

FP8_NAMES = [
    "lm_head.weight",  # [300, 64]: 3 row blocks, the last one partial
    "model.layers.0.mlp.gate_proj.weight",  # [200, 64]: 2x1 blocks
    "model.layers.0.mlp.down_proj.weight",  # [64, 200]: 1x2 blocks, the last column block partial
    "model.layers.1.mlp.experts.2.up_proj.weight",  # a routed expert (a view into w13)
    "model.layers.1.self_attn.o_proj.weight",  # [64, 64]: one partial block
]


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8_src")
    hf = make_hf_model("qwen3_moe", d, seed=11, num_hidden_layers=2, intermediate_size=200, vocab_size=300,
                       mlp_only_layers=[0])
    return d, hf


@pytest.mark.parametrize("layout", ["single_file", "scale_in_other_shard"])
def test_fp8_block_scaled_weights_are_dequantised(fp8_source, tmp_path, layout):
    src, hf = fp8_source
    tensors = file_tensors(src)
    config = json.loads((src / "config.json").read_text())
    g = torch.Generator().manual_seed(5)
    expected = {}
    for name in FP8_NAMES:
        q, s = quantize_fp8_blocks(tensors[name], g)
        tensors[name], tensors[name + "_scale_inv"] = q, s
        expected[name] = dequant_reference_f64(q, s)
    if layout == "single_file":
        ckpt = write_checkpoint(tmp_path / "c", tensors, config)
    else:  # shards with each scale in a different file than its weight
        ckpt = tmp_path / "c"
        ckpt.mkdir()
        (ckpt / "config.json").write_text(json.dumps(config))
        a = {k: v for k, v in tensors.items() if not k.endswith("_scale_inv")}
        b = {k: v for k, v in tensors.items() if k.endswith("_scale_inv")}
        save_file(a, ckpt / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
        save_file(b, ckpt / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
        weight_map = {k: "model-00001-of-00002.safetensors" for k in a}
        weight_map.update({k: "model-00002-of-00002.safetensors" for k in b})
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    with safe_open(ckpt / ("model.safetensors" if layout == "single_file" else "model-00001-of-00002.safetensors"),
                   framework="pt") as f:
        assert f.get_slice(FP8_NAMES[0]).get_dtype() == "F8_E4M3"
    model = load(ckpt)
    state = model_state(model)
    inter = model.config.moe_intermediate_size
    for name, ref in expected.items():
        if ".experts." in name:
            got = model.model.layers[1].mlp.experts.w13[2, inter:]
        else:
            got = state[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape
        # fp8 * fp32 scale is exact in float64 and correctly rounded in fp32.
        torch.testing.assert_close(got.double(), ref, rtol=1e-7, atol=0, msg=name)
    # Untouched weights load as usual.
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], tensors["model.layers.1.self_attn.q_proj.weight"])


def test_fp8_dequant_math_on_padded_shape():
    """rows and cols both not multiples of 128, 3x3 blocks."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 260, generator=g)
    q, s = quantize_fp8_blocks(w, g)
    assert s.shape == (3, 3)
    got = dequantize_fp8_blockwise(q, s)
    torch.testing.assert_close(got.double(), dequant_reference_f64(q, s), rtol=1e-7, atol=0)
    assert rel_err(got, w) < 0.07  # and it is a quantisation of w (e4m3: 3 mantissa bits)


def test_fp8_checkpoint_forward_matches_hf_with_dequantised_weights(fp8_source, tmp_path):
    """End to end: our model on the FP8 checkpoint vs transformers with the same
    (float64-dequantised) weights."""
    src, hf = fp8_source
    tensors = file_tensors(src)
    config = json.loads((src / "config.json").read_text())
    g = torch.Generator().manual_seed(6)
    hf2 = copy.deepcopy(hf)
    params = dict(hf2.named_parameters())
    for name in ["lm_head.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"]:
        q, s = quantize_fp8_blocks(tensors[name], g)
        tensors[name], tensors[name + "_scale_inv"] = q, s
        with torch.no_grad():
            params[name].copy_(dequant_reference_f64(q, s).float())
    ckpt = write_checkpoint(tmp_path / "c", tensors, config)
    model = load(ckpt)
    seq = torch.randint(0, 300, (23,), generator=g).tolist()
    ref, _ = hf_last_logits_and_cache(hf2, seq)
    assert rel_err(model(PackedBatch.from_sequences([seq])).logits[0], ref) <= 1e-4


# --------------------------------------------------------------------------------------
# Truncated models
# --------------------------------------------------------------------------------------


def test_truncated_model_loads_from_full_checkpoint(qwen3_ref):
    case = qwen3_ref
    assert case.cfg.num_layers == 4
    cfg = case.cfg.truncated(2)
    model = load_checkpoint(build_model(cfg), case.path)
    assert len(model.model.layers) == 2
    file = file_tensors(case.path)
    for name, t in model.named_parameters():
        if name.endswith((".w13", ".w2")):
            continue
        assert torch.equal(t, file[name]), name
    inter = cfg.moe_intermediate_size
    ex = model.model.layers[0].mlp.experts
    for e in range(cfg.num_experts):
        assert torch.equal(ex.w2[e], file[_expert_key(0, e, "down_proj")])
        assert torch.equal(ex.w13[e, inter:], file[_expert_key(0, e, "up_proj")])

    # Against transformers cut to its first two layers.
    hf2 = copy.deepcopy(case.hf)
    hf2.model.layers = hf2.model.layers[:2]
    hf2.config.num_hidden_layers = 2
    if getattr(hf2.config, "layer_types", None):
        hf2.config.layer_types = hf2.config.layer_types[:2]
    seq = [5, 9, 200, 3, 17, 44, 1]
    ref, _ = hf_last_logits_and_cache(hf2, seq)
    assert rel_err(model(PackedBatch.from_sequences([seq])).logits[0], ref) <= 1e-4


def test_truncated_via_resolve_model(qwen3_ref):
    cfg, ckpt = resolve_model(str(qwen3_ref.path), num_layers=3)
    assert cfg.num_layers == 3 and ckpt == qwen3_ref.path
    load_checkpoint(build_model(cfg), ckpt)  # layer 3's tensors are ignored, not an error
