"""Profile one prefill step on one GPU: the kernels that take the time."""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dwdp.batch import PackedBatch
from dwdp.models import build_model, init_random
from dwdp.presets import resolve_model

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="qwen3-30b-a3b")
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--lengths", default="4096,4096,4096,4096")
ap.add_argument("--out", required=True)
a = ap.parse_args()
cfg, _ = resolve_model(a.model, a.layers)
model = init_random(build_model(cfg, torch.bfloat16, "cuda"), 0)
lengths = [int(x) for x in a.lengths.split(",")]
batch = PackedBatch.from_sequences([torch.randint(0, cfg.vocab_size, (n,)) for n in lengths], "cuda")
for _ in range(2):
    model(batch)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    model(batch)
    torch.cuda.synchronize()
table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
print(table)
open(a.out, "w").write(table)
