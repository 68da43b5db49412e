"""The GPU measurements, as named suites run inside a time budget.

    python benchmarks/suite.py --list
    python benchmarks/suite.py kernels,decode --budget 540 --out benchmarks/results/2026-12-01_kernels_h100
    python benchmarks/suite.py strategies --reps 3 --budget 540 --out OUT   # 3 separate invocations per setting
    python benchmarks/suite.py full-depth --dry-run                         # what would run, nothing started

Each step is one subprocess in its own process group, its stdout and stderr in
``OUT/<step>.txt`` and its JSON (if it writes one) in ``OUT/<step>.json``. Steps run in the
suite's priority order; a step whose usual duration no longer fits what is left of
``--budget`` is skipped and logged, and a running step is stopped (its whole process group,
SIGTERM then SIGKILL: the ranks it spawned too) when the budget or its own limit runs out,
or on Ctrl-C. ``OUT/suite.json`` records what ran, how long, and how it ended; ``OUT/reps.md``
is ``dwdp report --reps`` over the bench files. Run it from the repository root on the GPU
machine; the commit is recorded in every JSON (``DWDP_COMMIT``, else ``git rev-parse``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# NVLink multicast off everywhere: the lent machines' drivers do not support it.
ENV = {"PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0",
       "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Step:
    """One measurement. ``argv`` may hold ``{out}`` (this step's JSON path), ``{dir}`` (the
    output folder), ``{gpus}`` and ``{url}`` (the step's server); ``expect_s`` is its usual
    duration (it is skipped when less is left), ``limit_s`` the most it may take;
    ``repeat``: a bench step run ``--reps`` times as separate invocations (``_rep<i>``)."""

    name: str
    argv: list[str]
    expect_s: float
    limit_s: float
    min_gpus: int = 1
    repeat: bool = False
    server: list[str] | None = None  # a `dwdp serve` started first, stopped after the step
    env: dict[str, str] = field(default_factory=dict)


def dwdp(*args: str) -> list[str]:
    return [PY, "-m", "dwdp.cli", *args]


def script(name: str, *args: str) -> list[str]:
    return [PY, str(ROOT / "benchmarks" / name), *args]


def bench(name: str, *args: str, expect_s: float = 150, limit_s: float = 260, min_gpus: int = 2) -> Step:
    """dp / dep / dwdp on every GPU, equal last steps, NCCL's all-to-all ceiling beside DEP."""
    argv = dwdp("bench", "--device", "cuda", "-W", "{gpus}", "--dist", "normal", "--balance-tail", "--ceilings",
                "--timeout", str(int(limit_s)), "--out", "{out}", *args)
    return Step(name, argv, expect_s, limit_s, min_gpus, repeat=True)


QWEN = ("--model", "qwen3-235b-a22b", "--num-layers", "8", "--isl", "8192")
DSV3 = ("--model", "deepseek-v3", "--num-layers", "5", "--isl", "8192")
ALL3 = ("--strategies", "dp,dep,dwdp")
SERVE_QWEN = ["--model", "qwen3-235b-a22b", "--num-layers", "8", "--expert-dtype", "fp8", "--max-num-tokens", "16384"]


def _loadtest_sweep(label: str, isl: int, osl: int, gpus: str) -> list[str]:
    return dwdp("loadtest", "--url", "{url}", "--isl", str(isl), "--dist", "fixed", "--max-tokens", str(osl),
                "--num-requests", "64", "--sweep-concurrency", "2,8,32,64", "--gpus", gpus, "--label", label,
                "--out", "{out}")


# Every GPU test file (each skips itself without CUDA, or with fewer GPUs than it needs).
GPU_TESTS = sorted({str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_gpu_*.py")}
                   | {str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_*_gpu.py")})

SUITES: dict[str, tuple[str, list[Step]]] = {
    "tests": ("every GPU test (one or more GPUs; the multi-GPU ones skip below 2)", [
        Step("gpu_tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS], 150, 300),
    ]),
    "kernels": ("one GPU: our kernels and the vendors' at the models' shapes, FP8 tiles, attention in a step", [
        Step("vendor_kernels", script("vendor_kernels.py", "--out", "{out}"), 90, 200),
        Step("kernels", script("kernels.py", "--out", "{out}"), 120, 240),
        Step("tune_fp8_equal", script("tune_fp8.py", "--rows", "64,128,256,512", "--out", "{out}"), 90, 150),
        Step("tune_fp8_multinomial", script("tune_fp8.py", "--rows", "64,128,256,512", "--multinomial",
                                            "--out", "{out}"), 90, 150),
        Step("attention_backends", script("attention_backends.py", "--out", "{out}"), 90, 180),
    ]),
    "fp8": ("one GPU: FP8 dense GEMM rates, dp prefill at ISL 8K with FP8 experts and projections vs bf16, "
            "the step anatomy of both", [
        Step("fp8_dense", script("fp8_dense.py", "--tokens", "16384", "--iters", "5", "--out", "{out}"), 30, 90),
        *[Step(f"{m}_L{layers}_{fmt}_new", dwdp("bench", "--device", "cuda", "-W", "1", "--strategies", "dp", "--model", m,
                                      "--num-layers", layers, "--isl", "8192", "--dist", "normal", "--cv", "0.2",
                                      "--max-num-tokens", "16384", "--num-requests", "8", "--expert-dtype", dt,
                                      "--dense-dtype", dt, "--out", "{out}"), 60, 150, repeat=True)
          for m, layers in (("qwen3-235b-a22b", "8"), ("deepseek-v3", "5")) for fmt, dt in (("fp8", "fp8"),
                                                                                           ("bf16", "same"))],
        *[Step(f"anatomy_{m}", script("step_anatomy.py", "--one-gpu", "--model", m, "--layers", layers,
                                       "--lengths", "8192,6000,2192", "--formats", "fp8/fp8,same/same",
                                       "--iters", "2", "--out", "{out}"), 50, 120)
          for m, layers in (("qwen3-235b-a22b", "8"), ("deepseek-v3", "5"))],
    ]),
    "one-gpu-checks": ("one GPU: the GPU tests, then dp prefill at ISL 8K (bf16 and FP8 experts)", [
        Step("gpu_tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS], 150, 300),
        *[Step(f"dp1_{m}_{dt}", dwdp("bench", "--device", "cuda", "-W", "1", "--strategies", "dp", "--model", m,
                                     "--num-layers", layers, "--isl", "8192", "--dist", "normal", "--cv", "0.2",
                                     "--max-num-tokens", "16384", "--num-requests", "8", "--expert-dtype", dt,
                                     "--out", "{out}"), 60, 150, repeat=True)
          for m, layers in (("qwen3-235b-a22b", "8"), ("deepseek-v3", "5")) for dt in ("same", "fp8")],
    ]),
    "anatomy": ("one or more GPUs: where a DWDP and a dp step's device time goes, then `dwdp calibrate`", [
        Step("anatomy_bf16", script("step_anatomy.py", "-N", "{gpus}", "--lengths", "8192,4181",
                                    "--expert-dtype", "same", "--out", "{out}"), 80, 150),
        Step("anatomy_fp8", script("step_anatomy.py", "-N", "{gpus}", "--lengths", "8192,4181",
                                   "--expert-dtype", "fp8", "--out", "{out}"), 80, 150),
        Step("calibrate", dwdp("calibrate", "--model", "qwen3-235b-a22b", "--num-layers", "8", "--out", "{out}"),
             100, 200),
    ]),
    "strategies": ("2+ GPUs: the all-to-all curve, the DEP layer, then dp / dep / dwdp on qwen3 and deepseek-v3", [
        Step("a2a_sizes", script("a2a_sizes.py", "-N", "{gpus}", "--out", "{out}"), 40, 90, min_gpus=2),
        Step("dep_layer", script("dep_gpu.py", "-N", "{gpus}", "--transports", "nccl", "--overlap", "0",
                                 "--iters", "5", "--out", "{out}"), 60, 180, min_gpus=2),
        *[bench(f"qwen_fp8_skew{k}", *QWEN, *ALL3, "--expert-dtype", "fp8", "--cv", "0.2", "--max-num-tokens",
                "32768", "--skew", k, "--num-requests", "64") for k in ("0", "1")],
        *[bench(f"qwen_bf16_skew{k}", *QWEN, *ALL3, "--cv", "0.2", "--max-num-tokens", "32768", "--skew", k,
                "--num-requests", "64") for k in ("0", "1")],
        *[bench(f"dsv3_fp8_skew{k}", *DSV3, *ALL3, "--expert-dtype", "fp8", "--cv", "0.2",
                "--max-num-tokens", "16384,32768", "--skew", k, "--num-requests", "64", expect_s=200, limit_s=300)
          for k in ("0", "1")],
        bench("qwen_matrix", *QWEN, *ALL3, "--cv", "0,0.3", "--max-num-tokens", "16384", "--num-requests", "64"),
    ]),
    "short-steps": ("2+ GPUs: ISL 2K (uniform 1-2K) at MNT 8K, bf16 and FP8 experts", [
        bench(f"isl2k_mnt8k_{dt}", "--model", "qwen3-235b-a22b", "--num-layers", "8", "--dist", "uniform",
              "--ratio", "0.5", "--isl", "2048", "--max-num-tokens", "8192", "--num-requests", "256", "--cv", "0",
              "--expert-dtype", dt, *ALL3)
        for dt in ("same", "fp8")
    ]),
    "isl-sweep": ("2+ GPUs: ISL 1K to 32K at MNT 16K and 32K (the same total tokens at every ISL)", [
        bench(f"isl_sweep_mnt{mnt}", "--model", "qwen3-235b-a22b", "--num-layers", "8", "--cv", "0.2",
              "--isl", "1024,2048,4096,8192,16384,32768", "--max-num-tokens", str(mnt), "--num-requests", "16",
              *ALL3, expect_s=240, limit_s=300)
        for mnt in (16384, 32768)
    ]),
    "full-depth": ("2+ GPUs: qwen3-235b-a22b, all 94 layers, FP8 experts, dwdp vs dep (dp does not fit)", [
        bench(f"full_depth_mnt{mnt // 1024}k_skew{k}", "--model", "qwen3-235b-a22b", "--expert-dtype", "fp8",
              "--isl", "8192", "--cv", "0.2", "--max-num-tokens", str(mnt), "--skew", k, "--num-requests", "24",
              "--strategies", "dwdp,dep", expect_s=240, limit_s=300)
        for mnt in (16384, 32768) for k in ("0", "1")
    ]),
    "decode": ("one GPU: decode steps against the memory-bound limit, overlapped with the host and not", [
        Step("decode", script("decode_gpu.py", "--case", "qwen3-235b-a22b:8:fp8", "--case", "deepseek-v3:5:fp8",
                              "--batches", "64,32,8,1", "--steps", "40", "--overlap", "both", "--context", "8192",
                              "--out", "{out}"), 200, 380),
        Step("kv_handoff", script("kv_handoff_gpu.py", "--out", "{out}"), 60, 150, min_gpus=2),
    ]),
    "serve": ("one GPU: `dwdp serve` (local prefill + decode) under a loadtest sweep, and where its time goes", [
        Step("frontier", _loadtest_sweep("dp, 1 GPU, local prefill", 4096, 256, "1"), 200, 420,
             server=dwdp("serve", *SERVE_QWEN, "--device", "cuda", "--max-batch", "64", "--max-context", "4416")),
        Step("serve_anatomy", script("serve_anatomy.py", "--url", "{url}", "--isl", "4096", "--osl", "256",
                                     "--out", "{out}"), 200, 300,
             server=dwdp("serve", *SERVE_QWEN, "--device", "cuda", "--max-batch", "64", "--max-context", "4416")),
    ]),
    "serve-disagg": ("4 GPUs: a prefill group of 3 (dwdp, then dep) with decode on the 4th, concurrency sweeps", [
        Step(f"frontier_{p}3", _loadtest_sweep(f"{p} prefill x3 + decode x1", 8192, 256, "4"), 240, 420,
             min_gpus=4, server=dwdp("serve", *SERVE_QWEN, "--device", "cuda:3", "--prefill", p,
                                     "--prefill-ranks", "3", "--max-batch", "64", "--max-context", "8512"))
        for p in ("dwdp", "dep")
    ]),
}


def fill(arg: str, values: dict) -> str:
    """``{out}``-style placeholders replaced; other braces (code in an argument) left alone."""
    for k, v in values.items():
        arg = arg.replace("{" + k + "}", str(v))
    return arg


def plan(names: list[str], reps: int, gpus: int) -> list[tuple[Step, str]]:
    """The steps of the named suites in order, each with its output name (``_rep<i>`` for
    repeated bench steps); steps needing more GPUs than there are are left out."""
    out = []
    for n in names:
        for st in SUITES[n][1]:
            if gpus < st.min_gpus:
                continue
            for i in range(reps if st.repeat else 1):
                out.append((st, st.name + (f"_rep{i + 1}" if st.repeat and reps > 1 else "")))
    return out


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the whole process group (the ranks a step spawned too), SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _start(argv: list[str], log, env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)


def _wait_healthy(url: str, proc: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r).get("status") == "ok":
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(1)
    return False


class Runner:
    """Runs planned steps inside a budget, logging each to ``out/log.txt``."""

    def __init__(self, out: Path, budget_s: float, gpus: int, env: dict | None = None, port: int = 8013):
        self.out, self.budget_s, self.gpus, self.port = out, budget_s, gpus, port
        self.env = {**os.environ, **ENV, **(env or {})}
        self.t0 = time.monotonic()
        self.records: list[dict] = []
        self.current: list[subprocess.Popen] = []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def log(self, line: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {line}"
        print(line, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(line + "\n")

    def run(self, step: Step, name: str) -> dict:
        rec = {"step": name, "argv": None, "rc": None, "seconds": 0.0}
        left = self.left()
        if left < step.expect_s:
            rec["status"] = f"skipped: usually takes {step.expect_s:.0f} s, {max(left, 0):.0f} s of the budget left"
            self.log(f"{name} {rec['status']}")
            return rec
        limit = min(step.limit_s, left)
        url = f"http://127.0.0.1:{self.port}"
        values = {"out": str(self.out / f"{name}.json"), "dir": str(self.out), "gpus": str(self.gpus), "url": url}
        argv = [fill(a, values) for a in step.argv]
        rec["argv"] = argv
        env = {**self.env, **step.env}
        t0 = time.monotonic()
        server = None
        with open(self.out / f"{name}.txt", "w") as log:
            try:
                if step.server is not None:
                    srv_argv = [*(fill(a, values) for a in step.server), "--port", str(self.port)]
                    server = _start(srv_argv, open(self.out / f"{name}.server.txt", "w"), env)
                    self.current.append(server)
                    if not _wait_healthy(url, server, t0 + limit):
                        rec["status"] = "server not ready (see .server.txt)"
                        return rec
                proc = _start(argv, log, env)
                self.current.append(proc)
                try:
                    rec["rc"] = proc.wait(max(1.0, limit - (time.monotonic() - t0)))
                    rec["status"] = "ok" if rec["rc"] == 0 else f"failed (rc {rec['rc']})"
                except subprocess.TimeoutExpired:
                    _stop(proc)
                    rec["status"] = f"stopped at its {limit:.0f} s limit"
            finally:
                for p in reversed(self.current):
                    _stop(p)
                self.current.clear()
                rec["seconds"] = round(time.monotonic() - t0, 1)
                self.log(f"{name} {rec.get('status', 'interrupted')} in {rec['seconds']:.0f} s")
        return rec

    def run_all(self, planned: list[tuple[Step, str]]) -> list[dict]:
        for step, name in planned:
            self.records.append(self.run(step, name))
        return self.records


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
        return len([x for x in out.splitlines() if x.strip()])
    except (OSError, subprocess.TimeoutExpired):
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("suites", nargs="?", default="", help="comma-separated suite names (--list shows them)")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole run (default 540)")
    ap.add_argument("--out", help="output folder (created)")
    ap.add_argument("--reps", type=int, default=1, help="separate invocations of each bench setting")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    ap.add_argument("--list", action="store_true", help="the suites and their steps")
    ap.add_argument("--dry-run", action="store_true", help="print the planned steps, run nothing")
    a = ap.parse_args(argv)
    if a.list or not a.suites:
        for n, (what, steps) in SUITES.items():
            print(f"{n:15s} {what}\n{'':15s} steps: {', '.join(s.name for s in steps)}")
        return 0
    names = [n.strip() for n in a.suites.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        ap.error(f"unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if a.reps < 1 or a.budget <= 0:
        ap.error("--reps must be >= 1 and --budget > 0")
    gpus = a.gpus if a.gpus is not None else _gpu_count()
    planned = plan(names, a.reps, max(gpus, 1))
    left_out = [s.name for n in names for s in SUITES[n][1] if max(gpus, 1) < s.min_gpus]
    if a.dry_run:
        for st, name in planned:
            values = {"out": f"OUT/{name}.json", "dir": "OUT", "gpus": max(gpus, 1), "url": "URL"}
            argv = " ".join(fill(x, values) for x in st.argv)
            print(f"{name:28s} ~{st.expect_s:4.0f} s (limit {st.limit_s:.0f})  {argv.replace(str(ROOT) + '/', '')}")
        if left_out:
            print(f"left out ({gpus} GPUs visible, they need more): {', '.join(dict.fromkeys(left_out))}")
        return 0
    if not a.out:
        ap.error("--out is required to run (or use --dry-run)")
    if gpus < 1:
        ap.error("no GPU visible (nvidia-smi lists none): the suites measure GPUs; use --dry-run to see them")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, a.budget, gpus)
    if left_out:
        runner.log(f"left out ({gpus} GPUs visible, they need more): {', '.join(dict.fromkeys(left_out))}")
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
                         capture_output=True, text=True)
    (out / "gpus.txt").write_text(smi.stdout + smi.stderr)
    interrupted = False
    try:
        runner.run_all(planned)
    except KeyboardInterrupt:
        interrupted = True
        runner.log("interrupted: running steps stopped")
    finally:
        (out / "suite.json").write_text(json.dumps({"suites": names, "budget_s": a.budget, "reps": a.reps,
                                                    "gpus": gpus, "steps": runner.records}, indent=1))
    benches = [str(p) for p in sorted(out.glob("*.json")) if _is_bench(p)]
    if benches:
        sys.path.insert(0, str(ROOT / "src"))
        from dwdp.bench.report import repetitions_markdown

        (out / "reps.md").write_text(repetitions_markdown(benches) + "\n")
        runner.log(f"reps.md: {len(benches)} bench files")
    return 130 if interrupted else 0


def _is_bench(p: Path) -> bool:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("runs"), list)


if __name__ == "__main__":
    sys.exit(main())
