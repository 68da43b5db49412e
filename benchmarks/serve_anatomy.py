"""Where a served request's time goes: for each concurrency, a closed-loop loadtest against a
running `dwdp serve` (loopback) and the server's own step histograms read from /metrics
before and after it: mean prefill step, mean decode step, steps of each kind, the
server-side TTFT (arrival in the serving loop to first token) next to the client's.

    PYTHONPATH=src python benchmarks/serve_anatomy.py --url http://127.0.0.1:8011 --out anatomy.json
"""

from __future__ import annotations

import argparse
import json
import re
import urllib.request

from dwdp.ceilings import machine_info
from dwdp.serve.loadtest import run_loadtest
from dwdp.workload import WorkloadSpec

NAMES = ("dwdp_prefill_step_seconds", "dwdp_decode_step_seconds", "dwdp_time_to_first_token_seconds")


def scrape(url: str) -> dict:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for name in NAMES:
        for part in ("sum", "count"):
            m = re.search(rf"^{name}_{part} (\S+)$", text, re.M)
            out[f"{name}_{part}"] = float(m.group(1)) if m else 0.0
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--isl", type=int, default=4096)
    ap.add_argument("--osl", type=int, default=256)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", default="2,8,32,64")
    a = ap.parse_args()
    rows = []
    for c in map(int, a.concurrency.split(",")):
        before = scrape(a.url)
        wl = WorkloadSpec(num_requests=a.requests, isl=a.isl, dist="fixed", seed=c)
        summary = run_loadtest(a.url, wl, a.osl, max_concurrency=c)
        after = scrape(a.url)
        d = {k: after[k] - before[k] for k in after}
        row = {"max_concurrency": c, "loadtest": summary}
        for name, key in zip(NAMES, ("prefill_step", "decode_step", "server_ttft")):
            n = d[f"{name}_count"]
            row[f"{key}_count"] = n
            row[f"{key}_mean_s"] = d[f"{name}_sum"] / n if n else None
        rows.append(row)
        print(f"C={c}: prefill steps {row['prefill_step_count']:.0f} x {1e3 * (row['prefill_step_mean_s'] or 0):.1f} ms, "
              f"decode steps {row['decode_step_count']:.0f} x {1e3 * (row['decode_step_mean_s'] or 0):.2f} ms, "
              f"TTFT mean server {1e3 * (row['server_ttft_mean_s'] or 0):.0f} ms / client "
              f"{1e3 * summary['ttft_s']['mean']:.0f} ms", flush=True)
    with open(a.out, "w") as f:
        json.dump({"machine": machine_info(), "isl": a.isl, "osl": a.osl, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
