"""Hardware profiles: what the planner needs to know about a GPU and its NVLink domain.

Built-in profiles come from public datasheet figures (dense, no sparsity) and are labelled
as such, derated by achievable fractions measured on our H200 machines
(:data:`MEASURED_FRACTIONS`, assumed to carry over to other GPUs); ``dwdp calibrate`` on
a real machine measures every field it can instead.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class HardwareProfile:
    name: str
    source: str  # "datasheet (...)" or "measured on <host>, <date>"
    bf16_tflops: float  # dense peak or measured large-matmul rate
    fp8_tflops: float
    hbm_gbps: float
    link_gbps: float  # NVLink bandwidth per direction per GPU
    pull_single_gbps: float  # one rank pulling from one peer, copy engine
    pull_all_gbps: float  # ingress per rank when every rank pulls from every peer at once
    a2a_gbps: float  # per-rank all-to-all bandwidth (bytes sent to others / s)
    a2a_latency_us: float
    memory_gib: float
    domain: int  # GPUs in one NVLink domain
    # Achieved fractions of the peak for the engine's kernels (1.0 when the rate is measured).
    gemm_eff: float = 0.6
    attn_eff: float = 0.45
    # Decode attention (our Triton split-K kernel; absorbed MLA is compute-bound at batch);
    # None: attn_eff. Prefill attention moved to cuDNN, decode did not.
    decode_attn_eff: float | None = None
    hbm_eff: float = 1.0  # achievable fraction of hbm_gbps (1.0 when hbm_gbps is a measured copy rate)
    fp8_gemm_eff: float | None = None  # FP8 expert GEMMs' fraction of fp8_tflops (None: gemm_eff)
    fp8_dense_eff: float | None = None  # FP8 dense projections' fraction of fp8_tflops (None: fp8_gemm_eff)
    # Relative standard deviation of one layer's compute time across ranks doing identical
    # work (clock, launch and memory-system noise): what lockstep ranks wait for at every
    # layer even when their work is equal. See MEASURED_FRACTIONS["jitter"].
    layer_jitter: float = 0.028
    fp4_tflops: float = 0.0  # 0: no FP4 tensor cores (FP4 experts run at the FP8 rate)
    interference: float = 0.07  # compute slowdown while pulls run (measured 1.06-1.15x on H200)
    # Per kind of kernel (``dwdp calibrate`` measures them; None: ``interference``): pulls take
    # HBM bandwidth at both ends, so HBM-bound kernels suffer most.
    interference_gemm: float | None = None  # dense projections
    interference_experts: float | None = None  # grouped expert GEMMs (many weight bytes per FLOP)
    interference_hbm: float | None = None
    interference_attn: float | None = None
    # Per-rank ingress of all-peer pulls while every rank computes, by kind of kernel
    # ({"gemm", "experts", "hbm", "attention"} -> GB/s; ``dwdp calibrate``): a pull reads peer
    # HBM the peer's kernels are using. Empty: pulls move at the rates above whatever runs.
    pull_under_gbps: dict = field(default_factory=dict)
    layer_overhead_us: float = 300.0  # launches, host syncs, elementwise glue per layer
    bytes_per_token_layer: float = 0.0  # activation traffic per token per layer (fit), bytes
    # Per-model fits of step time from `dwdp calibrate --model`: {model: {"gemm_eff", "attn_eff", ...}}
    fits: dict = field(default_factory=dict)

    def to_json(self, path: str) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def from_json(cls, path: str) -> "HardwareProfile":
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}: not a hardware profile written by `dwdp calibrate` ({e})")

    # What carries over between models: achieved fractions of the peaks and the fixed cost per
    # layer (bytes per token scale with the hidden size: not averaged).
    _FIT_KEYS = ("gemm_eff", "attn_eff", "fp8_gemm_eff", "layer_overhead_us")

    def fit_for(self, model: str) -> tuple[dict, str]:
        """The per-model fit to apply and where it comes from. A model calibrated here uses
        its own; another model uses the mean of the fitted ones (measured on this machine,
        closer than peak-rate defaults: deepseek-v3 predicted 45% fast with the defaults of a
        profile fitted on qwen3-235b, 4x H200); a profile with no fits uses its own fields."""
        if model in self.fits:
            return self.fits[model], f"fit for {model}"
        if not self.fits:
            return {}, "profile defaults"
        mean = {}
        for k in self._FIT_KEYS:
            # An efficiency of 1.0 is the fit's placeholder for a term it dropped, not a measure.
            vals = [f[k] for f in self.fits.values()
                    if f.get(k) is not None and not (k.endswith("_eff") and f[k] >= 0.999)]
            if vals:
                mean[k] = sum(vals) / len(vals)
        return mean, (f"no fit for {model or 'this model'}: the mean of {', '.join(sorted(self.fits))}'s "
                      f"(run `dwdp calibrate --model {model or 'NAME'}` for its own)")

    def for_model(self, model: str) -> "HardwareProfile":
        """This profile with the model's fit applied (see :meth:`fit_for`)."""
        fit, _ = self.fit_for(model)
        if not fit:
            return self
        d = asdict(self)
        d.update({k: v for k, v in fit.items() if k in d})
        return HardwareProfile(**d)


# Achievable fractions of datasheet peaks, measured on our H200 machines (docs/RESULTS.md)
# and applied to every datasheet profile:
#   copy-engine pulls 0.87, all-peer pulls 0.82, NCCL all-to-all 0.66 of the link (394 / 370 /
#   295 GB/s of 450); a device copy 0.87 of HBM (4,196 of 4,800 GB/s, read + write);
#   grouped expert GEMMs 0.56 of the bf16 peak (552 TFLOP/s at 1,024 rows per expert; the
#   large matmul reaches 0.81) and 0.34 of the FP8 peak (our block-scaled Triton kernel,
#   680 TFLOP/s), causal attention 0.55 (cuDNN since commit c36bb69, as the engine calls it:
#   GQA and MLA 16K 556-570 TFLOP/s, chunked batches 457-549; the varlen FlashAttention-2
#   kernel before it, 0.35, is what Validations 0-5 ran against); ~0.3 ms of launches and
#   host work per layer; decode attention (our Triton split-K kernel) 0.35, which the 15 decode
#   steps of docs/PLANNER.md are checked against;
#   per-layer compute jitter across ranks 2.8%: identical 16K/32K dp steps on two ranks
#   differ by 1.1% on average (48 pairs, CV-0 runs of 2026-11-28_strong_dep_h200x2), a step
#   standard deviation of 0.98%, i.e. 2.8% per layer for 8 independent layers
#   (planner.plan.layer_jitter_from_runs re-derives it).
MEASURED_FRACTIONS = dict(pull_single=0.87, pull_all=0.82, a2a=0.66, hbm=0.87, gemm=0.56, fp8_gemm=0.34, attn=0.55,
                          decode_attn=0.35, jitter=0.028)


_OUR_DERATING = "derated by fractions measured on H200"


def _datasheet(name, bf16, fp8, hbm, link, mem, domain, note, fp4=0.0) -> HardwareProfile:
    f = MEASURED_FRACTIONS
    return HardwareProfile(name, f"datasheet ({note}); {_OUR_DERATING}", bf16, fp8, hbm, link,
                           f["pull_single"] * link, f["pull_all"] * link, f["a2a"] * link, 25.0, mem, domain,
                           gemm_eff=f["gemm"], attn_eff=f["attn"], hbm_eff=f["hbm"], fp4_tflops=fp4,
                           fp8_gemm_eff=f["fp8_gemm"], layer_jitter=f["jitter"], decode_attn_eff=f["decode_attn"])


PROFILES: dict[str, HardwareProfile] = {
    "h100-sxm": _datasheet("H100 SXM", 989, 1979, 3350, 450, 80, 8, "NVIDIA H100 SXM: 989 TF bf16, 3.35 TB/s, "
                           "NVLink4 900 GB/s bidirectional"),
    "h200": _datasheet("H200 SXM", 989, 1979, 4800, 450, 141, 8, "NVIDIA H200: 989 TF bf16, 4.8 TB/s, 141 GB, "
                       "NVLink4 900 GB/s bidirectional"),
    "b200": _datasheet("B200 (HGX)", 2250, 4500, 8000, 900, 180, 8, "NVIDIA HGX B200: 2.25 PF bf16 dense, "
                       "9 PF FP4 dense, 8 TB/s, NVLink5 1.8 TB/s bidirectional", fp4=9000),
    "gb200-nvl72": _datasheet("GB200 NVL72", 2500, 5000, 8000, 900, 186, 72, "NVIDIA GB200 NVL72 per GPU: "
                              "2.5 PF bf16 dense, 10 PF FP4 dense, 8 TB/s, 186 GB, NVLink5 1.8 TB/s bidirectional, "
                              "72-GPU domain", fp4=10000),
}

# The field's kernels on the same H200, against the same datasheet peaks
# (benchmarks/vendor_kernels.py, benchmarks/results/2026-11-29_vendor_kernels_h200/): what an
# engine built on vendor libraries reaches (TensorRT-LLM, SGLang, vLLM), where ours runs our
# Triton FP8 kernel and FlashAttention-2 varlen:
#   dense projections, cuBLAS bf16 at the real attention / shared-expert shapes, 16K tokens:
#   652-696 TFLOP/s (0.66-0.70); the same in FP8 (`torch._scaled_mm`, row-wise scales):
#   1,172-1,256 (0.59-0.63 of 1,979); grouped expert GEMMs at 512-1,024 rows per expert,
#   `torch._grouped_mm` bf16 661-684 (0.67-0.69), `torch._scaled_grouped_mm` FP8 1,000-1,004
#   on the deepseek-v3 shape (0.51; 580-625 on qwen3-235b's narrower one); causal attention,
#   cuDNN through SDPA, GQA d 128 and MLA 192/128, 4K-16K: 550-595 (0.56-0.60; our varlen
#   FlashAttention-2 path 221-344, 0.22-0.35).
VENDOR_FRACTIONS = dict(gemm=0.68, fp8_gemm=0.51, fp8_dense=0.61, attn=0.58)
KERNEL_SETS = {"ours": "this engine's kernels (fractions measured in its steps on H200)",
               "vendor": "vendor-library kernels (cuBLAS, CUTLASS grouped GEMMs, cuDNN attention), measured on H200"}


def with_kernels(hw: HardwareProfile, kernels: str) -> HardwareProfile:
    """A datasheet profile derated for ``kernels``: "ours" (this engine, as built in) or "vendor"
    (what an engine on vendor libraries reaches, :data:`VENDOR_FRACTIONS`). A calibrated
    profile measured its own engine's kernels and is returned as it is for "ours"."""
    if kernels not in KERNEL_SETS:
        raise ValueError(f"--kernels {kernels!r}: choose from {', '.join(KERNEL_SETS)}")
    if kernels == "ours":
        return hw
    if not hw.source.startswith("datasheet"):
        raise ValueError(f"--kernels {kernels} derates datasheet peaks; {hw.name} is measured ({hw.source}), "
                         "so its fractions are already those of the engine it measured: leave --kernels at ours")
    f = VENDOR_FRACTIONS
    return dataclasses.replace(hw, gemm_eff=f["gemm"], fp8_gemm_eff=f["fp8_gemm"], fp8_dense_eff=f["fp8_dense"],
                               attn_eff=f["attn"], source=hw.source.replace(_OUR_DERATING,
                                                                            "derated by " + KERNEL_SETS["vendor"]))


def resolve_profile(spec: str) -> HardwareProfile:
    if spec in PROFILES:
        return PROFILES[spec]
    if Path(spec).is_file():
        return HardwareProfile.from_json(spec)
    raise ValueError(f"--hardware {spec!r} is neither a built-in profile ({', '.join(PROFILES)}) "
                     "nor a profile JSON written by `dwdp calibrate`")
