"""64 concurrent streaming clients against one `dwdp serve` (tiny model, CPU, loopback),
several timed runs on the same server: connection errors, TTFT percentiles, throughput.

    python benchmarks/serve_concurrency.py --clients 64 --seconds 60 --runs 3 --out result.json

Each client loops: a streaming completion (random 32-64 token prompt, --max-tokens
output), recording TTFT and tokens; any transport error (reset, refused, timeout) counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(url, stop_at, max_tokens, seed, out, lock):
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as c:
        while time.monotonic() < stop_at:
            prompt = [rng.randrange(512) for _ in range(rng.randint(32, 64))]
            t0 = time.monotonic()
            ttft, n, err = None, 0, None
            try:
                with c.stream("POST", url + "/v1/completions", json={
                        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
                    if r.status_code != 200:
                        err = f"HTTP {r.status_code}"
                    else:
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                err = chunk["error"]["message"]
                                break
                            k = len(chunk["choices"][0]["token_ids"]) if chunk["choices"] else 0
                            if k and ttft is None:
                                ttft = time.monotonic() - t0
                            n += k
            except (httpx.TransportError, OSError) as e:
                err = f"{type(e).__name__}: {e}"
            with lock:
                out.append({"t_end": time.monotonic(), "ttft": ttft, "tokens": n, "error": err})


def one_run(url, clients, seconds, max_tokens, run):
    out, lock = [], threading.Lock()
    t0 = time.monotonic()
    stop_at = t0 + seconds
    ths = [threading.Thread(target=client, args=(url, stop_at, max_tokens, run * 1000 + i, out, lock))
           for i in range(clients)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(seconds + 300)
    wall = time.monotonic() - t0
    ok = [r for r in out if not r["error"] and r["ttft"] is not None]
    ttft = [r["ttft"] for r in ok]
    toks_in_window = sum(r["tokens"] for r in out)
    return {"run": run, "clients": clients, "wall_s": round(wall, 1), "requests": len(out), "succeeded": len(ok),
            "errors": len(out) - len(ok), "error_kinds": sorted({r["error"] for r in out if r["error"]})[:5],
            "output_tokens": toks_in_window, "tok_per_s": round(toks_in_window / wall, 1),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3) if ttft else None,
            "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3) if ttft else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    srv = subprocess.Popen([sys.executable, "-m", "dwdp.cli", "serve", "--port", str(port), "--max-queue", "256"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or srv.poll() is not None:
                raise SystemExit("server did not start")
            time.sleep(0.5)
        results = []
        for run in range(args.runs):
            r = one_run(url, args.clients, args.seconds, args.max_tokens, run)
            print(json.dumps(r), flush=True)
            results.append(r)
        metrics = httpx.get(url + "/metrics").text
        itl = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines()
               if ln.startswith("dwdp_inter_token_latency_seconds_")and "bucket" not in ln}
        summary = {"runs": results, "server_itl_mean_s": itl.get("dwdp_inter_token_latency_seconds_sum", 0)
                   / max(1, itl.get("dwdp_inter_token_latency_seconds_count", 1)),
                   "cpu_count": os.cpu_count(), "max_tokens": args.max_tokens}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1)
    finally:
        srv.terminate()
        srv.wait(60)


if __name__ == "__main__":
    main()
