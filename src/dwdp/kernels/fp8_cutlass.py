"""The block-scaled FP8 grouped GEMM on CUTLASS (Hopper, sm_90a), built at first use.

``csrc/fp8_grouped_sm90.cu`` instantiates CUTLASS's pointer-array warp-specialised grouped
GEMM with DeepSeek-V3 block scaling (1x128 activation scales, 128x128 weight scales) for a
few tile configurations. It is compiled with nvcc against the headers of the
``nvidia-cutlass`` package (``pip install dwdp[cutlass]``) into one shared library with
plain C entry points, loaded with ctypes: no dependency on torch's C++ ABI.

The library is cached under ``$DWDP_CACHE`` (default ``~/.cache/dwdp``), keyed by the
source, the nvcc version and the GPU architecture, and built under a file lock (several
ranks start at once; one builds, the others wait and load it). Build ahead with

    python -m dwdp.kernels.fp8_cutlass build

or point ``DWDP_CUTLASS_LIB`` at a library built elsewhere. Nothing here touches CUDA or nvcc at import time; :func:`library` returns None (and
``why_unavailable()`` says why) where the GPU, nvcc or the headers are missing.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "fp8_grouped_sm90.cu"
# id -> (tile M, tile N, cluster M, cluster N, schedule): must match the #if chain in the source.
CONFIGS = {0: (128, 128, 1, 1, "coop"), 2: (128, 128, 1, 2, "coop"), 3: (64, 128, 1, 1, "pingpong")}
RASTER = {"m": 1, "n": 2}

_why: str | None = None


def why_unavailable() -> str | None:
    return _why


def cutlass_include() -> Path | None:
    """CUTLASS's include folder: $CUTLASS_PATH/include, else the nvidia-cutlass package's."""
    env = os.environ.get("CUTLASS_PATH")
    if env:
        p = Path(env) / "include"
        return p if (p / "cutlass" / "cutlass.h").exists() else None
    spec = importlib.util.find_spec("cutlass_library")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "source" / "include"
    return p if (p / "cutlass" / "cutlass.h").exists() else None


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cache_dir() -> Path:
    return Path(os.environ.get("DWDP_CACHE", Path.home() / ".cache" / "dwdp"))


def _key(nvcc: str, include: Path) -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(str(sorted(CONFIGS)).encode())
    version = include / "cutlass" / "version.h"
    if version.exists():
        h.update(version.read_bytes())
    return h.hexdigest()[:16]


def build(verbose: bool = False, jobs: int | None = None) -> Path:
    """Compile the library (one object per configuration, in parallel) unless cached; its path."""
    nvcc, include = _nvcc(), cutlass_include()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if include is None:
        raise RuntimeError("CUTLASS headers not found: pip install 'dwdp[cutlass]' (nvidia-cutlass) or set CUTLASS_PATH")
    out = cache_dir() / f"fp8_grouped_sm90_{_key(nvcc, include)}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait here, then find it built
        if out.exists():
            return out
        logging.getLogger("dwdp").warning(f"building the CUTLASS FP8 grouped GEMM into {out} (once, about a "
                                          "minute per configuration and CPU core)")
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            flags = ["-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
                     "-DNDEBUG", "-Xcompiler", "-fPIC", f"-I{include}"]

            def compile_one(cfg: int) -> str:
                obj = str(Path(tmp) / f"cfg{cfg}.o")
                r = subprocess.run([nvcc, *flags, f"-DDWDP_CFG={cfg}", "-c", str(SOURCE), "-o", obj],
                                   capture_output=True, text=True)
                if r.returncode:
                    raise RuntimeError(f"nvcc failed on configuration {cfg}:\n{r.stderr[-4000:]}")
                if verbose:
                    print(f"built configuration {cfg}: {CONFIGS[cfg]}", flush=True)
                return obj

            with ThreadPoolExecutor(jobs or min(len(CONFIGS), os.cpu_count() or 1)) as pool:
                objs = list(pool.map(compile_one, sorted(CONFIGS)))
            so = Path(tmp) / "lib.so"
            r = subprocess.run([nvcc, "-shared", *objs, "-o", str(so)], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"linking the FP8 grouped GEMM failed:\n{r.stderr[-4000:]}")
            os.replace(so, out)  # atomic: a reader never sees half a library
    return out


class _Lib:
    def __init__(self, path: Path):
        self.path = path
        self.dll = ctypes.CDLL(str(path))
        i64, i32, vp, sz = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
        self.run, self.args_bytes, self.workspace = {}, {}, {}
        for c in CONFIGS:
            f = getattr(self.dll, f"dwdp_fp8_sm90_{c}_run")
            f.argtypes = [vp, i64, vp, vp, i64, i64, vp, i64, vp, i64, vp, i32, vp, i32, i32, i32, i32, vp, vp,
                          i32, i32, i32, i32, i64]
            f.restype = i32
            self.run[c] = f
            a = getattr(self.dll, f"dwdp_fp8_sm90_{c}_args_bytes")
            a.argtypes, a.restype = [i32], sz
            self.args_bytes[c] = a
            w = getattr(self.dll, f"dwdp_fp8_sm90_{c}_workspace")
            w.argtypes, w.restype = [i32, i32], sz
            self.workspace[c] = w


@functools.lru_cache(maxsize=None)
def library() -> _Lib | None:
    """The loaded library (built if needed), or None where it cannot be had (see ``why_unavailable``)."""
    global _why
    if os.environ.get("DWDP_FP8_KERNEL", "auto") == "triton":
        _why = "DWDP_FP8_KERNEL=triton"
        return None
    if not torch.cuda.is_available():
        _why = "no CUDA device"
        return None
    if torch.cuda.get_device_capability() != (9, 0):
        _why = f"needs a Hopper GPU (sm_90), this is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
        return None
    try:
        prebuilt = os.environ.get("DWDP_CUTLASS_LIB")  # a library built ahead (elsewhere, same nvcc major)
        return _Lib(Path(prebuilt) if prebuilt else build())
    except (RuntimeError, OSError, AttributeError) as e:  # AttributeError: a prebuilt library of other configs
        _why = str(e).splitlines()[0]
        return None


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 counts: torch.Tensor, out: torch.Tensor, row_base: torch.Tensor | None = None,
                 config: int = 0, raster: str = "m", swizzle: int = 1) -> torch.Tensor:
    """out[rows of group g] = (a * a_scale)[rows] @ (w[g] * w_scale[g]).T for consecutive row
    groups of ``counts[g]`` rows starting at ``row_base[0]`` (a device tensor; 0 when None).
    Shapes and layouts are checked by the caller (``fp8_grouped.cutlass_applies``)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the CUTLASS FP8 grouped GEMM is unavailable: {_why}")
    G, N, K = w.shape
    dev = a.device
    args = torch.empty(lib.args_bytes[config](G), dtype=torch.uint8, device=dev)
    ws_bytes = lib.workspace[config](G, _sm_count(dev.index or 0))
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
    counts = counts if counts.is_contiguous() else counts.contiguous()
    base = 0 if row_base is None else row_base.data_ptr()
    rc = lib.run[config](
        a.data_ptr(), a.stride(0), a_scale.data_ptr(), w.data_ptr(), w.stride(0), w.stride(1), w_scale.data_ptr(),
        w_scale.stride(0), out.data_ptr(), out.stride(0), counts.data_ptr(), counts.element_size(), base,
        0 if row_base is None else row_base.element_size(), G, N, K, args.data_ptr(), ws.data_ptr(),
        _sm_count(dev.index or 0), dev.index or 0, RASTER[raster], swizzle, torch.cuda.current_stream(dev).cuda_stream)
    if rc:
        kind = f"CUTLASS status {-rc - 1000}" if rc < 0 else f"CUDA error {rc}"
        raise RuntimeError(f"CUTLASS FP8 grouped GEMM failed ({kind}) on a {tuple(a.shape)}, w {tuple(w.shape)}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["build"]:
        print("usage: python -m dwdp.kernels.fp8_cutlass build", file=sys.stderr)
        return 2
    try:
        print(build(verbose=True))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
