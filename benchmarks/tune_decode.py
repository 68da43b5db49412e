"""Tile shapes for the decode kernels at batch 64, 8K context (one GPU): the split-K decode
attention (GQA 64/4 x 128, absorbed MLA 128 x 576) and the routed experts (bf16 and FP8,
qwen3-235b shapes, a few rows per expert). Each candidate's time against the bytes it
must read at the device-copy bandwidth of the same run. Writes JSON to --out."""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from dwdp.ceilings import copy_gbps, machine_info
from dwdp.timing import time_cuda
from dwdp.kernels import decode_attention as da
from dwdp.kernels import fp8_grouped as fg
from dwdp.models.moe import ExpertSegment, _grouped_swiglu


def _try(fn):
    try:
        return time_cuda(fn, warmup=3, iters=10)
    except Exception as e:  # noqa: BLE001  (a config the compiler refuses: skip it)
        return f"{type(e).__name__}: {str(e)[:80]}"


def attention(bw: float, B=64, ctx=8192) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    slots = torch.arange(B, device="cuda")
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    for kind in ("gqa", "mla"):
        if kind == "gqa":
            kc = torch.randn(B + 1, ctx + 64, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            vc = torch.randn_like(kc)
            q = torch.randn(B, 64, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            nbytes, v_is_k = 2 * B * ctx * 4 * 128 * 2, False
            space = itertools.product([64], [32, 64, 128], [4, 8], [2, 3], [None, 4, 8])
        else:
            kc = torch.randn(B + 1, ctx + 64, 1, 576, device="cuda", dtype=torch.bfloat16, generator=g)
            vc = kc[..., :512]
            q = torch.randn(B, 128, 576, device="cuda", dtype=torch.bfloat16, generator=g)
            nbytes, v_is_k = B * ctx * 576 * 2, True
            space = itertools.product([16, 32, 64], [16, 32, 64], [4, 8], [1, 2], [None])
        ref = da.decode_attention(q, kc, vc, slots, lens, 0.1, ctx + 64, v_is_k)
        for bh, bn, w, st, sp in space:
            cfg = {"block_h": bh, "block_n": bn, "warps": w, "stages": st, "splits": sp}
            t = _try(lambda: da.decode_attention(q, kc, vc, slots, lens, 0.1, ctx + 64, v_is_k, cfg))
            row = {"kernel": f"attention_{kind}", "config": cfg, "bytes": nbytes}
            if isinstance(t, float):
                got = da.decode_attention(q, kc, vc, slots, lens, 0.1, ctx + 64, v_is_k, cfg)
                row.update(seconds=t, over_limit=t / (nbytes / bw / 1e9), max_err=float((got - ref).abs().max()))
            else:
                row["error"] = t
            rows.append(row)
            print(row, flush=True)
    return rows


def experts(bw: float, tokens=64, E=128, k=8, H=4096, I=1536) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(tokens)]).reshape(-1)
    counts = torch.bincount(ids, minlength=E)
    M = ids.numel()
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    touched = int((counts > 0).sum())
    nbytes = touched * 3 * H * I * 2
    seg = ExpertSegment(0, w13, w2)
    ref = _grouped_swiglu(x, seg, counts, None, 0)
    t = time_cuda(lambda: _grouped_swiglu(x, seg, counts, None, 0))
    rows.append({"kernel": "experts_bf16_torch_grouped_mm", "seconds": t, "bytes": nbytes,
                 "over_limit": t / (nbytes / bw / 1e9)})
    print(rows[-1], flush=True)
    for bm, bn, bk, w, st in itertools.product([16, 32, 64], [64, 128], [64, 128], [4], [3, 4, 5]):
        cfg = {"bm": bm, "bn": bn, "bk": bk, "warps": w, "stages": st, "group_m": 1}
        t = _try(lambda: fg.grouped_swiglu_bf16(x, w13, w2, counts, cfg))
        row = {"kernel": "experts_bf16_triton", "config": cfg, "bytes": nbytes}
        if isinstance(t, float):
            got = fg.grouped_swiglu_bf16(x, w13, w2, counts, cfg)
            row.update(seconds=t, over_limit=t / (nbytes / bw / 1e9),
                       rel_err=float((got.float() - ref.float()).norm() / ref.float().norm()))
        else:
            row["error"] = t
        rows.append(row)
        print(row, flush=True)
    # FP8 experts: the same routing through the FP8 kernel at a few tile shapes.
    from dwdp.quant import quantize_fp8_blockwise

    q13, s13 = quantize_fp8_blockwise(w13)
    q2, s2 = quantize_fp8_blockwise(w2)
    xq, xs = fg.quantize_rows(x)
    nbytes8 = touched * 3 * H * I * (1 + 1 / 4096)
    saved = dict(fg.CONFIGS)
    for cfg in [(128, 128, 8, 4, 8), (64, 128, 4, 4, 1), (64, 128, 4, 5, 1), (16, 128, 4, 4, 1), (32, 128, 4, 4, 1),
                (64, 256, 8, 3, 1)]:
        fg.CONFIGS["decode"] = cfg
        t = _try(lambda: fg.grouped_swiglu_fp8(xq, xs, q13, s13, q2, s2, counts))
        row = {"kernel": "experts_fp8_triton", "config": cfg, "bytes": nbytes8}
        if isinstance(t, float):
            row.update(seconds=t, over_limit=t / (nbytes8 / bw / 1e9))
        else:
            row["error"] = t
        rows.append(row)
        print(row, flush=True)
    fg.CONFIGS.update(saved)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    bw = copy_gbps()
    res = {"machine": machine_info(), "copy_gbps": bw}
    res["experts"] = experts(bw)
    res["attention"] = attention(bw)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    for key in ("experts", "attention"):
        best = {}
        for r in res[key]:
            if "seconds" in r and (r["kernel"] not in best or r["seconds"] < best[r["kernel"]]["seconds"]):
                best[r["kernel"]] = r
        for r in best.values():
            print("BEST", r, flush=True)


if __name__ == "__main__":
    main()
