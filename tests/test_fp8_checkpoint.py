"""FP8 releases (DeepSeek-V3/R1, Qwen3-*-FP8 layouts): routed experts kept as stored
(bytes and block scales verbatim), everything else dequantised against a float64
reference, logits against transformers on the dequantised weights; quantise-at-load and
FP8 random init equal quantising a full-precision model; bad FP8 checkpoints named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dwdp.checkpoint as ckpt_mod
from dwdp.batch import PackedBatch
from dwdp.checkpoint import CheckpointError, load_checkpoint
from dwdp.config import ConfigError, ModelConfig
from dwdp.models import build_model, init_random
from dwdp.quant import FP8, quantize_experts_fp8
from fp8_reference import QUANTIZATION_CONFIG, round_inputs_to_fp8, to_official_fp8, write_fp8_release
from hf_reference import make_hf_model

# hidden 192: one full and one partial column block; moe_intermediate_size 256: gate and
# up each span two 128-row blocks, so w13 stacks four scale rows (a swap is visible).
SHAPES = {
    "qwen3_moe": dict(hidden_size=192, moe_intermediate_size=256, num_hidden_layers=2, mlp_only_layers=[1]),
    "deepseek_v3": dict(hidden_size=192, moe_intermediate_size=256, num_hidden_layers=2),
}


def _file_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


class Release:
    def __init__(self, root: Path, family: str, **overrides):
        src = root / "src"
        make_hf_model(family, src, seed=21, **{**SHAPES[family], **overrides})
        self.family, self.config = family, json.loads((src / "config.json").read_text())
        self.stored, self.value = to_official_fp8(_file_tensors(src), seed=4)
        # Shards of 7 tensors: many weights and their scales land in different files.
        self.path = write_fp8_release(root / "fp8", self.stored, self.config, family, max_shard_tensors=7)
        self.cfg = ModelConfig.from_json_file(self.path / "config.json")

    def load(self, dtype=torch.float32, **kw):
        return load_checkpoint(build_model(self.cfg, dtype, **kw), self.path)


@pytest.fixture(scope="module", params=list(SHAPES))
def release(request, tmp_path_factory):
    return Release(tmp_path_factory.mktemp(f"fp8_{request.param}"), request.param)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_release_config_is_recognised(release):
    assert release.cfg.fp8_checkpoint
    stored = release.stored
    n_fp8 = sum(t.dtype == FP8 for t in stored.values())
    assert n_fp8 > 10 and stored["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_experts_are_kept_verbatim_and_the_rest_dequantised_exactly(release):
    model = release.load()  # expert_dtype="auto": an FP8 release keeps FP8 experts
    cfg, st = release.cfg, release.stored
    I = cfg.moe_intermediate_size
    for layer in model.model.layers:
        if not layer.is_moe:
            continue
        ex = layer.mlp.experts
        assert ex.is_fp8 and ex.w13_scale.shape == (cfg.num_experts, 4, 2) and ex.w2_scale.shape[1:] == (2, 2)
        for e in range(cfg.num_experts):
            k = f"model.layers.{layer.idx}.mlp.experts.{e}"
            assert torch.equal(_bytes(ex.w13[e, :I]), _bytes(st[f"{k}.gate_proj.weight"]))
            assert torch.equal(_bytes(ex.w13[e, I:]), _bytes(st[f"{k}.up_proj.weight"]))
            assert torch.equal(_bytes(ex.w2[e]), _bytes(st[f"{k}.down_proj.weight"]))
            assert torch.equal(ex.w13_scale[e, :2], st[f"{k}.gate_proj.weight_scale_inv"])
            assert torch.equal(ex.w13_scale[e, 2:], st[f"{k}.up_proj.weight_scale_inv"])
            assert torch.equal(ex.w2_scale[e], st[f"{k}.down_proj.weight_scale_inv"])
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    dense = release.load(dense_dtype="same")  # projections dequantised instead
    dense_params = dict(dense.named_parameters())
    kept = 0
    for name, ref in release.value.items():
        if ".experts." in name:
            continue
        got = params[name]
        if st[name].dtype == FP8:  # projections (attention, dense / shared MLP): as shipped
            assert got.dtype == FP8 and torch.equal(_bytes(got), _bytes(st[name])), name
            assert torch.equal(params[name + "_scale_inv"], st[name + "_scale_inv"]), name
            kept += 1
            got = dense_params[name]
        assert got.dtype == (torch.float32), name
        # fp8 x fp32 scale is exact in float64; fp32 arithmetic rounds it once, like float().
        assert torch.equal(got, ref.float()), name
    assert kept >= 6  # attention (and dense / shared MLP) weights kept FP8, and dequantised with "same"
    for name, p in dense.named_parameters():
        assert p.dtype != FP8 or ".experts." in name, name


def _quantised_inputs(hf, release) -> list:
    """transformers' projections that the release stores FP8 see their input as the FP8 path does."""
    return round_inputs_to_fp8([m for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)
                                and release.stored.get(n + ".weight", torch.empty(0)).dtype == FP8])


@pytest.mark.parametrize("dense_dtype", ["same", "auto"])
def test_logits_match_transformers_on_the_dequantised_weights(release, tmp_path, dense_dtype):
    """Independent reference: transformers' own model, loaded (its own loader) from a
    checkpoint holding the float64-dequantised values of every stored tensor. With FP8
    projections ("auto") the reference's projections see FP8-rounded inputs (as the FP8
    GEMM does; without that the logits differ by ~15%): what remains is fp32 against fp32."""
    import transformers

    ref_dir = tmp_path / "dequantised"
    ref_dir.mkdir()
    ckpt_mod_tensors = {k: v.float() for k, v in release.value.items()}
    from safetensors.torch import save_file

    save_file(ckpt_mod_tensors, ref_dir / "model.safetensors", metadata={"format": "pt"})
    (ref_dir / "config.json").write_text(json.dumps(release.config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    model = release.load(dense_dtype=dense_dtype)
    assert model.model.layers[0 if release.family == "qwen3_moe" else 1].mlp.experts.is_fp8
    fp8_dense = dense_dtype == "auto"
    assert (model.model.layers[0].self_attn.o_proj.weight.dtype == FP8) == fp8_dense
    hooks = _quantised_inputs(hf, release) if fp8_dense else []
    g = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, release.cfg.vocab_size, (n,), generator=g).tolist() for n in (19, 6)]
    got = model(PackedBatch.from_sequences(seqs)).logits
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            want = hf(torch.tensor([seq])).logits[0, -1].double()
        err = float((got[i].double() - want).norm() / want.norm())
        assert err < (1e-4 if fp8_dense else 1e-5), (release.family, i, err)
    for h in hooks:
        h.remove()


def test_same_expert_dtype_dequantises_experts_once_to_the_compute_dtype(release):
    model = release.load(torch.bfloat16, expert_dtype="same", dense_dtype="same")
    I = release.cfg.moe_intermediate_size
    layer = next(l for l in model.model.layers if l.is_moe)
    ex = layer.mlp.experts
    assert ex.w13.dtype == torch.bfloat16 and not hasattr(ex, "w13_scale")
    for e in (0, release.cfg.num_experts - 1):
        k = f"model.layers.{layer.idx}.mlp.experts.{e}"
        # Computed in fp32 (exact for fp8 x fp32 scale) and rounded once to bf16.
        assert torch.equal(ex.w13[e, I:], release.value[f"{k}.up_proj.weight"].float().bfloat16())
        assert torch.equal(ex.w2[e], release.value[f"{k}.down_proj.weight"].float().bfloat16())
    name = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(dict(model.named_parameters())[name], release.value[name].float().bfloat16())


def test_expert_shard_of_an_fp8_release_reads_only_its_experts_and_scales(release, monkeypatch):
    from test_checkpoint import _RecordingOpen

    recorder = _RecordingOpen(ckpt_mod.safe_open)
    monkeypatch.setattr(ckpt_mod, "safe_open", recorder)
    model = release.load(expert_shard=lambda layer: (3, 4))
    monkeypatch.undo()
    read = set(recorder.read)
    assert len(recorder.read) == len(read), "a tensor was read twice"
    experts = {n for n in read if ".experts." in n}
    ids = {int(n.split(".experts.")[1].split(".")[0]) for n in experts}
    assert ids == {3, 4, 5, 6}
    assert len(experts) == 6 * 4 * len(release.cfg.moe_layers)  # 3 weights + 3 scales per expert
    full = release.load()
    for layer, lf in zip(model.model.layers, full.model.layers):
        if layer.is_moe:
            assert torch.equal(_bytes(layer.mlp.experts.w13), _bytes(lf.mlp.experts.w13[3:7]))
            assert torch.equal(layer.mlp.experts.w2_scale, lf.mlp.experts.w2_scale[3:7])


# --------------------------------------------------------------------------------------
# Quantising at load / at random init equals quantising a loaded full-precision model
# --------------------------------------------------------------------------------------


def _expert_state(model) -> dict[str, torch.Tensor]:
    return {n: (_bytes(p) if p.dtype == FP8 else p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_checkpoint_quantised_at_load_equals_quantising_after(qwen3_ref, dtype):
    cfg = qwen3_ref.cfg  # moe_intermediate_size 32: blocks straddle gate and up, quantised whole
    after = load_checkpoint(build_model(cfg, dtype, expert_dtype="same"), qwen3_ref.path)
    quantize_experts_fp8(after)
    at_load = load_checkpoint(build_model(cfg, dtype, expert_dtype="fp8"), qwen3_ref.path)
    a, b = _expert_state(after), _expert_state(at_load)
    assert a.keys() == b.keys() and any(n.endswith("w13_scale") for n in a)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_fp8_random_init_equals_quantising_a_random_model(dsv3_ref):
    cfg = dsv3_ref.cfg
    after = init_random(build_model(cfg, torch.bfloat16, expert_shard=lambda _: (2, 5)), seed=3)
    quantize_experts_fp8(after)
    direct = init_random(build_model(cfg, torch.bfloat16, expert_shard=lambda _: (2, 5), expert_dtype="fp8"), 3)
    a, b = _expert_state(after), _expert_state(direct)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


# --------------------------------------------------------------------------------------
# Shapes the stored layout cannot keep, and broken FP8 checkpoints
# --------------------------------------------------------------------------------------


def test_unaligned_intermediate_is_dequantised_or_refused_by_name(tmp_path):
    rel = Release(tmp_path, "qwen3_moe", moe_intermediate_size=200)  # gate/up blocks straddle in w13
    model = rel.load()  # auto: cannot keep them as stored, so they are dequantised
    ex = model.model.layers[0].mlp.experts
    assert ex.w13.dtype == torch.float32
    assert torch.equal(ex.w13[1, 200:], rel.value["model.layers.0.mlp.experts.1.up_proj.weight"].float())
    with pytest.raises(CheckpointError, match="moe_intermediate_size=200") as ei:
        rel.load(expert_dtype="fp8")
    assert "expert_dtype='same'" in str(ei.value)


def _edited(rel: Release, dst: Path, edit) -> Path:
    tensors = dict(rel.stored)
    edit(tensors)
    return write_fp8_release(dst, tensors, rel.config, rel.family)


def test_missing_scale_is_named_before_anything_is_read(release, tmp_path, monkeypatch):
    victims = ["model.layers.1.self_attn.o_proj.weight", f"model.layers.{release.cfg.moe_layers[0]}.mlp.experts.3.up_proj.weight"]
    bad = _edited(release, tmp_path / "c", lambda t: [t.pop(v + "_scale_inv") for v in victims])
    from test_checkpoint import _RecordingOpen

    recorder = _RecordingOpen(ckpt_mod.safe_open)
    monkeypatch.setattr(ckpt_mod, "safe_open", recorder)
    with pytest.raises(CheckpointError, match="weight_scale_inv") as ei:
        load_checkpoint(build_model(release.cfg), bad)
    assert all(v in str(ei.value) for v in victims)
    assert recorder.read == []


def test_misshaped_scale_is_named(release, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    bad = _edited(release, tmp_path / "c", lambda t: t.__setitem__(name, torch.ones(1, 1)))
    with pytest.raises(CheckpointError, match=r"\(1, 1\)") as ei:
        load_checkpoint(build_model(release.cfg), bad)
    assert name in str(ei.value)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float8_e8m0fnu])
def test_other_exact_scale_dtypes_load_exactly(tmp_path, scale_dtype):
    """Scales stored narrower (bf16, or power-of-two UE8M0) are exactly representable in fp32."""
    rel = Release(tmp_path, "qwen3_moe")

    def narrow(t):
        for k in [k for k in t if k.endswith("_scale_inv")]:
            t[k] = t[k].to(scale_dtype)
    stored = dict(rel.stored)
    narrow(stored)
    path = write_fp8_release(tmp_path / "narrow", stored, rel.config, rel.family)
    model = load_checkpoint(build_model(rel.cfg), path)
    k = "model.layers.0.mlp.experts.5.down_proj.weight_scale_inv"
    assert torch.equal(model.model.layers[0].mlp.experts.w2_scale[5], stored[k].float())


@pytest.mark.parametrize("change,needle", [
    (dict(quant_method="gptq"), "quant_method"),
    (dict(weight_block_size=None), "weight_block_size"),
    (dict(weight_block_size=[64, 64]), "weight_block_size"),
    (dict(fmt="e5m2"), "fmt"),
    (dict(activation_scheme="static"), "activation_scheme"),
])
def test_unsupported_quantization_config_is_named(change, needle):
    from dwdp.presets import preset_hf_dict

    d = preset_hf_dict("tiny-deepseek-v3")
    assert ModelConfig.from_hf_dict({**d, "quantization_config": QUANTIZATION_CONFIG["deepseek_v3"]}).fp8_checkpoint
    assert not ModelConfig.from_hf_dict(d).fp8_checkpoint
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_hf_dict({**d, "quantization_config": {**QUANTIZATION_CONFIG["deepseek_v3"], **change}})
