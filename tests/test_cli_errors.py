"""A new user's mistakes: each is one line on stderr (``dwdp <cmd>: error: ...``) naming the
problem and the fix, exit code 2, no traceback, and it comes before any model is loaded or
rank spawned (those paths are replaced by failures here), leaving no process or shared
memory behind."""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dwdp.cli as cli
import dwdp.parallel.launch as launch
from dwdp.cli import main


def _shm() -> set[str]:
    return set(glob.glob("/dev/shm/dwdp-*"))


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Fail the test if a mistake gets as far as loading a model or spawning ranks; check
    that nothing is left behind."""
    def forbidden(*a, **k):
        raise AssertionError("the mistake should have been refused before this")

    for command in cli.COMMANDS:  # each subcommand that loads a model in this process
        if hasattr(command, "load_model_from_args"):
            monkeypatch.setattr(command, "load_model_from_args", forbidden)
    monkeypatch.setattr(launch, "spawn_local", forbidden)
    before = _shm()
    yield
    assert multiprocessing.active_children() == []
    assert _shm() - before == set()


def _one_line(capsys, cmd: str, *words: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dwdp {cmd}: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _usage_error(capsys, argv: list[str], *words: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return _one_line(capsys, argv[0], *words)


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory) -> Path:
    """A real Hugging Face checkpoint (transformers' own code) with a 160-token context."""
    from hf_reference import make_hf_model

    d = tmp_path_factory.mktemp("short160")
    make_hf_model("qwen3_moe", d, seed=3, max_position_embeddings=160)
    return d


def test_port_in_use_is_refused_before_the_model_loads(nothing_expensive, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    _one_line(capsys, "serve", f"port {port}", "already in use", "--port")


def test_truncated_safetensors_file_is_named(short_ckpt, tmp_path, nothing_expensive, capsys):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for f in short_ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    st = bad / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])  # an interrupted download
    assert main(["run", "--model", str(bad)]) == 2
    _one_line(capsys, "run", str(st), "truncated", "download or copy it again")
    st.write_bytes(b"\x00" * 4)  # not even a header length
    assert main(["serve", "--model", str(bad), "--port", "0"]) == 2
    _one_line(capsys, "serve", str(st), "truncated")


def test_integer_weights_are_refused_with_the_tensor_named(short_ckpt, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for f in short_ckpt.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(short_ckpt / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(torch.int8)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    before = _shm()
    assert main(["run", "--model", str(bad)]) == 2
    _one_line(capsys, "run", "model.embed_tokens.weight", "I8", "floating-point")
    # The loader's own check (a library caller that skips the CLI) says the same.
    from dwdp.checkpoint import CheckpointError, load_checkpoint
    from dwdp.config import ModelConfig
    from dwdp.models import build_model

    model = build_model(ModelConfig.from_json_file(bad / "config.json"))
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight is stored as integers"):
        load_checkpoint(model, bad)
    assert _shm() - before == set()


def test_bench_group_larger_than_the_experts_is_one_line(nothing_expensive, capsys):
    # tiny-qwen3-moe has 12 routed experts: a dep or dwdp group of 13 is impossible.
    assert main(["bench", "-W", "13"]) == 2
    _one_line(capsys, "bench", "13", "12 routed experts", "at most 12")
    assert main(["bench", "-W", "4", "-N", "3"]) == 2
    _one_line(capsys, "bench", "--world-size 4 is not a multiple of --group-size 3")
    assert main(["bench", "-W", "5", "--strategies", "dwdp", "-L", "3"]) == 2
    _one_line(capsys, "bench", "L=3", "Valid L: 4, 8")


def test_serve_prefill_group_is_planned_before_ranks_start(nothing_expensive, capsys):
    assert main(["serve", "--port", "0", "--prefill", "dwdp", "--prefill-ranks", "13"]) == 2
    _one_line(capsys, "serve", "--prefill-ranks 13", "at most 12")
    assert main(["serve", "--port", "0", "--decode-ranks", "13"]) == 2
    _one_line(capsys, "serve", "--decode-ranks 13", "at most 12")


def test_bench_on_a_short_context_checkpoint(short_ckpt, tmp_path, capsys):
    # The workload must fit the model's 160 tokens: a clear line naming --isl and the limit ...
    with_nothing = _shm()
    assert main(["bench", "--model", str(short_ckpt), "--isl", "200"]) == 2
    _one_line(capsys, "bench", "--isl 200", "160 tokens", "--isl 160 or less")
    # ... and one that fits runs, warm-up included (it used to send a 200-token warm-up request).
    out = tmp_path / "b.json"
    assert main(["bench", "--model", str(short_ckpt), "--strategies", "dp", "-W", "1", "--num-requests", "2",
                 "--isl", "150", "--dist", "fixed", "--max-num-tokens", "256", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["runs"][0]["results"]["dp"]
    assert res["tokens"] == 300
    assert multiprocessing.active_children() == [] and _shm() - with_nothing == set()


def test_plan_without_arguments_works_and_short_contexts_are_named(capsys):
    assert main(["plan"]) == 0  # the default model's context (2048) is shorter than 8192: plan at it
    out = capsys.readouterr().out
    assert "ISL U[0.8x, 1x] of 2048" in out and "recommended" in out
    assert main(["plan", "--isl", "4096"]) == 2
    _one_line(capsys, "plan", "--isl 4096", "2048 tokens", "--isl 2048 or less")


def test_malformed_numbers_are_errors_not_coerced(nothing_expensive, capsys):
    assert main(["run", "--prompt", "1,,2"]) == 2
    _one_line(capsys, "run", "--prompt '1,,2'", "none empty", "--prompt 1,2,3")
    assert main(["run", "--prompt", "1,2", "--prompt", "3,x"]) == 2
    _one_line(capsys, "run", "--prompt '3,x'")
    assert main(["run", "--prompt", "5,99999"]) == 2
    _one_line(capsys, "run", "99999", "vocabulary")
    assert main(["run", "--lengths", "4,-2"]) == 2
    _one_line(capsys, "run", "--lengths", "at least 1")
    _usage_error(capsys, ["run", "-N", "0"], "-N", "give 1 or more", "see dwdp run --help")
    _usage_error(capsys, ["bench", "--num-requests", "0"], "--num-requests", "give 1 or more")
    _usage_error(capsys, ["serve", "--port", "70000"], "--port", "0 to 65535")
    assert main(["bench", "--cv", "0,,0.2"]) == 2
    _one_line(capsys, "bench", "--cv '0,,0.2'")
    assert main(["bench", "--max-num-tokens", "0"]) == 2
    _one_line(capsys, "bench", "--max-num-tokens", "at least 1")
    assert main(["bench", "--strategies", "dep,tp"]) == 2
    _one_line(capsys, "bench", "'tp'", "choose from dp, dep, dwdp")
    _usage_error(capsys, ["run", "--device", "gpu"], "--device", "give cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        assert main(["serve", "--port", "0", "--device", "cuda:1"]) == 2
        _one_line(capsys, "serve", "no CUDA device is visible", "--device cpu")


def test_a_real_process_prints_one_line_and_no_traceback():
    """The installed entry point as a user runs it (a subprocess, so exit code and stderr are
    the real ones)."""
    env = dict(os.environ, PYTHONPATH=str(Path(cli.__file__).parents[2]))
    r = subprocess.run([sys.executable, "-m", "dwdp.cli", "bench", "-W", "13"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert r.stderr.startswith("dwdp bench: error: ") and "at most 12" in r.stderr


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    import dwdp

    assert capsys.readouterr().out.strip() == f"dwdp {dwdp.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "on one device" not in top and "local DWDP group" in top
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, sp in subs.choices.items():
        for action in sp._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"dwdp {name} {action.option_strings[0]} has no help text"
        text = " ".join(sp.format_help().split())  # help wraps lines
        if name == "serve":
            for flag in ("--device", "--dtype", "--port", "--prefill-ranks"):
                assert flag in text
            assert "(default: 8000)" in text and "(default: 2)" in text
        if name == "loadtest":
            assert "(default: http://127.0.0.1:8000)" in text and "(default: 32)" in text
            assert "--cv CV normal/lognormal: coefficient of variation of the lengths (default: 0.0)" in text
        if name == "plan":
            assert "-N GROUP_SIZE DWDP / EP group size (default 4)" in text and "(default: 16384)" in text
