"""Memory of building and loading, measured with :class:`alloc_tracker.AllocTracker`
(bytes of tensor storage that torch ops allocate, live and peak):

- build allocates exactly what :func:`dwdp.memory.build_bytes` predicts, for a replica,
  an expert shard and FP8 experts, in both families, with no transient (no fp32 model);
- random init and checkpoint loading add at most a few experts' worth on top, also when
  quantising to FP8 or dequantising an FP8 release;
- the chunked FP8 routines keep a bounded working set whatever the tensor size.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import dwdp.quant as quant
from alloc_tracker import AllocTracker
from dwdp.checkpoint import load_checkpoint
from dwdp.config import ModelConfig
from dwdp.memory import build_bytes, rank_memory
from dwdp.models import build_model, init_random
from dwdp.models.moe import RoutedExperts
from dwdp.strategy.placement import Placement
from dwdp.presets import preset_hf_dict, resolve_model
from dwdp.quant import FP8, expert_bytes, quantize_experts_fp8
from fp8_reference import QUANTIZATION_CONFIG, to_official_fp8

MiB = 2**20


def held_bytes(model) -> int:
    """Bytes of the model's distinct parameter and buffer storages."""
    seen, n = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            n += t.untyped_storage().nbytes()
    return n


def test_tracker_counts_allocations_not_views_and_sees_frees(tmp_path):
    with AllocTracker() as tr:
        a = torch.empty(1000, dtype=torch.float32)
        v = a[10:20].view(torch.int32)  # a view: no new bytes
        a.add_(1)  # in place: none either
        assert tr.current() == 4000
        b = a.to(torch.bfloat16)
        assert tr.current() == 6000
        del a, v
        assert tr.current() == 2000
        c = torch.zeros(10)
        assert tr.current() == 2040 and tr.peak == 6000
        del b, c
    save_file({"x": torch.zeros(500)}, tmp_path / "f.safetensors")
    from safetensors import safe_open

    with AllocTracker() as tr, safe_open(tmp_path / "f.safetensors", framework="pt") as f:
        x = f.get_tensor("x")  # memory-mapped file pages, not an allocation
        assert tr.current() == 0
        y = x * 2
        assert tr.current() == 2000 and y.shape == (500,)


def test_build_of_truncated_qwen3_30b_a3b_allocates_exactly_the_model():
    """A real model's shapes: one layer of Qwen3-30B-A3B in bf16 is 2.3 GiB; building it
    used to peak at 5.2 GiB (an fp32 model, then the bf16 cast)."""
    cfg, _ = resolve_model("qwen3-30b-a3b", num_layers=1)
    for expert_dtype in ("same", "fp8"):
        with AllocTracker() as tr:
            model = build_model(cfg, torch.bfloat16, "cpu", expert_dtype=expert_dtype)
        predicted = build_bytes(cfg, torch.bfloat16, expert_dtype).total(cfg.num_experts)
        assert tr.peak == tr.current() == predicted == held_bytes(model), expert_dtype
        if expert_dtype == "fp8":
            assert model.model.layers[0].mlp.experts.w13.dtype == FP8
            # 1 byte per weight + fp32 scales of w13 (12 x 16 blocks) and w2 (16 x 6 blocks)
            per_expert = 3 * 2048 * 768 + 4 * (12 * 16 + 16 * 6)
            assert predicted == build_bytes(cfg, torch.bfloat16, "same").non_expert + cfg.num_experts * per_expert
        del model


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-deepseek-v3", "tied"])
@pytest.mark.parametrize("expert_dtype", ["same", "fp8"])
def test_predicted_bytes_equal_bytes_built(preset, expert_dtype):
    """dp replica, an expert shard (dep / dwdp ranks) and FP8 experts: info's numbers are
    what build allocates, routers (fp32), routing buffers and FP8 scales included."""
    if preset == "tied":
        cfg = dataclasses.replace(resolve_model("tiny-qwen3-moe")[0], tie_word_embeddings=True)
    else:
        cfg = resolve_model(preset)[0]
    dtype = torch.bfloat16
    pl = Placement.create(cfg.num_experts, 4, None)
    cases = {"dp": (None, None), "shard": ((3, 5), 5), "dwdp rank": ((pl.local_range(1).start, pl.local), pl.local)}
    for what, (shard, local) in cases.items():
        with AllocTracker() as tr:
            model = build_model(cfg, dtype, "cpu", (lambda _: shard) if shard else None, expert_dtype=expert_dtype)
        mem = rank_memory(cfg, dtype, expert_dtype, local)
        assert tr.peak == tr.current() == held_bytes(model) == mem.non_expert + mem.resident_experts, what
    # The FP8 scales are in the count: an expert is 1 byte per weight plus fp32 scales.
    per = build_bytes(cfg, dtype, expert_dtype).per_expert
    n = cfg.expert_numel()
    assert per == (n + 4 * (1 + 1) if expert_dtype == "fp8" else 2 * n)  # tiny: one scale block per matrix


# --------------------------------------------------------------------------------------
# Random init and loading: the model plus a few experts at most
# --------------------------------------------------------------------------------------

# Qwen3-shaped, small enough to init and save in well under a second: 32 experts of
# 3 x 256 x 128 per MoE layer, two MoE layers.
MID = dict(preset_hf_dict("tiny-qwen3-moe"), vocab_size=2048, hidden_size=256, moe_intermediate_size=128,
           num_experts=32, num_hidden_layers=2, mlp_only_layers=[], head_dim=64, intermediate_size=256)
FEW_EXPERTS = 6  # the working-space bound, in full-precision (bf16) experts


def _mid(fp8_release=False) -> ModelConfig:
    d = dict(MID, quantization_config=QUANTIZATION_CONFIG["qwen3_moe"]) if fp8_release else MID
    return ModelConfig.from_hf_dict(d)


def _extra(cfg, dtype, expert_dtype, run) -> tuple[int, int]:
    """(peak - final bytes, final bytes) of building the model and running ``run`` on it."""
    with AllocTracker() as tr:
        model = run(build_model(cfg, dtype, "cpu", expert_dtype=expert_dtype))
        final = tr.current()
    assert final == build_bytes(cfg, dtype, expert_dtype).total(cfg.num_experts) == held_bytes(model)
    return tr.peak - final, final


def _bound(cfg) -> int:
    return FEW_EXPERTS * expert_bytes(cfg.hidden_size, cfg.moe_intermediate_size, torch.bfloat16)


def test_init_random_peak():
    cfg = _mid()
    layer_experts = cfg.num_experts * expert_bytes(cfg.hidden_size, cfg.moe_intermediate_size, torch.bfloat16)
    assert _extra(cfg, torch.bfloat16, "same", lambda m: init_random(m, 0))[0] == 0  # drawn in place
    extra, _ = _extra(cfg, torch.bfloat16, "fp8", lambda m: init_random(m, 0))
    assert 0 < extra <= _bound(cfg) < layer_experts / 4

    # The old way (bf16 experts, then quantise) holds a whole model's bf16 experts on top.
    def old(m):
        init_random(m, 0)
        quantize_experts_fp8(m)
        return m
    with AllocTracker() as tr:
        m = old(build_model(cfg, torch.bfloat16, "cpu", expert_dtype="same"))
    assert tr.peak - tr.current() >= 2 * layer_experts and m.model.layers[0].mlp.experts.is_fp8


@pytest.fixture(scope="module")
def mid_checkpoints(tmp_path_factory):
    """The MID model as a bf16 checkpoint and as an FP8 release (official layout)."""
    cfg = _mid()
    model = init_random(build_model(cfg, torch.float32), 5)
    I = cfg.moe_intermediate_size
    tensors = {}
    for name, p in model.named_parameters():
        if name.endswith((".w13", ".w2")):
            mod_name = name.rsplit(".", 1)[0]
            for e in range(cfg.num_experts):
                k = f"{mod_name}.{e}"
                if name.endswith("w13"):
                    tensors[f"{k}.gate_proj.weight"], tensors[f"{k}.up_proj.weight"] = p[e, :I], p[e, I:]
                else:
                    tensors[f"{k}.down_proj.weight"] = p[e]
        else:
            tensors[name] = p
    root = tmp_path_factory.mktemp("mid")
    out = {}
    for kind, ts, extra in [("bf16", {k: v.bfloat16() for k, v in tensors.items()}, {}),
                            ("fp8", to_official_fp8(tensors)[0], {"quantization_config": QUANTIZATION_CONFIG["qwen3_moe"]})]:
        d = root / kind
        d.mkdir()
        save_file({k: v.contiguous() for k, v in ts.items()}, d / "model.safetensors", metadata={"format": "pt"})
        import json

        (d / "config.json").write_text(json.dumps({**MID, **extra}))
        out[kind] = d
    return out


@pytest.mark.parametrize("ckpt,dtype,expert_dtype", [
    ("bf16", torch.bfloat16, "same"),  # straight copies
    ("bf16", torch.bfloat16, "fp8"),  # quantised at load, an expert at a time
    ("fp8", torch.bfloat16, "auto"),  # experts verbatim, attention dequantised in chunks
    ("fp8", torch.bfloat16, "same"),  # everything dequantised
    ("fp8", torch.float32, "same"),
])
def test_load_peak(mid_checkpoints, ckpt, dtype, expert_dtype):
    cfg = ModelConfig.from_json_file(mid_checkpoints[ckpt] / "config.json")
    extra, final = _extra(cfg, dtype, expert_dtype, lambda m: load_checkpoint(m, mid_checkpoints[ckpt]))
    assert extra <= _bound(cfg), (extra / MiB, _bound(cfg) / MiB, final / MiB)
    if (ckpt, expert_dtype) == ("bf16", "same"):
        assert extra == 0


def test_chunked_fp8_routines_have_a_bounded_working_set(monkeypatch):
    """However large the tensor, (de)quantising works CHUNK_ELEMS at a time."""
    monkeypatch.setattr(quant, "CHUNK_ELEMS", 128 * 256)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 256, 384, generator=g).bfloat16()  # 40 matrices of 3 x 2 blocks
    ref_q, ref_s = [], []
    for e in range(40):  # unchunked reference, one matrix at a time
        monkeypatch.setattr(quant, "CHUNK_ELEMS", 1 << 30)
        q, s = quant.quantize_fp8_blockwise(w[e])
        ref_q.append(q), ref_s.append(s)
    monkeypatch.setattr(quant, "CHUNK_ELEMS", 128 * 256)
    q, s = torch.empty(w.shape, dtype=FP8), torch.empty(40, 2, 3)
    with AllocTracker() as tr:
        quant.quantize_fp8_blockwise(w, out=(q, s))
    one_matrix_fp32 = 256 * 384 * 4
    assert 0 < tr.peak <= 2.5 * one_matrix_fp32 < w.numel() * 4 / 8  # a matrix, not the stack
    assert torch.equal(q.view(torch.uint8), torch.stack(ref_q).view(torch.uint8)) and torch.equal(s, torch.stack(ref_s))
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    with AllocTracker() as tr:
        quant.dequantize_fp8_into(out, q, s)
    assert 0 < tr.peak <= 3 * 128 * 384 * 4  # a 128-row block of fp32 and its scales
    monkeypatch.setattr(quant, "CHUNK_ELEMS", 1 << 30)
    assert torch.equal(out, quant.dequantize_fp8_blockwise(q, s, torch.bfloat16))


@pytest.mark.parametrize("expert_dtype", ["same", "fp8"])
def test_experts_built_into_callers_storage(mid_checkpoints, expert_dtype):
    """DWDP keeps a rank's experts in peer-visible rows ([w13 | w2 | scales] per expert):
    building straight into them allocates only the non-expert weights, and loading fills
    the rows exactly as it fills ordinary parameters."""
    from dwdp.parallel.dwdp import ExpertRows

    cfg = ModelConfig.from_json_file(mid_checkpoints["bf16"] / "config.json")
    dtype, shard = torch.bfloat16, (8, 16)
    plain = load_checkpoint(build_model(cfg, dtype, expert_shard=lambda _: shard, expert_dtype=expert_dtype),
                            mid_checkpoints["bf16"])
    edt = plain.model.layers[0].mlp.experts.w13.dtype
    rows = ExpertRows(cfg.hidden_size, cfg.moe_intermediate_size, edt)
    storage = torch.zeros(len(cfg.moe_layers), shard[1], rows.width, dtype=rows.storage_dtype)
    with AllocTracker() as tr:
        model = build_model(cfg, dtype, "cpu", lambda _: shard, expert_dtype=expert_dtype,
                            expert_storage=lambda idx: rows.views(storage[cfg.moe_layers.index(idx)]))
    assert tr.peak == tr.current() == build_bytes(cfg, dtype, expert_dtype).non_expert
    load_checkpoint(model, mid_checkpoints["bf16"])
    for m, (a, b) in enumerate(zip(plain.moe_blocks(), model.moe_blocks())):
        for name in ("w13", "w2", "w13_scale", "w2_scale") if expert_dtype == "fp8" else ("w13", "w2"):
            pa, pb = getattr(a.experts, name), getattr(b.experts, name)
            assert pb.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
            assert torch.equal(pa.view(torch.uint8) if pa.dtype == FP8 else pa,
                               pb.view(torch.uint8) if pb.dtype == FP8 else pb), (m, name)
    with pytest.raises(ValueError, match="w13 is torch.bfloat16.*need torch.float8_e4m3fn"):
        build_model(cfg, dtype, "cpu", lambda _: shard, expert_dtype="fp8",
                    expert_storage=lambda idx: ExpertRows(cfg.hidden_size, cfg.moe_intermediate_size, dtype)
                    .views(torch.zeros(shard[1], rows.width, dtype=dtype)))
