"""``dwdp serve``: the OpenAI-compatible server, with its decode and prefill groups."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import DTYPES
from ..errors import UserError, check_port_free, nonnegative_int, positive_float, positive_int
from ..strategy.registry import STRATEGIES
from ..strategy.spec import DEPConfig, DWDPConfig, options_from
from .common import (_add_dense_dtype, _add_expert_dtype, _add_model_args, _add_options, _add_removed_flags,
                     _check_device, _device, _model_config, _plan_or_explain, load_model_from_args)


def add_parser(subparsers) -> None:
    srv = subparsers.add_parser("serve", help="OpenAI-compatible completions and chat server (default: tiny model, "
                                              "CPU, 127.0.0.1:8000)")
    _add_model_args(srv)
    srv.add_argument("--device", type=_device, default="cpu",
                     help="where decode (and local prefill) runs: cpu or cuda[:i]")
    srv.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help="weight/activation dtype (default: float32 on cpu, bfloat16 on cuda)")
    srv.add_argument("--seed", type=int, default=0, help="seed for random weights (presets)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    srv.add_argument("--port", type=_port, default=8000, help="TCP port to listen on (0: any free port)")
    srv.add_argument("--api-key", default=None, help="require this bearer key (or set DWDP_API_KEY)")
    srv.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="the model name(s) requests may name (the first is what answers report); default: the "
                          "model's name as /v1/models lists it")
    srv.add_argument("--max-num-tokens", type=positive_int, default=8192, help="prefill token budget per step")
    srv.add_argument("--max-batch", type=positive_int, default=64, help="requests decoded together")
    _add_expert_dtype(srv, "auto")
    _add_dense_dtype(srv, "auto")
    srv.add_argument("--decode-ranks", type=nonnegative_int, default=0,
                     help="decode in an expert-parallel (DEP) group of this many processes (GPUs cuda:0..N-1 with "
                          "--device cuda), each holding E/N experts; 0: decode in the server process")
    srv.add_argument("--max-context", type=positive_int, default=None,
                     help="tokens per request (prompt + output) the decode KV cache holds; it is allocated once "
                          "for --max-batch requests (default: the model's context, at most 4096)")
    srv.add_argument("--max-queue", type=positive_int, default=256, help="requests in flight before 429")
    srv.add_argument("--threads", type=positive_int, default=1,
                     help="CPU decode: torch intra-op threads of the serving loop (default 1: a step is many tiny "
                          "ops, and a thread pool's per-op barriers stall whenever the cores are shared)")
    srv.add_argument("--prefill", default="local", choices=["local", *STRATEGIES],
                     help="local: prefill in the server process; else a prefill group of --prefill-ranks processes "
                          "(GPUs cuda:0..R-1) handing KV caches to decode here (--device, e.g. cuda:4)")
    srv.add_argument("--prefill-ranks", type=positive_int, default=2,
                     help="with --prefill dp/dep/dwdp: processes in the prefill group")
    _add_options(srv, DWDPConfig, DEPConfig)  # a DWDP prefill group; --dep-wire: --decode-ranks' DEP group
    _add_removed_flags(srv, "--pull-pacing")
    srv.add_argument("--prefill-hold-ms", type=float, default=3.0,
                     help="DWDP prefill: hold a step smaller than the measured break-even size (the tokens whose "
                          "compute hides one layer's pull) up to this long for more requests (default 3; 0: never)")
    srv.add_argument("--kv-transport", default="auto", choices=["auto", "host", "cuda_ipc"],
                     help="how a prefill rank's KV cache reaches decode: cuda_ipc = GPU to GPU (NVLink), "
                          "host = through shared host memory; auto = cuda_ipc when prefill and decode (in this "
                          "process) are on GPUs")
    srv.add_argument("--switch-interval-ms", type=_positive_ms, default=0.5,
                     help="the interpreter's thread switch interval (default 0.5; Python's own is 5): with 64 "
                          "streams on one H200 the serving loop's decode step fell from 14.7 to 11.8 ms")
    srv.add_argument("--decode-overlap", default="on", choices=["on", "off"],
                     help="launch each decode step before the host reads the previous one's tokens (default on; "
                          "off: one step at a time). Decode in this process only (not --decode-ranks)")
    srv.add_argument("--drain-timeout", type=positive_float, default=30.0,
                     help="on SIGTERM/SIGINT, seconds running requests may take to finish (default 30)")
    srv.set_defaults(func=cmd_serve)


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; give 0 to 65535 (0: any free port)")
    return v


def _positive_ms(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of milliseconds (e.g. 0.5)")
    return v


def _warn_without_transformers(model: str) -> None:
    """A checkpoint with a tokenizer served without transformers answers token ids only."""
    import importlib.util

    if (Path(model).is_dir() and any((Path(model) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
            and importlib.util.find_spec("transformers") is None):
        print(f"dwdp serve: warning: {model} ships a tokenizer, but transformers is not installed: prompts must be "
              "token ids and chat requests are refused; pip install 'dwdp[serve]' for text and chat templates",
              file=sys.stderr, flush=True)


def cmd_serve(args) -> int:
    from ..serve.server import Server
    from ..serve.worker import ServingWorker

    # Everything a user can get wrong is checked before the model loads or a rank starts.
    check_port_free(args.host, args.port)
    _check_device(args.device)
    _model_config(args.model, args.num_layers)
    _warn_without_transformers(args.model)
    on_gpu = args.device.startswith("cuda")
    decode_spec = prefill_spec = None
    if args.decode_ranks:
        from ..serve.decode_pool import DecodePoolSpec

        decode_spec = DecodePoolSpec(args.model, args.decode_ranks, args.num_layers, args.dtype,
                                     "cuda" if on_gpu else "cpu", args.expert_dtype, args.max_batch,
                                     args.max_context, args.seed, dep=options_from(DEPConfig, args),
                                     dense_dtype=args.dense_dtype)
        _plan_or_explain(decode_spec.rank_spec(), "--decode-ranks")
    if args.prefill != "local":
        from ..serve.disagg import PrefillPoolSpec

        # A decode group in its own processes receives the KV through this one: host memory.
        kv_transport = args.kv_transport if args.kv_transport != "auto" else (
            "cuda_ipc" if on_gpu and not args.decode_ranks else "host")
        if kv_transport == "cuda_ipc" and args.decode_ranks:
            raise UserError("--kv-transport cuda_ipc needs decode in the server process "
                            "(drop --decode-ranks, or use --kv-transport host)")
        try:
            prefill_spec = PrefillPoolSpec(args.model, args.prefill, args.prefill_ranks, args.num_layers, args.dtype,
                                           "cuda" if on_gpu else "cpu", options_from(DWDPConfig, args),
                                           args.max_num_tokens, args.seed, expert_dtype=args.expert_dtype,
                                           hold_ms=args.prefill_hold_ms,
                                           kv_transport=kv_transport, dense_dtype=args.dense_dtype)
        except ValueError as e:
            raise UserError(f"--kv-transport: {e}") from None
        _plan_or_explain(prefill_spec.rank_spec(args.prefill_ranks), "--prefill-ranks")

    cfg, model = load_model_from_args(args)
    from ..serve.server import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    decode = None
    if decode_spec is not None:
        from ..serve.decode_pool import SupervisedDecodePool

        print(f"dwdp serve: starting an expert-parallel decode group of {args.decode_ranks} ranks", flush=True)
        decode = SupervisedDecodePool(decode_spec)
    if prefill_spec is None:
        worker = ServingWorker(model, args.max_num_tokens, args.max_batch, args.max_queue,
                               intra_op_threads=args.threads, max_context=args.max_context, decode=decode,
                               decode_overlap=args.decode_overlap == "on")
    else:
        from ..serve.disagg import DisaggServingWorker, PrefillPool

        print(f"dwdp serve: starting a {args.prefill} prefill group of {args.prefill_ranks} ranks", flush=True)
        worker = DisaggServingWorker(model, PrefillPool(prefill_spec), args.max_batch, args.max_queue,
                                     intra_op_threads=args.threads, max_context=args.max_context, decode=decode,
                                     decode_overlap=args.decode_overlap == "on")
    if args.switch_interval_ms is not None:
        # The serving loop shares the interpreter with the HTTP threads; it waits up to one
        # switch interval for the lock whenever they hold it (Python's default is 5 ms).
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    api_key = args.api_key or os.environ.get("DWDP_API_KEY")
    names = args.served_model_name or [cfg.name or args.model]
    server = Server(worker, names, args.host, args.port, tokenizer, api_key,
                    drain_timeout_s=args.drain_timeout)
    print(f"dwdp serve: {', '.join(names)} on {args.device} at http://{args.host}:{server.port} "
          f"(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics{'; API key required' if api_key else ''})", flush=True)
    server.serve_until_signal()
    print("dwdp serve: stopped", flush=True)
    return 0
