"""Short DWDP steps: pull every remote expert, or ship the tokens to the owners (issue 16).

Each rank of an N-GPU group builds one DWDP rank with token shipping available and times
the same step both ways (``rt.short_steps`` toggled between steps):

* ``both``: every rank steps together with T tokens (all pull at once, or all ship and
  all serve at once);
* ``beside_long``: rank 0 runs short T-token steps while the other ranks each run one long
  step (``--long`` tokens, which always pulls): rank 0's step time, and how much serving
  its shipped tokens slows the owners' long step against rank 0 pulling instead.

Plus the shipped step's logits against the pulled step's (bf16/FP8 rounding only).
Writes JSON.

    python benchmarks/shipping_gpu.py -N 2 --model qwen3-235b-a22b --layers 8 --out ship.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from dwdp.batch import PackedBatch
from dwdp.ceilings import machine_info
from dwdp.parallel.group import init_dwdp_groups
from dwdp.parallel.launch import spawn_local
from dwdp.parallel.rank import RankSpec, build_rank


def _batch(T: int, vocab: int, g: torch.Generator, device) -> PackedBatch:
    return PackedBatch.from_sequences([torch.randint(0, vocab, (T,), generator=g).tolist()], device)


def _step(model, batch) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(batch)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def rank_main(N: int, args: dict) -> dict:
    os.environ["DWDP_EXPERIMENTAL_SHIPPING"] = "1"  # see apply_dwdp
    ctx = init_dwdp_groups(N, "cuda", timeout_s=900)
    grp, me = ctx.group.process_group, ctx.group_rank
    out = {}
    for edt in args["expert_dtypes"]:
        spec = RankSpec(model=args["model"], strategy="dwdp", num_layers=args["layers"], device="cuda",
                        group_size=N, expert_dtype=edt, short_steps="ship", ship_max_tokens=max(args["lengths"]),
                        max_num_tokens=args["long"], peer_timeout_s=120.0)
        rank = build_rank(spec, ctx)
        model, rt, vocab = rank.model, rank.runtime, rank.cfg.vocab_size
        g = torch.Generator().manual_seed(100 + me)
        res: dict = {"break_even_tokens": None}
        # Same step both ways: the shipped step sums the MoE shares in another order.
        b = _batch(300, vocab, g, ctx.device)
        with torch.no_grad():
            rt.short_steps = "pull"
            want = model(b).logits.float()
            rt.short_steps = "ship"
            got = model(b).logits.float()
        res["ship_vs_pull_rel_err"] = float((got - want).norm() / want.norm())
        batches = {T: _batch(T, vocab, g, ctx.device) for T in args["lengths"]}
        long_batch = _batch(args["long"], vocab, g, ctx.device)
        with torch.no_grad():
            for T, bt in batches.items():  # warm every shape both ways (Triton compiles, autotune)
                for mode in ("pull", "ship"):
                    rt.short_steps = mode
                    model(bt)
            rt.short_steps = "pull"
            model(long_batch)
            torch.cuda.synchronize()
            res["break_even_tokens"] = rt.break_even_tokens()
            for T, bt in batches.items():
                for mode in ("pull", "ship"):
                    rt.short_steps = mode
                    ts = []
                    for _ in range(args["iters"]):
                        dist.barrier(group=grp)
                        ts.append(_step(model, bt))
                    res[f"both_{mode}_{T}"] = ts
            for T in args["beside"]:
                bt = batches[T]
                for mode in ("pull", "ship"):
                    dist.barrier(group=grp)
                    if me == 0:
                        rt.short_steps = mode
                        res[f"beside_{mode}_{T}_short"] = [_step(model, bt) for _ in range(args["short_reps"])]
                    else:
                        rt.short_steps = "pull"
                        res[f"beside_{mode}_{T}_long"] = [_step(model, long_batch)]
                    dist.barrier(group=grp)
        rt.short_steps = "pull"
        res["memory"] = rt.memory_bytes()
        out[edt] = res
        rank.close()
        del model, rt, rank
        torch.cuda.empty_cache()
    dist.barrier()
    dist.destroy_process_group()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-N", type=int, default=2)
    ap.add_argument("--model", default="qwen3-235b-a22b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lengths", default="64,256,1024,2048,4096")
    ap.add_argument("--beside", default="256,1024", help="short step sizes run beside a long step")
    ap.add_argument("--long", type=int, default=16384)
    ap.add_argument("--short-reps", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--expert-dtypes", default="same,fp8")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    args = {"model": a.model, "layers": a.layers, "lengths": [int(x) for x in a.lengths.split(",")],
            "beside": [int(x) for x in a.beside.split(",") if x], "long": a.long, "short_reps": a.short_reps,
            "iters": a.iters, "expert_dtypes": a.expert_dtypes.split(",")}
    ranks = spawn_local(rank_main, a.N, (a.N, args), timeout_s=3000)
    doc = {"machine": machine_info(), "args": args, "ranks": ranks}
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    med = statistics.median
    for edt in args["expert_dtypes"]:
        r0 = ranks[0][edt]
        print(f"\n{a.model} x{a.N}, {a.layers} layers, experts {edt}: ship vs pull logits rel err "
              f"{r0['ship_vs_pull_rel_err']:.2e}, break-even {r0['break_even_tokens']} tokens")
        print(f"{'T':>6} {'pull ms':>9} {'ship ms':>9} {'ship/pull':>9}   (all ranks step together; rank 0, median)")
        for T in args["lengths"]:
            p, s = med(r0[f"both_pull_{T}"]) * 1e3, med(r0[f"both_ship_{T}"]) * 1e3
            print(f"{T:>6} {p:9.2f} {s:9.2f} {s / p:9.3f}")
        for T in args["beside"]:
            p, s = med(r0[f"beside_pull_{T}_short"]) * 1e3, med(r0[f"beside_ship_{T}_short"]) * 1e3
            lp = [ranks[r][edt][f"beside_pull_{T}_long"][0] * 1e3 for r in range(1, a.N)]
            ls = [ranks[r][edt][f"beside_ship_{T}_long"][0] * 1e3 for r in range(1, a.N)]
            print(f"beside a {a.long}-token step: rank 0 T={T} pull {p:.2f} ms, ship {s:.2f} ms; the long step "
                  f"{max(lp):.1f} ms with rank 0 pulling, {max(ls):.1f} ms serving rank 0's tokens")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
